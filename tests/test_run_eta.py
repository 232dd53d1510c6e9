"""RunEstimate: the run's time from the first timed batches, validation and the monitor's gradients,
then from each measured epoch."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import lightning as L
import pytest
import torch

from qgtrain.attacks import PGD
from qgtrain.callbacks import RobustnessEvaluation, RunEstimate
from qgtrain.evaluation.planning import format_duration
from qgtrain.models import TinyCNN
from qgtrain.training import AdversarialTraining, quiet_trainer
from tests.helpers import small_mnist_datamodule

EPOCHS, BATCHES, BATCH = 3, 4, 16  # small_mnist_datamodule: 64 training images in batches of 16
VALIDATION_SECONDS = 5.0


class Clock(L.Callback):
    """The run's clock: each training batch takes ``per_batch`` seconds, each validation 5 s."""

    def __init__(self, per_batch: float) -> None:
        self.per_batch, self.now = per_batch, 0.0

    def __call__(self) -> float:
        return self.now

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.now += self.per_batch

    def on_validation_end(self, trainer, pl_module) -> None:
        self.now += VALIDATION_SECONDS


def estimates(root: Path, caplog: pytest.LogCaptureFixture, per_batch: float, monitor: bool) -> list[str]:
    torch.manual_seed(0)
    module = AdversarialTraining(
        TinyCNN(dataset="mnist", width=4),
        PGD(eps=0.3, alpha=0.1, steps=2),
        val_attack=PGD(eps=0.3, alpha=0.1, steps=2),
        eps_warmup_epochs=0.0,
    )
    clock = Clock(per_batch)
    callbacks: list[L.Callback] = [clock, RunEstimate(measured_batches=2, clock=clock)]
    if monitor:
        callbacks.append(RobustnessEvaluation(subset_size=32, batch_size=32, steps=2, log_hparams=False))
    trainer = quiet_trainer(max_epochs=EPOCHS, limit_val_batches=1, callbacks=callbacks)
    with caplog.at_level(logging.INFO, logger="qgtrain.callbacks.run_eta"):
        trainer.fit(module, datamodule=small_mnist_datamodule(root, train_subset=BATCHES * BATCH, batch_size=BATCH))
    return [r.getMessage() for r in caplog.records if r.name == "qgtrain.callbacks.run_eta"]


@pytest.mark.parametrize("per_batch", [1.0, 2.0])  # the second is the control: the numbers follow the clock
def test_the_estimate_is_measured_then_updated_after_each_epoch(
    per_batch: float, data_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Timed over batches 1-2 of epoch 0, the batches left (1 in epoch 0, then 4 per epoch) at the
    clock's speed; after epochs 0 and 1, the epochs left at the measured epoch time (its batches
    and its validation)."""
    first, *updates = estimates(data_root, caplog, per_batch, monitor=False)
    left = 1 + (EPOCHS - 1) * BATCHES
    assert f"({left} training batches left at {per_batch:.2f} s, timed over 2 batches;" in first, first
    epoch = format_duration(BATCHES * per_batch + VALIDATION_SECONDS)
    assert len(updates) == EPOCHS - 1, updates
    assert f"(2 epochs left at {epoch} each" in updates[0] and updates[0].startswith("estimate after epoch 0")
    assert f"(1 epoch left at {epoch} each" in updates[1] and updates[1].startswith("estimate after epoch 1")


def test_the_first_estimate_adds_validation_and_the_monitor_at_the_training_price_per_gradient(
    data_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """At 1 s per batch of 16 examples x (2 attack steps + the update), a gradient costs 1/48 s; each
    epoch validates 64 examples with PGD-2, and the monitor attacks 32 with BLOB_QG-2 then APGD-T.
    Control: without the monitor only validation's share is added."""
    per_gradient = 1.0 / (BATCH * 3)
    validation = EPOCHS * 64 * 2 * per_gradient
    without = estimates(data_root, caplog, 1.0, monitor=False)[0]
    caplog.clear()
    monitor = RobustnessEvaluation(subset_size=32, steps=2, log_hparams=False).build_attacks(0.3)
    evaluation = EPOCHS * 32 * sum(attack.gradients_per_example for attack in monitor.values()) * per_gradient
    with_monitor = estimates(data_root, caplog, 1.0, monitor=True)[0]
    share = re.compile(r"validation and robustness evaluation up to about ([^)]+)\)")
    assert share.search(without).group(1) == format_duration(validation), without
    assert share.search(with_monitor).group(1) == format_duration(validation + evaluation), with_monitor
    assert evaluation > 1.0  # the two differ by more than the rounding of format_duration


def test_measured_batches_must_be_positive() -> None:
    with pytest.raises(ValueError, match="measured_batches must be an integer >= 1"):
        RunEstimate(measured_batches=0)
