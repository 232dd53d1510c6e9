"""Run any ``torchattacks`` attack (the ``bench`` extra) inside qgtrain's protocol by name.

``build_attack("torchattacks.FAB", eps=0.3, multi_targeted=True, n_classes=10)`` wraps
``torchattacks.FAB``: researchers bring the attacks they already use, and the evaluation engine
(clean first, early exit between attacks, per-example worst case) treats it like its own.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import torch
from torch import nn

from qgtrain.attacks.base import DEFAULT_EPS, Attack, RunOutcome, StepObserver

PREFIX = "torchattacks."


class _ForwardCounter(nn.Module):
    """The model, counting the examples it is evaluated on (gradient passes included)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.examples = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.examples += x.shape[0]
        return self.model(x)


class TorchattacksAttack(Attack):
    """A ``torchattacks`` attack class, configured by ``eps`` and its own keyword arguments.

    Each run of :class:`Attack`'s loop (``restarts`` of them, on the examples still robust) builds
    the wrapped attack (torchattacks binds the model) and projects its output onto the eps-ball and
    the input range, so a wrapped attack can never be credited with a point outside the threat
    model. It starts and iterates as it does itself, with its own loss. Its gradient count is not
    known: ``forwards`` counts every model evaluation it made.
    """

    name = "torchattacks"
    cost_known = False
    fixed_loss = "the wrapped class's own"

    def __init__(
        self,
        attack: str = "PGD",
        eps: float = DEFAULT_EPS,
        attack_kwargs: dict[str, Any] | None = None,
        restarts: int = 1,
        clip: tuple[float, float] = (0.0, 1.0),
    ) -> None:
        """Args:
        attack: the torchattacks class name, e.g. ``FAB``, ``APGDT``, ``AutoAttack``.
        eps: L-inf radius in pixel units.
        attack_kwargs: further keyword arguments of that class.
        restarts: runs of the wrapped attack; per example the first output that fools the model is kept.
        clip: the valid input range.
        """
        super().__init__(eps, eps, 1, 1, False, restarts, "ce", clip)
        self.attack = attack.removeprefix(PREFIX)
        self.attack_kwargs = dict(attack_kwargs or {})
        self.attack_class()  # a one-line error now for a missing package or class

    def attack_class(self) -> type:
        try:
            module = importlib.import_module("torchattacks")
        except ImportError:
            raise ValueError(
                f"{PREFIX}{self.attack} needs the torchattacks package: pip install -e '.[bench]'"
            ) from None
        cls = getattr(module, self.attack, None)
        if not inspect.isclass(cls):
            raise ValueError(f"torchattacks has no attack class {self.attack!r}")
        return cls

    @classmethod
    def for_budget(
        cls, eps: float, steps: int, alpha: float | None = None, b: int | None = None, **kwargs: Any
    ) -> Attack:
        """``steps`` (and ``alpha``) go to the wrapped class when it takes them; ``loss`` does not apply."""
        kwargs.pop("loss", None)
        attack = kwargs.pop("attack")
        wrapped = cls(attack, eps, dict(kwargs.pop("attack_kwargs", {}) or {}), **kwargs)
        accepted = inspect.signature(wrapped.attack_class().__init__).parameters
        extra = {"steps": steps, "alpha": alpha}
        wrapped.attack_kwargs = {
            **{k: v for k, v in extra.items() if v is not None and k in accepted},
            **wrapped.attack_kwargs,
        }
        return wrapped

    @property
    def label(self) -> str:
        return f"{PREFIX}{self.attack}"

    @property
    def gradients_per_example(self) -> int:
        return 0

    def config(self) -> dict[str, Any]:
        return {
            "name": self.label,
            "eps": self.eps,
            "attack_kwargs": dict(self.attack_kwargs),
            "restarts": self.restarts,
            "clip": list(self.clip),
        }

    def _run_once(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        start: torch.Tensor,
        target: torch.Tensor | None,
        observer: StepObserver | None,
        early_exit: bool,
    ) -> RunOutcome:
        """One run of the wrapped attack on ``x`` (``start`` unused: it draws its own), projected."""
        if x.shape[0] == 0:
            return RunOutcome(x.clone(), torch.zeros_like(y, dtype=torch.bool), 0, 0)
        counter = _ForwardCounter(model)
        out = self.attack_class()(counter, eps=self.eps, **self.attack_kwargs)(x, y)
        x_adv = self.threat_model.project(out.detach().to(x.dtype), x)
        return RunOutcome(x_adv, self._is_fooled(model, x_adv, y), 0, counter.examples + y.numel())
