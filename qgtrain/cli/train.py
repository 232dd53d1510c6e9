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

import yaml
from jsonargparse import Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.callbacks import ModelCheckpoint, WeightAveraging
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from qgtrain.attacks import ATTACKS
from qgtrain.callbacks import AttackVisualization, RobustnessEvaluation
from qgtrain.callbacks.robustness import WORST_ACC
from qgtrain.callbacks.run_eta import RunEstimate
from qgtrain.checkpoint_files import OutputFolderError, check_writable
from qgtrain.cli import EXIT_STATUSES, UsageError, console, environment_fault, exit_usage, report_bug
from qgtrain.cli.aliases import (
    RESOLVE_STEP_SIZE,
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
from qgtrain.training.weight_averaging import DEFAULT_EMA_DECAY, ExponentialMovingAverage

log = logging.getLogger(__name__)
PROG = "train.py"
BATCH_LIMITS = (
    "limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches",
    "val_check_interval", "overfit_batches",
)  # fmt: skip
"""Lightning's ``int | float`` Trainer arguments: a whole number counts batches, a float is a fraction."""


def batches_or_fraction(value: Any) -> int | float | None:
    """A ``Trainer`` limit as typed: ``1`` is one batch (an int), ``1.0`` the whole epoch (a float),
    as Lightning documents. jsonargparse would read ``1`` as ``1.0``: its union ``int | float`` is
    ``typing``'s cached ``Union[float, int]``, which it tries in that order."""
    if isinstance(value, str):
        value = yaml.safe_load(value)
    if value is None or (isinstance(value, int | float) and not isinstance(value, bool)):
        return value
    raise ValueError(f"expected a batch count (int) or a fraction (float), got {value!r}")


REGISTRIES = {"model.inner": ATTACKS, "model.val_attack": ATTACKS, "model.net": MODELS, "data": DATAMODULES}
"""The classes a subclass-typed key can take: their arguments are the candidates for a typo."""


def default_run_name(config: Namespace) -> str:
    """:func:`~qgtrain.training.resume.run_name` of the parsed config; the model is its registry name."""
    net_cls = locate(config.model.net.class_path)
    model = next((name for name, cls in MODELS.items() if cls is net_cls), net_cls.__name__.lower())
    data_cls = locate(config.data.class_path)
    dataset = getattr(data_cls, "name", data_cls.__name__.lower())
    inner, method = config.model.inner, config.model
    weights = {"awp_gamma": method.get("awp_gamma") or 0.0, "ema": bool(config.get("ema"))}
    if inner is None:
        return resume.run_name(dataset, model, None, **weights)
    args, inner_cls = inner.init_args, locate(inner.class_path)
    b = args.get("b", 1) if "b" in inner_cls.constructor_defaults() else None  # RGD, FAB-T, Square: none
    return resume.run_name(
        *(dataset, model, inner_cls.name, args.steps, b),
        replays=args.get("replays"),
        atta=bool(method.get("atta")),
        objective=method.get("objective", "madry"),
        **weights,
    )


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
        parser.add_lightning_class_args(self._model_class, "model", subclass_mode=self.subclass_mode_model)
        parser.add_lightning_class_args(self._datamodule_class, "data", subclass_mode=self.subclass_mode_data)

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
        check_config_files(args)
        if isinstance(args, list):  # each alpha: null becomes its class's number once every flag is applied
            args = [*args, RESOLVE_STEP_SIZE]
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
        console.quiet_other_libraries(verbose=self.config.verbose)  # before the Trainer's start-up lines
        self._refuse_classless_attacks()
        self._refuse_partial_free_epochs()
        self._refuse_average_settings_without_ema()
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
        if config.run_name is not None:
            try:
                resume.check_run_name(config.run_name)
            except ValueError as exc:
                raise UsageError(str(exc)) from None
        if config.resume_override and not config.resume:
            raise UsageError("--resume-override changes what --resume continues; add --resume")
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

    def _refuse_average_settings_without_ema(self) -> None:
        config = self.config
        if not config.ema and (config.ema_decay != DEFAULT_EMA_DECAY or config.ema_start_step != 0):
            raise UsageError("--ema-decay and --ema-start-step shape the average --ema turns on; add --ema")

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
        config = self.config
        if config.ema:  # first: each step's update precedes step.ckpt, its swap-back interrupted.ckpt
            try:
                ema = ExponentialMovingAverage(config.ema_decay, config.ema_start_step)
            except ValueError as exc:  # its own check of the two values: name the flag as typed
                raise UsageError(f"--{str(exc).replace('_', '-')}") from None
            trainer.callbacks.insert(0, ema)
        for callback in trainer.checkpoint_callbacks:
            if callback.save_last is True and not isinstance(callback, LastCheckpoint):
                callback.save_last = False  # stale after epochs without improvement (Lightning 2.6)
                trainer.callbacks.append(LastCheckpoint(callback.dirpath))  # last.ckpt every epoch
        if config.ckpt_every_steps or config.ckpt_every_minutes:  # step.ckpt inside an epoch
            try:
                step = StepCheckpoint(
                    config.checkpoint.dirpath, config.ckpt_every_steps, config.ckpt_every_minutes
                )
            except ValueError as exc:  # its own check of the two values: name the flag as typed
                raise UsageError(f"--{str(exc).replace('_', '-')}") from None
            trainer.callbacks.append(step)
        trainer.callbacks.append(resume.RestoreLoaderState())  # the data loader's position on resume
        self.weights_origin = resume.WeightsOrigin()  # what --resume-override continued
        trainer.callbacks.append(self.weights_origin)
        self.interrupt = InterruptCheckpoint(config.checkpoint.dirpath)
        trainer.callbacks.append(self.interrupt)  # Ctrl-C, SIGTERM, SIGUSR1 save interrupted.ckpt
        trainer.callbacks.append(RunEstimate())  # the whole run's time, once measured and after each epoch
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
            optimizer = self.model.optimizer_factory(self.model.parameters())
        except (ValueError, TypeError) as exc:
            raise UsageError(f"model.optimizer (--lr): {_one_line(exc)}") from None
        checkpoint = self.resume_checkpoint
        if checkpoint is not None:
            averaging = any(isinstance(callback, WeightAveraging) for callback in self.trainer.callbacks)
            resume.check_resume_compatible(
                checkpoint, self.resume_path, self.model, self.trainer.world_size, averaging
            )
            this_run = resume.run_record(self.model, getattr(self.datamodule, "name", None), optimizer)
            changed = resume.check_run_record(
                checkpoint, self.resume_path, this_run, optimizer, self.config.resume_override
            )
            if changed:
                log.warning(
                    "--resume-override: continuing %s with %s", self.resume_path,
                    ", ".join(f"{key} {new} (recorded: {old})" for key, old, new in changed),
                )  # fmt: skip
                self.weights_origin.continue_changed(self.resume_path, changed)
            epoch, step = resume.resumes_at(checkpoint)
            log.info("resuming from %s: epoch %d, step %d", self.resume_path, epoch, step)
            self.resume_checkpoint = None  # Lightning reads the file again; do not hold two copies


def check_config_files(args: Any) -> None:
    """Each ``--config FILE`` must be a readable YAML mapping: a malformed or empty file is one line
    naming it (jsonargparse's message names neither the file nor the line)."""
    argv = [str(a) for a in args] if isinstance(args, list | tuple) else []
    files = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]
    files += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    for name in files:
        path = Path(name)
        if not path.is_file():
            continue  # jsonargparse's own refusal names it
        try:
            content = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" (line {mark.line + 1})" if mark is not None else ""
            problem = getattr(exc, "problem", None) or type(exc).__name__
            raise UsageError(f"--config {path}: not valid YAML{where}: {problem}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"--config {path}: cannot read it: {getattr(exc, 'strerror', None) or exc}") from None
        if not isinstance(content, dict):
            kind = "empty" if content is None else f"a {type(content).__name__}, not a mapping of keys"
            raise UsageError(f"--config {path}: the file is {kind}; a config sets keys, e.g. 'trainer: ...'")


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
        parser_kwargs={"prog": PROG, "exit_on_error": False, "default_config_files": [str(default_config())], "epilog": EXIT_STATUSES},
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``train.py``; returns the exit status (2: usage, 1: data, files or a bug)."""
    console.configure_logging()  # our lines each on their own line, under the progress bar too
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
    except Exception as exc:  # an environment fault is the user's to fix; anything else is a bug
        fault = environment_fault(exc)
        if fault is None:
            return report_bug(PROG)
        sys.stderr.write(f"{PROG}: error: {fault}\n")
        return 1
    log.info("run %s: checkpoints in %s", cli.run_name, cli.config.checkpoint.dirpath)
    if cli.resume_path is not None:
        console.expect_existing_checkpoints(cli.config.checkpoint.dirpath)
    lock = resume.RunLock(Path(cli.config.checkpoint.dirpath))
    try:
        if cli.trainer.global_rank == 0:  # DDP: the other ranks write nothing of their own here
            lock.acquire()
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.resume_path)
    except (DataError, NonFiniteLossError, CheckpointError, resume.RunFolderBusyError) as exc:
        console.write_after_fit(cli.trainer, f"{PROG}: error: {_one_line(exc)}")
        return 1
    except OSError as exc:  # a full disk, a permission: the path and the cause, no traceback
        console.write_after_fit(cli.trainer, f"{PROG}: error: {environment_fault(exc)}; {_last_good(cli)}")
        return 1
    except SystemExit:  # Lightning's exit after Ctrl-C, or its SIGTERMException
        interrupt = cli.interrupt
        if not interrupt.interrupted:
            raise
        script = sys.argv[0] if Path(sys.argv[0]).name == PROG else PROG
        command = resume.resume_command(script, argv, interrupt.saved_path or "last")
        console.write_after_fit(cli.trainer, f"{PROG}: {interrupt.message(command)}")
        return interrupt.exit_status
    finally:
        lock.release()
    if cli.trainer.is_global_zero and not cli.trainer.interrupted:
        sys.stdout.write(run_summary(cli.trainer, cli.run_name, Path(cli.config.checkpoint.dirpath)) + "\n")
    return 0


def _last_good(cli: QGTrainCLI) -> str:
    found = resume.furthest_resumable(Path(cli.config.checkpoint.dirpath))
    return f"the last good checkpoint is {found}" if found is not None else "no checkpoint was written yet"


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
