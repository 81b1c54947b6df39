"""`lmforge export-hf --checkpoint RUN_DIR --output DIR`: a run as a Hugging Face transformers model.

DIR gets (docs/interop.md): model.safetensors (or shards + model.safetensors.index.json),
config.json for LlamaForCausalLM (llama) or GPT2LMHeadModel (gpt2), generation_config.json, and
the tokenizer (tokenizer.json, tokenizer_config.json, special_tokens_map.json, tokenizer.model;
for a run made by `lmforge import-hf`, the source model's own tokenizer files). RUN_DIR may also be a
post-training run: SFT, DPO, or PPO (its actor); a reward model is refused (pretrain.run_weights). A LoRA
run exports merged weights, or with --adapter its base weights plus a PEFT adapter in DIR/adapter/
(run_tools.hf_adapter).
Nothing in DIR needs lmforge: `AutoModelForCausalLM.from_pretrained(DIR)` and
`AutoTokenizer.from_pretrained(DIR)` need only transformers (DIR/.lmforge-owner.json marks it as an
export, so `--overwrite` replaces only an earlier export: lmforge.ownership). DIR appears complete or
not at all: it is written beside its final place, then renamed; out of space, nothing is left.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Sequence

import torch

from lmforge import ownership
from lmforge.errors import LmforgeError, run_cli
from lmforge.out_of_space import describe as describe_space, is_out_of_space
from pretrain.run_weights import lm_state_dict
from lmforge.run_layout import config_path
from run_tools.hf_adapter import ADAPTER_DIR, check_adapter_export, write_peft_adapter
from run_tools.hf_mapping import SpecialTokens, hf_config, to_hf
from run_tools.hf_tokenizer import (
    copy_source_tokenizer, has_source_tokenizer, special_tokens, write_hf_tokenizer,
)
from pretrain.model import ModelConfig
from pretrain.run_dir import load_run_tokenizer, run_tokenizer_path
from run_tools.hf_weights import parse_size, save_safetensors
from run_tools.run_config import load_run_config

DTYPES = {"fp32": (torch.float32, "float32"), "bf16": (torch.bfloat16, "bfloat16")}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lmforge export-hf", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True, metavar="RUN_DIR", help="run directory to export")
    parser.add_argument("--step", type=int, default=None, help="export this step's checkpoint (default: latest)")
    parser.add_argument("--output", type=Path, required=True, metavar="DIR", help="model directory to write")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weight precision (default: fp32)")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="tokenizer.model to ship (default: the run's: RUN_DIR/tokenizer.model of a post-training run, "
                             "else the copy beside its shards, data.path)")
    parser.add_argument("--max-shard-size", default="5GB", help="split weights into files of at most this size (default: 5GB)")
    parser.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    parser.add_argument("--adapter", action="store_true",
                        help="for a LoRA run: DIR gets the base weights and DIR/adapter/ a PEFT adapter "
                             "(default: merged weights)")
    return parser.parse_args(argv)


def _tokenizer_path(run_dir: Path, override: Path | None) -> Path:
    """--tokenizer (a tokenizer.model or its directory), else the run's own (pretrain.run_dir.run_tokenizer_path)."""
    if override is None:
        return run_tokenizer_path(run_dir, fix="pass --tokenizer PATH/tokenizer.model")
    path = override / "tokenizer.model" if override.is_dir() else override
    if not path.is_file():
        raise LmforgeError(f"--tokenizer {override}: no sentencepiece tokenizer.model there")
    return path


def run_lora_section(run_dir: Path) -> dict:
    """The run's config.yaml `lora` section ({} for a run without one)."""
    from lmforge.config import read_yaml_mapping

    return read_yaml_mapping(config_path(run_dir)).get("lora") or {}


def generation_config(model: ModelConfig, special: SpecialTokens) -> dict:
    """Greedy-by-default settings; padding rows of the vocab are never generated."""
    ids = {"bos_token_id": special.bos_id, "eos_token_id": special.eos_id, "pad_token_id": special.pad_id}
    config = {key: value for key, value in ids.items() if value is not None}
    padding = list(range(model.vocab_size, model.padded_vocab_size))
    if padding:
        config["suppress_tokens"] = padding
    return config


