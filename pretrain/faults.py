"""Fault injection for the kill/resume tests: inert unless an LMFORGE_FAULT_* variable is set.

LMFORGE_FAULT_STEP_DELAY=seconds  sleep after every optimizer step (gives a test time to kill)
"""
from __future__ import annotations

import os
import time


def after_step(step: int) -> None:
    delay = float(os.environ.get("LMFORGE_FAULT_STEP_DELAY", "0") or 0)
    if delay > 0:
        time.sleep(delay)
