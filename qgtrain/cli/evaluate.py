"""``evaluate.py``: a checkpoint's robust accuracy, by the ``standard`` suite or the ``paper`` protocol.

``python evaluate.py --ckpt checkpoints/run/best.ckpt`` runs the AutoAttack-strength suite (APGD-CE,
APGD-T, Square, with early exit) plus PQGD and BLOB_QG rows; ``--protocol paper --attacks pgd,pqgd
--b 100,200 --runs 5`` the paper's Tables 2-6 protocol. Writes ``results/<name>/results.json``,
``results.md``, ``correctness.npz`` (per example) and PNG plots, and prints a summary table.
See docs/EVALUATION.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn

from qgtrain.attacks import ATTACK_LOSSES, attack_class, available_attacks
from qgtrain.cli import UsageError, exit_usage
from qgtrain.data import DATAMODULES, DataError, resolve_data_dir, test_split
from qgtrain.evaluation.checkpoints import CheckpointError, load_model_from_checkpoint
from qgtrain.evaluation.protocol import check_evaluation_attack
from qgtrain.evaluation.report import (
    default_result_name,
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

PROG = "evaluate.py"
Settings = ProtocolSettings | StandardSettings
log = logging.getLogger(__name__)


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad argument on one line (``evaluate.py: error: ...``), exit status 2."""

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
        argument_default=argparse.SUPPRESS,
    )
    add = p.add_argument
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--ckpt", default=None, help="a train.py checkpoint (.ckpt) or a plain state dict (.pt)"
    )
    source.add_argument(
        "--merge", nargs="+", default=None, metavar="NPZ", help="merge earlier correctness.npz per example"
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
    add("--n", type=COUNT, default=None, help="first n test examples (default: the whole test split)")
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
        help="results folder (default: from the checkpoint path); a taken one gets -v1, -v2, ...",
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
    settings.check()  # a one-line error now (e.g. torchattacks.<Class> without torchattacks)
    return settings


# ------------------------------------------------------------------------------------ entry point
def main(argv: list[str] | None = None) -> int:
    """Entry point of ``evaluate.py``; returns the exit status (0 ok, 1 bad file or data, 2 bad usage,
    130 interrupted: what was finished is written, marked partial)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    if args.merge:
        try:
            out_dir = result_folder(Path(args.out_dir), args.name or "merged", args.overwrite)
            print(write_merged(args.merge, out_dir))  # noqa: T201
        except ValueError as exc:
            sys.stderr.write(f"{PROG}: error: {exc}\n")
            return 1
        return 0
    try:
        try:
            device = resolve_device(args.device)
        except ValueError as exc:
            raise UsageError(f"argument --device: {exc}") from None
        net, info = load_model_from_checkpoint(Path(args.ckpt), args.model, args.dataset, args.model_kwargs)
        images, labels = test_split(info.dataset, args.data_dir)
        if args.n is not None and args.n > len(labels):
            raise UsageError(
                f"argument --n: {args.n} exceeds the {len(labels)} examples of the {info.dataset} test split"
            )
        settings = build_settings(args, DATASET_SPECS[info.dataset].num_classes)
    except UsageError as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return 2
    except (CheckpointError, DataError, ValueError) as exc:
        sys.stderr.write(f"{PROG}: error: {str(exc).splitlines()[0]}\n")
        return 1
    about = {
        "command": [PROG, *(sys.argv[1:] if argv is None else argv)],
        "config": {**vars(args), "sweep": [{"parameter": p, "values": v} for p, v in sweeps(args)]},
        "checkpoint": info.to_dict(),
        "data": dict(
            dataset=info.dataset,
            split="test",
            split_size=len(labels),
            n=len(labels[: args.n]),
            batch_size=args.batch_size,
            data_dir=str(resolve_data_dir(args.data_dir)),
        ),
    }
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        batches = TensorBatches(images[: args.n], labels[: args.n], args.batch_size)
        return _evaluate(args, net.to(device), batches, settings, device, about)
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted; nothing was written\n")
        return 130
    finally:
        torch.set_num_threads(threads)


def sweeps(args: argparse.Namespace) -> list[tuple[str, list[float | int]]]:
    """The ``--sweep`` options given (paper), in order."""
    return getattr(args, "sweep", [])


def log_estimate(seconds: float, examples: int) -> None:
    log.info(
        "estimate: the attacks take about %s (from the first %d examples, early exit)",
        format_duration(seconds),
        examples,
    )


def _evaluate(
    args: argparse.Namespace,
    net: nn.Module,
    batches: TensorBatches,
    settings: Settings,
    device: torch.device,
    about: dict[str, Any],
) -> int:
    """Attack, then write ``about`` (the command, config, checkpoint and data) with the results."""
    out_dir = result_folder(
        Path(args.out_dir), args.name or default_result_name(Path(args.ckpt)), args.overwrite
    )
    checkpoint = about["checkpoint"]
    log.info(
        "evaluating %s (%s on %s, %d test examples) on %s -> %s",
        *(args.ckpt, checkpoint["model"], checkpoint["dataset"], batches.num_examples, device, out_dir),
    )
    if not args.quiet:
        log.info(describe_plan(settings, net, batches, device, sweeps(args)))
    levels = settings.b_values if isinstance(settings, ProtocolSettings) else [settings.paper_b]
    histogram_b, masking = levels if args.histogram else None, not args.no_masking_checks
    with progress_bar(not args.quiet) as progress:
        record = run_evaluation(
            *(net, batches, settings, device, sweeps(args), histogram_b, masking, progress),
            on_estimate=None if args.quiet else log_estimate,
        )
    record.update(about, name=out_dir.name)
    try:
        paths = write_outputs(record, out_dir)
    except OSError as exc:
        sys.stderr.write(f"{PROG}: error: cannot write results to {out_dir}: {exc.strerror or exc}\n")
        return 1
    written = ", ".join(str(path) for path in paths.values())
    if record["results"]["partial"]:
        sys.stderr.write(f"{PROG}: interrupted; wrote what was finished, marked partial: {written}\n")
        return 130
    if not args.quiet:
        print(render_summary(record))  # noqa: T201
    print(f"wrote {written}")  # noqa: T201
    return 0
