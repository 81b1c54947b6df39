"""One optimizer step that never applies a non-finite loss or gradient, and the limit on such steps.

Two ways to guard a step, chosen once per engine (`pretrain.ds_config.guards_on_device`):

- **On the device** (the default path: torch's fused AdamW from the JSON's
  `"torch_adam": true, "fused": true`, bf16 autocast or fp32, ZeRO 0-3 without offload, no
  pipeline). Nothing waits for the GPU. At the accumulation boundary the ranks all-reduce, as one
  device collective, a flag for a non-finite loss and the preemption flag; the gradient norm
  (lmforge's own clipping at ZeRO-0, DeepSpeed's at ZeRO 1-3, already global) gives the gradient
  flag. Their OR goes to the fused optimizer as `found_inf`: torch's fused Adam then leaves the
  weights, moments and step count untouched, on the device. The host reads the flags one step later
  (a non-blocking copy and a CUDA event): then a skipped step is counted (`engine.skipped_steps`),
  the LR schedule is stepped back before the next update (so it did not advance, as before) and
  `train.max_bad_steps` is applied. DeepSpeed's own host-side check of the norm
  (`is_invalid_grad_norm`, a host synchronisation every step) is switched off for these steps only.
- **On the host** (fp16 loss scaling, pipelines, offload, DeepSpeed's bf16 ZeRO-0 optimizer or any
  other optimizer): the flags are read right away, one synchronisation per step. DeepSpeed's ZeRO
  and bf16/fp16 optimizers skip a step whose norm is inf/NaN themselves (`check_grad_overflow` on);
  for a plain torch optimizer we inspect the gradients and run DeepSpeed's step with the optimizer's
  `step` replaced by a no-op and `overflow` set.

A skipped step still consumes its batch: the data order stays a function of the step. With a loss
scaler, overflow skips are normal: counted in skipped_steps, but only a non-finite loss counts
towards `train.max_bad_steps`. `settle()` reads every pending step; the loop calls it wherever it
logs, evaluates or saves, so checkpoints and metrics never see an unread step and a resumed run
repeats the uninterrupted one exactly.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch

from lmforge import distributed
from lmforge.errors import LmforgeError
from pretrain import faults


@dataclass(frozen=True)
class StepOutcome:
    loss: torch.Tensor
    """Mean loss of this rank's micro-batches (device tensor; NaN for a bad step)."""
    applied: bool
    """DeepSpeed applied the update (False: skipped, weights unchanged)."""
    bad: bool
    """Skipped because a loss or gradient was not finite (counts towards train.max_bad_steps)."""
    stop: bool
    """Some rank received a preemption signal: checkpoint and stop after this step."""


@dataclass
class PendingStep:
    """A step whose flags may still be on their way to the host."""

    step_number: int
    loss: torch.Tensor
    skipped: torch.Tensor
    """Device bool: the update was not applied (for loss averages without reading the flags)."""
    flags: torch.Tensor
    """(loss non-finite on some rank, gradients non-finite, stop requested on some rank): host copy."""
    ready: Any = None
    """CUDA event after the copy of `flags`, or None when they are already on the host."""
    outcome: StepOutcome | None = None
    """Known at once on the host path."""


@contextmanager
def _suppressed_optimizer_step(optimizer) -> Iterator[None]:
    """DeepSpeed's engine.step() runs as on an fp16 overflow: no update, counted as skipped."""
    optimizer.step = lambda *args, **kwargs: None
    optimizer.overflow = True
    try:
        yield
    finally:
        del optimizer.step
        del optimizer.overflow


@contextmanager
def _deepspeed_host_norm_check_off() -> Iterator[None]:
    """DeepSpeed's ZeRO optimizers read the gradient norm back on the host in every step: to test
    it (`is_invalid_grad_norm`, a bool of a device tensor) and to mask it
    (`mask_nan_or_inf_with_val_inplace` fills from a tensor built on the device from a Python
    number). With the device guard the fused optimizer's `found_inf` decides, so for these steps the
    test answers False and the mask fills from a Python scalar; the norm stays inf/NaN (or -1 after
    the mask), which found_inf catches."""
    from deepspeed.runtime.zero import stage3, stage_1_and_2

    def never_on_host(norm) -> bool:
        return False if torch.is_tensor(norm) else original_test(norm)

    def mask_on_device(input, device=None, val=-1.0):
        input.masked_fill_(~torch.isfinite(input), val)

    replaced = {"is_invalid_grad_norm": never_on_host, "mask_nan_or_inf_with_val_inplace": mask_on_device}
    saved = [(m, name, getattr(m, name)) for m in (stage_1_and_2, stage3) for name in replaced if hasattr(m, name)]
    original_test = next((f for _, name, f in saved if name == "is_invalid_grad_norm"), lambda norm: False)
    for module, name, _ in saved:
        setattr(module, name, replaced[name])
    try:
        yield
    finally:
        for module, name, original in saved:
            setattr(module, name, original)


