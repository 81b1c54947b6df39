"""A readable console during training: Python warnings raised inside DeepSpeed go to RUN_DIR/deepspeed.log.

A 30-step ZeRO-3 run printed 122 FutureWarning lines from inside DeepSpeed (torch deprecations it
triggers, its own notices) over the progress bar; none asks anything of the user. Warnings whose
code location is in DeepSpeed's package are appended to the log (main rank; the other ranks'
copies are dropped), every other warning is shown as before.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

DEEPSPEED_LOG = "deepspeed.log"
"""The file in the run directory that receives DeepSpeed's warnings."""


def _in_deepspeed(filename: str) -> bool:
    return f"{os.sep}deepspeed{os.sep}" in filename


def keep_deepspeed_warnings_in(log_path: Path, main: bool) -> None:
    """From now on, warnings raised in DeepSpeed's code go to `log_path` (main rank) instead of stderr."""
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if not _in_deepspeed(str(filename)):
            return shown(message, category, filename, lineno, file, line)
        if main:
            with open(log_path, "a", encoding="utf-8") as log:
                log.write(warnings.formatwarning(message, category, filename, lineno, line))
        return None

    warnings.showwarning = show
