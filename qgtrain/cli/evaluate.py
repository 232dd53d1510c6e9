"""``evaluate.py``: a checkpoint's robust accuracy, by the ``standard`` suite or the ``paper`` protocol.

A jsonargparse parser over both protocols' settings (``--standard.KEY``, ``--paper.KEY``: the
dataclasses' defaults and types), with one flag per setting for both (:data:`SETTING_FLAGS`). Text
becomes typed values here; the settings and :class:`~qgtrain.evaluation.session.Request` check them.
See docs/EVALUATION.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, fields
from fractions import Fraction
from functools import partial
from typing import Any

from jsonargparse import ArgumentParser, Namespace

from qgtrain.attacks import available_attacks
from qgtrain.checkpoints import OutputFolderError
from qgtrain.cli import EXIT_STATUSES, ConfigAction, UsageError, report_failure, unknown_flag
from qgtrain.data import DATAMODULES, DataError
from qgtrain.evaluation import session
from qgtrain.evaluation.runner import ProtocolSettings, SettingError, StandardSettings
from qgtrain.models import available_models

PROG = "evaluate.py"


class Typed:
    """An argparse ``type`` named ``shown`` in ``--help`` that ``convert``s text; text that does not
    convert is passed on for the setting's own check to refuse, a value already converted is kept."""

    def __init__(self, shown: str, convert: Callable[[str], Any]) -> None:
        self.shown, self.convert = shown, convert

    def __repr__(self) -> str:
        return self.shown

    def __call__(self, text: Any) -> Any:
        if not isinstance(text, str):
            return text
        try:
            return self.convert(text.strip())
        except (ValueError, ZeroDivisionError):
            return text


