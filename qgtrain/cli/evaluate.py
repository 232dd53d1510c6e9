"""``evaluate.py``: a checkpoint's robust accuracy, by the ``standard`` suite or the ``paper`` protocol.

``python evaluate.py --ckpt checkpoints/run/best.ckpt`` runs the AutoAttack-strength suite (APGD-CE,
APGD-T, Square, with early exit) plus PQGD and BLOB_QG rows; ``--protocol paper --attacks pgd,pqgd
--b 100,200 --runs 5`` the paper's Tables 2-6 protocol. Writes ``results/<name>/results.json``,
``results.md``, ``correctness.npz`` (per example) and PNG plots, and prints a summary table.
See docs/EVALUATION.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn

from qgtrain.attacks import ATTACK_LOSSES, attack_class, available_attacks
from qgtrain.checkpoint_files import OutputFolderError, check_writable
from qgtrain.cli import EXIT_STATUSES, UsageError, environment_fault, exit_usage, unknown_flag
from qgtrain.data import DATAMODULES, DataError, resolve_data_dir, test_split
from qgtrain.evaluation.checkpoints import CheckpointError, load_model_from_checkpoint
from qgtrain.evaluation.protocol import check_evaluation_attack
from qgtrain.evaluation.report import (
    default_result_name,
    finished_result,
    first_difference,
    nothing_finished,
    partial_summary,
    progress_bar,
    render_summary,
    resolve_device,
    result_folder,
    run_evaluation,
    write_merged,
    write_outputs,
)
from qgtrain.evaluation.runner import (
    SWEEPABLE,
    ProtocolSettings,
    StandardSettings,
    TensorBatches,
    describe_plan,
    format_duration,
)
from qgtrain.models import DATASET_SPECS, available_models
from qgtrain.training.resume import check_run_name

PROG = "evaluate.py"
Settings = ProtocolSettings | StandardSettings
log = logging.getLogger(__name__)


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad argument on one line (``evaluate.py: error: ...``), exit status 2,
    and names the closest flag for an unknown one."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.flags: list[str] = []
        super().__init__(*args, **kwargs)

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        return self.known(super().add_argument(*args, **kwargs))

    def known(self, action: argparse.Action) -> argparse.Action:
        """Record ``action``'s flags (also of a group's arguments) for "did you mean"."""
        self.flags += action.option_strings
        return action

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> argparse.Namespace:  # type: ignore[override]
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            self.error(unknown_flag(unknown, self.flags, self.prog))
        return parsed

    def error(self, message: str) -> NoReturn:
        exit_usage(self.prog, message)


# ------------------------------------------------------------------------------------ value parsing
def checked(parse: Callable[[str], Any], allowed: Callable[[Any], bool], what: str) -> Callable[[str], Any]:
    """An argparse ``type``: ``parse`` the text, else (or when ``allowed`` is false) refuse it as
    ``must be <what>, got '<text>'``, which argparse prefixes with the argument's name."""

    def value(text: str) -> Any:
        try:
            parsed = parse(text.strip())
        except (ValueError, ZeroDivisionError):
            parsed = None
        if parsed is None or not allowed(parsed):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return parsed

    return value


def number(text: str) -> float:
    """A float, also written as a fraction (``8/255``)."""
    return float(Fraction(text))


RADIUS = checked(number, lambda v: 0 < v <= 1, "a number in (0, 1] (inputs are in [0, 1])")
STEP_SIZE = checked(number, lambda v: v > 0, "a number > 0")
COUNT = checked(int, lambda v: v >= 1, "an integer >= 1")


def index_range(text: str) -> tuple[int, int]:
    """``START:STOP`` -> ``(START, STOP)``."""
    start, stop = text.split(":")
    return int(start), int(stop)


