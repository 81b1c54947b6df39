"""A run's trained weights for eval and export: merged from any ZeRO stage and checked against config.yaml.

A tensor-parallel checkpoint (parallel/tensor.py) has one module-states file per tensor rank; their
shards are joined back into whole matrices. ZeRO 1-3 checkpoints are merged by DeepSpeed's zero_to_fp32 through
`pretrain.checkpoint.consolidated_state_dict`. A ZeRO-0 checkpoint has no optimizer shards and
zero_to_fp32 cannot read it, but its `mp_rank_00_model_states.pt` holds the whole module (what
DeepSpeed itself loads): in fp32 (fp32 or autocast training) that is the model; under DeepSpeed's
bf16/fp16 mode the module is 16-bit and the fp32 master weights are the optimizer's
`fp32_groups_flat`, one flat tensor per parameter group, which are cut back into parameters here.
Every tensor is then checked against the model config.yaml describes, so a config that does not
match its checkpoint (another vocab, another width) is a one-line error, not a traceback.

Post-training runs read the same way (pretrain.run_dir reads their model section; the model with its
weights, for any run: run_tools.run_config.load_checked_model): SFT and DPO checkpoint
the language model, PPO its actor (RUN_DIR/checkpoints; the critic is under RUN_DIR/critic/). A
reward model (keys `lm.*`, `head.*`: a scalar head, not a causal LM) is refused with one line.
A run trained with LoRA reads as its merged weights (pretrain.lora_weights). An expert-parallel
checkpoint (DeepSpeed MoE layers, one file per expert) reads as the plain MoE model's weights
(pretrain.expert_checkpoint).
"""
from __future__ import annotations

from pathlib import Path

import torch

from lmforge.errors import LmforgeError
from lmforge.run_layout import config_path
from pretrain import checkpoint
from pretrain.expert_checkpoint import expert_parallel_state_dict, is_expert_parallel_checkpoint
from pretrain.lora_weights import has_lora, lora_scale, merge_lora, split_lora
from pretrain.model import ModelConfig, Transformer
from pretrain.pipeline_checkpoint import is_pipeline_checkpoint, pipeline_state_dict_to_model
from pretrain.run_dir import run_model_config

MODULE_STATES = "mp_rank_00_model_states.pt"
TENSOR_RANK_1_STATES = "mp_rank_01_model_states.pt"
"""Only a tensor-parallel checkpoint has it: DeepSpeed writes one module-states file per tensor rank."""


def _resolve_tag(run_dir: Path, step: int | None) -> str:
    if step is not None:
        tag = checkpoint.tag_for_step(step)
        if not (checkpoint.checkpoints_dir(run_dir) / tag / checkpoint.COMPLETE_MARKER).is_file():
            available = ", ".join(str(checkpoint.step_of_tag(t)) for t in checkpoint.complete_tags(run_dir)) or "none"
            raise LmforgeError(f"{run_dir}: no complete checkpoint for --step {step} (complete steps: {available})")
        return tag
    tag = checkpoint.latest_tag(run_dir)
    if tag is None:
        raise LmforgeError(f"{checkpoint.checkpoints_dir(run_dir)}: no checkpoint found; train first (`lmforge train`)")
    return tag


