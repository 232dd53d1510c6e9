"""N-FGSM (de Jorge et al., NeurIPS 2022, "Make some noise"): single-step training without clipping.

Start from ``x + eta`` with ``eta ~ U(-k eps, k eps)`` (``k = 2``), take one step of ``alpha = eps``
along the sign (or, with ``b > 1``, the quantized gradient), and project only onto the valid input
range, not back onto the eps-ball: the training perturbation reaches ``(k + 1) eps``, which is what
keeps single-step training from catastrophic overfitting. A training inner maximiser, not an
evaluation attack: its output leaves the threat model by design (``stays_in_ball = False``).
"""

from __future__ import annotations

import torch

from qgtrain.attacks.base import Attack, LinfThreatModel


class NoisyUnclippedThreatModel(LinfThreatModel):
    """N-FGSM's geometry: start uniformly in the ``k eps`` box, project onto the input range only."""

    def __init__(self, eps: float, noise_factor: float, clip: tuple[float, float] = (0.0, 1.0)) -> None:
        super().__init__(eps, clip)
        self.noise_factor = float(noise_factor)

    def random_start(self, x: torch.Tensor) -> torch.Tensor:
        radius = self.noise_factor * self.eps
        return (x + torch.empty_like(x).uniform_(-radius, radius)).clamp_(*self.clip)

    def bounds(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.full_like(x, self.clip[0]), torch.full_like(x, self.clip[1])


class NFGSM(Attack):
    """N-FGSM: noise of ``noise_factor * eps`` (2), one step of ``alpha`` (``eps``), no eps projection."""

    name = "nfgsm"
    single_step = True
    stays_in_ball = False

    def __init__(
        self,
        eps: float = 0.3,
        alpha: float | None = None,
        steps: int = 1,
        b: int = 1,
        random_start: bool = True,
        restarts: int = 1,
        loss: str = "ce",
        clip: tuple[float, float] = (0.0, 1.0),
        noise_factor: float = 2.0,
    ) -> None:
        """Args:
        eps: the threat model's L-inf radius; the noise and the step scale with it.
        alpha: step size (default ``eps``).
        steps: gradient steps (1 in the paper).
        b: quantization level of the direction (1 = the sign).
        random_start: add the uniform noise (N-FGSM needs it).
        restarts: random starts.
        loss: the maximised per-example loss.
        clip: the valid input range (the only projection).
        noise_factor: ``k``: the noise is uniform in ``[-k eps, k eps]`` (2 in the paper).
        """
        if not noise_factor >= 0:
            raise ValueError(f"noise_factor must be >= 0, got {noise_factor!r}")
        alpha = self.default_alpha(eps, steps) if alpha is None else alpha
        super().__init__(eps, alpha, steps, b, random_start, restarts, loss, clip)
        self.noise_factor = float(noise_factor)

    @classmethod
    def default_alpha(cls, eps: float, steps: int = 1) -> float:
        """de Jorge et al.'s ``alpha = eps``."""
        return eps

    @property
    def threat_model(self) -> LinfThreatModel:
        return NoisyUnclippedThreatModel(self.eps, self.noise_factor, self.clip)

    def _extra_config(self) -> dict[str, float]:
        return {"noise_factor": self.noise_factor}
