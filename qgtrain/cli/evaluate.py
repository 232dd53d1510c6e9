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
from fractions import Fraction
from pathlib import Path
from typing import Any, NoReturn

import torch

from qgtrain.attacks import ATTACK_LOSSES, available_attacks
from qgtrain.data import DATAMODULES, DataError, build_datamodule, resolve_data_dir
from qgtrain.evaluation.checkpoints import CheckpointError, CheckpointInfo, load_model_from_checkpoint
from qgtrain.evaluation.report import (
    default_result_name,
    render_summary,
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
)
from qgtrain.models import DATASET_SPECS, available_models

PROG = "evaluate.py"
log = logging.getLogger(__name__)


class UsageError(ValueError):
    """Bad command-line input (exit status 2)."""


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad argument on one line (``evaluate.py: error: ...``), exit status 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message.splitlines()[0]}\n")
        raise SystemExit(2)


# ------------------------------------------------------------------------------------ value parsing
def parse_number(text: str) -> float:
    """A float, also written as a fraction (``8/255``)."""
    try:
        return float(Fraction(text.strip())) if "/" in text else float(text)
    except (ValueError, ZeroDivisionError):
        raise UsageError(f"{text!r} is not a number") from None


def parse_eps(text: str) -> float:
    value = parse_number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1] (inputs are in [0, 1]), got {text}")
    return value


def parse_alpha(text: str) -> float:
    if not (value := parse_number(text)) > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def parse_positive_int(text: str) -> int:
    if not (text.strip().isdigit() and int(text) >= 1):
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return int(text)


def parse_b_list(text: str) -> list[int]:
    values = [v for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError("must be a comma-separated list of integers >= 1 (b=1 is the sign)")
    try:
        return [parse_positive_int(v.strip()) for v in values]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"must be a comma-separated list of integers >= 1 (b=1 is the sign), got {text!r}"
        ) from None


def _with_context(parser: Any, what: str):
    """Wrap a value parser so its message names what is being parsed."""

    def wrapped(text: str) -> Any:
        try:
            return parser(text)
        except (argparse.ArgumentTypeError, UsageError) as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    wrapped.__name__ = what
    return wrapped


def parse_attacks(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in available_attacks()]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown attack {unknown[0] if unknown else text!r}; choose from {', '.join(available_attacks())}"
        )
    return list(dict.fromkeys(names))


SWEEP_PARSERS = {"eps": parse_eps, "steps": parse_positive_int, "b": parse_positive_int}


def parse_sweep(text: str) -> tuple[str, list[float | int]]:
    """``eps=0.1,0.2`` -> ``("eps", [0.1, 0.2])``."""
    parameter, _, values = text.partition("=")
    parameter = parameter.strip()
    if parameter not in SWEEP_PARSERS or not values.strip():
        raise argparse.ArgumentTypeError(
            f"must be PARAM=V1,V2,... with PARAM one of {', '.join(SWEEPABLE)}, got {text!r}"
        )
    try:
        parsed = [SWEEP_PARSERS[parameter](v.strip()) for v in values.split(",") if v.strip()]
    except (argparse.ArgumentTypeError, UsageError) as exc:
        raise argparse.ArgumentTypeError(f"{parameter} values {exc}") from None
    return parameter, list(dict.fromkeys(parsed))


def parse_json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object such as '{{\"width\": 8}}', got {text!r}")
    return value