def comma_list(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def attack_names(text: str) -> list[str]:
    """Comma-separated attack names, each once; ``none``: no attack (the standard suite alone)."""
    chosen = [] if text == "none" else list(dict.fromkeys(comma_list(text)))
    if not chosen and text != "none":
        raise ValueError(f"no attack named in {text!r}")
    return chosen


NUMBER = Typed("number", lambda t: float(Fraction(t)))
INTEGER = Typed("int", int)


def sweep(text: str) -> tuple[str, list[Any]]:
    """``eps=0.1,0.2`` -> ``("eps", [0.1, 0.2])``: eps's values numbers, steps' and b's integers."""
    parameter, _, values = (part.strip() for part in text.partition("="))
    convert = NUMBER if parameter == "eps" else INTEGER
    return parameter, list(dict.fromkeys(convert(value) for value in comma_list(values)))


@dataclass(frozen=True)
class SettingFlag:
    """``flag VALUE`` sets the fields ``paper`` of :class:`ProtocolSettings` and ``standard`` of
    :class:`StandardSettings` (``paper_b``: the first of the values)."""

    flag: str
    parse: Callable[[str], Any]
    help: str
    paper: tuple[str, ...] = ()
    standard: tuple[str, ...] = ()


SETTING_FLAGS = (
    SettingFlag("--attacks", Typed("names", attack_names), f"comma-separated, from {', '.join(available_attacks())} or torchattacks.<Class>: standard's rows beside the suite (none: the suite alone), or paper's attacks", ("attacks",), ("paper_rows",)),
    SettingFlag("--suite", Typed("names", comma_list), "standard: AutoAttack's attacks to run, in the order given", standard=("suite_attacks",)),
    SettingFlag("--eps", NUMBER, "L-inf radius; 8/255 works", ("eps",), ("eps",)),
    SettingFlag("--alpha", NUMBER, "step size of the paper's attacks (standard: of its rows)", ("alpha",), ("paper_alpha",)),
    SettingFlag("--b", Typed("ints", lambda t: [int(b) for b in comma_list(t)]), "quantization levels: one row per b for quantized attacks; standard's rows take the first", ("b_values",), ("paper_b",)),
    SettingFlag("--steps", INTEGER, "iterations per run (standard: of the suite and the rows)", ("steps",), ("steps", "paper_steps")),
    SettingFlag("--restarts", INTEGER, "paper: random restarts per run, merged per example", ("restarts",)),
    SettingFlag("--runs", INTEGER, "paper: independent runs", ("runs",)),
    SettingFlag("--targets", INTEGER, "standard: APGD-T's and FAB-T's target classes", standard=("targets",)),
    SettingFlag("--queries", INTEGER, "standard: Square's queries", standard=("queries",)),
    SettingFlag("--apgd-b", INTEGER, "standard: APGD's quantization level, 1 is the sign", standard=("b",)),
    SettingFlag("--loss", str, "paper: attack loss", ("loss",)),
    SettingFlag("--seed", INTEGER, "run r uses seed + r", ("seed",), ("seed",)),
)  # fmt: skip


def apply_setting(row: SettingFlag, parser: Any, namespace: Namespace, text: str) -> None:
    """``row``'s value in both protocols' settings, each checked by the settings taking it."""
    value = row.parse(text)
    for protocol, settings, keys in (("paper", ProtocolSettings, row.paper), ("standard", StandardSettings, row.standard)):  # fmt: skip
        for key in keys:
            typed = value[0] if key == "paper_b" else value  # b_values' check came first
            try:
                settings(**{key: typed})  # the setting's own check
            except SettingError as exc:
                raise argparse.ArgumentError(None, f"argument {row.flag}: {exc.reason}") from None
            namespace[f"{protocol}.{key}"] = typed


def stated_default(row: SettingFlag, paper: ProtocolSettings, standard: StandardSettings) -> str:
    """``(default: 100 for standard, 200 for paper)``, or the one value of a one-protocol setting."""

    def text(value: Any) -> str:
        return ",".join(map(str, value)) if isinstance(value, list) else f"{value:g}" if isinstance(value, float) else str(value)

    values = [(text(getattr(settings, keys[0])), name) for name, settings, keys in (("standard", standard, row.standard), ("paper", paper, row.paper)) if keys]  # fmt: skip
    return f"(default: {values[0][0] if len(values) == 1 else ', '.join(f'{v} for {name}' for v, name in values)})"


def build_parser() -> ArgumentParser:
    """The options, each default stated once (jsonargparse's, from the settings dataclasses)."""
    paper, standard = ProtocolSettings(), StandardSettings()
    p = ArgumentParser(prog=PROG, epilog=EXIT_STATUSES, exit_on_error=False, description=(
        "A checkpoint's robust accuracy. By default (--protocol standard) AutoAttack's suite, "
        f"{' -> '.join(standard.suite_attacks)}, each attack on the examples still robust (early exit), "
        "with PQGD and BLOB_QG rows beside it; --protocol paper runs the paper's protocol (independent "
        "runs, restarts merged per example, Worst/Avg, sweeps). Writes results.json, results.md, "
        "correctness.npz and PNG plots to OUT_DIR/NAME (docs/EVALUATION.md)."))  # fmt: skip
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", help="a train.py checkpoint (.ckpt) or a plain state dict (.pt)")
    source.add_argument("--merge", nargs="+", metavar="RESULT", help="merge earlier results (folders, or the correctness.npz in them) per example, by test index: chunks of one evaluation (--range) into the whole set, other evaluations of the same checkpoint as the per-example worst case")  # fmt: skip
    p.add_argument("--protocol", choices=["standard", "paper"], default="standard", help="standard: AutoAttack's suite, early exit, plus the paper rows; paper: the paper's Table 2 protocol (--runs, --restarts, --sweep)")  # fmt: skip
    p.add_argument("--model", choices=available_models(), help="architecture of a plain state dict")
    p.add_argument("--model-kwargs", type=Typed("JSON", json.loads), default={}, help="constructor arguments of --model as JSON")
    p.add_argument("--weights", choices=["averaged", "raw"], default="averaged", help="of a checkpoint trained with --ema: the averaged weights or the trained ones")  # fmt: skip
    p.add_argument("--dataset", choices=list(DATAMODULES), help="dataset (null: the checkpoint's, else the model's)")
    p.add_argument("--data-dir", help="dataset root (null: $QGTRAIN_DATA, else ./data)")
    for row in SETTING_FLAGS:
        p.add_argument(row.flag, action=ConfigAction, apply=partial(apply_setting, row), metavar="VALUE", help=f"{row.help} {stated_default(row, paper, standard)}")
    p.add_argument("--sweep", type=Typed("PARAM=V1,...", sweep), action="append", metavar="PARAM=V1,...", help="paper: sweep eps, steps or b (repeatable), e.g. eps=0.1,0.2,0.3; writes sweep_PARAM.png")  # fmt: skip
    examples = p.add_mutually_exclusive_group()
    examples.add_argument("--n", type=INTEGER, help="first n test examples (null: the whole test split)")
    examples.add_argument("--range", type=Typed("START:STOP", lambda t: tuple(map(int, t.split(":")))), metavar="START:STOP", help="the test examples START..STOP-1, a chunk of a longer evaluation: NAME gets _START-STOP, correctness.npz the true indices; START a multiple of --batch-size (--merge joins the chunks)")  # fmt: skip
    p.add_argument("--skip-done", action="store_true", help="exit at once (status 0) when OUT_DIR/NAME already holds this finished evaluation (its results.json): a loop over chunks resumes where it stopped")  # fmt: skip
    p.add_argument("--batch-size", type=INTEGER, default=200, help="attack batch size; BLOB's particles are the batch")
    p.add_argument("--histogram", action="store_true", help="save Figure 2's gradient histograms of the first batch")
    p.add_argument("--no-masking-checks", action="store_true", help="skip the gradient-masking checks")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--threads", type=INTEGER, help="CPU threads for torch (null: torch's); 1 is fastest when busy")
    p.add_argument("--out-dir", default="results", help="outputs go to OUT_DIR/NAME/")
    p.add_argument("--name", help="results folder (null: from the checkpoint path); a taken one gets -v1, -v2, ...; an interrupted run writes what it finished to NAME-partial")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="write into OUT_DIR/NAME even if it has results")
    p.add_argument("--quiet", action="store_true", help="no progress bar (on stderr), no plan, no summary table")
    p.add_class_arguments(ProtocolSettings, "paper", help="--protocol paper: its settings in full")
    p.add_class_arguments(StandardSettings, "standard", skip={"num_classes"}, help="--protocol standard: its settings in full")  # fmt: skip
    return p


def build_settings(args: Namespace, num_classes: int) -> ProtocolSettings | StandardSettings:
    """The protocol's settings; a setting of the other protocol changed from its default is refused."""
    paper = args.protocol == "paper"
    other, defaults = (args.standard, StandardSettings()) if paper else (args.paper, ProtocolSettings())
    theirs = [row for row in SETTING_FLAGS if not (row.paper if paper else row.standard)]
    changed = [row.flag for row in theirs if any(other[key] != getattr(defaults, key) for key in row.standard + row.paper)]
    changed += ["--sweep"] if args.sweep and not paper else []
    if changed:
        fix = "standard (the default)" if paper else "paper (the suite runs once, its losses fixed)"
        raise UsageError(f"argument {changed[0]}: applies to --protocol {fix}")
    try:
        if paper:
            settings: ProtocolSettings | StandardSettings = ProtocolSettings(**vars(args.paper))
        else:
            settings = StandardSettings(**vars(args.standard), num_classes=num_classes)
            settings.suite()
    except SettingError as exc:  # a --paper.KEY or --standard.KEY value
        raise UsageError(f"argument --{args.protocol}.{exc.field}: {exc.reason}") from None
    except ValueError as exc:
        raise UsageError(f"argument --suite: {exc}") from None
    try:
        settings.check()  # a one-line error now (e.g. torchattacks.<Class> without torchattacks)
    except ValueError as exc:
        raise UsageError(f"argument --attacks: {str(exc).splitlines()[0]}") from None
    return settings


def parse(argv: list[str] | None) -> tuple[Namespace, session.Request]:
    """The options and the request they make; a refusal is a :class:`UsageError` naming the option."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        request = session.Request(**{f.name: args[f.name] for f in fields(session.Request) if args[f.name] is not None})
    except argparse.ArgumentError as exc:
        flags = [f"--{key if '.' in key else key.replace('_', '-')}" for key in parser.get_defaults().keys()]
        raise UsageError(unknown_flag(str(exc), flags + [r.flag for r in SETTING_FLAGS], PROG) or str(exc)) from None
    except SettingError as exc:  # a value the request refuses: its option is named after its field
        raise UsageError(f"argument --{exc.field.replace('_', '-')}: {exc.reason}") from None
    return args, request


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``evaluate.py``; returns the exit status (:data:`~qgtrain.cli.EXIT_STATUSES`)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        args, request = parse(argv)
        if args.merge:
            print(session.merge(args.merge, request))  # noqa: T201
            return 0
        about = {"command": [PROG, *(sys.argv[1:] if argv is None else argv)], "config": args.as_dict()}
        return session.evaluate(request, lambda classes: build_settings(args, classes), about, PROG)
    except (Exception, KeyboardInterrupt) as exc:
        wrong = (UsageError, session.RequestError, OutputFolderError)
        return report_failure(PROG, exc, wrong, (DataError,), "interrupted before any attack ran; nothing was written")
