"""Run by test_train_host_syncs.py: counts the device values the host reads while lmforge's Trainer
queues each optimizer step (forward, backward, DeepSpeed's step), and prints them as JSON.

One read is by design and not counted: `GuardedStep._resolve` reading the flags of the step before
(on a GPU a pinned host copy, after that step's CUDA event, while this step's backward runs); the
probe reports how many steps each such read looked back.

Every read of a device value into Python (`.item()`, `float()`, `bool()`, `.tolist()`) reaches
aten's `_local_scalar_dense` or `is_nonzero`; on a GPU each one waits for the GPU to finish. Explicit
waits (DeepSpeed's accelerator `synchronize()`, e.g. its throughput timer's, and `torch.cuda.synchronize`)
read no value: they are counted apart, as `device_syncs_per_step` (on a CPU the accelerator's call is a
no-op, but it is still made)."""
from __future__ import annotations

import json
import sys

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from lmforge import distributed
from pretrain.config import load_pretrain_config
from pretrain.train import Trainer, prepare

ATEN_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default}
PYTHON_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__,
                torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.numpy}


PAUSED = {"on": False}


class AtenReads(TorchDispatchMode):
    """Reads made inside operators (C++ `.item()`), and those of the Python methods below them."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in ATEN_READS and not PAUSED["on"]
        return func(*args, **(kwargs or {}))


class PythonReads(TorchFunctionMode):
    """`.tolist()` and friends of CPU tensors never reach an aten read: counted here."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += func in PYTHON_READS and not PAUSED["on"]
        return func(*args, **(kwargs or {}))


def count_device_syncs() -> dict[str, int]:
    """Counts DeepSpeed's accelerator synchronize() and torch.cuda.synchronize() calls while not PAUSED."""
    from deepspeed.accelerator import get_accelerator

    calls = {"n": 0}
    accelerator = get_accelerator()
    for owner, name in ((accelerator, "synchronize"), (torch.cuda, "synchronize")):
        original = getattr(owner, name)

        def counted(*args, _original=original, **kwargs):
            calls["n"] += not PAUSED["on"]
            return _original(*args, **kwargs)

        setattr(owner, name, counted)
    return calls


def main(argv: list[str]) -> None:
    config = load_pretrain_config("tiny", [item for item in argv if item != "--set"])
    trainer = Trainer(prepare(config, 1), distributed.init_distributed())
    syncs = count_device_syncs()
    sync_counts: list[int] = []
    counts: list[int] = []
    looked_back: list[int] = []
    queue_step, resolve = trainer.guarded.step, trainer.guarded._resolve

    queuing = {"step": None}

    def resolve_uncounted(pending):  # steps between the one being queued (if any) and the one read
        looked_back.append(0 if queuing["step"] is None else queuing["step"] - pending.step_number)
        PAUSED["on"] = True
        try:
            return resolve(pending)
        finally:
            PAUSED["on"] = False

    def counted(*args, **kwargs):
        queuing["step"] = args[1]
        before = syncs["n"]
        with PythonReads() as python_reads, AtenReads() as aten_reads:
            pending = queue_step(*args, **kwargs)
        queuing["step"] = None
        counts.append(python_reads.count + aten_reads.count)
        sync_counts.append(syncs["n"] - before)
        return pending

    trainer.guarded.step = counted
    trainer.guarded._resolve = resolve_uncounted
    last = trainer.run()
    print(json.dumps({"reads_per_step": counts, "device_syncs_per_step": sync_counts,
                      "on_device": trainer.guarded.on_device, "loss": last.get("loss"),
                      "flags_read_steps_back": looked_back}))
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
