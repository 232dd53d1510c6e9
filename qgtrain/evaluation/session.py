"""One ``evaluate.py`` evaluation, from its options to its results folder (:func:`evaluate`).

The network from the checkpoint, the test examples it attacks (the whole split, the first ``n``, or a chunk ``START:STOP`` of a
longer evaluation, which draws the same random stream as in the whole one), the folder's name
(``_START-STOP`` for a chunk), ``--skip-done`` for a folder that holds this finished evaluation
already, and the run itself: SIGTERM is taken as Ctrl-C, so an evaluation stopped either way writes
what it finished to ``NAME-partial`` and exits with 128 + the signal's number.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qgtrain.checkpoints import CheckpointError, check_run_name, check_writable, load_model_from_checkpoint
from qgtrain.data import resolve_data_dir, test_split
from qgtrain.evaluation.environment import progress_bar, resolve_device
from qgtrain.evaluation.job import run_evaluation
from qgtrain.evaluation.outputs import (
    default_result_name,
    finished_result,
    first_difference,
    result_folder,
    write_merged,
    write_outputs,
)
from qgtrain.evaluation.planning import describe_plan, format_duration
from qgtrain.evaluation.rendering import nothing_finished, partial_summary, render_summary
from qgtrain.evaluation.runner import (
    COUNT,
    SWEEPABLE,
    ProtocolSettings,
    Rule,
    SettingError,
    StandardSettings,
    TensorBatches,
    check_fields,
)
from qgtrain.models import DATASET_SPECS

log = logging.getLogger(__name__)
Settings = ProtocolSettings | StandardSettings
REQUEST_RULES = {
    "n": COUNT.or_none(),
    "range": Rule("START:STOP with 0 <= START < STOP (test indices)", lambda r: r is None or (isinstance(r, tuple) and len(r) == 2 and 0 <= r[0] < r[1])),
    "batch_size": COUNT,
    "threads": COUNT.or_none(),
    "model_kwargs": Rule("a JSON object such as '{\"width\": 8}'", lambda v: isinstance(v, dict)),
}  # fmt: skip
"""What the numeric and structured options of a :class:`Request` allow."""


class RequestError(ValueError):
    """Options that do not fit the checkpoint, the data or the results folder: one line naming the
    option (the command is wrong)."""


def selected_examples(
    n: int | None, chunk: tuple[int, int] | None, batch_size: int, split_size: int, dataset: str
) -> tuple[int, int]:
    """The test indices ``START, STOP`` to attack: ``chunk`` (``--range``), the first ``n`` (``--n``),
    else the whole split. A chunk starts at a batch of the whole set, so that it draws that batch's
    random stream (:class:`~qgtrain.evaluation.runner.TensorBatches`)."""
    if chunk is None and n is None:
        return 0, split_size
    flag, (start, stop) = ("--range", chunk) if chunk is not None else ("--n", (0, n))
    if stop > split_size:
        raise RequestError(f"argument {flag}: {stop} exceeds the {split_size} examples of the {dataset} test split")
    if start % batch_size:
        raise RequestError(
            f"argument --range: START {start} is not a multiple of --batch-size {batch_size}; a chunk "
            "starts at a batch of the whole set, so that it draws that batch's random stream"
        )
    return start, stop


def result_name(name: str | None, checkpoint: Path, chunk: tuple[int, int] | None) -> str:
    """``name`` (default: from the checkpoint path), with ``_START-STOP`` for a chunk."""
    name = name or default_result_name(checkpoint)
    return f"{name}_{chunk[0]}-{chunk[1]}" if chunk is not None else name


def already_done(folder: Path, settings: Settings, about: dict[str, Any]) -> bool:
    """``--skip-done``: whether ``folder`` holds this finished evaluation (same settings, checkpoint
    and examples); a finished one of something else is refused (a script would skip it wrongly)."""
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
        raise RequestError(
            f"argument --skip-done: {folder} holds a finished evaluation of something else "
            f"({first_difference(there, this)}); pass another --name or --out-dir"
        )
    return True


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


@dataclass
class Request:
    """What ``evaluate.py`` asks beside the protocol's settings (its options, by their names)."""

    ckpt: str | None = None
    model: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    weights: str = "averaged"
    dataset: str | None = None
    data_dir: str | None = None
    n: int | None = None
    range: tuple[int, int] | None = None
    batch_size: int = 200
    device: str = "auto"
    threads: int | None = None
    out_dir: str = "results"
    name: str | None = None
    overwrite: bool = False
    skip_done: bool = False
    sweep: Sequence[tuple[str, list[float | int]]] = ()
    histogram: bool = False
    no_masking_checks: bool = False
    quiet: bool = False

    def __post_init__(self) -> None:
        """Each option is one it allows (:class:`~qgtrain.evaluation.runner.SettingError` naming
        it otherwise); a sweep's values each one its setting allows."""
        check_fields(self, REQUEST_RULES)
        for parameter, values in self.sweep:
            if not values:
                raise SettingError("sweep", f"must be PARAM=V1,V2,... with PARAM one of {', '.join(SWEEPABLE)}, got {parameter!r} and no values")  # fmt: skip
            try:
                for value in values:
                    ProtocolSettings().with_value(parameter, value)
            except SettingError as exc:
                raise SettingError("sweep", f"{parameter} {exc.reason}") from None
            except ValueError as exc:  # not a parameter a sweep may vary
                raise SettingError("sweep", str(exc)) from None

    def check_outputs(self) -> None:
        """``name`` is one folder name and ``out_dir`` is not a file."""
        if self.name is not None:
            try:
                check_run_name(self.name, "argument --name")
            except ValueError as exc:
                raise RequestError(str(exc)) from None
        if Path(self.out_dir).exists() and not Path(self.out_dir).is_dir():
            raise RequestError(f"argument --out-dir: {self.out_dir} is a file; name a folder (made when missing)")


