"""``train.py``: LightningCLI over :class:`AdversarialTraining` with YAML configs and short flags."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from jsonargparse import Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from qgtrain.cli.aliases import UsageError, configs_dir, expand_short_flags, main_usage_error, short_flag_help
from qgtrain.data import DataError, VisionDataModule
from qgtrain.training import AdversarialTraining, NonFiniteLossError
from qgtrain.training.checkpoint_io import (
    AtomicCheckpointIO,
    CheckpointError,
    LastCheckpoint,
    read_checkpoint,
)
from qgtrain.training.interrupt import InterruptCheckpoint

log = logging.getLogger(__name__)
PROG = "train.py"


def _import(class_path: str) -> Any:
    module, _, name = class_path.rpartition(".")
    return getattr(__import__(module, fromlist=[name]), name)


def default_run_name(config: Namespace) -> str:
    """``<dataset>-<inner>-k<steps>-b<b>`` (``-standard`` without an inner attack)."""
    data_cls = _import(config.data.class_path)
    dataset = getattr(data_cls, "name", data_cls.__name__.lower())
    inner = config.model.inner
    if inner is None:
        return f"{dataset}-standard"
    attack_cls = _import(inner.class_path)
    args = inner.init_args
    return f"{dataset}-{attack_cls.name}-k{args.steps}-b{args.b}"


def _unique_run_name(checkpoint_root: Path, log_root: Path, base: str) -> str:
    """``base``, or ``base-v1``, ``base-v2``... so a new run never overwrites an old one's checkpoints."""
    name, version = base, 0
    while (checkpoint_root / name).exists() and any((checkpoint_root / name).iterdir()):
        version += 1
        name = f"{base}-v{version}"
    return name


def resolve_resume(resume: str, checkpoint_root: Path, run_name: str) -> Path:
    """A ``.ckpt`` file, a run folder (its ``last.ckpt``) or ``last`` (this run name's ``last.ckpt``)."""
    path = checkpoint_root / run_name / "last.ckpt" if resume == "last" else Path(resume)
    if path.is_dir():
        path = path / "last.ckpt"
    if not path.is_file():
        raise UsageError(f"--resume: no checkpoint at {path}; pass a .ckpt file, a run folder, or 'last'")
    return path


def check_devices(accelerator: Any, devices: Any) -> None:
    """``--devices`` must be ``auto``, ``-1``, a count >= 1 or GPU indices that this machine has."""
    if not isinstance(accelerator, str | None):
        return  # an Accelerator instance: the caller knows what it does
    accelerator = (accelerator or "auto").lower()
    gpus = torch.cuda.device_count()
    if accelerator in ("gpu", "cuda") and gpus == 0:
        raise UsageError(f"--trainer.accelerator {accelerator}: no CUDA GPU is visible here; use cpu or auto")
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and gpus > 0):
        kind, available = "GPU", gpus
    elif accelerator in ("cpu", "auto"):
        cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
        kind, available = "CPU core", len(cores)
    else:
        return  # mps, tpu...: Lightning checks
    if devices is None or devices == "auto" or devices == -1 or devices == "-1":
        return
    allowed = f"'auto', -1, or an integer from 1 to {available}"
    if isinstance(devices, str) and "," in devices or isinstance(devices, list | tuple):
        items = devices.strip(",").split(",") if isinstance(devices, str) else devices
        if kind != "GPU" or not all(str(i).strip().isdigit() and int(i) < available for i in items):
            raise UsageError(f"--devices must be {allowed} (or GPU indices below {available}), got {devices}")
        return
    try:
        count = float(devices)
    except (TypeError, ValueError):
        count = float("nan")
    if not count.is_integer() or count < 1:
        raise UsageError(f"--devices must be {allowed}, got {devices}")
    if count > available:
        raise UsageError(
            f"--devices {int(count)}: only {available} {kind}{'s' if available != 1 else ''} "
            f"available here; use {allowed}"
        )


def check_writable(folder: Path, what: str) -> None:
    """Fail at start, not after an epoch, when an output folder cannot be written.

    Folders created for the probe are removed again, so a run that fails later at start-up (a bad
    config value) leaves nothing behind; Lightning creates them when it first writes.
    """
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        try:
            with open(probe, "wb") as handle:
                handle.write(b"\0" * 65536)
                handle.flush()
                os.fsync(handle.fileno())
        finally:
            probe.unlink(missing_ok=True)
    except OSError as exc:
        raise UsageError(
            f"cannot write the {what} folder {folder}: {exc.strerror or exc}; choose another"
        ) from None
    finally:
        for path in created:  # deepest first
            try:
                path.rmdir()
            except OSError:
                pass  # not empty (another run wrote there meanwhile) or never made


