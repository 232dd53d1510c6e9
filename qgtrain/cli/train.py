"""``train.py``: LightningCLI over :class:`AdversarialTraining` with YAML configs and short flags."""

from __future__ import annotations

import argparse
import difflib
import inspect
import logging
import os
import re
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from pydoc import locate
from typing import Any

from jsonargparse import Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from qgtrain.attacks import ATTACKS
from qgtrain.callbacks import AttackVisualization, RobustnessEvaluation
from qgtrain.callbacks.robustness import WORST_ACC
from qgtrain.checkpoint_files import OutputFolderError, check_writable
from qgtrain.cli import UsageError, exit_usage, report_bug
from qgtrain.cli.aliases import (
    HelpAfterParse,
    add_run_options,
    add_short_flags,
    default_config,
    name_the_flag,
    short_flag_help,
)
from qgtrain.data import DATAMODULES, DataError, VisionDataModule
from qgtrain.models import MODELS
from qgtrain.training import AdversarialTraining, NonFiniteLossError, resume
from qgtrain.training.checkpoint_io import (
    BEST_CHECKPOINT,
    VAL_ADV_ACC,
    AtomicCheckpointIO,
    CheckpointError,
    LastCheckpoint,
    StepCheckpoint,
)
from qgtrain.training.interrupt import InterruptCheckpoint
from qgtrain.training.module import free_training_epochs
from qgtrain.training.trainer import run_summary

log = logging.getLogger(__name__)
PROG = "train.py"
REGISTRIES = {"model.inner": ATTACKS, "model.val_attack": ATTACKS, "model.net": MODELS, "data": DATAMODULES}
"""The classes a subclass-typed key can take: their arguments are the candidates for a typo."""


def default_run_name(config: Namespace) -> str:
    """:func:`~qgtrain.training.resume.run_name` of the parsed config; the model is its registry name."""
    net_cls = locate(config.model.net.class_path)
    model = next((name for name, cls in MODELS.items() if cls is net_cls), net_cls.__name__.lower())
    data_cls = locate(config.data.class_path)
    dataset = getattr(data_cls, "name", data_cls.__name__.lower())
    inner = config.model.inner
    if inner is None:
        return resume.run_name(dataset, model, None)
    name = resume.run_name(
        dataset, model, locate(inner.class_path).name, inner.init_args.steps, inner.init_args.b
    )
    replays = inner.init_args.get("replays")  # free AT; ATTA and TRADES change the method too
    extras = [f"m{replays}" if replays else "", "atta" if config.model.get("atta") else ""]
    objective = config.model.get("objective", "madry")
    return "-".join([name, *(e for e in extras if e), *([objective] if objective != "madry" else [])])


