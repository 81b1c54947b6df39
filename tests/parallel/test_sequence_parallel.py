"""DeepSpeed-Ulysses sequence parallelism (parallel/sequence.py) in real torchrun runs on gloo, fp32:
a sequence split over 2 ranks, alone and times 2 data-parallel replicas, trains exactly as one rank
does; a preempted SP run resumes exactly; its checkpoint exports as a plain model's."""
from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from pretrain import checkpoint
from pretrain.run_weights import run_state_dict
from tests.pretrain.test_resume_interrupted import deterministic_metrics, logged_steps, wait_for, worker_pids
from tests.pretrain.training_runs import run_training, start_training

slow = pytest.mark.slow

STEPS = 20
LLAMA = {"model.arch": "llama", "model.n_kv_heads": 2}  # 4 query heads, 2 kv heads: one kv group per SP rank
GPT2 = {"model.arch": "gpt2", "model.n_kv_heads": "null"}


def _val_loss(run_dir) -> float:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [line["val_loss"] for line in lines if "val_loss" in line][-1]


def _same_global_batch(ranks_per_sequence_group: int, data_ranks: int) -> dict:
    """micro 2 × accumulation × data ranks = 4 sequences per step in every layout."""
    return {"train.max_steps": STEPS, "train.micro_batch_size": 2, "train.grad_accum_steps": 2 // data_ranks,
            "parallel.sequence": ranks_per_sequence_group}


@slow
def test_ulysses_sp2_and_sp2_times_dp2_give_the_single_rank_llama_losses_and_weights(shards, tmp_path):
    single = run_training(tmp_path / "single", shards, nproc=1, **LLAMA, **_same_global_batch(1, 1))
    sp2 = run_training(tmp_path / "sp2", shards, nproc=2, **LLAMA, **_same_global_batch(2, 1))
    sp2_dp2 = run_training(tmp_path / "sp2dp2", shards, nproc=4, **LLAMA, **_same_global_batch(2, 2))
    assert len(single) == STEPS and single[-1] < single[0] - 0.3
    assert sp2 == pytest.approx(single, rel=1e-5)
    assert sp2_dp2 == pytest.approx(single, rel=1e-5)
    assert _val_loss(tmp_path / "sp2") == pytest.approx(_val_loss(tmp_path / "single"), rel=1e-5)  # the same eval batches
    # Weights are replicated over the sequence group: the SP run's checkpoint exports as a plain one.
    plain, _ = run_state_dict(tmp_path / "single")
    split, tag = run_state_dict(tmp_path / "sp2")
    assert tag == checkpoint.tag_for_step(STEPS)
    assert sorted(split) == sorted(plain)
    for name, weight in plain.items():
        torch.testing.assert_close(split[name], weight, rtol=1e-4, atol=1e-5, msg=name)


@slow
def test_ulysses_sp2_gives_the_single_rank_gpt2_losses(shards, tmp_path):
    """GPT-2's learned position table is read at each slice's global offsets."""
    single = run_training(tmp_path / "single", shards, nproc=1, **GPT2, **_same_global_batch(1, 1))
    sp2 = run_training(tmp_path / "sp2", shards, nproc=2, **GPT2, **_same_global_batch(2, 1))
    assert len(single) == STEPS and single[-1] < single[0] - 0.3
    assert sp2 == pytest.approx(single, rel=1e-5)


@slow
def test_a_preempted_sp2_run_resumes_to_the_uninterrupted_runs_metrics(shards, tmp_path):
    settings = {**LLAMA, **_same_global_batch(2, 1), "train.max_steps": 10, "train.save_interval": 3}
    run_training(tmp_path / "reference", shards, nproc=2, **settings)
    expected = deterministic_metrics(tmp_path / "reference")

    run_dir = tmp_path / "run"
    proc = start_training(run_dir, shards, 2, {"LMFORGE_FAULT_STEP_DELAY": "0.3"}, **settings)
    wait_for(lambda: any(s >= 4 for s in logged_steps(run_dir)), proc, "step 4")
    os.kill(worker_pids(proc.pid)[1], signal.SIGUSR1)  # one rank of the sequence group: both stop at one step
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]
    step = int([line for line in out.splitlines() if line.startswith("preempted by")][0].rsplit("at step ", 1)[1].split(";")[0])
    assert 4 <= step < 10

    run_training(run_dir, shards, nproc=2, **settings)
    assert deterministic_metrics(run_dir) == expected


@pytest.mark.parametrize("stage, stages, expected", [
    (2, 1, []),
    (3, 1, ["parallel.sequence = 2: needs ZeRO stage 0, 1 or 2, but ds.json has zero_optimization.stage = 3; "
            "use ds_configs/zero2.json or set parallel.sequence = 1"]),
    (1, 2, ["parallel.sequence = 2: cannot be combined with parallel.pipeline_stages = 2 yet; set one of them to 1"]),
])
def test_sequence_parallelism_refuses_zero3_and_pipelines_by_name(stage, stages, expected):
    from parallel.config import ParallelConfig
    from parallel.sequence import sequence_parallel_problems

    assert sequence_parallel_problems(ParallelConfig(sequence=2, pipeline_stages=stages), stage, "ds.json") == expected
    assert sequence_parallel_problems(ParallelConfig(sequence=1, pipeline_stages=stages), 3, "ds.json") == []
