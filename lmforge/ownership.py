"""Which folders lmforge may replace or delete: only those it made, of the kind the command makes.

Every folder a command creates (a run, a post-training run, an HF export, shards, a tokenizer)
gets OWNER_FILE, a small JSON marker written atomically at creation: its kind, the verb, when, and
the lmforge version. Before a command writes anything it calls `check_output`, which refuses in one
line (LmforgeError):
- an output that is, holds or is inside one of the command's inputs (export-hf --output RUN, a
  post-training run.dir equal to init.from_run, a run.dir holding data.path, ...);
- a folder made by lmforge for another kind (an export into a run, sft into a pretraining run, dpo
  into an sft run);
- a folder holding files lmforge did not write (a user's config.yaml, an orphan metrics.jsonl).
Folders made before markers existed are recognised by their files (`legacy_kind`): a run has a
config.yaml with a model section and a checkpoint; shards a manifest and the tokenizer copy; a
tokenizer its tokenizer.json record; an export safetensors weights that name an lmforge
checkpoint. Such a folder is adopted (its marker written) by `claim`. docs/reliability.md.
"""
from __future__ import annotations

import json
import os
import socket
import struct
import time
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Mapping

from lmforge.errors import LmforgeError
from lmforge.files import write_atomic
from lmforge.run_layout import DEEPSPEED_ENV_FILE, LOCK_FILE, OWNER_FILE

Kind = Literal["run", "posttrain-run", "export", "shards", "tokenizer", "alignment-table", "bench-trace"]
KINDS: tuple[str, ...] = ("run", "posttrain-run", "export", "shards", "tokenizer", "alignment-table", "bench-trace")
DESCRIPTION = {"run": "a pretraining run directory", "posttrain-run": "a post-training run directory",
               "export": "a Hugging Face export", "shards": "a shard directory", "tokenizer": "a tokenizer directory",
               "alignment-table": "the alignment table's folder (python -m posttrain.alignment_table)",
               "bench-trace": "a folder of profiler traces (python -m bench.train_throughput --trace)"}
# Transient files lmforge itself leaves for an instant (write probes, atomic-write temps) or keeps (lock,
# marker), and DeepSpeed's environment file `lmforge preflight --deepspeed-env` writes before the run starts.
_OURS_PREFIXES = (".write_probe", ".write-probe-", OWNER_FILE, LOCK_FILE, DEEPSPEED_ENV_FILE)


def lmforge_version() -> str:
    try:
        from importlib.metadata import version

        return version("lmforge")
    except Exception:  # not installed (PYTHONPATH checkout): the version is unknown, not an error
        return "unknown"


def _is_ours_transient(name: str) -> bool:
    return name.startswith(_OURS_PREFIXES) or (name.startswith(".") and ".tmp" in name)


def user_entries(folder: Path) -> list[str]:
    """The entries of `folder` that are not lmforge's own marker, lock, probe or temp files (sorted)."""
    try:
        return sorted(p.name for p in Path(folder).iterdir() if not _is_ours_transient(p.name))
    except OSError:
        return []


