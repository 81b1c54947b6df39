"""What maps to what between lmforge's Transformer and HF's LlamaForCausalLM / MixtralForCausalLM / GPT2LMHeadModel.

Three pure translations, each way: the config (`hf_config` / `model_config_from_hf`), and the
weights (`to_hf` / `from_hf`). Llama is a rename: our RoPE already uses HF's rotate-half layout,
so no q/k permutation is needed. GPT-2 also fuses q, k, v into `c_attn` and stores every linear
layer as a Conv1D, whose weight is the transpose of nn.Linear's; HF's GPT-2 always has biases, so
a bias-free model is written with zero biases. A llama with experts (model.n_experts > 0) is
Mixtral: the router is `block_sparse_moe.gate`, expert e's gate/down/up projections are
`block_sparse_moe.experts.<e>.w1/w2/w3` (the hub's layout; transformers 5 fuses them on load).
docs/interop.md has the full table.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from lmforge.errors import LmforgeError
from pretrain.model import ModelConfig

Tensors = dict[str, torch.Tensor]

# Per-block parameter names: lmforge -> HF Llama (under model.layers.<i>.).
LLAMA_BLOCK = {
    "attn_norm.weight": "input_layernorm.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    **{f"attn.{p}.{t}": f"self_attn.{p}.{t}" for p in ("q_proj", "k_proj", "v_proj", "o_proj") for t in ("weight", "bias")},
    **{f"mlp.{p}.{t}": f"mlp.{p}.{t}" for p in ("gate_proj", "up_proj", "down_proj") for t in ("weight", "bias")},
}
# MoE blocks (Mixtral, per-expert hub layout): lmforge -> HF under model.layers.<i>.
MIXTRAL_ROUTER = {"mlp.router.weight": "block_sparse_moe.gate.weight"}
MIXTRAL_EXPERT = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
LLAMA_TOP = {"embed.weight": "model.embed_tokens.weight", "final_norm.weight": "model.norm.weight", "lm_head.weight": "lm_head.weight"}
# GPT-2 linear layers stored as Conv1D (weight transposed): lmforge -> HF (under transformer.h.<i>.).
GPT2_CONV1D = {"attn.o_proj": "attn.c_proj", "mlp.up_proj": "mlp.c_fc", "mlp.down_proj": "mlp.c_proj"}
GPT2_NORMS = {"attn_norm": "ln_1", "mlp_norm": "ln_2"}
GPT2_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the tokenizer's special tokens, as written to config.json and generation_config.json."""

    bos_id: int | None
    eos_id: int | None
    pad_id: int | None


# ----------------------------------------------------------------------------- config

def hf_config(model: ModelConfig, special: SpecialTokens, dtype: str) -> dict[str, Any]:
    """config.json for the model (dtype: 'float32' or 'bfloat16'); vocab_size is the padded vocab."""
    common = {
        "vocab_size": model.padded_vocab_size,
        "tie_word_embeddings": model.tied,
        "bos_token_id": special.bos_id,
        "eos_token_id": special.eos_id,
        "pad_token_id": special.pad_id,
        "initializer_range": model.init_std,
        "use_cache": True,
        "torch_dtype": dtype,  # transformers 4.x reads torch_dtype, 5.x reads dtype
        "dtype": dtype,
    }
    if model.arch == "llama" and model.n_experts:
        return _mixtral_config(model, common)
    if model.arch == "llama":
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            **_llama_family_keys(model),
            "rope_scaling": None,
            "attention_bias": model.use_bias,
            "mlp_bias": model.use_bias,
            "attention_dropout": model.dropout,
            "pretraining_tp": 1,
            **common,
        }
    if model.kv_heads != model.n_heads:
        raise LmforgeError(
            f"model.n_kv_heads = {model.n_kv_heads}: HF's GPT-2 has no grouped-query attention, so a gpt2 model "
            f"with n_kv_heads != n_heads ({model.n_heads}) cannot be exported as GPT2LMHeadModel"
        )
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "n_embd": model.d_model,
        "n_layer": model.n_layers,
        "n_head": model.n_heads,
        "n_inner": model.hidden_dim,
        "n_positions": model.max_seq_len,
        "n_ctx": model.max_seq_len,
        "activation_function": "gelu_new",  # tanh-approximated GELU, as our MLP computes
        "layer_norm_epsilon": model.norm_eps,
        "resid_pdrop": model.dropout,
        "embd_pdrop": model.dropout,
        "attn_pdrop": model.dropout,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        **common,
    }


