"""Adversarial weight perturbation (Wu, Xia, Wang 2020): one training step against the reference's
recipe written out by hand, gamma = 0 and the warm-up as today's step, every objective and free training,
exact resume, the refusals and the cost the study counts."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks import cheap_training
from qgtrain.attacks import PGD, Free
from qgtrain.models import TinyCNN
from qgtrain.training import AdversarialTraining, quiet_trainer
from qgtrain.training.module import TRAINING_PASSES
from tests.helpers import fit_killed_and_resumed, fit_uninterrupted, load_mnist_tensors, same_weights

LR = 0.5
GAMMA = 0.5  # large, so that the perturbation's effect on one step stands far above float rounding


def tiny_bn_net() -> nn.Module:
    """A small MLP with BatchNorm (its running statistics show which forward passes touched them)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))


def one_batch() -> tuple[torch.Tensor, torch.Tensor]:
    return load_mnist_tensors(32)


def sgd(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=LR)


def trained_one_step(objective: str, gamma: float, warmup: int = 0, free: bool = False):
    """``AdversarialTraining`` after one SGD step on one batch, with the batch's ``x_adv`` as crafted."""
    inner = Free(eps=0.3, replays=1) if free else PGD(eps=0.3, alpha=0.1, steps=2, random_start=False)
    module = AdversarialTraining(
        tiny_bn_net(), inner, objective=objective, awp_gamma=gamma, awp_warmup_epochs=warmup,
        optimizer=sgd, track_clean_accuracy=False,
    )  # fmt: skip
    crafted: list[torch.Tensor] = []
    craft = module.craft
    module.craft = lambda *args: crafted.append(craft(*args)) or crafted[-1]
    x, y = one_batch()
    quiet_trainer(max_steps=1, limit_val_batches=0).fit(
        module, DataLoader(TensorDataset(x, y), batch_size=32)
    )
    x_adv = x if free else crafted[0]  # free: delta = 0 on the first batch, x + 0 is the training input
    return module, x, x_adv, y


def hand_step(net: nn.Module, loss_of: Callable[[nn.Module], torch.Tensor], gamma: float) -> nn.Module:
    """The reference's AWP step (csdongxian/AWP utils_awp.py and train_cifar10.py), plainly: a proxy copy
    ascends the loss once; per weight of dim > 1, v = gamma * ||w|| / ||g|| * g; w += v; the loss at w + v
    is backpropagated; w -= v; the optimizer (plain SGD) steps."""
    net = copy.deepcopy(net).train()
    proxy = copy.deepcopy(net).train()
    loss_of(proxy).backward()
    v = {}
    for (name, w), (_, p) in zip(net.named_parameters(), proxy.named_parameters(), strict=True):
        if w.dim() > 1:
            v[name] = gamma * w.detach().norm() / (p.grad.norm() + 1e-20) * p.grad
    with torch.no_grad():
        for name, w in net.named_parameters():
            if name in v:
                w.add_(v[name])
    loss_of(net).backward()
    with torch.no_grad():
        for name, w in net.named_parameters():
            if name in v:
                w.sub_(v[name])
        for w in net.parameters():
            w.sub_(LR * w.grad)
            w.grad = None
    return net


def close(a: nn.Module, b: nn.Module) -> bool:
    """Parameters and buffers equal up to float rounding (w + v - v is not w bit for bit)."""
    pairs = zip([*a.parameters(), *a.buffers()], [*b.parameters(), *b.buffers()], strict=True)
    return all(torch.allclose(p.float(), q.float(), rtol=1e-5, atol=1e-6) for p, q in pairs)


@pytest.mark.parametrize(
    ("objective", "free"),
    [("madry", False), ("mixed", False), ("trades", False), ("mart", False), ("madry", True)],
)
def test_one_awp_step_is_the_references_recipe_done_by_hand(objective: str, free: bool) -> None:
    """After one step the weights and the BatchNorm statistics are the hand computation's (only the
    passes at w + v update them: num_batches_tracked counts the objective's passes, not AWP's ascent). Control: the same hand computation with
    gamma = 0 (the plain step) is far from it, so the comparison can fail."""
    module, x, x_adv, y = trained_one_step(objective, GAMMA, free=free)
    if free:

        def loss_of(net):
            return F.cross_entropy(net(x_adv), y)
    else:

        def loss_of(net):
            return module.objective_loss(net, x, x_adv, y)[0]

    start = tiny_bn_net()
    expected = hand_step(start, loss_of, GAMMA)
    assert close(module.net, expected)
    assert int(module.net[2].num_batches_tracked) == TRAINING_PASSES[objective]
    plain = hand_step(start, loss_of, 0.0)
    assert not close(plain, expected)


