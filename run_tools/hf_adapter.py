"""A LoRA run's adapters as a PEFT adapter directory (`lmforge export-hf --adapter`).

DIR/adapter/ holds adapter_config.json (PEFT's own LoraConfig, task CAUSAL_LM) and
adapter_model.safetensors with PEFT's names (`base_model.model.<HF Linear>.lora_A.weight` / `lora_B`),
so `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(DIR), DIR / "adapter")` is the
trained model. Llama's Linear layers map one to one; GPT-2's o_proj, up_proj and down_proj are Conv1D
layers (PEFT's fan_in_fan_out), but its q, k and v are fused into c_attn, which one adapter per
projection cannot express: such a run exports merged weights only.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from lmforge.errors import LmforgeError
from pretrain.model import ModelConfig
from run_tools.hf_mapping import GPT2_CONV1D, LLAMA_BLOCK

ADAPTER_DIR = "adapter"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
PEFT_PREFIX = "base_model.model."
_GPT2_FUSED = ("q_proj", "k_proj", "v_proj")


def check_adapter_export(model: ModelConfig, lora: Mapping[str, Any], where: str) -> None:
    """One line, before anything is written, when the run has no adapters or HF's layout cannot hold them."""
    if not lora.get("rank"):
        raise LmforgeError(f"--adapter: {where} has lora.rank = {lora.get('rank', 0)}: the run trained no LoRA adapters; "
                           "export without --adapter")
    fused = [m for m in lora.get("target_modules", ()) if m in _GPT2_FUSED]
    if model.arch == "gpt2" and fused:
        raise LmforgeError(f"--adapter: {where} adapts {', '.join(fused)} of a gpt2 model, which HF's GPT-2 fuses into "
                           "c_attn; export merged weights (without --adapter) or adapt only o_proj, up_proj, down_proj")


def _hf_module(prefix: str, model: ModelConfig) -> str:
    """HF's name of the Linear lmforge calls `prefix` (e.g. blocks.0.attn.q_proj -> model.layers.0.self_attn.q_proj)."""
    block, _, linear = prefix.partition(".")[2].partition(".")
    if model.arch == "llama":
        return f"model.layers.{block}.{LLAMA_BLOCK[linear + '.weight'][: -len('.weight')]}"
    return f"transformer.h.{block}.{GPT2_CONV1D[linear]}"


def peft_adapter_tensors(adapters: Mapping[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
    """PEFT's names for pretrain.lora_weights.split_lora's adapters (A: rank x in, B: out x rank, as PEFT keeps both)."""
    out = {}
    for key, value in adapters.items():
        prefix, _, leaf = key.rpartition(".lora_")
        out[f"{PEFT_PREFIX}{_hf_module(prefix, model)}.lora_{leaf}"] = value.contiguous()
    return out


def hf_target_modules(model: ModelConfig, targets: list[str]) -> list[str]:
    """PEFT's target_modules for lmforge's; GPT-2's keep their parent (attn.c_proj and mlp.c_proj share a leaf)."""
    if model.arch == "llama":
        return list(targets)
    return [GPT2_CONV1D[("attn." if t == "o_proj" else "mlp.") + t] for t in targets]


def write_peft_adapter(adapters: Mapping[str, torch.Tensor], model: ModelConfig, lora: Mapping[str, Any],
                       base_dir: Path, folder: Path, dtype: torch.dtype) -> list[str]:
    """Writes folder/adapter_config.json and adapter_model.safetensors; returns their names."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    folder.mkdir()
    config = LoraConfig(task_type="CAUSAL_LM", r=int(lora["rank"]), lora_alpha=float(lora["alpha"]),
                        lora_dropout=float(lora.get("dropout", 0.0)), bias="none",
                        target_modules=hf_target_modules(model, list(lora["target_modules"])),
                        fan_in_fan_out=model.arch == "gpt2", base_model_name_or_path=str(base_dir))
    config.save_pretrained(str(folder))
    tensors = {k: v.to(dtype) for k, v in peft_adapter_tensors(adapters, model).items()}
    save_file(tensors, str(folder / ADAPTER_FILES[1]), metadata={"format": "pt"})
    return list(ADAPTER_FILES)
