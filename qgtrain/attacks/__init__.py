"""Attacks (pure PyTorch): quantized gradients, FGSM, FGSM-RS, free AT's step, N-FGSM, PGD, PQGD, RGD, DAA-BLOB,
BLOB_QG, APGD (CE, DLR, targeted), FAB-T, Square, and an adapter for any ``torchattacks`` attack.

``build_attack("pqgd", eps=0.3, steps=10)`` resolves a registry name to a configured attack;
``build_attack("torchattacks.FAB", eps=0.3)`` wraps a torchattacks class.
"""

from __future__ import annotations

from typing import Any

from qgtrain.attacks.apgd import APGD, APGDCE, APGDDLR, APGDT
from qgtrain.attacks.base import Attack, AttackResult, LinfThreatModel, StepObserver
from qgtrain.attacks.blob import BLOB, BLOBQG, blob_direction
from qgtrain.attacks.external import PREFIX as TORCHATTACKS_PREFIX
from qgtrain.attacks.external import TorchattacksAttack
from qgtrain.attacks.fab import FABT
from qgtrain.attacks.fgsm import FGSM, FGSMRS
from qgtrain.attacks.free import Free
from qgtrain.attacks.losses import (
    ATTACK_LOSSES,
    class_labels,
    cross_entropy_loss,
    dlr_loss,
    kl_loss,
    margin_loss,
    targeted_dlr_loss,
)
from qgtrain.attacks.nfgsm import NFGSM
from qgtrain.attacks.pgd import PGD, PQGD
from qgtrain.attacks.quantize import check_quantization_level, quantize_gradient
from qgtrain.attacks.rgd import RGD
from qgtrain.attacks.square import Square
from qgtrain.attacks.warm_start import started_at

ATTACKS: dict[str, type[Attack]] = {
    cls.name: cls
    for cls in (FGSM, FGSMRS, Free, NFGSM, PGD, PQGD, RGD, BLOB, BLOBQG, APGDCE, APGDDLR, APGDT, FABT, Square)
}


def available_attacks() -> list[str]:
    """Registered attack names (``torchattacks.<Class>`` is accepted besides these)."""
    return list(ATTACKS)


def attack_class(name: str) -> type[Attack]:
    """The class registered under ``name``, or a one-line error listing the valid names."""
    if name.startswith(TORCHATTACKS_PREFIX):
        return TorchattacksAttack
    try:
        return ATTACKS[name]
    except KeyError:
        raise ValueError(
            f"unknown attack {name!r}; choose one of {', '.join(ATTACKS)} or torchattacks.<Class>"
        ) from None


def build_attack(name: str, **kwargs: Any) -> Attack:
    """Instantiate the attack registered under ``name`` with keyword arguments."""
    if name.startswith(TORCHATTACKS_PREFIX):
        return TorchattacksAttack(name, **kwargs)
    return attack_class(name)(**kwargs)


def attack_for_budget(
    name: str, eps: float, steps: int, alpha: float | None = None, b: int | None = None, **kwargs: Any
) -> Attack:
    """``attack_class(name).for_budget(...)``: the attack at radius ``eps`` with ``steps`` iterations."""
    if name.startswith(TORCHATTACKS_PREFIX):
        kwargs["attack"] = name
    return attack_class(name).for_budget(eps, steps, alpha=alpha, b=b, **kwargs)


__all__ = [
    "APGD",
    "APGDCE",
    "APGDDLR",
    "APGDT",
    "ATTACKS",
    "ATTACK_LOSSES",
    "Attack",
    "AttackResult",
    "BLOB",
    "BLOBQG",
    "FABT",
    "FGSM",
    "FGSMRS",
    "Free",
    "LinfThreatModel",
    "NFGSM",
    "PGD",
    "PQGD",
    "RGD",
    "Square",
    "StepObserver",
    "TorchattacksAttack",
    "attack_class",
    "attack_for_budget",
    "available_attacks",
    "blob_direction",
    "build_attack",
    "check_quantization_level",
    "class_labels",
    "cross_entropy_loss",
    "dlr_loss",
    "kl_loss",
    "margin_loss",
    "quantize_gradient",
    "started_at",
    "targeted_dlr_loss",
]
