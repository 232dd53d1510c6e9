"""Attacks (pure PyTorch): quantized gradients, FGSM, FGSM-RS, PGD, PQGD, DAA-BLOB, BLOB_QG.

``build_attack("pqgd", eps=0.3, steps=10)`` resolves a registry name to a configured attack.
"""

from __future__ import annotations

from typing import Any

from qgtrain.attacks.base import Attack, AttackResult, LinfThreatModel, StepObserver
from qgtrain.attacks.blob import BLOB, BLOBQG, blob_direction
from qgtrain.attacks.fgsm import FGSM, FGSMRS
from qgtrain.attacks.losses import ATTACK_LOSSES, cross_entropy_loss, margin_loss
from qgtrain.attacks.pgd import PGD, PQGD
from qgtrain.attacks.quantize import check_quantization_level, quantize_gradient

ATTACKS: dict[str, type[Attack]] = {cls.name: cls for cls in (FGSM, FGSMRS, PGD, PQGD, BLOB, BLOBQG)}


def available_attacks() -> list[str]:
    """Registered attack names."""
    return list(ATTACKS)


def attack_class(name: str) -> type[Attack]:
    """The class registered under ``name``, or a one-line error listing the valid names."""
    try:
        return ATTACKS[name]
    except KeyError:
        raise ValueError(f"unknown attack {name!r}; choose one of {', '.join(ATTACKS)}") from None


def build_attack(name: str, **kwargs: Any) -> Attack:
    """Instantiate the attack registered under ``name`` with keyword arguments."""
    return attack_class(name)(**kwargs)


__all__ = [
    "ATTACKS",
    "ATTACK_LOSSES",
    "Attack",
    "AttackResult",
    "BLOB",
    "BLOBQG",
    "FGSM",
    "FGSMRS",
    "LinfThreatModel",
    "PGD",
    "PQGD",
    "StepObserver",
    "attack_class",
    "available_attacks",
    "blob_direction",
    "build_attack",
    "check_quantization_level",
    "cross_entropy_loss",
    "margin_loss",
    "quantize_gradient",
]
