"""The one iteration loop shared by every attack, and the L-infinity threat model it steps in.

Geometry (random start, step, projection) lives in :class:`LinfThreatModel`, in the manner of
MadryLab's ``robustness`` step classes; :class:`Attack` owns the loop, restarts with the
per-example merge, early exit for evaluation, and model/gradient hygiene. Subclasses only say how
the step direction is formed from the input gradient (:meth:`Attack.direction`); APGD and Square,
whose iterations differ, replace :meth:`Attack._run_once` and keep everything else.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from qgtrain.attacks.cpu_kernels import as_model_input, native_stem_backward
from qgtrain.attacks.limits import (
    DEFAULT_MAX_RESTARTS,
    DEFAULT_MAX_STEPS,
    MAX_RESTARTS_ENV,
    MAX_STEPS_ENV,
    check_stop,
    upper_bound,
)
from qgtrain.attacks.losses import class_labels, get_attack_loss
from qgtrain.attacks.quantize import check_quantization_level, quantize_gradient

StepObserver = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]
"""Called as ``observer(step, per_example_loss, grad, direction)`` at every inner step."""


DEFAULT_EPS = 0.3
"""The L-inf radius every attack defaults to: the paper's MNIST setting, in pixel units."""


class LinfThreatModel:
    """The set ``{x' : |x' - x|_inf <= eps, lo <= x' <= hi}``: init, step and projection."""

    def __init__(self, eps: float, clip: tuple[float, float] = (0.0, 1.0)) -> None:
        self.eps = float(eps)
        self.clip = (float(clip[0]), float(clip[1]))

    def random_start(self, x: torch.Tensor) -> torch.Tensor:
        """Uniform sample from the eps-ball around ``x``, clipped to the valid range."""
        noise = torch.empty_like(x).uniform_(-self.eps, self.eps)
        return (x + noise).clamp_(*self.clip)

    def step(self, x_adv: torch.Tensor, direction: torch.Tensor, alpha: float | torch.Tensor) -> torch.Tensor:
        """Move ``alpha`` (a number, or one per example) along ``direction`` (a sign or quantized gradient)."""
        return x_adv + alpha * direction

    def bounds(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-component ``(lower, upper)`` of the set: ``max(x - eps, lo)`` and ``min(x + eps, hi)``."""
        return (x - self.eps).clamp_(min=self.clip[0]), (x + self.eps).clamp_(max=self.clip[1])

    def project(
        self,
        x_adv: torch.Tensor,
        x: torch.Tensor,
        bounds: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Projection onto the eps-ball around ``x`` intersected with the clip box.

        ``bounds`` (from :meth:`bounds`, computed once per run) saves four element-wise ops per step.
        """
        lower, upper = self.bounds(x) if bounds is None else bounds
        return torch.clamp(x_adv, min=lower, max=upper)


@dataclass
class AttackResult:
    """Adversarial inputs, which examples the model misclassifies on them, and what it cost.

    ``gradients`` counts input-gradient evaluations per example (one example through one forward
    and backward pass); ``forwards`` counts forward-only example passes (score queries, checks).
    Examples left out by ``active`` are returned unchanged, not fooled, at no cost.
    """

    x_adv: torch.Tensor
    fooled: torch.Tensor
    gradients: int = 0
    forwards: int = 0


class Gradient(NamedTuple):
    """One input-gradient evaluation: the gradient, the per-example loss and the logits (detached)."""

    grad: torch.Tensor
    loss: torch.Tensor
    logits: torch.Tensor


class RunOutcome(NamedTuple):
    """One run of the iteration loop on some examples; ``fooled`` is None when it was not checked."""

    x_adv: torch.Tensor
    fooled: torch.Tensor | None
    gradients: int
    forwards: int


class FirstFooled:
    """Early exit: every example keeps the first iterate that fools the model.

    Independent examples then leave the batch (``drop``: they cost no more gradients); batch-coupled
    ones stay, since the other particles' steps depend on them, but their first fooling point is kept.
    """

    def __init__(self, start: torch.Tensor, drop: bool) -> None:
        self.x_out = start.clone()
        self.fooled = torch.zeros(start.shape[0], dtype=torch.bool, device=start.device)
        self.live = torch.arange(start.shape[0], device=start.device)
        self.drop = drop

    def update(self, x_adv: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """Record the live examples that ``x_adv`` fools; return the mask of those that stay live,
        or None when none leaves."""
        hit = logits.argmax(dim=1) != class_labels(y)
        if not self.drop:
            hit &= ~self.fooled
        if not bool(hit.any()):
            return None
        index = self.live[hit]
        self.x_out[index] = x_adv[hit].to(self.x_out.dtype)
        self.fooled[index] = True
        if not self.drop:
            return None
        keep = ~hit
        self.live = self.live[keep]
        return keep

    def finish(self, x_adv: torch.Tensor, fooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Live examples end at ``x_adv`` (their last iterate, fooling or not) unless fooled before."""
        take = ~self.fooled[self.live]
        self.x_out[self.live[take]] = x_adv[take].to(self.x_out.dtype)
        self.fooled[self.live] |= fooled
        return self.x_out, self.fooled


class Attack:
    """Iterative first-order L-infinity attack: ``x <- Pi(x + alpha * direction(grad))``.

    Configured by keyword arguments and called as ``attack(model, x, y) -> x_adv``. The loss is
    computed per example and summed; gradients are taken w.r.t. the input only (no parameter
    ``.grad`` is written); the model's train/eval flags are left exactly as found (callers choose
    the mode: evaluation uses eval mode). ``restarts=R`` runs R random starts and keeps, per
    example, the first input that fools the model, else the last one (Sec. 4.1, "Practical Issues").
    Works inside ``torch.inference_mode`` (gradients are re-enabled locally) and under autocast.

    Traits of an attack class (read them, never test names): ``batch_coupled``, ``single_step``,
    ``default_b`` (> 1: a quantized attack, whose evaluation rows repeat per ``b``),
    ``uses_gradients``, ``stays_in_ball``, ``steps_from_unprojected``, and :meth:`default_alpha`;
    :meth:`for_budget` builds one from a budget.

    Args:
        eps: L-inf radius in pixel units, in (0, high - low] of ``clip``.
        alpha: Step size per iteration (> 0); None: the class's rule, :meth:`default_alpha` of
            ``eps`` and ``steps``.
        steps: Iterations per start (an integer >= 1).
        b: Quantization level of the gradient, ``zeta(b * g / M)``; 1 is the sign gradient (Eq. 7).
        random_start: Start from a uniform point in the eps-ball instead of the clean input.
        restarts: Random starts; per example the first input that fools the model is kept.
        loss: Attack loss summed over the batch: ``ce`` (cross-entropy), ``margin`` (CW), ``dlr``, or
            ``kl`` (TRADES; the labels ``y`` are then the clean softmax, ``(N, C)``).
        clip: Valid input range ``(low, high)``.
    """

    name: ClassVar[str] = "attack"
    batch_coupled: ClassVar[bool] = False
    """True when an example's step depends on the rest of its batch (BLOB's particles)."""
    single_step: ClassVar[bool] = False
    """True for one-step attacks (FGSM family): ``steps`` and the step-size rule do not apply."""
    default_b: ClassVar[int] = 1
    """The class's quantization level: 1 for sign attacks, > 1 for quantized ones (PQGD, BLOB_QG)."""
    uses_gradients: ClassVar[bool] = True
    """False for score-based attacks (Square), which only query the model's outputs."""
    cost_known: ClassVar[bool] = True
    """False when the attack's gradient count cannot be observed (wrapped third-party attacks)."""
    fixed_loss: ClassVar[str | None] = None
    """The loss when it is part of the algorithm (APGD-T: targeted DLR; Square: margin): no ``loss`` argument."""
    stays_in_ball: ClassVar[bool] = True
    """False for training-only attacks whose output leaves the eps-ball (N-FGSM): not for evaluation."""
    steps_from_unprojected: ClassVar[bool] = False
    """True when the loop steps from the unprojected point and the model sees its projection (RGD's
    hidden perturbation); False: each step starts from the projected iterate."""
    native_stem_backward: bool = True
    """Kernel choice only (see :func:`native_stem_backward`); False: the legacy path, for benchmarks."""

    def __init__(
        self,
        eps: float = DEFAULT_EPS,
        alpha: float | None = 0.01,
        steps: int = 40,
        b: int = default_b,
        random_start: bool = True,
        restarts: int = 1,
        loss: str = "ce",
        clip: tuple[float, float] = (0.0, 1.0),
    ) -> None:
        lo, hi = float(clip[0]), float(clip[1])
        if not lo < hi:
            raise ValueError(f"clip must be (low, high) with low < high, got {clip!r}")
        if not 0 < eps <= hi - lo:
            raise ValueError(f"eps must be in (0, {hi - lo:g}] for inputs in [{lo:g}, {hi:g}], got {eps!r}")
        if alpha is not None and not alpha > 0:
            raise ValueError(f"alpha must be > 0 (or null: the class's rule), got {alpha!r}")
        if isinstance(steps, bool) or int(steps) != steps or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        if isinstance(restarts, bool) or int(restarts) != restarts or restarts < 1:
            raise ValueError(f"restarts must be an integer >= 1, got {restarts!r}")
        for key, value, env, default in (
            ("steps", steps, MAX_STEPS_ENV, DEFAULT_MAX_STEPS),
            ("restarts", restarts, MAX_RESTARTS_ENV, DEFAULT_MAX_RESTARTS),
        ):
            bound = upper_bound(env, default)
            if value > bound:
                raise ValueError(
                    f"{key} must be <= {bound} (set {env} to allow more), got {value!r}"
                )
        self.eps = float(eps)
        self.steps = int(steps)
        self.alpha = self.default_alpha(float(eps), self.steps) if alpha is None else float(alpha)
        self.b = check_quantization_level(b)
        self.random_start = bool(random_start)
        self.restarts = int(restarts)
        self.loss = loss
        self.loss_fn = get_attack_loss(loss)
        self.clip = (lo, hi)

    # ---------------------------------------------------------------- configuration
    @classmethod
    def default_alpha(cls, eps: float, steps: int) -> float:
        """Step size ``2.5 * eps / steps`` (Madry et al.'s rule: enough travel to cross the ball)."""
        return 2.5 * eps / steps

    @classmethod
    def constructor_defaults(cls) -> dict[str, Any]:
        """The keyword defaults of this class's constructor, following ``**kwargs`` into the bases'
        constructors as jsonargparse does (what ``--inner`` resets on a class switch)."""
        defaults: dict[str, Any] = {}
        for klass in cls.__mro__:  # from the class down to the first constructor without **kwargs
            if "__init__" not in vars(klass):
                continue
            parameters = inspect.signature(klass.__init__).parameters.values()
            for p in parameters:
                if p.default is not inspect.Parameter.empty:
                    defaults.setdefault(p.name, p.default)
            if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
                break
        return defaults

    @classmethod
    def for_budget(
        cls, eps: float, steps: int, alpha: float | None = None, b: int | None = None, **kwargs: Any
    ) -> Attack:
        """This attack with radius ``eps`` and ``steps`` iterations; ``alpha=None`` takes
        :meth:`default_alpha`, ``b=None`` the class's ``default_b``. Single-step attacks keep their
        one step and their own step size."""
        if cls.fixed_loss is not None:
            kwargs.pop("loss", None)
        if not cls.single_step:
            kwargs.update(steps=steps, alpha=cls.default_alpha(eps, steps) if alpha is None else alpha)
        elif alpha is not None:
            kwargs["alpha"] = alpha
        return cls(eps=eps, b=cls.default_b if b is None else b, **kwargs)

    @property
    def threat_model(self) -> LinfThreatModel:
        return LinfThreatModel(self.eps, self.clip)

    @property
    def gradients_per_example(self) -> int:
        """Input gradients this attack spends on one example without early exit (the naive cost)."""
        return self.steps * self.restarts

    @property
    def forwards_per_example(self) -> int:
        """Forward-only passes per example without early exit (the final fooled check of a restart)."""
        return self.restarts

    def config(self) -> dict[str, Any]:
        """The keyword arguments that rebuild this attack (with its registry name)."""
        keys = ("eps", "alpha", "steps", "b", "random_start", "restarts", "loss", "clip")
        cfg = {k: getattr(self, k) for k in keys}
        cfg["clip"] = list(self.clip)
        return {"name": self.name, **cfg, **self._extra_config()}

    def _extra_config(self) -> dict[str, Any]:
        return {}

    @property
    def label(self) -> str:
        """A short row label: the name, with ``b`` when it is not the sign."""
        return f"{self.name} (b={self.b})" if self.b != 1 else self.name

    def with_eps(self, eps: float) -> Attack:
        """A copy with radius ``eps`` and the step size scaled in proportion (for eps warm-up)."""
        scaled = copy.copy(self)
        scaled.alpha = self.alpha * eps / self.eps
        scaled.eps = float(eps)
        return scaled

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}({args})"

    # ---------------------------------------------------------------- the hooks
    def direction(self, grad: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
        """Step direction from the input gradient: the quantized gradient (``b=1``: the sign)."""
        return quantize_gradient(grad, self.b)

    def attack_loss(self, logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        """The per-example loss to maximise (``target`` is the class a targeted attack aims at)."""
        return self.loss_fn(logits, y)

    def starting_point(self, x: torch.Tensor) -> torch.Tensor:
        """Where a restart starts. Drawn for the whole batch, so an example's start does not depend
        on which other examples are still being attacked."""
        return self.threat_model.random_start(x) if self.random_start else x.clone()

    def stages(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor | None]:
        """One entry per run of the loop: ``restarts`` untargeted runs (targeted attacks: a target
        tensor per run)."""
        return [None] * self.restarts

    # ---------------------------------------------------------------- the loop
    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.perturb(model, x, y, need_fooled=self.restarts > 1).x_adv

    def perturb(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        observer: StepObserver | None = None,
        need_fooled: bool = True,
        early_exit: bool = False,
        active: torch.Tensor | None = None,
    ) -> AttackResult:
        """Run the attack with restarts; return the merged adversarial inputs and the fooled mask.

        ``observer`` sees every inner step of the first restart (for logging).
        ``need_fooled=False`` skips the final forward pass when there is a single restart.
        ``early_exit`` (evaluation only) attacks an example only while it is robust: it keeps the
        first iterate that fools it and costs no more gradients. ``active`` (a boolean mask)
        restricts the attack to those examples; batch-coupled attacks keep their whole batch.
        """
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x and y disagree on batch size: {x.shape[0]} vs {y.shape[0]}")
        if active is not None and active.shape != y.shape[:1]:
            raise ValueError(f"active must be a boolean mask of shape {tuple(y.shape[:1])}")
        modes = [m.training for m in model.modules()]
        try:
            with torch.inference_mode(False):
                x = x.detach().clone()
                y = y.detach().clone()
                active = None if active is None else active.detach().clone().to(device=y.device)
                return self._perturb(model, x, y, observer, need_fooled, early_exit, active)
        finally:
            for module, mode in zip(model.modules(), modes, strict=True):
                module.training = mode

    def _perturb(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        observer: StepObserver | None,
        need_fooled: bool,
        early_exit: bool,
        active: torch.Tensor | None,
    ) -> AttackResult:
        stages = self.stages(model, x, y)
        forwards = x.shape[0] if stages and stages[0] is not None else 0  # targets from clean logits
        if len(stages) == 1 and active is None and not early_exit and not need_fooled:
            run = self._run_once(model, x, y, self.starting_point(x), stages[0], observer, False)
            none = torch.zeros(y.shape[0], dtype=torch.bool, device=y.device)
            return AttackResult(run.x_adv, none, run.gradients, forwards)
        best = x.clone()
        fooled = torch.zeros(y.shape[0], dtype=torch.bool, device=y.device)
        todo = torch.ones_like(fooled) if active is None or self.batch_coupled else active
        gradients = 0
        for run_index, target in enumerate(stages):
            start = self.starting_point(x)
            # Independent examples: attack only those still robust; coupled ones rerun the batch.
            index = todo.nonzero().squeeze(1) if self.batch_coupled else (todo & ~fooled).nonzero().squeeze(1)
            if index.numel() == 0:
                break
            run = self._run_once(
                model,
                x[index],
                y[index],
                start[index],
                None if target is None else target[index],
                observer if run_index == 0 else None,
                early_exit,
            )
            gradients += run.gradients
            forwards += run.forwards
            run_fooled = run.fooled
            if run_fooled is None:
                run_fooled = self._is_fooled(model, run.x_adv, y[index])
                forwards += index.numel()
            take = ~fooled[index]  # an example keeps the first restart that fooled it
            best[index[take]] = run.x_adv[take]
            fooled[index] |= run_fooled
        return AttackResult(best, fooled, gradients, forwards)

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
        """``steps`` iterations of ``x <- Pi(x + alpha * direction(grad))`` from ``start``; with
        ``steps_from_unprojected``, ``z <- z + alpha * direction(grad at Pi(z))`` and ``x = Pi(z)``."""
        geometry = self.threat_model
        x_adv = start
        iterate = start  # the point the next step starts from
        lower, upper = geometry.bounds(x)
        tracker = FirstFooled(start, drop=not self.batch_coupled) if early_exit else None
        gradients = 0
        for step in range(self.steps):
            grad, per_example_loss, logits = self.input_gradient(model, x_adv, y, target)
            gradients += x_adv.shape[0]
            if tracker is not None:
                keep = tracker.update(x_adv, logits, y)
                if keep is not None:
                    kept = (t[keep] for t in (x_adv, iterate, grad, x, y, lower, upper))
                    x_adv, iterate, grad, x, y, lower, upper = kept
                    target = None if target is None else target[keep]
                    if x_adv.shape[0] == 0:
                        break
            direction = self.direction(grad, x_adv)
            if observer is not None:
                observer(step, per_example_loss, grad, direction)
            moved = geometry.step(iterate, direction, self.alpha)
            x_adv = geometry.project(moved, x, (lower, upper))
            iterate = moved if self.steps_from_unprojected else x_adv
        x_adv = x_adv.detach()
        if tracker is None:
            return RunOutcome(x_adv, None, gradients, 0)
        x_out, fooled = tracker.finish(x_adv, self._is_fooled(model, x_adv, y))
        return RunOutcome(x_out, fooled, gradients, x_adv.shape[0])

    def input_gradient(
        self, model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None = None
    ) -> Gradient:
        """Gradient of the summed per-example loss w.r.t. the input only, that loss and the logits:
        one gradient pass, the unit that :attr:`gradients_per_example` counts.

        The input is fed in the network's memory format (:func:`as_model_input`) and, on CPU, the
        stem's backward avoids oneDNN (:func:`native_stem_backward`).
        """
        check_stop()  # every gradient-based loop passes here once per iteration
        stem = native_stem_backward(model, x_adv) if self.native_stem_backward else contextlib.nullcontext()
        with torch.enable_grad(), stem:
            x_adv = x_adv.detach().requires_grad_(True)
            logits = model(as_model_input(model, x_adv))
            per_example_loss = self.attack_loss(logits, y, target)
            (grad,) = torch.autograd.grad(per_example_loss.sum(), x_adv)
        return Gradient(grad.detach(), per_example_loss.detach(), logits.detach())

    @staticmethod
    @torch.no_grad()
    def _is_fooled(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x_adv.shape[0] == 0:
            return torch.zeros(y.shape[0], dtype=torch.bool, device=y.device)
        return model(as_model_input(model, x_adv)).argmax(dim=1) != class_labels(y)
