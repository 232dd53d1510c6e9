"""Square Attack: its schedule, the query budget, and that it sees through masked gradients."""

from __future__ import annotations

import torch
from torch import nn

from qgtrain.attacks import Square, attack_for_budget
from qgtrain.attacks.square import square_fraction


def test_schedule_halves_on_autoattack_s_scale() -> None:
    fractions = [square_fraction(i, 5000, 0.8) for i in range(5000)]
    assert fractions[0] == 0.8 and fractions[5] == 0.8  # queries 0..5 are <= 10 on the 10k scale
    assert fractions[6] == 0.4  # query 6 -> 12 on the 10k scale
    assert fractions[-1] == 0.8 / 512
    assert all(b <= a for a, b in zip(fractions, fractions[1:], strict=False))
    assert square_fraction(50, 100, 0.8) == 0.8 / 128  # rescaled: query 50 of 100 is 5000 of 10k


class RoundedInput(nn.Module):
    """A model behind input rounding: every input gradient is exactly zero (masked gradients)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(torch.round(x * 4) / 4)


def test_square_fools_a_model_whose_gradients_are_masked(trained_tiny_model, mnist_small) -> None:
    model = RoundedInput(trained_tiny_model).eval()
    x, y = mnist_small
    x, y = x[:64], y[:64]
    with torch.no_grad():
        clean = model(x).argmax(1) == y

    def accuracy(attack) -> float:
        torch.manual_seed(0)
        result = attack.perturb(model, x, y)
        return (clean & ~result.fooled).float().mean().item()

    pgd = accuracy(attack_for_budget("pgd", 0.3, 20))
    square = accuracy(Square(eps=0.3, queries=300))
    assert clean.float().mean() > 0.5
    assert square < pgd - 0.2, f"square {square:.3f} vs pgd {pgd:.3f} on masked gradients"


def test_square_stops_querying_fooled_examples(trained_tiny_model, mnist_small) -> None:
    x, y = mnist_small
    x, y = x[:32], y[:32]
    torch.manual_seed(0)
    result = Square(eps=0.3, queries=200).perturb(trained_tiny_model, x, y)
    assert result.gradients == 0
    assert bool(result.fooled.all()), "eps = 0.3 breaks a normally trained model"
    # the start, then one query per still-robust example per iteration, then the final check
    assert result.forwards < (200 + 2) * len(y) / 2, "fooled examples should leave early"
