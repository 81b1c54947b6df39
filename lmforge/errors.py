"""The one exception type users see, and the wrapper that turns it into a one-line exit."""
from __future__ import annotations

import os
import sys
from typing import Callable, Sequence

USER_ERROR_EXIT_CODE = 2


class LmforgeError(Exception):
    """A problem with the user's input (file, config key, argument): printed as one line, exit 2.

    The message names the file or key, the value found and what was expected; where a file is
    bad, it also says which command regenerates it. Several problems found at once are lines of
    one message (one `error:` line each).
    """


class KeptOutputError(LmforgeError):
    """An LmforgeError after which the output written so far stays (e.g. complete shards on a full
    disk, so the rerun continues), where a refused input would have its new folder removed."""


def run_cli(entry: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Runs `entry(argv)`; an LmforgeError becomes `error: <message>` on stderr and exit code 2."""
    forbid_world_writable_outputs()
    try:
        return int(entry(argv) or 0)
    except LmforgeError as err:
        for problem in str(err).split("\n"):  # several problems found at once: one line each
            if problem.strip():
                print(f"error: {' '.join(problem.split())}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def forbid_world_writable_outputs() -> None:
    """Adds "others may not write" to the process umask, whatever the shell's umask was.

    Every file and folder the project writes (shards, run dirs, checkpoints written by DeepSpeed
    in this process, exports) then lacks the others-write bit, also under a permissive `umask 000`
    that some cluster images and containers set. Group and read bits stay the user's choice.
    """
    os.umask(os.umask(0o022) | 0o002)
