"""The quantized gradient of Liu & Tsang, Eq. 4 (and step 3 of Sec. 3.2)."""

from __future__ import annotations

import torch


def check_quantization_level(b: int | float) -> int:
    """Return ``b`` as an int, or raise a one-line error if it is not an integer >= 1."""
    if isinstance(b, bool) or not float(b).is_integer() or b < 1:
        raise ValueError(f"b must be an integer >= 1 (b=1 is the sign gradient), got {b!r}")
    return int(b)


def quantize_gradient(grad: torch.Tensor, b: int) -> torch.Tensor:
    """Quantize ``grad`` per example: ``qg = zeta(b * g / M)`` with ``M = max_i |g_i|`` (Eq. 4).

    ``zeta(v) = sign(v)`` where ``|v| < 1`` and ``round(v)`` elsewhere, so every non-zero
    component becomes a non-zero integer in ``[-b, b]``; ``b = 1`` gives exactly ``sign(g)``.
    The maximum is taken over all non-batch dimensions. Rows with ``M = 0`` give zeros.
    The arithmetic runs in float32 whatever the gradient's dtype (fp16/bf16 under autocast);
    the result has the gradient's dtype and shape.
    """
    b = check_quantization_level(b)
    if grad.dim() < 1:
        raise ValueError("quantize_gradient expects a batch of gradients (first dim = batch)")
    flat = grad.reshape(grad.shape[0], -1).float()
    if b == 1:
        return torch.sign(flat).reshape(grad.shape).to(grad.dtype)
    magnitude = flat.abs()
    row_max = magnitude.amax(dim=1, keepdim=True)
    safe_max = torch.where(row_max > 0, row_max, torch.ones_like(row_max))
    # |zeta(v)| = max(round(|v|), 1) wherever v != 0 (the sign below 1, the rounding above), and
    # |v| = b |g| / M exactly (IEEE rounding is sign-symmetric): a few in-place passes, no masks.
    levels = magnitude.mul_(b).div_(safe_max).round_().clamp_(1, b)
    return levels.mul_(torch.sign(flat)).reshape(grad.shape).to(grad.dtype)
