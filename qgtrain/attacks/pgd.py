"""PGD (Madry et al.) and PQGD, PGD with the quantized gradient (Liu & Tsang, Eq. 7)."""

from __future__ import annotations

from typing import Any

from qgtrain.attacks.base import Attack


class PGD(Attack):
    """Projected gradient descent: uniform random start, ``x <- Pi(x + alpha * sign(g))``.

    ``b > 1`` turns the sign into the quantized gradient ("generalized gradient quantization").
    """

    name = "pgd"


class PQGD(PGD):
    """Projected quantized gradient descent, Eq. 7: ``x <- Pi(x + alpha * zeta(b * g / M))``.

    Identical to :class:`PGD` except for its default ``b`` (100; the paper finds 100-1000 best) and
    step-size rule. With ``b=1`` and the same ``alpha`` it is bit-identical to PGD under the same seed.
    """

    name = "pqgd"
    default_b = 100

    @classmethod
    def default_alpha(cls, eps: float, steps: int) -> float:
        """Step size ``eps / steps``, 0.4 x PGD's ``2.5 * eps / steps``: a quantized step moves the
        largest-gradient pixels by up to ``alpha * b``, to the ball's edge at once; the sign-valued rest
        needs only eps of travel (the measurements behind the rule: docs/RESULTS.md, "Cheap training")."""
        return eps / steps

    def __init__(self, b: int = default_b, **kwargs: Any) -> None:
        """Args:
        b: Quantization level of the gradient, ``zeta(b * g / M)`` (100; 1 is the sign).
        """
        super().__init__(b=b, **kwargs)
