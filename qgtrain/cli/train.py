"""``train.py``: LightningCLI over :class:`AdversarialTraining` with YAML configs and short flags."""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from qgtrain.cli.aliases import UsageError, configs_dir, expand_short_flags, main_usage_error, short_flag_help
from qgtrain.data import DataError, VisionDataModule
from qgtrain.training import AdversarialTraining, NonFiniteLossError
from qgtrain.training.checkpoint_io import AtomicCheckpointIO

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


def check_writable(folder: Path, what: str) -> None:
    """Fail at start, not after an epoch, when an output folder cannot be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{id(folder)}"
        with open(probe, "wb") as handle:
            handle.write(b"\0" * 65536)
        probe.unlink()
    except OSError as exc:
        raise UsageError(
            f"cannot write the {what} folder {folder}: {exc.strerror or exc}; choose another"
        ) from None


class QGTrainCLI(LightningCLI):
    """LightningCLI with run naming, checkpoint folders, TensorBoard logging and atomic checkpoints."""

    resume_path: Path | None = None
    run_name: str = ""

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
                "checkpoint.monitor": "val/adv_acc",
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
        checkpoint_root = Path(config.checkpoint_root)
        log_root = Path(config.log_root)
        base = config.run_name or default_run_name(config)
        if config.resume:
            self.resume_path = resolve_resume(config.resume, checkpoint_root, base)
            self.run_name = config.run_name or self.resume_path.parent.name
        else:
            self.run_name = config.run_name or _unique_run_name(checkpoint_root, log_root, base)
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
        return super().instantiate_trainer(**kwargs)


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
    except (UsageError, ValueError, DataError) as exc:
        main_usage_error(PROG, str(exc).splitlines()[0])
    log.info("run %s: checkpoints in %s", cli.run_name, cli.config.checkpoint.dirpath)
    try:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.resume_path)
    except (DataError, NonFiniteLossError) as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return 1
    return 0
