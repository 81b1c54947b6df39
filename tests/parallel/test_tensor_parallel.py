"""Real DeepSpeed AutoTP runs on CPU ranks (gloo, fp32, ZeRO-1/2): tensor parallelism trains the same model,
resumes exactly, and its checkpoints read back (and export to transformers) as the plain model."""
import shutil
import subprocess

import pytest
import torch

from pretrain import checkpoint
from pretrain.metrics import read_metrics
from tests.pretrain.training_runs import REPO, run_env, run_training, step_losses, tiny_overrides, training_command

pytestmark = pytest.mark.slow

STEPS, SAVE_INTERVAL = 20, 10
ARCHS = ("llama", "gpt2")


def _sets(arch: str, **extra) -> dict:
    return {"model.arch": arch, "model.n_kv_heads": "null" if arch == "gpt2" else 2, "train.max_steps": STEPS,
            "train.save_interval": SAVE_INTERVAL, "train.keep_last": 2, "deepspeed.config": "ds_configs/zero1.json",
            **extra}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shards):
    """{(arch, layout): run dir} for one rank and for tensor = 2 on two ranks, 20 steps each."""
    found = {}
    for arch in ARCHS:
        for layout, nproc, tensor in (("single", 1, 1), ("tp2", 2, 2)):
            run_dir = tmp_path_factory.mktemp(f"{layout}-{arch}")
            # one_rank_zero0 false: the single rank runs ZeRO-1 as the tensor-parallel ranks do (as ZeRO-0 its
            # gradient-free key biases would take another path of rounding noise than the 2-rank run's)
            run_training(run_dir, shards, nproc=nproc, **_sets(arch, **{"parallel.tensor": tensor, "deepspeed.one_rank_zero0": "false"}))
            found[arch, layout] = run_dir
    return found


@pytest.mark.parametrize("arch", ARCHS)
def test_tensor_parallel_2_matches_single_rank_losses(arch, runs):
    reference, losses = step_losses(runs[arch, "single"]), step_losses(runs[arch, "tp2"])
    assert len(reference) == STEPS and reference[-1] < reference[0]
    assert losses == pytest.approx(reference, rel=1e-5)
    # Norms above train.grad_clip = 1: clipping acts, and its norm spans the tensor group's shards.
    norms, reference_norms = ([r["grad_norm"] for r in read_metrics(runs[arch, layout]) if "grad_norm" in r]
                              for layout in ("tp2", "single"))
    assert len(norms) == STEPS and max(norms) > 1.0
    assert norms == pytest.approx(reference_norms, rel=1e-5)


def test_tensor_parallel_at_zero0_clips_like_deepspeed_and_matches_single_rank_losses(runs, tmp_path, shards):
    losses = run_training(tmp_path / "tp2-zero0", shards, nproc=2, **_sets(
        "llama", **{"parallel.tensor": 2, "deepspeed.config": "ds_configs/zero0.json", "train.save_interval": 0}))
    assert losses == pytest.approx(step_losses(runs["llama", "single"]), rel=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_tensor_2_by_data_2_matches_single_rank_losses_at_the_same_global_batch(arch, runs, tmp_path, shards):
    # 4 ranks = 2 tensor × 2 data; micro 1 × 2 replicas is the single rank's global batch of 2.
    losses = run_training(tmp_path / "tp2dp2", shards, nproc=4, **_sets(
        arch, **{"parallel.tensor": 2, "train.micro_batch_size": 1, "deepspeed.config": "ds_configs/zero2.json",
                 "train.save_interval": 0}))
    assert losses == pytest.approx(step_losses(runs[arch, "single"]), rel=1e-5)


def test_a_tensor_parallel_run_resumes_to_the_same_losses(runs, tmp_path, shards):
    finished = runs["llama", "tp2"]
    resumed = tmp_path / "resumed"
    shutil.copytree(finished, resumed)
    shutil.rmtree(checkpoint.checkpoints_dir(resumed) / checkpoint.tag_for_step(STEPS))
    (checkpoint.checkpoints_dir(resumed) / "latest").write_text(checkpoint.tag_for_step(SAVE_INTERVAL))
    command = training_command(2) + ["--config", "tiny"] + tiny_overrides(resumed, shards, **_sets("llama", **{"parallel.tensor": 2}))
    result = subprocess.run(command, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"at step {SAVE_INTERVAL}" in next(line for line in result.stdout.splitlines() if line.startswith("resumed from"))
    losses = step_losses(resumed)  # metrics.jsonl: steps 1-10 kept, 11-20 from the resume
    assert len(losses) == STEPS
    assert losses == step_losses(finished)


@pytest.mark.parametrize("arch", ARCHS)
def test_tensor_parallel_checkpoint_reads_as_the_single_rank_runs_plain_weights(arch, runs):
    from pretrain.run_weights import lm_state_dict
    from run_tools.run_config import load_checked_model

    _, config, _ = load_checked_model(runs[arch, "tp2"])
    merged, _ = lm_state_dict(runs[arch, "tp2"], config.model)
    plain, _ = lm_state_dict(runs[arch, "single"], config.model)
    assert merged.keys() == plain.keys()
    for name in plain:  # atol: gpt2's key bias gets no gradient in exact arithmetic, only ~1e-6 of rounding
        assert torch.allclose(merged[name], plain[name], rtol=1e-4, atol=1e-5), name


def test_export_hf_of_a_tensor_parallel_run_gives_lmforges_logits(runs, tmp_path):
    from transformers import AutoModelForCausalLM

    from run_tools import export_hf
    from run_tools.run_config import load_checked_model

    run_dir = runs["llama", "tp2"]
    export_hf.export(run_dir, tmp_path / "hf")
    model, config, _ = load_checked_model(run_dir)
    ids = torch.arange(24).reshape(2, 12) % config.model.vocab_size
    with torch.no_grad():
        ours = model(ids)
        theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()(ids).logits
    assert torch.allclose(theirs[..., : config.model.vocab_size], ours, atol=1e-4, rtol=0)


def test_a_resume_with_another_tensor_degree_is_refused(runs, tmp_path, shards):
    resumed = tmp_path / "other-degree"
    shutil.copytree(runs["llama", "tp2"], resumed)
    command = training_command(1) + ["--config", "tiny"] + tiny_overrides(resumed, shards, **_sets("llama", **{"train.max_steps": 30}))
    result = subprocess.run(command, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert "written with parallel.tensor = 2, the config says 1; resume with the tensor degree it was saved with" in result.stderr


def test_a_tensor_parallel_resume_on_another_number_of_data_replicas_is_refused(runs, tmp_path, shards):
    resumed = tmp_path / "more-replicas"
    shutil.copytree(runs["llama", "tp2"], resumed)
    sets = _sets("llama", **{"parallel.tensor": 2, "train.max_steps": 30, "train.micro_batch_size": 1})
    command = training_command(4) + ["--config", "tiny"] + tiny_overrides(resumed, shards, **sets)
    result = subprocess.run(command, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert "a tensor-parallel checkpoint of 1 data-parallel replicas cannot be resumed on 2" in result.stdout + result.stderr
