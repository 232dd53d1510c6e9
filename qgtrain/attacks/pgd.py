"""PGD (Madry et al.) and PQGD, PGD with the quantized gradient (Liu & Tsang, Eq. 7)."""

from __future__ import annotations

from qgtrain.attacks.base import Attack


class PGD(Attack):
    """Projected gradient descent: uniform random start, ``x <- Pi(x + alpha * sign(g))``.

    ``b > 1`` turns the sign into the quantized gradient ("generalized gradient quantization").
    """

    name = "pgd"


class PQGD(PGD):
    """Projected quantized gradient descent, Eq. 7: ``x <- Pi(x + alpha * zeta(b * g / M))``.

    Identical to :class:`PGD` except for its default ``b`` (100; the paper finds 100-1000 best).
    With ``b=1`` it is bit-identical to PGD under the same seed.
    """

    name = "pqgd"
    default_b = 100

    def __init__(
        self,
        eps: float = 0.3,
        alpha: float = 0.01,
        steps: int = 40,
        b: int = default_b,
        random_start: bool = True,
        restarts: int = 1,
        loss: str = "ce",
        clip: tuple[float, float] = (0.0, 1.0),
    ) -> None:
        super().__init__(eps, alpha, steps, b, random_start, restarts, loss, clip)