def _llama_family_keys(model: ModelConfig) -> dict[str, Any]:
    """The decoder's shape keys LlamaForCausalLM and MixtralForCausalLM share."""
    return {
        "hidden_size": model.d_model,
        "intermediate_size": model.hidden_dim,
        "num_hidden_layers": model.n_layers,
        "num_attention_heads": model.n_heads,
        "num_key_value_heads": model.kv_heads,
        "head_dim": model.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": model.max_seq_len,
        "rms_norm_eps": model.norm_eps,
        "rope_theta": model.rope_theta,  # transformers 4.x; 5.x reads rope_parameters
        "rope_parameters": {"rope_type": "default", "rope_theta": model.rope_theta},
    }


def _mixtral_config(model: ModelConfig, common: dict[str, Any]) -> dict[str, Any]:
    if model.use_bias:
        raise LmforgeError(f"model.bias = {model.bias}: HF's Mixtral has no biases, so an MoE model with biases "
                           "cannot be exported as MixtralForCausalLM")
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        **_llama_family_keys(model),
        "sliding_window": None,
        "attention_dropout": model.dropout,
        "num_local_experts": model.n_experts,
        "num_experts_per_tok": model.experts_per_token,
        "router_aux_loss_coef": model.router_aux_loss_coef,
        "output_router_logits": False,
        "router_jitter_noise": 0.0,
        **common,
    }


def _require(hf: Mapping[str, Any], key: str, source: str) -> Any:
    if hf.get(key) is None:
        raise LmforgeError(f"{source}: '{key}' is missing; not a complete transformers config.json")
    return hf[key]


def _vocab_fields(hf_vocab: int, tokenizer_vocab: int | None) -> dict[str, int]:
    """vocab_size and pad_vocab_to_multiple whose padded size is exactly HF's embedding rows."""
    vocab = tokenizer_vocab if tokenizer_vocab and tokenizer_vocab <= hf_vocab else hf_vocab
    if 128 * math.ceil(vocab / 128) == hf_vocab:
        return {"vocab_size": vocab, "pad_vocab_to_multiple": 128}
    return {"vocab_size": vocab, "pad_vocab_to_multiple": 1 if vocab == hf_vocab else hf_vocab}


def _llama_fields(hf: Mapping[str, Any], source: str) -> dict[str, Any]:
    d_model, n_heads = _require(hf, "hidden_size", source), _require(hf, "num_attention_heads", source)
    if hf.get("hidden_act", "silu") != "silu":
        raise LmforgeError(f"{source}: hidden_act = {hf['hidden_act']!r}: lmforge's llama MLP is SwiGLU ('silu')")
    if hf.get("head_dim") not in (None, d_model // n_heads):
        raise LmforgeError(f"{source}: head_dim = {hf['head_dim']}: lmforge needs hidden_size / num_attention_heads = {d_model // n_heads}")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise LmforgeError(f"{source}: RoPE type {rope_type!r} (rope scaling) is not supported; lmforge implements plain RoPE")
    attention_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
    if attention_bias != mlp_bias:
        raise LmforgeError(f"{source}: attention_bias = {attention_bias} but mlp_bias = {mlp_bias}; lmforge's model.bias covers both")
    return {
        "arch": "llama", "d_model": d_model, "n_heads": n_heads,
        "n_layers": _require(hf, "num_hidden_layers", source),
        "n_kv_heads": hf.get("num_key_value_heads") or n_heads,
        "d_ff": _require(hf, "intermediate_size", source),
        "max_seq_len": hf.get("max_position_embeddings", 2048),
        "rope_theta": float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "bias": attention_bias,
        "dropout": float(hf.get("attention_dropout", 0.0)),
    }


def _gpt2_fields(hf: Mapping[str, Any], source: str) -> dict[str, Any]:
    activation = hf.get("activation_function", "gelu_new")
    if activation not in GPT2_TANH_GELU:
        raise LmforgeError(f"{source}: activation_function = {activation!r}: lmforge's GPT-2 MLP uses the tanh GELU ({', '.join(GPT2_TANH_GELU)})")
    for key, wanted in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False), ("add_cross_attention", False)):
        if bool(hf.get(key, wanted)) != wanted:
            raise LmforgeError(f"{source}: {key} = {hf[key]}: lmforge's GPT-2 needs {wanted}")
    d_model = _require(hf, "n_embd", source)
    return {
        "arch": "gpt2", "d_model": d_model,
        "n_layers": _require(hf, "n_layer", source),
        "n_heads": _require(hf, "n_head", source),
        "n_kv_heads": None,
        "d_ff": hf.get("n_inner") or 4 * d_model,
        "max_seq_len": hf.get("n_positions", 1024),
        "norm_eps": float(hf.get("layer_norm_epsilon", 1e-5)),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", True)),
        "bias": True,  # HF's GPT-2 always has biases
        "dropout": float(hf.get("resid_pdrop", 0.1)),
    }


