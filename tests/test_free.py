"""Issue 23, free adversarial training (Shafahi et al. 2019): m replays per batch, each one optimizer step
whose backward pass also steps delta; delta carried across replays and batches; epochs divided by m;
delta in the checkpoint (exact resume)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from qgtrain.attacks import Free, build_attack, quantize_gradient
from qgtrain.checkpoints import finished_message
from qgtrain.cli import train as train_cli
from qgtrain.models import TinyCNN
from qgtrain.training import AdversarialTraining, quiet_trainer
from qgtrain.training.module import free_training_epochs
from tests.helpers import (
    REFUSED_RUN_ARGS,
    call_main,
    ddp_fit,
    error_lines,
    fit_killed_and_resumed,
    fit_uninterrupted,
    load_mnist_tensors,
    no_training,
    output_roots,
    same_weights,
)

EPS = 0.3


def _module(replays: int = 2, b: int = 1) -> AdversarialTraining:
    torch.manual_seed(0)
    free = Free(eps=EPS, replays=replays, b=b)
    return AdversarialTraining(TinyCNN(width=4), free, track_clean_accuracy=False)


def _loader(n: int = 64) -> DataLoader:
    x, y = load_mnist_tensors(n)
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)


class CountForwards(L.Callback):
    """Training forward passes of the network per batch."""

    def __init__(self) -> None:
        self.per_batch: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.per_batch.append(0)
        if not hasattr(self, "_hook"):
            self._hook = pl_module.net.register_forward_hook(lambda *_: self._count())

    def _count(self) -> None:
        self.per_batch[-1] += 1


def test_each_batch_is_replayed_m_times_and_epochs_are_divided_by_m() -> None:
    module, counter = _module(replays=3), CountForwards()
    trainer = quiet_trainer(max_epochs=6, limit_val_batches=0, callbacks=[counter])
    trainer.fit(module, _loader())
    assert trainer.current_epoch == 2  # 6 data passes = 2 epochs x 3 replays
    assert counter.per_batch == [3] * 8  # 2 epochs x 4 batches, 3 forward/backward passes each
    assert trainer.global_step == 24  # one optimizer step per replay


@pytest.mark.parametrize("b", [1, 100])
def test_delta_steps_by_eps_times_the_quantized_input_gradient_of_the_training_pass(b: int) -> None:
    module = _module(replays=1, b=b)
    net0 = TinyCNN(width=4)
    net0.load_state_dict(module.net.state_dict())
    x, y = load_mnist_tensors(16)
    quiet_trainer(max_steps=1, limit_val_batches=0).fit(
        module, DataLoader(TensorDataset(x, y), batch_size=16)
    )
    x0 = x.clone().requires_grad_(True)  # delta starts at 0
    (grad,) = torch.autograd.grad(F.cross_entropy(net0(x0), y), x0)
    expected = (EPS * quantize_gradient(grad, b)).clamp(-EPS, EPS)
    assert torch.allclose(module.free_delta, expected, atol=1e-6)
    assert module.free_delta.abs().max() <= EPS + 1e-7


class ResetDelta(L.Callback):
    """The control: delta set back to zero before every batch (no carry-over to the next batch)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        pl_module.free_delta = None


class RecordDelta(L.Callback):
    def __init__(self) -> None:
        self.before: list[torch.Tensor | None] = []
        self.after: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        d = pl_module.free_delta
        self.before.append(None if d is None else d.clone())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.after.append(pl_module.free_delta.clone())


def test_delta_carries_over_to_the_next_batch_and_a_reset_control_differs() -> None:
    carried, record = _module(), RecordDelta()
    quiet_trainer(max_epochs=2, limit_val_batches=0, callbacks=[record]).fit(carried, _loader())
    assert record.before[0] is None
    assert all(torch.equal(b, a) for b, a in zip(record.before[1:], record.after[:-1], strict=True))
    reset = _module()
    quiet_trainer(max_epochs=2, limit_val_batches=0, callbacks=[ResetDelta()]).fit(reset, _loader())
    assert not same_weights(carried.net, reset.net)


def test_epochs_that_the_replays_do_not_divide_are_refused_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """``--epochs 10 --replays 4`` would be 2.5 epochs: refused in one line naming both flags (the
    ceiling trained 12 data passes, the floor 8). Control: ``--epochs 8`` passes the check."""
    assert free_training_epochs(8, 4) == 2
    with pytest.raises(ValueError, match="use --epochs 8 or --epochs 12"):
        free_training_epochs(10, 4)
    monkeypatch.setattr(L.Trainer, "fit", no_training)
    argv = [*REFUSED_RUN_ARGS, *output_roots(tmp_path), "--inner", "free", "--replays", "4"]
    assert call_main(train_cli.main, [*argv, "--epochs", "10"]) == 2
    assert error_lines(capsys.readouterr().err) == [
        "train.py: error: free adversarial training replays each batch 4 times and runs epochs / 4 epochs, "
        "so max_epochs (--epochs) must be a multiple of replays (--replays) 4, got 10; use --epochs 8 or --epochs 12"
    ]
    with pytest.raises(AssertionError, match="training started"):
        call_main(train_cli.main, [*argv, "--epochs", "8"])


