"""Damaged checkpoints and full disks on real runs: one line naming the problem, nothing good lost,
and a rerun of the same command (with --resume-fallback where a checkpoint is damaged) finishes
with the uninterrupted run's exact metrics."""
from __future__ import annotations

import json
import subprocess

import pytest

from pretrain import checkpoint, faults
from tests.pretrain.training_runs import REPO, run_env, tiny_overrides, training_command

pytestmark = pytest.mark.slow

SETTINGS = {"train.max_steps": 6, "train.save_interval": 2, "train.keep_last": 3}
KEYS = ("step", "loss", "lr", "grad_norm", "tokens", "skipped_steps", "val_loss")


def train(run_dir, shards, *extra: str, env=None) -> subprocess.CompletedProcess:
    cmd = training_command(1) + ["--config", "tiny"] + tiny_overrides(run_dir, shards, **SETTINGS) + list(extra)
    return subprocess.run(cmd, cwd=REPO, env={**run_env(), **(env or {})}, capture_output=True, text=True, timeout=600)


def metrics(run_dir) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: line[k] for k in KEYS if k in line} for line in lines]


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def reference(tiny_corpus_shards, tmp_path_factory):
    run = tmp_path_factory.mktemp("reference") / "run"
    result = train(run, tiny_corpus_shards.shard_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return run


def test_a_damaged_checkpoint_is_one_line_and_resume_fallback_continues_from_the_previous(reference, shards, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    damaged = run / "checkpoints" / "step_00000006" / "mp_rank_00_model_states.pt"
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0x01
    damaged.write_bytes(bytes(data))
    before = (run / "metrics.jsonl").read_bytes()

    line = one_error_line(train(run, shards))
    assert line == (f"error: {damaged}: sha256 does not match the checkpoint record (the file is damaged); pass "
                    "--resume-fallback (or --set run.resume_fallback=true) to resume from the previous complete "
                    "checkpoint step_00000004")
    assert (run / "metrics.jsonl").read_bytes() == before and (run / "checkpoints" / "latest").read_text() == "step_00000006"

    result = train(run, shards, "--resume-fallback")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"warning: {damaged}: sha256 does not match" in result.stdout
    assert f"resumed from {run / 'checkpoints' / 'step_00000004'} at step 4" in result.stdout
    assert metrics(run) == metrics(reference)  # steps 5-6 retrained exactly
    assert checkpoint.complete_tags(run) == ["step_00000002", "step_00000004", "step_00000006"]
    assert checkpoint.damage(run, "step_00000006") == []


def test_a_save_on_a_full_disk_keeps_the_previous_checkpoint_and_the_rerun_finishes(reference, shards, tmp_path):
    run = tmp_path / "run"
    line = one_error_line(train(run, shards, env={faults.SAVE_ERROR: "4"}))
    folder = run / "checkpoints" / "step_00000004"
    assert line.startswith(f"error: {folder}: checkpoint not written (rank 0: No space left on device: {folder}); "
                           f"the previous checkpoint {run / 'checkpoints' / 'step_00000002'} is kept")
    assert not folder.exists()
    assert (run / "checkpoints" / "latest").read_text() == "step_00000002"
    assert checkpoint.damage(run, "step_00000002") == []

    result = train(run, shards)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / 'step_00000002'} at step 2" in result.stdout
    assert metrics(run) == metrics(reference)
