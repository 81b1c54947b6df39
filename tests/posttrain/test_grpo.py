"""GRPO: the advantage and loss against hand-computed values; real runs (DeepSpeed, CPU) that raise a
programmatic reward, checkpoint, resume exactly, export to transformers; bad reward functions refused."""
import json
import math
import subprocess
import sys

import pytest
import torch

from lmforge.errors import run_cli
from posttrain.losses import group_advantages, grpo_loss, k3_kl
from tests.posttrain.runs import read_metrics, run_ok, run_verb, tiny_model_sets, write_jsonl
from tests.posttrain.synthetic import prompts


def test_group_advantages_are_rewards_minus_the_group_mean_over_its_std():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])  # two groups of four
    std = math.sqrt((0.75**2 + 3 * 0.25**2) / 3)  # unbiased std of [1, 0, 0, 0]
    expected = [0.75 / (std + 1e-4)] + [-0.25 / (std + 1e-4)] * 3 + [0.0] * 4  # a group of equal rewards teaches nothing
    assert group_advantages(rewards, 4).tolist() == pytest.approx(expected, abs=1e-6)
    assert group_advantages(rewards, 4, scale=False).tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0])


def test_k3_kl_is_exp_r_minus_r_minus_one():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -2.0])
    assert k3_kl(logp, ref).tolist() == pytest.approx([math.exp(-0.5) + 0.5 - 1, 0.0])


def test_grpo_loss_averages_clipped_tokens_per_response_then_over_responses():
    # Response 0 has 2 tokens, response 1 has 1 (its second position is padding and must not count).
    logp = torch.tensor([[math.log(0.5), math.log(0.2)], [math.log(0.9), 0.0]])
    old = torch.tensor([[math.log(0.25), math.log(0.2)], [math.log(0.3), -5.0]])
    ref = torch.tensor([[math.log(0.5), math.log(0.1)], [math.log(0.9), 0.0]])
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[True, True], [True, False]])
    loss, stats = grpo_loss(logp, old, ref, adv, mask, clip=0.2, kl_coef=0.1)
    # ratios: 2.0 (A>0: clipped to 1.2), 1.0; 3.0 (A<0: min(3·-2, 1.2·-2) = -6, unclipped)
    kl = [0.0, 0.5 + math.log(2.0) - 1, 0.0]  # k3 with r = log(ref/π): 0, log(1/2), 0
    row0 = ((-1.2 + 0.1 * kl[0]) + (-1.0 + 0.1 * kl[1])) / 2
    row1 = 6.0 + 0.1 * kl[2]
    assert loss.item() == pytest.approx((row0 + row1) / 2, abs=1e-6)
    assert stats["kl"].item() == pytest.approx((kl[1] / 2 + 0) / 2, abs=1e-6)
    assert stats["clip_fraction"].item() == pytest.approx(2 / 3)


def grpo_sets(tokenizer_dir, run_dir, prompt_file, **extra):
    return {**tiny_model_sets(tokenizer_dir, run_dir),
            "data.train": prompt_file, "data.max_prompt_len": 16,
            "grpo.reward_function": "digit_fraction", "grpo.reward_run": "null",
            "grpo.max_new_tokens": 12, "grpo.prompts_per_rank": 4, "grpo.group_size": 8, "grpo.epochs": 2,
            "grpo.kl_coef": 0.04, "train.lr": 1e-2, "train.min_lr": 1e-2, "train.warmup_steps": 1,
            "train.max_steps": 16, **extra}


def bad_reward(prompts):
    return [0.0 for _ in prompts]


def test_a_reward_function_with_the_wrong_signature_is_refused_before_anything_is_created(tiny_corpus_shards, tmp_path):
    prompt_file = write_jsonl(tmp_path / "prompts.jsonl", prompts(8, seed=0))
    sets = grpo_sets(tiny_corpus_shards.tokenizer_dir, tmp_path / "grpo", prompt_file,
                     **{"grpo.reward_function": "tests.posttrain.test_grpo:bad_reward"})
    result = run_verb("grpo", sets)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: grpo.reward_function = 'tests.posttrain.test_grpo:bad_reward': cannot be called as bad_reward(prompts, responses)")
    assert not (tmp_path / "grpo").exists()


