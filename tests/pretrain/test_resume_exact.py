"""A run killed with SIGKILL after a checkpoint and restarted with the same command reproduces the
uninterrupted run's per-step fp32 losses exactly (ZeRO-0 on one rank, ZeRO-3 on two)."""
import pytest

from tests.pretrain.training_runs import kill_group, run_training, start_training, step_losses, wait_for_checkpoint

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("stage,nproc", [(0, 1), (3, 2)])
def test_resume_after_sigkill_reproduces_the_uninterrupted_losses(stage, nproc, shards, tmp_path):
    sets = {"deepspeed.config": f"ds_configs/zero{stage}.json", "train.max_steps": 10, "train.save_interval": 4}
    reference = run_training(tmp_path / "whole", shards, nproc=nproc, **sets)
    run_dir = tmp_path / "killed"
    proc = start_training(run_dir, shards, nproc=nproc, extra_env={"LMFORGE_FAULT_STEP_DELAY": "0.5"}, **sets)
    wait_for_checkpoint(run_dir, "step_00000004", proc)
    kill_group(proc)
    assert proc.returncode != 0
    before = step_losses(run_dir)
    assert 4 <= len(before) < 10  # killed mid-run, past the checkpoint
    resumed = run_training(run_dir, shards, nproc=nproc, **sets)
    assert len(resumed) == 10
    assert resumed == reference  # bit-identical fp32 losses, steps 1-10
