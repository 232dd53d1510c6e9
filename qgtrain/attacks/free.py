"""Free adversarial training's inner maximiser (Shafahi et al., NeurIPS 2019, "Adversarial Training for
Free!", Alg. 1), with quantized gradients.

Each minibatch is replayed ``replays`` (m) times; every replay's one backward pass yields both the
weight gradient and the input gradient ``g``, and the perturbation, carried across replays and on to
the next minibatch, moves by ``delta <- clip_[-eps, eps](delta + alpha * zeta(b * g / M))`` (``b = 1``:
the paper's sign step, ``alpha = eps``). The training input is ``clip_[0, 1](x + delta)``, as in the
reference code. :class:`~qgtrain.training.AdversarialTraining` runs the replays (it reads the
``reuses_training_backward`` trait); called on its own, this attack is that step from ``delta = 0``
(FGSM with ``b``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from qgtrain.attacks.fgsm import FGSM


class Free(FGSM):
    """Free adversarial training: m replays per minibatch, one backward pass each, delta carried over."""

    name = "free"
    reuses_training_backward: ClassVar[bool] = True
    """The input gradient comes from the weight update's own backward pass: the trainer runs the step."""

    def __init__(self, replays: int = 4, **kwargs: Any) -> None:
        """Args:
        replays: Times each minibatch is replayed (``m``); the trainer divides the epochs by it.
        """
        if isinstance(replays, bool) or int(replays) != replays or replays < 1:
            raise ValueError(f"replays must be an integer >= 1, got {replays!r}")
        super().__init__(**kwargs)
        self.replays = int(replays)

    @property
    def gradients_per_example(self) -> int:
        """0: each replay's input gradient is the training pass's own (the study counts that pass)."""
        return 0

    def free_step(self, delta: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """Alg. 1's update ``clip_[-eps, eps](delta + alpha * zeta(b * g / M))`` (detached)."""
        return (delta.detach() + self.alpha * self.direction(grad, delta)).clamp_(-self.eps, self.eps)

    def _extra_config(self) -> dict[str, Any]:
        return {"replays": self.replays}