@pytest.mark.slow
def test_grpo_raises_a_programmatic_reward_resumes_exactly_and_exports(tiny_corpus_shards, tmp_path):
    from run_tools import export_hf
    from tests.run_tools.test_export_hf import clean_env

    prompt_file = write_jsonl(tmp_path / "prompts.jsonl", prompts(64, seed=0))
    tokenizer = tiny_corpus_shards.tokenizer_dir
    straight = run_ok("grpo", grpo_sets(tokenizer, tmp_path / "straight", prompt_file))
    rewards = [r["reward"] for r in straight]
    assert [r["step"] for r in straight] == list(range(1, 17))
    assert sum(rewards[-3:]) / 3 > 2 * sum(rewards[:3]) / 3 + 0.02, rewards
    kls = [r["kl"] for r in straight]  # the first rollout comes from the reference; the policy moves away, held by β
    assert kls[0] < 0.05 < kls[-1] < 5.0, kls
    assert all(0 <= r["clip_fraction"] <= 1 and 0 < r["response_length"] <= 12 for r in straight)
    # Stopped after 12 iterations and rerun to 16: the same iterations 13..16 as the straight run.
    resumed_dir = tmp_path / "resumed"
    run_ok("grpo", grpo_sets(tokenizer, resumed_dir, prompt_file, **{"train.max_steps": 12, "train.save_interval": 6}))
    sets = grpo_sets(tokenizer, resumed_dir, prompt_file, **{"train.save_interval": 6})
    resumed = run_verb("grpo", sets)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "step_00000012" in resumed.stdout
    records = read_metrics(resumed_dir)
    assert [r["step"] for r in records] == list(range(1, 17))
    for ours, theirs in zip(records[12:], straight[12:]):
        assert ours["reward"] == pytest.approx(theirs["reward"], abs=1e-6)
        assert ours["loss"] == pytest.approx(theirs["loss"], abs=1e-5)
    # export-hf of the GRPO run loads in transformers with our logits.
    out = tmp_path / "hf"
    assert run_cli(export_hf.main, ["--checkpoint", str(resumed_dir), "--output", str(out)]) == 0
    from run_tools.run_config import load_checked_model

    model, config, _ = load_checked_model(resumed_dir)
    ids = [[3, 10, 11, 12, 13, 14, 15, 16]]
    with torch.no_grad():
        ours = model(torch.tensor(ids))
    script = ("import sys, json, torch, transformers; m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1]);"
              "print(json.dumps(m(torch.tensor(json.loads(sys.argv[2]))).logits.tolist()))")
    result = subprocess.run([sys.executable, "-c", script, str(out), json.dumps(ids)], cwd=tmp_path, env=clean_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    hf = torch.tensor(json.loads(result.stdout))
    assert torch.allclose(hf[..., : config.model.vocab_size], ours, atol=1e-4)


@pytest.mark.slow
def test_grpo_on_two_ranks_with_zero2(tiny_corpus_shards, tmp_path):
    prompt_file = write_jsonl(tmp_path / "prompts.jsonl", prompts(64, seed=0))
    sets = grpo_sets(tiny_corpus_shards.tokenizer_dir, tmp_path / "grpo", prompt_file,
                     **{"deepspeed.config": "ds_configs/zero2.json", "grpo.prompts_per_rank": 2, "train.max_steps": 4})
    records = run_ok("grpo", sets, nproc=2)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["reward"] == r["reward"] and 0 < r["response_length"] <= 12 for r in records)
    assert (tmp_path / "grpo" / "checkpoints" / "step_00000004" / "COMPLETE").is_file()
