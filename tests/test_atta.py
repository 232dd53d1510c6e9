"""Issue 23, ATTA (Zheng et al. 2020): a perturbation per training example, indexed by its position in the
training split, kept across epochs and across a kill/resume (bit-exact); the inner attack starts there."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from qgtrain.attacks import PGD, PQGD
from qgtrain.data import CIFAR10DataModule
from qgtrain.data.datamodules import ImageTensorDataset
from qgtrain.models import TinyCNN
from qgtrain.training import AdversarialTraining, quiet_trainer
from qgtrain.training.atta import PerturbationBuffer
from tests.helpers import (
    ddp_fit,
    fit_killed_and_resumed,
    fit_uninterrupted,
    same_weights,
    small_mnist_datamodule,
    write_cifar,
)

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


def _spy_module(atta: bool = True, reset_epochs: int = 0) -> AdversarialTraining:
    torch.manual_seed(0)
    spy = StartSpy(eps=EPS, alpha=0.1, steps=1)
    spy.starts, spy.ends = [], []
    return AdversarialTraining(
        TinyCNN(width=4), spy, atta=atta, atta_reset_epochs=reset_epochs, track_clean_accuracy=False
    )


def record_indices(module: AdversarialTraining) -> list[torch.Tensor]:
    """Wrap ``module.craft`` so each batch's training-split indices are appended to the returned list."""
    indices: list[torch.Tensor] = []
    original = module.craft

    def craft(x, y, index=None, view=None):
        indices.append(index.clone())
        return original(x, y, index, view)

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
    assert module.perturbations.visited.tolist() == [1] * 64  # each visited last in epoch 1

    control = _spy_module(atta=False)
    quiet_trainer(max_epochs=2, limit_val_batches=0).fit(
        control, datamodule=small_mnist_datamodule(data_root)
    )
    assert not torch.equal(torch.cat(control.inner.starts[4:]), ended[torch.cat(indices[4:])])


class SharedStartSpy(PGD):
    """StartSpy recording on the class: TRADES rebuilds the inner attack with the kl loss."""

    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

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


def _module(reset_epochs: int = 0) -> AdversarialTraining:
    torch.manual_seed(0)
    return AdversarialTraining(
        TinyCNN(width=4),
        PQGD(eps=EPS, steps=2),
        atta=True,
        atta_reset_epochs=reset_epochs,
        track_clean_accuracy=False,
    )


def resumes_exactly_unless_edited(
    build: Callable[[], AdversarialTraining],
    root: Path,
    folder: Path,
    epochs: int,
    kill_after: int,
    every: int,
    edit: Callable[[dict], None],
) -> None:
    """Killed after ``kill_after`` batches and resumed from the step checkpoint (every ``every`` steps),
    ``build()`` ends with the weights and buffer of an uninterrupted run; resumed from that checkpoint
    edited by ``edit`` (the control), its weights differ."""
    whole = fit_uninterrupted(build, root, max_epochs=epochs)
    resumed = fit_killed_and_resumed(
        build, root, folder / "a", epochs, kill_after_batches=kill_after, every_n_steps=every
    )
    assert same_weights(resumed.net, whole.net)
    assert torch.equal(resumed.perturbations.delta, whole.perturbations.delta)
    control = fit_killed_and_resumed(
        build,
        root,
        folder / "b",
        epochs,
        kill_after_batches=kill_after,
        every_n_steps=every,
        edit_checkpoint=edit,
    )
    assert not same_weights(control.net, whole.net)


def test_kill_and_resume_inside_an_epoch_is_bit_exact_and_needs_the_buffer(
    data_root: Path, tmp_path: Path
) -> None:
    """ATTA-2 with PQGD (b = 100), 3 epochs of 4 batches; killed after 7 batches, resumed from the step
    checkpoint of step 6 (mid-epoch 2). Control: that checkpoint without the buffer."""

    def drop_buffer(checkpoint: dict) -> None:
        assert checkpoint["qgtrain"]["atta"] is True  # the record says how it was trained
        atta = checkpoint["qgtrain_state"]["atta"]
        assert checkpoint["global_step"] == 6 and atta["delta"].shape == (64, 1, 28, 28)
        assert (atta["visited"] >= 0).all()
        del checkpoint["qgtrain_state"]

    resumes_exactly_unless_edited(_module, data_root, tmp_path, 3, kill_after=7, every=6, edit=drop_buffer)


