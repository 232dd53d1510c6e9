"""``evaluate.py``: the paper's evaluation protocol (Tables 2-6, Figures 2-5) on a checkpoint.

``python evaluate.py --ckpt checkpoints/run/last.ckpt --attacks pgd,pqgd --b 100,200 --runs 5``
writes ``results/<name>/results.json``, ``results.md`` and PNG plots, and prints a summary table.
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
from qgtrain.evaluation.report import render_summary, run_evaluation, write_outputs
from qgtrain.evaluation.runner import SWEEPABLE, ProtocolSettings, TensorBatches
from qgtrain.models import available_models

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
    value = parse_number(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def parse_positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


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
    p.add_argument("--ckpt", required=True, help="a train.py checkpoint (.ckpt) or a plain state dict (.pt)")
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
        default=["pgd", "pqgd", "blob", "blob_qg"],
        help=f"comma-separated, from {', '.join(available_attacks())}",
    )
    p.add_argument("--steps", type=_with_context(parse_positive_int, "integer"), default=200)
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
    p.add_argument(
        "--restarts",
        type=_with_context(parse_positive_int, "integer"),
        default=50,
        help="random restarts per run, merged per example",
    )
    p.add_argument(
        "--runs", type=_with_context(parse_positive_int, "integer"), default=5, help="independent runs"
    )
    p.add_argument(
        "--n",
        type=_with_context(parse_positive_int, "integer"),
        default=None,
        help="first n test examples (default: the full test split)",
    )
    p.add_argument(
        "--batch-size",
        type=_with_context(parse_positive_int, "integer"),
        default=200,
        help="attack batch size (BLOB's particles are the batch: results depend on it)",
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
    p.add_argument("--name", help="results folder name (default: derived from the checkpoint path)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no summary table")
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


def default_name(ckpt: Path) -> str:
    """``<parent>_<stem>`` for generic names such as ``last.ckpt``, else the file's stem."""
    stem = ckpt.stem
    generic = stem in ("last", "best", "model", "checkpoint") or stem.startswith(("epoch=", "last-"))
    if generic and ckpt.parent.name:
        return f"{ckpt.parent.name}_{stem}".replace("=", "")
    return stem


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
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=0, unit="batch", desc="attacking", dynamic_ncols=True, file=sys.stderr)


# ------------------------------------------------------------------------------------ entry point
def main(argv: list[str] | None = None) -> int:
    """Entry point of ``evaluate.py``; returns the exit status (0 ok, 1 bad file or data, 2 bad usage)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        device = resolve_device(args.device)
        ckpt = Path(args.ckpt)
        net, info = load_model_from_checkpoint(ckpt, args.model, args.dataset, args.model_kwargs)
        images, labels, split_size = load_test_split(info.dataset, args.data_dir, args.n)
    except UsageError as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return 2
    except (CheckpointError, DataError) as exc:
        sys.stderr.write(f"{PROG}: error: {str(exc).splitlines()[0]}\n")
        return 1

    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return _evaluate(args, argv, device, ckpt, net, info, images, labels, split_size)
    finally:
        torch.set_num_threads(threads)


def _evaluate(
    args: argparse.Namespace,
    argv: list[str] | None,
    device: torch.device,
    ckpt: Path,
    net: torch.nn.Module,
    info: CheckpointInfo,
    images: torch.Tensor,
    labels: torch.Tensor,
    split_size: int,
) -> int:
    settings = ProtocolSettings(
        attacks=args.attacks,
        eps=args.eps,
        alpha=args.alpha,
        steps=args.steps,
        b_values=args.b,
        restarts=args.restarts,
        runs=args.runs,
        loss=args.loss,
        seed=args.seed,
    )
    name = args.name or default_name(ckpt)
    out_dir = Path(args.out_dir) / name
    batches = TensorBatches(images, labels, args.batch_size)
    show_progress = not args.quiet and sys.stderr.isatty()
    progress = make_progress(show_progress)
    log.info(
        "evaluating %s (%s on %s, %d test examples) on %s -> %s",
        ckpt,
        info.model,
        info.dataset,
        batches.num_examples,
        device,
        out_dir,
    )
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
        name=name,
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
    if not args.quiet:
        print(render_summary(record))  # noqa: T201
        print(f"results: {paths['results.json']}, {paths['results.md']}")  # noqa: T201
    return 0
