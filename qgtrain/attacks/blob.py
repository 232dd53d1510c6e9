"""DAA-BLOB (Zheng et al., Distributionally Adversarial Attack) and BLOB_QG (Liu & Tsang, Eq. 10-11)."""

from __future__ import annotations

import math
from typing import Any

import torch

from qgtrain.attacks.base import DEFAULT_EPS, Attack
from qgtrain.attacks.quantize import quantize_gradient

_COINCIDENT_RTOL = 1e-5
"""Squared distances below this fraction of ``|x_i|^2 + |x_j|^2`` (centred) count as 0 (rounding noise)."""


def blob_direction(grad: torch.Tensor, particles: torch.Tensor, c: float, kernel_sign: float) -> torch.Tensor:
    """The mixed DAA direction for a batch of particles (all tensors shaped ``(n, ...)``).

    ``D2_ij = |x_i - x_j|^2``; ``h2 = 0.5 * median(D2) / log(n)`` (median of the full n x n matrix,
    diagonal included, as NumPy's); ``K_ij = exp(-D2_ij / (2 h2))``;
    ``r_i = sum_j K_ij (x_i - x_j) / h2``; ``d_i = g_i + (c / n) (sum_j K_ij g_j + kernel_sign * r_i)``.
    When ``n = 1`` or the median is 0 the kernel is undefined and ``d = g``.
    Computed in float32, autocast disabled (a bf16/fp16 Gram matrix would swamp the distances).
    """
    with torch.autocast(device_type=grad.device.type, enabled=False):
        return _blob_direction_fp32(grad, particles, c, kernel_sign)


def _blob_direction_fp32(
    grad: torch.Tensor, particles: torch.Tensor, c: float, kernel_sign: float
) -> torch.Tensor:
    n = grad.shape[0]
    if n < 2:
        return grad
    g = grad.reshape(n, -1).float()
    # Distances and r_i are translation invariant: centring on one particle cuts float32
    # cancellation in |x_i|^2 + |x_j|^2 - 2 x_i.x_j and makes it exactly 0 when all particles agree.
    x = particles.reshape(n, -1).float()
    x = x - x[:1]
    sq_norms = (x * x).sum(dim=1)
    scale = sq_norms[:, None] + sq_norms[None, :]
    dist2 = scale - 2.0 * (x @ x.T)
    # Coinciding particles leave ~1e-7 relative rounding noise, which would make a zero median
    # positive (and h2 tiny): snap distances below _COINCIDENT_RTOL * scale to exactly 0.
    dist2 = torch.where(dist2 > _COINCIDENT_RTOL * scale, dist2, torch.zeros_like(dist2))
    dist2.fill_diagonal_(0.0)
    entries = dist2.flatten()
    mid = entries.numel() // 2  # n*n >= 4 entries; NumPy's median averages the middle pair when even
    upper = entries.kthvalue(mid + 1).values  # selection, not a full sort of n*n entries
    median = upper if entries.numel() % 2 else 0.5 * (entries.kthvalue(mid).values + upper)
    h2 = 0.5 * median / math.log(n)
    if not bool(h2 > 0) or not bool(torch.isfinite(h2)):
        return grad
    kernel = torch.exp(-dist2 / (2.0 * h2))
    repulsion = (x * kernel.sum(dim=1, keepdim=True) - kernel @ x) / h2
    mixed = g + (c / n) * (kernel @ g + kernel_sign * repulsion)
    return mixed.reshape(grad.shape).to(grad.dtype)


class BLOB(Attack):
    """DAA-BLOB: PGD on a batch of interacting particles, step ``alpha * sign(d)`` (Zheng et al.).

    The direction ``d`` mixes each example's gradient with an RBF-kernel (SVGD) term over the
    batch, see :func:`blob_direction`; ``c = 1.1`` as in the authors' code for cross-entropy
    (they use ``c = 10`` with the CW loss). The paper's Eq. 8 writes the kernel-gradient term
    ``r_i`` with a plus sign, while the reference code (``blob_rand.py``) subtracts it:
    ``kernel_sign=-1`` (default) follows the code, ``kernel_sign=+1`` the equation.

    The step of an example depends on the other examples of its batch, by design: results
    depend on the batch size (record it), and under DDP the particles are those of one rank.

    Args:
        c: Weight of the kernel (SVGD) term in the mixed direction (1.1 for cross-entropy).
        kernel_sign: -1 subtracts the kernel-gradient term as the reference code does; +1 adds it (Eq. 8).
    """

    name = "blob"
    batch_coupled = True

    def __init__(
        self,
        eps: float = DEFAULT_EPS,
        alpha: float | None = 0.01,
        steps: int = 40,
        b: int = 1,
        random_start: bool = True,
        restarts: int = 1,
        loss: str = "ce",
        clip: tuple[float, float] = (0.0, 1.0),
        c: float = 1.1,
        kernel_sign: int = -1,
    ) -> None:
        super().__init__(eps, alpha, steps, b, random_start, restarts, loss, clip)
        if kernel_sign not in (-1, 1):
            raise ValueError(
                f"kernel_sign must be -1 (reference code) or +1 (paper Eq. 8), got {kernel_sign!r}"
            )
        if not c >= 0:
            raise ValueError(f"c must be >= 0, got {c!r}")
        self.c = float(c)
        self.kernel_sign = int(kernel_sign)

    def _extra_config(self) -> dict[str, Any]:
        return {"c": self.c, "kernel_sign": self.kernel_sign}

    def direction(self, grad: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
        """``sign(d)`` (``b=1``) or the quantized ``zeta(b d / M)`` of the mixed direction."""
        return quantize_gradient(blob_direction(grad, x_adv, self.c, self.kernel_sign), self.b)


class BLOBQG(BLOB):
    """BLOB_QG, Eq. 10-11: DAA-BLOB with the quantized direction ``zeta(b * d / M)``, default ``b=100``."""

    name = "blob_qg"
    default_b = 100

    def __init__(self, b: int = default_b, **kwargs: Any) -> None:
        """Args:
        b: Quantization level of the mixed direction, ``zeta(b * d / M)`` (100; 1 is DAA-BLOB).
        """
        super().__init__(b=b, **kwargs)
