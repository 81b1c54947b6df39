"""LoRA through PEFT: adapters on lmforge's Transformer, merged weights equal to the adapted model; a real
LoRA SFT run trains only the adapters and exports merged weights that transformers reads."""
import json
import subprocess
import sys

import pytest
import torch

from posttrain.config import LoraConfig
from posttrain.lora import add_lora
from pretrain.lora_weights import merge_lora
from pretrain.model import ModelConfig, Transformer
from tests.posttrain.runs import read_metrics, run_verb, tiny_model_sets, write_jsonl


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_merged_lora_weights_give_the_adapted_models_logits(arch):
    torch.manual_seed(0)
    config = ModelConfig(arch=arch, vocab_size=100, n_layers=2, n_heads=4, d_model=32, max_seq_len=32)
    plain = Transformer(config)
    adapted = add_lora(Transformer(config), LoraConfig(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj", "down_proj")))
    for name, param in adapted.named_parameters():
        if ".lora_B." in name:
            torch.nn.init.normal_(param, std=0.5)  # PEFT starts B at zero: make the adapters matter
    trainable = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable) and len(trainable) == 2 * 3 * config.n_layers
    plain.load_state_dict(merge_lora(adapted.state_dict(), scale=8.0 / 4), strict=True)
    tokens = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        assert torch.allclose(plain.eval()(tokens), adapted.eval()(tokens), atol=1e-5)


@pytest.mark.slow
def test_lora_sft_on_two_zero3_ranks_trains_only_the_adapters_and_exports_merged_weights_and_a_peft_adapter(
        tiny_corpus_shards, tmp_path):
    from run_tools import export_hf
    from lmforge.errors import run_cli
    from posttrain.job import starting_state
    from run_tools.run_config import load_checked_model
    from tests.posttrain.test_sft import sft_examples
    from tests.run_tools.test_export_hf import clean_env
    from tests.run_tools.test_export_hf_adapter import peft_logits

    sets = {**tiny_model_sets(tiny_corpus_shards.tokenizer_dir, tmp_path / "sft"), "train.max_steps": 8,
            "data.train": write_jsonl(tmp_path / "sft.jsonl", sft_examples(64, seed=0)), "data.valid_fraction": 0,
            "train.lr": 1e-2, "train.min_lr": 1e-2, "train.warmup_steps": 1, "train.save_interval": 4,
            "train.micro_batch_size": 4, "deepspeed.config": "ds_configs/zero3.json",  # frozen weights partitioned too
            "lora.rank": 4, "lora.alpha": 8, "lora.target_modules": "[q_proj, v_proj, up_proj, down_proj]"}
    result = run_verb("sft", sets, nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    # per block: q 4·32 + 32·4, v 4·32 + 16·4, up 4·32 + 128·4, down 4·128 + 32·4 = 1,728; two blocks
    assert "sft: LoRA: 3,456 trainable of " in result.stdout and "gradient + Adam state 0.04 MiB" in result.stdout
    # Adam's two fp32 moments for the adapters only, split over the two ranks: 3,456 · 8 bytes in all
    assert "trainable_parameters=3456, optimizer_state_mib=0.02637" in result.stdout, result.stdout[-2000:]
    records = read_metrics(tmp_path / "sft")
    assert records[-1]["loss"] < records[0]["loss"] - 0.1, [r["loss"] for r in records]
    step4, _ = starting_state(tmp_path / "sft", "step_00000004")
    step8, _ = starting_state(tmp_path / "sft", "step_00000008")
    # The merged weights moved only where adapters are; the rest is the (frozen) random init.
    assert not torch.equal(step4["blocks.0.attn.q_proj.weight"], step8["blocks.0.attn.q_proj.weight"])
    for key in ("embed.weight", "blocks.0.attn.k_proj.weight", "blocks.1.mlp.gate_proj.weight", "final_norm.weight"):
        assert torch.equal(step4[key], step8[key]), key
    out = tmp_path / "hf"
    assert run_cli(export_hf.main, ["--checkpoint", str(tmp_path / "sft"), "--output", str(out)]) == 0
    model, config, _ = load_checked_model(tmp_path / "sft")
    ids = [[3, 10, 11, 12, 13, 14, 15, 16]]
    with torch.no_grad():
        ours = model(torch.tensor(ids))
    script = ("import sys, json, torch, transformers; m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1]);"
              "print(json.dumps(m(torch.tensor(json.loads(sys.argv[2]))).logits.tolist()))")
    result = subprocess.run([sys.executable, "-c", script, str(out), json.dumps(ids)], cwd=tmp_path, env=clean_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.allclose(torch.tensor(json.loads(result.stdout))[..., : config.model.vocab_size], ours, atol=1e-4)
    base = tmp_path / "hf-base"
    assert run_cli(export_hf.main, ["--checkpoint", str(tmp_path / "sft"), "--output", str(base), "--adapter"]) == 0
    theirs, kind = peft_logits(base, base / "adapter", ids, tmp_path, clean_env())
    assert kind == "PeftModelForCausalLM"
    assert (theirs[..., : config.model.vocab_size] - ours).abs().max().item() < 1e-5


def test_an_unknown_lora_target_is_a_one_line_error():
    from lmforge.errors import LmforgeError
    from posttrain.config import load_posttrain_config

    with pytest.raises(LmforgeError, match="lora.target_modules: unknown qkv"):
        load_posttrain_config("sft", ["lora.target_modules=[qkv]"])


def test_a_scalar_head_trains_with_the_adapters():
    from posttrain.heads import ScalarHeadModel

    config = ModelConfig(arch="llama", vocab_size=100, n_layers=2, n_heads=4, d_model=32, max_seq_len=32)
    model = add_lora(ScalarHeadModel(config), LoraConfig(rank=4, alpha=8.0, target_modules=("q_proj",)))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["head.bias", "head.weight"] + [f"lm.blocks.{i}.attn.q_proj.lora_{m}.default.weight"
                                                        for i in range(2) for m in "AB"]


@pytest.mark.slow
def test_lora_reward_and_ppo_train_adapters_and_heads_resume_and_export(tiny_corpus_shards, tmp_path):
    from lmforge.errors import run_cli
    from posttrain.job import starting_state
    from run_tools import export_hf
    from tests.posttrain.synthetic import prompts, separable_pairs
    from tests.posttrain.test_ppo import ppo_sets

    tokenizer = tiny_corpus_shards.tokenizer_dir
    lora = {"lora.rank": 4, "lora.alpha": 8}
    reward = {**tiny_model_sets(tokenizer, tmp_path / "reward"), "data.train": write_jsonl(tmp_path / "pairs.jsonl", separable_pairs(64, 0)),
              "data.valid_fraction": 0, "train.max_steps": 6, "train.save_interval": 3, "train.lr": 1e-2, "train.min_lr": 1e-2,
              "train.warmup_steps": 1, **lora}
    result = run_verb("reward", reward)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "reward: LoRA: 1,825 trainable of " in result.stdout  # 1,792 in the adapters + the head's 32 + 1
    step3, _ = starting_state(tmp_path / "reward", "step_00000003")
    step6, _ = starting_state(tmp_path / "reward", "step_00000006")  # merged: plain lm.*, head.* names
    assert not any("lora" in k for k in step6) and step6["head.weight"].abs().sum() > 0
    assert not torch.equal(step3["head.weight"], step6["head.weight"])
    assert not torch.equal(step3["lm.blocks.0.attn.q_proj.weight"], step6["lm.blocks.0.attn.q_proj.weight"])
    assert torch.equal(step3["lm.embed.weight"], step6["lm.embed.weight"])
    assert torch.equal(step3["lm.blocks.1.mlp.up_proj.weight"], step6["lm.blocks.1.mlp.up_proj.weight"])

    ppo = ppo_sets(tokenizer, tmp_path / "ppo", write_jsonl(tmp_path / "prompts.jsonl", prompts(32, 0)), **{
        "ppo.reward_run": tmp_path / "reward", "ppo.reward_function": "null", "ppo.rollout_batch_size": 16,
        "ppo.epochs": 1, "train.max_steps": 2, **lora})
    result = run_verb("ppo", ppo)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ppo actor: LoRA: 1,792 trainable of " in result.stdout
    assert "ppo critic: LoRA: 1,825 trainable of " in result.stdout  # the critic starts from the merged reward model
    result = run_verb("ppo", {**ppo, "train.max_steps": 3})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout and "step_00000002" in result.stdout
    assert [r["step"] for r in read_metrics(tmp_path / "ppo")] == [1, 2, 3]
    actor, tag = starting_state(tmp_path / "ppo", None)
    assert tag == "step_00000003" and "blocks.0.attn.q_proj.weight" in actor and not any("lora" in k for k in actor)
    files = export_hf.export(tmp_path / "ppo", tmp_path / "hf", adapter=True)
    assert "adapter" in files and (tmp_path / "hf" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_lora_dpo_and_grpo_train_adapters_only(tiny_corpus_shards, tmp_path):
    from posttrain.job import starting_state
    from tests.posttrain.synthetic import prompts, separable_pairs
    from tests.posttrain.test_grpo import grpo_sets

    tokenizer = tiny_corpus_shards.tokenizer_dir
    lora = {"lora.rank": 4, "lora.alpha": 8}
    dpo = {**tiny_model_sets(tokenizer, tmp_path / "dpo"), "data.train": write_jsonl(tmp_path / "pairs.jsonl", separable_pairs(32, 0)),
           "data.valid_fraction": 0, "train.max_steps": 4, "train.lr": 1e-2, "train.min_lr": 1e-2, "train.warmup_steps": 1, **lora}
    grpo = grpo_sets(tokenizer, tmp_path / "grpo", write_jsonl(tmp_path / "prompts.jsonl", prompts(16, 0)),
                     **{"train.max_steps": 2, "grpo.epochs": 1, **lora})
    for verb, sets in (("dpo", dpo), ("grpo", grpo)):
        result = run_verb(verb, sets)
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"{verb}: LoRA: 1,792 trainable of " in result.stdout  # q 256, k 192, v 192, o 256 per block at rank 4
        trained, _ = starting_state(sets["run.dir"], None)  # merged: the plain model's names
        assert "blocks.0.attn.q_proj.weight" in trained and not any("lora" in k for k in trained)
        assert read_metrics(sets["run.dir"])[-1]["step"] == sets["train.max_steps"]
