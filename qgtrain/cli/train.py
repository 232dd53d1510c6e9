"""``train.py``: LightningCLI over :class:`AdversarialTraining` with YAML configs and short flags; the
run's start-up steps are :mod:`qgtrain.run_setup`'s."""

from __future__ import annotations

import argparse
import inspect
import logging
import re
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from qgtrain import checkpoints, console, run_setup
from qgtrain.attacks import ATTACKS
from qgtrain.callbacks import AttackVisualization, RobustnessEvaluation
from qgtrain.callbacks.robustness import WORST_ACC
from qgtrain.checkpoints import AtomicCheckpointIO, CheckpointError, OutputFolderError, best_checkpoint
from qgtrain.cli import (
    EXIT_STATUSES,
    UsageError,
    aliases,
    closest,
    environment_fault,
    report_failure,
    unknown_flag,
)
from qgtrain.data import DATAMODULES, DataError, VisionDataModule
from qgtrain.models import MODELS
from qgtrain.training import AdversarialTraining, NonFiniteLossError
from qgtrain.training.trainer import run_summary

log = logging.getLogger(__name__)
PROG = "train.py"
BATCH_LIMITS = (
    "limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches",
    "val_check_interval", "overfit_batches",
)  # fmt: skip
"""Lightning's ``int | float`` Trainer arguments: a whole number counts batches, a float is a fraction."""
REGISTRIES = {"model.inner": ATTACKS, "model.val_attack": ATTACKS, "model.net": MODELS, "data": DATAMODULES}
"""The classes a subclass-typed key can take: their arguments are the candidates for a typo."""
OWN_ERRORS = (UsageError, checkpoints.ResumeError, run_setup.StartError)  # they name their flag already


class QGTrainCLI(LightningCLI):
    """LightningCLI with short flags (:mod:`~qgtrain.cli.aliases`), one-line refusals and the run's
    start-up steps (:mod:`qgtrain.run_setup`)."""

    start: run_setup.StartPoint

    @property
    def run_name(self) -> str:
        return self.start.run_name

    def add_core_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """LightningCLI's, with :data:`BATCH_LIMITS` typed ``int | float | None``: jsonargparse tries
        that order, so ``1`` stays one batch (``typing`` may cache Lightning's as ``Union[float, int]``)."""
        parser.add_class_arguments(
            self.trainer_class, "trainer", fail_untyped=False, instantiate=False, sub_configs=True,
            skip=set(BATCH_LIMITS),
        )  # fmt: skip
        defaults = inspect.signature(self.trainer_class.__init__).parameters
        for key in BATCH_LIMITS:
            parser.add_argument(
                f"--trainer.{key}", type=int | float | None, default=defaults[key].default,
                help="an int counts batches, a float is a fraction of them (Lightning's Trainer)",
            )  # fmt: skip
        parser.set_defaults({f"trainer.{k}": v for k, v in self.trainer_defaults.items() if k != "callbacks"})
        parser.add_lightning_class_args(self.model_class, "model", subclass_mode=self.subclass_mode_model)
        parser.add_lightning_class_args(self.datamodule_class, "data", subclass_mode=self.subclass_mode_data)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        aliases.add_short_flags(parser)
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({f"checkpoint.{key}": value for key, value in best_checkpoint(WORST_ACC).items()})
        parser.add_lightning_class_args(RobustnessEvaluation, "robustness")  # forced callbacks
        parser.add_lightning_class_args(AttackVisualization, "visualization")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """jsonargparse's one parse, short flags expanded (:func:`~qgtrain.cli.aliases.expand`); a
        refusal is one line, and ``--help`` prints the short flags with their resolved values first."""
        parser.short_flags_given, parser.set_before_inner, parser.help_requested = {}, [], False
        if isinstance(args, list):
            check_config_files(args)
            args = [*aliases.expand(args, parser.short_flags_given, parser.set_before_inner), aliases.RESOLVE_STEP_SIZE]
        try:
            super().parse_arguments(parser, args)
        except argparse.ArgumentError as exc:
            if parser.help_requested:
                self.print_help(parser, None)
            raise UsageError(refusal(exc, parser)) from None
        if parser.help_requested:
            self.print_help(parser, self.config)

    @staticmethod
    def print_help(parser: LightningArgumentParser, config: Namespace | None) -> None:
        files = [Path(str(f)).name for f in [aliases.default_config(), *((config or {}).get("config") or [])]]
        sys.stdout.write(aliases.short_flag_help(config, ", ".join(files)) + "\n\n" + parser.format_help())
        raise SystemExit(0)

    def before_instantiate_classes(self) -> None:
        """Lightning's start-up lines quiet unless ``--verbose``; :func:`~qgtrain.run_setup.prepare_run`."""
        console.quiet_other_libraries(verbose=self.config.verbose)
        aliases.refuse_arguments_without_an_attack(self.config, self.parser.short_flags_given)
        self.start = run_setup.prepare_run(self.config)

    def instantiate_classes(self) -> None:
        """LightningCLI's; a class refusing its arguments is one line naming the flag that set them."""
        try:
            super().instantiate_classes()
        except (MisconfigurationException, ValueError, TypeError) as exc:
            raise UsageError(one_line(exc, self.parser.short_flags_given)) from None

    def instantiate_trainer(self, **kwargs: Any):
        """Lightning's Trainer (its refusals of accelerator and devices name both flags), with atomic
        checkpoint writes and the callbacks of every run."""
        devices = self.config.trainer.devices
        if not self.config.trainer.get("plugins"):
            kwargs.setdefault("plugins", [AtomicCheckpointIO()])
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, ValueError, TypeError) as exc:
            if not re.search(r"devices|accelerator|gpu|cuda", str(exc), re.IGNORECASE):
                raise  # one line from instantiate_classes, which calls this
            where = f"--trainer.accelerator {self.config.trainer.accelerator} --devices {devices}"
            raise UsageError(f"{where}: {one_line(exc)}; 'auto' picks what this machine has") from None
        run_setup.check_processes(trainer, devices)
        self.interrupt, self.weights_origin = run_setup.add_run_callbacks(trainer, self.config)
        return trainer

    def check_before_fit(self) -> None:
        """:func:`~qgtrain.run_setup.check_before_fit`: data, optimizer, the resumed checkpoint."""
        override = self.config.resume_override
        run_setup.check_before_fit(self.trainer, self.model, self.datamodule, self.start, override, self.weights_origin)