def test_gamma_zero_and_the_warmup_are_exactly_todays_step() -> None:
    """awp_gamma = 0, and awp_gamma > 0 inside its warm-up epochs, give bit-equal weights to the plain
    step done by hand (forward on x_adv, cross-entropy, backward, SGD). Control: the same step with AWP
    on is not bit-equal to it."""
    off, x, x_adv, y = trained_one_step("madry", 0.0)
    net = tiny_bn_net().train()
    F.cross_entropy(net(x_adv), y).backward()
    with torch.no_grad():
        for w in net.parameters():
            w.sub_(LR * w.grad)
    assert same_weights(off.net, net)
    warming, *_ = trained_one_step("madry", GAMMA, warmup=1)
    assert same_weights(warming.net, net)
    on, *_ = trained_one_step("madry", GAMMA)
    assert not same_weights(on.net, net)


def test_awp_settings_are_refused_in_one_line_and_recorded_in_the_checkpoint() -> None:
    for gamma in (-0.01, float("nan"), True):
        with pytest.raises(ValueError, match=r"^awp_gamma must be a number >= 0"):
            AdversarialTraining(TinyCNN(width=4), PGD(eps=0.3), awp_gamma=gamma)
    for warmup in (-1, 1.5):
        with pytest.raises(ValueError, match=r"^awp_warmup_epochs must be an integer >= 0"):
            AdversarialTraining(TinyCNN(width=4), PGD(eps=0.3), awp_warmup_epochs=warmup)
    checkpoint: dict = {}
    AdversarialTraining(
        TinyCNN(width=4), PGD(eps=0.3), awp_gamma=0.005, awp_warmup_epochs=2
    ).on_save_checkpoint(checkpoint)
    assert checkpoint["qgtrain"]["awp_gamma"] == 0.005 and checkpoint["qgtrain"]["awp_warmup_epochs"] == 2


def test_the_study_counts_awps_extra_passes_after_its_warmup() -> None:
    """PGD-10 under MART over 3 data passes: 3 x (10 + 2), and with AWP after 1 warm-up epoch 2 x 2
    more; free-4 (one epoch of 4 data passes, AWP from epoch 0): 4 x (0 + 1) + 4 x 1. Control: the
    record without AWP costs what it did."""
    study = cheap_training
    pgd = {"name": "pgd", "eps": 0.3, "alpha": 0.03, "steps": 10}
    awp = {"awp_gamma": 0.005, "awp_warmup_epochs": 1}
    assert study.method_row({"inner": pgd, "objective": "mart"}, 3)["cost"] == 36
    assert study.method_row({"inner": pgd, "objective": "mart", **awp}, 3)["cost"] == 40
    free = {"name": "free", "eps": 0.3, "replays": 4}
    assert study.method_row({"inner": free, "awp_gamma": 0.005}, 4)["cost"] == 8
    assert study.method_row({"inner": free}, 4)["cost"] == 4
    assert study.method_row({"inner": pgd, "objective": "mart", **awp}, 3)["label"] == "pgd, mart, AWP 0.005"


def test_kill_and_resume_of_awp_with_mart_is_bit_exact(data_root: Path, tmp_path: Path) -> None:
    """AWP (after a 1-epoch warm-up) with MART over PGD-1, 2 epochs of 4 batches, killed after 7 batches
    and resumed from the step checkpoint of step 6 (inside the AWP epoch): the weights equal the
    uninterrupted run's bit for bit. Control: resumed without AWP, it ends elsewhere."""

    def build(gamma: float = 0.05) -> AdversarialTraining:
        torch.manual_seed(0)
        return AdversarialTraining(
            TinyCNN(width=4), PGD(eps=0.3, alpha=0.1, steps=1), objective="mart",
            awp_gamma=gamma, awp_warmup_epochs=1, track_clean_accuracy=False,
        )  # fmt: skip

    whole = fit_uninterrupted(build, data_root, max_epochs=2)
    resumed = fit_killed_and_resumed(
        build, data_root, tmp_path / "a", 2, kill_after_batches=7, every_n_steps=3
    )
    assert same_weights(resumed.net, whole.net)
    builds = iter([build(), build(gamma=0.0)])
    control = fit_killed_and_resumed(
        lambda: next(builds), data_root, tmp_path / "b", 2, kill_after_batches=7, every_n_steps=3
    )
    assert not same_weights(control.net, whole.net)
