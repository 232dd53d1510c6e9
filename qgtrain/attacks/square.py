"""Square Attack (Andriushchenko et al., ECCV 2020), L-inf: a score-based random search.

No gradients are taken, so a model whose gradients are masked or obfuscated is still attacked:
AutoAttack's check that first-order robustness is real. Start from vertical stripes of ``+-eps``;
at query ``i`` propose, for every example still robust, a square window of side
``s = round(sqrt(p_i * pixels))`` at a random place whose perturbation is set to ``+-2 eps`` per
channel (then projected), and keep it where the margin loss decreases. ``p_i`` halves on
AutoAttack's schedule (``p_init = 0.8``, rescaled to the query budget).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from qgtrain.attacks.base import Attack, RunOutcome, StepObserver, as_model_input

SCHEDULE = (
    (10, 1),
    (50, 2),
    (200, 4),
    (500, 8),
    (1000, 16),
    (2000, 32),
    (4000, 64),
    (6000, 128),
    (8000, 256),
)
"""``(last query of the phase on a 10,000-query scale, divisor of p_init)``; 512 after 8,000."""


def square_fraction(query: int, queries: int, p_init: float) -> float:
    """The share of pixels the window covers at ``query`` (AutoAttack's rescaled schedule)."""
    scaled = int(query / queries * 10000)
    for last, divisor in SCHEDULE:
        if scaled <= last:
            return p_init / divisor
    return p_init / 512


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``z_y - max_{i != y} z_i``: positive while the example is classified correctly."""
    logits = logits.float()
    true_logit = logits.gather(1, y[:, None]).squeeze(1)
    return true_logit - logits.scatter(1, y[:, None], float("-inf")).amax(dim=1)


class Square(Attack):
    """Square Attack, L-inf, untargeted, on the margin loss; ``queries`` model evaluations at most
    per restart (5000 in AutoAttack). Examples leave as soon as they are fooled (the algorithm's own
    early exit); the random windows are shared by the batch, as in the reference code."""

    name = "square"
    uses_gradients = False
    fixed_loss = "margin"

    def __init__(
        self,
        eps: float = 0.3,
        queries: int = 5000,
        p_init: float = 0.8,
        restarts: int = 1,
        clip: tuple[float, float] = (0.0, 1.0),
    ) -> None:
        """Args:
        eps: L-inf radius in pixel units.
        queries: model evaluations per example and restart (AutoAttack: 5000).
        p_init: initial share of the pixels changed per query (AutoAttack: 0.8).
        restarts: independent restarts, merged per example.
        clip: the valid input range.
        """
        if not 0 < p_init <= 1:
            raise ValueError(f"p_init must be in (0, 1], got {p_init!r}")
        super().__init__(eps, eps, queries, 1, True, restarts, "margin", clip)
        self.queries = int(queries)
        self.p_init = float(p_init)

    @classmethod
    def for_budget(
        cls, eps: float, steps: int, alpha: float | None = None, b: int | None = None, **kwargs: Any
    ) -> Attack:
        """Square's budget is its query count, not gradient steps: ``steps``, ``alpha``, ``b`` are ignored."""
        kwargs.pop("loss", None)
        return cls(eps=eps, **kwargs)

    @property
    def gradients_per_example(self) -> int:
        return 0

    @property
    def forwards_per_example(self) -> int:
        return (self.queries + 1) * self.restarts

    @property
    def label(self) -> str:
        return self.name

    def config(self) -> dict[str, Any]:
        keys = ("eps", "queries", "p_init", "restarts")
        return {"name": self.name, **{k: getattr(self, k) for k in keys}, "clip": list(self.clip)}

    def starting_point(self, x: torch.Tensor) -> torch.Tensor:
        """Vertical stripes: ``x + eps * s`` with one random sign per (example, channel, column)."""
        signs = torch.randint(0, 2, (x.shape[0], x.shape[1], 1, x.shape[3]), device=x.device)
        return (x + self.eps * (2.0 * signs.to(x.dtype) - 1.0)).clamp_(*self.clip)

    @torch.no_grad()
    def _run_once(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        start: torch.Tensor,
        target: torch.Tensor | None,
        observer: StepObserver | None,
        early_exit: bool,
    ) -> RunOutcome:
        if x.dim() != 4:
            raise ValueError(f"square expects images shaped (N, C, H, W), got {tuple(x.shape)}")
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
