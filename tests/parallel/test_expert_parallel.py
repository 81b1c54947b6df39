"""Expert parallelism (parallel/experts.py): real 2-rank torchrun runs on gloo, tiny MoE, fp32."""
import json
import shutil

import pytest
import torch

from tests.pretrain.training_runs import run_training

pytestmark = pytest.mark.slow

MOE = {"model.n_experts": 4, "model.experts_per_token": 2, "model.d_ff": 48, "train.max_steps": 20}


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def plain_and_expert_parallel_runs(tiny_corpus_shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("expert_parallel")
    shards = tiny_corpus_shards.shard_dir
    plain = run_training(root / "ep1", shards, nproc=2, **MOE)
    sharded = run_training(root / "ep2", shards, nproc=2, **MOE, **{"parallel.expert": 2, "train.save_interval": 10})
    return root, shards, plain, sharded


def test_expert_parallel_2_matches_plain_moe_losses_for_20_steps(plain_and_expert_parallel_runs):
    _, _, plain, sharded = plain_and_expert_parallel_runs
    assert len(plain) == 20 and plain[-1] < plain[0]
    assert sharded == pytest.approx(plain, rel=1e-5)


def test_router_load_balance_is_in_the_metrics(plain_and_expert_parallel_runs):
    root, _, _, _ = plain_and_expert_parallel_runs
    for run in ("ep1", "ep2"):
        last = [record for record in _metrics(root / run) if "loss" in record][-1]
        assert 1.9 < last["router_aux_loss"] < 4.0  # experts_per_token (2) when balanced, at most n_experts
        assert 1.0 <= last["expert_load_max_over_mean"] <= 4.0
        assert last["expert_load_max_over_mean"] == max(last["expert_load_max_over_mean_layer0"],
                                                        last["expert_load_max_over_mean_layer1"])


def test_expert_degree_problems_name_the_key_value_and_what_fits():
    from parallel.experts import expert_parallel_problems

    assert expert_parallel_problems(2, 4, 2, 1, 1) == []
    assert expert_parallel_problems(1, 0, 1, 3, 1) == []
    text = "\n".join(expert_parallel_problems(3, 4, 2, 3, 2))
    assert "must divide model.n_experts = 4" in text and "2 data-parallel ranks" in text
    assert "ZeRO-3" in text and "pipeline_stages = 2" in text
    assert "has no experts" in expert_parallel_problems(2, 0, 2, 1, 1)[0]
    assert "not supported with pipelines" in expert_parallel_problems(1, 4, 2, 1, 2)[0]


def test_expert_parallel_run_resumes_exactly(plain_and_expert_parallel_runs):
    root, shards, _, sharded = plain_and_expert_parallel_runs
    resumed = root / "ep2_resumed"
    shutil.copytree(root / "ep2", resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000020")  # back to the step-10 checkpoint
    (resumed / "checkpoints" / "latest").write_text("step_00000010")
    losses = run_training(resumed, shards, nproc=2, **MOE, **{"parallel.expert": 2, "train.save_interval": 10})
    assert len(losses) == 20
    assert losses[10:] == sharded[10:]
    record = json.loads((resumed / "checkpoints" / "step_00000020" / "COMPLETE").read_text())
    assert record["expert_parallel"] == 2


def test_resuming_an_expert_parallel_checkpoint_with_another_degree_is_refused(plain_and_expert_parallel_runs):
    from lmforge.errors import LmforgeError
    from pretrain import resume
    from pretrain.config import load_pretrain_config

    root, _, _, _ = plain_and_expert_parallel_runs
    config = load_pretrain_config(str(root / "ep2" / "config.yaml"), ["parallel.expert=1"])  # the run's own, but EP=1
    with pytest.raises(LmforgeError, match="written with parallel.expert = 2, the config says 1"):
        resume.plan(config, 2, 1)


def test_expert_parallel_checkpoint_reads_as_the_plain_model_trained_without_it(plain_and_expert_parallel_runs):
    from pretrain.run_dir import run_model_config
    from pretrain.run_weights import lm_state_dict

    root, _, _, _ = plain_and_expert_parallel_runs
    model = run_model_config(root / "ep1")
    plain, _ = lm_state_dict(root / "ep1", model)
    converted, tag = lm_state_dict(root / "ep2", model)  # checked against the plain Transformer's names and shapes
    assert tag == "step_00000020" and converted.keys() == plain.keys()
    assert "blocks.1.mlp.experts.3.down_proj.weight" in converted
    for name in plain:
        torch.testing.assert_close(converted[name], plain[name], rtol=1e-4, atol=1e-5, msg=name)