def check_config_files(argv: list[Any]) -> None:
    """Each ``--config FILE`` is a readable YAML mapping, else one line naming it and the fault's line
    (jsonargparse's message names neither)."""
    argv = [str(a) for a in argv]
    named = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"] + [a[9:] for a in argv if a.startswith("--config=")]
    for path in filter(Path.is_file, map(Path, named)):  # jsonargparse names a missing one
        try:
            content = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" (line {mark.line + 1})" if mark is not None else ""
            raise UsageError(f"--config {path}: not valid YAML{where}: {getattr(exc, 'problem', None) or type(exc).__name__}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"--config {path}: cannot read it: {getattr(exc, 'strerror', None) or exc}") from None
        if not isinstance(content, dict):
            kind = "empty" if content is None else f"a {type(content).__name__}, not a mapping of keys"
            raise UsageError(f"--config {path}: the file is {kind}; a config sets keys, e.g. 'trainer: ...'")


def refusal(exc: argparse.ArgumentError, parser: LightningArgumentParser) -> str:
    """One line for jsonargparse's refusal: the closest valid flag for an unknown one, the chosen
    class for an argument it lacks, the short flag that set a key of the wrong type."""
    text, given = " ".join(str(exc).split()), parser.short_flags_given
    valid = [f"--{key}" for key in parser.get_defaults().keys()] + [row.flag for row in aliases.SHORT_FLAGS]
    if (unknown := unknown_flag(text, valid, PROG)) is not None:
        return unknown
    if (group := re.match(r"Group '([\w.]+)' does not accept option '(\w+)'", text)) is not None:  # a config's key
        key = f"{group.group(1)}.{group.group(2)}"
        close = closest(f"--{key}", valid)
        return f"{key} (set by a config) is not an option" + (f"; did you mean {close[2:]}?" if close else "")
    nested = re.match(r"Parser key \"([\w.]+)\":.*?Problem with given class_path '([\w.]+)': (.*?)(?: - |$)", text)
    if nested is None:
        return one_line(exc, given)
    key, cls, problem = nested.group(1), nested.group(2).rsplit(".", 1)[-1], nested.group(3)
    option = re.match(r"Option '(\w+)' is not accepted", problem)
    if option is None:  # a value of the wrong type: 'Parser key "b": Expected ...'
        return aliases.name_the_flag(re.sub(r'^Parser key "(\w+)": ', r"\1: ", problem), given)
    option = option.group(1)
    names = {p for other in REGISTRIES.get(key, {}).values() if other for p in inspect.signature(other).parameters}
    if option in names:  # an argument of other classes of the registry, not of the chosen one
        flag = next((f"{f}: " for f in given if f"{key}.init_args.{option}" in aliases.FLAGS[f].keys), "")
        return f"{flag}--{key}.init_args.{option} is not an argument of {cls}, the class chosen for {key}"
    close = closest(option, names)
    return f"--{key}.init_args.{option} is not an argument of {cls}" + (f"; did you mean --{key}.init_args.{close}?" if close else "")


def one_line(exc: BaseException, given: Mapping[str, str] | None = None) -> str:
    """One line for ``exc``: its innermost cause (jsonargparse wraps a class's own ``ValueError`` in
    a multi-line message) after the parser keys it passed through, or the short flag that set them."""
    keys: list[str] = []
    while not isinstance(exc, OWN_ERRORS):
        key = re.match(r'Parser key "([^"]+)"', str(exc).strip())
        keys += [key.group(1)] if key is not None and key.group(1) not in keys else []
        if exc.__cause__ is None:
            break
        exc = exc.__cause__
    reason = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, OWN_ERRORS):
        return reason
    key = ".".join(keys)
    flagged = aliases.name_the_flag(f"{key}: {reason}" if key else reason, given or {})
    return flagged if flagged.startswith("-") or not key else f'Parser key "{key}": {reason}'


