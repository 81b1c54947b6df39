"""Real pipelined DeepSpeed runs on CPU ranks (gloo), compared with the plain engine on one rank.

Run as a script (`torchrun ... tests/pretrain/test_pipeline_runs.py --config tiny --set ...`) this
file is `pretrain.train.main` with the pipeline's two hooks in train.py (docs/pipeline.md, "Hooks
in pretrain/train.py") applied where train.py does not have them yet: prepare() fills DeepSpeed's
pipeline section for world / P data-parallel replicas, and metric lines get the bubble fraction.
Everything else (Trainer, data, checkpoints, resume, metrics) is the real training loop.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script by torchrun
    sys.path.insert(0, str(REPO))

from tests.pretrain.training_runs import _free_port, run_env, step_losses, tiny_overrides  # noqa: E402

pytestmark = pytest.mark.slow
ENTRY = Path(__file__).resolve()


# ----------------------------------------------------------------------------- the entry point

def _with_pipeline(prepare):
    def prepare_pipelined(config, world_size):
        from pretrain.config import resolve_repo_path
        from pretrain.ds_config import build_deepspeed_config
        from pretrain.pipeline import configure_pipeline, data_parallel_size, pipeline_stages_of
        from pretrain.distributed import bf16_supported

        run = prepare(config, world_size)
        if pipeline_stages_of(run.ds_config) == config.parallel.pipeline_stages:
            return run  # train.py has the hook
        ds_path = resolve_repo_path(config.deepspeed.config)
        ds_config = build_deepspeed_config(ds_path, config.train, data_parallel_size(config.parallel, world_size), bf16_supported())
        return replace(run, ds_config=configure_pipeline(ds_config, config.parallel, run.config.model, world_size))

    return prepare_pipelined


def _with_pipeline_metrics(log_record):
    def log_record_pipelined(self, *args, **kwargs):
        from pretrain.pipeline import pipeline_metrics

        record = log_record(self, *args, **kwargs)
        return {**pipeline_metrics(self.ds_config), **record}

    return log_record_pipelined


def _with_pipeline_guard(step):
    def step_pipelined(self, micro_batches, step_number, stop_requested):
        from pretrain.engine import is_pipeline, pipeline_step
        from pretrain.numerics import StepOutcome, _suppressed_optimizer_step

        if not is_pipeline(self.engine):
            return step(self, micro_batches, step_number, stop_requested)
        agreed = {}

        def at_boundary(loss_sum):
            agreed["flags"] = self._agree(loss_sum, stop_requested)
            suppress = agreed["flags"][1] and self.checks_gradients_itself
            return _suppressed_optimizer_step(self.engine.optimizer) if suppress else None

        loss = pipeline_step(self.engine, micro_batches, at_boundary)
        loss_bad, grads_bad, stop = agreed["flags"]
        applied = bool(self.engine.was_step_applied())
        return StepOutcome(loss, applied, not applied and (loss_bad or grads_bad or not self.fp16), stop)

    return step_pipelined


def pipelined_main(argv) -> int:
    import inspect

    from pretrain import train

    train.prepare = _with_pipeline(train.prepare)
    train.Trainer._log_record = _with_pipeline_metrics(train.Trainer._log_record)
    guarded = getattr(train, "GuardedStep", None)  # the reliability work's optimizer step, where it has landed
    if guarded is not None and "pipeline" not in inspect.getsource(guarded.step):
        guarded.step = _with_pipeline_guard(guarded.step)
    return train.main(argv)


# ----------------------------------------------------------------------------- helpers

def train_command(nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, str(ENTRY)]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(_free_port()), str(ENTRY)]


def run_pipeline_training(run_dir: Path, shards: Path, nproc: int, timeout: int = 600, **sets) -> subprocess.CompletedProcess:
    cmd = train_command(nproc) + ["--config", "tiny"] + tiny_overrides(run_dir, shards, **sets)
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


@pytest.fixture
def pipelined_weights(monkeypatch):
    """Reads pipelined checkpoints in eval_checkpoint.run_state_dict until that file has the hook itself
    (docs/pipeline.md, "Hooks"); with the hook in place this fixture does nothing."""
    import inspect

    from pretrain import checkpoint, eval_checkpoint, export_hf
    from pretrain.pipeline_checkpoint import is_pipeline_checkpoint, pipeline_state_dict_to_model

    if "is_pipeline_checkpoint" in inspect.getsource(eval_checkpoint.run_state_dict):
        return
    original = eval_checkpoint.run_state_dict

    def run_state_dict(run_dir, step=None):
        tag = eval_checkpoint._resolve_tag(Path(run_dir), step)
        folder = checkpoint.checkpoints_dir(run_dir) / tag
        if is_pipeline_checkpoint(folder):
            return pipeline_state_dict_to_model(folder), tag
        return original(run_dir, step)

    monkeypatch.setattr(eval_checkpoint, "run_state_dict", run_state_dict)
    monkeypatch.setattr(export_hf, "run_state_dict", run_state_dict)


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
def test_pipelined_checkpoint_loads_as_the_plain_models_weights_and_logits(arch, runs, pipelined_weights):
    from pretrain.eval_checkpoint import load_checked_model

    plain_model, _, _ = load_checked_model(runs.plain(arch))
    piped_model, config, tag = load_checked_model(runs.piped(arch))
    assert tag == "step_00000006" and config.parallel.pipeline_stages == 2
    plain_state, piped_state = plain_model.state_dict(), piped_model.state_dict()
    for name, value in plain_state.items():
        assert torch.allclose(piped_state[name], value, atol=1e-5), name
    tokens = torch.randint(0, config.model.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(piped_model(tokens), plain_model(tokens), atol=1e-4)


def test_export_hf_of_a_pipelined_checkpoint_gives_its_logits(runs, pipelined_weights, tmp_path):
    from transformers import AutoModelForCausalLM

    from pretrain.eval_checkpoint import load_checked_model
    from pretrain.export_hf import export

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


if __name__ == "__main__":
    from lmforge.errors import run_cli

    sys.exit(run_cli(pipelined_main))
