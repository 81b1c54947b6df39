"""Non-finite losses and gradients on real DeepSpeed runs: the step is skipped on every rank with the
weights, optimizer and LR schedule untouched, counted in metrics, and a run of them stops training."""
from __future__ import annotations

import json
import subprocess

import pytest
import torch

from pretrain import faults
from pretrain.config import REPO_ROOT
from pretrain.run_weights import run_state_dict
from tests.pretrain.training_runs import REPO, run_env, tiny_overrides, training_command

pytestmark = pytest.mark.slow


def train(run_dir, shards, nproc=1, env=None, **sets) -> subprocess.CompletedProcess:
    cmd = training_command(nproc) + ["--config", "tiny"] + tiny_overrides(run_dir, shards, **sets)
    return subprocess.run(cmd, cwd=REPO, env={**run_env(), **(env or {})}, capture_output=True, text=True, timeout=600)


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def weights(run_dir, step: int) -> dict[str, torch.Tensor]:
    return run_state_dict(run_dir, step)[0]


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("nproc, ds_json, fault", [
    (1, "ds_configs/zero0.json", faults.NAN_AT_STEP),       # our own check (plain torch optimizer)
    (1, "ds_configs/zero1.json", faults.INF_GRAD_AT_STEP),  # finite loss, infinite gradients: DeepSpeed's check
    (2, "ds_configs/zero3.json", faults.NAN_AT_STEP),       # NaN on rank 0 only: both ranks skip
])
def test_a_non_finite_step_is_skipped_and_leaves_the_weights_of_the_step_before(nproc, ds_json, fault, shards, tmp_path):
    run = tmp_path / "run"
    result = train(run, shards, nproc, {fault: "3"}, **{"deepspeed.config": ds_json, "train.max_steps": 5,
                                                         "train.save_interval": 1, "train.keep_last": 10})
    assert result.returncode == 0, result.stderr[-4000:]
    lines = metrics(run)
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5]
    assert [m["skipped_steps"] for m in lines] == [0, 0, 1, 1, 1]
    assert lines[2]["loss"] is None and all(isinstance(m["loss"], float) for m in lines[:2] + lines[3:])
    assert lines[3]["lr"] == lines[2]["lr"]  # the LR schedule did not advance either: step 4 takes step 3's lr
    assert same(weights(run, 2), weights(run, 3))
    after = weights(run, 4)
    assert not same(weights(run, 3), after) and all(torch.isfinite(t).all() for t in after.values())


def test_max_bad_steps_in_a_row_stop_training_with_one_line(shards, tmp_path):
    run = tmp_path / "run"
    result = train(run, shards, 1, {faults.NAN_AT_STEP: "3,4,5"}, **{
        "train.max_steps": 8, "train.save_interval": 2, "train.max_bad_steps": 3})
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: 3 optimizer steps in a row (3-5) had a non-finite loss or gradient and were skipped "
        "(train.max_bad_steps = 3); the weights are still those of step 2; lower train.lr or check the data, "
        f"then rerun the same command to resume from {run / 'checkpoints' / 'step_00000004'}"
    ]
    assert [m["step"] for m in metrics(run)] == [1, 2, 3, 4, 5]
    assert same(weights(run, 2), weights(run, 4))


def test_fp16_overflow_is_skipped_by_the_loss_scaler_shown_in_metrics_and_not_a_bad_step(shards, tmp_path):
    """On a CPU, fp16 means DeepSpeed's torch_autocast with ZeRO-0 and torch's GradScaler: infinite
    gradients at step 3 are the scaler's overflow; it halves the scale and the step is skipped."""
    config = json.loads((REPO_ROOT / "ds_configs/zero0.json").read_text())
    config["torch_autocast"] = {"enabled": True, "dtype": "float16"}
    path = tmp_path / "fp16.json"
    path.write_text(json.dumps(config))
    run = tmp_path / "run"
    result = train(run, shards, 1, {faults.INF_GRAD_AT_STEP: "3"}, **{
        "deepspeed.config": str(path), "train.max_steps": 5, "train.max_bad_steps": 1})
    assert result.returncode == 0, result.stderr[-4000:]  # an overflow with a finite loss is not a bad step
    lines = metrics(run)
    assert [m["loss_scale"] for m in lines] == [65536.0, 65536.0, 32768.0, 32768.0, 32768.0]
    assert [m["skipped_steps"] for m in lines] == [0, 0, 1, 1, 1]
    assert lines[2]["loss"] is None and lines[3]["lr"] == lines[2]["lr"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="DeepSpeed's own fp16 optimizers run only on GPUs")
def test_deepspeed_fp16_overflow_lowers_the_loss_scale_and_is_not_a_bad_step(shards, tmp_path):
    config = json.loads((REPO_ROOT / "ds_configs/zero2_fp16.json").read_text())
    config["fp16"]["initial_scale_power"] = 32  # 2^32: the first steps overflow for sure
    path = tmp_path / "fp16.json"
    path.write_text(json.dumps(config))
    run = tmp_path / "run"
    result = train(run, shards, 1, **{"deepspeed.config": str(path), "train.max_steps": 12, "train.max_bad_steps": 1})
    assert result.returncode == 0, result.stderr[-4000:]
    lines = metrics(run)
    assert lines[0]["loss_scale"] < 2.0**32 and lines[-1]["skipped_steps"] >= 1