def model_config_from_hf(hf: Mapping[str, Any], source: str, tokenizer_vocab: int | None = None) -> ModelConfig:
    """Our ModelConfig for an HF config.json; `tokenizer_vocab`, when known, is the real (unpadded) vocab."""
    model_type = hf.get("model_type")
    if model_type == "llama":
        fields = _llama_fields(hf, source)
    elif model_type == "mixtral":
        if hf.get("sliding_window") is not None:
            raise LmforgeError(f"{source}: sliding_window = {hf['sliding_window']}: lmforge's attention is full causal; "
                               "only a Mixtral with sliding_window null imports")
        fields = {**_llama_fields(hf, source), "n_experts": int(_require(hf, "num_local_experts", source)),
                  "experts_per_token": int(_require(hf, "num_experts_per_tok", source)),
                  "router_aux_loss_coef": float(hf.get("router_aux_loss_coef", 0.001))}
    elif model_type == "gpt2":
        fields = _gpt2_fields(hf, source)
    else:
        raise LmforgeError(f"{source}: model_type = {model_type!r}: lmforge imports 'llama' (LlamaForCausalLM), 'mixtral' (MixtralForCausalLM, per-expert w1/w2/w3 layout) and 'gpt2' (GPT2LMHeadModel)")
    fields.update(_vocab_fields(int(_require(hf, "vocab_size", source)), tokenizer_vocab))
    fields["init_std"] = float(hf.get("initializer_range", 0.02))
    config = ModelConfig(**fields)
    if config.problems():
        raise LmforgeError(f"{source}: " + "; ".join(config.problems()))
    return config


# ----------------------------------------------------------------------------- weights

def _block_index(name: str) -> tuple[int, str] | None:
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    return (int(match.group(1)), match.group(2)) if match else None


def _llama_name(name: str) -> str:
    block = _block_index(name)
    if block is None:
        return LLAMA_TOP[name]
    expert = re.fullmatch(r"mlp\.experts\.(\d+)\.(\w+)\.weight", block[1])
    if expert:
        return f"model.layers.{block[0]}.block_sparse_moe.experts.{expert.group(1)}.{MIXTRAL_EXPERT[expert.group(2)]}.weight"
    return f"model.layers.{block[0]}.{MIXTRAL_ROUTER.get(block[1]) or LLAMA_BLOCK[block[1]]}"


def _zeros_if_missing(state: Mapping[str, torch.Tensor], name: str, size: int, like: torch.Tensor) -> torch.Tensor:
    return state[name] if name in state else torch.zeros(size, dtype=like.dtype)


def _gpt2_to_hf(state: Mapping[str, torch.Tensor], model: ModelConfig) -> Tensors:
    d = model.d_model
    out: Tensors = {"transformer.wte.weight": state["embed.weight"], "transformer.wpe.weight": state["pos_embed.weight"]}
    for i in range(model.n_layers):
        ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
        for norm, hf_norm in GPT2_NORMS.items():
            weight = state[f"{ours}{norm}.weight"]
            out[f"{theirs}{hf_norm}.weight"] = weight
            out[f"{theirs}{hf_norm}.bias"] = _zeros_if_missing(state, f"{ours}{norm}.bias", d, weight)
        qkv = [f"{ours}attn.{p}" for p in ("q_proj", "k_proj", "v_proj")]
        out[f"{theirs}attn.c_attn.weight"] = torch.cat([state[f"{p}.weight"] for p in qkv], dim=0).t()
        out[f"{theirs}attn.c_attn.bias"] = torch.cat(
            [_zeros_if_missing(state, f"{p}.bias", state[f"{p}.weight"].shape[0], state[f"{p}.weight"]) for p in qkv])
        for linear, conv in GPT2_CONV1D.items():
            weight = state[f"{ours}{linear}.weight"]
            out[f"{theirs}{conv}.weight"] = weight.t()
            out[f"{theirs}{conv}.bias"] = _zeros_if_missing(state, f"{ours}{linear}.bias", weight.shape[0], weight)
    out["transformer.ln_f.weight"] = state["final_norm.weight"]
    out["transformer.ln_f.bias"] = _zeros_if_missing(state, "final_norm.bias", d, state["final_norm.weight"])
    if not model.tied:
        out["lm_head.weight"] = state["lm_head.weight"]
    return out


def to_hf(state: Mapping[str, torch.Tensor], model: ModelConfig) -> Tensors:
    """HF parameter names and layouts for our (consolidated) state dict; contiguous, tied head dropped."""
    if model.arch == "llama":
        out = {_llama_name(k): v for k, v in state.items() if not (model.tied and k == "lm_head.weight")}
    else:
        out = _gpt2_to_hf(state, model)
    return {k: v.contiguous() for k, v in out.items()}


