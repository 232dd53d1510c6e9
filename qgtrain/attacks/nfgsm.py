"""N-FGSM (de Jorge et al., NeurIPS 2022, "Make some noise"): single-step training without clipping.

Start from ``x + eta`` with ``eta ~ U(-k eps, k eps)`` (``k = 2``), take one step of ``alpha = eps``
along the sign (or, with ``b > 1``, the quantized gradient), and project only onto the valid input
range, not back onto the eps-ball: the training perturbation reaches ``(k + 1) eps``, which is what
keeps single-step training from catastrophic overfitting. A training inner maximiser, not an
evaluation attack: its output leaves the threat model by design (``stays_in_ball = False``).
"""

from __future__ import annotations

from typing import Any

import torch

from qgtrain.attacks.base import LinfThreatModel
from qgtrain.attacks.fgsm import FGSM


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


class NFGSM(FGSM):
    """N-FGSM: noise of ``noise_factor * eps`` (2), one step of ``alpha`` (``eps``), no eps projection."""

    name = "nfgsm"
    stays_in_ball = False

    def __init__(self, random_start: bool = True, noise_factor: float = 2.0, **kwargs: Any) -> None:
        """Args:
        random_start: Add the uniform noise (N-FGSM needs it).
        noise_factor: ``k``: the noise is uniform in ``[-k eps, k eps]`` (2 in the paper).
        """
        if not noise_factor >= 0:
            raise ValueError(f"noise_factor must be >= 0, got {noise_factor!r}")
        super().__init__(random_start=random_start, **kwargs)
        self.noise_factor = float(noise_factor)

    @property
    def threat_model(self) -> LinfThreatModel:
        return NoisyUnclippedThreatModel(self.eps, self.noise_factor, self.clip)

    def _extra_config(self) -> dict[str, float]:
        return {"noise_factor": self.noise_factor}
