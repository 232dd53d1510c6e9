"""MART (Wang et al. 2020): the loss against a hand computation on fixed logits, its gradient through
the clean probabilities, and the objective in the training module (inner attack on cross-entropy)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from qgtrain.attacks import PGD, build_attack
from qgtrain.models import TinyCNN
from qgtrain.training import AdversarialTraining, quiet_trainer
from qgtrain.training.module import mart_loss
from tests.helpers import load_mnist_tensors

CLEAN = [[2.0, 0.5, -1.0], [0.0, 1.0, 0.5], [1.0, 1.0, 1.0]]
ADV = [[0.5, 1.5, 0.0], [0.2, 2.5, -0.5], [-1.0, 0.0, 2.0]]  # row 1: the true class stays on top
LABELS = [0, 1, 2]


def softmax(z: list[float]) -> list[float]:
    total = sum(math.exp(v) for v in z)
    return [math.exp(v) / total for v in z]


def hand_mart(
    beta: float, wrong_class=lambda p, y: max((k for k in range(len(p)) if k != y), key=p.__getitem__)
):
    """Wang et al.'s MART objective as the reference computes it, one example at a time:
    ``-log p_y(x') - log(1.0001 - p_k(x'))``, ``k`` the most likely wrong class of ``x'``, plus
    ``beta * sum_j p_j(x) log(p_j(x) / p_j(x')) * (1 - p_y(x))``; the mean over the examples."""
    total = 0.0
    for clean, adv, y in zip(CLEAN, ADV, LABELS, strict=True):
        p, q = softmax(clean), softmax(adv)
        k = wrong_class(q, y)
        bce = -math.log(q[y]) - math.log(1.0001 - q[k])
        kl = sum(pj * math.log(pj / qj) for pj, qj in zip(p, q, strict=True))
        total += bce + beta * kl * (1 - p[y])
    return total / len(LABELS)


def test_mart_loss_matches_the_hand_computation() -> None:
    """Control: the hand computation that takes the adversarial top class even when it is the true
    class (row 1) gives another value, and so does beta = 0 against 6."""
    got = mart_loss(torch.tensor(CLEAN), torch.tensor(ADV), torch.tensor(LABELS), beta=6.0)
    assert math.isclose(float(got), hand_mart(6.0), rel_tol=1e-5), (float(got), hand_mart(6.0))
    top_class = hand_mart(6.0, wrong_class=lambda p, y: max(range(len(p)), key=p.__getitem__))
    assert not math.isclose(float(got), top_class, rel_tol=1e-3)
    zero = mart_loss(torch.tensor(CLEAN), torch.tensor(ADV), torch.tensor(LABELS), beta=0.0)
    assert math.isclose(float(zero), hand_mart(0.0), rel_tol=1e-5)
    assert not math.isclose(float(zero), hand_mart(6.0), rel_tol=1e-3)


def test_the_clean_logits_get_a_gradient_through_the_kl_term_and_its_weight() -> None:
    """As in the reference, KL(p(x) || p(x')) * (1 - p_y(x)) is differentiated in the clean logits too.
    Control: with beta = 0 the clean logits get no gradient."""
    clean = torch.tensor(CLEAN, requires_grad=True)
    mart_loss(clean, torch.tensor(ADV), torch.tensor(LABELS), beta=6.0).backward()
    assert clean.grad.abs().sum() > 1e-3
    clean.grad = None
    mart_loss(clean, torch.tensor(ADV), torch.tensor(LABELS), beta=0.0).backward()
    assert clean.grad.abs().sum() == 0


def test_objective_mart_attacks_the_cross_entropy_and_refuses_what_cannot() -> None:
    module = AdversarialTraining(TinyCNN(width=4), PGD(eps=0.3, steps=3, loss="margin"), objective="mart")
    assert module.inner.loss == "ce" and module.inner.steps == 3 and module.hparams.beta == 6.0
    with pytest.raises(ValueError, match="^objective mart maximises the ce loss, but square fixes its loss"):
        AdversarialTraining(TinyCNN(width=4), build_attack("square", eps=0.3), objective="mart")
    with pytest.raises(ValueError, match="^objective mart needs an attack that crafts x'"):
        AdversarialTraining(TinyCNN(width=4), build_attack("free", eps=0.3), objective="mart")
    with pytest.raises(ValueError, match="^objective mart needs an inner attack"):
        AdversarialTraining(TinyCNN(width=4), None, objective="mart")


def test_mart_trains_on_its_loss_and_logs_clean_accuracy() -> None:
    """One epoch of MART over PGD-2 trains with a finite loss, and train/clean_acc comes from the clean
    logits MART computes anyway. Control: the same run under madry (clean accuracy not tracked) logs none."""
    x, y = load_mnist_tensors(48)
    metrics = {}
    for objective in ("mart", "madry"):
        torch.manual_seed(0)
        module = AdversarialTraining(
            TinyCNN(width=4),
            PGD(eps=0.3, alpha=0.1, steps=2),
            objective=objective,
            track_clean_accuracy=False,
        )
        trainer = quiet_trainer(max_epochs=1, limit_val_batches=0)
        trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=16))
        metrics[objective] = dict(trainer.callback_metrics)
    assert torch.isfinite(metrics["mart"]["train/loss"]) and "train/clean_acc" in metrics["mart"]
    assert "train/clean_acc" not in metrics["madry"]
