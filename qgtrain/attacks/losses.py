"""Per-example attack losses, summed over the batch so batch size never rescales gradients."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy (to be maximised)."""
    return F.cross_entropy(logits.float(), labels, reduction="none")


def margin_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-example CW margin ``max_{j != y} z_j - z_y`` (positive means misclassified)."""
    logits = logits.float()
    true_logit = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return others.amax(dim=1) - true_logit


ATTACK_LOSSES: dict[str, LossFn] = {"ce": cross_entropy_loss, "margin": margin_loss}


def get_attack_loss(name: str) -> LossFn:
    """Resolve a loss name (``ce`` or ``margin``) or raise a one-line error."""
    try:
        return ATTACK_LOSSES[name]
    except KeyError:
        raise ValueError(f"loss must be one of {sorted(ATTACK_LOSSES)}, got {name!r}") from None
