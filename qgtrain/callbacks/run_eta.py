"""The whole run's time: estimated from the first measured training batches, updated after each epoch.

The progress bar gives the current epoch's time only. :class:`RunEstimate` logs one line once it has
timed ``measured_batches`` training batches (after the first, which pays for start-up): the training
batches left at that speed, plus validation and the robustness evaluation, costed by their input
gradients at the training batches' price per gradient. After each epoch the line is given again from
the measured epochs, validation and evaluation included.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from qgtrain.attacks import Attack
from qgtrain.callbacks.validation_data import limited_validation_size, validation_dataset
from qgtrain.evaluation.planning import format_duration

log = logging.getLogger(__name__)


class RunEstimate(Callback):
    """Log the run's remaining time: once after ``measured_batches`` timed training batches, then at
    the start of every later epoch from the epochs measured so far (rank zero only).

    The early estimate adds, per epoch left, validation's gradients (``val_attack`` on the validation
    examples) and those of every callback with ``planned_gradients(trainer, epochs)`` (the robustness
    evaluation), each at the training batches' measured time per gradient; the attacks' early exit
    makes those an upper bound in gradients. ``clock`` is the time source (seconds; tests pass their own).
    """

    def __init__(self, measured_batches: int = 5, clock: Callable[[], float] = time.monotonic) -> None:
        if isinstance(measured_batches, bool) or measured_batches < 1:
            raise ValueError(f"measured_batches must be an integer >= 1, got {measured_batches}")
        self.measured_batches = int(measured_batches)
        self.clock = clock
        self._mark: tuple[float, int] | None = None  # (time, batch index) of the first batch's end
        self._estimated = False
        self._epoch_start = 0.0
        self._whole_epoch = False  # the current epoch started at its first batch (not resumed inside)
        self._epoch_seconds: list[float] = []

    # ---------------------------------------------------------------- hooks
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._mark, self._estimated, self._epoch_seconds = None, False, []
        self._epoch_start = self.clock()  # an epoch resumed inside gets no epoch-start hook
        self._whole_epoch = False

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        now = self.clock()
        if self._whole_epoch:  # the epoch before this one ran whole: its time, everything included
            self._epoch_seconds.append(now - self._epoch_start)
            self._report_epochs(trainer)
        self._epoch_start, self._whole_epoch, self._mark = now, True, None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._estimated:
            return
        now = self.clock()
        last = batch_idx + 1 >= trainer.num_training_batches
        if self._mark is None:
            self._mark = (now, batch_idx)
            if last:  # a one-batch epoch: that batch, start-up included, is all there is to time
                self._report_batches(trainer, pl_module, batch, batch_idx, now - self._epoch_start, 1)
            return
        timed = batch_idx - self._mark[1]
        if timed >= self.measured_batches or last:
            self._report_batches(trainer, pl_module, batch, batch_idx, now - self._mark[0], timed)

    # ---------------------------------------------------------------- the two estimates
    def _report_batches(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int, seconds: float, timed: int
    ) -> None:
        """The first estimate: batches left at the measured speed, plus validation and evaluation."""
        self._estimated = True
        per_epoch, in_epoch = trainer.num_training_batches, trainer.num_training_batches - batch_idx - 1
        batches_left = in_epoch + (planned_epochs(trainer) - trainer.current_epoch - 1) * per_epoch
        if trainer.max_steps is not None and trainer.max_steps > 0:
            batches_left = min(batches_left, trainer.max_steps - trainer.global_step)
        if not math.isfinite(batches_left) or not trainer.is_global_zero:
            return  # an unbounded run, or a process other than rank zero
        per_batch = seconds / timed
        epochs_after = math.ceil(max(batches_left - in_epoch, 0) / per_epoch)
        epochs = range(trainer.current_epoch, trainer.current_epoch + 1 + epochs_after)
        per_gradient = per_batch / training_gradients(pl_module, batch)
        other = per_gradient * (validation_gradients(trainer, pl_module, epochs) + monitor_gradients(trainer, epochs))
        left = batches_left * per_batch + other
        log.info(
            "estimate: the run ends in about %s, at %s (%d training batches left at %.2f s, timed over %d "
            "batch%s; validation and robustness evaluation up to about %s); updated after each epoch",
            format_duration(left),
            clock_time(left),
            int(batches_left),
            per_batch,
            timed,
            "" if timed == 1 else "es",
            format_duration(other),
        )

    def _report_epochs(self, trainer: L.Trainer) -> None:
        """After an epoch: the epochs left at the mean time of the whole epochs measured."""
        epochs_left = planned_epochs(trainer) - trainer.current_epoch
        if not math.isfinite(epochs_left) or not trainer.is_global_zero:
            return
        per_epoch = sum(self._epoch_seconds) / len(self._epoch_seconds)
        left = epochs_left * per_epoch
        log.info(
            "estimate after epoch %d: the run ends in about %s, at %s (%d epoch%s left at %s each, "
            "validation and robustness evaluation included)",
            trainer.current_epoch - 1,
            format_duration(left),
            clock_time(left),
            epochs_left,
            "" if epochs_left == 1 else "s",
            format_duration(per_epoch),
        )


def planned_epochs(trainer: L.Trainer) -> float:
    """The epochs ``fit`` runs (``max_epochs``; unbounded: infinity, then ``max_steps`` bounds it)."""
    epochs = trainer.max_epochs
    return float(epochs) if epochs is not None and epochs >= 0 else math.inf


def training_gradients(pl_module: L.LightningModule, batch: Any) -> int:
    """Input or weight gradients of one training batch: the inner attack's per example, and the update."""
    x = batch[0] if isinstance(batch, list | tuple) else batch
    inner = getattr(pl_module, "inner", None)
    per_example = inner.gradients_per_example if isinstance(inner, Attack) else 0
    return len(x) * (per_example + 1)


def validation_gradients(trainer: L.Trainer, pl_module: L.LightningModule, epochs: range) -> int:
    """Gradients of ``val_attack`` over the validation examples in the ``epochs`` that validate."""
    attack = getattr(pl_module, "val_attack", None)
    if not isinstance(attack, Attack) or not trainer.limit_val_batches:
        return 0
    examples = limited_validation_size(trainer, len(validation_dataset(trainer)))
    every = trainer.check_val_every_n_epoch or 1
    return examples * attack.gradients_per_example * sum((epoch + 1) % every == 0 for epoch in epochs)


def monitor_gradients(trainer: L.Trainer, epochs: range) -> int:
    """What the callbacks that plan their gradients (the robustness evaluation) spend after ``epochs``."""
    plans = (getattr(callback, "planned_gradients", None) for callback in trainer.callbacks)
    return sum(plan(trainer, epochs) for plan in plans if plan is not None)


def clock_time(seconds_from_now: float) -> str:
    """The wall-clock time ``seconds_from_now``: ``16:40``, or ``Tue 16:40`` beyond a day."""
    when = time.localtime(time.time() + seconds_from_now)
    return time.strftime("%H:%M" if seconds_from_now < 86400 else "%a %H:%M", when)