class QGTrainCLI(LightningCLI):
    """LightningCLI with run naming, checkpoint folders, TensorBoard logging and atomic checkpoints."""

    resume_path: Path | None = None
    resume_checkpoint: dict[str, Any] | None = None
    run_name: str = ""
    interrupt: InterruptCheckpoint

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        """LightningCLI's parser with ``-h/--help`` that prints after the parse, so the short-flag
        table shows the values the command line resolves to."""
        parser = super().init_parser(**kwargs, add_help=False)
        parser.add_argument("-h", "--help", action=HelpAfterParse, help="Show this help message and exit.")
        return parser

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        add_short_flags(parser)
        add_run_options(parser)
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({f"checkpoint.{key}": value for key, value in BEST_CHECKPOINT.items()})
        parser.add_lightning_class_args(RobustnessEvaluation, "robustness")  # forced callbacks
        parser.add_lightning_class_args(AttackVisualization, "visualization")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """jsonargparse's one parse; its refusals become one line (an unknown flag with the closest
        valid one), and ``--help`` prints the short flags with their resolved values first."""
        parser.short_flags_given.clear()
        parser.help_requested = False
        try:
            super().parse_arguments(parser, args)
        except argparse.ArgumentError as exc:
            if parser.help_requested:
                self._print_help(parser, None)
            raise UsageError(self._refusal(exc, parser)) from None
        if parser.help_requested:
            self._print_help(parser, self.config)

    @staticmethod
    def _print_help(parser: LightningArgumentParser, config: Namespace | None) -> None:
        files = [Path(str(f)).name for f in [default_config(), *((config or {}).get("config") or [])]]
        sys.stdout.write(short_flag_help(config, ", ".join(files)) + "\n\n" + parser.format_help())
        raise SystemExit(0)

    @staticmethod
    def _refusal(exc: argparse.ArgumentError, parser: LightningArgumentParser) -> str:
        """One line for a parse error: did-you-mean for an unknown flag or a class's argument."""
        given = parser.short_flags_given
        unknown = re.match(r"unrecognized arguments: (.*)", str(exc))
        if unknown is not None:
            return _did_you_mean(unknown.group(1).split(), parser)
        nested = re.match(r"Parser key \"([\w.]+)\": Option '(\w+)' is not accepted", _one_line(exc))
        if nested is None or nested.group(1) not in REGISTRIES:
            return _one_line(exc, given)
        key, option = nested.groups()
        names = {p for cls in REGISTRIES[key].values() for p in inspect.signature(cls).parameters}
        close = difflib.get_close_matches(option, sorted(names - {option}), n=1, cutoff=0.6)
        if option in names:  # an argument of other classes of the registry, not of the chosen one
            return f"--{key}.init_args.{option} is not an argument of the class chosen for {key}"
        hint = f"; did you mean --{key}.init_args.{close[0]}?" if close else ""
        return f"--{key}.init_args.{option} is not an argument of {key}{hint}"

    def before_instantiate_classes(self) -> None:
        """Start-up steps on the parsed config, in order; nothing is written by any of them (a
        refusal from one, e.g. :class:`ResumeError`, becomes one line in :func:`main`)."""
        self._refuse_classless_attacks()
        self._refuse_partial_free_epochs()
        self._name_the_run()
        self._monitor_validation_without_evaluation()
        self._point_outputs_at_the_run()

    def _refuse_classless_attacks(self) -> None:
        for key in ("inner", "val_attack"):
            attack = self.config.model.get(key)
            if attack is not None and attack.class_path.rsplit(".", 1)[-1] == "Attack":
                # jsonargparse builds the base class when init_args meet a null attack
                raise UsageError(
                    f"model.{key} has arguments but no attack class; choose one with --inner NAME"
                )

    def _name_the_run(self) -> None:
        """``run_name``, else the default from the config (``-vN`` when taken); ``--resume`` reads
        its checkpoint here, so a crafted file is refused before anything is built."""
        config = self.config
        root, base = Path(config.checkpoint_root), config.run_name or default_run_name(config)
        if not config.resume and resume.slurm_requeued() and resume.latest_checkpoint(root, base):
            config.resume = "last"  # a requeued SLURM job continues where it was stopped
        limits = config.trainer.max_epochs, config.trainer.max_steps
        self.run_name, self.resume_path, self.resume_checkpoint = resume.start_point(
            config.run_name, config.resume, root, base, *limits
        )

    def _refuse_partial_free_epochs(self) -> None:
        """Free training runs ``--epochs`` / ``--replays`` epochs: a count they do not divide is
        refused here, in one line, before anything is built (the module's own check, reused)."""
        epochs, inner = self.config.trainer.max_epochs, self.config.model.inner
        replays = inner.init_args.get("replays") if inner is not None else None
        free = replays and getattr(locate(inner.class_path), "reuses_training_backward", False)
        if free and epochs is not None and epochs > 0:
            try:
                free_training_epochs(epochs, replays)
            except ValueError as exc:
                raise UsageError(str(exc)) from None

    def _monitor_validation_without_evaluation(self) -> None:
        config = self.config
        if config.checkpoint.monitor == WORST_ACC and config.robustness.every_n_epochs == 0:
            config.checkpoint.monitor = VAL_ADV_ACC  # robustness evaluation is off

    def _point_outputs_at_the_run(self) -> None:
        """Checkpoints in ``checkpoint_root/<run>/``, TensorBoard in ``log_root/<run>/version_N/``,
        both folders probed for writability (and left as they were)."""
        config = self.config
        if config.checkpoint.dirpath is None:
            config.checkpoint.dirpath = str(Path(config.checkpoint_root) / self.run_name)
        check_writable(Path(config.checkpoint.dirpath), "checkpoint")
        if config.trainer.logger in (None, True):
            check_writable(Path(config.log_root), "log")
            # a resumed run continues its version's curves (version=, purge_step=)
            same_curves = resume.log_continuation(
                Path(config.log_root) / self.run_name, self.resume_checkpoint
            )
            config.trainer.logger = Namespace(
                class_path="lightning.pytorch.loggers.TensorBoardLogger",
                init_args=Namespace(
                    save_dir=config.log_root, name=self.run_name, default_hp_metric=False, **same_curves
                ),
            )

    def instantiate_classes(self) -> None:
        """LightningCLI's instantiation; a class refusing its arguments (``Attack.__init__``'s
        "eps must be in (0, 1]") is one line naming the flag that set them."""
        try:
            self.config_init = self.parser.instantiate_classes(self.config)
        except (ValueError, TypeError) as exc:
            raise UsageError(_one_line(exc, self.parser.short_flags_given)) from None
        self.datamodule = self._get(self.config_init, "data")
        self.model = self._get(self.config_init, "model")
        self._add_configure_optimizers_method_to_model(self.subcommand)
        self.trainer = self.instantiate_trainer()

    def instantiate_trainer(self, **kwargs: Any):
        if not self.config.trainer.get("plugins"):
            kwargs.setdefault("plugins", [AtomicCheckpointIO()])
        trainer = self._lightning_trainer(**kwargs)
        for callback in trainer.checkpoint_callbacks:
            if callback.save_last is True and not isinstance(callback, LastCheckpoint):
                callback.save_last = False  # stale after epochs without improvement (Lightning 2.6)
                trainer.callbacks.append(LastCheckpoint(callback.dirpath))  # last.ckpt every epoch
        config = self.config
        if config.ckpt_every_steps or config.ckpt_every_minutes:  # step.ckpt inside an epoch
            try:
                step = StepCheckpoint(
                    config.checkpoint.dirpath, config.ckpt_every_steps, config.ckpt_every_minutes
                )
            except ValueError as exc:  # its own check of the two values: name the flag as typed
                raise UsageError(f"--{str(exc).replace('_', '-')}") from None
            trainer.callbacks.append(step)
        trainer.callbacks.append(resume.RestoreLoaderState())  # the data loader's position on resume
        self.interrupt = InterruptCheckpoint(config.checkpoint.dirpath)
        trainer.callbacks.append(self.interrupt)  # Ctrl-C, SIGTERM, SIGUSR1 save interrupted.ckpt
        return trainer

    def _lightning_trainer(self, **kwargs: Any):
        """Lightning's Trainer, which parses accelerator and devices; its refusals become one line
        naming both flags. Lightning lets a CPU run start more processes than there are cores,
        which is refused here."""
        trainer_config = self.config.trainer
        where = f"--trainer.accelerator {trainer_config.accelerator} --devices {trainer_config.devices}"
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, ValueError, TypeError) as exc:
            if not re.search(r"devices|accelerator|gpu|cuda", str(exc), re.IGNORECASE):
                raise UsageError(_one_line(exc, self.parser.short_flags_given)) from None
            raise UsageError(f"{where}: {_one_line(exc)}; 'auto' picks what this machine has") from None
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        if isinstance(trainer.accelerator, CPUAccelerator) and trainer.num_devices > cores:
            raise UsageError(
                f"--devices {trainer_config.devices}: only {cores} CPU core{'s' if cores != 1 else ''} "
                f"available here; use 'auto' or a count from 1 to {cores}"
            )
        return trainer

    def check_before_fit(self) -> None:
        """What Lightning would check only inside ``fit``, after creating the log folder: the data
        (download, read, split), the optimizer's arguments (the optimizer is built once), and that
        the checkpoint to resume fits this network and number of processes."""
        self.datamodule.prepare_data()
        self.datamodule.setup("fit")
        try:
            self.model.optimizer_factory(self.model.parameters())
        except (ValueError, TypeError) as exc:
            raise UsageError(f"model.optimizer (--lr): {_one_line(exc)}") from None
        checkpoint = self.resume_checkpoint
        if checkpoint is not None:
            resume.check_resume_compatible(checkpoint, self.resume_path, self.model, self.trainer.world_size)
            epoch, step = resume.resumes_at(checkpoint)
            log.info("resuming from %s: epoch %d, step %d", self.resume_path, epoch, step)
            self.resume_checkpoint = None  # Lightning reads the file again; do not hold two copies