def test_every_reset_period_starts_each_example_afresh(data_root: Path) -> None:
    """``atta_reset_epochs=2``, 3 epochs: epoch 1 starts where epoch 0 ended; epoch 2 (a new period)
    starts at the attack's own random start, not at what epoch 1 left. Control: without the reset,
    epoch 2 starts where epoch 1 ended."""

    def starts_and_ends(
        reset_epochs: int,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], AdversarialTraining]:
        module = _spy_module(reset_epochs=reset_epochs)
        indices = record_indices(module)
        quiet_trainer(max_epochs=3, limit_val_batches=0).fit(
            module, datamodule=small_mnist_datamodule(data_root)
        )
        per_epoch = [torch.cat(indices[4 * e : 4 * e + 4]) for e in range(3)]
        starts = [torch.cat(module.inner.starts[4 * e : 4 * e + 4]) for e in range(3)]
        ends = [torch.zeros(64, 1, 28, 28) for _ in range(3)]
        for e in range(3):
            ends[e][per_epoch[e]] = torch.cat(module.inner.ends[4 * e : 4 * e + 4])
        return [s[per_epoch[e].argsort()] for e, s in enumerate(starts)], ends, module

    starts, ends, module = starts_and_ends(reset_epochs=2)
    assert torch.equal(starts[1], ends[0])  # the same period: kept
    assert not torch.isclose(starts[2], ends[1]).all(dim=(1, 2, 3)).any()  # a new one: every example afresh
    assert float(starts[2].abs().max()) <= EPS + 1e-6 and float(starts[2].std()) > 0.1  # uniform in the ball
    assert module.perturbations.visited.tolist() == [2] * 64
    control, control_ends, _ = starts_and_ends(reset_epochs=0)
    assert torch.equal(control[2], control_ends[1])


def test_kill_and_resume_inside_a_reset_period_is_bit_exact(data_root: Path, tmp_path: Path) -> None:
    """Reset every 2 epochs, 4 epochs of 4 batches; killed after 11 batches, resumed from step 10 (epoch
    2, the new period, half visited). Control: that checkpoint with every example marked as visited in
    epoch 2, so the unvisited half would keep epoch 1's perturbations."""

    def all_visited(checkpoint: dict) -> None:
        visited = checkpoint["qgtrain_state"]["atta"]["visited"]
        assert checkpoint["global_step"] == 10 and sorted(visited.tolist()) == [1] * 32 + [2] * 32
        visited.fill_(2)

    build = lambda: _module(reset_epochs=2)  # noqa: E731
    resumes_exactly_unless_edited(build, data_root, tmp_path, 4, kill_after=11, every=10, edit=all_visited)


def test_a_buffer_saved_before_visit_epochs_were_kept_loads_as_visited_in_epoch_0() -> None:
    buffer = PerturbationBuffer()
    buffer.load_state_dict({"delta": torch.ones(3, 1, 2, 2), "seen": torch.tensor([True, False, True])})
    assert buffer.visited.tolist() == [0, -1, 0]


def test_atta_refuses_no_inner_attack_and_a_reset_without_atta_in_one_line() -> None:
    with pytest.raises(ValueError, match="atta warm-starts an inner attack"):
        AdversarialTraining(TinyCNN(width=4), None, atta=True)
    with pytest.raises(ValueError, match=r"atta_reset_epochs resets .*: add --model.atta true"):
        AdversarialTraining(TinyCNN(width=4), PGD(eps=EPS, steps=1), atta_reset_epochs=10)
    with pytest.raises(ValueError, match="atta_reset_epochs must be an integer >= 0, got -1"):
        AdversarialTraining(TinyCNN(width=4), PGD(eps=EPS, steps=1), atta=True, atta_reset_epochs=-1)
    AdversarialTraining(
        TinyCNN(width=4), PGD(eps=EPS, steps=1), atta=True, atta_reset_epochs=10
    )  # the control


# ---------------------------------------------------------------- random crops and flips (CIFAR-10)
def shown(canvas: torch.Tensor, view: tuple[int, int, int], size: int = 32) -> torch.Tensor:
    """By hand: the ``size`` x ``size`` window of ``canvas`` (C, H, W) at ``view[:2]``, mirrored if ``view[2]``."""
    top, left, flipped = view
    window = canvas[:, top : top + size, left : left + size]
    return window.flip(-1) if flipped else window


def written(canvas: torch.Tensor, view: tuple[int, int, int], image: torch.Tensor) -> torch.Tensor:
    """By hand (Zheng et al.'s ``inverse_atta_aug``): ``canvas`` with ``image`` unmirrored into its window."""
    top, left, flipped = view
    out = canvas.clone()
    out[:, top : top + image.shape[-2], left : left + image.shape[-1]] = image.flip(-1) if flipped else image
    return out


def test_an_augmented_image_is_the_view_it_reports() -> None:
    """Every crop-and-flip item equals the window of the zero-padded image its view names; over 64
    draws the views vary and both flips occur. Control: the same view with the flip toggled differs."""
    torch.manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    dataset = ImageTensorDataset(images, torch.arange(4), augment=True)
    assert dataset.padding == 4
    views = []
    for i in range(64):
        image, label, view = dataset.item(i % 4)
        canvas = torch.nn.functional.pad(images[i % 4].float() / 255, (4, 4, 4, 4))
        assert int(label) == i % 4 and torch.equal(image, shown(canvas, tuple(view.tolist())))
        views.append(tuple(view.tolist()))
    assert len(set(views)) > 32 and {v[2] for v in views} == {0, 1}
    top, left, flipped = views[-1]
    assert not torch.equal(image, shown(canvas, (top, left, 1 - flipped)))
    image, label, view = ImageTensorDataset(images, torch.arange(4)).item(2)  # no augmentation
    assert view.tolist() == [0, 0, 0] and torch.equal(image, images[2].float() / 255)


