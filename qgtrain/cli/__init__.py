"""Command-line entry points: ``train.py`` (LightningCLI + short flags) and ``evaluate.py``."""

from __future__ import annotations

import sys
import traceback
from typing import NoReturn


class UsageError(ValueError):
    """A bad command-line value: reported as one line, exit status 2."""


def exit_usage(prog: str, message: str) -> NoReturn:
    """Write ``prog: error: message`` (its first line) on stderr and exit with status 2."""
    sys.stderr.write(f"{prog}: error: {(message.splitlines() or [''])[0]}\n")
    raise SystemExit(2)


def report_bug(prog: str) -> int:
    """The traceback of the exception being handled, then a line saying that it is a bug in qgtrain
    (not in the command) and where to report it; the exit status 1."""
    traceback.print_exc()
    sys.stderr.write(
        f"{prog}: this is a bug in qgtrain, not in your command: please report it, with the command "
        "and the traceback above, on the qgtrain issue tracker\n"
    )
    return 1
