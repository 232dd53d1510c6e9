"""A quiet one-device Trainer for scripts, benchmarks and tests that train an :class:`AdversarialTraining`."""

from __future__ import annotations

from typing import Any

import lightning as L


def quiet_trainer(**overrides: Any) -> L.Trainer:
    """A one-device CPU Trainer without logger, checkpoints, progress bar or sanity check, with
    gradients allowed in validation (``inference_mode=False``: the attacks need input gradients
    there); ``overrides`` win (e.g. ``accelerator="auto"``, ``max_epochs=3``)."""
    defaults: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "inference_mode": False,
        "num_sanity_val_steps": 0,
    }
    return L.Trainer(**{**defaults, **overrides})
