"""Elastic resume: a checkpoint written on 2 data-parallel ranks continues on 1 and on 4 (through
DeepSpeed's universal checkpoint) with the same global sample order, and for the same global batch
the fp32 loss curve does not depend on the number of ranks."""
from __future__ import annotations

import shutil
import subprocess

import pytest
import torch

from pretrain import checkpoint
from pretrain.config import load_pretrain_config
from pretrain.rank_batches import TrainingData
from tests.pretrain.training_runs import REPO, run_env, step_losses, tiny_overrides, training_command

GLOBAL_BATCH = 4
TOLERANCE = 1e-5  # relative: only the summation order differs with the number of ranks (measured: <= 5e-6)


def train(run_dir, shards, nproc: int, **sets) -> str:
    sets = {"train.max_steps": 8, "train.micro_batch_size": GLOBAL_BATCH // nproc, "train.save_interval": 4,
            "train.keep_last": 2, **sets}
    cmd = training_command(nproc) + ["--config", "tiny"] + tiny_overrides(run_dir, shards, **sets)
    result = subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def rewind_to(source, target, step: int):
    """A copy of run `source` as if it had died right after saving `step`."""
    shutil.copytree(source, target)
    for tag in checkpoint.complete_tags(target):
        if checkpoint.step_of_tag(tag) > step:
            shutil.rmtree(target / "checkpoints" / tag)
    (target / "checkpoints" / "latest").write_text(checkpoint.tag_for_step(step))
    return target


def test_the_global_sample_order_is_the_same_on_1_2_and_4_ranks(shards):
    config = load_pretrain_config("tiny", [f"data.path=[{shards}]", "train.seq_len=32"])
    batches = {}
    for ranks in (1, 2, 4):
        train_config = type(config.train)(**{**config.train.__dict__, "micro_batch_size": GLOBAL_BATCH // ranks})
        parts = [TrainingData(config.data, 32, 1234, rank, ranks).train_batch(5, 0, train_config) for rank in range(ranks)]
        batches[ranks] = torch.cat(parts)
    assert torch.equal(batches[1], batches[2]) and torch.equal(batches[1], batches[4])


@pytest.mark.slow
def test_zero1_checkpoint_of_2_ranks_resumes_on_1_and_4_with_the_same_losses(shards, tmp_path):
    two = tmp_path / "two"
    train(two, shards, 2)
    reference = step_losses(two)
    assert len(reference) == 8 and reference[-1] < reference[0]

    one_fresh = tmp_path / "one-fresh"
    train(one_fresh, shards, 1)
    assert step_losses(one_fresh) == pytest.approx(reference, rel=TOLERANCE)  # the curve does not depend on ranks

    for ranks in (1, 4):
        run = rewind_to(two, tmp_path / f"on{ranks}", 4)
        out = train(run, shards, ranks)
        assert (f"resumed from {run / 'checkpoints' / 'step_00000004'} at step 4 (saved on 2 data-parallel ranks, "
                f"loaded through {run / 'checkpoints' / 'step_00000004' / 'universal'})") in out
        losses = step_losses(run)
        assert losses[:4] == reference[:4]  # kept from the 2-rank run
        assert losses[4:] == pytest.approx(reference[4:], rel=TOLERANCE)
        record = checkpoint.read_record(run / "checkpoints" / "step_00000008")
        assert (record["data_parallel_size"], record["world_size"], record["global_batch"]) == (ranks, ranks, GLOBAL_BATCH)


@pytest.mark.slow
def test_zero3_checkpoint_of_2_ranks_resumes_on_1(shards, tmp_path):
    ds_json = {"deepspeed.config": "ds_configs/zero3.json"}
    two = tmp_path / "two"
    train(two, shards, 2, **ds_json)
    run = rewind_to(two, tmp_path / "one", 4)
    out = train(run, shards, 1, **ds_json)
    assert f"resumed from {run / 'checkpoints' / 'step_00000004'} at step 4" in out
    assert (run / "checkpoints" / "step_00000004" / "universal" / "step_00000004" / "zero").is_dir()
    assert step_losses(run) == pytest.approx(step_losses(two), rel=TOLERANCE)
    # Each optimizer group kept its own hyperparameters (DeepSpeed's ZeRO-3 universal loader gives every group the
    # first one's: norms, biases and embeddings were decayed after the resume, too little to show in 4 losses).
    saved = torch.load(run / "checkpoints" / "step_00000008" / "zero_pp_rank_0_mp_rank_00_optim_states.pt", weights_only=False)
    groups = saved["optimizer_state_dict"]["optimizer_state_dict"]["param_groups"]
    decay = load_pretrain_config("tiny").train.weight_decay
    assert decay > 0
    assert [(g["name"], g["weight_decay"]) for g in groups] == [("decay", decay), ("no_decay", 0.0)]
