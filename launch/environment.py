"""The environment a launch hands to its ranks: TORCH_CUDA_ARCH_LIST and DeepSpeed's env file.

DeepSpeed's JIT op builder parses TORCH_CUDA_ARCH_LIST as numbers, so the '9.0a' that Hopper
images set crashes it; `lmforge.distributed.normalise_cuda_arch_list` rewrites it ('9.0a' ->
'9.0') and preflight prints the export line for shell launchers. For multi-node launches
DeepSpeed forwards only PYTHON*, NCCL*, UCX*, MV2* and MLFLOW* variables plus the KEY=VALUE lines
of `.deepspeed_env` (in the working directory or ~, or the file DS_ENV_FILE names);
`write_deepspeed_env` writes such a file with the user's own lines and the variables below.
"""
from __future__ import annotations

import os
import re
import shlex
from pathlib import Path
from typing import Iterable, Mapping

from lmforge.distributed import normalise_cuda_arch_list
from lmforge.files import write_atomic

ARCH_LIST = "TORCH_CUDA_ARCH_LIST"
_ARCH = re.compile(r"^\d+\.\d+(\+PTX)?$")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# Set on the launching node, needed on every node, not forwarded by DeepSpeed by itself:
# PATH finds the venv's ninja for JIT builds; the rest steer CUDA, caches and threads.
FORWARDED = ("PATH", "LD_LIBRARY_PATH", "CUDA_HOME", ARCH_LIST, "TORCH_EXTENSIONS_DIR", "TRITON_CACHE_DIR",
             "HF_HOME", "OMP_NUM_THREADS")


def normalised_arch_list() -> tuple[str | None, str | None, list[str]]:
    """(value as set, value DeepSpeed can parse, problems); sets os.environ to the parsable value."""
    before = os.environ.get(ARCH_LIST)
    if not before:
        return None, None, []
    normalise_cuda_arch_list()
    after = os.environ[ARCH_LIST]
    bad = [part for part in after.split(";") if not _ARCH.match(part)]
    problems = [f"{ARCH_LIST} = {before!r}: {', '.join(map(repr, bad))} is not an arch like '8.0', '9.0' or '9.0+PTX'"] if bad else []
    return before, after, problems


def export_lines(arch_list: str | None, deepspeed_env_file: Path | None) -> list[str]:
    """`export NAME=VALUE` lines for shell launchers to eval."""
    lines = [f"export {ARCH_LIST}={shlex.quote(arch_list)}"] if arch_list else []
    if deepspeed_env_file is not None:
        lines.append(f"export DS_ENV_FILE={shlex.quote(str(deepspeed_env_file))}")
    return lines


def user_deepspeed_env_files() -> list[Path]:
    """The .deepspeed_env files DeepSpeed would read by itself (home first, then the working directory)."""
    found = []
    for folder in (Path.home(), Path.cwd()):
        path = folder / ".deepspeed_env"
        if path.is_file() and path.resolve() not in [p.resolve() for p in found]:
            found.append(path)
    return found


def read_deepspeed_env(path: Path) -> tuple[dict[str, str], list[str]]:
    """KEY=VALUE lines of a .deepspeed_env file, and its problems (DeepSpeed crashes on a blank line)."""
    values, problems = {}, []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        key, sep, value = line.partition("=")
        if not sep or not _NAME.match(key.strip()):
            problems.append(f"{path}:{number}: {line!r}: expected NAME=VALUE (no blank or comment lines: DeepSpeed's runner fails on them)")
        else:
            values[key.strip()] = value.strip()
    return values, problems


def deepspeed_env(environ: Mapping[str, str], extra_names: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    """Variables for DeepSpeed's env file: the user's .deepspeed_env lines, then FORWARDED and extra_names."""
    values: dict[str, str] = {}
    problems: list[str] = []
    for path in user_deepspeed_env_files():
        found, bad = read_deepspeed_env(path)
        values.update(found)
        problems += bad
    for name in (*FORWARDED, *extra_names):
        if not _NAME.match(name):
            problems.append(f"--export {name!r}: not an environment variable name")
        elif name in environ:
            values[name] = environ[name]
    for name, value in values.items():
        if "\n" in value or '"' in value:
            problems.append(f"{name}: its value holds a newline or '\"', which DeepSpeed's runner cannot forward")
    return values, problems


def write_deepspeed_env(path: Path, values: Mapping[str, str]) -> None:
    """Writes KEY=VALUE lines atomically (temp + rename), in DeepSpeed's .deepspeed_env format."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "".join(f"{key}={value}\n" for key, value in values.items()))
