"""Post-training runs read like pretraining runs: export-hf (SFT, DPO, PPO's actor), generate and eval; a reward model is refused."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep.packed_dataset import PackedDataset
from lmforge.errors import run_cli
from posttrain.job import starting_state
from pretrain import checkpoint
from run_tools import evaluate, export_hf, generate
from run_tools.run_config import load_checked_model
from tests.posttrain.runs import run_ok, tiny_model_sets, write_jsonl
from tests.posttrain.synthetic import prompts, separable_pairs
from tests.posttrain.test_sft import sft_examples
from tests.run_tools.test_evaluate import direct_loss, run_eval
from tests.run_tools.test_export_hf import HF_SIDE, HOSTILE_TEXTS, clean_env, greedy

pytestmark = pytest.mark.slow
NEW_TOKENS = 12


def from_run(sets: dict, run_dir: Path) -> dict:
    """`sets` starting from `run_dir`'s weights: its model section and tokenizer, not the fixture's."""
    return {**{k: v for k, v in sets.items() if not k.startswith("model.")}, "init.from_run": run_dir, "init.tokenizer": "null"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_corpus_shards) -> dict[str, Path]:
    """A tiny SFT run from scratch, then from it a PPO run (programmatic reward, critic from the policy), a DPO
    run and a reward model."""
    root = tmp_path_factory.mktemp("export_posttrain")
    base = {**tiny_model_sets(tiny_corpus_shards.tokenizer_dir, root / "unused"), "train.micro_batch_size": 4,
            "train.lr": 1e-2, "train.min_lr": 1e-3, "train.warmup_steps": 1, "data.valid_fraction": 0}
    sft = root / "sft"
    run_ok("sft", {**base, "run.dir": sft, "data.train": write_jsonl(root / "sft.jsonl", sft_examples(64, seed=0)),
                   "train.max_steps": 6})
    ppo = root / "ppo"
    run_ok("ppo", {**from_run(base, sft), "run.dir": ppo, "data.train": write_jsonl(root / "prompts.jsonl", prompts(16, 0)),
                   "data.max_prompt_len": 16, "ppo.reward_run": "null", "ppo.reward_function": "digit_fraction",
                   "ppo.max_new_tokens": 8, "ppo.rollout_batch_size": 8, "ppo.epochs": 1, "train.max_steps": 2})
    pairs = write_jsonl(root / "pairs.jsonl", separable_pairs(16, seed=0))
    dpo = root / "dpo"
    run_ok("dpo", {**from_run(base, sft), "run.dir": dpo, "data.train": pairs, "train.max_steps": 2})
    reward = root / "reward"
    bf16 = root / "bf16_zero0.json"  # DeepSpeed's bf16 mode: a 16-bit module beside fp32 masters under other names (lm.*)
    bf16.write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": {"stage": 0}}))
    run_ok("reward", {**from_run(base, sft), "run.dir": reward, "data.train": pairs, "train.max_steps": 1,
                      "deepspeed.config": bf16})
    return {"sft": sft, "dpo": dpo, "ppo": ppo, "reward": reward, "root": root}


@pytest.fixture(scope="module")
def exported(runs, tiny_corpus_shards):
    """`lmforge export-hf` of the SFT, DPO and PPO runs, read back by transformers alone in a clean subprocess."""
    root = runs["root"]
    windows = PackedDataset(tiny_corpus_shards.shard_dir, "valid", 32, seed=0)
    ids = np.stack([windows.window(0)[:32], windows.window(1)[:32]]).tolist()
    jobs = {}
    for name in ("sft", "dpo", "ppo"):
        out = root / f"{name}-hf"
        assert run_cli(export_hf.main, ["--checkpoint", str(runs[name]), "--output", str(out)]) == 0
        jobs[name] = {"dir": str(out), "ids": ids, "prompt": ids[0][:8], "new_tokens": NEW_TOKENS}
    (root / "request.json").write_text(json.dumps({"models": jobs, "texts": HOSTILE_TEXTS}))
    (root / "hf_side.py").write_text(HF_SIDE)
    (root / "cwd").mkdir()
    result = subprocess.run([sys.executable, str(root / "hf_side.py"), str(root / "request.json"), str(root / "hf.pt")],
                            cwd=root / "cwd", env=clean_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return {"hf": torch.load(root / "hf.pt", weights_only=False), "ids": ids, "jobs": jobs}


@pytest.mark.parametrize("name", ["sft", "dpo", "ppo"])
def test_exported_posttrain_run_gives_lmforge_logits_greedy_tokens_and_ids_in_transformers(runs, exported, name):
    from data_prep.tokenizer import Tokenizer

    model, config, _ = load_checked_model(runs[name])
    with torch.no_grad():
        ours = model(torch.tensor(exported["ids"]))
    hf = exported["hf"][name]
    vocab = config.model.vocab_size
    assert hf["class"] == "LlamaForCausalLM" and hf["logits"].shape == (2, 32, config.model.padded_vocab_size)
    assert torch.allclose(hf["logits"][..., :vocab], ours, atol=1e-4, rtol=0)
    tokenizer = Tokenizer.load(runs[name] / "tokenizer.model")  # the post-training run's own copy
    ours_greedy = greedy(model, exported["jobs"][name]["prompt"], NEW_TOKENS)
    if tokenizer.eod_id in ours_greedy:  # transformers stops at its eos_token_id (our EOD); an SFT model ends answers there
        ours_greedy = ours_greedy[: ours_greedy.index(tokenizer.eod_id) + 1]
    assert hf["generated"] == ours_greedy
    assert hf["encoded"] == [tokenizer.encode(text) for text in HOSTILE_TEXTS]
    assert (Path(exported["jobs"][name]["dir"]) / "tokenizer.model").read_bytes() == tokenizer.model_bytes()


def zero0_module(run_dir):
    """The module of a ZeRO-0 checkpoint as DeepSpeed saved it (the critic has no config.yaml of its own)."""
    tag = checkpoint.latest_tag(run_dir)
    states = torch.load(checkpoint.checkpoints_dir(run_dir) / tag / "mp_rank_00_model_states.pt", weights_only=True)
    return states["module"], tag


def test_ppo_export_is_the_actor_not_the_critic_or_the_starting_policy(runs):
    from safetensors.torch import load_file

    exported = load_file(runs["root"] / "ppo-hf" / "model.safetensors")["model.embed_tokens.weight"]
    actor, tag = starting_state(runs["ppo"], None)
    critic, critic_tag = zero0_module(runs["ppo"] / "critic")
    start, _ = starting_state(runs["sft"], None)
    assert tag == critic_tag == "step_00000002"
    assert torch.equal(exported, actor["embed.weight"])
    assert not torch.allclose(exported, critic["lm.embed.weight"]) and not torch.allclose(exported, start["embed.weight"])


def test_generate_samples_text_from_an_sft_run(runs, capsys):
    prompt = "# 2 plus 3\n"
    argv = ["--checkpoint", str(runs["sft"]), "--prompt", prompt, "--max-new-tokens", str(NEW_TOKENS), "--temperature", "0"]
    assert run_cli(generate.main, argv) == 0
    out = capsys.readouterr().out
    header, text = out.split("\n", 1)
    assert header == "--- sample (step_00000006) ---"
    model, _, _ = load_checked_model(runs["sft"])
    from data_prep.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(runs["sft"] / "tokenizer.model")
    new = greedy(model, [tokenizer.eod_id] + tokenizer.encode(prompt), NEW_TOKENS)
    new = new[: new.index(tokenizer.eod_id)] if tokenizer.eod_id in new else new
    assert new and text == prompt + tokenizer.decode(new) + "\n"


def test_eval_of_an_sft_run_on_shards_of_its_tokenizer(runs, tiny_corpus_shards, capsys):
    shard_dir = tiny_corpus_shards.shard_dir
    _, result = run_eval(runs["sft"], 1, "--data", str(shard_dir), "--seq-len", "32", "--batch-size", "4", "--batches", "2")
    loss, tokens = direct_loss(runs["sft"], shard_dir, max_windows=8)
    assert result["tokens"] == tokens == 8 * 32 and result["loss"] == pytest.approx(loss, rel=1e-6)
    assert run_cli(evaluate.main, ["--checkpoint", str(runs["sft"])]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "pass --data SHARD_DIR" in err


def test_reward_run_is_refused_by_export_and_generate_in_one_line(runs, capsys):
    out = runs["root"] / "reward-hf"
    for entry, argv in ((export_hf.main, ["--output", str(out)]), (generate.main, [])):
        assert run_cli(entry, ["--checkpoint", str(runs["reward"]), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {runs['reward']}: a reward model") and "\n" not in err, err
        assert "not a causal language model" in err
    assert not out.exists() and not list(out.parent.glob(".reward-hf.partial*"))
    assert run_cli(export_hf.main, ["--checkpoint", str(runs["ppo"] / "critic"), "--output", str(out)]) == 2
    assert f"inside the run directory {runs['ppo']}: pass that" in capsys.readouterr().err
