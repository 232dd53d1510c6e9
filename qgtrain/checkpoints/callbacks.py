"""Lightning callbacks that write and restore resume points: ``last.ckpt`` after every epoch,
``step.ckpt`` inside an epoch, ``best.ckpt``'s settings, and the data loader's position on resume.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from qgtrain.checkpoints.resume import remove_superseded_interrupt
from qgtrain.compat import ModelCheckpointAfterWrite, load_pending_loader_state, set_step_and_time_triggers

log = logging.getLogger(__name__)

DEFAULT_CKPT_MINUTES = 10.0
"""``train.py``'s ``step.ckpt`` interval: a kill loses at most this many minutes. A time interval,
not a step count, bounds the write's share of training time on every machine (a GPU step is many
times shorter than a CPU step, a write is not); the write's measured cost is in docs/RESULTS.md
section 6."""


def best_checkpoint(monitor: str) -> dict[str, Any]:
    """``train.py``'s ``ModelCheckpoint`` arguments: ``best.ckpt`` is the model with the highest
    ``monitor``, the metric its caller names (the robustness callback's per-example worst case over
    its attacks, or the module's validation robust accuracy when robustness evaluation is off). The
    worst case exists only on evaluation epochs (the first, every N-th, the last), so the checkpoint
    is taken at train-epoch end, after the callback; between evaluations the stale value never beats
    the best. ``save_last`` is handed to :class:`LastCheckpoint`."""
    return {
        "monitor": monitor,
        "save_on_train_epoch_end": True,
        "mode": "max",
        "filename": "best",
        "save_last": True,
        "save_top_k": 1,
        "auto_insert_metric_name": False,
        "enable_version_counter": False,
    }


class ResumePoint(ModelCheckpointAfterWrite):
    """A checkpoint ``--resume`` continues from (``last.ckpt``, ``step.ckpt``). After each write the
    loggers are flushed, so the curves up to the checkpoint are on disk with it (a run killed later
    and resumed has no hole before its resume point), and the ``interrupted.ckpt`` this run resumed
    from is removed: the checkpoint just written continued it and supersedes it."""

    def after_write(self, trainer: L.Trainer, filepath: str) -> None:
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
        interval = timedelta(minutes=every_minutes) if every_minutes > 0 else None
        set_step_and_time_triggers(self, every_n_steps, interval)

    @property
    def state_key(self) -> str:
        """``StepCheckpoint{'name': 'step'}``, stable when the intervals change (the format of
        Lightning's ``Callback._generate_state_key``, which keys the state in written checkpoints)."""
        return f"{type(self).__qualname__}{ {'name': self.FILENAME}!r}"

    def after_write(self, trainer: L.Trainer, filepath: str) -> None:
        super().after_write(trainer, filepath)
        if trainer.is_global_zero:
            log.info(
                "step checkpoint %s: epoch %d, step %d", filepath, trainer.current_epoch, trainer.global_step
            )


class RestoreLoaderState(Callback):
    """Hand the checkpoint's ``StatefulDataLoader`` state to the loader when Lightning did not, and
    give the epoch resumed inside it its progress bar.

    Lightning 2.6 restores a stateful loader in ``FitLoop.setup_data``, but when
    ``configure_optimizers`` reads ``trainer.estimated_stepping_batches`` (as
    :class:`~qgtrain.training.AdversarialTraining` does for its LR schedule), the loader was set up
    before the checkpoint was read, and the state is silently dropped (Lightning issue #20550):
    the resumed epoch would start again at its first batch. At ``on_train_start`` the fit loop has
    read the checkpoint; this loads the pending state through the fit loop's own method (which
    applies it only when restarting inside an epoch) and recreates the batch iterator from it.

    An epoch resumed inside gets no ``on_train_epoch_start`` (it started before the checkpoint), the
    hook in which the progress bar sets the epoch's total and its ``Epoch N`` label: the bar would
    count ``80/?``. Before the first resumed batch the progress bar's hook is called, and a tqdm
    bar starts at the batches already done (``80/550``, its rate from the resumed batches only).
    """

    def __init__(self) -> None:
        self._resumed_inside_epoch = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._resumed_inside_epoch = trainer.fit_loop.restarted_mid_epoch
        load_pending_loader_state(trainer)  # iterates from the restored position when it loads

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self._resumed_inside_epoch:
            return
        self._resumed_inside_epoch = False
        bar = trainer.progress_bar_callback
        if bar is None:
            return
        bar.on_train_epoch_start(trainer, pl_module)
        tqdm_bar = getattr(bar, "train_progress_bar", None)  # TQDMProgressBar; Rich counts from the update
        if tqdm_bar is not None and hasattr(tqdm_bar, "initial"):
            tqdm_bar.initial = tqdm_bar.n = batch_idx
            tqdm_bar.refresh()
