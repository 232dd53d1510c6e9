"""A quiet one-device Trainer for scripts, benchmarks and tests, and the summary of a finished run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import WeightAveraging

from qgtrain.evaluation.planning import describe_suggestions, suggested_evaluations
from qgtrain.models import model_spec

EPOCH_NUMBERING = "counted from 0, as the progress bar counts"
"""How every epoch qgtrain reports is numbered: Lightning's ``current_epoch``, the progress bar's ``Epoch N``."""


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


def run_summary(trainer: L.Trainer, run_name: str, folder: Path, monitor: str | None = None) -> str:
    """Best robust accuracy (metric, epoch; ``monitor``: what the metric measures), both checkpoints,
    which weights they hold when averaged, and the evaluations to run next, sized to this machine
    (a CPU: a quick one first). The epoch is ``checkpoint["epoch"]``, numbered from 0 as the progress
    bar and the robustness lines number it (and said so: ``at epoch 1`` of a 3-epoch run is its
    second, ``Epoch 1`` on the bar)."""
    checkpoint = trainer.checkpoint_callback
    last = folder / "last.ckpt"
    best_path = getattr(checkpoint, "best_model_path", "")
    if best_path and Path(best_path).is_file():
        best = folder / Path(best_path).name  # as configured: a relative folder stays relative
        epoch = torch.load(best, map_location="cpu", weights_only=True, mmap=True)["epoch"]
        score = float(checkpoint.best_model_score)
        lines = [
            f"run {run_name} finished: best {checkpoint.monitor} = {score:.4f} at epoch {epoch} "
            f"({EPOCH_NUMBERING})"
        ]
        if monitor is not None:  # the monitor's attacks are cheaper than the evaluation's
            lines.append(f"  that is {monitor}: an upper bound; the evaluation below gives the figure to report")
        lines.append(f"  best: {best}")
    else:
        best = last
        monitor = getattr(checkpoint, "monitor", None)
        lines = [f"run {run_name} finished: no best.ckpt ({monitor} was never logged)"]
    lines.append(f"  last: {last}")
    if any(isinstance(callback, WeightAveraging) for callback in trainer.callbacks):
        lines.append("  weights: averaged (--ema); evaluate.py --weights raw evaluates the trained ones")
    logger = trainer.logger
    if logger is not None and getattr(logger, "log_dir", None):
        lines.append(f"  TensorBoard: tensorboard --logdir {Path(logger.log_dir).parent}")
    net = trainer.lightning_module.net
    dataset = model_spec(net)["kwargs"].get("dataset", "mnist")
    device = trainer.lightning_module.device
    lines.append(describe_suggestions(suggested_evaluations(best, net, dataset, device), device))
    return "\n".join(lines)
