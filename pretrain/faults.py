"""Fault injection for the reliability tests: inert unless an LMFORGE_FAULT_* variable is set.

LMFORGE_FAULT_STEP_DELAY=seconds        sleep after every optimizer step (gives a test time to kill)
LMFORGE_FAULT_SAVE_DELAY=seconds[@step] sleep inside a checkpoint save, after DeepSpeed's files and
                                        rng_rank<r>.pt are written and before COMPLETE (of that
                                        step only, with @step); a test kills the run meanwhile
LMFORGE_FAULT_SAVE_ERROR=step[,step]    the save of that step fails with OSError(ENOSPC) on every
                                        rank, after DeepSpeed wrote its files (a disk that filled up)
LMFORGE_FAULT_NAN_AT_STEP=step[,step]   rank 0's loss of that optimizer step is NaN
LMFORGE_FAULT_INF_GRAD_AT_STEP=step[,step]  rank 0's loss stays finite but its gradients are +inf

Steps are numbered as in metrics.jsonl: the step that is being computed (1 for the first).
"""
from __future__ import annotations

import errno
import os
import time

import torch

STEP_DELAY = "LMFORGE_FAULT_STEP_DELAY"
SAVE_DELAY = "LMFORGE_FAULT_SAVE_DELAY"
SAVE_ERROR = "LMFORGE_FAULT_SAVE_ERROR"
NAN_AT_STEP = "LMFORGE_FAULT_NAN_AT_STEP"
INF_GRAD_AT_STEP = "LMFORGE_FAULT_INF_GRAD_AT_STEP"


def _steps(name: str) -> set[int]:
    raw = os.environ.get(name, "")
    return {int(part) for part in raw.split(",") if part.strip()}


def after_step(step: int) -> None:
    delay = float(os.environ.get(STEP_DELAY, "0") or 0)
    if delay > 0:
        time.sleep(delay)


def during_save(step: int, path: str) -> None:
    """Called by checkpoint.save between DeepSpeed's files and the COMPLETE marker."""
    raw = os.environ.get(SAVE_DELAY, "")
    if raw:
        seconds, _, only = raw.partition("@")
        if not only or int(only) == step:
            print(f"fault: sleeping {seconds}s inside the save of {path}", flush=True)
            time.sleep(float(seconds))
    if step in _steps(SAVE_ERROR):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


class _InfiniteGradient(torch.autograd.Function):
    """Identity forward; backward sends +inf to everything upstream."""

    @staticmethod
    def forward(ctx, loss: torch.Tensor) -> torch.Tensor:
        return loss.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return torch.full_like(grad, float("inf"))


def corrupt_loss(loss: torch.Tensor, step: int, rank: int) -> torch.Tensor:
    """The loss a micro-batch backpropagates: unchanged unless a NaN/Inf fault names this step."""
    if rank != 0:
        return loss
    if step in _steps(NAN_AT_STEP):
        return loss * float("nan")
    if step in _steps(INF_GRAD_AT_STEP):
        return _InfiniteGradient.apply(loss)
    return loss


def numeric_faults_enabled() -> bool:
    return bool(os.environ.get(NAN_AT_STEP) or os.environ.get(INF_GRAD_AT_STEP))