def merge(paths: Sequence[str], request: Request) -> str:
    """``--merge``: the results at ``paths`` joined per example into a new results folder (a chunk's
    into the whole set, another evaluation's as the worst case); its summary."""
    request.check_outputs()
    out_dir = result_folder(Path(request.out_dir), request.name or "merged", request.overwrite)
    check_writable(out_dir, "results")
    try:
        return write_merged(paths, out_dir)
    except ValueError as exc:
        raise RequestError(f"argument --merge: {exc}") from None


def evaluate(request: Request, settings_for: Callable[[int], Settings], about: dict[str, Any], prog: str) -> int:
    """Load the checkpoint's network and the test examples, build the settings for its number of
    classes (``settings_for``), attack, and write ``about`` (the command and its options) with the
    results; the exit status (see :func:`attack_and_write`)."""
    request.check_outputs()
    try:
        device = resolve_device(request.device)
    except ValueError as exc:
        raise RequestError(f"argument --device: {exc}") from None
    try:
        net, info = load_model_from_checkpoint(
            Path(request.ckpt), request.model, request.dataset, request.model_kwargs, request.weights
        )
    except CheckpointError as exc:
        raise RequestError(f"argument --ckpt: {str(exc).splitlines()[0]}") from None
    images, labels = test_split(info.dataset, request.data_dir)
    start, stop = selected_examples(request.n, request.range, request.batch_size, len(labels), info.dataset)
    settings = settings_for(DATASET_SPECS[info.dataset].num_classes)
    about |= {"checkpoint": info.to_dict(), "data": {
        "dataset": info.dataset, "split": "test", "split_size": len(labels), "n": stop - start, "range": [start, stop],
        "batch_size": request.batch_size, "data_dir": str(resolve_data_dir(request.data_dir)),
    }}  # fmt: skip
    threads = torch.get_num_threads()
    try:
        if request.threads is not None:
            torch.set_num_threads(request.threads)
        batches = TensorBatches(images[start:stop], labels[start:stop], request.batch_size, start)
        return attack_and_write(request, net.to(device), batches, settings, device, about, prog)
    finally:
        torch.set_num_threads(threads)


def attack_and_write(
    request: Request, net: nn.Module, batches: TensorBatches, settings: Settings, device: torch.device,
    about: dict[str, Any], prog: str,
) -> int:  # fmt: skip
    """Attack, then write ``about`` with the results; the exit status. Interrupted, what was finished
    goes to ``NAME-partial`` (replacing an earlier partial result), so a later run takes NAME; when
    nothing was finished, nothing is written. A fault while writing propagates (an ``OSError``)."""
    name = result_name(request.name, Path(request.ckpt), request.range)
    folder = Path(request.out_dir) / name
    if request.skip_done and already_done(folder, settings, about):
        print(f"{prog}: {folder} already holds this evaluation; skipped (--skip-done)")  # noqa: T201
        return 0
    out_dir = result_folder(Path(request.out_dir), name, request.overwrite)
    check_writable(out_dir, "results")  # now, not after the attacks
    checkpoint = about["checkpoint"]
    log.info(
        "evaluating %s (%s on %s, %d test examples) on %s -> %s", request.ckpt, checkpoint["model"],
        checkpoint["dataset"], batches.num_examples, device, out_dir,
    )  # fmt: skip
    if not request.quiet:
        log.info(describe_plan(settings, net, batches, device, request.sweep))
    levels = settings.b_values if isinstance(settings, ProtocolSettings) else [settings.paper_b]
    with sigterm_as_ctrl_c() as interrupt, progress_bar(not request.quiet) as progress:
        record = run_evaluation(
            net, batches, settings, device, request.sweep, levels if request.histogram else None,
            not request.no_masking_checks, progress, on_estimate=None if request.quiet else log_estimate,
        )  # fmt: skip
    results = record["results"]
    if results["partial"]:
        if nothing_finished(results):
            sys.stderr.write(
                f"{prog}: interrupted ({interrupt.name}) after {record['wall_seconds']:.0f} s, before any "
                "attack finished a batch; nothing was finished, nothing written\n"
            )
            return interrupt.exit_status
        out_dir = out_dir.with_name(f"{out_dir.name}-partial")
    record.update(about, name=out_dir.name)
    written = ", ".join(str(path) for path in write_outputs(record, out_dir).values())
    if results["partial"]:
        summary = partial_summary(results).replace("interrupted", f"interrupted ({interrupt.name})", 1)
        sys.stderr.write(f"{prog}: {summary}; wrote it, marked partial: {written}\n")
        return interrupt.exit_status
    if not request.quiet:
        print(render_summary(record))  # noqa: T201
    print(f"wrote {written}")  # noqa: T201
    return 0


def log_estimate(seconds: float, examples: int) -> None:
    log.info(
        "estimate: the attacks take about %s (from the first %d examples, early exit)",
        format_duration(seconds),
        examples,
    )