def _fp32_masters(states: dict, module: dict[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor] | None:
    """The fp32 masters of a 16-bit ZeRO-0 checkpoint, each checked to round to the module's value; else None."""
    from pretrain.engine import parameter_group_names

    optimizer = states.get("optimizer")
    flats = optimizer.get("fp32_groups_flat") if isinstance(optimizer, dict) else None
    if not flats or all(v.dtype == torch.float32 for v in module.values()):
        return None
    for decay_embeddings in (False, True):  # train.decay_embeddings chose the optimizer's groups
        groups = parameter_group_names(model, decay_embeddings)
        if any(n not in module for group in groups for n in group):
            return None  # not a plain Transformer's module (a reward model's lm.* / head.*)
        if len(groups) == len(flats) and all(sum(module[n].numel() for n in g) == f.numel() for g, f in zip(groups, flats)):
            break
    else:
        return None
    with torch.device("meta"):
        meta = Transformer(model)
    aliases: dict[int, list[str]] = {}
    for name, param in meta.named_parameters(remove_duplicate=False):  # a tied head shares the embedding
        aliases.setdefault(id(param), []).append(name)
    aliases_of = {found[0]: found for found in aliases.values()}  # the first name is the one groups use
    masters: dict[str, torch.Tensor] = {}
    for group, flat in zip(groups, flats):
        for name, piece in zip(group, torch.split(flat.float(), [module[n].numel() for n in group])):
            for alias in aliases_of[name]:
                masters[alias] = piece.view(module[name].shape).clone()
    if any(not torch.equal(masters[n].to(module[n].dtype), module[n]) for n in masters):
        return None  # not the layout we expected: the 16-bit module is the best we have
    return {k: masters.get(k, v.float()) for k, v in module.items()}


def _zero0_module_state(folder: Path, model: ModelConfig) -> dict[str, torch.Tensor]:
    path = folder / MODULE_STATES
    if not path.is_file():
        raise LmforgeError(f"{path}: missing; the checkpoint is incomplete (retrain, or pick another --step)")
    try:
        states = torch.load(path, map_location="cpu", weights_only=True)
        module = states["module"]
    except Exception as err:  # a truncated or foreign file: pickle, zip and key errors alike
        raise LmforgeError(f"{path}: unreadable DeepSpeed model states ({type(err).__name__}: {err})") from None
    masters = _fp32_masters(states, module, model) if model.vocab_size else None
    return masters if masters is not None else {k: v.float() for k, v in module.items()}


def _tensor_parallel_module_state(folder: Path) -> dict[str, torch.Tensor]:
    """A tensor-parallel run's weights: every tensor rank's module states (mp_rank_XX, each DeepSpeed's
    own file for that rank's shards) joined along the split dimensions (parallel.tensor.merge_tensor_shards).
    The module is the model's fp32 weights in fp32 or autocast training (16-bit under DeepSpeed's bf16 mode)."""
    from parallel.tensor import merge_tensor_shards

    shards = []
    for path in sorted(folder.glob("mp_rank_*_model_states.pt")):
        try:
            shards.append(torch.load(path, map_location="cpu", weights_only=True)["module"])
        except Exception as err:  # a truncated or foreign file: pickle, zip and key errors alike
            raise LmforgeError(f"{path}: unreadable DeepSpeed model states ({type(err).__name__}: {err})") from None
    return {k: v.float() for k, v in merge_tensor_shards(shards).items()}


def run_state_dict(run_dir: Path, step: int | None = None, merge: bool = True) -> tuple[dict[str, torch.Tensor], str]:
    """fp32 weights of the run's checkpoint at `step` (None: latest), and its tag; LoRA adapters merged unless not `merge`."""
    run_dir = Path(run_dir)
    tag = _resolve_tag(run_dir, step)
    folder = checkpoint.checkpoints_dir(run_dir) / tag
    if is_pipeline_checkpoint(folder):
        return pipeline_state_dict_to_model(folder), tag
    if is_expert_parallel_checkpoint(folder):
        return expert_parallel_state_dict(folder), tag
    if (folder / TENSOR_RANK_1_STATES).is_file():
        state = _tensor_parallel_module_state(folder)
    elif not any(folder.glob("*optim_states.pt")):
        state = _zero0_module_state(folder, run_model_config(run_dir))
    else:
        state, tag = checkpoint.consolidated_state_dict(run_dir, tag)
    return (merge_lora(state, lora_scale(run_dir)) if merge and has_lora(state) else state), tag


def _describe(model: ModelConfig) -> str:
    return (f"{model.arch}, vocab_size {model.vocab_size} padded to {model.padded_vocab_size}, d_model {model.d_model}, "
            f"{model.n_layers} layers, {model.n_heads} heads / {model.kv_heads} kv heads, d_ff {model.hidden_dim}")


def check_state_dict(state: dict[str, torch.Tensor], model: ModelConfig, where: str) -> None:
    """Raises one LmforgeError if `state` is not exactly the weights of a Transformer(model)."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Transformer(model).state_dict().items()}
    problems = []
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing:
        problems.append(f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    if unexpected:
        problems.append(f"unexpected {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}")
    for name, shape in expected.items():
        if name in state and tuple(state[name].shape) != shape:
            problems.append(f"{name} has shape {tuple(state[name].shape)}, the config needs {shape}")
    if problems:
        raise LmforgeError(f"{where}: weights do not match the config's model ({_describe(model)}): {'; '.join(problems[:4])}")


def lm_state_dict(run_dir: Path, model: ModelConfig, step: int | None = None,
                  adapters: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """The fp32 weights of the run's language model at `step` (None: latest), checked against `model`, and the tag.

    A tied head's `lm_head.weight` is filled in from the embedding. A reward model's checkpoint is refused.
    Given a dict `adapters`, a LoRA run's adapters are moved into it (pretrain.lora_weights.split_lora) and
    the base weights returned instead of the merged ones.
    """
    state, tag = run_state_dict(run_dir, step, merge=adapters is None)
    if adapters is not None:
        state, found = split_lora(state)
        adapters.update(found)
    folder = checkpoint.checkpoints_dir(run_dir) / tag
    if "head.weight" in state and any(k.startswith("lm.") for k in state):
        raise LmforgeError(f"{run_dir}: a reward model ({folder} holds a scalar head on the LM trunk, keys lm.*, head.*), "
                           "not a causal language model; use an SFT, DPO, PPO (its actor) or pretraining run")
    if model.tied and "embed.weight" in state:
        state.setdefault("lm_head.weight", state["embed.weight"])
    check_state_dict(state, model, f"{folder} with {config_path(run_dir)}")
    return state, tag