def _strip_base_prefix(hf_state: Mapping[str, torch.Tensor], base: str) -> Tensors:
    """Accepts checkpoints saved from the bare base model too (GPT2Model 'h.0...', LlamaModel 'layers.0...')."""
    if any(k.startswith(base + ".") for k in hf_state):
        return dict(hf_state)
    return {(k if k == "lm_head.weight" else f"{base}.{k}"): v for k, v in hf_state.items()}


def _gpt2_from_hf(hf: Mapping[str, torch.Tensor], model: ModelConfig) -> Tensors:
    d = model.d_model
    out: Tensors = {"embed.weight": hf["transformer.wte.weight"], "pos_embed.weight": hf["transformer.wpe.weight"]}
    for i in range(model.n_layers):
        ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
        for norm, hf_norm in GPT2_NORMS.items():
            out[f"{ours}{norm}.weight"] = hf[f"{theirs}{hf_norm}.weight"]
            out[f"{ours}{norm}.bias"] = hf[f"{theirs}{hf_norm}.bias"]
        weight, bias = hf[f"{theirs}attn.c_attn.weight"].t(), hf[f"{theirs}attn.c_attn.bias"]
        if weight.shape[0] != 3 * d:
            raise ValueError(f"{theirs}attn.c_attn.weight has shape {tuple(weight.shape[::-1])}, the config needs ({d}, {3 * d})")
        for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            out[f"{ours}attn.{proj}.weight"] = weight[j * d : (j + 1) * d]
            out[f"{ours}attn.{proj}.bias"] = bias[j * d : (j + 1) * d]
        for linear, conv in GPT2_CONV1D.items():
            out[f"{ours}{linear}.weight"] = hf[f"{theirs}{conv}.weight"].t()
            out[f"{ours}{linear}.bias"] = hf[f"{theirs}{conv}.bias"]
    out["final_norm.weight"], out["final_norm.bias"] = hf["transformer.ln_f.weight"], hf["transformer.ln_f.bias"]
    out["lm_head.weight"] = out["embed.weight"] if model.tied else hf["lm_head.weight"]
    return out


def _llama_from_hf(hf: Mapping[str, torch.Tensor], model: ModelConfig, expected: list[str]) -> Tensors:
    out = {name: hf[_llama_name(name)] for name in expected if not (model.tied and name == "lm_head.weight")}
    if model.tied:
        out["lm_head.weight"] = out["embed.weight"]
    return out


def hf_names(model: ModelConfig, expected: list[str]) -> set[str]:
    """The HF parameter names a checkpoint of this model has (`expected`: our Transformer's names)."""
    if model.arch == "llama":
        return {_llama_name(k) for k in expected if not (model.tied and k == "lm_head.weight")}
    per_layer = [f"{m}.{t}" for m in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj") for t in ("weight", "bias")]
    names = {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "transformer.ln_f.bias"}
    names |= {f"transformer.h.{i}.{n}" for i in range(model.n_layers) for n in per_layer}
    return names if model.tied else names | {"lm_head.weight"}


# Buffers some checkpoints carry (GPT-2's causal masks, old Llama rotary caches) and tied copies of the head.
_IGNORED = re.compile(r".*(\.attn\.bias|\.attn\.masked_bias|rotary_emb\.inv_freq)$")


def from_hf(hf_state: Mapping[str, torch.Tensor], model: ModelConfig, expected: list[str], source: str) -> Tensors:
    """Our state dict (names in `expected`, our Transformer's) from HF weights; a missing or extra tensor is an error."""
    base = "model" if model.arch == "llama" else "transformer"
    hf = _strip_base_prefix(hf_state, base)
    extra = sorted(k for k in set(hf) - hf_names(model, expected)
                   if not _IGNORED.match(k) and not (model.tied and k == "lm_head.weight"))
    if extra:
        raise LmforgeError(f"{source}: weights {', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''} are not part of "
                           "the model its config.json describes")
    embed_name = "model.embed_tokens.weight" if model.arch == "llama" else "transformer.wte.weight"
    if model.tied and "lm_head.weight" in hf and embed_name in hf and not torch.equal(hf["lm_head.weight"], hf[embed_name]):
        # transformers (5) unties such a model and predicts with the file's head: dropping it would change the logits
        raise LmforgeError(f"{source}: config.json says tie_word_embeddings = true, but its lm_head.weight differs from "
                           f"{embed_name}; set \"tie_word_embeddings\": false in config.json to import the head as it is")
    try:
        out = _llama_from_hf(hf, model, expected) if model.arch == "llama" else _gpt2_from_hf(hf, model)
    except KeyError as err:
        raise LmforgeError(f"{source}: weight {err.args[0]} is missing; the checkpoint does not match its config.json") from None
    except ValueError as err:
        raise LmforgeError(f"{source}: {err}") from None
    return {k: v.contiguous() for k, v in out.items() if k in expected}
