"""ATTA's per-example perturbation buffer (Zheng et al., CVPR 2020, "Efficient Adversarial Training with
Transferable Adversarial Examples", Alg. 1): the perturbation an example ended its last visit with is
kept, indexed by the example's position in the training split, and the next epoch's inner attack (one
or two PGD/PQGD steps) starts there instead of at a random point, so the steps accumulate across epochs.

With random crops and flips (CIFAR-10) the perturbation is kept on the padded image the crops are cut
from and follows each epoch's crop and flip (:class:`PerturbationBuffer`).

An example's first visit (of a reset period) starts where the attack itself would: its random start,
or x + 0.001 N(0, 1) under TRADES (Zheng et al.'s code starts there for both objectives). Under DDP every
process writes the whole step's perturbations (gathered from all processes), so each holds the same
complete buffer and the checkpoint, written by rank 0, is complete; it resumes bit-exactly.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from qgtrain.compat import attached_trainer


def request_example_indices(datamodule: Any) -> None:
    """Ask a qgtrain data module to yield ``(x, y, index)`` training batches, with each image's view
    ``(x, y, index, view)`` when it trains on random crops and flips (CIFAR-10)."""
    if datamodule is None or not hasattr(datamodule, "yield_indices"):
        return  # another loader: the first batch without indices gets a one-line error
    datamodule.yield_indices = True


class PerturbationBuffer:
    """``delta[i]``: example ``i``'s last perturbation ``x_adv - x``; ``visited[i]``: the epoch of that
    visit (-1: none yet). A perturbation is kept until the period of ``reset_epochs`` it was made in
    ends (Zheng et al.'s ``--epochs-reset``); the next visit starts afresh.

    The perturbation lives on the example's canvas: the stored image zero-padded by ``padding`` pixels
    on each side (0 without augmentation, when the canvas is the image). A batch's ``view`` rows
    ``(top, left, flipped)`` (:meth:`qgtrain.data.datamodules.ImageTensorDataset.item`) say which
    window of the canvas each augmented image shows and whether it is mirrored; the attack starts from
    that window, mirrored alike, and its result is written back there, unmirrored, as Zheng et al.'s
    reference code does (``atta_aug`` / ``inverse_atta_aug``). Canvas pixels outside a visit's window
    keep what an earlier visit of the period left (zero before any).
    """

    def __init__(self, reset_epochs: int = 0) -> None:
        self.delta: torch.Tensor | None = None
        self.visited: torch.Tensor | None = None
        self.padding = 0
        self.reset_epochs = reset_epochs

    def period_start(self, epoch: int) -> int:
        """The first epoch of ``epoch``'s period: 0 when nothing is reset, else epoch - epoch % reset_epochs."""
        return epoch - epoch % self.reset_epochs if self.reset_epochs else 0

    def start(
        self,
        index: torch.Tensor,
        x: torch.Tensor,
        fallback: torch.Tensor,
        epoch: int,
        view: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Where the inner attack starts: ``x`` + the stored perturbation under its view, for examples
        visited in this period, else ``fallback``."""
        if self.delta is None:
            raise RuntimeError("PerturbationBuffer.allocate must run before the first start")
        stored = self.delta[self._pixels(index, view, x)].to(x.device, x.dtype)
        kept = self.visited[index.to(self.visited.device)] >= self.period_start(epoch)
        return torch.where(kept.to(x.device).view(-1, *([1] * (x.dim() - 1))), x + stored, fallback)

    def allocate(self, examples: int, like: torch.Tensor, padding: int = 0) -> None:
        """Zeros for ``examples`` canvases: one row of ``like``, its last two dimensions grown by
        ``2 * padding`` (kept when already allocated, or restored, at that shape)."""
        canvas = (*like.shape[1:-2], like.shape[-2] + 2 * padding, like.shape[-1] + 2 * padding)
        self.padding = padding
        if self.delta is not None and self.delta.shape[0] >= examples and self.delta.shape[1:] == canvas:
            self.delta, self.visited = self.delta.to(like.device), self.visited.to(like.device)
            return
        self.delta = torch.zeros((examples, *canvas), dtype=like.dtype, device=like.device)
        self.visited = torch.full((examples,), -1, dtype=torch.long, device=like.device)

    def store(
        self,
        index: torch.Tensor,
        delta: torch.Tensor,
        module: L.LightningModule,
        epoch: int,
        view: torch.Tensor | None = None,
    ) -> None:
        """Write back this step's perturbations (every process's, under DDP) where their views show; a
        first visit of the period clears the example's canvas first."""
        if attached_trainer(module) is not None and module.trainer.world_size > 1:
            index = module.all_gather(index).flatten(0, 1)
            delta = module.all_gather(delta).flatten(0, 1)
            view = None if view is None else module.all_gather(view).flatten(0, 1)
        index = index.to(self.delta.device)
        first = index[self.visited[index] < self.period_start(epoch)]
        self.delta[first] = 0
        self.delta[self._pixels(index, view, delta)] = delta.detach().to(self.delta.dtype)
        self.visited[index] = epoch

    def _pixels(
        self, index: torch.Tensor, view: torch.Tensor | None, like: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """Indices into ``delta`` of the canvas pixels the rows of ``like`` (``(B, C, H, W)``) show: row
        ``r``, column ``c`` of a view is canvas pixel ``(top + r, left + c)``, or ``left + W - 1 - c``
        when flipped."""
        device = self.delta.device
        index = index.to(device)
        if view is None:
            if self.padding:
                raise ValueError(
                    "atta on augmented images needs each image's view: batches (x, y, index, view)"
                )
            return (index,)
        b, channels, h, w = like.shape
        top, left, flipped = view.to(device).unbind(1)
        columns = torch.arange(w, device=device).expand(b, w)
        columns = left[:, None] + torch.where(flipped[:, None].bool(), w - 1 - columns, columns)
        rows = top[:, None] + torch.arange(h, device=device)
        channel = torch.arange(channels, device=device)
        return (
            index.view(b, 1, 1, 1),
            channel.view(1, -1, 1, 1),
            rows.view(b, 1, h, 1),
            columns.view(b, 1, 1, w),
        )

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.delta is None:
            return {}
        return {"delta": self.delta.detach().cpu().clone(), "visited": self.visited.cpu().clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore a saved buffer; one saved before ``visited`` (2026-12-03) has ``seen``: epoch 0."""
        if state:
            visited = state["visited"] if "visited" in state else torch.where(state["seen"], 0, -1)
            self.delta, self.visited = state["delta"].clone(), visited.clone()
