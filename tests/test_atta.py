"""Issue 23, ATTA (Zheng et al. 2020): a perturbation per training example, indexed by its position in the
training split, kept across epochs and across a kill/resume (bit-exact); the inner attack starts there."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import (
    ddp_fit,
    fit_killed_and_resumed,
    fit_uninterrupted,
    quiet_trainer,
    same_weights,
    small_mnist_datamodule,
)

from qgtrain.attacks import PGD, PQGD
from qgtrain.data import CIFAR10DataModule
from qgtrain.models import TinyCNN
from qgtrain.training import AdversarialTraining

EPS = 0.3


class StartSpy(PGD):
    """PGD that records where each run starts (relative to the clean input) and where it ends."""

    starts: list[torch.Tensor]
    ends: list[torch.Tensor]

    def _run_once(self, model, x, y, start, target, observer, early_exit):
        run = super()._run_once(model, x, y, start, target, observer, early_exit)
        self.starts.append(start - x)
        self.ends.append(run.x_adv - x)
        return run


def _spy_module(atta: bool = True) -> AdversarialTraining:
    torch.manual_seed(0)
    spy = StartSpy(eps=EPS, alpha=0.1, steps=1)
    spy.starts, spy.ends = [], []
    return AdversarialTraining(TinyCNN(width=4), spy, atta=atta, track_clean_accuracy=False)


def record_indices(module: AdversarialTraining) -> list[torch.Tensor]:
    """Wrap ``module.craft`` so each batch's training-split indices are appended to the returned list."""
    indices: list[torch.Tensor] = []
    original = module.craft

    def craft(x, y, index=None):
        indices.append(index.clone())
        return original(x, y, index)

    module.craft = craft
    return indices


def test_each_example_starts_where_its_previous_epoch_ended(data_root: Path) -> None:
    """64 examples, 4 batches/epoch, 2 epochs: in epoch 2 the start of example i is the perturbation
    it ended epoch 1 with (looked up by its index; the order is reshuffled). Control: without atta the
    starts are fresh random points."""
    module = _spy_module()
    datamodule = small_mnist_datamodule(data_root)
    indices = record_indices(module)
    quiet_trainer(max_epochs=2, limit_val_batches=0).fit(module, datamodule=datamodule)
    spy = module.inner
    assert len(indices) == 8 and all(i.shape == (16,) for i in indices)
    first = torch.cat(indices[:4])
    assert sorted(first.tolist()) == list(range(64))  # positions in the training split, each once
    ended = torch.zeros(64, 1, 28, 28)
    ended[first] = torch.cat(spy.ends[:4])
    assert torch.equal(torch.cat(spy.starts[4:]), ended[torch.cat(indices[4:])])
    assert torch.equal(module.perturbations.delta[torch.cat(indices[4:])], torch.cat(spy.ends[4:]))
    assert bool(module.perturbations.seen.all())

    control = _spy_module(atta=False)
    quiet_trainer(max_epochs=2, limit_val_batches=0).fit(
        control, datamodule=small_mnist_datamodule(data_root)
    )
    assert not torch.equal(torch.cat(control.inner.starts[4:]), ended[torch.cat(indices[4:])])


class SharedStartSpy(PGD):
    """StartSpy recording on the class: TRADES rebuilds the inner attack with the kl loss."""

    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def _run_once(self, model, x, y, start, target, observer, early_exit):
        run = super()._run_once(model, x, y, start, target, observer, early_exit)
        SharedStartSpy.seen.append((start - x, run.x_adv - x, y))
        return run


