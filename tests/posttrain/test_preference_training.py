"""Real reward-model and DPO runs (DeepSpeed, CPU) on a separable synthetic preference set."""
import pytest

from tests.posttrain.runs import run_ok, tiny_model_sets, write_jsonl
from tests.posttrain.synthetic import separable_pairs

pytestmark = pytest.mark.slow


@pytest.fixture
def pair_files(tmp_path):
    return (write_jsonl(tmp_path / "train.jsonl", separable_pairs(256, seed=0)),
            write_jsonl(tmp_path / "valid.jsonl", separable_pairs(64, seed=1)))


def test_reward_model_exceeds_90_percent_held_out_accuracy(tiny_corpus_shards, pair_files, tmp_path):
    train, valid = pair_files
    sets = {**tiny_model_sets(tiny_corpus_shards.tokenizer_dir, tmp_path / "reward"),
            "data.train": train, "data.valid": valid, "train.max_steps": 30, "train.lr": 3e-3, "train.min_lr": 3e-4,
            "train.eval_interval": 15}
    records = run_ok("reward", sets)
    evals = [r for r in records if "val_accuracy" in r]
    assert [r["step"] for r in evals] == [15, 30]
    assert evals[-1]["val_accuracy"] > 0.9
    assert evals[-1]["val_margin"] > 1.0
    assert evals[-1]["val_loss"] < 0.3


def test_dpo_raises_the_chosen_over_rejected_margin(tiny_corpus_shards, pair_files, tmp_path):
    train, valid = pair_files
    sets = {**tiny_model_sets(tiny_corpus_shards.tokenizer_dir, tmp_path / "dpo"),
            "data.train": train, "data.valid": valid, "train.max_steps": 20, "train.lr": 3e-3, "train.min_lr": 3e-4,
            "dpo.beta": 0.1}
    records = run_ok("dpo", sets)
    steps = [r for r in records if "margin" in r]
    # The policy starts as the reference, so the implicit-reward margin starts at 0.
    assert abs(steps[0]["margin"]) < 0.05
    assert steps[-1]["margin"] > steps[0]["margin"] + 1.0
    final = records[-1]
    assert final["val_margin"] > 1.0 and final["val_accuracy"] > 0.9
    assert final["val_chosen_reward"] > 0 > final["val_rejected_reward"]
