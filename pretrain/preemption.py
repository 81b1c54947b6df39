"""SIGTERM / SIGUSR1 ask training to checkpoint and stop at the next step boundary.

SLURM sends SIGTERM before it kills a preempted or cancelled job, and the signal chosen with
`#SBATCH --signal` (launch/slurm/ uses USR1) before the time limit; torchrun forwards SIGTERM
to its workers. The handler only records the signal: a save inside a signal handler would run
at an arbitrary point of the step on one rank. The training loop reads `requested` at each step
boundary and all ranks agree on it in one all-reduce (pretrain.guarded_step), so a signal that
reaches one rank stops them all at the same step.
"""
from __future__ import annotations

import signal
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionSignals:
    """Installs the handlers on `install()`; `received` is the first signal's name, else None."""

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS):
        self.signals = signals
        self.received: str | None = None
        self._previous: dict[signal.Signals, object] = {}

    def install(self) -> "PreemptionSignals":
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return self.received is not None

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)  # type: ignore[arg-type]
        self._previous.clear()
