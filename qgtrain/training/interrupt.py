"""Ctrl-C during training: save ``interrupted.ckpt`` (atomically) so no work is lost."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn

log = logging.getLogger(__name__)

INTERRUPTED_CHECKPOINT = "interrupted.ckpt"


class InterruptCheckpoint(Callback):
    """On ``KeyboardInterrupt`` during ``fit``, write ``<dirpath>/interrupted.ckpt``.

    Lightning catches the interrupt, calls ``on_exception`` on every callback, then exits with
    status 1; ``train.py`` turns that into a one-line message and status 130. The file is written
    through the trainer's checkpoint IO (atomic: complete or absent). Single-process runs only: under
    DDP the ranks are interrupted at different points and a collective save could hang, so a DDP run
    resumes from its ``last.ckpt``. A mid-epoch checkpoint resumes at its global step; the batches of
    that epoch are then drawn again in the sampler's order, so it is not bit-exact (``last.ckpt``,
    written at epoch ends, is).
    """

    def __init__(self, dirpath: str | Path) -> None:
        self.dirpath = Path(dirpath)
        self.interrupted = False
        self.saved_path: Path | None = None
        self.epoch = 0
        self.global_step = 0

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if not isinstance(exception, KeyboardInterrupt):
            return
        self.interrupted = True
        self.epoch, self.global_step = trainer.current_epoch, trainer.global_step
        if trainer.world_size > 1 or trainer.state.fn != TrainerFn.FITTING or not trainer.optimizers:
            return
        path = self.dirpath / INTERRUPTED_CHECKPOINT
        try:
            trainer.save_checkpoint(path, weights_only=False)  # full state: optimizer, loops, RNG-free
        except Exception as exc:  # the interrupt must still end the run cleanly
            log.warning("could not save %s on interrupt: %s", path, exc)
            return
        self.saved_path = path

    def message(self, resume_hint: str) -> str:
        """One line for the user: where the run stopped, what was saved, how to continue."""
        where = f"interrupted at epoch {self.epoch}, step {self.global_step}"
        if self.saved_path is not None:
            return f"{where}; saved {self.saved_path}; continue with {resume_hint} --resume {self.saved_path}"
        return f"{where}; no checkpoint saved at the interrupt; continue from the last epoch with {resume_hint} --resume last"