RANGE = checked(index_range, lambda r: 0 <= r[0] < r[1], "START:STOP with 0 <= START < STOP (test indices)")
B_LIST = checked(
    lambda t: [int(v) for v in t.split(",") if v.strip()],
    lambda values: bool(values) and min(values) >= 1,
    "a comma-separated list of integers >= 1 (b=1 is the sign)",
)
JSON_OBJECT = checked(json.loads, lambda v: isinstance(v, dict), "a JSON object such as '{\"width\": 8}'")
SWEEP_VALUES = {"eps": RADIUS, "steps": COUNT, "b": COUNT}
PAPER, STANDARD = ProtocolSettings(), StandardSettings()
"""The settings' defaults, shown by ``--help``: options left out take them (one home per default)."""
PAPER_ONLY = ("runs", "restarts", "sweep", "loss")
STANDARD_ONLY = ("suite", "targets", "queries", "apgd_b")
PAPER_FIELDS = {"attacks": "attacks", "eps": "eps", "alpha": "alpha", "steps": "steps", "b": "b_values"}
PAPER_FIELDS |= {"restarts": "restarts", "runs": "runs", "loss": "loss", "seed": "seed"}
STANDARD_FIELDS = {"eps": "eps", "suite": "suite_attacks", "steps": "steps", "targets": "targets"}
STANDARD_FIELDS |= {"queries": "queries", "apgd_b": "b", "attacks": "paper_rows", "alpha": "paper_alpha"}
STANDARD_FIELDS |= {"seed": "seed"}
"""Option -> settings field; ``--steps`` also sets the paper rows' steps and ``--b`` their b."""


def names(values: list[Any]) -> str:
    return ",".join(str(v) for v in values)


def parse_suite(text: str) -> list[str]:
    """Comma-separated names; :meth:`StandardSettings.suite` checks them, where they are used."""
    return [n.strip() for n in text.split(",") if n.strip()]


def parse_attacks(text: str) -> list[str]:
    """Registered names or ``torchattacks.<Class>``, each an attack that stays in the threat model;
    ``none``: no attack (the standard suite alone)."""
    if text.strip() == "none":
        return []
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    try:
        for name in names or [text]:
            check_evaluation_attack(attack_class(name))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return names


def parse_sweep(text: str) -> tuple[str, list[float | int]]:
    """``eps=0.1,0.2`` -> ``("eps", [0.1, 0.2])``."""
    parameter, _, values = (part.strip() for part in text.partition("="))
    if parameter not in SWEEP_VALUES or not values:
        raise argparse.ArgumentTypeError(
            f"must be PARAM=V1,V2,... with PARAM one of {', '.join(SWEEPABLE)}, got {text!r}"
        )
    try:
        parsed = [SWEEP_VALUES[parameter](v) for v in values.split(",") if v.strip()]
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{parameter} values {exc}") from None
    return parameter, list(dict.fromkeys(parsed))


