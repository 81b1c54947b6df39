"""LoRA (Hu et al. 2021) through PEFT: low-rank adapters injected into the Transformer's Linear layers
(`lora` config section) of every verb's trained model (sft, reward, dpo, ppo's actor and critic, grpo); every
other weight is frozen but a scalar head, so the optimizer holds state for the adapters (and head) only. Checkpoints keep PEFT's names; readers of the run get merged weights (pretrain/lora_weights.py).
"""
from __future__ import annotations

import torch

from posttrain.config import LoraConfig


def add_lora(model: torch.nn.Module, lora: LoraConfig) -> torch.nn.Module:
    """Injects PEFT LoRA layers into `model` in place and freezes everything but them and the parameters
    the model names in `trainable_with_lora` (prefixes: a reward model's or critic's scalar head, which
    starts untrained)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    peft_config = PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                 target_modules=list(lora.target_modules), bias="none")
    model = inject_adapter_in_model(peft_config, model)
    keep = tuple(getattr(model, "trainable_with_lora", ()))
    for name, param in model.named_parameters():
        param.requires_grad_(".lora_A." in name or ".lora_B." in name or name.startswith(keep))
    return model


def with_lora(model: torch.nn.Module, lora: LoraConfig, label: str) -> torch.nn.Module:
    """`model` with adapters when lora.rank is set (else unchanged); rank 0 prints what trains, as `label: LoRA: ...`."""
    from lmforge import distributed

    if not lora.rank:
        return model
    model = add_lora(model, lora)
    if distributed.is_main():
        print(f"{label}: {describe_trainable(model)}", flush=True)
    return model


def describe_trainable(model: torch.nn.Module) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    adam_mb = trainable * 3 * 4 / 2**20  # fp32 gradient, exp_avg and exp_avg_sq per trainable parameter
    return (f"LoRA: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%), "
            f"gradient + Adam state {adam_mb:.2f} MiB (fp32)")


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of the optimizer's per-parameter state (Adam's moments) on this rank: DeepSpeed's ZeRO wrappers
    hold the torch optimizer as `.optimizer`, whose state covers this rank's partition only."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return sum(v.numel() * v.element_size() for state in getattr(inner, "state", {}).values()
               for v in state.values() if torch.is_tensor(v) and v.dim() > 0)


def lora_report(model: torch.nn.Module, optimizer) -> dict[str, float]:
    """For the run's summary: trainable parameters and the optimizer state summed over ranks (MiB)."""
    from lmforge import distributed

    trainable = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters() if p.requires_grad)
    total = distributed.all_reduce_sum(torch.tensor(float(optimizer_state_bytes(optimizer)))).item()
    return {"trainable_parameters": float(trainable), "optimizer_state_mib": total / 2**20}
