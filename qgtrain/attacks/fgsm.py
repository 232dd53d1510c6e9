"""Single-step attacks: FGSM (Goodfellow et al.) and FGSM with random start (Wong et al.)."""

from __future__ import annotations

from qgtrain.attacks.base import Attack


class FGSM(Attack):
    """Fast gradient sign method: one step of size ``alpha`` (default ``eps``) from the clean input.

    ``b > 1`` quantizes the gradient instead of taking its sign.
    """

    name = "fgsm"
    single_step = True

    def __init__(
        self,
        eps: float = 0.3,
        alpha: float | None = None,
        steps: int = 1,
        b: int = 1,
        random_start: bool = False,
        restarts: int = 1,
        loss: str = "ce",
        clip: tuple[float, float] = (0.0, 1.0),
    ) -> None:
        alpha = self.default_alpha(eps, steps) if alpha is None else alpha
        super().__init__(eps, alpha, steps, b, random_start, restarts, loss, clip)

    @classmethod
    def default_alpha(cls, eps: float, steps: int = 1) -> float:
        """One step across the whole ball: ``alpha = eps``."""
        return eps


class FGSMRS(Attack):
    """FGSM with a uniform random start in the eps-ball, then one step of size ``alpha``.

    "Fast is better than free" (Wong et al., 2020); ``alpha`` defaults to their ``1.25 * eps``.
    """

    name = "fgsm_rs"
    single_step = True

    def __init__(
        self,
        eps: float = 0.3,
        alpha: float | None = None,
        steps: int = 1,
        b: int = 1,
        random_start: bool = True,
        restarts: int = 1,
        loss: str = "ce",
        clip: tuple[float, float] = (0.0, 1.0),
    ) -> None:
        alpha = self.default_alpha(eps, steps) if alpha is None else alpha
        super().__init__(eps, alpha, steps, b, random_start, restarts, loss, clip)

    @classmethod
    def default_alpha(cls, eps: float, steps: int = 1) -> float:
        """Wong et al.'s ``alpha = 1.25 * eps``."""
        return 1.25 * eps