def build_parser() -> OneLineParser:
    """Options the settings define default to nothing (absent from the namespace), so the settings'
    own defaults apply; ``--help`` states each default once, read from them."""
    p = OneLineParser(
        prog=PROG,
        description="A checkpoint's robust accuracy. By default (--protocol standard) AutoAttack's suite, "
        f"{' -> '.join(STANDARD.suite_attacks)}, each attack on the examples still robust (early exit), "
        "with PQGD and BLOB_QG rows beside it; --protocol paper runs the paper's protocol (independent "
        "runs, restarts merged per example, Worst/Avg, sweeps). Writes results.json, results.md, "
        "correctness.npz and PNG plots to OUT_DIR/NAME (docs/EVALUATION.md).",
        epilog=EXIT_STATUSES,
        argument_default=argparse.SUPPRESS,
    )
    add = p.add_argument
    source = p.add_mutually_exclusive_group(required=True)
    p.known(
        source.add_argument(
            "--ckpt", default=None, help="a train.py checkpoint (.ckpt) or a plain state dict (.pt)"
        )
    )
    p.known(
        source.add_argument(
            "--merge",
            nargs="+",
            default=None,
            metavar="RESULT",
            help="merge earlier results (folders, or the correctness.npz in them) per example, by test "
            "index: chunks of one evaluation (--range) into the whole set, other evaluations of the "
            "same checkpoint as the per-example worst case",
        )
    )
    add(
        "--protocol",
        choices=["standard", "paper"],
        default="standard",
        help="standard (default): AutoAttack's suite, early exit, plus the paper rows; paper: the paper's "
        "Table 2 protocol (--runs, --restarts, --sweep)",
    )
    add("--model", default=None, choices=available_models(), help="architecture of a plain state dict")
    add("--model-kwargs", type=JSON_OBJECT, default={}, help="constructor arguments of --model as JSON")
    add(
        "--weights",
        choices=["averaged", "raw"],
        default="averaged",
        help="of a checkpoint trained with --ema: the averaged weights (default) or the trained ones",
    )
    add(
        "--dataset",
        default=None,
        choices=list(DATAMODULES),
        help="default: the checkpoint's (else the model's)",
    )
    add("--data-dir", default=None, help="dataset root (default: $QGTRAIN_DATA, else ./data)")
    add(
        "--attacks",
        type=parse_attacks,
        help=f"comma-separated, from {', '.join(available_attacks())} or torchattacks.<Class>: standard's "
        "rows beside the suite (none: the suite alone), or paper's attacks (default: "
        f"{names(STANDARD.paper_rows)} for standard, {names(PAPER.attacks)} for paper)",
    )
    add(
        "--suite",
        type=parse_suite,
        help=f"standard: AutoAttack's attacks to run, in the order given (default: {names(STANDARD.suite_attacks)})",
    )
    add("--eps", type=RADIUS, help=f"L-inf radius; 8/255 works (default: {STANDARD.eps:g})")
    add(
        "--alpha",
        type=STEP_SIZE,
        help=f"step size of the paper's attacks (default: {PAPER.alpha:g}; standard rows: {STANDARD.paper_alpha:g})",
    )
    add(
        "--b",
        type=B_LIST,
        help="quantization levels: one row per b for quantized attacks; standard's rows take the first "
        f"(default: {STANDARD.paper_b} for standard, {names(PAPER.b_values)} for paper)",
    )
    add(
        "--steps",
        type=COUNT,
        help=f"iterations per run (default: {STANDARD.steps} for standard, suite and rows; {PAPER.steps} for paper)",
    )
    add(
        "--restarts",
        type=COUNT,
        help=f"paper: random restarts per run, merged per example (default: {PAPER.restarts})",
    )
    add("--runs", type=COUNT, help=f"paper: independent runs (default: {PAPER.runs})")
    add(
        "--targets",
        type=COUNT,
        help=f"standard: APGD-T's and FAB-T's target classes (default: {STANDARD.targets})",
    )
    add("--queries", type=COUNT, help=f"standard: Square's queries (default: {STANDARD.queries})")
    add(
        "--apgd-b",
        type=COUNT,
        help=f"standard: APGD's quantization level, 1 is the sign (default: {STANDARD.b})",
    )
    examples = p.add_mutually_exclusive_group()
    p.known(
        examples.add_argument(
            "--n", type=COUNT, default=None, help="first n test examples (default: the whole test split)"
        )
    )
    p.known(
        examples.add_argument(
            "--range",
            type=RANGE,
            default=None,
            metavar="START:STOP",
            help="the test examples START..STOP-1, a chunk of a longer evaluation: NAME gets _START-STOP, "
            "correctness.npz the true indices; START a multiple of --batch-size (--merge joins the chunks)",
        )
    )
    add(
        "--skip-done",
        action="store_true",
        default=False,
        help="exit at once (status 0) when OUT_DIR/NAME already holds this finished evaluation (its "
        "results.json): a loop over chunks resumes where it stopped",
    )
    add(
        "--batch-size",
        type=COUNT,
        default=200,
        help="attack batch size; BLOB's particles are the batch (default: 200)",
    )
    add("--loss", choices=sorted(ATTACK_LOSSES), help=f"paper: attack loss (default: {PAPER.loss})")
    add("--seed", type=int, help=f"run r uses seed + r (default: {PAPER.seed})")
    sweep_help = "paper: sweep eps, steps or b (repeatable), e.g. eps=0.1,0.2,0.3; writes sweep_PARAM.png"
    add("--sweep", type=parse_sweep, action="append", metavar="PARAM=V1,...", help=sweep_help)
    add(
        "--histogram",
        action="store_true",
        default=False,
        help="save Figure 2's gradient histograms of the first batch",
    )
    add("--no-masking-checks", action="store_true", default=False, help="skip the gradient-masking checks")
    add("--device", default="auto", help="auto (CUDA when present; the default), cpu, cuda, cuda:N")
    add(
        "--threads",
        type=COUNT,
        default=None,
        help="CPU threads for torch (default: torch's); 1 is fastest when busy",
    )
    add("--out-dir", default="results", help="outputs go to OUT_DIR/NAME/ (default: results)")
    add(
        "--name",
        default=None,
        help="results folder (default: from the checkpoint path); a taken one gets -v1, -v2, ...; an "
        "interrupted run writes what it finished to NAME-partial",
    )
    add(
        "--overwrite",
        action="store_true",
        default=False,
        help="write into OUT_DIR/NAME even if it has results",
    )
    add(
        "--quiet",
        action="store_true",
        default=False,
        help="no progress bar (on stderr), no plan, no summary table",
    )
    return p


