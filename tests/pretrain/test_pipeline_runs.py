"""Real pipelined DeepSpeed runs on CPU ranks (gloo) through `python -m pretrain.train` / torchrun,
compared with the plain engine on one rank. Everything (prepare's pipeline section, Trainer, data,
checkpoints, resume, metrics with the bubble fraction) is the real training loop.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tests.pretrain.training_runs import REPO, run_env, step_losses, tiny_overrides, training_command

pytestmark = pytest.mark.slow


# ----------------------------------------------------------------------------- helpers

def run_pipeline_training(run_dir: Path, shards: Path, nproc: int, timeout: int = 600, **sets) -> subprocess.CompletedProcess:
    cmd = training_command(nproc) + ["--config", "tiny"] + tiny_overrides(run_dir, shards, **sets)
    return subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=timeout)


def trained_losses(run_dir: Path, shards: Path, nproc: int, **sets) -> list[float]:
    result = run_pipeline_training(run_dir, shards, nproc, **sets)
    assert result.returncode == 0, f"training failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return step_losses(run_dir)


def metric_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------- the runs under test

STEPS = 6
COMMON = {"train.max_steps": STEPS, "train.grad_accum_steps": 4, "train.save_interval": 3, "train.warmup_steps": 2,
          "train.grad_clip": 0.5, "model.n_layers": 3}  # clipping is active: grad norms are ~1
ARCHS = {
    "llama": {"model.arch": "llama", "deepspeed.config": "ds_configs/zero1_actckpt.json"},  # and activation checkpointing
    "gpt2": {"model.arch": "gpt2", "model.n_kv_heads": "null"},  # tied embedding and head
}


class Runs:
    """Each training run once per module: the tests below read the same run directories."""

    def __init__(self, root: Path, shards: Path):
        self.root, self.shards, self.done = root, shards, {}

    def get(self, name: str, nproc: int, **sets) -> Path:
        if name not in self.done:
            run_dir = self.root / name
            self.done[name] = (run_dir, trained_losses(run_dir, self.shards, nproc, **sets))
        return self.done[name][0]

    def plain(self, arch: str) -> Path:
        return self.get(f"{arch}-plain", 1, **COMMON, **ARCHS[arch])

    def piped(self, arch: str) -> Path:
        return self.get(f"{arch}-p2", 2, **COMMON, **ARCHS[arch], **{"parallel.pipeline_stages": 2})


@pytest.fixture(scope="module")
def runs(tiny_corpus_shards, tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("pipeline_runs"), tiny_corpus_shards.shard_dir)


# ----------------------------------------------------------------------------- tests

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_two_stages_on_two_ranks_give_one_ranks_fp32_losses(arch, runs):
    plain, piped = metric_lines(runs.plain(arch)), metric_lines(runs.piped(arch))
    plain_losses, piped_losses = [m["loss"] for m in plain if "loss" in m], [m["loss"] for m in piped if "loss" in m]
    assert len(plain_losses) == STEPS and plain_losses[-1] < plain_losses[0]
    assert piped_losses == pytest.approx(plain_losses, rel=1e-5)
    assert [m["val_loss"] for m in piped if "val_loss" in m] == pytest.approx([m["val_loss"] for m in plain if "val_loss" in m], rel=1e-5)
    last = [m for m in piped if "loss" in m][-1]
    assert last["bubble_fraction"] == pytest.approx((2 - 1) / (4 + 2 - 1))  # P = 2, M = 4 micro-batches
    assert last["tokens"] == [m for m in plain if "loss" in m][-1]["tokens"]  # the same global batch


def test_two_stages_times_two_replicas_on_four_ranks_give_one_ranks_losses(runs):
    # Same global batch: 1 rank x 4 micro-batches = 2 replicas x 2 micro-batches.
    piped = runs.get("gpt2-p2dp2", 4, **{**COMMON, **ARCHS["gpt2"], "parallel.pipeline_stages": 2, "train.grad_accum_steps": 2})
    plain_losses = step_losses(runs.plain("gpt2"))
    assert step_losses(piped) == pytest.approx(plain_losses, rel=1e-5)
    first = metric_lines(piped)[0]
    assert first["bubble_fraction"] == pytest.approx(1 / 3) and first["tokens"] == metric_lines(runs.plain("gpt2"))[0]["tokens"]
    layer_files = sorted(p.name for p in (piped / "checkpoints" / "step_00000006").glob("layer_*"))
    assert layer_files == [f"layer_{i:02d}-model_states.pt" for i in range(3 + 3)]  # 7 layers; the tied head has no file


def test_resume_from_a_pipelined_checkpoint_repeats_the_same_losses(runs, tmp_path):
    original = runs.piped("gpt2")
    resumed = tmp_path / "resumed"
    shutil.copytree(original, resumed)  # as if the job had died right after its step-3 checkpoint
    shutil.rmtree(resumed / "checkpoints" / "step_00000006")
    (resumed / "checkpoints" / "latest").write_text("step_00000003")
    result = run_pipeline_training(resumed, runs.shards, 2, **COMMON, **ARCHS["gpt2"], **{"parallel.pipeline_stages": 2})
    assert result.returncode == 0, result.stderr[-4000:]
    assert "at step 3" in result.stdout
    assert step_losses(resumed) == step_losses(original)  # bit for bit
    assert [m["step"] for m in metric_lines(resumed) if "loss" in m] == list(range(1, STEPS + 1))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_pipelined_checkpoint_loads_as_the_plain_models_weights_and_logits(arch, runs):
    from run_tools.run_config import load_checked_model

    plain_model, _, _ = load_checked_model(runs.plain(arch))
    piped_model, config, tag = load_checked_model(runs.piped(arch))
    assert tag == "step_00000006" and config.parallel.pipeline_stages == 2
    plain_state, piped_state = plain_model.state_dict(), piped_model.state_dict()
    for name, value in plain_state.items():
        assert torch.allclose(piped_state[name], value, atol=1e-5), name
    tokens = torch.randint(0, config.model.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(piped_model(tokens), plain_model(tokens), atol=1e-4)


def test_export_hf_of_a_pipelined_checkpoint_gives_its_logits(runs, tmp_path):
    from transformers import AutoModelForCausalLM

    from run_tools.export_hf import export
    from run_tools.run_config import load_checked_model

    run_dir = runs.piped("llama")
    export(run_dir, tmp_path / "hf")
    model, config, _ = load_checked_model(run_dir)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.randint(0, config.model.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(hf(tokens).logits[..., : config.model.vocab_size], model(tokens), atol=1e-4)


def test_stages_that_do_not_divide_the_ranks_are_one_line_error_before_any_process_group(tiny_corpus_shards, tmp_path):
    result = run_pipeline_training(tmp_path / "run", tiny_corpus_shards.shard_dir, 1, **{"parallel.pipeline_stages": 2})
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: parallel.pipeline_stages = 2 does not divide the 1 rank(s) launched: ranks = pipeline "
                      "stages x data-parallel replicas, so launch a multiple of 2 ranks"]
    assert "Traceback" not in result.stderr and "topology" not in result.stdout  # no engine, no group
    assert not (tmp_path / "run" / "checkpoints").exists()

