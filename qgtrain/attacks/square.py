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

from qgtrain.attacks.base import DEFAULT_EPS, Attack, RunOutcome, StepObserver
from qgtrain.attacks.cpu_kernels import model_memory_format
from qgtrain.attacks.limits import check_stop

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
        eps: float = DEFAULT_EPS,
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
        """``queries`` rounds of: one window for the batch, kept per example where the margin drops.

        Forward passes only, under ``inference_mode``, on inputs kept in the network's memory
        format. Only the examples still robust are carried from query to query (fooled ones leave
        at once), and a proposal rewrites the window in place and undoes it where it is rejected,
        instead of building a whole candidate image: outside the window a candidate equals the
        current point, so every example's result is what the full-image update gives.
        """
        if x.dim() != 4:
            raise ValueError(f"square expects images shaped (N, C, H, W), got {tuple(x.shape)}")
        memory_format = model_memory_format(model)

        def laid_out(t: torch.Tensor) -> torch.Tensor:
            return t.contiguous(memory_format=memory_format)

        channels, height, width = x.shape[1:]
        with torch.inference_mode():
            lower, upper = (laid_out(b) for b in self.threat_model.bounds(x))
            best = laid_out(torch.clamp(start, min=lower, max=upper))  # the stripes are in the set
            best_margin = margin(model(best), y)
            forwards = x.shape[0]
            # The examples still robust: their indices, current points, bounds and labels.
            live = (best_margin > 0).nonzero().squeeze(1)
            current, current_margin = laid_out(best[live]), best_margin[live]
            low, high, labels = lower[live], upper[live], y[live]
            for query in range(self.queries):
                if live.numel() == 0:
                    break
                check_stop()  # a signal's stop request ends the search between queries, as in Attack's loop
                fraction = square_fraction(query, self.queries, self.p_init)
                side = min(max(int(round(math.sqrt(fraction * height * width))), 1), height, width)
                top = int(torch.randint(0, height - side + 1, ()))
                left = int(torch.randint(0, width - side + 1, ()))
                signs = 2.0 * torch.randint(0, 2, (channels, 1, 1), device=x.device).to(x.dtype) - 1.0
                rows, cols = slice(top, top + side), slice(left, left + side)
                kept = current[:, :, rows, cols].clone()
                current[:, :, rows, cols] = torch.clamp(
                    kept + 2.0 * self.eps * signs, min=low[:, :, rows, cols], max=high[:, :, rows, cols]
                )
                candidate_margin = margin(model(current), labels)
                forwards += live.numel()
                better = candidate_margin < current_margin
                current[~better, :, rows, cols] = kept[~better]
                current_margin = torch.where(better, candidate_margin, current_margin)
                fooled = current_margin <= 0
                if bool(fooled.any()):  # these leave: store them, carry on with the rest
                    best[live[fooled]], best_margin[live[fooled]] = current[fooled], current_margin[fooled]
                    stay = ~fooled
                    live, current, current_margin = live[stay], laid_out(current[stay]), current_margin[stay]
                    low, high, labels = low[stay], high[stay], labels[stay]
            best[live], best_margin[live] = current, current_margin
        # Clones made outside inference mode are ordinary tensors, usable in autograd by the caller.
        return RunOutcome(best.clone(), best_margin.clone() <= 0, 0, forwards)