def build_settings(args: argparse.Namespace, num_classes: int) -> Settings:
    """The protocol's settings from the options given (the rest take the settings' defaults), their
    attacks built once; options of the other protocol are refused."""
    options = vars(args)
    paper = args.protocol == "paper"
    other = [name for name in (STANDARD_ONLY if paper else PAPER_ONLY) if name in options]
    if other:
        flag = "--" + other[0].replace("_", "-")
        if paper:
            raise UsageError(f"argument {flag}: applies to --protocol standard (the default)")
        raise UsageError(
            f"argument {flag}: applies to --protocol paper (the suite runs once, its losses fixed)"
        )
    fields = PAPER_FIELDS if paper else STANDARD_FIELDS
    given = {fields[name]: value for name, value in options.items() if name in fields}
    if paper:
        if given.get("attacks") == []:
            raise UsageError(
                "argument --attacks: none applies to --protocol standard; name the paper's attacks"
            )
        settings: Settings = ProtocolSettings(**given)
    else:
        given |= {"paper_steps": args.steps} if "steps" in options else {}
        given |= {"paper_b": args.b[0]} if "b" in options else {}
        settings = StandardSettings(**given, num_classes=num_classes)
        try:
            settings.suite()
        except ValueError as exc:
            raise UsageError(f"argument --suite: {exc}") from None
    try:
        settings.check()  # a one-line error now (e.g. torchattacks.<Class> without torchattacks)
    except ValueError as exc:
        raise UsageError(f"argument --attacks: {str(exc).splitlines()[0]}") from None
    return settings


# ------------------------------------------------------------------------------------ entry point
class Interrupt:
    """Which signal stopped the evaluation: Ctrl-C (SIGINT), or SIGTERM turned into the same
    ``KeyboardInterrupt`` by :func:`sigterm_as_ctrl_c`; the exit status is 128 + its number."""

    signum: int = signal.SIGINT

    @property
    def name(self) -> str:
        return "SIGTERM" if self.signum == signal.SIGTERM else "Ctrl-C"

    @property
    def exit_status(self) -> int:
        return 128 + int(self.signum)


@contextlib.contextmanager
def sigterm_as_ctrl_c() -> Iterator[Interrupt]:
    """While inside, SIGTERM (a scheduler's or ``kill``'s stop) raises ``KeyboardInterrupt`` as Ctrl-C
    does, so an evaluation stopped either way writes what it finished; the handler is restored after."""
    interrupt = Interrupt()

    def stop(signum: int, frame: Any) -> None:
        interrupt.signum = signum
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: signals stay as they are
        yield interrupt
        return
    try:
        yield interrupt
    finally:
        signal.signal(signal.SIGTERM, previous)


