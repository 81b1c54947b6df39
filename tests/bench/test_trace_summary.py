"""bench/trace_summary.py reads a real torch.profiler trace: GPU busy/idle, waits, and host time by function."""
import gzip
import json

import torch
from torch.profiler import ProfilerActivity, profile

from bench.trace_summary import self_times, summarise, union_length


def test_union_length_merges_overlaps():
    assert union_length([(0, 10), (5, 15), (20, 30), (21, 22)]) == 25


def test_self_time_is_inclusive_minus_children():
    events = [
        {"name": "outer", "ts": 0, "dur": 100, "pid": 1, "tid": 1},
        {"name": "inner at 0x7f00", "ts": 10, "dur": 30, "pid": 1, "tid": 1},
        {"name": "inner at 0x7f01", "ts": 50, "dur": 20, "pid": 1, "tid": 1},
        {"name": "other thread", "ts": 0, "dur": 40, "pid": 1, "tid": 2},
    ]
    got = self_times(events)
    assert got == {"outer": 50, "inner": 50, "other thread": 40}


def test_summary_of_a_real_trace_names_the_hot_python_function(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    optimizer = torch.optim.AdamW(model.parameters())
    with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
        for _ in range(3):
            model(torch.randn(4, 32)).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
    plain = tmp_path / "t.json"
    prof.export_chrome_trace(str(plain))
    packed = tmp_path / "t.json.gz"
    with gzip.open(packed, "wt") as f:
        f.write(plain.read_text())
    assert json.loads(plain.read_text())["traceEvents"]
    text = summarise(packed, steps=3, top=40)
    assert text.startswith("t.json.gz: 3 steps, wall ")
    assert "GPU busy 0.00 ms/step" in text  # a CPU trace: no kernels
    assert "--- python functions, host self time" in text
    assert "torch/optim/adamw.py" in text or "torch/optim/adam.py" in text
    assert "aten::addmm" in text or "aten::linear" in text
