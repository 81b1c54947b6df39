"""DeepSpeed hostfiles (`worker-0 slots=8` lines) and the ranks a launch selects from them.

`read_hostfile` accepts what DeepSpeed's runner accepts (a host name, whitespace, `slots=N`;
blank lines and `#` comment lines skipped; text after `slots=N` ignored, as DeepSpeed does) and
reports every bad line with its number instead of DeepSpeed's one ValueError at launch.
`select_slots` applies `--include/--exclude/--num_nodes/--num_gpus` with DeepSpeed's meanings,
so preflight counts the same world size the runner will start (tests/launch/test_hostfile.py
checks the two agree).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import LmforgeError

_LINE = re.compile(r"^(\S+)\s+slots=(\d+)(?:\s|$)")


@dataclass(frozen=True)
class Hostfile:
    path: Path
    slots: dict[str, int]
    """Slots (GPUs) per host, in file order: rank 0 runs on the first host."""

    @property
    def total_slots(self) -> int:
        return sum(self.slots.values())


def read_hostfile(path: Path) -> tuple[Hostfile | None, list[str]]:
    """The hostfile at `path` and the problems found in it (each `path:line: ...`)."""
    if not path.is_file():
        return None, [f"--hostfile {path}: file not found (one `HOST slots=N` line per node; see launch/hostfile.example)"]
    slots: dict[str, int] = {}
    problems = []
    for number, raw in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _LINE.match(line)
        if match is None:
            problems.append(f"{path}:{number}: {line!r}: expected 'HOST slots=N', e.g. 'worker-0 slots=8'")
        elif match.group(1) in slots:
            problems.append(f"{path}:{number}: host {match.group(1)!r} is listed twice; DeepSpeed refuses duplicate hosts")
        elif int(match.group(2)) < 1:
            problems.append(f"{path}:{number}: {line!r}: slots must be at least 1")
        else:
            slots[match.group(1)] = int(match.group(2))
    if not slots and not problems:
        problems.append(f"{path}: no 'HOST slots=N' lines; DeepSpeed needs at least one host")
    return (Hostfile(path, slots) if not problems else None), problems


def _parse_spec(spec: str, option: str) -> dict[str, list[int]]:
    """'worker-0@worker-1:0,2' -> {'worker-0': [], 'worker-1': [0, 2]} (empty list: every slot)."""
    nodes: dict[str, list[int]] = {}
    for node in spec.split("@"):
        host, _, slot_list = node.partition(":")
        try:
            slots = [int(s) for s in slot_list.split(",")] if slot_list else []
        except ValueError:
            raise LmforgeError(f"{option} {spec!r}: expected HOST[:SLOT,SLOT...][@HOST...], e.g. 'worker-0@worker-1:0,1'") from None
        nodes.setdefault(host, []).extend(slots)
    return {host: sorted(set(slots)) for host, slots in nodes.items()}


def select_slots(hostfile: Hostfile, include: str = "", exclude: str = "", num_nodes: int = -1,
                 num_gpus: int = -1) -> dict[str, list[int]]:
    """The slots DeepSpeed's runner uses for these options: {host: [slot, ...]} in hostfile order."""
    if include and exclude:
        raise LmforgeError("--include and --exclude are mutually exclusive (DeepSpeed's rule)")
    if (include or exclude) and (num_nodes > 0 or num_gpus > 0):
        raise LmforgeError("--num_nodes/--num_gpus cannot be combined with --include/--exclude (DeepSpeed's rule)")
    active = {host: list(range(n)) for host, n in hostfile.slots.items()}
    option, spec = ("--include", include) if include else ("--exclude", exclude)
    if spec:
        chosen: dict[str, list[int]] = {} if include else {h: list(s) for h, s in active.items()}
        for host, slots in _parse_spec(spec, option).items():
            if host not in active:
                raise LmforgeError(f"{option} {spec!r}: host {host!r} is not in {hostfile.path} (hosts: {', '.join(active)})")
            missing = [s for s in slots if s not in active[host]]
            if missing:
                raise LmforgeError(f"{option} {spec!r}: {host} has slots 0-{len(active[host]) - 1} in {hostfile.path}, not {missing}")
            if include:
                chosen[host] = slots or active[host]
            else:
                chosen[host] = [s for s in chosen[host] if s not in slots] if slots else []
        active = {h: chosen[h] for h in active if chosen.get(h)}
    if num_nodes > 0:
        active = dict(list(active.items())[:num_nodes])
    if num_gpus > 0:
        active = {host: list(range(num_gpus)) for host in active}
    if not active:
        raise LmforgeError(f"{option} {spec!r} leaves no slots of {hostfile.path} to run on")
    return active
