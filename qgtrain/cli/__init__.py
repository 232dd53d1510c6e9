"""Command-line entry points: ``train.py`` (LightningCLI + short flags) and ``evaluate.py``."""

from __future__ import annotations

import argparse
import difflib
import errno
import os
import pickle
import sys
import traceback
import zipfile
from collections.abc import Callable, Iterable
from typing import Any

EXIT_STATUSES = (
    "exit status: 0 done; 2 the command is wrong (an unknown or misspelt flag, a bad value, options "
    "that conflict, a file it names that is missing or unusable, an output folder that cannot be "
    "written at start); 1 a valid command failed while running (data not found or not downloadable, "
    "a full disk or a permission fault on the way, a non-finite loss, a bug); 129 SIGHUP, 130 Ctrl-C, "
    "143 SIGTERM (what was finished is saved)"
)
"""The exit-status rule of both scripts, stated in their ``--help``."""


class UsageError(ValueError):
    """A bad command-line value: reported as one line, exit status 2."""


class ConfigAction(argparse.Action):
    """Applies ``apply(parser, namespace, value)`` to the config resolved so far, where it stands."""

    def __init__(self, option_strings: list[str], dest: str, apply: Callable[..., None], **kwargs: Any) -> None:
        super().__init__(option_strings, argparse.SUPPRESS, default=argparse.SUPPRESS, **kwargs)
        self.apply = apply

    def __call__(self, parser: Any, namespace: Any, value: Any, option_string: str | None = None) -> None:
        self.apply(parser, namespace, value)


FIXES = {
    errno.ENOSPC: "free space on that disk or write elsewhere",
    errno.EDQUOT: "free space within your quota or write elsewhere",
    errno.EACCES: "check its permissions",
    errno.EPERM: "check its permissions",
    errno.EROFS: "the file system is read-only; write elsewhere",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a file stands where a folder is needed",
    errno.EISDIR: "a folder stands where a file is needed",
}
"""What the user can do about an ``OSError``, by its ``errno``."""


def environment_fault(exc: BaseException) -> str | None:
    """One line for a fault of the machine or of a file the user gave, decided by the exception's
    type: an ``OSError``'s path, cause and fix; a malformed YAML, ``.npz`` or pickle file; else ``None``."""
    import yaml

    if isinstance(exc, OSError) and exc.errno is not None:
        path = os.fsdecode(exc.filename) if exc.filename is not None else "a file"
        fix = FIXES.get(exc.errno)
        return f"{path}: {exc.strerror or exc}" + (f"; {fix}" if fix else "")
    if isinstance(exc, yaml.YAMLError):
        return f"a YAML file is malformed: {' '.join(str(exc).split())}"
    if isinstance(exc, zipfile.BadZipFile | EOFError | pickle.UnpicklingError):
        return f"a file is truncated or not of the expected format ({type(exc).__name__}: {exc})"
    return None


def report_failure(
    prog: str,
    exc: BaseException,
    wrong: tuple[type[BaseException], ...],
    failed: tuple[type[BaseException], ...],
    interrupted: str,
    describe: Callable[[BaseException], str] = str,
) -> int:
    """The exit status of ``exc`` (:data:`EXIT_STATUSES`) after its one line on stderr: a ``wrong``
    command exits with 2 (``prog: error: ...``), a ``failed`` run or an :func:`environment_fault` is 1,
    Ctrl-C 130; anything else is a bug: its traceback and where to report it, 1."""
    if isinstance(exc, KeyboardInterrupt):
        sys.stderr.write(f"{prog}: {interrupted}\n")
        return 130
    message = describe(exc) if isinstance(exc, wrong + failed) else environment_fault(exc)
    if message is None:
        traceback.print_exc()
        sys.stderr.write(
            f"{prog}: this is a bug in qgtrain, not in your command: please report it, with the command "
            "and the traceback above, on the qgtrain issue tracker\n"
        )
        return 1
    sys.stderr.write(f"{prog}: error: {(message.splitlines() or [''])[0]}\n")
    if isinstance(exc, wrong):
        raise SystemExit(2)
    return 1


def closest(name: str, candidates: Iterable[str]) -> str | None:
    """The candidate most like ``name`` (difflib's ratio at least 0.6), else ``None``: every refusal's
    "did you mean"."""
    close = difflib.get_close_matches(name, sorted(candidates), n=1, cutoff=0.6)
    return close[0] if close else None


def unknown_flag(message: str, valid: Iterable[str], prog: str) -> str | None:
    """``unrecognized argument --stpes; did you mean --steps?`` for the first flag of argparse's
    "unrecognized arguments" ``message`` (or, when nothing is close, where to look); else ``None``."""
    unknown = message.partition("unrecognized arguments: ")[2].split()
    if not unknown:
        return None
    flag = next((a.split("=", 1)[0] for a in unknown if a.startswith("-")), unknown[0])
    close = closest(flag, (v for v in valid if v.startswith("--")))
    hint = f"did you mean {close}?" if close else f"see python {prog} --help"
    return f"unrecognized argument {flag}; {hint}"
