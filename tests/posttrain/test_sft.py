"""SFT end to end: from a pretrained run, on 2 ranks with ZeRO-3 and packing; the run feeds the next stage."""

import pytest
import torch
import yaml

from posttrain.job import load_weights, run_model_config
from pretrain.checkpoint import consolidated_state_dict
from pretrain.model import Transformer
from tests.posttrain.runs import run_ok, tiny_model_sets, write_jsonl
from tests.pretrain.training_runs import run_training


def sft_examples(count, seed):
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(count):
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        out.append({"prompt": f"# {a} plus {b}\n", "response": f"x = {a + b}\n"})
    out.append({"messages": [{"role": "user", "content": "name?"}, {"role": "assistant", "content": "lmforge"}]})
    return out


@pytest.mark.slow
def test_sft_from_a_pretrained_run_on_zero3_with_packing(tiny_corpus_shards, tmp_path):
    pretrained = tmp_path / "pretrained"
    run_training(pretrained, tiny_corpus_shards.shard_dir, nproc=1, **{"train.max_steps": 4, "train.save_interval": 4})
    train = write_jsonl(tmp_path / "train.jsonl", sft_examples(120, seed=0))
    valid = write_jsonl(tmp_path / "valid.jsonl", sft_examples(24, seed=1))
    sets = {**tiny_model_sets(tiny_corpus_shards.tokenizer_dir, tmp_path / "sft"),
            "init.from_run": pretrained, "init.tokenizer": "null", "data.train": train, "data.valid": valid,
            "data.packing": "true", "train.seq_len": 32, "data.max_prompt_len": 16, "train.micro_batch_size": 4,
            "train.max_steps": 20, "train.lr": 1e-2, "train.min_lr": 1e-3, "train.eval_interval": 5,
            "deepspeed.config": "ds_configs/zero3.json"}
    for key in [k for k in sets if k.startswith("model.")]:
        del sets[key]  # the model section comes from the pretrained run
    records = run_ok("sft", sets, nproc=2)
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(val) == 4 and val[-1] < val[0] - 1.5 and val == sorted(val, reverse=True), val
    run_dir = tmp_path / "sft"
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"] == yaml.safe_load((pretrained / "config.yaml").read_text())["model"] | {"vocab_size": 512}
    assert saved["init"]["tag"] == "step_00000004"
    assert (run_dir / "tokenizer.model").read_bytes() == (tiny_corpus_shards.shard_dir / "tokenizer.model").read_bytes()
    # The SFT run is a plain LM run: the next stage (DPO, PPO, export) loads it like a pretrained one.
    model = Transformer(run_model_config(run_dir))
    state, tag = consolidated_state_dict(run_dir)
    load_weights(model, state, tag)
    assert tag == "step_00000020" and torch.isfinite(model(torch.tensor([[3, 10, 11]]))).all()