class _NoProcesses:
    _trainer = None  # PerturbationBuffer.store outside a Trainer: one process


def test_the_stored_perturbation_follows_each_crop_and_flip() -> None:
    """A buffer over 40 x 40 canvases: a write under one view lands where that view's pixels sit on the
    canvas (unmirrored), and a later start under another view reads that view's window of it, as the
    hand computation does. Control: reading with the identity view ((4, 4, unflipped)) differs."""
    torch.manual_seed(0)
    x = torch.rand(3, 3, 32, 32)
    buffer = PerturbationBuffer()
    buffer.allocate(5, x, padding=4)
    assert buffer.delta.shape == (5, 3, 40, 40)
    index = torch.tensor([4, 0, 2])
    first = torch.tensor([[0, 8, 1], [3, 5, 0], [8, 0, 1]])
    delta = 0.1 * torch.randn_like(x)
    buffer.store(index, delta, _NoProcesses(), 0, first)
    canvas = torch.zeros(5, 3, 40, 40)
    for row, i in enumerate(index.tolist()):
        canvas[i] = written(canvas[i], tuple(first[row].tolist()), delta[row])
    assert torch.equal(buffer.delta, canvas) and buffer.visited.tolist() == [0, -1, 0, -1, 0]

    later = torch.tensor([[2, 2, 0], [6, 1, 1], [8, 0, 1]])
    fallback = torch.full_like(x, -1.0)
    start = buffer.start(index, x, fallback, 0, later)
    expected = torch.stack(
        [x[r] + shown(canvas[i], tuple(later[r].tolist())) for r, i in enumerate(index.tolist())]
    )
    assert torch.equal(start, expected)
    assert torch.equal(start[2], x[2] + delta[2])  # the same view as the write: what was stored
    identity = torch.tensor([[4, 4, 0]] * 3)
    assert not torch.equal(buffer.start(index, x, fallback, 0, identity), expected)
    assert torch.equal(buffer.start(torch.tensor([1]), x[:1], fallback[:1], 0, identity[:1]), fallback[:1])
    with pytest.raises(ValueError, match="needs each image's view"):
        buffer.start(index, x, fallback, 0)


def test_atta_on_cifar10_crops_starts_each_epoch_at_its_crop_of_the_stored_perturbation(
    tmp_path: Path,
) -> None:
    """CIFAR-10 (generated files), random crops and flips, 2 epochs: each example's epoch-2 start is the
    window its epoch-2 view shows of the canvas its epoch-1 perturbation was written into (by hand);
    the buffer holds 40 x 40 canvases. Control: that start is not the epoch-1 perturbation as the
    image-aligned (MNIST) buffer would store it, since the crop moved."""
    write_cifar(tmp_path, n_per_batch=8)  # 40 images: 32 training, 8 validation
    datamodule = CIFAR10DataModule(
        data_dir=str(tmp_path), val_size=8, batch_size=8, eval_batch_size=8, num_workers=0, download=False
    )
    torch.manual_seed(0)
    spy = StartSpy(eps=8 / 255, alpha=4 / 255, steps=1)
    spy.starts, spy.ends = [], []
    module = AdversarialTraining(TinyCNN("cifar10", width=4), spy, atta=True, track_clean_accuracy=False)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = module.craft

    def craft(x, y, index=None, view=None):
        seen.append((index.clone(), view.clone()))
        return original(x, y, index, view)

    module.craft = craft
    quiet_trainer(max_epochs=2, limit_val_batches=0).fit(module, datamodule=datamodule)
    assert len(seen) == 8 and module.perturbations.delta.shape == (32, 3, 40, 40)
    canvas, ended = torch.zeros(32, 3, 40, 40), torch.zeros(32, 3, 32, 32)
    for (index, view), end in zip(seen[:4], spy.ends[:4], strict=True):
        ended[index] = end
        for row, i in enumerate(index.tolist()):
            canvas[i] = written(canvas[i], tuple(view[row].tolist()), end[row])
    for (index, view), start in zip(seen[4:], spy.starts[4:], strict=True):
        by_hand = [shown(canvas[i], tuple(view[row].tolist())) for row, i in enumerate(index.tolist())]
        assert torch.allclose(start, torch.stack(by_hand), atol=1e-6)  # start - x: up to rounding
        assert not torch.allclose(start, ended[index], atol=1e-3)


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
    assert saved["visited"].tolist() == [0] * 64 and checkpoint["global_step"] == 2
    assert all(
        torch.equal(s["delta"], saved["delta"]) and torch.equal(s["visited"], saved["visited"])
        for s in states
    )