def read_owner(folder: Path) -> dict[str, Any] | None:
    """The marker of `folder` (None when it has none or it is unreadable: then it is judged by its files)."""
    try:
        data = json.loads((Path(folder) / OWNER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("kind") in KINDS else None


def _safetensors_metadata(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            size = struct.unpack("<Q", handle.read(8))[0]
            if size > 100_000_000:
                return {}
            return json.loads(handle.read(size)).get("__metadata__") or {}
    except (OSError, ValueError, struct.error, AttributeError):
        return {}


def _has_complete(checkpoints: Path) -> bool:
    try:
        return any((p / "COMPLETE").is_file() for p in checkpoints.iterdir())
    except OSError:
        return False


def legacy_kind(folder: Path) -> str | None:
    """The kind of an lmforge folder made before markers existed, recognised by its files; None if not one."""
    folder = Path(folder)
    config = folder / "config.yaml"
    checkpoints = folder / "checkpoints"
    if config.is_file() and checkpoints.is_dir() and ((checkpoints / "latest").is_file() or _has_complete(checkpoints)):
        try:
            import yaml

            data = yaml.safe_load(config.read_text(encoding="utf-8"))
        except (OSError, ValueError, yaml.YAMLError):
            return None
        if isinstance(data, dict) and isinstance(data.get("model"), dict) and isinstance(data.get("run"), dict):
            return "posttrain-run" if "init" in data else "run"
        return None
    if (folder / "tokenizer.model").is_file() and (
            (folder / "manifest.json").is_file() or (folder / "manifest.partial.json").is_file()):
        return "shards"
    if (folder / "tokenizer.model").is_file() and (folder / "tokenizer.json").is_file():
        try:
            if "run_key" in json.loads((folder / "tokenizer.json").read_text(encoding="utf-8")):
                return "tokenizer"
        except (OSError, ValueError, TypeError):
            return None
    weights = sorted(folder.glob("model*.safetensors"))
    if (folder / "config.json").is_file() and weights and "lmforge_checkpoint" in _safetensors_metadata(weights[0]):
        return "export"
    return None


def kind_of(folder: Path) -> tuple[str | None, dict[str, Any] | None]:
    """(kind, marker) of an lmforge folder: from its marker, else from its files; (None, None) otherwise."""
    owner = read_owner(folder)
    if owner is not None:
        return owner["kind"], owner
    return legacy_kind(folder), None


def _named(label: str, path: Path | str) -> str:
    """'--output DIR' for a command-line option, 'run.dir = DIR' for a config key."""
    return f"{label} {path}" if label.startswith("-") else f"{label} = {path}"


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def _real(path: Path, resolve: Callable[[Path], Path]) -> Path:
    return Path(os.path.realpath(resolve(Path(path))))


def check_not_overlapping(output: Path, label: str, inputs: Mapping[str, Iterable[Path] | Path | None],
                          resolve: Callable[[Path], Path] = Path) -> None:
    """Refuses an output that is, holds or is inside one of the inputs (each named by its key or option)."""
    out = _real(output, resolve)
    for name, paths in inputs.items():
        if paths is None:
            continue
        for path in ([paths] if isinstance(paths, (str, Path)) else list(paths)):
            source = _real(Path(path), resolve)
            if out == source:
                how = "is"
            elif _inside(source, out):
                how = "holds"
            elif _inside(out, source):
                how = "is inside"
            else:
                continue
            raise LmforgeError(f"{_named(label, output)} {how} {_named(name, path)}: an output must not overlap an input "
                               "(it would be overwritten or deleted); choose another output directory")


def check_output(output: Path, kind: str, verb: str, label: str,
                 inputs: Mapping[str, Iterable[Path] | Path | None] | None = None,
                 resolve: Callable[[Path], Path] = Path) -> str | None:
    """Refuses, before anything is written, an output `verb` may not write (module docstring).

    Returns the kind the folder already has ("" for a new or empty folder), so the caller decides
    what its own earlier output means (resume, reuse, or replace only with --overwrite).
    """
    check_not_overlapping(output, label, inputs or {}, resolve)
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise LmforgeError(f"{_named(label, output)}: exists and is not a directory")
    if not output.is_dir():
        return ""
    found, owner = kind_of(output)
    if found is None and not user_entries(output):
        return ""
    if found is None:
        names = user_entries(output)
        listed = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise LmforgeError(f"{_named(label, output)}: exists and is not empty, with files lmforge did not write ({listed}); "
                           "nothing was changed: choose a new or empty directory")
    if found != kind:
        raise _other_kind(output, label, owner or {"kind": found}, kind)
    if kind == "posttrain-run" and owner is not None and owner.get("verb") not in (None, verb):
        raise LmforgeError(f"{_named(label, output)}: holds a '{owner['verb']}' run, not '{verb}'; nothing was changed: "
                           "use another run.dir")
    return found


def _other_kind(output: Path, label: str, owner: dict[str, Any], kind: str) -> LmforgeError:
    made_by = f" made by `lmforge {owner['verb']}`" if owner.get("verb") else ""
    return LmforgeError(f"{_named(label, output)}: is {DESCRIPTION[owner['kind']]}{made_by}, not {DESCRIPTION[kind]}; "
                        "nothing was changed: choose another directory")


def claim(folder: Path, kind: str, verb: str, **extra: Any) -> Path:
    """Creates `folder` (and parents) and writes its marker, atomically, unless it already has one."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if read_owner(folder) is None:
        write_owner(folder, kind, verb, **extra)
    return folder


def write_owner(folder: Path, kind: str, verb: str, **extra: Any) -> None:
    """Writes `folder`/OWNER_FILE (temp file + rename): what made the folder, when, on which host."""
    record = {"kind": kind, "verb": verb, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "host": socket.gethostname(), "lmforge_version": lmforge_version(), **extra}
    path = Path(folder) / OWNER_FILE
    try:
        write_atomic(path, json.dumps(record, indent=1) + "\n")
    except OSError as err:
        from lmforge.out_of_space import describe, is_out_of_space

        reason = describe(path.parent, 4096) if is_out_of_space(err) else f"cannot write ({err.strerror or err})"
        raise LmforgeError(f"{path}: {reason}; choose a writable location with free space") from None


def config_paths(config: Any, skip: tuple[str, ...] = ("run.dir",)) -> dict[str, list[Path]]:
    """Every Path-valued field of a (nested) config dataclass, by its dotted key: a command's inputs."""
    found: dict[str, list[Path]] = {}

    def walk(value: Any, key: str) -> None:
        if key in skip:
            return
        if is_dataclass(value):
            for item in fields(value):
                walk(getattr(value, item.name), f"{key}.{item.name}" if key else item.name)
        elif isinstance(value, Path):
            found[key] = [value]
        elif isinstance(value, (tuple, list)) and value and all(isinstance(v, Path) for v in value):
            found[key] = list(value)

    walk(config, "")
    return found
