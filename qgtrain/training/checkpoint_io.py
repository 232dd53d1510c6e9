"""Checkpoint files are written atomically: complete and loadable, or absent; loaded without pickle code."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, BinaryIO

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from qgtrain.callbacks.robustness import WORST_ACC
from qgtrain.checkpoint_files import CheckpointError, read_checkpoint
from qgtrain.training.resume import remove_superseded_interrupt

__all__ = [
    "BEST_CHECKPOINT",
    "DEFAULT_CKPT_MINUTES",
    "VAL_ADV_ACC",
    "AtomicCheckpointIO",
    "CheckpointError",
    "LastCheckpoint",
    "ResumePoint",
    "StepCheckpoint",
    "atomic_torch_save",
    "atomic_write",
    "read_checkpoint",
]

log = logging.getLogger(__name__)

DEFAULT_CKPT_MINUTES = 10.0
"""``train.py``'s ``step.ckpt`` interval: a kill loses at most this many minutes. A time interval,
not a step count, bounds the write's share of training time on every machine (a GPU step is many
times shorter than a CPU step, a write is not); the write's measured cost is in docs/RESULTS.md
section 6."""

VAL_ADV_ACC = "val/adv_acc"
""":class:`~qgtrain.training.AdversarialTraining`'s validation robust accuracy (its ``val_attack``):
``best.ckpt``'s monitor when robustness evaluation is off."""

BEST_CHECKPOINT = {
    "monitor": WORST_ACC,
    "save_on_train_epoch_end": True,
    "mode": "max",
    "filename": "best",
    "save_last": True,
    "save_top_k": 1,
    "auto_insert_metric_name": False,
    "enable_version_counter": False,
}
"""``train.py``'s ``ModelCheckpoint``: ``best.ckpt`` is the best robust model, the per-example worst
case over the robustness callback's attacks (by default BLOB_QG, then APGD-T). That exists only on
evaluation epochs (the first, every N-th, the last), so the checkpoint is taken at train-epoch end,
after the callback; between evaluations the stale value never beats the best. Without robustness
evaluation the monitor falls back to :data:`VAL_ADV_ACC`. ``save_last`` is handed to
:class:`LastCheckpoint`."""


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`atomic_write`."""
    atomic_write(path, lambda handle: torch.save(obj, handle))


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> None:
    """``write(handle)`` into a temporary file in the same folder, fsync, then rename over ``path``:
    ``path`` is complete or as it was, never half written (the one atomic write; benchmarks use it).
    An ``OSError`` (a full disk: ``ENOSPC``) is raised again naming ``path``, of the same kind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:  # a write or fsync error carries no file name: name the target
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
    finally:
        if tmp.exists():
            tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that never leaves a truncated file and loads with ``weights_only=True``."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(
        self, path: Any, map_location: Any = "cpu", weights_only: bool | None = None
    ) -> dict[str, Any]:
        return read_checkpoint(path)  # weights_only=True; one-line CheckpointError on any failure


class ResumePoint(ModelCheckpoint):
    """A checkpoint ``--resume`` continues from (``last.ckpt``, ``step.ckpt``). After each write the
    loggers are flushed, so the curves up to the checkpoint are on disk with it (a run killed later
    and resumed has no hole before its resume point), and the ``interrupted.ckpt`` this run resumed
    from is removed: the checkpoint just written continued it and supersedes it."""

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        for logger in trainer.loggers:
            logger.save()
        remove_superseded_interrupt(trainer, Path(filepath).parent, Path(filepath))


class LastCheckpoint(ResumePoint):
    """``<dirpath>/last.ckpt`` at the end of every training epoch, whatever the monitored metric did.

    Lightning 2.6 writes a monitored callback's ``last.ckpt`` only at steps where a top-k checkpoint
    is also written, so after an epoch without improvement ``last.ckpt`` is stale and ``--resume``
    would roll back. This callback (no monitor, one file named ``last``) is the resume point.
    """

    def __init__(self, dirpath: str | os.PathLike) -> None:
        super().__init__(
            dirpath=dirpath,
            filename=self.CHECKPOINT_NAME_LAST,
            monitor=None,
            save_top_k=1,
            save_last=False,
            every_n_epochs=1,
            save_on_train_epoch_end=True,
            enable_version_counter=False,
        )


class StepCheckpoint(ResumePoint):
    """``<dirpath>/step.ckpt`` inside an epoch: every ``every_n_steps`` optimizer steps and/or every
    ``every_minutes`` minutes of training (0 turns a trigger off), whichever comes first.

    One file, overwritten atomically (through the trainer's checkpoint IO), so only the latest step
    checkpoint is kept beside ``last.ckpt`` and ``best.ckpt``. It is taken at the end of a training
    batch and holds the ``StatefulDataLoader`` position, so a resumed run continues at the next batch.
    Lightning's ``ModelCheckpoint`` implements both triggers (``every_n_train_steps``,
    ``train_time_interval``; the time decision is broadcast from rank 0) but refuses them together;
    this subclass sets both.
    """

    FILENAME = "step"

    def __init__(
        self, dirpath: str | os.PathLike, every_n_steps: int = 0, every_minutes: float = 0.0
    ) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 0:
            raise ValueError(f"ckpt_every_steps must be an integer >= 0 (0 = off), got {every_n_steps}")
        if not every_minutes >= 0:
            raise ValueError(f"ckpt_every_minutes must be >= 0 (0 = off), got {every_minutes}")
        super().__init__(
            dirpath=dirpath,
            filename=self.FILENAME,
            monitor=None,
            save_top_k=1,
            save_last=False,
            every_n_epochs=0,
            save_on_train_epoch_end=False,
            enable_version_counter=False,
        )
        self._every_n_train_steps = every_n_steps
        self._train_time_interval = timedelta(minutes=every_minutes) if every_minutes > 0 else None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.FILENAME)  # stable when the intervals change

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        if trainer.is_global_zero:
            log.info(
                "step checkpoint %s: epoch %d, step %d", filepath, trainer.current_epoch, trainer.global_step
            )
