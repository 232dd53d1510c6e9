"""APGD (Croce & Hein, ICML 2020, Algorithm 1): PGD with momentum and a step size that adapts itself.

The step starts at ``2 eps`` and is halved at checkpoints ``p_0 = 0, p_1 = 0.22,
p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)`` (fractions of the iterations) for every example
whose loss rose in at most ``rho = 0.75`` of the steps since the last checkpoint (condition 1), or
whose step and best loss both stayed unchanged since then (condition 2); a halving restarts from the
example's best point. The checkpoints, both conditions and the random start ``x + eps t / |t|_inf``
(``t`` uniform in ``[-1, 1]``) are those of AutoAttack's code (fra31/auto-attack), including how it
counts the first step at the first checkpoint (see :func:`first_step_rose`), so that an injected start
gives the original's iterates. Like every sign attack here the direction takes ``b``: ``b > 1``
steps along the quantized gradient instead of the sign (APGD with quantized gradients). APGD-T runs
once per target, the 9 most likely wrong classes, on the targeted DLR loss.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from qgtrain.attacks.base import DEFAULT_EPS, Attack, FirstFooled, RunOutcome, StepObserver
from qgtrain.attacks.cpu_kernels import as_model_input
from qgtrain.attacks.losses import targeted_dlr_loss


def checkpoint_steps(steps: int) -> list[int]:
    """Iterations (1-based counts) after which the step size is checked, as in the reference code:
    the first after ``max(int(0.22 n), 1)``, then shrinking by ``max(int(0.03 n), 1)`` to at least
    ``max(int(0.06 n), 1)``."""
    length = max(int(0.22 * steps), 1)
    shrink, shortest = max(int(0.03 * steps), 1), max(int(0.06 * steps), 1)
    marks, at = [], 0
    while at + length <= steps:
        at += length
        marks.append(at)
        length = max(length - shrink, shortest)
    return marks


def first_step_rose(loss: torch.Tensor, steps: int) -> torch.Tensor:
    """Whether condition 1 counts the first iteration as a rise of the loss, as AutoAttack counts it.

    The paper compares ``f(x_1)`` with ``f(x_0)``; AutoAttack's ``check_oscillation`` reads its
    per-iteration loss history at index ``-1`` there, its last row, which is still zero unless the
    run has one iteration (then it is ``f(x_1)`` itself). So the first iteration counts as a rise when
    ``f(x_1) > 0`` (always on the cross-entropy; on the targeted DLR loss only once the target wins),
    or never for ``steps = 1``.
    """
    return loss > 0 if steps > 1 else torch.zeros_like(loss, dtype=torch.bool)


class APGD(Attack):
    """Auto-PGD on the cross-entropy (``loss="ce"``) or DLR (``loss="dlr"``) loss.

    Returns, per example, the first iterate that fools the model (with early exit) or the point of
    highest loss. ``steps=100`` and one restart as in AutoAttack's standard version.
    """

    name = "apgd"

    def __init__(
        self,
        eps: float = DEFAULT_EPS,
        steps: int = 100,
        b: int = 1,
        restarts: int = 1,
        loss: str = "ce",
        rho: float = 0.75,
        momentum: float = 0.75,
        initial_step: float = 2.0,
        random_start: bool = True,
        clip: tuple[float, float] = (0.0, 1.0),
    ) -> None:
        """Args:
        eps: L-inf radius in pixel units.
        steps: iterations per restart (AutoAttack: 100).
        b: quantization level of the direction (1 = the sign).
        restarts: random starts, merged per example.
        loss: ``ce`` or ``dlr`` (APGD-T uses the targeted DLR loss).
        rho: halve the step when at most this share of the steps since a checkpoint raised the loss.
        momentum: weight of the new step against the previous one (0.75 in the paper).
        initial_step: the first step size in units of eps (2 in the paper).
        random_start: start from a uniform point of the eps-ball.
        clip: the valid input range.
        """
        if not 0 < rho <= 1:
            raise ValueError(f"rho must be in (0, 1], got {rho!r}")
        if not 0 < momentum <= 1:
            raise ValueError(f"momentum must be in (0, 1], got {momentum!r}")
        if not initial_step > 0:
            raise ValueError(f"initial_step must be > 0, got {initial_step!r}")
        super().__init__(eps, initial_step * eps, steps, b, random_start, restarts, loss, clip)
        self.rho = float(rho)
        self.momentum = float(momentum)
        self.initial_step = float(initial_step)

    @classmethod
    def for_budget(
        cls, eps: float, steps: int, alpha: float | None = None, b: int | None = None, **kwargs: Any
    ) -> Attack:
        """APGD sets its own step size: ``alpha`` is ignored."""
        if cls.fixed_loss is not None:
            kwargs.pop("loss", None)
        return cls(eps=eps, steps=steps, b=cls.default_b if b is None else b, **kwargs)

    @property
    def gradients_per_example(self) -> int:
        return (self.steps + 1) * len(self.stages_per_restart()) * self.restarts

    def stages_per_restart(self) -> list[int]:
        return [0]

    def config(self) -> dict[str, Any]:
        keys = ("eps", "steps", "b", "restarts", "loss", "rho", "momentum", "initial_step", "random_start")
        return {"name": self.name, **{k: getattr(self, k) for k in keys}, "clip": list(self.clip)}

    def starting_point(self, x: torch.Tensor) -> torch.Tensor:
        """AutoAttack's start ``x + eps t / |t|_inf`` (``t`` uniform in ``[-1, 1]``, per example; a
        component of each perturbation at exactly ``eps``), clipped to the valid range; drawn for the
        whole batch."""
        if not self.random_start:
            return x.clone()
        t = 2 * torch.rand_like(x) - 1
        norm = t.flatten(1).abs().amax(dim=1).view(-1, *([1] * (x.dim() - 1)))
        return (x + self.eps * (t / (norm + 1e-12))).clamp_(*self.clip)

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
        """Algorithm 1 from ``start``; per-example state is dropped with the examples that leave."""
        geometry = self.threat_model
        lower, upper = geometry.bounds(x)
        x_adv = start
        grad, loss, logits = self.input_gradient(model, x_adv, y, target)
        gradients = x_adv.shape[0]
        tracker = FirstFooled(start, drop=True) if early_exit else None
        state = {
            "x": x,
            "y": y,
            "lower": lower,
            "upper": upper,
            "x_adv": x_adv,
            "x_prev": x_adv.clone(),
            "grad": grad,
            "loss": loss,
            "x_best": x_adv.clone(),
            "grad_best": grad.clone(),
            "loss_best": loss.clone(),
            "loss_best_at_check": loss.clone(),
            "reduced_at_check": torch.ones_like(loss, dtype=torch.bool),
            "increases": torch.zeros_like(loss),
            "step": torch.full_like(loss, self.alpha),
            "target": target,
        }

        def drop_fooled(logits: torch.Tensor) -> bool:
            """Early exit: remove the examples the current iterate fools; False when none is left."""
            if tracker is None:
                return True
            keep = tracker.update(state["x_adv"], logits, state["y"])
            if keep is not None:
                for key, value in state.items():
                    state[key] = None if value is None else value[keep]
            return state["x_adv"].shape[0] > 0

        marks = set(checkpoint_steps(self.steps))
        since_check = 0
        alive = drop_fooled(logits)
        for iteration in range(self.steps if alive else 0):
            s = state
            view = (-1,) + (1,) * (s["x_adv"].dim() - 1)
            direction = self.direction(s["grad"], s["x_adv"])
            if observer is not None:
                observer(iteration, s["loss"], s["grad"], direction)
            a = self.momentum if iteration > 0 else 1.0
            z = geometry.project(
                geometry.step(s["x_adv"], direction, s["step"].view(view)), s["x"], (s["lower"], s["upper"])
            )
            moved = s["x_adv"] + a * (z - s["x_adv"]) + (1.0 - a) * (s["x_adv"] - s["x_prev"])
            s["x_prev"] = s["x_adv"]
            s["x_adv"] = geometry.project(moved, s["x"], (s["lower"], s["upper"]))
            previous_loss = s["loss"]
            s["grad"], s["loss"], logits = self.input_gradient(model, s["x_adv"], s["y"], s["target"])
            gradients += s["x_adv"].shape[0]
            rose = s["loss"] > previous_loss if iteration > 0 else first_step_rose(s["loss"], self.steps)
            s["increases"] += rose.to(s["increases"].dtype)
            better = s["loss"] > s["loss_best"]
            s["x_best"][better] = s["x_adv"][better]
            s["grad_best"][better] = s["grad"][better]
            s["loss_best"] = torch.where(better, s["loss"], s["loss_best"])
            since_check += 1
            # The iterate the logits belong to is judged before a halving moves it to the best point.
            if not drop_fooled(logits):
                break
            if iteration + 1 in marks:
                oscillating = s["increases"] <= self.rho * since_check  # AutoAttack's "<=" (the paper: "<")
                stalled = ~s["reduced_at_check"] & (s["loss_best_at_check"] >= s["loss_best"])
                halve = oscillating | stalled
                s["step"] = torch.where(halve, s["step"] / 2, s["step"])
                s["x_adv"][halve] = s["x_best"][halve]
                s["grad"][halve] = s["grad_best"][halve]
                s["reduced_at_check"] = halve
                s["loss_best_at_check"] = s["loss_best"].clone()
                s["increases"].zero_()
                since_check = 0
        if tracker is None:
            return RunOutcome(state["x_best"].detach(), None, gradients, 0)
        # Survivors end at their best-loss point; one forward pass checks whether it fools.
        fooled = self._is_fooled(model, state["x_best"], state["y"])
        x_out, fooled = tracker.finish(state["x_best"].detach(), fooled)
        return RunOutcome(x_out, fooled, gradients, state["x_best"].shape[0])


class APGDCE(APGD):
    """APGD on the cross-entropy loss (AutoAttack's first attack)."""

    name = "apgd_ce"


class APGDDLR(APGD):
    """APGD on the untargeted DLR loss (shift- and scale-invariant in the logits)."""

    name = "apgd_dlr"

    def __init__(self, loss: str = "dlr", **kwargs: Any) -> None:
        """Args:
        loss: The maximised loss (the untargeted DLR loss).
        """
        super().__init__(loss=loss, **kwargs)


class APGDT(APGD):
    """APGD-T: APGD on the targeted DLR loss, one run per target class (AutoAttack's second attack).

    The targets of an example are its ``targets`` most likely wrong classes on the clean input
    (9 for ten classes, as in AutoAttack); each target gets ``restarts`` runs.
    """

    name = "apgd_t"
    fixed_loss = "dlr-targeted"

    def __init__(
        self,
        eps: float = DEFAULT_EPS,
        steps: int = 100,
        b: int = 1,
        restarts: int = 1,
        targets: int = 9,
        rho: float = 0.75,
        momentum: float = 0.75,
        initial_step: float = 2.0,
        random_start: bool = True,
        clip: tuple[float, float] = (0.0, 1.0),
    ) -> None:
        """Args:
        eps: L-inf radius in pixel units.
        steps: iterations per target and restart.
        b: quantization level of the direction (1 = the sign).
        restarts: random starts per target.
        targets: how many of the most likely wrong classes to aim at, in order (at most classes - 1).
        rho: see :class:`APGD`.
        momentum: see :class:`APGD`.
        initial_step: see :class:`APGD`.
        random_start: start from a uniform point of the eps-ball.
        clip: the valid input range.
        """
        if isinstance(targets, bool) or int(targets) != targets or targets < 1:
            raise ValueError(f"targets must be an integer >= 1, got {targets!r}")
        super().__init__(eps, steps, b, restarts, "dlr", rho, momentum, initial_step, random_start, clip)
        self.loss = self.fixed_loss
        self.targets = int(targets)

    def stages_per_restart(self) -> list[int]:
        return list(range(self.targets))

    @property
    def forwards_per_example(self) -> int:
        return self.restarts * self.targets + 1

    def config(self) -> dict[str, Any]:
        cfg = super().config()
        del cfg["loss"]
        return {**cfg, "targets": self.targets}

    def attack_loss(self, logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        assert target is not None, "APGD-T needs a target per example"
        return targeted_dlr_loss(logits, y, target)

    @torch.no_grad()
    def stages(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor | None]:
        """For target rank k = 1..targets, the k-th most likely class other than ``y`` (clean logits),
        each repeated ``restarts`` times (the reference code's order: targets outer)."""
        logits = model(as_model_input(model, x)).float()
        classes = logits.shape[1]
        if self.targets > classes - 1:
            raise ValueError(
                f"{self.name}: targets={self.targets} but the model has only {classes - 1} wrong classes"
            )
        ranked = logits.scatter(1, y[:, None], float("-inf")).argsort(dim=1, descending=True)
        return [ranked[:, k] for k in range(self.targets) for _ in range(self.restarts)]
