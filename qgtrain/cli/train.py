"""``train.py``: LightningCLI over :class:`AdversarialTraining` with YAML configs and short flags; the
run's start-up steps are :mod:`qgtrain.run_setup`'s."""

from __future__ import annotations

import argparse
import difflib
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
from qgtrain.cli import EXIT_STATUSES, UsageError, aliases, environment_fault, report_failure, unknown_flag
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
OWN_ERRORS = (UsageError, checkpoints.ResumeError, run_setup.StartError)
"""Refusals written here, naming their flag already."""


def batches_or_fraction(value: Any) -> int | float | None:
    """A ``Trainer`` limit as typed: ``1`` is one batch (an int), ``1.0`` the whole epoch (a float),
    as Lightning documents. jsonargparse would read ``1`` as ``1.0``: its union ``int | float`` is
    ``typing``'s cached ``Union[float, int]``, which it tries in that order."""
    if isinstance(value, str):
        value = yaml.safe_load(value)
    if value is None or (isinstance(value, int | float) and not isinstance(value, bool)):
        return value
    raise ValueError(f"expected a batch count (int) or a fraction (float), got {value!r}")


class QGTrainCLI(LightningCLI):
    """LightningCLI with short flags (:mod:`~qgtrain.cli.aliases`), one-line refusals and the run's
    start-up steps (:mod:`qgtrain.run_setup`)."""

    start: run_setup.StartPoint

    @property
    def run_name(self) -> str:
        return self.start.run_name

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        """LightningCLI's parser with ``-h/--help`` that prints after the parse, so the short-flag
        table shows the values the command line resolves to."""
        parser = super().init_parser(**kwargs, add_help=False)
        parser.add_argument("-h", "--help", action=aliases.ConfigAction, apply=aliases.request_help, nargs=0, help="Show this help message and exit.")
        return parser

    def add_core_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """LightningCLI's trainer, model and data arguments, with :data:`BATCH_LIMITS` typed by
        :func:`batches_or_fraction` (an int stays an int)."""
        parser.add_class_arguments(
            self.trainer_class, "trainer", fail_untyped=False, instantiate=False, sub_configs=True,
            skip=set(BATCH_LIMITS),
        )  # fmt: skip
        defaults = inspect.signature(self.trainer_class.__init__).parameters
        for key in BATCH_LIMITS:
            parser.add_argument(
                f"--trainer.{key}", type=batches_or_fraction, default=defaults[key].default,
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
        """jsonargparse's one parse of the command line with each short flag as the long arguments it
        sets (:func:`~qgtrain.cli.aliases.expand`) and each ``alpha: null`` resolved last; a refusal
        is one line, and ``--help`` prints the short flags with their resolved values first."""
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
        """Lightning's start-up lines quiet unless ``--verbose``; then the run's start-up steps on the
        parsed config (:func:`~qgtrain.run_setup.prepare_run`), none of which writes anything."""
        console.quiet_other_libraries(verbose=self.config.verbose)
        aliases.refuse_arguments_without_an_attack(self.config, self.parser.short_flags_given)
        self.start = run_setup.prepare_run(self.config)

    def instantiate_classes(self) -> None:
        """LightningCLI's; a class refusing its arguments (``Attack.__init__``'s "eps must be in
        (0, 1]") is one line naming the flag that set them."""
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as exc:
            raise UsageError(one_line(exc, self.parser.short_flags_given)) from None

    def instantiate_trainer(self, **kwargs: Any):
        """Lightning's Trainer, which parses accelerator and devices (its refusals name both flags),
        with atomic checkpoint writes and the callbacks of every run."""
        devices = self.config.trainer.devices
        if not self.config.trainer.get("plugins"):
            kwargs.setdefault("plugins", [AtomicCheckpointIO()])
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, ValueError, TypeError) as exc:
            if not re.search(r"devices|accelerator|gpu|cuda", str(exc), re.IGNORECASE):
                raise UsageError(one_line(exc, self.parser.short_flags_given)) from None
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
    """Each ``--config FILE`` must be a readable YAML mapping: a malformed or empty file is one line
    naming it (jsonargparse's message names neither the file nor the line)."""
    argv = [str(a) for a in argv]
    files = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"] + [a[9:] for a in argv if a.startswith("--config=")]
    for path in (Path(name) for name in files if Path(name).is_file()):  # jsonargparse names a missing one
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
    if text.startswith("unrecognized arguments: "):
        valid = [f"--{key}" for key in parser.get_defaults().keys()] + [row.flag for row in aliases.SHORT_FLAGS]
        return unknown_flag(text.split(": ", 1)[1].split(), valid, PROG)
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
    close = difflib.get_close_matches(option, sorted(names), n=1, cutoff=0.6)
    return f"--{key}.init_args.{option} is not an argument of {cls}" + (f"; did you mean --{key}.init_args.{close[0]}?" if close else "")


def one_line(exc: BaseException, given: Mapping[str, str] | None = None) -> str:
    """One line for ``exc``: the innermost cause (jsonargparse wraps a class's own ``ValueError``,
    e.g. the attack's "eps must be in (0, 1]", in a multi-line "Does not validate" message),
    after the parser keys it passed through, with the short flag that set the key (``given``)."""
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
    if not keys:
        return aliases.name_the_flag(reason, given or {})
    flagged = aliases.name_the_flag(f"{'.'.join(keys)}: {reason}", given or {})
    return flagged if flagged.startswith("-") else f'Parser key "{".".join(keys)}": {reason}'


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
        parser_kwargs={"prog": PROG, "exit_on_error": False, "default_config_files": [str(aliases.default_config())], "epilog": EXIT_STATUSES},
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
        sys.stdout.write(run_summary(trainer, cli.run_name, folder) + "\n")
    return 0
