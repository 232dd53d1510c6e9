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


def dlr_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-example untargeted DLR loss (Croce & Hein 2020, Eq. 6), to be maximised:
    ``-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12)``, ``pi`` sorting the logits in decreasing
    order. Invariant to shifting and scaling the logits; needs at least 3 classes."""
    logits = logits.float()
    if logits.shape[1] < 3:
        raise ValueError(f"the DLR loss needs at least 3 classes, got {logits.shape[1]}")
    top = logits.topk(3, dim=1).values
    true_logit = logits.gather(1, labels[:, None]).squeeze(1)
    best_other = logits.scatter(1, labels[:, None], float("-inf")).amax(dim=1)
    return -(true_logit - best_other) / (top[:, 0] - top[:, 2] + 1e-12)


def targeted_dlr_loss(logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-example targeted DLR loss (Croce & Hein 2020, Eq. 7), to be maximised:
    ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)``; needs at least 4 classes."""
    logits = logits.float()
    if logits.shape[1] < 4:
        raise ValueError(f"the targeted DLR loss needs at least 4 classes, got {logits.shape[1]}")
    top = logits.topk(4, dim=1).values
    true_logit = logits.gather(1, labels[:, None]).squeeze(1)
    target_logit = logits.gather(1, targets[:, None]).squeeze(1)
    return -(true_logit - target_logit) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)


def kl_loss(logits: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-example ``KL(p || softmax(logits)) = sum_j p_j (log p_j - log q_j)`` (TRADES, Zhang et al.
    2019, Eq. 5), to be maximised. ``reference`` is the distribution ``p`` (N, C) that an attack's labels
    carry for this loss: the model's softmax on the clean inputs (``0 log 0 = 0``)."""
    if reference.dim() != 2 or reference.shape != logits.shape or not reference.is_floating_point():
        raise ValueError(
            f"the kl loss takes a reference distribution (N, C) = {tuple(logits.shape)} as the attack's "
            f"labels (softmax of the clean logits), got {reference.dtype} {tuple(reference.shape)}"
        )
    reference = reference.float()
    log_q = F.log_softmax(logits.float(), dim=1)
    return (torch.special.xlogy(reference, reference) - reference * log_q).sum(dim=1)


def class_labels(labels: torch.Tensor) -> torch.Tensor:
    """Class indices of an attack's labels: ``labels`` itself, or for a reference distribution (N, C)
    (the :func:`kl_loss` labels) its most likely class, against which "fooled" is judged."""
    return labels.argmax(dim=1) if labels.dim() == 2 else labels


ATTACK_LOSSES: dict[str, LossFn] = {
    "ce": cross_entropy_loss,
    "margin": margin_loss,
    "dlr": dlr_loss,
    "kl": kl_loss,
}


def get_attack_loss(name: str) -> LossFn:
    """Resolve a loss name (``ce``, ``margin``, ``dlr`` or ``kl``) or raise a one-line error."""
    try:
        return ATTACK_LOSSES[name]
    except KeyError:
        raise ValueError(f"loss must be one of {sorted(ATTACK_LOSSES)}, got {name!r}") from None
