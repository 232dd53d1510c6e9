"""APGD (Croce & Hein 2020): the checkpoint schedule, the DLR losses, APGD-T's targets, strength."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qgtrain.attacks import APGDCE, APGDT, attack_for_budget, build_attack, dlr_loss, targeted_dlr_loss
from qgtrain.attacks.apgd import checkpoint_steps


def paper_checkpoints(steps: int) -> list[int]:
    """``p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``, in iterations."""
    marks, previous, current = [], 0.0, 0.22
    while round(current * steps) <= steps:
        marks.append(round(current * steps))
        previous, current = current, current + max(current - previous - 0.03, 0.06)
    return marks


@pytest.mark.parametrize("steps", [100, 1000])
def test_checkpoints_follow_the_paper(steps: int) -> None:
    assert checkpoint_steps(steps) == paper_checkpoints(steps)


def test_checkpoints_of_100_steps() -> None:
    # 22, then lengths 19, 16, 13, 10, 7, 6, 6 (the 0.06 floor)
    assert checkpoint_steps(100) == [22, 41, 57, 70, 80, 87, 93, 99]


def test_dlr_matches_definition_and_is_shift_and_scale_invariant() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(32, 10, generator=generator)
    labels = torch.randint(0, 10, (32,), generator=generator)
    expected = []
    for z, y in zip(logits, labels, strict=True):
        ordered = z.sort(descending=True).values
        others = torch.cat([z[:y], z[y + 1 :]])
        expected.append(-(z[y] - others.max()) / (ordered[0] - ordered[2] + 1e-12))
    assert torch.allclose(dlr_loss(logits, labels), torch.stack(expected), atol=1e-6)
    assert torch.allclose(dlr_loss(3.0 * logits + 7.0, labels), dlr_loss(logits, labels), atol=1e-5)
    targets = (labels + 1) % 10
    targeted = []
    for z, y, t in zip(logits, labels, targets, strict=True):
        ordered = z.sort(descending=True).values
        targeted.append(-(z[y] - z[t]) / (ordered[0] - 0.5 * (ordered[2] + ordered[3]) + 1e-12))
    assert torch.allclose(targeted_dlr_loss(logits, labels, targets), torch.stack(targeted), atol=1e-6)


def test_apgd_t_aims_at_the_most_likely_wrong_classes_in_order() -> None:
    logits = torch.tensor([[5.0, 1.0, 4.0, 3.0, 2.0], [0.0, 9.0, 1.0, 8.0, 2.0]])
    model = nn.Flatten()  # the "model" returns its input as logits
    x = logits[:, None, None, :]
    attack = APGDT(eps=0.1, steps=1, targets=3)
    stages = attack.stages(model, x, torch.tensor([0, 3]))
    assert [s.tolist() for s in stages] == [[2, 1], [3, 4], [4, 2]]
    with pytest.raises(ValueError, match="targets=5 but the model has only 4 wrong classes"):
        APGDT(eps=0.1, steps=1, targets=5).stages(model, x, torch.tensor([0, 3]))


def test_apgd_sets_its_own_step_and_counts_its_gradients() -> None:
    attack = attack_for_budget("apgd_ce", 0.3, 50, alpha=123.0)
    assert attack.alpha == pytest.approx(0.6) and attack.steps == 50  # 2 eps, whatever alpha says
    assert attack.gradients_per_example == 51  # the start and every iteration
    assert build_attack("apgd_t", targets=4, steps=10).gradients_per_example == 44


def accuracy_under(model: nn.Module, attack, x: torch.Tensor, y: torch.Tensor, seed: int = 0) -> float:
    torch.manual_seed(seed)
    x_adv = attack(model, x, y)
    with torch.no_grad():
        return ((model(x).argmax(1) == y) & (model(x_adv).argmax(1) == y)).float().mean().item()


@pytest.fixture(scope="module")
def robust_subset(trained_tiny_model, mnist_small):
    x, y = mnist_small
    return trained_tiny_model, x[:256], y[:256]


@pytest.mark.parametrize("steps", [10, 20])
def test_apgd_ce_at_least_as_strong_as_pgd_with_the_same_steps(robust_subset, steps: int) -> None:
    model, x, y = robust_subset
    eps = 0.06  # a radius where the tiny normally-trained model keeps some accuracy
    pgd = accuracy_under(model, attack_for_budget("pgd", eps, steps), x, y)
    apgd = accuracy_under(model, attack_for_budget("apgd_ce", eps, steps), x, y)
    clean = (model(x).argmax(1) == y).float().mean().item()
    assert 0.05 < pgd < clean, "the comparison needs a radius the model partly survives"
    assert apgd <= pgd + 1 / len(y), f"APGD-CE {apgd:.3f} vs PGD {pgd:.3f}"


def test_apgd_t_fools_what_untargeted_apgd_leaves(robust_subset) -> None:
    model, x, y = robust_subset
    eps = 0.06
    x, y = x[:128], y[:128]
    untargeted = accuracy_under(model, APGDCE(eps=eps, steps=10), x, y)
    targeted = accuracy_under(model, APGDT(eps=eps, steps=10, targets=3), x, y)
    assert targeted <= untargeted + 2 / len(y)


def test_quantized_apgd_is_a_different_attack(robust_subset) -> None:
    model, x, y = robust_subset
    x, y = x[:64], y[:64]
    torch.manual_seed(0)
    sign = APGDCE(eps=0.06, steps=10)(model, x, y)
    torch.manual_seed(0)
    quantized = APGDCE(eps=0.06, steps=10, b=100)(model, x, y)
    torch.manual_seed(0)
    again = APGDCE(eps=0.06, steps=10, b=1)(model, x, y)
    assert torch.equal(sign, again) and not torch.equal(sign, quantized)