def _use_foreach_norm_at_one_rank(zero) -> None:
    """A ZeRO-1/2 optimizer over one rank without model parallelism gets the gradient norm of each
    group in one foreach call: DeepSpeed's `get_grad_norm_direct` runs an fp64 norm per tensor (196
    for gpt2-124m) and two all-reduces over one rank, ~1 ms of host time per step
    (bench/host_overhead.py). The same per-tensor norms (DeepSpeed's norm dtype), summed as it sums them."""
    from deepspeed.runtime.zero import stage_1_and_2
    from deepspeed.runtime.zero.utils import get_norm_dtype

    if type(zero) is not stage_1_and_2.DeepSpeedZeroOptimizer or zero.model_parallel_world_size != 1:
        return
    if any(count != 1 for count in zero.partition_count):  # DeepSpeed's ranks per partitioned group
        return

    def foreach_grad_norm(gradients, params, norm_type=2):
        grads = [g for g in gradients if not getattr(g, "_zero_padding", False)]
        if norm_type != 2 or any(getattr(p, "ds_pipe_replicated", False) for p in params):
            return stage_1_and_2.DeepSpeedZeroOptimizer.get_grad_norm_direct(zero, gradients, params, norm_type)
        if grads:
            total = torch.stack(torch._foreach_norm(grads, 2, dtype=get_norm_dtype())).pow(2).sum().float().pow(0.5)
        else:
            total = torch.zeros((), dtype=torch.float32, device=zero.device)
        stage_1_and_2.mask_nan_or_inf_with_val_inplace(total, device=zero.device)  # the guard's device version
        return total

    zero.get_grad_norm_direct = foreach_grad_norm


