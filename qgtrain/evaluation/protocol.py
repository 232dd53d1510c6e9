"""Per-example correctness under an attack: the one accuracy counter of qgtrain.

An example counts as robust when it is classified correctly both clean and on the attack's
output (the AutoAttack convention), so robust accuracy never exceeds clean accuracy. Restarts are
merged per example inside the attack (any restart that fools the model counts); independent runs
and ensembles are merged by AND-ing these boolean vectors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from qgtrain.attacks import Attack

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode, restoring each one's flag afterwards."""
    modes = [m.training for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, mode in zip(model.modules(), modes, strict=True):
            module.training = mode


def iterate_batches(
    batches: Batches, device: torch.device | str | None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, y)`` moved to ``device`` (unchanged when ``device`` is None)."""
    for x, y in batches:
        if device is not None:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        yield x, y


@torch.no_grad()
def clean_correct(
    model: nn.Module, batches: Batches, device: torch.device | str | None = None
) -> torch.Tensor:
    """Boolean vector: is each example classified correctly (model in eval mode)?"""
    out = []
    with eval_mode(model):
        for x, y in iterate_batches(batches, device):
            out.append((model(x).argmax(dim=1) == y).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool)


def adversarial_correct(
    model: nn.Module,
    attack: Attack,
    batches: Batches,
    device: torch.device | str | None = None,
    seed: int = 0,
    on_batch: Callable[[int], None] | None = None,
    first_batch_index: int = 0,
) -> torch.Tensor:
    """Boolean vector: is each example correct clean *and* on ``attack``'s output?

    Batch ``i`` runs under its own RNG stream ``(seed, i)`` (forked, so the caller's RNG state is
    untouched): results do not depend on what ran before, and the same seed gives the same numbers.
    ``first_batch_index`` numbers the batches from there, so a shard holding batches ``k, k+1, ...``
    of a longer sequence (one rank under DDP) draws exactly what the whole sequence draws for them.
    """
    out = []
    with eval_mode(model):
        for index, (x, y) in enumerate(iterate_batches(batches, device), start=first_batch_index):
            devices = [x.device.index or 0] if x.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed * 1_000_003 + index)
                result = attack.perturb(model, x, y)
            with torch.no_grad():
                correct = (model(x).argmax(dim=1) == y) & (model(result.x_adv).argmax(dim=1) == y)
            out.append(correct.cpu())
            if on_batch is not None:
                on_batch(index)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool)


def worst_case_correct(correct: Iterable[torch.Tensor]) -> torch.Tensor:
    """Per-example worst case over several attacks or runs: the AND of their boolean vectors."""
    vectors = list(correct)
    if not vectors:
        raise ValueError("worst_case_correct needs at least one correctness vector")
    worst = vectors[0].clone()
    for vector in vectors[1:]:
        if vector.shape != worst.shape:
            raise ValueError(
                f"correctness vectors disagree in shape: {tuple(vector.shape)} vs {tuple(worst.shape)}"
            )
        worst &= vector
    return worst
