"""Gradient-masking checks in the spirit of AutoAttack's (Croce & Hein, 2020) and Carlini et al.'s checklist.

A robust accuracy is suspect when first-order attacks are starved of signal rather than defeated:
zero input gradients on many examples, softmax outputs (saturated probabilities) instead of logits,
a randomized forward pass, or robust accuracy that *rises* with more steps, more restarts or a larger
eps. Each check returns a :class:`MaskingCheck`; a check that fires carries a warning message.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from qgtrain.attacks.losses import get_attack_loss
from qgtrain.evaluation.protocol import adversarial_correct, eval_mode

ZERO_GRADIENT_THRESHOLD = 0.1
"""Warn when more than this fraction of examples has an exactly zero input gradient."""


@dataclass
class MaskingCheck:
    """The outcome of one check: its measured value and, when it fires, a warning."""

    name: str
    value: float
    threshold: float
    warning: str | None = None
    detail: str = ""

    @property
    def fired(self) -> bool:
        return self.warning is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def input_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str = "ce") -> torch.Tensor:
    """Gradient of the summed per-example attack loss w.r.t. the input (model in eval mode)."""
    loss_fn = get_attack_loss(loss)
    with eval_mode(model), torch.inference_mode(False), torch.enable_grad():
        x = x.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_fn(model(x), y).sum(), x)
    return grad.detach()


def tolerance(num_examples: int, fraction: float = 0.02) -> int:
    """Examples by which a stronger attack may leave *more* robust examples before a warning (noise)."""
    return max(1, math.ceil(fraction * num_examples))


def check_zero_gradients(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss: str = "ce",
    threshold: float = ZERO_GRADIENT_THRESHOLD,
) -> MaskingCheck:
    """Fraction of examples whose input gradient is exactly zero at the clean input."""
    grad = input_gradients(model, x, y, loss)
    zero = (grad.reshape(grad.shape[0], -1) == 0).all(dim=1)
    fraction = float(zero.float().mean())
    warning = None
    if fraction > threshold:
        warning = (
            f"{fraction:.1%} of examples have an exactly zero input gradient (threshold {threshold:.0%}): "
            "gradient-based attacks get no signal there (shattered/masked gradients); "
            "robust accuracy may be overestimated"
        )
    return MaskingCheck("zero_gradients", fraction, threshold, warning, f"{int(zero.sum())}/{zero.numel()}")


@torch.no_grad()
def check_output_probabilities(model: nn.Module, x: torch.Tensor) -> MaskingCheck:
    """Do the outputs look like softmax probabilities (non-negative rows summing to 1)?"""
    with eval_mode(model):
        out = model(x).float()
    is_probability = bool((out >= 0).all()) and bool(
        torch.allclose(out.sum(dim=1), torch.ones_like(out[:, 0]), atol=1e-3)
    )
    warning = None
    if is_probability:
        warning = (
            "model outputs probabilities, not logits (rows are non-negative and sum to 1): the "
            "cross-entropy gradient saturates; remove the final softmax before evaluating"
        )
    return MaskingCheck("output_probabilities", float(is_probability), 0.5, warning)


@torch.no_grad()
def check_randomized(model: nn.Module, x: torch.Tensor) -> MaskingCheck:
    """Does the eval-mode forward pass change between two calls on the same input?"""
    with eval_mode(model):
        first, second = model(x).float(), model(x).float()
    change = float((first - second).abs().max()) if first.numel() else 0.0
    scale = float(first.abs().max()) if first.numel() else 0.0
    warning = None
    if change > 1e-4 * max(scale, 1.0):
        warning = (
            f"the model's output changes between two identical eval-mode calls (max change {change:.3g}): "
            "a randomized defense needs Expectation over Transformation; this protocol does not average"
        )
    return MaskingCheck("randomized_outputs", change, 1e-4, warning)


def check_stronger_attack(
    name: str,
    weaker_correct: torch.Tensor,
    stronger_correct: torch.Tensor,
    weaker: str,
    stronger: str,
    label: str,
) -> MaskingCheck:
    """Warn when the stronger attack leaves more robust examples than the weaker, beyond noise."""
    n = int(stronger_correct.numel())
    gap = int(stronger_correct.sum()) - int(weaker_correct.sum())
    allowed = tolerance(n)
    warning = None
    if gap > allowed:
        warning = (
            f"{label}: robust accuracy rises with {stronger} vs {weaker} "
            f"({float(weaker_correct.float().mean()):.2%} -> {float(stronger_correct.float().mean()):.2%} "
            f"on {n} examples): a sign of gradient masking or a step size too large"
        )
    return MaskingCheck(name, float(gap) / max(n, 1), allowed / max(n, 1), warning, f"{label}")


def check_steps(
    model: nn.Module,
    spec: Any,
    batches: Any,
    full_correct: torch.Tensor,
    seed: int,
    device: torch.device | str | None = None,
) -> MaskingCheck | None:
    """The same attack with ``steps // 4`` steps and the same seed (same random starts) on ``batches``.

    ``full_correct`` is the full-step result of that seed on those examples.
    """
    fewer = max(1, spec.steps // 4)
    if fewer == spec.steps:
        return None
    weak = adversarial_correct(model, spec.replace(steps=fewer).build(), batches, device, seed=seed)
    return check_stronger_attack(
        "more_steps", weak, full_correct, f"{fewer} steps", f"{spec.steps} steps", spec.label
    )


def check_restarts(
    model: nn.Module,
    spec: Any,
    batches: Any,
    full_correct: torch.Tensor,
    seed: int,
    device: torch.device | str | None = None,
) -> MaskingCheck | None:
    """One restart under an unused seed vs the ``spec.restarts``-restart result ``full_correct``."""
    if spec.restarts <= 1:
        return None
    single = adversarial_correct(model, spec.replace(restarts=1).build(), batches, device, seed=seed)
    return check_stronger_attack(
        "more_restarts", single, full_correct, "1 restart", f"{spec.restarts} restarts", spec.label
    )


def check_score_based(
    labels: Sequence[str], fooled: Sequence[int], clean: torch.Tensor
) -> list[MaskingCheck]:
    """AutoAttack's sanity check: the score-based Square should find (almost) nothing the gradient
    attacks before it missed. Many examples fooled by Square alone point at masked gradients."""
    if "square" not in labels:
        return []
    k = list(labels).index("square")
    n = int(clean.numel())
    allowed = tolerance(n, 0.005)
    warning = None
    if fooled[k] > allowed:
        warning = (
            f"square (no gradients) fooled {fooled[k]} of {n} examples that the gradient attacks before it "
            "left robust: the gradients may be masked, trust the score-based number"
        )
    return [
        MaskingCheck("score_based_finds_more", fooled[k] / max(n, 1), allowed / max(n, 1), warning, "square")
    ]


def check_sweep(
    parameter: str, values: Sequence[float], series: dict[str, dict[str, list[float]]], n: int
) -> list[MaskingCheck]:
    """A larger eps or more steps must not raise robust accuracy (Carlini et al.'s checklist)."""
    checks: list[MaskingCheck] = []
    if parameter not in ("eps", "steps"):
        return checks
    allowed = tolerance(n) / max(n, 1)
    for line, numbers in series.items():
        accuracies = numbers["avg"]
        rises = [
            (values[i], values[i + 1], accuracies[i], accuracies[i + 1])
            for i in range(len(accuracies) - 1)
            if accuracies[i + 1] - accuracies[i] > allowed
        ]
        warning = None
        if rises:
            lo, hi, a, b = rises[0]
            warning = (
                f"{line}: robust accuracy rises from {a:.2%} at {parameter}={lo} to {b:.2%} at "
                f"{parameter}={hi}: a sign of gradient masking"
            )
        worst_rise = max((r[3] - r[2] for r in rises), default=0.0)
        checks.append(MaskingCheck(f"sweep_{parameter}_monotone", worst_rise, allowed, warning, line))
    return checks
