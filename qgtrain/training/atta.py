"""ATTA's per-example perturbation buffer (Zheng et al., CVPR 2020, "Efficient Adversarial Training with
Transferable Adversarial Examples", Alg. 1): the perturbation an example ended its last visit with is
kept, indexed by the example's position in the training split, and the next epoch's inner attack (one
or two PGD/PQGD steps) starts there instead of at a random point, so the steps accumulate across epochs.

An example's first visit starts where the attack itself would (its random start). Under DDP every
process writes the whole step's perturbations (gathered from all processes), so each holds the same
complete buffer and the checkpoint, written by rank 0, is complete; it resumes bit-exactly.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch


def request_example_indices(datamodule: Any) -> None:
    """Ask a qgtrain data module to yield ``(x, y, index)`` training batches; refuse augmentation.

    ATTA stores one perturbation per stored image; with random crops and flips (CIFAR-10) the stored
    perturbation would not line up with the next epoch's view of the image, and transforming it with
    the crop is not implemented here.
    """
    if datamodule is None or not hasattr(datamodule, "yield_indices"):
        return  # another loader: the first batch without indices gets a one-line error
    if getattr(datamodule, "augment_train", False):
        raise ValueError(
            f"atta keeps one perturbation per stored image, but {getattr(datamodule, 'name', 'this dataset')} "
            "trains on random crops and flips, which would misalign it (not implemented); use mnist or fashion_mnist"
        )
    datamodule.yield_indices = True


class PerturbationBuffer:
    """``delta[i]``: example ``i``'s last perturbation ``x_adv - x``; ``seen[i]``: whether it has one."""

    def __init__(self) -> None:
        self.delta: torch.Tensor | None = None
        self.seen: torch.Tensor | None = None

    def start(self, index: torch.Tensor, x: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
        """Where the inner attack starts: ``x + delta[index]`` for examples seen before, else ``fallback``."""
        if self.delta is None:
            raise RuntimeError("PerturbationBuffer.allocate must run before the first start")
        stored = self.delta[index.to(self.delta.device)].to(x.device, x.dtype)
        seen = self.seen[index.to(self.seen.device)].to(x.device).view(-1, *([1] * (x.dim() - 1)))
        return torch.where(seen, x + stored, fallback)

    def allocate(self, examples: int, like: torch.Tensor) -> None:
        """Zeros for ``examples`` examples shaped like one row of ``like`` (kept when already allocated)."""
        if (
            self.delta is not None
            and self.delta.shape[0] >= examples
            and self.delta.shape[1:] == like.shape[1:]
        ):
            self.delta, self.seen = self.delta.to(like.device), self.seen.to(like.device)
            return
        self.delta = torch.zeros((examples, *like.shape[1:]), dtype=like.dtype, device=like.device)
        self.seen = torch.zeros(examples, dtype=torch.bool, device=like.device)

    def store(self, index: torch.Tensor, delta: torch.Tensor, module: L.LightningModule) -> None:
        """Write back this step's perturbations (every process's, under DDP)."""
        if module._trainer is not None and module.trainer.world_size > 1:
            index = module.all_gather(index).flatten(0, 1)
            delta = module.all_gather(delta).flatten(0, 1)
        index = index.to(self.delta.device)
        self.delta[index] = delta.detach().to(self.delta.dtype)
        self.seen[index] = True

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.delta is None:
            return {}
        return {"delta": self.delta.detach().cpu().clone(), "seen": self.seen.cpu().clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            self.delta, self.seen = state["delta"].clone(), state["seen"].clone()
