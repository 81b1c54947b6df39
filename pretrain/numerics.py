"""One optimizer step that never applies a non-finite loss or gradient, and the limit on such steps.

At the gradient-accumulation boundary, after the last backward and before DeepSpeed's step, the
ranks all-reduce three flags in one collective: a non-finite loss on any rank, non-finite
gradients (checked here only where DeepSpeed does not check them itself), and a pending
preemption signal (pretrain.preemption). Then:

- DeepSpeed's ZeRO 1-3, bf16 and fp16 optimizers already skip a step whose gradient norm is
  inf/NaN (`overflow`): weights, optimizer state and LR schedule stay as they were and
  `engine.skipped_steps` counts it. We only make sure their check is on
  (`check_grad_overflow`, off by default for bf16 ZeRO 1-2).
- A plain torch optimizer (ZeRO-0 in fp32 or torch autocast) has no such check: we inspect the
  gradients (already all-reduced at the boundary) and, when one is non-finite, run DeepSpeed's
  step with the optimizer's own `step` replaced by a no-op and `overflow` set, so DeepSpeed's
  bookkeeping (micro/global steps, skipped_steps, no LR step, zeroed grads) is its usual one.

A skipped step still consumes its batch: the data order stays a function of the step. With a loss
scaler (DeepSpeed's fp16, or torch's GradScaler under fp16 autocast with ZeRO-0), overflow skips
are normal: counted in skipped_steps, but only a non-finite loss counts towards
`train.max_bad_steps`.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch

from lmforge.errors import LmforgeError
from pretrain import distributed, faults


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


def _gradient_check(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(all gradients finite, their global L2 norm before clipping; None without gradients)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return torch.ones((), dtype=torch.bool), None
    norms = torch.stack(torch._foreach_norm(grads))
    return torch.isfinite(norms).all(), torch.linalg.vector_norm(norms)


class GuardedStep:
    """Runs optimizer steps on a DeepSpeed engine; raises LmforgeError after too many bad ones in a row."""

    def __init__(self, engine, max_bad_steps: int, fp16: bool):
        """`fp16`: a dynamic loss scaler is at work (its overflow skips are not bad steps)."""
        self.engine, self.max_bad_steps, self.fp16 = engine, max_bad_steps, fp16
        optimizer = engine.optimizer
        if hasattr(optimizer, "check_grad_overflow"):
            optimizer.check_grad_overflow = True
        self.checks_gradients_itself = not hasattr(optimizer, "overflow")
        self.grad_norm: torch.Tensor | None = None
        """The last step's gradient norm where we check gradients ourselves (DeepSpeed reports none there)."""
        self.consecutive_bad = 0
        self.first_bad_step: int | None = None

    def _agree(self, loss_sum: torch.Tensor, stop_requested: bool) -> tuple[bool, bool, bool]:
        """(loss non-finite on some rank, gradients non-finite, some rank asks to stop)."""
        device = loss_sum.device
        flags = [~torch.isfinite(loss_sum)]
        if self.checks_gradients_itself:
            finite, self.grad_norm = _gradient_check(self.engine.module)
            flags.append(~finite.to(device))
        else:
            flags.append(torch.zeros((), dtype=torch.bool, device=device))
        flags.append(torch.tensor(stop_requested, device=device))
        summed = distributed.all_reduce_mean(torch.stack(flags).float()).tolist()  # one host sync per step
        return summed[0] > 0, summed[1] > 0, summed[2] > 0

    def step(self, micro_batches: Iterable[tuple[torch.Tensor, torch.Tensor]], step_number: int,
             stop_requested: bool) -> StepOutcome:
        """Forward/backward over the micro-batches of optimizer step `step_number`, then DeepSpeed's step."""
        from pretrain.engine import is_pipeline

        if is_pipeline(self.engine):
            return self._pipeline_step(micro_batches, stop_requested)
        engine, rank = self.engine, distributed.rank()
        total, count = None, 0
        loss_bad = grads_bad = stop = False
        for inputs, targets in micro_batches:
            loss = faults.corrupt_loss(engine(inputs, targets), step_number, rank)
            engine.backward(loss)
            total = loss.detach().float() if total is None else total + loss.detach().float()
            count += 1
            if engine.is_gradient_accumulation_boundary():
                loss_bad, grads_bad, stop = self._agree(total, stop_requested)
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

        loss = pipeline_step(self.engine, micro_batches, at_boundary)
        loss_bad, _, stop = agreed["flags"]
        applied = bool(self.engine.was_step_applied())
        return StepOutcome(loss, applied, not applied and (loss_bad or not self.fp16), stop)

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
