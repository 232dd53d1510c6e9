"""Command-line entry points: ``train.py`` (LightningCLI + short flags) and ``evaluate.py``."""

from __future__ import annotations

import sys
from typing import NoReturn


class UsageError(ValueError):
    """A bad command-line value: reported as one line, exit status 2."""


def exit_usage(prog: str, message: str) -> NoReturn:
    """Write ``prog: error: message`` (its first line) on stderr and exit with status 2."""
    sys.stderr.write(f"{prog}: error: {(message.splitlines() or [''])[0]}\n")
    raise SystemExit(2)