def test_atta_with_trades_starts_at_the_small_noise_once_then_at_the_stored_perturbation(
    data_root: Path,
) -> None:
    """ATTA over the TRADES objective: an example's first visit starts at TRADES's x + 0.001 N(0, 1)
    (not the attack's uniform start), its next at the perturbation it ended with; the attack is given
    the clean softmax (the kl loss) both times."""
    torch.manual_seed(0)
    SharedStartSpy.seen = []
    inner = SharedStartSpy(eps=EPS, alpha=0.1, steps=1)
    module = AdversarialTraining(
        TinyCNN(width=4), inner, atta=True, objective="trades", track_clean_accuracy=False
    )
    indices = record_indices(module)
    quiet_trainer(max_epochs=2, limit_val_batches=0).fit(module, datamodule=small_mnist_datamodule(data_root))
    starts, ends, labels = (torch.cat(t) for t in zip(*SharedStartSpy.seen, strict=True))
    assert starts.shape[0] == 128 and labels.shape == (128, 10)  # soft labels: softmax(f(x))
    assert float(starts[:64].abs().max()) < 0.01 and float(starts[:64].std()) > 5e-4  # 0.001 N(0, 1)
    ended = torch.zeros(64, 1, 28, 28)
    ended[torch.cat(indices[:4])] = ends[:64]
    assert torch.equal(starts[64:], ended[torch.cat(indices[4:])])
    assert float(starts[64:].abs().max()) > 0.05  # the control: a stored step, not the noise


def _module() -> AdversarialTraining:
    torch.manual_seed(0)
    return AdversarialTraining(
        TinyCNN(width=4), PQGD(eps=EPS, steps=2), atta=True, track_clean_accuracy=False
    )


def test_kill_and_resume_inside_an_epoch_is_bit_exact_and_needs_the_buffer(
    data_root: Path, tmp_path: Path
) -> None:
    """ATTA-2 with PQGD (b = 100), 3 epochs of 4 batches; killed after 7 batches, resumed from the step
    checkpoint of step 6 (mid-epoch 2). Control: that checkpoint without the buffer."""
    whole = fit_uninterrupted(_module, data_root, max_epochs=3)
    resumed = fit_killed_and_resumed(
        _module, data_root, tmp_path / "a", 3, kill_after_batches=7, every_n_steps=6
    )
    assert same_weights(resumed.net, whole.net)
    assert torch.equal(resumed.perturbations.delta, whole.perturbations.delta)

    def drop_buffer(checkpoint: dict) -> None:
        atta = checkpoint["qgtrain_state"]["atta"]
        assert (
            checkpoint["global_step"] == 6 and atta["delta"].shape == (64, 1, 28, 28) and atta["seen"].all()
        )
        del checkpoint["qgtrain_state"]

    control = fit_killed_and_resumed(
        _module,
        data_root,
        tmp_path / "b",
        3,
        kill_after_batches=7,
        every_n_steps=6,
        edit_checkpoint=drop_buffer,
    )
    assert not same_weights(control.net, whole.net)


def test_atta_refuses_augmented_data_and_no_inner_attack_in_one_line(tmp_path: Path) -> None:
    module = AdversarialTraining(TinyCNN(width=4), PGD(eps=EPS, steps=1), atta=True)
    trainer = quiet_trainer(max_steps=1)
    module.trainer = trainer
    trainer.datamodule = CIFAR10DataModule(data_dir=str(tmp_path))  # augment_train: crops and flips
    with pytest.raises(ValueError, match="random crops and flips"):
        module.setup("fit")
    with pytest.raises(ValueError, match="atta warm-starts an inner attack"):
        AdversarialTraining(TinyCNN(width=4), None, atta=True)


def test_the_data_module_yields_indices_only_when_asked(data_root: Path) -> None:
    datamodule = small_mnist_datamodule(data_root)
    datamodule.setup("fit")
    assert len(next(iter(datamodule.train_dataloader()))) == 2
    datamodule.yield_indices = True
    x, y, index = next(iter(datamodule.train_dataloader()))
    assert torch.equal(x, datamodule.train_set.images[index].float() / 255) and torch.equal(
        y, datamodule.train_set.labels[index]
    )


@pytest.mark.slow
def test_ddp_processes_share_one_complete_buffer(data_root: Path, tmp_path: Path) -> None:
    """One epoch on 2 processes: each visited 32 of the 64 examples, yet both buffers hold all 64,
    identically, and so does rank 0's checkpoint."""
    checkpoint, states = ddp_fit("atta", data_root, tmp_path, epochs=1)
    saved = checkpoint["qgtrain_state"]["atta"]
    assert int(saved["seen"].sum()) == 64 and checkpoint["global_step"] == 2
    assert all(
        torch.equal(s["delta"], saved["delta"]) and torch.equal(s["seen"], saved["seen"]) for s in states
    )