def build_parser() -> OneLineParser:
    p = OneLineParser(
        prog=PROG,
        description="Evaluate a checkpoint with the paper's protocol: independent runs, restarts merged per "
        "example, Worst/Avg per attack, per-example worst case over all attacks (docs/EVALUATION.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--ckpt", help="a train.py checkpoint (.ckpt) or a plain state dict (.pt)")
    p.add_argument(
        "--protocol",
        choices=["standard", "paper"],
        default="standard",
        help="standard: APGD-CE -> APGD-T -> Square (AutoAttack's suite, early exit) plus PQGD and BLOB_QG "
        "rows; paper: the paper's Table 2 protocol (--runs, --restarts, --sweep)",
    )
    p.add_argument("--model", choices=available_models(), help="architecture of a plain state dict")
    p.add_argument(
        "--model-kwargs",
        type=_with_context(parse_json_object, "JSON"),
        default={},
        help="extra constructor arguments of --model as JSON, e.g. '{\"width\": 8}'",
    )
    p.add_argument(
        "--dataset",
        choices=list(DATAMODULES),
        help="default: the checkpoint's dataset (else the model's default)",
    )
    p.add_argument("--data-dir", help="dataset root (default: $QGTRAIN_DATA, else ./data)")
    p.add_argument(
        "--attacks",
        type=_with_context(parse_attacks, "attacks"),
        default=None,
        help=f"comma-separated, from {', '.join(available_attacks())} or torchattacks.<Class> "
        "(default: pgd,pqgd,blob,blob_qg for paper; the pqgd,blob_qg rows beside the standard suite)",
    )
    p.add_argument(
        "--eps", type=_with_context(parse_eps, "eps"), default=0.3, help="L-inf radius (8/255 works)"
    )
    p.add_argument("--alpha", type=_with_context(parse_alpha, "alpha"), default=0.01, help="step size")
    p.add_argument(
        "--b",
        type=_with_context(parse_b_list, "b list"),
        default=[100, 200],
        help="quantization levels: one row per b for pqgd and blob_qg",
    )
    counts = (  # (flag, default, help): integers >= 1
        (
            "--steps",
            None,
            "iterations per run (default: 100 for standard, APGD's and the rows'; 200 for paper)",
        ),
        ("--restarts", None, "paper: random restarts per run, merged per example (default 50)"),
        ("--runs", None, "paper: independent runs (default 5)"),
        ("--targets", 9, "standard: APGD-T's target classes (AutoAttack: 9)"),
        ("--queries", 5000, "standard: Square's queries (AutoAttack: 5000)"),
        ("--apgd-b", 1, "standard: quantization level of APGD's direction (1 = the sign, AutoAttack)"),
        ("--n", None, "first n test examples (default: the full test split)"),
        ("--batch-size", 200, "attack batch size (BLOB's particles are the batch: results depend on it)"),
    )
    for flag, default, text in counts:
        p.add_argument(flag, type=_with_context(parse_positive_int, "integer"), default=default, help=text)
    p.add_argument(
        "--fab", action="store_true", help="standard: add FAB-T (torchattacks.FAB, needs the bench extra)"
    )
    p.add_argument("--loss", choices=sorted(ATTACK_LOSSES), default="ce", help="attack loss")
    p.add_argument("--seed", type=int, default=0, help="run r uses seed + r")
    p.add_argument(
        "--sweep",
        type=_with_context(parse_sweep, "sweep"),
        action="append",
        default=[],
        metavar="PARAM=V1,V2,...",
        help="sweep eps, steps or b (repeatable), e.g. eps=0.1,0.15,0.2,0.25,0.3; writes sweep_PARAM.png",
    )
    p.add_argument(
        "--histogram",
        action="store_true",
        help="save the Figure 2 gradient histograms (raw, sign, quantized for --b) of the first batch",
    )
    p.add_argument("--no-masking-checks", action="store_true", help="skip the gradient-masking checks")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument(
        "--threads",
        type=_with_context(parse_positive_int, "integer"),
        default=None,
        help="CPU threads for torch (default: torch's choice); 1 is fastest on a busy machine",
    )
    p.add_argument("--out-dir", default="results", help="outputs go to OUT_DIR/NAME/")
    p.add_argument(
        "--name",
        help="results folder name (default: derived from the checkpoint path); an existing folder "
        "gets -v1, -v2, ... unless --overwrite",
    )
    p.add_argument("--overwrite", action="store_true", help="write into OUT_DIR/NAME even if it has results")
    p.add_argument(
        "--merge",
        nargs="+",
        metavar="NPZ",
        help="merge correctness.npz files of earlier evaluations per example (worst case) and stop",
    )
    p.add_argument(
        "--quiet", action="store_true", help="no progress bar (on stderr), no plan, no summary table"
    )
    return p


