"""Checkpoint files are written atomically: complete and loadable, or absent; loaded without pickle code."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from qgtrain.evaluation.checkpoints import CheckpointError, read_checkpoint

__all__ = ["AtomicCheckpointIO", "CheckpointError", "LastCheckpoint", "atomic_torch_save", "read_checkpoint"]


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
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


class LastCheckpoint(ModelCheckpoint):
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