def build_cli(args: list[str]) -> QGTrainCLI:
    """Parse ``args`` over the default config file and instantiate model, data and trainer, without
    fitting."""
    return QGTrainCLI(
        AdversarialTraining,
        VisionDataModule,
        subclass_mode_data=True,
        run=False,
        args=args,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": PROG, "exit_on_error": False, "default_config_files": [str(default_config())]},
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``train.py``; returns the exit status (2: usage, 1: data, files or a bug)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")
    # "Seed set to N" would come before a start-up error's one line; the seed is in config.yaml.
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)
    try:
        cli = build_cli(argv)
        cli.check_before_fit()
    except (DataError, CheckpointError) as exc:
        sys.stderr.write(f"{PROG}: error: {_one_line(exc)}\n")
        return 1
    except (UsageError, resume.ResumeError, OutputFolderError) as exc:
        exit_usage(PROG, _one_line(exc))
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted before training started; nothing was saved\n")
        return 130
    except Exception:  # not a refusal of ours: a bug, shown with its traceback
        return report_bug(PROG)
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
        script = sys.argv[0] if Path(sys.argv[0]).name == PROG else PROG
        command = resume.resume_command(script, argv, interrupt.saved_path or "last")
        sys.stderr.write(f"{PROG}: {interrupt.message(command)}\n")
        return interrupt.exit_status
    if cli.trainer.is_global_zero and not cli.trainer.interrupted:
        sys.stdout.write(run_summary(cli.trainer, cli.run_name, Path(cli.config.checkpoint.dirpath)) + "\n")
    return 0


