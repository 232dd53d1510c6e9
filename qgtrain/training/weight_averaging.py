"""An exponential moving average of the weights: Lightning's ``EMAWeightAveraging`` with two additions.

Lightning's callback (lightning >= 2.6) keeps an ``AveragedModel`` copy of the module, updates it after
every optimizer step from ``start_step`` on (``W_ema <- decay * W_ema + (1 - decay) * W``, torch's
``get_ema_avg_fn``), swaps it in for each validation epoch, writes it as the checkpoint's
``state_dict`` (the trained weights under ``current_model_state``, ``n_averaged`` under
``averaging_state``), restores both on resume and leaves the averaged weights in the module when
training ends. Batch-norm statistics are averaged with the weights (``use_buffers=True``): the
running means and variances then follow the same average as the weights they normalise, where
copied ones would be the statistics of the current weights' features.

What this subclass adds, each a case where the upstream callback would evaluate or save other weights:

1. Until ``start_step`` the average is the current model (copied after every step). Upstream it is
   the module as it was at ``setup``: a validation epoch, the robustness monitor or a checkpoint
   before the start would see the initial weights.
2. Buffers that checkpoints do not hold (Normalize's mean and std: constants) are copied, not
   averaged: averaging a constant moves it by rounding (CIFAR-10's 0.4914 by 2e-6 in 5000 steps),
   and a resumed run, which rebuilds them, would then evaluate other constants than the run it continues.
3. A run stopped inside a validation epoch (SIGTERM is checked between validation batches) never
   reaches the epoch's end hook that swaps the trained weights back, so ``interrupted.ckpt`` would
   hold them the wrong way round. ``on_exception`` swaps them back; ``train.py`` puts this callback
   first, so that happens before :class:`~qgtrain.checkpoints.InterruptCheckpoint` saves, and
   each step's update happens before ``step.ckpt`` is written.

The upstream behaviour relied on is pinned by tests/test_ema.py (hooks, checkpoint keys) and
tests/test_compat.py (the average and the swap, reached through :mod:`qgtrain.compat`).
"""

from __future__ import annotations

import itertools
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import EMAWeightAveraging

from qgtrain.compat import averaged_model, swap_averaged_weights

DEFAULT_EMA_DECAY = 0.999
"""The decay ``--ema`` uses unless ``--ema-decay`` says otherwise (Lightning's default): an average
over about 1 / (1 - decay) = 1000 optimizer steps."""


class ExponentialMovingAverage(EMAWeightAveraging):
    """An exponential moving average of the module's weights and buffers, from ``start_step`` on."""

    def __init__(self, decay: float = DEFAULT_EMA_DECAY, start_step: int = 0) -> None:
        if isinstance(decay, bool) or not (isinstance(decay, int | float) and 0 <= decay < 1):
            raise ValueError(f"ema_decay must be a number in [0, 1), got {decay!r}")
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"ema_start_step must be an integer >= 0, got {start_step!r}")
        super().__init__(decay=float(decay), update_starting_at_step=start_step, use_buffers=True)
        self.decay = float(decay)
        self.start_step = start_step
        self._averaged_in = False

    def state_dict(self) -> dict[str, Any]:
        """Lightning's state, with the decay and the start step: ``--resume`` compares them."""
        return {**super().state_dict(), "decay": self.decay, "start_step": self.start_step}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        saved = pl_module.state_dict().keys()
        self._unsaved_buffers = [name for name, _ in pl_module.named_buffers() if name not in saved]

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        average = averaged_model(self)
        if average is None:
            return
        averaged = average.module
        to = dict(itertools.chain(averaged.named_parameters(), averaged.named_buffers()))
        source = dict(itertools.chain(pl_module.named_parameters(), pl_module.named_buffers()))
        started = trainer.global_step > self.start_step  # Lightning's first update copies at start_step
        for name in self._unsaved_buffers if started else source:
            to[name].detach().copy_(source[name].detach())

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_epoch_start(trainer, pl_module)
        self._averaged_in = averaged_model(self) is not None

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_epoch_end(trainer, pl_module)
        self._averaged_in = False

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if self._averaged_in:  # stopped inside a validation epoch: put the trained weights back
            swap_averaged_weights(self, pl_module)
            self._averaged_in = False
