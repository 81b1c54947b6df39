"""The JSONL inputs of post-training, read and checked line by line (docs/posttrain.md).

- SFT:        {"prompt": str, "response": str}  or  {"messages": [{"role", "content"}, ...]}
- preference: {"prompt": str | messages, "chosen": str, "rejected": str}
- PPO:        {"prompt": str | messages}

A bad line is a one-line LmforgeError naming the file and line number and the expected shape.
Keys other than these are ignored (datasets often carry ids or metadata). Blank lines are skipped.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from lmforge.errors import LmforgeError

ROLES = ("system", "user", "assistant")
SFT_SHAPE = '{"prompt": str, "response": str} or {"messages": [{"role": ..., "content": str}, ...]}'
PREFERENCE_SHAPE = '{"prompt": str or messages, "chosen": str, "rejected": str}'
PROMPT_SHAPE = '{"prompt": str or messages}'


@dataclass(frozen=True)
class Turn:
    role: str
    content: str


Prompt = str | tuple[Turn, ...]
"""Raw text to continue, or a conversation the assistant answers next."""


@dataclass(frozen=True)
class SFTExample:
    prompt: Prompt
    """Raw prompt text, or the whole conversation (its assistant turns are learned)."""
    response: str | None
    """The raw prompt's response; None for a conversation."""


@dataclass(frozen=True)
class PreferencePair:
    prompt: Prompt
    chosen: str
    rejected: str


class _BadLine(Exception):
    pass


def _text(record: dict, key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise _BadLine(f'"{key}" is {_kind(value)}, not a string')
    return value


def _kind(value: Any) -> str:
    return "missing or null" if value is None else f"a {type(value).__name__}"


def _turns(value: Any, key: str, last_role: str | None) -> tuple[Turn, ...]:
    if not isinstance(value, list) or not value:
        raise _BadLine(f'"{key}" must be a non-empty list of {{"role", "content"}} objects')
    turns = []
    for i, item in enumerate(value):
        if not isinstance(item, dict) or not isinstance(item.get("content"), str) or item.get("role") not in ROLES:
            raise _BadLine(f'"{key}"[{i}] must be {{"role": one of {", ".join(ROLES)}, "content": str}}, got {json.dumps(item)[:80]}')
        turns.append(Turn(item["role"], item["content"]))
    if last_role is not None and turns[-1].role != last_role:
        raise _BadLine(f'"{key}" must end with a {last_role} message, got {turns[-1].role}')
    return tuple(turns)


def _prompt(record: dict) -> Prompt:
    value = record.get("prompt")
    if isinstance(value, list):
        return _turns(value, "prompt", last_role="user")
    return _text(record, "prompt")


def parse_sft(record: dict) -> SFTExample:
    if "messages" in record:
        turns = _turns(record["messages"], "messages", last_role=None)
        if not any(t.role == "assistant" for t in turns):
            raise _BadLine('"messages" has no assistant message to learn')
        return SFTExample(turns, None)
    return SFTExample(_text(record, "prompt"), _text(record, "response"))


def parse_preference(record: dict) -> PreferencePair:
    return PreferencePair(_prompt(record), _text(record, "chosen"), _text(record, "rejected"))


def parse_prompt(record: dict) -> Prompt:
    return _prompt(record)


T = TypeVar("T")


def read_records(path: Path, parse: Callable[[dict], T], shape: str) -> list[tuple[str, T]]:
    """(line text, parsed record) for every non-blank line; the first bad line is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"{path}: file not found (expected JSONL, one {shape} per line)")
    out = []
    with open(path, encoding="utf-8", errors="strict") as handle:
        try:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    if not isinstance(record, dict):
                        raise _BadLine(f"a JSON {type(record).__name__}, not an object")
                    out.append((line, parse(record)))
                except json.JSONDecodeError as err:
                    raise LmforgeError(f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno}); expected {shape}") from None
                except _BadLine as err:
                    raise LmforgeError(f"{path}:{number}: {err}; expected {shape}") from None
        except UnicodeDecodeError as err:
            raise LmforgeError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if not out:
        raise LmforgeError(f"{path}: no records (expected JSONL, one {shape} per line)")
    return out


def is_held_out(line: str, fraction: float) -> bool:
    """True for the lines (by content hash) that form the valid split when no valid file is given."""
    digest = hashlib.blake2b(line.strip().encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") < fraction * 2**64


def split_records(
    train_path: Path, valid_path: Path | None, fraction: float, parse: Callable[[dict], T], shape: str
) -> tuple[list[T], list[T]]:
    """(train, valid) records: valid from its own file, else the hashed `fraction` of train."""
    records = read_records(train_path, parse, shape)
    if valid_path is not None:
        return [r for _, r in records], [r for _, r in read_records(valid_path, parse, shape)]
    train = [r for line, r in records if not is_held_out(line, fraction)]
    valid = [r for line, r in records if is_held_out(line, fraction)]
    if not train:
        raise LmforgeError(f"{train_path}: every record fell in the valid split; lower data.valid_fraction")
    return train, valid


def iter_jsonl(path: Path) -> Iterator[dict]:
    """Records of a JSONL file we wrote ourselves (demo outputs)."""
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)
