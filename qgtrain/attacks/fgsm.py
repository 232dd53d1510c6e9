"""Single-step attacks: FGSM (Goodfellow et al.) and FGSM with random start (Wong et al.)."""

from __future__ import annotations

from typing import Any

from qgtrain.attacks.base import Attack


class FGSM(Attack):
    """Fast gradient sign method: one step of size ``alpha`` (default ``eps``) from the clean input.

    ``b > 1`` quantizes the gradient instead of taking its sign. The other arguments are
    :class:`~qgtrain.attacks.base.Attack`'s.
    """

    name = "fgsm"
    single_step = True

    def __init__(
        self, alpha: float | None = None, steps: int = 1, random_start: bool = False, **kwargs: Any
    ) -> None:
        """Args:
        alpha: Step size (null: the class's default_alpha of eps).
        steps: Gradient steps (1: a single-step attack).
        random_start: Start from a uniform point in the eps-ball instead of the clean input.
        """
        super().__init__(alpha=alpha, steps=steps, random_start=random_start, **kwargs)

    @classmethod
    def default_alpha(cls, eps: float, steps: int = 1) -> float:
        """One step across the whole ball: ``alpha = eps``."""
        return eps


class FGSMRS(FGSM):
    """FGSM with a uniform random start in the eps-ball, then one step of size ``alpha``.

    "Fast is better than free" (Wong et al., 2020); ``alpha`` defaults to their ``1.25 * eps``.
    """

    name = "fgsm_rs"

    def __init__(self, random_start: bool = True, **kwargs: Any) -> None:
        """Args:
        random_start: Start from a uniform point in the eps-ball (Wong et al.'s FGSM needs it).
        """
        super().__init__(random_start=random_start, **kwargs)

    @classmethod
    def default_alpha(cls, eps: float, steps: int = 1) -> float:
        """Wong et al.'s ``alpha = 1.25 * eps``."""
        return 1.25 * eps