class QGTrainCLI(LightningCLI):
    """LightningCLI with run naming, checkpoint folders, TensorBoard logging and atomic checkpoints."""

    resume_path: Path | None = None
    run_name: str = ""
    interrupt: InterruptCheckpoint

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--run_name", type=str | None, default=None, help="Run name (default from the config)."
        )
        parser.add_argument(
            "--checkpoint_root", type=str, default="checkpoints", help="Checkpoints go to ROOT/<run>/."
        )
        parser.add_argument(
            "--log_root", type=str, default="logs", help="TensorBoard logs go to ROOT/<run>/version_N/."
        )
        parser.add_argument(
            "--resume", type=str | None, default=None, help="A .ckpt, a run folder, or 'last'."
        )
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                # `best` is the best robust model: the per-example worst case over the robustness
                # callback's attacks (BLOB_QG + PGD). It exists only on evaluation epochs (the first,
                # every N-th, the last), so the checkpoint is taken at train-epoch end, after the
                # callback; between evaluations the stale value never beats the best. With
                # robustness.every_n_epochs=0 the monitor falls back to val/adv_acc.
                "checkpoint.monitor": "robust/worst_acc",
                "checkpoint.save_on_train_epoch_end": True,
                "checkpoint.mode": "max",
                "checkpoint.filename": "best",
                "checkpoint.save_last": True,
                "checkpoint.save_top_k": 1,
                "checkpoint.auto_insert_metric_name": False,
                "checkpoint.enable_version_counter": False,
            }
        )
        self.add_extra_arguments(parser)

    def add_extra_arguments(self, parser: LightningArgumentParser) -> None:
        """Hook for forced callbacks (robustness evaluation) added by other modules."""
        from qgtrain.cli.callback_args import add_callback_arguments

        add_callback_arguments(parser)

    def before_instantiate_classes(self) -> None:
        config = self.config
        check_devices(config.trainer.accelerator, config.trainer.devices)
        for key in ("inner", "val_attack"):
            attack = config.model.get(key)
            if attack is not None and attack.class_path.rsplit(".", 1)[-1] == "Attack":
                # jsonargparse builds the base class when init_args meet a null attack
                raise UsageError(
                    f"model.{key} has arguments but no attack class; choose one with --inner NAME"
                )
        checkpoint_root = Path(config.checkpoint_root)
        log_root = Path(config.log_root)
        base = config.run_name or default_run_name(config)
        if config.resume:
            self.resume_path = resolve_resume(config.resume, checkpoint_root, base)
            try:
                read_checkpoint(self.resume_path)  # refuse pickled code before anything is built
            except CheckpointError as exc:
                raise UsageError(f"--resume: {exc}") from None
            self.run_name = config.run_name or self.resume_path.parent.name
        else:
            self.run_name = config.run_name or _unique_run_name(checkpoint_root, log_root, base)
        if config.checkpoint.monitor == "robust/worst_acc" and config.robustness.every_n_epochs == 0:
            config.checkpoint.monitor = "val/adv_acc"  # robustness evaluation is off
        if config.checkpoint.dirpath is None:
            config.checkpoint.dirpath = str(checkpoint_root / self.run_name)
        check_writable(Path(config.checkpoint.dirpath), "checkpoint")
        if config.trainer.logger in (None, True):
            check_writable(log_root, "log")
            config.trainer.logger = Namespace(
                class_path="lightning.pytorch.loggers.TensorBoardLogger",
                init_args=Namespace(save_dir=str(log_root), name=self.run_name, default_hp_metric=False),
            )

    def instantiate_trainer(self, **kwargs: Any):
        if not self.config.trainer.get("plugins"):
            kwargs.setdefault("plugins", [AtomicCheckpointIO()])
        trainer = super().instantiate_trainer(**kwargs)
        for callback in trainer.checkpoint_callbacks:
            if callback.save_last is True and not isinstance(callback, LastCheckpoint):
                callback.save_last = False  # stale after epochs without improvement (Lightning 2.6)
                trainer.callbacks.append(LastCheckpoint(callback.dirpath))  # last.ckpt every epoch
        self.interrupt = InterruptCheckpoint(self.config.checkpoint.dirpath)
        trainer.callbacks.append(self.interrupt)  # Ctrl-C saves interrupted.ckpt
        return trainer


def build_cli(args: list[str]) -> QGTrainCLI:
    """Parse ``args`` (already expanded) and instantiate model, data and trainer, without fitting."""
    if not any(a in ("--config", "-c") or a.startswith("--config=") for a in args):
        args = ["--config", str(configs_dir() / "mnist.yaml"), *args]
    return QGTrainCLI(
        AdversarialTraining,
        VisionDataModule,
        subclass_mode_data=True,
        run=False,
        args=args,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": PROG},
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``train.py``; returns the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        sys.stdout.write(short_flag_help() + "\n\n")
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")
    try:
        args = expand_short_flags(argv)
        cli = build_cli(args)
    except (UsageError, ValueError, TypeError, DataError, MisconfigurationException) as exc:
        main_usage_error(PROG, _one_line(exc))
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted before training started; nothing was saved\n")
        return 130
    log.info("run %s: checkpoints in %s", cli.run_name, cli.config.checkpoint.dirpath)
    try:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.resume_path)
    except (DataError, NonFiniteLossError, CheckpointError) as exc:
        sys.stderr.write(f"{PROG}: error: {_one_line(exc)}\n")
        return 1
    except SystemExit:  # Lightning's exit after a KeyboardInterrupt
        if not cli.interrupt.interrupted:
            raise
        sys.stderr.write(f"{PROG}: {cli.interrupt.message(f'python {PROG} <same arguments>')}\n")
        return 130
    return 0


def _one_line(exc: BaseException) -> str:
    """The first line of the innermost cause: jsonargparse wraps a class's own ``ValueError``
    (e.g. the attack's "eps must be in (0, 1]") in a multi-line "Does not validate" message."""
    while exc.__cause__ is not None and not isinstance(exc, UsageError):
        exc = exc.__cause__
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