def build_cli(args: list[str]) -> QGTrainCLI:
    """Parse ``args`` over the default config file; model, data and trainer built, nothing fitted."""
    return QGTrainCLI(
        AdversarialTraining,
        VisionDataModule,
        subclass_mode_data=True,
        run=False,
        args=args,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": PROG, "add_help": False, "exit_on_error": False, "default_config_files": [str(aliases.default_config())], "epilog": EXIT_STATUSES},
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``train.py``; returns the exit status (:data:`~qgtrain.cli.EXIT_STATUSES`)."""
    console.configure_logging()  # our lines each on their own line, under the progress bar too
    argv = list(sys.argv[1:] if argv is None else argv)
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")
    # "Seed set to N" would come before a start-up error's one line; the seed is in config.yaml.
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)
    try:
        cli = build_cli(argv)
        cli.check_before_fit()
    except (Exception, KeyboardInterrupt) as exc:
        wrong, failed = (*OWN_ERRORS, OutputFolderError), (DataError, CheckpointError)
        return report_failure(PROG, exc, wrong, failed, "interrupted before training started; nothing was saved", one_line)
    folder, trainer, interrupt = Path(cli.config.checkpoint.dirpath), cli.trainer, cli.interrupt
    log.info("run %s: checkpoints in %s", cli.run_name, folder)
    if cli.start.resume_path is not None:
        console.expect_existing_checkpoints(str(folder))
    lock = checkpoints.RunLock(folder)
    try:
        if trainer.global_rank == 0:  # DDP: the other ranks write nothing of their own here
            lock.acquire()
        trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.start.resume_path)
    except (DataError, NonFiniteLossError, CheckpointError, checkpoints.RunFolderBusyError) as exc:
        console.write_after_fit(trainer, f"{PROG}: error: {one_line(exc)}")
        return 1
    except OSError as exc:  # a full disk, a permission: the path and the cause, no traceback
        found = checkpoints.furthest_resumable(folder)
        last = f"the last good checkpoint is {found}" if found is not None else "no checkpoint was written yet"
        console.write_after_fit(trainer, f"{PROG}: error: {environment_fault(exc)}; {last}")
        return 1
    except SystemExit:  # Lightning's exit after Ctrl-C, or its SIGTERMException
        if not interrupt.interrupted:
            raise
        script = sys.argv[0] if Path(sys.argv[0]).name == PROG else PROG
        command = checkpoints.resume_command(script, argv, interrupt.saved_path or "last")
        console.write_after_fit(trainer, f"{PROG}: {interrupt.message(command)}")
        return interrupt.exit_status
    finally:
        lock.release()
    if trainer.is_global_zero and not trainer.interrupted:
        robustness = next((c for c in trainer.callbacks if isinstance(c, RobustnessEvaluation) and c.enabled), None)
        monitor = robustness.describe(trainer) if robustness is not None and getattr(trainer.checkpoint_callback, "monitor", None) == WORST_ACC else None
        sys.stdout.write(run_summary(trainer, cli.run_name, folder, monitor) + "\n")
    return 0
