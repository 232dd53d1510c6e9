"""Attacks started from a given point instead of their own start (ATTA's stored perturbation, TRADES's
``x + 0.001 N(0, 1)``): every restart of the copy starts there, projected onto the threat model."""

from __future__ import annotations

import copy

import torch

from qgtrain.attacks.base import Attack


def started_at(attack: Attack, start: torch.Tensor) -> Attack:
    """A copy of ``attack`` whose :meth:`~qgtrain.attacks.Attack.starting_point` is ``start`` (one per
    example, the shape of the attacked batch) projected onto the eps-ball and the valid range."""
    warm = copy.copy(attack)

    def starting_point(x: torch.Tensor) -> torch.Tensor:
        if start.shape != x.shape:
            raise ValueError(f"start has shape {tuple(start.shape)}, the batch {tuple(x.shape)}")
        return attack.threat_model.project(start.detach().to(x.dtype), x)

    warm.starting_point = starting_point  # type: ignore[method-assign]
    return warm
