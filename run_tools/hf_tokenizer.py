"""lmforge's sentencepiece tokenizer as files `AutoTokenizer.from_pretrained(DIR)` loads, giving the same ids.

Our sentencepiece model is BPE with the identity normaliser, no dummy prefix and byte fallback, and
`Tokenizer.encode` spells a literal U+2581 ("▁") as its three UTF-8 byte pieces. HF's Llama
conversion (normaliser: ' ' -> '▁', prepend '▁') cannot tell a literal '▁' from a space and adds a
prefix space. So `tokenizer.json` is built here instead, with the `tokenizers` library:

- the BPE vocabulary is sentencepiece's pieces with '▁' written as ' ' (no normaliser, no
  pre-tokeniser), so spaces match directly and a literal '▁' is unknown and falls back to bytes;
- merges are every split of a normal piece into two normal pieces, ranked by the merged piece's
  sentencepiece score (BPE applies the best-scoring merge first in both libraries);
- byte fallback on, decoder ByteFallback + Fuse (no space stripping);
- sentencepiece's control pieces (<pad>, <s>, </s>) and <unk> are special tokens, user-defined
  symbols are added tokens; `split_special_tokens` makes '<s>' in text encode as text, as ours does.

`tokenizer.model` is copied too, for tools that read sentencepiece (llama.cpp's converter).

A run made by `lmforge import-hf` keeps the source model's own tokenizer files in
RUN_DIR/hf_tokenizer/ (with special_ids.json, the ids its config.json named); export copies them
back unchanged, so import -> export returns the tokenizer it was given.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Mapping

from lmforge.run_layout import SOURCE_TOKENIZER_DIR
from run_tools.hf_mapping import SpecialTokens

SPACE = "\u2581"
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPECIAL_IDS_FILE = "special_ids.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")


def _model_proto(model_bytes: bytes):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_bytes)
    return proto


def build_tokenizer_json(model_bytes: bytes):
    """A `tokenizers.Tokenizer` that encodes and decodes like lmforge's Tokenizer on this model."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    proto = _model_proto(model_bytes)
    vocab: dict[str, int] = {}
    normal: dict[str, int] = {}
    for token_id, piece in enumerate(proto.pieces):
        text = piece.piece.replace(SPACE, " ") if piece.type in (NORMAL, USER_DEFINED) else piece.piece
        vocab[text] = token_id
        if piece.type == NORMAL:
            normal[text] = token_id
    ranked = []
    for text, token_id in normal.items():
        for cut in range(1, len(text)):
            left, right = text[:cut], text[cut:]
            if left in normal and right in normal:
                ranked.append((token_id, normal[left], normal[right], left, right))
    ranked.sort()  # ids follow sentencepiece's score order: a lower id merges first
    unk = proto.pieces[proto.trainer_spec.unk_id].piece
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[(l, r) for *_, l, r in ranked], unk_token=unk,
                                     byte_fallback=True, fuse_unk=True))
    tokenizer.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    tokenizer.add_special_tokens([AddedToken(p.piece, special=True, normalized=False)
                                  for p in proto.pieces if p.type in (CONTROL, UNKNOWN)])
    user = [AddedToken(p.piece.replace(SPACE, " "), special=False, normalized=False)
            for p in proto.pieces if p.type == USER_DEFINED]
    if user:
        tokenizer.add_tokens(user)
    return tokenizer


def special_tokens(model_bytes: bytes) -> tuple[SpecialTokens, dict[str, str]]:
    """Special ids, and their pieces by HF role (bos_token, eos_token, unk_token, pad_token)."""
    proto = _model_proto(model_bytes)
    spec = proto.trainer_spec
    ids = {"bos_token": spec.bos_id, "eos_token": spec.eos_id, "unk_token": spec.unk_id, "pad_token": spec.pad_id}
    pieces = {role: proto.pieces[i].piece for role, i in ids.items() if 0 <= i < len(proto.pieces)}
    return SpecialTokens(bos_id=spec.bos_id, eos_id=spec.eos_id, pad_id=spec.pad_id), pieces


def write_hf_tokenizer(model_bytes: bytes, output_dir: Path, model_max_length: int) -> list[str]:
    """Writes tokenizer.json, tokenizer_config.json, special_tokens_map.json, tokenizer.model; returns their names."""
    _, pieces = special_tokens(model_bytes)
    build_tokenizer_json(model_bytes).save(str(output_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **pieces,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": True,
        "model_max_length": model_max_length,
    }
    (output_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (output_dir / "special_tokens_map.json").write_text(json.dumps(pieces, indent=2) + "\n")
    (output_dir / "tokenizer.model").write_bytes(model_bytes)
    return ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"]


def keep_source_tokenizer(model_dir: Path, hf_config: Mapping[str, Any], run_dir: Path) -> list[str]:
    """Copies an HF model's tokenizer files to RUN_DIR/hf_tokenizer/ (import side); returns their names."""
    names = [name for name in TOKENIZER_FILES if (model_dir / name).is_file()]
    if not names:
        return []
    target = run_dir / SOURCE_TOKENIZER_DIR
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copyfile(model_dir / name, target / name)
    special = {key: hf_config.get(key) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    (target / SPECIAL_IDS_FILE).write_text(json.dumps(special, indent=2) + "\n")
    return names


def has_source_tokenizer(run_dir: Path) -> bool:
    """True when an imported run kept HF tokenizer files that can be shipped as they are."""
    source = run_dir / SOURCE_TOKENIZER_DIR
    return (source / "tokenizer.json").is_file() or (source / "vocab.json").is_file()


def copy_source_tokenizer(run_dir: Path, output_dir: Path | None) -> tuple[list[str], SpecialTokens]:
    """Copies RUN_DIR/hf_tokenizer/ into an export (None: copies nothing); returns the names and special ids."""
    source = run_dir / SOURCE_TOKENIZER_DIR
    names = [name for name in TOKENIZER_FILES if (source / name).is_file()]
    for name in names if output_dir is not None else ():
        shutil.copyfile(source / name, output_dir / name)
    try:
        ids = json.loads((source / SPECIAL_IDS_FILE).read_text())
    except (OSError, ValueError):
        ids = {}
    special = SpecialTokens(bos_id=ids.get("bos_token_id"), eos_id=ids.get("eos_token_id"), pad_id=ids.get("pad_token_id"))
    return names, special
