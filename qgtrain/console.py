"""The console of ``train.py``: our lines, each on its own line under a progress bar, and the other
libraries' start-up lines kept for ``--verbose``.

One mechanism writes every line of ours: :func:`write_line` goes through tqdm's public
``tqdm.external_write_mode`` (what ``tqdm.write`` and Lightning's ``TQDMProgressBar.print`` use), which
clears the bars drawn on the terminal, writes the line, and draws the bars again below it. The
``logging`` records of the package (the robustness line, the run's estimate, interrupt notices) reach
it through :class:`LineHandler` on the root logger, and Python warnings through
``logging.captureWarnings``; ``train.py``'s own closing lines call it directly.

Without ``--verbose`` (:func:`quiet_other_libraries`), Lightning's informational loggers are set to
WARNING and two deprecation warnings raised inside the libraries are ignored, each by its exact
message and the module that raises it; warnings and errors of qgtrain, and other libraries' warnings
about the run itself, still show.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from typing import TextIO

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from tqdm import tqdm

LIGHTNING_INFO_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",  # GPU/TPU available, the litlogger tip, `limit_*_batches`
    # notes, "Loading `train_dataloader` to estimate ...", "Restoring states ...", `Trainer.fit` stopped
    "lightning.pytorch.accelerators.cuda",  # LOCAL_RANK: 0 - CUDA_VISIBLE_DEVICES: [...]
    "lightning.pytorch.callbacks.model_summary",  # the table of the module's parameters
)
"""Lightning's loggers of start-up information: WARNING without ``--verbose``."""
LIBRARY_DEPRECATIONS = (
    # torch.set_vital's deprecation, called by torchdata's StatefulDataLoader when it starts
    (r"'set_vital' is deprecated", r"torchdata\.stateful_dataloader"),
    # torch's LeafSpec deprecation, from Lightning's own copy of tree_flatten
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", r"lightning\.pytorch\.utilities\._pytree"),
)
"""``(message, module)`` of the deprecation warnings raised inside libraries that ``train.py`` cannot
act on: ignored without ``--verbose``."""


def write_line(text: str, stream: TextIO | None = None) -> None:
    """Write ``text`` on a line of its own to ``stream`` (standard error by default): progress bars on
    the terminal are cleared first and drawn again below it."""
    stream = sys.stderr if stream is None else stream
    with tqdm.external_write_mode(file=stream):
        stream.write(text + "\n")
        stream.flush()


class LineHandler(logging.Handler):
    """A logging handler that writes each record through :func:`write_line`, to the standard error
    of the moment (pytest's capture included)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            write_line(self.format(record).rstrip("\n"))
        except Exception:  # logging's own policy: a failing handler reports, never raises
            self.handleError(record)


def configure_logging() -> None:
    """Our records at INFO and Python warnings, as ``%(message)s`` lines through :class:`LineHandler`;
    like ``logging.basicConfig``, a no-op when the root logger already has handlers (pytest's)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[LineHandler()])
    logging.captureWarnings(True)


def quiet_other_libraries(verbose: bool = False) -> None:
    """Lightning's start-up information and the libraries' own deprecations: hidden unless ``verbose``
    (then shown, as after a fresh import)."""
    for name in LIGHTNING_INFO_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.WARNING)
    for message, module in LIBRARY_DEPRECATIONS:
        action = "default" if verbose else "ignore"
        warnings.filterwarnings(action, message=message, module=module)


def expect_existing_checkpoints(folder: str) -> None:
    """A resumed run writes into its own checkpoint folder: Lightning's warning that this folder
    "exists and is not empty" is expected then (and only for that folder, which ``ModelCheckpoint``
    names by its real path: through a symbolic link too)."""
    for name in dict.fromkeys((folder, os.path.realpath(os.path.expanduser(folder)))):
        warnings.filterwarnings("ignore", message=rf"Checkpoint directory {re.escape(name)} exists and is not empty")


def write_after_fit(trainer: L.Trainer, text: str) -> None:
    """``train.py``'s line after ``fit`` stopped (interrupted, or an error): below the bars it left."""
    end_progress_bars(trainer)
    write_line(text)


def end_progress_bars(trainer: L.Trainer) -> None:
    """Close the bars Lightning's ``TQDMProgressBar`` leaves drawn when ``fit`` ends by an exception
    (it closes them only in its ``on_*_end`` hooks), so a line after it starts below the last bar."""
    bars = trainer.progress_bar_callback
    if not isinstance(bars, TQDMProgressBar):
        return
    for name in ("val_progress_bar", "train_progress_bar"):
        try:
            getattr(bars, name).close()
        except TypeError:  # the property raises when that bar was never created
            continue