def _gradient_check(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(all gradients finite, their global L2 norm before clipping; None without gradients)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return torch.ones((), dtype=torch.bool), None
    norms = torch.stack(torch._foreach_norm(grads))
    return torch.isfinite(norms).all(), torch.linalg.vector_norm(norms)


def micro_batch_loss(engine, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The engine's loss on (inputs, targets) or (inputs, targets, segment_ids) (data.document_masking)."""
    if len(batch) == 3:
        return engine(batch[0], batch[1], segment_ids=batch[2])
    return engine(batch[0], batch[1])


class GuardedStep:
    """Runs optimizer steps on a DeepSpeed engine; raises LmforgeError after too many bad ones in a row."""

    def __init__(self, engine, max_bad_steps: int, fp16: bool, on_device: bool = False, grad_clip: float = 0.0):
        """`fp16`: a dynamic loss scaler is at work (its overflow skips are not bad steps).
        `on_device`: guard through the fused optimizer's found_inf (see the module docstring);
        `grad_clip`: the clipping lmforge applies itself at ZeRO-0 on that path (DeepSpeed's is off)."""
        self.engine, self.max_bad_steps, self.fp16 = engine, max_bad_steps, fp16
        self.on_device = on_device and not fp16
        self.grad_clip = grad_clip
        optimizer = engine.optimizer
        self.checks_gradients_itself = not hasattr(optimizer, "overflow")
        if self.on_device:
            self._basic = engine.basic_optimizer
            self._zero = optimizer is not self._basic  # a ZeRO optimizer wraps the fused torch one
            # The weights that can have gradients, listed once: module.parameters() walks every submodule (host time each step).
            self._trained = [p for p in engine.module.parameters() if p.requires_grad]
            if self._zero:
                optimizer.check_grad_overflow = False
                self._wrap_basic_step()
                _use_foreach_norm_at_one_rank(optimizer)
        elif hasattr(optimizer, "check_grad_overflow"):
            optimizer.check_grad_overflow = True
        self.consecutive_bad = 0
        self.first_bad_step: int | None = None
        self.last_grad_norm: torch.Tensor | None = None
        self._pending: list[PendingStep] = []
        self._settled: list[tuple[int, StepOutcome]] = []
        self.last_lr: float | None = None
        """The lr the newest step updated with (DeepSpeed's get_lr() afterwards is the next step's)."""
        self._loss_bad: torch.Tensor | None = None
        self._grad_bad: torch.Tensor | None = None

    # -- the device path -------------------------------------------------------------------------

    def _wrap_basic_step(self) -> None:
        """Before each ZeRO sub-group update: found_inf = a loss flag or a non-finite global norm."""
        basic, zero, original = self._basic, self.engine.optimizer, self._basic.step

        def step_unless_bad(*args, **kwargs):
            norm = zero._global_grad_norm
            if torch.is_tensor(norm) and self._grad_bad is None:  # -1: DeepSpeed's mark of an inf/NaN norm
                self._grad_bad = ~torch.isfinite(norm.reshape(())) | (norm.reshape(()) < 0)
                self.last_grad_norm = norm.reshape(())
            bad = self._loss_bad if self._grad_bad is None else self._loss_bad | self._grad_bad
            basic.found_inf = bad.float()
            return original(*args, **kwargs)

        basic.step = step_unless_bad

    def _clip_zero0(self) -> torch.Tensor:
        """lmforge's clipping at ZeRO-0 (DeepSpeed's reads a scalar back from the GPU): the global norm."""
        params = [p for p in self._trained if p.grad is not None]
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)

    def _device_step(self, micro_batches, step_number: int, stop_requested: bool) -> PendingStep:
        engine, rank = self.engine, distributed.rank()
        total, count, device = None, 0, None
        self._loss_bad = self._grad_bad = None
        shared = torch.zeros(2)
        for batch in micro_batches:
            loss = faults.corrupt_loss(micro_batch_loss(engine, batch), step_number, rank)
            engine.backward(loss)
            total = loss.detach().float() if total is None else total + loss.detach().float()
            count += 1
            device = total.device
            if engine.is_gradient_accumulation_boundary():
                shared = torch.stack([(~torch.isfinite(total)).float(), _host_flag(stop_requested, device)])
                if distributed.world_size() > 1:
                    shared = distributed.all_reduce_sum(shared)
                self._loss_bad = shared[0] > 0
                if not self._zero:
                    self.last_grad_norm = self._clip_zero0()
                    self._grad_bad = ~torch.isfinite(self.last_grad_norm)
                    self._basic.found_inf = (self._loss_bad | self._grad_bad).float()
                # The step before's flags, read while the GPU runs this step's backward: a skipped
                # step rewinds the schedule before this update takes its lr.
                self._read_pending()
                self.last_lr = _current_lr(engine)
                with _deepspeed_host_norm_check_off() if self._zero else nullcontext():
                    engine.step()
                continue
            engine.step()
        grad_bad = self._grad_bad if self._grad_bad is not None else torch.zeros((), dtype=torch.bool, device=device)
        skipped = self._loss_bad | grad_bad
        flags = torch.stack([shared[0], grad_bad.float(), shared[1]])
        if flags.device.type == "cuda":
            host = torch.empty(3, dtype=flags.dtype, pin_memory=True)
            host.copy_(flags, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
            return PendingStep(step_number, total / count, skipped, host, ready)
        return PendingStep(step_number, total / count, skipped, flags)

    def _resolve(self, pending: PendingStep) -> StepOutcome:
        if pending.ready is not None:
            pending.ready.synchronize()
        loss_bad, grad_bad, stop = (float(v) > 0 for v in pending.flags.tolist())
        skipped = loss_bad or grad_bad
        if skipped and self.on_device:
            self.engine.skipped_steps += 1
            scheduler = self.engine.lr_scheduler
            if scheduler is not None:  # the schedule did not advance on a skipped step
                scheduler.step(scheduler.last_batch_iteration - 1)
        return StepOutcome(pending.loss, not skipped, skipped and (loss_bad or not self.fp16), stop)

    # -- the host path ---------------------------------------------------------------------------

    def _agree(self, loss_sum: torch.Tensor, stop_requested: bool) -> tuple[bool, bool, bool]:
        """(loss non-finite on some rank, gradients non-finite, some rank asks to stop)."""
        device = loss_sum.device
        flags = [~torch.isfinite(loss_sum)]
        if self.checks_gradients_itself:  # DeepSpeed keeps no norm for a plain torch optimizer: ours is logged
            finite, self.last_grad_norm = _gradient_check(self.engine.module)
            flags.append(~finite.to(device))
        else:
            flags.append(torch.zeros((), dtype=torch.bool, device=device))
        flags.append(torch.tensor(stop_requested, device=device))
        summed = distributed.all_reduce_mean(torch.stack(flags).float()).tolist()  # one host sync per step
        return summed[0] > 0, summed[1] > 0, summed[2] > 0

    def _host_step(self, micro_batches, step_number: int, stop_requested: bool) -> StepOutcome:
        from pretrain.engine import is_pipeline

        if is_pipeline(self.engine):
            return self._pipeline_step(micro_batches, stop_requested)
        engine, rank = self.engine, distributed.rank()
        total, count = None, 0
        loss_bad = grads_bad = stop = False
        for batch in micro_batches:
            loss = faults.corrupt_loss(micro_batch_loss(engine, batch), step_number, rank)
            engine.backward(loss)
            total = loss.detach().float() if total is None else total + loss.detach().float()
            count += 1
            if engine.is_gradient_accumulation_boundary():
                loss_bad, grads_bad, stop = self._agree(total, stop_requested)
                self.last_lr = _current_lr(engine)
                if grads_bad and self.checks_gradients_itself:
                    with _suppressed_optimizer_step(engine.optimizer):
                        engine.step()
                    continue
            engine.step()
        applied = bool(engine.was_step_applied())
        bad = not applied and (loss_bad or not self.fp16)
        return StepOutcome(total / count, applied, bad, stop)

    def _pipeline_step(self, micro_batches, stop_requested: bool) -> StepOutcome:
        """DeepSpeed's pipeline schedule, with the same agreement right before its optimizer step."""
        from pretrain.engine import pipeline_step

        agreed: dict[str, tuple[bool, bool, bool]] = {}

        def at_boundary(loss_sum: torch.Tensor):
            agreed["flags"] = self._agree(loss_sum, stop_requested)
            suppress = agreed["flags"][1] and self.checks_gradients_itself
            return _suppressed_optimizer_step(self.engine.optimizer) if suppress else None

        self.last_lr = _current_lr(self.engine)
        loss = pipeline_step(self.engine, micro_batches, at_boundary)
        loss_bad, _, stop = agreed["flags"]
        applied = bool(self.engine.was_step_applied())
        return StepOutcome(loss, applied, not applied and (loss_bad or not self.fp16), stop)

    # -- what the loop calls ---------------------------------------------------------------------

    def step(self, micro_batches: Iterable[tuple[torch.Tensor, torch.Tensor]], step_number: int,
             stop_requested: bool) -> PendingStep:
        """Forward/backward over the micro-batches of optimizer step `step_number`, then DeepSpeed's
        step. Its loss and skip flag are device tensors; the outcome comes from `settle`."""
        if self.on_device:
            self._pending.append(self._device_step(micro_batches, step_number, stop_requested))
            return self._pending[-1]
        outcome = self._host_step(micro_batches, step_number, stop_requested)
        skipped = torch.full((), not outcome.applied, dtype=torch.bool, device=outcome.loss.device)
        self._settled.append((step_number, outcome))
        return PendingStep(step_number, outcome.loss, skipped, torch.zeros(3), outcome=outcome)

    def _read_pending(self) -> None:
        """Reads the flags of every step still on its way (waits for the GPU to finish them)."""
        while self._pending:
            pending = self._pending.pop(0)
            self._settled.append((pending.step_number, self._resolve(pending)))

    def settle(self, keep_last: bool = False) -> list[tuple[int, StepOutcome]]:
        """The (step number, outcome) of every step read so far, oldest first; without `keep_last`
        the newest step is read too (a wait for the GPU), with it that one stays pending."""
        if not keep_last:
            self._read_pending()
        settled, self._settled = self._settled, []
        return settled

    def check(self, outcome: StepOutcome, step_number: int, resume_hint: Callable[[], str]) -> None:
        """Counts consecutive bad steps; the max_bad_steps-th in a row stops training (LmforgeError)."""
        if not outcome.bad:
            self.consecutive_bad, self.first_bad_step = 0, None
            return
        self.consecutive_bad += 1
        self.first_bad_step = self.first_bad_step or step_number
        if self.consecutive_bad >= self.max_bad_steps:
            raise LmforgeError(
                f"{self.consecutive_bad} optimizer steps in a row ({self.first_bad_step}-{step_number}) had a "
                f"non-finite loss or gradient and were skipped (train.max_bad_steps = {self.max_bad_steps}); "
                f"the weights are still those of step {self.first_bad_step - 1}; {resume_hint()}"
            )


def _current_lr(engine) -> float | None:
    lrs = engine.get_lr()
    return float(lrs[0]) if lrs else None


def _host_flag(value: bool, device: torch.device) -> torch.Tensor:
    """A 0/1 float on `device` filled by a kernel: torch.tensor(value, device=cuda) would be a
    pageable host-to-GPU copy, which waits for the GPU."""
    return torch.full((), float(value), device=device)
