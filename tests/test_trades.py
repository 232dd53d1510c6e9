"""Issue 23, TRADES (Zhang et al. 2019): the ``kl`` attack loss against a hand computation, any attack
maximising it from soft labels, and the objective ``CE(f(x), y) + beta * KL(f(x) || f(x'))``."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, TensorDataset

from qgtrain.attacks import PGD, attack_for_budget, build_attack, kl_loss
from qgtrain.callbacks import AttackVisualization
from qgtrain.models import TinyCNN
from qgtrain.training import AdversarialTraining, quiet_trainer
from tests.helpers import load_mnist_tensors, same_weights


def test_kl_loss_matches_a_hand_computation_per_example() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    reference = torch.tensor([[0.7, 0.3, 0.0], [0.2, 0.3, 0.5]])  # a zero entry: 0 log 0 = 0
    expected = []
    for z, p in zip(logits.tolist(), reference.tolist(), strict=True):
        log_norm = math.log(sum(math.exp(v) for v in z))
        q = [math.exp(v - log_norm) for v in z]
        expected.append(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True) if pi > 0))
    got = kl_loss(logits, reference)
    assert got.shape == (2,)
    assert torch.allclose(got, torch.tensor(expected), atol=1e-6), (got, expected)
    same = kl_loss(reference.clamp_min(1e-12).log(), reference.clamp_min(1e-12))  # q = p: KL 0
    assert torch.allclose(same, torch.zeros(2), atol=1e-6)


def test_kl_loss_refuses_hard_labels_in_one_line() -> None:
    with pytest.raises(ValueError, match=r"reference distribution \(N, C\)"):
        kl_loss(torch.zeros(4, 10), torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("name", ["pgd", "pqgd", "apgd_ce", "fgsm_rs"])
def test_any_attack_with_the_kl_loss_raises_the_kl_term_in_the_ball(name: str, trained_tiny_model) -> None:
    torch.manual_seed(0)
    x, _ = load_mnist_tensors(32, train=False)
    with torch.no_grad():
        reference = F.softmax(trained_tiny_model(x), dim=1)  # TRADES's labels: the clean softmax
    attack = attack_for_budget(name, 0.3, 5, loss="kl", restarts=2 if name == "pgd" else 1)
    x_adv = attack(trained_tiny_model, x, reference)
    assert (x_adv - x).abs().max() <= 0.3 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        after = kl_loss(trained_tiny_model(x_adv), reference)
        noise = kl_loss(trained_tiny_model((x + 0.001 * torch.randn_like(x)).clamp(0, 1)), reference)
    assert after.mean() > 10 * noise.mean() and after.mean() > 0.1, (after.mean(), noise.mean())


def _loader() -> DataLoader:
    x, y = load_mnist_tensors(48)
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)


def _fit(objective: str, beta: float, inner: bool = True) -> AdversarialTraining:
    torch.manual_seed(0)
    attack = PGD(eps=0.3, alpha=0.1, steps=2) if inner else None
    module = AdversarialTraining(
        TinyCNN(width=4), attack, objective=objective, beta=beta, track_clean_accuracy=False
    )
    quiet_trainer(max_epochs=1, limit_val_batches=0).fit(module, _loader())
    return module


def test_beta_zero_is_clean_training_and_beta_six_is_not() -> None:
    clean = _fit("madry", 6.0, inner=False)
    assert same_weights(_fit("trades", 0.0).net, clean.net)  # the KL term's gradient is 0 * finite
    assert not same_weights(_fit("trades", 6.0).net, clean.net)  # control: the KL term does train


def test_trades_gives_the_inner_attack_the_kl_loss_and_refuses_fixed_losses() -> None:
    module = AdversarialTraining(TinyCNN(width=4), PGD(eps=0.3, steps=3), objective="trades")
    assert module.inner.loss == "kl" and module.inner.steps == 3 and module.hparams.beta == 6.0
    with pytest.raises(ValueError, match="fixes its loss"):
        AdversarialTraining(TinyCNN(width=4), build_attack("square", eps=0.3), objective="trades")
    with pytest.raises(ValueError, match="beta must be a number >= 0"):
        AdversarialTraining(TinyCNN(width=4), PGD(eps=0.3), objective="trades", beta=-1.0)


class StartSpy(PGD):
    """PGD that records each run's start relative to the clean input, and the labels it was given (on
    the class: the module rebuilds its inner attack with the kl loss, and copies it to set the start)."""

    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _run_once(self, model, x, y, start, target, observer, early_exit):
        self.seen.append((start - x, y))
        return super()._run_once(model, x, y, start, target, observer, early_exit)


def test_trades_attacks_from_x_plus_small_gaussian_noise_with_the_clean_softmax_as_labels() -> None:
    torch.manual_seed(0)
    net = TinyCNN(width=4)
    StartSpy.seen = []
    module = AdversarialTraining(net, StartSpy(eps=0.3, alpha=0.1, steps=1), objective="trades")
    x, y = torch.full((64, 1, 28, 28), 0.5), torch.zeros(64, dtype=torch.long)
    module.craft(x, y)
    ((offset, labels),) = StartSpy.seen
    assert abs(float(offset.std()) - 0.001) < 5e-5 and abs(float(offset.mean())) < 5e-5  # x + 0.001 N(0, 1)
    with torch.no_grad():
        assert torch.allclose(labels, F.softmax(net(x), dim=1))


def test_the_epoch_end_views_show_the_trades_attack_as_it_trains(tmp_path) -> None:
    """TRADES with the visualization callback on (train.py's default): at the epoch's end the inner
    (kl) attack is shown with the clean softmax as its labels, as in training, and its views are
    written. Control: the same call with integer labels, as the callback made it before, is refused
    (training stopped there at the end of the first epoch: found by the cpu-budget study)."""
    torch.manual_seed(0)
    StartSpy.seen = []
    module = AdversarialTraining(TinyCNN(width=4), StartSpy(eps=0.3, alpha=0.1, steps=1), objective="trades")
    logger = TensorBoardLogger(str(tmp_path), name="trades", default_hp_metric=False)
    trainer = quiet_trainer(
        max_epochs=1, limit_val_batches=1, logger=logger, callbacks=[AttackVisualization(num_images=4, batch_size=8)]
    )
    trainer.fit(module, _loader(), _loader())
    shown_labels = StartSpy.seen[-1][1]
    assert len(StartSpy.seen) == 3 + 1 and shown_labels.shape == (8, 10)  # 3 training batches, 1 view
    assert torch.allclose(shown_labels.sum(dim=1), torch.ones(8))
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert "images/adversarial_grid" in events.Tags()["images"]
    x, y = next(iter(_loader()))
    with pytest.raises(ValueError, match="reference distribution"):
        module.inner.perturb(module.net, x[:8], y[:8], need_fooled=False)
