"""export-hf --adapter: a LoRA run's base weights plus a PEFT adapter that `PeftModel.from_pretrained` loads
on them give lmforge's logits (llama and gpt2), and what HF's layout cannot hold is refused in one line."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from lmforge.errors import LmforgeError
from posttrain.config import LoraConfig
from posttrain.lora import add_lora
from pretrain.lora_weights import split_lora
from pretrain.model import ModelConfig, Transformer
from run_tools.hf_adapter import check_adapter_export, write_peft_adapter
from run_tools.hf_mapping import SpecialTokens, hf_config, to_hf

# Loads base + adapter with transformers and PEFT only; prints the logits for the ids given.
PEFT_SIDE = ("import sys, json, torch, transformers, peft; base = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1]);"
             "m = peft.PeftModel.from_pretrained(base, sys.argv[2]).eval(); ids = torch.tensor(json.loads(sys.argv[3]));"
             "print(json.dumps({'adapted': m(ids).logits.tolist(), 'type': type(m).__name__}))")


def peft_logits(base_dir, adapter_dir, ids, cwd, env=None) -> tuple[torch.Tensor, str]:
    result = subprocess.run([sys.executable, "-c", PEFT_SIDE, str(base_dir), str(adapter_dir), json.dumps(ids)],
                            cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    return torch.tensor(found["adapted"]), found["type"]


@pytest.mark.parametrize("arch,targets", [("llama", ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
                                          ("gpt2", ("o_proj", "up_proj", "down_proj"))])
def test_peft_adapter_on_the_exported_base_gives_the_adapted_models_logits(arch, targets, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = ModelConfig(arch=arch, vocab_size=96, n_layers=2, n_heads=4, d_model=32, max_seq_len=32,
                         pad_vocab_to_multiple=1, n_kv_heads=2 if arch == "llama" else None)
    lora = LoraConfig(rank=4, alpha=8.0, target_modules=targets)
    adapted = add_lora(Transformer(config), lora).eval()
    for name, param in adapted.named_parameters():
        if ".lora_B." in name:
            torch.nn.init.normal_(param, std=0.5)  # PEFT starts B at zero: make the adapters matter
    base, adapters = split_lora(adapted.state_dict())
    assert len(adapters) == 2 * len(targets) * config.n_layers
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps(hf_config(config, SpecialTokens(None, None, None), "float32")))
    hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(hf_dir))
    missing, unexpected = hf.load_state_dict(to_hf(base, config), strict=False)
    assert not unexpected and all("lm_head" in k or "attn.bias" in k for k in missing), (missing, unexpected)
    hf.save_pretrained(hf_dir)
    section = {"rank": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": list(targets)}
    write_peft_adapter(adapters, config, section, hf_dir, hf_dir / "adapter", torch.float32)
    ids = [[3, 10, 11, 12, 13, 14, 15, 16], [5, 6, 7, 8, 9, 1, 2, 4]]
    with torch.no_grad():
        ours = adapted(torch.tensor(ids))
        plain = Transformer(config).eval()
        plain.load_state_dict(base)
        assert (plain(torch.tensor(ids)) - ours).abs().max() > 1e-2  # the adapters change the logits
    theirs, kind = peft_logits(hf_dir, hf_dir / "adapter", ids, tmp_path)
    assert kind == "PeftModelForCausalLM"
    assert (theirs[..., : config.vocab_size] - ours).abs().max().item() < 1e-5


def test_adapter_export_is_refused_in_one_line_without_adapters_or_for_gpt2s_fused_qkv():
    gpt2 = ModelConfig(arch="gpt2", vocab_size=96, n_layers=1, n_heads=4, d_model=32)
    with pytest.raises(LmforgeError, match=r"^--adapter: run/config.yaml has lora.rank = 0: the run trained no LoRA adapters; export without --adapter$"):
        check_adapter_export(gpt2, {}, "run/config.yaml")
    with pytest.raises(LmforgeError, match=r"^--adapter: run/config.yaml adapts q_proj, v_proj of a gpt2 model, which HF's GPT-2 fuses into c_attn"):
        check_adapter_export(gpt2, {"rank": 4, "target_modules": ["q_proj", "v_proj", "o_proj"]}, "run/config.yaml")
    check_adapter_export(gpt2, {"rank": 4, "target_modules": ["o_proj", "down_proj"]}, "run/config.yaml")
