"""The start of a ``train.py`` run, from its parsed config (LightningCLI's namespace).

Before anything is built or written (:func:`prepare_run`): the settings that cannot go together,
the run's name and the checkpoint it resumes, its checkpoint folder and TensorBoard logger. Once the
trainer is built, the callbacks every run has (:func:`add_run_callbacks`); once model and data are
built, the data, the optimizer and the resumed checkpoint (:func:`check_before_fit`). A refusal is one line
(:class:`StartError`, or :class:`~qgtrain.checkpoints.ResumeError` for the checkpoint).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from pydoc import locate
from typing import Any

import lightning as L
from jsonargparse import Namespace
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.callbacks import WeightAveraging

from qgtrain import checkpoints
from qgtrain.callbacks.robustness import WORST_ACC
from qgtrain.callbacks.run_eta import RunEstimate
from qgtrain.checkpoints import InterruptCheckpoint, LastCheckpoint, StepCheckpoint, check_writable
from qgtrain.models import MODELS
from qgtrain.training.module import VAL_ADV_ACC, free_training_epochs
from qgtrain.training.weight_averaging import DEFAULT_EMA_DECAY, ExponentialMovingAverage

log = logging.getLogger(__name__)


class StartError(ValueError):
    """A run that cannot start as configured: one line, naming the flags."""


@dataclass
class StartPoint:
    """The run's name, and the checkpoint it resumes (its path and content) or None."""

    run_name: str
    resume_path: Path | None = None
    checkpoint: dict[str, Any] | None = None


def default_run_name(config: Namespace) -> str:
    """:func:`~qgtrain.checkpoints.run_name` of the parsed config; the model is its registry name."""
    net_cls = locate(config.model.net.class_path)
    model = next((name for name, cls in MODELS.items() if cls is net_cls), net_cls.__name__.lower())
    data_cls = locate(config.data.class_path)
    dataset = getattr(data_cls, "name", data_cls.__name__.lower())
    inner, method = config.model.inner, config.model
    weights = {"awp_gamma": method.get("awp_gamma") or 0.0, "ema": bool(config.get("ema"))}
    if inner is None:
        return checkpoints.run_name(dataset, model, None, **weights)
    args, inner_cls = inner.init_args, locate(inner.class_path)
    b = args.get("b", 1) if "b" in inner_cls.constructor_defaults() else None  # RGD, FAB-T, Square: none
    return checkpoints.run_name(
        *(dataset, model, inner_cls.name, args.steps, b),
        replays=args.get("replays"),
        atta=bool(method.get("atta")),
        objective=method.get("objective", "madry"),
        **weights,
    )


def check_settings(config: Namespace) -> None:
    """Settings that cannot go together: free training's epochs that ``--replays`` does not divide
    (the module's own check, reused), ``--ema-decay``/``--ema-start-step`` without ``--ema``,
    ``--resume-override`` without ``--resume``, ``--ema`` with weights-only checkpoints, a run name
    that is not one folder name."""
    epochs, inner = config.trainer.max_epochs, config.model.inner
    replays = inner.init_args.get("replays") if inner is not None else None
    try:
        if replays and getattr(locate(inner.class_path), "reuses_training_backward", False) and epochs:
            free_training_epochs(epochs, replays)
        if config.run_name is not None:
            checkpoints.check_run_name(config.run_name)
    except ValueError as exc:
        raise StartError(str(exc)) from None
    if not config.ema and (config.ema_decay != DEFAULT_EMA_DECAY or config.ema_start_step != 0):
        raise StartError("--ema-decay and --ema-start-step shape the average --ema turns on; add --ema")
    if config.resume_override and not config.resume:
        raise StartError("--resume-override changes what --resume continues; add --resume")
    if config.ema and config.checkpoint.get("save_weights_only"):
        # Lightning's dump_checkpoint(weights_only=True) skips the callbacks' on_save_checkpoint,
        # where EMAWeightAveraging writes the average: the files would hold the trained weights
        raise StartError("--checkpoint.save_weights_only drops the average --ema keeps; drop one of the two")