def test_a_finished_free_run_is_told_in_data_passes() -> None:
    """2 epochs of m = 4 replays are 8 data passes: finished for ``--epochs 8``, not for 12 (the
    control); before, 2 epochs were compared with ``--epochs`` and a finished run resumed to train nothing."""
    progress = {"loops": {"fit_loop": {"epoch_progress": {"current": {"processed": 2}}}}}
    checkpoint = {**progress, "global_step": 32, "qgtrain": {"inner": {"name": "free", "replays": 4}}}
    message = finished_message(checkpoint, Path("run/last.ckpt"), 8, -1)
    assert message is not None and "(8 of 8 data passes in last.ckpt)" in message and "N > 8" in message
    assert finished_message(checkpoint, Path("run/last.ckpt"), 12, -1) is None
    madry = {**progress, "global_step": 32, "qgtrain": {"inner": {"name": "pgd", "steps": 2}}}
    assert "(2 of 2 epochs" in finished_message(madry, Path("run/last.ckpt"), 2, -1)


def test_cost_per_example_is_the_training_pass_only() -> None:
    free = build_attack("free", eps=EPS, replays=8)
    assert free.gradients_per_example == 0 and free.single_step and free.config()["replays"] == 8
    with pytest.raises(ValueError, match="replays must be an integer >= 1"):
        Free(eps=EPS, replays=0)


def test_kill_and_resume_inside_an_epoch_is_bit_exact_and_needs_delta(
    data_root: Path, tmp_path: Path
) -> None:
    """4 batches/epoch, m = 2, 6 data passes = 3 epochs; killed after 7 batches, the step.ckpt of
    every 6 optimizer steps was written at step 12 (batch 6, mid-epoch 2). Control: that checkpoint
    without delta."""
    whole = fit_uninterrupted(_module, data_root, max_epochs=6)
    resumed = fit_killed_and_resumed(
        _module, data_root, tmp_path / "a", 6, kill_after_batches=7, every_n_steps=6
    )
    assert same_weights(resumed.net, whole.net)
    assert torch.equal(resumed.free_delta, whole.free_delta)

    def drop_delta(checkpoint: dict) -> None:
        assert checkpoint["global_step"] == 12 and checkpoint["qgtrain_state"]["free_delta"].shape == (
            1,
            16,
            1,
            28,
            28,
        )
        del checkpoint["qgtrain_state"]

    control = fit_killed_and_resumed(
        _module,
        data_root,
        tmp_path / "b",
        6,
        kill_after_batches=7,
        every_n_steps=6,
        edit_checkpoint=drop_delta,
    )
    assert not same_weights(control.net, whole.net)


@pytest.mark.slow
def test_ddp_keeps_one_delta_per_process_and_the_checkpoint_holds_both(
    data_root: Path, tmp_path: Path
) -> None:
    """2 processes, 32 examples each = 2 batches of 16, 2 data passes / m = 2 -> 1 epoch, 4 steps."""
    checkpoint, states = ddp_fit("free", data_root, tmp_path, epochs=2)
    saved = checkpoint["qgtrain_state"]["free_delta"]
    assert checkpoint["global_step"] == 4 and saved.shape == (2, 16, 1, 28, 28)
    assert torch.equal(saved[0], states[0]["delta"]) and torch.equal(saved[1], states[1]["delta"])
    assert not torch.equal(saved[0], saved[1])  # each process carries its own perturbation


class RecordLearningRate(L.Callback):
    def __init__(self) -> None:
        self.after_batch: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.after_batch.append(trainer.optimizers[0].param_groups[0]["lr"] / LR)


LR = 1e-3


def test_the_lr_schedule_spans_the_replayed_optimizer_steps() -> None:
    """piecewise: x0.1 from 50 %, x0.01 from 75 % of the optimizer steps. 4 data passes / m = 2 -> 2
    epochs x 4 batches x 2 replays = 16 steps: after batch k (2k + 2 steps) the rate for step 2k + 2.
    A schedule over 8 steps (replays not counted) or 32 (epochs not divided) would switch elsewhere."""
    torch.manual_seed(0)
    module = AdversarialTraining(
        TinyCNN(width=4),
        Free(eps=EPS, replays=2),
        optimizer=lambda params: torch.optim.Adam(params, lr=LR),
        lr_schedule="piecewise",
        track_clean_accuracy=False,
    )
    record = RecordLearningRate()
    trainer = quiet_trainer(max_epochs=4, limit_val_batches=0, callbacks=[record])
    trainer.fit(module, _loader())
    assert trainer.global_step == 16
    assert record.after_batch == pytest.approx([1, 1, 1, 0.1, 0.1, 0.01, 0.01, 0.01])
