"""``train.py``: LightningCLI over :class:`AdversarialTraining` with YAML configs and short flags."""

from __future__ import annotations

import logging
import os
import shlex
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
from qgtrain.models import model_spec
from qgtrain.training import AdversarialTraining, NonFiniteLossError
from qgtrain.training.checkpoint_io import (
    AtomicCheckpointIO,
    CheckpointError,
    LastCheckpoint,
    StepCheckpoint,
    read_checkpoint,
)
from qgtrain.training.interrupt import InterruptCheckpoint
from qgtrain.training.resume import (
    RESUMABLE,
    RestoreLoaderState,
    finished_message,
    latest_checkpoint,
    newest_resumable,
    slurm_requeued,
)

log = logging.getLogger(__name__)
PROG = "train.py"
# One step checkpoint of the main job (MadryMNIST + Adam, 37.5 MiB) takes 0.12 s to write here,
# 0.05 of a 2.3 s CPU training step (docs/RESULTS.md). A step count cannot bound that cost on every
# machine (a GPU step is many times shorter), a time interval can: every 10 minutes it is 0.02 %,
# and a kill loses at most 10 minutes. --ckpt_every_steps (off by default) adds a step trigger.
DEFAULT_CKPT_MINUTES = 10.0


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
    """A ``.ckpt`` file; a run folder (its newest of ``step.ckpt``, ``last.ckpt``, ``interrupted.ckpt``);
    or ``last``: the newest resumable checkpoint of the newest run named ``run_name`` or ``run_name-vN``."""
    if resume == "last":
        path = latest_checkpoint(checkpoint_root, run_name)
        if path is None:
            raise UsageError(
                f"--resume last: no checkpoint of a run named {run_name} (or {run_name}-vN) in "
                f"{checkpoint_root}; pass a .ckpt file or a run folder"
            )
        return path
    path = Path(resume)
    if path.is_dir():
        found = newest_resumable(path)
        if found is None:
            raise UsageError(f"--resume: no checkpoint ({', '.join(RESUMABLE)}) in {path}")
        return found
    if not path.is_file():
        raise UsageError(f"--resume: no checkpoint at {path}; pass a .ckpt file, a run folder, or 'last'")
    return path


def _describe_net(spec: dict[str, Any] | None, fallback: str) -> str:
    if not spec:
        return fallback
    kwargs = ", ".join(f"{key}={value}" for key, value in sorted(spec.get("kwargs", {}).items()))
    return f"{spec['name']}({kwargs})"


def check_resume_compatible(checkpoint: dict[str, Any], path: Path, cli: QGTrainCLI) -> None:
    """The network and the number of training processes must be the checkpoint's (one line, else
    Lightning fails with a size-mismatch traceback or resumes a different data shard)."""
    saved = checkpoint.get("state_dict", {})
    wanted = cli.model.state_dict()
    same_shapes = saved.keys() == wanted.keys() and all(
        tuple(saved[key].shape) == tuple(wanted[key].shape) for key in wanted
    )
    meta = checkpoint.get("qgtrain") or {}
    if not same_shapes:
        try:
            requested = model_spec(cli.model.net)
        except ValueError:
            requested = None
        raise UsageError(
            f"--resume: {path} holds a {_describe_net(meta.get('net'), 'different network')} network, "
            f"this run builds {_describe_net(requested, type(cli.model.net).__name__)}; pass the "
            "checkpoint's --model / --config"
        )
    processes = meta.get("world_size")
    if processes is not None and processes != cli.trainer.world_size:
        raise UsageError(
            f"--resume: {path} was written by {processes} training process(es), this run has "
            f"{cli.trainer.world_size}; resume with the same --devices and --num-nodes"
        )


def resume_command(argv: list[str], checkpoint: str | Path) -> str:
    """The command line that continues this run: ``argv`` without its ``--resume``, plus ``--resume``."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--resume":
            skip = True
        elif not arg.startswith("--resume="):
            kept.append(arg)
    script = sys.argv[0] if Path(sys.argv[0]).name == PROG else PROG
    return shlex.join(["python", script, *kept, "--resume", str(checkpoint)])


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
    resume_checkpoint: dict[str, Any] | None = None
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
            "--resume",
            type=str | None,
            default=None,
            help="A .ckpt, a run folder (its newest checkpoint), or 'last' (the newest of this run name).",
        )
        parser.add_argument(
            "--ckpt_every_steps",
            type=int,
            default=0,
            help="Write ROOT/<run>/step.ckpt every N training steps inside an epoch (0 = off).",
        )
        parser.add_argument(
            "--ckpt_every_minutes",
            type=float,
            default=DEFAULT_CKPT_MINUTES,
            help="Write ROOT/<run>/step.ckpt every T minutes of training (0 = off).",
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
        if not config.resume and slurm_requeued() and latest_checkpoint(checkpoint_root, base):
            config.resume = "last"  # a requeued SLURM job continues where it was stopped
        if config.resume:
            self.resume_path = resolve_resume(config.resume, checkpoint_root, base)
            try:
                self.resume_checkpoint = read_checkpoint(self.resume_path)  # refuses pickled code
            except CheckpointError as exc:
                raise UsageError(f"--resume: {exc}") from None
            trainer_config = config.trainer
            finished = finished_message(
                self.resume_checkpoint, self.resume_path, trainer_config.max_epochs, trainer_config.max_steps
            )
            if finished:
                raise UsageError(f"--resume: {finished}")
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
        config = self.config
        if config.ckpt_every_steps or config.ckpt_every_minutes:  # step.ckpt inside an epoch
            trainer.callbacks.append(
                StepCheckpoint(config.checkpoint.dirpath, config.ckpt_every_steps, config.ckpt_every_minutes)
            )
        trainer.callbacks.append(RestoreLoaderState())  # the data loader's position on resume
        self.interrupt = InterruptCheckpoint(config.checkpoint.dirpath)
        trainer.callbacks.append(self.interrupt)  # Ctrl-C, SIGTERM, SIGUSR1 save interrupted.ckpt
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
    if cli.resume_checkpoint is not None:
        try:
            check_resume_compatible(cli.resume_checkpoint, cli.resume_path, cli)
        except UsageError as exc:
            main_usage_error(PROG, str(exc))
        log.info(
            "resuming from %s: epoch %d, step %d",
            cli.resume_path,
            cli.resume_checkpoint.get("epoch", 0),
            cli.resume_checkpoint.get("global_step", 0),
        )
        cli.resume_checkpoint = None  # Lightning reads the file again; do not hold two copies
    log.info("run %s: checkpoints in %s", cli.run_name, cli.config.checkpoint.dirpath)
    try:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.resume_path)
    except (DataError, NonFiniteLossError, CheckpointError) as exc:
        sys.stderr.write(f"{PROG}: error: {_one_line(exc)}\n")
        return 1
    except SystemExit:  # Lightning's exit after Ctrl-C, or its SIGTERMException
        interrupt = cli.interrupt
        if not interrupt.interrupted:
            raise
        command = resume_command(argv, interrupt.saved_path or "last")
        sys.stderr.write(f"{PROG}: {interrupt.message(command)}\n")
        return interrupt.exit_status
    return 0


def _one_line(exc: BaseException) -> str:
    """The first line of the innermost cause: jsonargparse wraps a class's own ``ValueError``
    (e.g. the attack's "eps must be in (0, 1]") in a multi-line "Does not validate" message."""
    while exc.__cause__ is not None and not isinstance(exc, UsageError):
        exc = exc.__cause__
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