def _did_you_mean(unknown: list[str], parser: LightningArgumentParser) -> str:
    """``unrecognized argument --stpes; did you mean --steps?`` for the first unknown flag."""
    flag = next((a.split("=", 1)[0] for a in unknown if a.startswith("-")), unknown[0])
    valid = [option for option in parser._option_string_actions if option[:2] == "--"]
    close = difflib.get_close_matches(flag, valid, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}?" if close else f"see python {PROG} --help"
    return f"unrecognized argument {flag}; {hint}"


def _one_line(exc: BaseException, given: Mapping[str, str] | None = None) -> str:
    """One line for ``exc``: the innermost cause (jsonargparse wraps a class's own ``ValueError``,
    e.g. the attack's "eps must be in (0, 1]", in a multi-line "Does not validate" message),
    after the parser keys it passed through, with the short flag that set the key (``given``)."""
    keys: list[str] = []
    while True:
        text = str(exc).strip()
        key = re.match(r'Parser key "([^"]+)"', text)
        if key is not None and key.group(1) not in keys:
            keys.append(key.group(1))
        if exc.__cause__ is None or isinstance(exc, UsageError | resume.ResumeError):
            break
        exc = exc.__cause__
    reason = " ".join(line.strip() for line in text.splitlines() if line.strip()) or type(exc).__name__
    given = given or {}
    if isinstance(exc, UsageError | resume.ResumeError):
        return reason  # written here, naming its flag already
    if keys:
        flagged = name_the_flag(f"{'.'.join(keys)}: {reason}", given)
        return flagged if flagged.startswith("-") else f'Parser key "{".".join(keys)}": {reason}'
    return name_the_flag(reason, given)