def prepare_run(config: Namespace) -> StartPoint:
    """:func:`check_settings`; the run's name (``run_name``, else the default from the config, with
    ``-vN`` when taken) and the checkpoint ``--resume`` continues, read here so a crafted file is
    refused before anything is built (a requeued SLURM job resumes its last one); best.ckpt monitors
    ``val/adv_acc`` when the robustness evaluation is off; checkpoints go to
    ``checkpoint_root/<run>/`` and TensorBoard to ``log_root/<run>/version_N/`` (a resumed run
    continues its version's curves), both folders probed for writability and left as they were."""
    check_settings(config)
    root, base = Path(config.checkpoint_root), config.run_name or default_run_name(config)
    if not config.resume and checkpoints.slurm_requeued() and checkpoints.latest_checkpoint(root, base):
        config.resume = "last"
    limits = config.trainer.max_epochs, config.trainer.max_steps
    start = StartPoint(*checkpoints.start_point(config.run_name, config.resume, root, base, *limits))
    if config.checkpoint.monitor == WORST_ACC and config.robustness.every_n_epochs == 0:
        config.checkpoint.monitor = VAL_ADV_ACC
    if config.checkpoint.dirpath is None:
        config.checkpoint.dirpath = str(root / start.run_name)
    check_writable(Path(config.checkpoint.dirpath), "checkpoint")
    if config.trainer.logger in (None, True):
        check_writable(Path(config.log_root), "log")
        same_curves = checkpoints.log_continuation(Path(config.log_root) / start.run_name, start.checkpoint)
        config.trainer.logger = Namespace(
            class_path="lightning.pytorch.loggers.TensorBoardLogger",
            init_args=Namespace(
                save_dir=config.log_root, name=start.run_name, default_hp_metric=False, **same_curves
            ),
        )
    return start


def check_processes(trainer: L.Trainer, devices: Any) -> None:
    """Lightning lets a CPU run start more processes than there are cores: refused here."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if isinstance(trainer.accelerator, CPUAccelerator) and trainer.num_devices > cores:
        raise StartError(
            f"--devices {devices}: only {cores} CPU core{'s' if cores != 1 else ''} available here; "
            f"use 'auto' or a count from 1 to {cores}"
        )


def add_run_callbacks(trainer: L.Trainer, config: Namespace) -> tuple[InterruptCheckpoint, checkpoints.WeightsOrigin]:
    """The callbacks of every run, in order: the average of ``--ema`` first (each step's update
    precedes step.ckpt, its swap-back interrupted.ckpt), last.ckpt every epoch, step.ckpt inside
    an epoch, the loader's position on resume, what ``--resume-override`` continued, the interrupt
    checkpoint (Ctrl-C, SIGTERM, SIGUSR1) and the run's time estimate. Returns the last two."""
    dirpath, every = config.checkpoint.dirpath, (config.ckpt_every_steps, config.ckpt_every_minutes)
    try:  # each class checks its own values: the flag is named as typed
        ema = ExponentialMovingAverage(config.ema_decay, config.ema_start_step) if config.ema else None
        step = StepCheckpoint(dirpath, *every) if any(every) else None
    except ValueError as exc:
        raise StartError(f"--{str(exc).replace('_', '-')}") from None
    if ema is not None:
        trainer.callbacks.insert(0, ema)
    for callback in trainer.checkpoint_callbacks:
        if callback.save_last is True and not isinstance(callback, LastCheckpoint):
            callback.save_last = False  # stale after epochs without improvement (Lightning 2.6)
            trainer.callbacks.append(LastCheckpoint(callback.dirpath))
    trainer.callbacks.extend([step] if step is not None else [])
    interrupt, origin = InterruptCheckpoint(dirpath), checkpoints.WeightsOrigin()
    trainer.callbacks.extend([checkpoints.RestoreLoaderState(), origin, interrupt, RunEstimate()])
    return interrupt, origin


def check_before_fit(
    trainer: L.Trainer, model: L.LightningModule, datamodule: L.LightningDataModule, start: StartPoint,
    override: bool, origin: checkpoints.WeightsOrigin,
) -> None:  # fmt: skip
    """What Lightning would check only inside ``fit``, after creating the log folder: the data
    (download, read, split), the optimizer's arguments (the optimizer is built once), and whether the
    resumed checkpoint fits this network and number of processes and what it records (dataset,
    network, objective, inner attack and its arguments, the module's and the data's training
    hyperparameters, the weight average, optimizer and its settings) matches this run: refused in one line, or with
    ``override`` continued, logged and recorded in ``origin``."""
    datamodule.prepare_data()
    datamodule.setup("fit")
    try:
        optimizer = model.optimizer_factory(model.parameters())
    except (ValueError, TypeError) as exc:
        raise StartError(f"model.optimizer (--lr): {' '.join(str(exc).split())}") from None
    checkpoint, path = start.checkpoint, start.resume_path
    if checkpoint is None:
        return
    average = next((callback for callback in trainer.callbacks if isinstance(callback, WeightAveraging)), None)
    checkpoints.check_resume_compatible(checkpoint, path, model, trainer.world_size, average is not None)
    this_run = checkpoints.run_record(model, datamodule, optimizer, average)
    average_key = average.state_key if average is not None else None
    changed = checkpoints.check_run_record(checkpoint, path, this_run, optimizer, override, average_key)
    if changed:
        log.warning(
            "--resume-override: continuing %s with %s", path,
            ", ".join(f"{key} {new} (recorded: {old})" for key, old, new in changed),
        )  # fmt: skip
        origin.continue_changed(path, changed)
    epoch, step = checkpoints.resumes_at(checkpoint)
    log.info("resuming from %s: epoch %d, step %d", path, epoch, step)
    start.checkpoint = None  # Lightning reads the file again; do not hold two copies