# ------------------------------------------------------------------------------------ helpers
def resolve_device(text: str) -> torch.device:
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise UsageError(
            f"argument --device: unknown device {text!r}; use auto, cpu, cuda or cuda:N"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("argument --device: CUDA is not available on this machine; use --device cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"argument --device: {text} does not exist ({torch.cuda.device_count()} GPUs)")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"argument --device: unsupported device {text!r}; use auto, cpu, cuda or cuda:N")
    return device


def load_test_split(
    dataset: str, data_dir: str | None, n: int | None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The first ``n`` test images (uint8) and labels, and the split's size."""
    datamodule = build_datamodule(dataset, data_dir=data_dir, download=False)
    datamodule.setup("test")
    test_set = datamodule.test_set
    assert test_set is not None
    size = len(test_set)
    if n is not None and n > size:
        raise UsageError(f"argument --n: {n} exceeds the {size} examples of the {dataset} test split")
    end = size if n is None else n
    return test_set.images[:end], test_set.labels[:end], size


def make_progress(enabled: bool) -> Any:
    """A tqdm bar on stderr (shown also when stderr is not a terminal, as tqdm does), or None."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=0, unit="batch", desc="attacking", dynamic_ncols=True, file=sys.stderr)


def build_settings(args: argparse.Namespace, num_classes: int) -> ProtocolSettings | StandardSettings:
    """The protocol's settings from the arguments; options of the other protocol are refused."""
    if args.protocol == "standard":
        for flag in ("runs", "restarts"):
            if getattr(args, flag) is not None:
                raise UsageError(f"argument --{flag}: applies to --protocol paper (standard runs once)")
        if args.sweep:
            raise UsageError("argument --sweep: applies to --protocol paper")
        if args.loss != "ce":
            raise UsageError("argument --loss: applies to --protocol paper (the suite's losses are fixed)")
        return StandardSettings(
            eps=args.eps,
            steps=args.steps or 100,
            targets=args.targets,
            queries=args.queries,
            b=args.apgd_b,
            fab=args.fab,
            paper_rows=args.attacks if args.attacks is not None else ["pqgd", "blob_qg"],
            paper_steps=args.steps or 100,
            paper_alpha=args.alpha,
            paper_b=args.b[0],
            num_classes=num_classes,
            seed=args.seed,
        )
    return ProtocolSettings(
        attacks=args.attacks or ["pgd", "pqgd", "blob", "blob_qg"],
        eps=args.eps,
        alpha=args.alpha,
        steps=args.steps or 200,
        b_values=args.b,
        restarts=args.restarts or 50,
        runs=args.runs or 5,
        loss=args.loss,
        seed=args.seed,
    )


def merge_main(args: argparse.Namespace) -> int:
    """``--merge A.npz B.npz``: the per-example worst case of earlier evaluations."""
    try:
        summary = write_merged(args.merge, result_folder(Path(args.out_dir), args.name or "merged", args.overwrite))
    except ValueError as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return 1
    print(summary)  # noqa: T201
    return 0


# ------------------------------------------------------------------------------------ entry point
def main(argv: list[str] | None = None) -> int:
    """Entry point of ``evaluate.py``; returns the exit status (0 ok, 1 bad file or data, 2 bad usage,
    130 interrupted: what was finished is written, marked partial)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    if args.merge:
        return merge_main(args)
    if args.ckpt is None:
        sys.stderr.write(f"{PROG}: error: the following arguments are required: --ckpt (or --merge)\n")
        return 2
    try:
        device = resolve_device(args.device)
        ckpt = Path(args.ckpt)
        net, info = load_model_from_checkpoint(ckpt, args.model, args.dataset, args.model_kwargs)
        images, labels, split_size = load_test_split(info.dataset, args.data_dir, args.n)
        settings = build_settings(args, DATASET_SPECS[info.dataset].num_classes)
        if isinstance(settings, StandardSettings):
            settings.suite()  # a one-line error now (e.g. --fab without torchattacks)
    except UsageError as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return 2
    except (CheckpointError, DataError, ValueError) as exc:
        sys.stderr.write(f"{PROG}: error: {str(exc).splitlines()[0]}\n")
        return 1

    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return _evaluate(args, argv, settings, device, ckpt, net, info, images, labels, split_size)
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted; nothing was written\n")
        return 130
    finally:
        torch.set_num_threads(threads)


def _evaluate(
    args: argparse.Namespace,
    argv: list[str] | None,
    settings: ProtocolSettings | StandardSettings,
    device: torch.device,
    ckpt: Path,
    net: torch.nn.Module,
    info: CheckpointInfo,
    images: torch.Tensor,
    labels: torch.Tensor,
    split_size: int,
) -> int:
    out_dir = result_folder(Path(args.out_dir), args.name or default_result_name(ckpt), args.overwrite)
    batches = TensorBatches(images, labels, args.batch_size)
    log.info(
        "evaluating %s (%s on %s, %d test examples) on %s -> %s",
        *(ckpt, info.model, info.dataset, batches.num_examples, device, out_dir),
    )
    if not args.quiet:
        log.info(describe_plan(settings, net.to(device), batches, device, args.sweep))
    progress = make_progress(not args.quiet)
    try:
        record = run_evaluation(
            net,
            batches,
            settings,
            device,
            sweeps=args.sweep,
            histogram_b=args.b if args.histogram else None,
            masking=not args.no_masking_checks,
            progress=progress,
        )
    finally:
        if progress is not None:
            progress.close()
    config = dict(vars(args))
    config["sweep"] = [{"parameter": p, "values": v} for p, v in args.sweep]
    record.update(
        name=out_dir.name,
        command=[PROG, *(sys.argv[1:] if argv is None else argv)],
        config=config,
        checkpoint=info.to_dict(),
        data={
            "dataset": info.dataset,
            "split": "test",
            "split_size": split_size,
            "n": batches.num_examples,
            "batch_size": batches.batch_size,
            "data_dir": str(resolve_data_dir(args.data_dir)),
        },
    )
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
