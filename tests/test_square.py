"""Square Attack: its schedule, the query budget, and that it sees through masked gradients."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from qgtrain.attacks import Square, attack_for_budget
from qgtrain.attacks.limits import AttackInterrupted, clear_stop, request_stop
from qgtrain.attacks.square import square_fraction
from qgtrain.models import TinyCNN
from tests.helpers import load_mnist_tensors


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


class LegacySquare(Square):
    """Square's loop as it was before the inference-mode rewrite (commit 8172f1d), verbatim: the
    reference the current loop must reproduce example for example under the same seed."""

    @torch.no_grad()
    def _run_once(self, model, x, y, start, target, observer, early_exit):
        import math

        from qgtrain.attacks.base import RunOutcome
        from qgtrain.attacks.cpu_kernels import as_model_input
        from qgtrain.attacks.square import margin

        geometry = self.threat_model
        lower, upper = geometry.bounds(x)
        channels, height, width = x.shape[1:]
        best = start.clone()
        best_margin = margin(model(as_model_input(model, best)), y)
        forwards = x.shape[0]
        for query in range(self.queries):
            live = (best_margin > 0).nonzero().squeeze(1)
            if live.numel() == 0:
                break
            side = max(
                int(round(math.sqrt(square_fraction(query, self.queries, self.p_init) * height * width))), 1
            )
            side = min(side, height, width)
            top = int(torch.randint(0, height - side + 1, ()))
            left = int(torch.randint(0, width - side + 1, ()))
            window = torch.zeros((channels, height, width), device=x.device, dtype=x.dtype)
            signs = 2.0 * torch.randint(0, 2, (channels, 1, 1), device=x.device).to(x.dtype) - 1.0
            window[:, top : top + side, left : left + side] = 2.0 * self.eps * signs
            candidate = torch.clamp(best[live] + window, min=lower[live], max=upper[live])
            candidate_margin = margin(model(as_model_input(model, candidate)), y[live])
            forwards += live.numel()
            better = candidate_margin < best_margin[live]
            best[live[better]] = candidate[better]
            best_margin[live[better]] = candidate_margin[better]
        return RunOutcome(best, best_margin <= 0, 0, forwards)


def three_channel_net(channels_last: bool) -> nn.Module:
    torch.manual_seed(3)
    net = TinyCNN(dataset="cifar10", width=4).eval()
    return net.to(memory_format=torch.channels_last) if channels_last else net


@pytest.mark.parametrize(
    ("case", "kwargs", "perturb"),
    [
        ("mnist, early exit", {"eps": 0.1, "queries": 150}, {"early_exit": True}),
        ("mnist, 2 restarts, active", {"eps": 0.05, "queries": 60, "restarts": 2}, {"active": "half"}),
        ("mnist, no early exit", {"eps": 0.1, "queries": 80, "p_init": 0.3}, {"need_fooled": False}),
        ("cifar, contiguous", {"eps": 8 / 255, "queries": 60}, {"early_exit": True}),
        ("cifar, channels_last", {"eps": 8 / 255, "queries": 60}, {"early_exit": True}),
    ],
)
def test_same_seed_same_result_per_example_as_the_legacy_loop(
    case: str, kwargs: dict, perturb: dict, trained_tiny_model, mnist_small
) -> None:
    """The rewrite (inference mode, window updated in place, fooled examples leave) changes no
    example's output, fooled flag or query count; control: another seed changes the output."""
    if case.startswith("cifar"):
        model = three_channel_net(channels_last="channels_last" in case)
        torch.manual_seed(4)
        x = torch.rand(48, 3, 32, 32)
        with torch.no_grad():
            y = model(x).argmax(1)  # correct clean: every example is attacked
    else:
        model = trained_tiny_model
        x, y = mnist_small[0][:96], mnist_small[1][:96]
    if perturb.get("active") == "half":
        perturb = {"active": torch.arange(len(y)) % 2 == 0, "early_exit": True}
    results = []
    for cls, seed in ((LegacySquare, 5), (Square, 5), (Square, 6)):
        torch.manual_seed(seed)
        results.append(cls(**kwargs).perturb(model, x, y, **perturb))
    legacy, new, other_seed = results
    assert torch.equal(new.x_adv, legacy.x_adv), case
    assert torch.equal(new.fooled, legacy.fooled) and new.forwards == legacy.forwards, case
    assert 0 < int(new.fooled.sum()) or "need_fooled" in perturb, "the case should fool someone"
    assert not torch.equal(other_seed.x_adv, legacy.x_adv)  # the comparison can fail
    assert not new.x_adv.is_inference()  # an ordinary tensor: the caller may take gradients at it
    assert (new.x_adv - x).abs().max() <= kwargs[
        "eps"
    ] + 1e-6 and 0 <= new.x_adv.min() <= new.x_adv.max() <= 1

class Constant(nn.Module):
    """Logits that ignore the input: class 0 wins by a margin no perturbation changes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tensor([4.0, *[0.0] * 9]).expand(x.shape[0], 10) + 0 * x.flatten(1)[:, :1]


def test_a_stop_request_interrupts_square_between_queries() -> None:
    """Square takes no gradients, so it never passes the base loop's check: it checks between
    queries. A stop request ends 100,000 queries that never fool the model within seconds; without
    one (the control) the same search runs its queries to the end."""
    x, _ = load_mnist_tensors(4)
    y = torch.zeros(4, dtype=torch.long)
    request_stop(0.2)
    start = time.monotonic()
    try:
        with pytest.raises(AttackInterrupted):
            Square(eps=0.1, queries=100_000)(Constant(), x, y)
    finally:
        clear_stop()
    assert time.monotonic() - start < 10
    assert Square(eps=0.1, queries=20)(Constant(), x, y).shape == x.shape
