"""The validation examples a callback evaluates: a fixed seeded subset, sharded across ranks.

Shared by :mod:`qgtrain.callbacks.robustness` and :mod:`qgtrain.callbacks.visualization`.
"""

from __future__ import annotations

import math

import lightning as L
import torch
from torch.utils.data import Dataset


def subset_indices(dataset_size: int, subset_size: int, seed: int) -> torch.Tensor:
    """A fixed seeded choice of ``min(subset_size, dataset_size)`` example indices."""
    order = torch.randperm(dataset_size, generator=torch.Generator().manual_seed(seed))
    return order[: min(subset_size, dataset_size)]


def shard_batches(num_examples: int, batch_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous block of whole batches: ``(first_batch, end_batch)``.

    Sharding whole batches (not examples) keeps every batch, and the RNG stream of its batch
    number, identical for any number of processes; so even batch-coupled attacks (BLOB's
    particles) and random starts give the same per-example results on 1 and N processes.
    """
    num_batches = math.ceil(num_examples / batch_size)
    per_rank, extra = divmod(num_batches, world_size)
    first = rank * per_rank + min(rank, extra)
    return first, first + per_rank + (1 if rank < extra else 0)


def validation_dataset(trainer: L.Trainer) -> Dataset:
    """The datamodule's ``val_set``, else the dataset of the (first) validation dataloader."""
    datamodule = getattr(trainer, "datamodule", None)
    dataset = getattr(datamodule, "val_set", None)
    if dataset is None:
        loaders = trainer.val_dataloaders
        if isinstance(loaders, list | tuple):
            loaders = loaders[0] if loaders else None
        dataset = getattr(loaders, "dataset", None)
    if dataset is None:
        raise ValueError(
            "RobustnessEvaluation needs validation data (a datamodule with val_set or a val dataloader); "
            "set robustness.every_n_epochs: 0 to turn it off"
        )
    return dataset


def limited_validation_size(trainer: L.Trainer, dataset_size: int) -> int:
    """How many validation examples the run's ``limit_val_batches`` lets validation see.

    A quick run (``limit_val_batches=2``, ``fast_dev_run``) also gets a quick robustness evaluation;
    ``limit_val_batches`` of 0 or 1.0 leaves the validation split whole.
    """
    limit = trainer.limit_val_batches
    if isinstance(limit, float) and 0.0 < limit < 1.0:
        return max(1, int(limit * dataset_size))
    if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
        batch_size = getattr(getattr(trainer, "datamodule", None), "eval_batch_size", None)
        loaders = trainer.val_dataloaders
        if batch_size is None and loaders is not None:
            loader = loaders[0] if isinstance(loaders, list | tuple) else loaders
            batch_size = getattr(loader, "batch_size", None)
        if batch_size:
            return min(dataset_size, limit * int(batch_size))
    return dataset_size
