"""RGD, raw gradient descent (Yang, Chen, Chen, Wang, Liang, "Rethinking PGD Attack: Is Sign Function
Necessary?", arXiv 2312.01260): PGD without the sign, stepping a hidden perturbation that is never clipped.

``z <- z + alpha * grad_x L(Pi(z))`` from ``z_0 = x`` (the authors' zero start), and the model sees
``x_adv = Pi(z)``, the projection onto the eps-ball and the input range. Since ``z`` is not clipped, a
component pushed past the ball's edge remembers its gradients and comes back only once they reverse.
The gradient is the raw one: no sign, no quantization, no normalisation.
"""

from __future__ import annotations

from typing import Any

import torch

from qgtrain.attacks.base import DEFAULT_EPS, Attack

# The authors' RGD command (JunjieYang97/RGD, README: ``--alpha 3000 --update_method noclip_raw
# --init_method zero_init --eps 0.0314``, "0.0314=8/255"): a step of 3000 on the gradient of the
# cross-entropy averaged over a batch of 128 (attack.py's default batch), at eps = 8/255.
REFERENCE_ALPHA, REFERENCE_BATCH, REFERENCE_EPS = 3000.0, 128, 8 / 255


class RGD(Attack):
    """Raw gradient descent on an unclipped hidden perturbation; the loop's ``steps_from_unprojected``.

    No ``b``: the direction is the gradient itself.
    """

    name = "rgd"
    steps_from_unprojected = True

    @classmethod
    def default_alpha(cls, eps: float, steps: int) -> float:
        """The reference step per example and per unit of radius: ``3000 / 128 / (8/255) * eps``.

        Our loss is summed over the batch, so an example's gradient is the reference's times its batch
        size (128); and a step scaled with eps, as eps warm-up scales it, moves a component the same
        share of the ball. Independent of ``steps``, as in the reference.
        """
        return REFERENCE_ALPHA / REFERENCE_BATCH * eps / REFERENCE_EPS

    def __init__(
        self,
        eps: float = DEFAULT_EPS,
        alpha: float | None = None,
        steps: int = 40,
        random_start: bool = False,
        restarts: int = 1,
        loss: str = "ce",
        clip: tuple[float, float] = (0.0, 1.0),
    ) -> None:
        """Args:
        eps: L-inf radius in pixel units.
        alpha: Step size on the raw gradient of the per-example loss; None: :meth:`default_alpha`.
        steps: Iterations per start.
        random_start: Start from a uniform point of the ball instead of ``x`` (the authors start at ``x``).
        restarts: Starts, merged per example.
        loss: Per-example attack loss (``ce``, ``margin``, ``dlr``, ``kl``).
        clip: Valid input range.
        """
        super().__init__(eps, alpha, steps, 1, random_start, restarts, loss, clip)

    @classmethod
    def for_budget(
        cls, eps: float, steps: int, alpha: float | None = None, b: int | None = None, **kwargs: Any
    ) -> Attack:
        """RGD with ``steps`` iterations at radius ``eps``; it has no quantization level: ``b`` is ignored."""
        return cls(eps=eps, steps=steps, alpha=alpha, **kwargs)

    def config(self) -> dict[str, Any]:
        """The base's keys without ``b``, which RGD does not take."""
        return {k: v for k, v in super().config().items() if k != "b"}

    def direction(self, grad: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
        """The raw gradient (the reference's ``noclip_raw``)."""
        return grad
