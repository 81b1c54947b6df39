"""Where a training step's time goes, from a torch.profiler Chrome trace (`train_throughput.py --trace`).

    python -m bench.trace_summary runs/trace/loop-zero0.json.gz [--steps 5]

Prints, per profiled step: wall time, GPU busy time (the union of kernels, copies and sets) and GPU
idle time; the host's waits for the GPU (synchronize calls, blocking copies); CUDA launches; and the
Python functions and operators with the most host time (self and inclusive; the trace needs
`with_stack=True` for Python functions). A host-bound step shows GPU idle time with no wait on the
host: the host was busy with what the lists name.
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
from pathlib import Path

GPU_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}
WAITS = {"cudaStreamSynchronize", "cudaEventSynchronize", "cudaDeviceSynchronize", "cudaMemcpy"}  # cudaMemcpyAsync is a launch
LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cudaGraphLaunch", "cudaMemcpyAsync")


def load_events(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    return [e for e in events if e.get("ph") == "X" and "dur" in e]


def union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def _name(event: dict) -> str:
    """The event's name without object addresses (`<built-in method mul_ of Parameter object at 0x...>`)."""
    return re.sub(r" at 0x[0-9a-f]+", "", event["name"])


def self_times(events: list[dict]) -> collections.Counter:
    """Self time by name of nested host events on each thread (a parent's time minus its children's)."""
    result: collections.Counter = collections.Counter()
    by_thread: dict = collections.defaultdict(list)
    for e in events:
        by_thread[(e.get("pid"), e.get("tid"))].append(e)
    for items in by_thread.values():
        items.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[list] = []  # [end, name, child time]
        for e in items:
            start, end = e["ts"], e["ts"] + e["dur"]
            while stack and stack[-1][0] <= start:
                done = stack.pop()
                result[done[1]] += done[3] - done[2]
            if stack:
                stack[-1][2] += e["dur"]
            stack.append([end, _name(e), 0.0, e["dur"]])
        for done in stack:
            result[done[1]] += done[3] - done[2]
    return result


def summarise(path: Path, steps: int, top: int = 25) -> str:
    events = load_events(path)
    gpu = [e for e in events if e.get("cat") in GPU_CATEGORIES]
    host = [e for e in events if e.get("cat") not in GPU_CATEGORIES and e.get("cat") != "gpu_user_annotation"]
    if not events:
        return f"{path}: no events"
    start = min(e["ts"] for e in events)
    stop = max(e["ts"] + e["dur"] for e in events)
    wall = (stop - start) / 1e3
    busy = union_length([(e["ts"], e["ts"] + e["dur"]) for e in gpu]) / 1e3
    lines = [f"{path.name}: {steps} steps, wall {wall / steps:.2f} ms/step, GPU busy {busy / steps:.2f} ms/step, "
             f"GPU idle {(wall - busy) / steps:.2f} ms/step ({1 - busy / wall:.1%})"]
    runtime = [e for e in host if e.get("cat") in ("cuda_runtime", "cuda_driver")]
    waits = collections.Counter()
    counts = collections.Counter()
    for e in runtime:
        if e["name"] in WAITS:
            waits[e["name"]] += e["dur"]
        if e["name"].startswith(LAUNCHES):
            counts[e["name"]] += 1
    lines.append("host waits for the GPU (ms/step): " + (", ".join(
        f"{name} {us / 1e3 / steps:.2f}" for name, us in waits.most_common()) or "none"))
    lines.append("launches per step: " + ", ".join(f"{name} {n / steps:.0f}" for name, n in counts.most_common()))
    python = [e for e in host if e.get("cat") == "python_function"]
    ops = [e for e in host if e.get("cat") == "cpu_op"]
    for title, group in (("python functions", python), ("operators", ops)):
        if not group:
            continue
        inclusive: collections.Counter = collections.Counter()
        for e in group:
            inclusive[_name(e)] += e["dur"]
        lines.append(f"--- {title}, host self time (ms/step)")
        lines += [f"{us / 1e3 / steps:8.3f}  {name[:110]}" for name, us in self_times(group).most_common(top)]
        lines.append(f"--- {title}, host inclusive time (ms/step; nested calls counted in each)")
        lines += [f"{us / 1e3 / steps:8.3f}  {name[:110]}" for name, us in inclusive.most_common(top)]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("traces", nargs="+", type=Path)
    parser.add_argument("--steps", type=int, default=5, help="steps the trace holds")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    for path in args.traces:
        print(summarise(path, args.steps, args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
