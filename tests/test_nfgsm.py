"""N-FGSM (de Jorge et al. 2022): noise of 2 eps, one step of eps, no projection onto the eps-ball."""

from __future__ import annotations

import pytest
import torch

from qgtrain.attacks import NFGSM, attack_for_budget, build_attack
from qgtrain.evaluation.protocol import attack_batch


def test_defaults_follow_the_paper() -> None:
    attack = build_attack("nfgsm", eps=0.3)
    assert attack.alpha == 0.3 and attack.noise_factor == 2.0 and attack.single_step and attack.steps == 1
    assert attack_for_budget("nfgsm", 0.2, 10).alpha == 0.2  # single step: its own step size


def test_leaves_the_ball_but_not_the_input_range(trained_tiny_model, mnist_small) -> None:
    x, y = mnist_small
    x, y = x[:64], y[:64]
    torch.manual_seed(0)
    x_adv = NFGSM(eps=0.1)(trained_tiny_model, x, y)
    distance = (x_adv - x).abs()
    assert distance.max() <= 0.3 + 1e-6  # noise 2 eps + step eps
    assert distance.max() > 0.1 + 1e-3, "N-FGSM does not project back onto the eps-ball"
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    torch.manual_seed(0)
    no_noise = NFGSM(eps=0.1, noise_factor=0.0)(trained_tiny_model, x, y)
    assert (no_noise - x).abs().max() <= 0.1 + 1e-6  # without noise it is FGSM


def test_quantized_direction_with_b(trained_tiny_model, mnist_small) -> None:
    x, y = mnist_small
    x, y = x[:16], y[:16]
    torch.manual_seed(0)
    start = (x + torch.empty_like(x).uniform_(-0.2, 0.2)).clamp(0, 1)
    torch.manual_seed(0)
    sign = NFGSM(eps=0.1)(trained_tiny_model, x, y)
    torch.manual_seed(0)
    quantized = NFGSM(eps=0.1, b=100)(trained_tiny_model, x, y)
    # Both start from the same noise; the quantized step moves small-gradient pixels by alpha * |qg| too.
    assert torch.allclose((sign - start).abs().amax(), torch.tensor(0.1), atol=1e-6)
    assert not torch.equal(sign, quantized)


def test_the_evaluation_engine_refuses_it(trained_tiny_model, mnist_small) -> None:
    x, y = mnist_small
    with pytest.raises(ValueError, match="nfgsm is a training attack whose output leaves the eps-ball"):
        attack_batch(trained_tiny_model, [NFGSM(eps=0.1)], x[:8], y[:8], stream_seed=0)