def selection(args: argparse.Namespace, dataset: str, split_size: int) -> tuple[int, int]:
    """The test indices ``START, STOP`` to evaluate: ``--range``, ``--n`` (``0:N``), else the split."""
    if args.range is None and args.n is None:
        return 0, split_size
    flag, (start, stop) = ("--range", args.range) if args.range is not None else ("--n", (0, args.n))
    if stop > split_size:
        raise UsageError(
            f"argument {flag}: {stop} exceeds the {split_size} examples of the {dataset} test split"
        )
    if start % args.batch_size:
        raise UsageError(
            f"argument --range: START {start} is not a multiple of --batch-size {args.batch_size}; a chunk "
            "starts at a batch of the whole set, so that it draws that batch's random stream"
        )
    return start, stop


def result_name(args: argparse.Namespace, start: int, stop: int) -> str:
    """``--name`` (default: from the checkpoint path), with ``_START-STOP`` for a ``--range`` chunk."""
    name = args.name or default_result_name(Path(args.ckpt))
    return f"{name}_{start}-{stop}" if args.range is not None else name


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``evaluate.py``; returns the exit status (:data:`~qgtrain.cli.EXIT_STATUSES`:
    0 done, 2 a wrong command, 1 a failure while running, 130/143 interrupted)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        check_output_arguments(args)
    except ValueError as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return 2
    if args.merge:
        try:
            out_dir = result_folder(Path(args.out_dir), args.name or "merged", args.overwrite)
            check_writable(out_dir, "results")
            print(write_merged(args.merge, out_dir))  # noqa: T201
        except OutputFolderError as exc:
            sys.stderr.write(f"{PROG}: error: {exc}\n")
            return 2
        except ValueError as exc:
            sys.stderr.write(f"{PROG}: error: argument --merge: {exc}\n")
            return 2
        except OSError as exc:
            return environment_error(exc)
        return 0
    try:
        try:
            device = resolve_device(args.device)
        except ValueError as exc:
            raise UsageError(f"argument --device: {exc}") from None
        try:
            net, info = load_model_from_checkpoint(
                Path(args.ckpt), args.model, args.dataset, args.model_kwargs, args.weights
            )
        except CheckpointError as exc:
            raise UsageError(f"argument --ckpt: {str(exc).splitlines()[0]}") from None
        images, labels = test_split(info.dataset, args.data_dir)
        start, stop = selection(args, info.dataset, len(labels))
        settings = build_settings(args, DATASET_SPECS[info.dataset].num_classes)
    except UsageError as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return 2
    except DataError as exc:
        sys.stderr.write(f"{PROG}: error: {str(exc).splitlines()[0]}\n")
        return 1
    except OSError as exc:  # a data or checkpoint file the user cannot read
        return environment_error(exc)
    about = {
        "command": [PROG, *(sys.argv[1:] if argv is None else argv)],
        "config": {**vars(args), "sweep": [{"parameter": p, "values": v} for p, v in sweeps(args)]},
        "checkpoint": info.to_dict(),
        "data": dict(
            dataset=info.dataset,
            split="test",
            split_size=len(labels),
            n=stop - start,
            range=[start, stop],
            batch_size=args.batch_size,
            data_dir=str(resolve_data_dir(args.data_dir)),
        ),
    }
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        batches = TensorBatches(images[start:stop], labels[start:stop], args.batch_size, start)
        return _evaluate(args, net.to(device), batches, settings, device, about)
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted before any attack ran; nothing was written\n")
        return Interrupt().exit_status
    except (UsageError, OutputFolderError) as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return 2
    finally:
        torch.set_num_threads(threads)


def check_output_arguments(args: argparse.Namespace) -> None:
    """``--name`` is one folder name and ``--out-dir`` is not a file; else a one-line ``ValueError``."""
    if args.name is not None:
        check_run_name(args.name, "argument --name")
    if Path(args.out_dir).exists() and not Path(args.out_dir).is_dir():
        raise UsageError(f"argument --out-dir: {args.out_dir} is a file; name a folder (made when missing)")


def environment_error(exc: OSError) -> int:
    """A fault of the machine or of a path the user gave (a permission, a missing file): one line
    naming the path and the cause, exit status 1; an ``OSError`` without an errno is re-raised."""
    fault = environment_fault(exc)
    if fault is None:
        raise exc
    sys.stderr.write(f"{PROG}: error: {fault}\n")
    return 1


