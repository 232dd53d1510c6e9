"""The one iteration loop shared by every attack, and the L-infinity threat model it steps in.

Geometry (random start, step, projection) lives in :class:`LinfThreatModel`, in the manner of
MadryLab's ``robustness`` step classes; :class:`Attack` owns the loop, restarts with the
per-example merge, and model/gradient hygiene. Subclasses only say how the step direction is
formed from the input gradient (:meth:`Attack.direction`).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from qgtrain.attacks.losses import get_attack_loss
from qgtrain.attacks.quantize import check_quantization_level, quantize_gradient

StepObserver = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]
"""Called as ``observer(step, per_example_loss, grad, direction)`` at every inner step."""


def model_memory_format(model: nn.Module) -> torch.memory_format:
    """``torch.channels_last`` when the model's 4-D parameters are stored so, else contiguous.

    Decided by the first convolution weight whose two layouts differ (a weight with one input
    channel, such as an MNIST stem's, is both); ``net.to(memory_format=torch.channels_last)`` sets it.
    """
    for p in model.parameters():
        if p.dim() == 4:
            channels_last = p.is_contiguous(memory_format=torch.channels_last)
            if channels_last != p.is_contiguous():
                return torch.channels_last if channels_last else torch.contiguous_format
    return torch.contiguous_format


def as_model_input(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` in the memory format of ``model``'s convolutions (a no-op when it already is, e.g. one
    channel); inside the graph, so a gradient w.r.t. ``x`` keeps ``x``'s own layout."""
    if x.dim() != 4:
        return x
    return x.contiguous(memory_format=model_memory_format(model))


STEM_MAX_IN_CHANNELS = 4
"""A contiguous network's convolutions with at most this many input channels (its stem) get ATen's
CPU backward; in a channels_last network only one-channel convolutions of 5x5 or larger do."""


@contextlib.contextmanager
def native_stem_backward(model: nn.Module, x: torch.Tensor) -> Iterator[None]:
    """On CPU, run the backward of a network's stem convolution without oneDNN where that is faster.

    Measured on the 2-core EPYC, oneDNN 3.12, one thread (docs/RESULTS.md, section 6): oneDNN's
    data-gradient kernel is slow for few input channels (MadryMNIST's 1->32 5x5 stem, batch 256:
    55-77 ms vs ATen's 18-25 ms; 3->64 3x3, batch 64, contiguous: 18 vs 11 ms), while every other
    convolution is faster with it. In a channels_last network it paid for the 5x5 one-channel stem
    (a MadryMNIST input gradient: 0.87 -> 0.73 of the contiguous time), not for a 3x3 one (TinyCNN)
    or a 3-channel one (15 vs 17 ms), which stay on oneDNN. oneDNN is switched off just before the
    stem's backward node runs and back on just after it (graph-node hooks, so an in-place ReLU after
    the convolution does not matter); only the kernel changes, not the arithmetic. Not used off
    CPU, with oneDNN disabled, for a stem computed in bf16/fp16 (under autocast ATen's kernel made
    a PGD step 1.8x slower), or on a compiled network (hooks would force recompiles).
    """
    if (
        x.device.type != "cpu"
        or not torch.backends.mkldnn.enabled
        or getattr(model, "_compiled_call_impl", None) is not None
    ):
        yield
        return

    def disable(*_: Any) -> None:
        torch.backends.mkldnn.enabled = False

    def enable(*_: Any) -> None:
        torch.backends.mkldnn.enabled = True

    def attach(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        node = output.grad_fn
        if node is not None and output.dtype == torch.float32:  # ATen's bf16 kernel is the slow one
            node.register_prehook(disable)
            node.register_hook(enable)

    contiguous = model_memory_format(model) == torch.contiguous_format
    stems = [
        m
        for m in model.modules()
        if isinstance(m, nn.Conv2d)
        and (
            m.in_channels <= STEM_MAX_IN_CHANNELS
            if contiguous
            else m.in_channels == 1 and m.kernel_size[0] * m.kernel_size[1] >= 25
        )
    ]
    handles = [m.register_forward_hook(attach) for m in stems]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        torch.backends.mkldnn.enabled = True


class LinfThreatModel:
    """The set ``{x' : |x' - x|_inf <= eps, lo <= x' <= hi}``: init, step and projection."""

    def __init__(self, eps: float, clip: tuple[float, float] = (0.0, 1.0)) -> None:
        self.eps = float(eps)
        self.clip = (float(clip[0]), float(clip[1]))

    def random_start(self, x: torch.Tensor) -> torch.Tensor:
        """Uniform sample from the eps-ball around ``x``, clipped to the valid range."""
        noise = torch.empty_like(x).uniform_(-self.eps, self.eps)
        return (x + noise).clamp_(*self.clip)

    def step(self, x_adv: torch.Tensor, direction: torch.Tensor, alpha: float) -> torch.Tensor:
        """Move ``alpha`` along ``direction`` (already a sign or quantized gradient)."""
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
    """Adversarial inputs, and which examples the model misclassifies on them."""

    x_adv: torch.Tensor
    fooled: torch.Tensor


class Attack:
    """Iterative first-order L-infinity attack: ``x <- Pi(x + alpha * direction(grad))``.

    Configured by keyword arguments and called as ``attack(model, x, y) -> x_adv``. The loss is
    computed per example and summed; gradients are taken w.r.t. the input only (no parameter
    ``.grad`` is written); the model's train/eval flags are left exactly as found (callers choose
    the mode: evaluation uses eval mode). ``restarts=R`` runs R random starts and keeps, per
    example, the first input that fools the model, else the last one (Sec. 4.1, "Practical Issues").
    Works inside ``torch.inference_mode`` (gradients are re-enabled locally) and under autocast.
    """

    name: ClassVar[str] = "attack"
    batch_coupled: ClassVar[bool] = False
    """True when an example's step depends on the rest of its batch (BLOB's particles)."""
    native_stem_backward: bool = True
    """Kernel choice only (see :func:`native_stem_backward`); False: the legacy path, for benchmarks."""

    def __init__(
        self,
        eps: float = 0.3,
        alpha: float = 0.01,
        steps: int = 40,
        b: int = 1,
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
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha!r}")
        if isinstance(steps, bool) or int(steps) != steps or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        if isinstance(restarts, bool) or int(restarts) != restarts or restarts < 1:
            raise ValueError(f"restarts must be an integer >= 1, got {restarts!r}")
        self.eps = float(eps)
        self.alpha = float(alpha)
        self.steps = int(steps)
        self.b = check_quantization_level(b)
        self.random_start = bool(random_start)
        self.restarts = int(restarts)
        self.loss = loss
        self.loss_fn = get_attack_loss(loss)
        self.clip = (lo, hi)

    # ---------------------------------------------------------------- configuration
    @property
    def threat_model(self) -> LinfThreatModel:
        return LinfThreatModel(self.eps, self.clip)

    def config(self) -> dict[str, Any]:
        """The keyword arguments that rebuild this attack (with its registry name)."""
        keys = ("eps", "alpha", "steps", "b", "random_start", "restarts", "loss", "clip")
        cfg = {k: getattr(self, k) for k in keys}
        cfg["clip"] = list(self.clip)
        return {"name": self.name, **cfg, **self._extra_config()}

    def _extra_config(self) -> dict[str, Any]:
        return {}

    def with_eps(self, eps: float) -> Attack:
        """A copy with radius ``eps`` and the step size scaled in proportion (for eps warm-up)."""
        scaled = copy.copy(self)
        scaled.alpha = self.alpha * eps / self.eps
        scaled.eps = float(eps)
        return scaled

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}({args})"

    # ---------------------------------------------------------------- the step direction hook
    def direction(self, grad: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
        """Step direction from the input gradient: the quantized gradient (``b=1``: the sign)."""
        return quantize_gradient(grad, self.b)

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
    ) -> AttackResult:
        """Run the attack with restarts; return the merged adversarial inputs and the fooled mask.

        ``observer`` sees every inner step of the first restart (for logging).
        ``need_fooled=False`` skips the final forward pass when there is a single restart.
        """
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x and y disagree on batch size: {x.shape[0]} vs {y.shape[0]}")
        modes = [m.training for m in model.modules()]
        try:
            with torch.inference_mode(False):
                x = x.detach().clone()
                y = y.detach().clone()
                return self._perturb(model, x, y, observer, need_fooled)
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
    ) -> AttackResult:
        best = self._run_once(model, x, y, observer)
        if self.restarts == 1 and not need_fooled:
            return AttackResult(best, torch.zeros_like(y, dtype=torch.bool))
        fooled = self._is_fooled(model, best, y)
        for _ in range(self.restarts - 1):
            if bool(fooled.all()):
                break
            if self.batch_coupled:
                candidate = self._run_once(model, x, y, None)
                new_fooled = self._is_fooled(model, candidate, y)
                take = ~fooled
                best[take] = candidate[take]
                fooled = fooled | new_fooled
            else:  # independent examples: attack only those not yet fooled
                idx = (~fooled).nonzero().squeeze(1)
                candidate = self._run_once(model, x[idx], y[idx], None)
                best[idx] = candidate
                fooled[idx] = self._is_fooled(model, candidate, y[idx])
        return AttackResult(best, fooled)

    def _run_once(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, observer: StepObserver | None
    ) -> torch.Tensor:
        geometry = self.threat_model
        x_adv = geometry.random_start(x) if self.random_start else x.clone()
        bounds = geometry.bounds(x)
        for step in range(self.steps):
            grad, per_example_loss = self._input_gradient(model, x_adv, y)
            direction = self.direction(grad, x_adv)
            if observer is not None:
                observer(step, per_example_loss, grad, direction)
            x_adv = geometry.project(geometry.step(x_adv, direction, self.alpha), x, bounds)
        return x_adv.detach()

    def _input_gradient(
        self, model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradient of the summed per-example loss w.r.t. the input only, and that loss.

        The input is fed in the network's memory format (:func:`as_model_input`) and, on CPU, the
        stem's backward avoids oneDNN (:func:`native_stem_backward`): issue 15's speed-ups.
        """
        stem = native_stem_backward(model, x_adv) if self.native_stem_backward else contextlib.nullcontext()
        with torch.enable_grad(), stem:
            x_adv = x_adv.detach().requires_grad_(True)
            per_example_loss = self.loss_fn(model(as_model_input(model, x_adv)), y)
            (grad,) = torch.autograd.grad(per_example_loss.sum(), x_adv)
        return grad.detach(), per_example_loss.detach()

    @staticmethod
    @torch.no_grad()
    def _is_fooled(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return model(as_model_input(model, x_adv)).argmax(dim=1) != y
