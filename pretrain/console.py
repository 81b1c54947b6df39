"""A readable console during training: Python warnings raised inside DeepSpeed go to RUN_DIR/deepspeed.log.

A 30-step ZeRO-3 run printed 122 FutureWarning lines from inside DeepSpeed (torch deprecations it
triggers, its own notices) over the progress bar; none asks anything of the user. Warnings raised
in DeepSpeed's code, or in torch code that DeepSpeed called (torch's deprecation notices name
their own wrapper as the location), are appended to the log (main rank; the other ranks' copies
are dropped); every other warning is shown as before.
"""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

DEEPSPEED_LOG = "deepspeed.log"
"""The file in the run directory that receives DeepSpeed's warnings."""


_REPO = str(Path(__file__).resolve().parent.parent) + os.sep
_DEEPSPEED = f"{os.sep}deepspeed{os.sep}"


def raised_by_deepspeed(filename: str) -> bool:
    """True when the warning's location is DeepSpeed's code, or library code DeepSpeed called (torch's
    deprecation wrappers report their own line): walking out from the warning, a DeepSpeed frame
    comes before any of lmforge's own."""
    if _DEEPSPEED in filename:
        return True
    if filename.startswith(_REPO):
        return False
    frame = sys._getframe(1)
    while frame is not None:
        code_file = frame.f_code.co_filename
        if _DEEPSPEED in code_file:
            return True
        if code_file.startswith(_REPO) and code_file != __file__:
            return False
        frame = frame.f_back
    return False


def keep_deepspeed_warnings_in(log_path: Path, main: bool) -> None:
    """From now on, warnings raised by DeepSpeed's code go to `log_path` (main rank) instead of stderr."""
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if not raised_by_deepspeed(str(filename)):
            return shown(message, category, filename, lineno, file, line)
        if main:
            with open(log_path, "a", encoding="utf-8") as log:
                log.write(warnings.formatwarning(message, category, filename, lineno, line))
        return None

    warnings.showwarning = show