def sweeps(args: argparse.Namespace) -> list[tuple[str, list[float | int]]]:
    """The ``--sweep`` options given (paper), in order."""
    return getattr(args, "sweep", [])


def log_estimate(seconds: float, examples: int) -> None:
    log.info(
        "estimate: the attacks take about %s (from the first %d examples, early exit)",
        format_duration(seconds),
        examples,
    )


def already_done(folder: Path, settings: Settings, about: dict[str, Any]) -> bool:
    """``--skip-done``: whether ``folder`` holds this finished evaluation (same settings, checkpoint
    and examples); a finished one of something else is a UsageError (a script would skip it wrongly)."""
    record = finished_result(folder)
    if record is None:
        return False
    this = {
        "settings": json.loads(json.dumps(settings.to_dict())),
        "checkpoint": about["checkpoint"].get("sha256"),
        "examples": about["data"]["range"],
    }
    there = {
        "settings": record["results"]["settings"],
        "checkpoint": (record.get("checkpoint") or {}).get("sha256"),
        "examples": (record.get("data") or {}).get("range"),
    }
    if this != there:
        raise UsageError(
            f"argument --skip-done: {folder} holds a finished evaluation of something else "
            f"({first_difference(there, this)}); pass another --name or --out-dir"
        )
    return True


def _evaluate(
    args: argparse.Namespace,
    net: nn.Module,
    batches: TensorBatches,
    settings: Settings,
    device: torch.device,
    about: dict[str, Any],
) -> int:
    """Attack, then write ``about`` (the command, config, checkpoint and data) with the results.
    Interrupted, what was finished goes to ``NAME-partial`` (replacing an earlier partial result), so a
    later run takes NAME; when nothing was finished, nothing is written."""
    start, stop = about["data"]["range"]
    name = result_name(args, start, stop)
    if args.skip_done and already_done(Path(args.out_dir) / name, settings, about):
        print(f"{PROG}: {Path(args.out_dir) / name} already holds this evaluation; skipped (--skip-done)")  # noqa: T201
        return 0
    out_dir = result_folder(Path(args.out_dir), name, args.overwrite)
    check_writable(out_dir, "results")  # now, not after the attacks
    checkpoint = about["checkpoint"]
    log.info(
        "evaluating %s (%s on %s, %d test examples) on %s -> %s",
        *(args.ckpt, checkpoint["model"], checkpoint["dataset"], batches.num_examples, device, out_dir),
    )
    if not args.quiet:
        log.info(describe_plan(settings, net, batches, device, sweeps(args)))
    levels = settings.b_values if isinstance(settings, ProtocolSettings) else [settings.paper_b]
    histogram_b, masking = levels if args.histogram else None, not args.no_masking_checks
    with sigterm_as_ctrl_c() as interrupt, progress_bar(not args.quiet) as progress:
        record = run_evaluation(
            *(net, batches, settings, device, sweeps(args), histogram_b, masking, progress),
            on_estimate=None if args.quiet else log_estimate,
        )
    results = record["results"]
    if results["partial"]:
        if nothing_finished(results):
            sys.stderr.write(
                f"{PROG}: interrupted ({interrupt.name}) after {record['wall_seconds']:.0f} s, before any "
                "attack finished a batch; nothing was finished, nothing written\n"
            )
            return interrupt.exit_status
        out_dir = out_dir.with_name(f"{out_dir.name}-partial")
    record.update(about, name=out_dir.name)
    try:
        paths = write_outputs(record, out_dir)
    except OSError as exc:
        sys.stderr.write(f"{PROG}: error: cannot write results to {out_dir}: {exc.strerror or exc}\n")
        return 1
    written = ", ".join(str(path) for path in paths.values())
    if results["partial"]:
        sys.stderr.write(
            f"{PROG}: {partial_summary(results).replace('interrupted', f'interrupted ({interrupt.name})', 1)}; "
            f"wrote it, marked partial: {written}\n"
        )
        return interrupt.exit_status
    if not args.quiet:
        print(render_summary(record))  # noqa: T201
    print(f"wrote {written}")  # noqa: T201
    return 0