def _check_output(output: Path, overwrite: bool, run_dir: Path, tokenizer: Path | None) -> None:
    """DIR may be new, empty, or (with --overwrite) an earlier export; never a run, an input, or a user's folder."""
    found = ownership.check_output(output, "export", "export-hf", "--output",
                                   {"--checkpoint": run_dir, "--tokenizer": tokenizer})
    if found and not overwrite:
        raise LmforgeError(f"--output {output}: holds an earlier export; pass --overwrite to replace it")
    written = (ownership.read_owner(output) or {}).get("files")
    added = sorted(set(ownership.user_entries(output)) - set(written)) if found and written is not None else []
    if added:  # --overwrite replaces the export, never what the user put beside it
        raise LmforgeError(f"--output {output}: the earlier export there now also holds files it did not write "
                           f"({', '.join(added[:3])}); nothing was changed: move them away or choose another --output")


def _staging_dir(output: Path) -> Path:
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.parent / f".{output.name}.partial{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return staging


def _move_into_place(staging: Path, output: Path) -> None:
    old = output.parent / f".{output.name}.old{os.getpid()}"
    if output.exists():
        output.rename(old)
    staging.rename(output)
    shutil.rmtree(old, ignore_errors=True)


def export(run_dir: Path, output: Path, step: int | None = None, dtype: str = "fp32",
           tokenizer: Path | None = None, max_shard_size: str = "5GB", overwrite: bool = False,
           adapter: bool = False) -> list[str]:
    """Writes the HF model directory (with `adapter`: the base weights, and the PEFT adapter in
    DIR/adapter/, run_tools.hf_adapter); returns the names of the files written."""
    max_shard_bytes = parse_size(max_shard_size)
    _check_output(Path(output), overwrite, Path(run_dir), tokenizer)
    model = load_run_config(run_dir).model
    lora = run_lora_section(Path(run_dir))
    if adapter:
        check_adapter_export(model, lora, str(config_path(run_dir)))
    token_model = None
    if tokenizer is not None or not has_source_tokenizer(Path(run_dir)):
        token_model = load_run_tokenizer(run_dir, model, _tokenizer_path(run_dir, tokenizer))
        special, _ = special_tokens(token_model.model_bytes())
    else:
        special = copy_source_tokenizer(Path(run_dir), None)[1]
    hf_settings = hf_config(model, special, DTYPES[dtype][1])  # before reading weights: rejects a GQA gpt2
    adapters: dict[str, torch.Tensor] | None = {} if adapter else None
    state, tag = lm_state_dict(run_dir, model, step, adapters)  # refuses a reward model
    weights = {k: v.to(DTYPES[dtype][0]) for k, v in to_hf(state, model).items()}

    staging = _staging_dir(Path(output))
    try:
        files = save_safetensors(weights, staging, max_shard_bytes, {"lmforge_checkpoint": tag})
        (staging / "config.json").write_text(json.dumps(hf_settings, indent=2) + "\n")
        (staging / "generation_config.json").write_text(json.dumps(generation_config(model, special), indent=2) + "\n")
        files += ["config.json", "generation_config.json"]
        if token_model is not None:
            files += write_hf_tokenizer(token_model.model_bytes(), staging, model.max_seq_len)
        else:
            files += copy_source_tokenizer(Path(run_dir), staging)[0]
        shared = list(files)
        if adapters is not None:
            written = write_peft_adapter(adapters, model, lora, Path(output).resolve(), staging / ADAPTER_DIR, DTYPES[dtype][0])
            shared += [f"{ADAPTER_DIR}/{name}" for name in written]
            files.append(ADAPTER_DIR)
        for name in shared:  # safetensors writes owner-only files; a model directory is for sharing
            (staging / name).chmod(0o644)
        ownership.write_owner(staging, "export", "export-hf", checkpoint=str(Path(run_dir) / "checkpoints" / tag), files=files)
        _move_into_place(staging, Path(output))
    except Exception as err:  # OSError, torch's RuntimeError or safetensors' own error on a full disk
        if not is_out_of_space(err):
            raise
        needed = sum(v.numel() * v.element_size() for v in weights.values())
        raise LmforgeError(f"--output {output}: {describe_space(Path(output).parent, needed)}; the partial export was "
                           "removed and nothing else was changed; free space or choose another --output") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"exported {Path(run_dir) / 'checkpoints' / tag} ({model.arch}, {sum(v.numel() for v in weights.values()) / 1e6:.2f}M "
          f"parameters, {dtype}) to {output}: {', '.join(files)}", flush=True)
    return files


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    export(args.checkpoint, args.output, args.step, args.dtype, args.tokenizer, args.max_shard_size, args.overwrite,
           args.adapter)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
