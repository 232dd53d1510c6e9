"""One evaluation job end to end (protocol, sweeps, masking checks, histograms) and its outputs.

:func:`run_evaluation` returns a JSON-ready record holding every number and the full configuration;
``results.md`` and the terminal summary are rendered *from that record*, so the three always agree.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import platform
import sys
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qgtrain import __version__
from qgtrain.evaluation.masking import (
    MaskingCheck,
    check_output_probabilities,
    check_randomized,
    check_restarts,
    check_score_based,
    check_steps,
    check_sweep,
    check_zero_gradients,
    input_gradients,
)
from qgtrain.evaluation.plots import gradient_histograms, plot_histograms, plot_rows, plot_suite, plot_sweep
from qgtrain.evaluation.runner import (
    Progress,
    ProtocolResult,
    ProtocolRunner,
    ProtocolSettings,
    StandardResult,
    StandardSettings,
    SweepResult,
    TensorBatches,
    run_standard,
)

log = logging.getLogger(__name__)

PACKAGES = ("torch", "torchvision", "lightning", "torchmetrics", "numpy", "matplotlib", "tqdm")
TIMING_KEYS = frozenset(
    {"run_seconds", "seconds", "estimated_seconds", "wall_seconds", "created", "masking_seconds"}
)
"""Keys whose values differ between identical runs (everything else is reproducible)."""


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when present), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; ValueError for a device
    this machine lacks."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.type == "cuda" and (device.index or 0) >= gpus:
        raise ValueError(f"{name} is not on this machine ({gpus} CUDA GPUs); use --device cpu or auto")
    return device


@contextmanager
def progress_bar(enabled: bool) -> Iterator[Progress | None]:
    """A tqdm bar on stderr (also when stderr is not a terminal, as tqdm does), closed on exit; or None."""
    if not enabled:
        yield None
        return
    from tqdm import tqdm

    with tqdm(total=0, unit="batch", desc="attacking", dynamic_ncols=True, file=sys.stderr) as bar:
        yield bar


def environment_info(device: torch.device | str) -> dict[str, Any]:
    """Library versions, device and thread settings, for results.json."""
    device = torch.device(device)
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        device_name = torch.cuda.get_device_name(index)
    else:
        device_name = platform.processor() or platform.machine() or "cpu"
    return {
        "qgtrain": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": versions,
        "device": str(device),
        "device_name": device_name,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "torch_threads": torch.get_num_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cpu_count": os.cpu_count(),
    }


def run_masking_checks(
    model: nn.Module,
    batches: TensorBatches,
    main: ProtocolResult | StandardResult,
    device: torch.device | str | None,
    loss: str,
    seed: int,
) -> list[MaskingCheck]:
    """The per-model checks on the first batch, steps/restarts checks for every row, and (standard
    protocol) whether the score-based Square fooled examples the gradient attacks left robust."""
    first = batches.head(1)
    x, y = next(iter(first))
    if device is not None:
        x, y = x.to(device), y.to(device)
    checks = [
        check_output_probabilities(model, x),
        check_randomized(model, x),
        check_zero_gradients(model, x, y, loss),
    ]
    k = first.num_examples
    for row in main.rows:
        if row.run_correct[0].numel() < k:
            continue
        full = row.run_correct[0][:k]
        steps = check_steps(model, row.spec, first, full, row.seeds[0], device)
        # An unused seed, so the single restart's start is independent of run 0's first restart.
        restarts = check_restarts(model, row.spec, first, full, seed + 1000, device)
        checks.extend(c for c in (steps, restarts) if c is not None)
    if isinstance(main, StandardResult):
        checks.extend(check_score_based(main.suite.labels, main.suite.fooled_counts(), main.suite.clean))
    return checks


def per_example_arrays(result: ProtocolResult | StandardResult, start: int = 0) -> dict[str, np.ndarray]:
    """Per-example correctness for ``correctness.npz``: ``index`` (each example's index in the test
    split, from ``start``), ``clean``, ``robust`` (the worst case over everything evaluated),
    ``row<i>_run<r>`` per row and run, and for the suite ``suite`` and ``fooled_by`` (index of the
    first suite attack that fooled each example, -1 none)."""
    arrays: dict[str, np.ndarray] = {
        "clean": result.clean.numpy(),
        "robust": result.ensemble_correct.numpy(),
        "index": start + np.arange(result.clean.numel()),
    }
    if isinstance(result, StandardResult):
        arrays["suite"] = result.suite.robust.numpy()
        arrays["fooled_by"] = result.suite.fooled_by.numpy()
    for i, row in enumerate(result.rows):
        for r, correct in enumerate(row.run_correct):
            arrays[f"row{i}_run{r}"] = correct.numpy()
    return arrays


def run_evaluation(
    model: nn.Module,
    batches: TensorBatches,
    settings: ProtocolSettings | StandardSettings,
    device: torch.device | str,
    sweeps: Sequence[tuple[str, Sequence[float | int]]] = (),
    histogram_b: Sequence[int] | None = None,
    masking: bool = True,
    progress: Progress | None = None,
    on_estimate: Callable[[float, int], None] | None = None,
) -> dict[str, Any]:
    """Run the protocol (``standard`` or ``paper``), the sweeps (paper), the masking checks and the
    histograms; return the record. Ctrl-C during the protocol returns what is finished, marked
    ``partial`` (then no sweep, check or histogram runs; :func:`nothing_finished` tells whether
    anything did).

    The caller may add ``name``, ``checkpoint``, ``data``, ``config`` and ``command`` before writing.
    ``progress.total`` (when the bar has one) is set to the number of attacked batches to run;
    ``on_estimate`` gets the standard protocol's time estimate after its first batch.
    """
    start = time.perf_counter()
    model = model.to(device)
    loss = getattr(settings, "loss", "ce")
    sweep_results: list[SweepResult] = []
    if isinstance(settings, StandardSettings):
        _set_total(progress, len(batches) * (1 + len(settings.row_specs())))
        main: ProtocolResult | StandardResult = run_standard(
            model, batches, settings, device, progress, on_estimate
        )
    else:
        runner = ProtocolRunner(model, batches, device, progress)
        plans = [settings] + [settings.with_value(p, v) for p, values in sweeps for v in values]
        _set_total(progress, runner.batch_cost(plans))
        try:
            main = runner.evaluate(settings)
            sweep_results = [runner.sweep(settings, p, values) for p, values in sweeps]
        except KeyboardInterrupt:
            main = runner.partial_result(settings)
            sweep_results = []

    record: dict[str, Any] = {
        "name": "evaluation",
        "batch_size": batches.batch_size,
        "environment": environment_info(device),
        "results": main.to_dict(),
        "sweeps": [s.to_dict() for s in sweep_results],
        "_per_example": per_example_arrays(main, batches.start),
    }
    checks: list[MaskingCheck] = []
    masking_start = time.perf_counter()
    partial = record["results"]["partial"]
    skipped = "--no-masking-checks" if not masking else "interrupted" if partial else None
    record["histogram"] = None
    try:
        if skipped is None:
            checks = run_masking_checks(model, batches, main, device, loss, settings.seed)
            for sweep in sweep_results:
                checks.extend(check_sweep(sweep.parameter, sweep.values, sweep.series(), main.clean.numel()))
        if histogram_b is not None and not partial:
            x, y = next(iter(batches.head(1)))
            grad = input_gradients(model, x.to(device), y.to(device), loss).cpu()
            record["histogram"] = gradient_histograms(grad, histogram_b)
    except KeyboardInterrupt:  # the protocol's numbers are kept; the checks are marked unfinished
        record["results"]["partial"] = True
        skipped = skipped or "interrupted"
    warnings = [c.warning for c in checks if c.warning]
    for warning in warnings:
        log.warning("gradient masking? %s", warning)
    record["masking"] = {
        "enabled": skipped is None,
        "skipped": skipped,
        "checks": [c.to_dict() for c in checks],
        "warnings": warnings,
        "masking_seconds": time.perf_counter() - masking_start,
    }
    record["wall_seconds"] = time.perf_counter() - start
    return record


def _set_total(progress: Progress | None, total: int) -> None:
    if progress is not None and hasattr(progress, "total"):
        progress.total = total
        if hasattr(progress, "refresh"):
            progress.refresh()


# ---------------------------------------------------------------------------------------------- output
def pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.2f}"


def protocol_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the Table 2 layout: runs, Worst, Avg, seconds; clean first, worst case last."""
    runs = max((len(r["run_accuracies"]) for r in results["rows"]), default=0)
    header = [
        "Attack",
        *[f"Run {i + 1}" for i in range(runs)],
        "Worst",
        "Avg",
        "Gradients",
        "Naive",
        "Time (s)",
    ]
    clean = results["clean"]["accuracy"]
    rows = [["Clean", *["" for _ in range(runs)], pct(clean), pct(clean), "", "", ""]]
    for row in results["rows"]:
        accuracies = [pct(a) for a in row["run_accuracies"]]
        accuracies += [""] * (runs - len(accuracies))
        cost = row.get("cost", {})
        rows.append(
            [
                row["label"],
                *accuracies,
                pct(row["worst"]),
                pct(row["avg"]),
                count(cost.get("gradients")),
                count(cost.get("naive_gradients")),
                f"{row['seconds']:.1f}",
            ]
        )
    rows.append(
        [
            "Worst case (per example, all attacks and runs)",
            *[""] * runs,
            pct(results["ensemble"]["accuracy"]),
            "",
            "",
            "",
            "",
        ]
    )
    return header, rows


def count(value: int | None) -> str:
    """A gradient or query count, short (``1.23M``); ``n/a`` when not known."""
    if value is None:
        return "n/a"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.2f}{unit}"
    return str(value)


def suite_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The standard suite, AutoAttack style: robust accuracy left after each attack, how many it
    fooled first, and the gradients (and forward queries) it spent against the naive count."""
    header = ["Attack", "Fooled", "Robust after (%)", "Gradients", "Naive", "Queries", "Time (s)"]
    clean = results["clean"]
    rows = [["Clean", str(results["n"] - clean["correct"]), pct(clean["accuracy"]), "", "", "", ""]]
    for attack in results["suite"]["attacks"]:
        cost = attack["cost"]
        rows.append(
            [
                attack["label"],
                str(attack["fooled"]),
                pct(attack["robust_after"]),
                count(cost["gradients"]),
                count(cost["naive_gradients"]),
                count(cost["forwards"]),
                f"{cost['seconds']:.1f}",
            ]
        )
    cost = results["suite"]["cost"]
    rows.append(
        [
            "Suite (per-example worst case)",
            "",
            pct(results["suite"]["accuracy"]),
            count(cost["gradients"]),
            count(cost["naive_gradients"]),
            count(cost["forwards"]),
            f"{cost['seconds']:.1f}",
        ]
    )
    return header, rows


def sweep_table(sweep: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Rows = swept values; one column per line: ``Avg (Worst)``; then the per-example worst case."""
    lines = list(sweep["series"])
    header = [sweep["parameter"], *lines, "worst case"]
    rows = []
    for i, value in enumerate(sweep["values"]):
        cells = [
            f"{pct(sweep['series'][k]['avg'][i])} ({pct(sweep['series'][k]['worst'][i])})" for k in lines
        ]
        rows.append(
            [f"{value:g}" if isinstance(value, float) else str(value), *cells, pct(sweep["ensemble"][i])]
        )
    return header, rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=True)]
    fmt = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *(fmt(r) for r in rows)])


def describe_setup(record: dict[str, Any]) -> list[str]:
    """Setup lines for results.md and the terminal (tolerates records without checkpoint/data)."""
    s = record["results"]["settings"]
    lines = []
    ckpt, data, env = record.get("checkpoint"), record.get("data"), record["environment"]
    if ckpt:
        lines.append(
            f"Checkpoint: `{ckpt['path']}` ({ckpt['format']}, model {ckpt['model']} {ckpt['model_kwargs']}, "
            f"epoch {ckpt['epoch']}, sha256 {ckpt['sha256'][:12]})"
        )
    if data:
        start, stop = data.get("range") or (0, data["n"])
        which = f"first {data['n']}" if start == 0 else f"examples {start}:{stop} ({data['n']})"
        lines.append(
            f"Data: {data['dataset']} test split, {which} of {data['split_size']} examples, "
            f"batch size {data['batch_size']}"
        )
    else:
        lines.append(f"Data: {record['results']['n']} examples, batch size {record['batch_size']}")
    results = record["results"]
    if results.get("protocol") == "standard":
        quantized = "" if s["b"] == 1 else f", APGD quantized b = {s['b']}"
        rows = (
            f"then the paper rows {', '.join(s['paper_rows'])} ({s['paper_steps']} steps, alpha = "
            f"{s['paper_alpha']:g}, b = {s['paper_b']})"
            if s["paper_rows"]
            else "no paper rows"
        )
        lines.append(
            f"Protocol standard: L-inf, eps = {s['eps']:g}; suite {' -> '.join(s['suite_attacks'])} "
            f"({s['steps']} steps, {s['targets']} targets, {s['queries']} queries{quantized}), each on the "
            f"examples still robust (early exit); {rows}; seed {s['seed']}"
        )
    else:
        lines.append(
            f"Protocol paper: L-inf, eps = {s['eps']:g}, alpha = {s['alpha']:g}, {s['steps']} steps, loss "
            f"{s['loss']}; {s['restarts']} restart(s) merged per example; {s['runs']} independent run(s) "
            f"(run r uses seed {s['seed']} + r); early exit inside each run"
        )
    cost = results.get("cost")
    if cost:
        lines.append(
            f"Gradients spent: {count(cost['gradients'])} of a naive {count(cost['naive_gradients'])} "
            f"(example x step); forward queries {count(cost['forwards'])}"
        )
    if results.get("partial"):
        lines.append(f"PARTIAL: {partial_summary(results)}")
    timing = results.get("time") or {}
    if timing.get("estimated_seconds") is not None:
        lines.append(
            f"Time of the attacks: estimated {timing['estimated_seconds']:.0f} s from the first batch, "
            f"took {timing['seconds']:.0f} s"
        )
    lines += [
        f"Device: {env['device']} ({env['device_name']}), torch {env['packages']['torch']}, "
        f"{env['torch_threads']} threads; wall time {record['wall_seconds']:.1f} s",
    ]
    return lines


def partial_summary(results: dict[str, Any]) -> str:
    """What an interrupted evaluation finished, in one line (per part: the suite's batches, the
    paper rows)."""
    unfinished = results.get("unfinished") or []
    left_out = f"; not finished, left out: {', '.join(unfinished)}" if unfinished else ""
    if nothing_finished(results):
        return "interrupted before any attack finished a batch; nothing was finished"
    if results.get("protocol") == "standard":
        batches = results["batches"]
        done = (
            f"the suite finished {batches['finished']} of {batches['planned']} batches "
            f"({results['n']} of {results['n_planned']} examples)"
        )
        rows = [row["label"] for row in results["rows"]]
        done += f", and on them {', '.join(rows)}" if rows else ""
        if batches["finished"] == batches["planned"] and not unfinished:
            done = "every attack finished; the gradient-masking checks did not"
        return f"interrupted; {done}{left_out}"
    rows = [row["label"] for row in results["rows"]]
    if not unfinished:
        return "interrupted; every attack finished; the sweeps or gradient-masking checks did not"
    return f"interrupted; finished (every run, all {results['n']} examples): {', '.join(rows)}{left_out}"


def nothing_finished(results: dict[str, Any]) -> bool:
    """An interrupted evaluation that finished no attack on any batch (nothing worth writing)."""
    return bool(results.get("partial")) and (
        results["n"] == 0 or not (results.get("suite") or results["rows"])
    )


def shows_rows(results: dict[str, Any]) -> bool:
    """The per-run table is shown for the paper protocol, and for standard when it has paper rows
    (with ``--attacks none`` it would repeat Clean and the suite's worst case)."""
    return results.get("protocol") != "standard" or bool(results["rows"])


def render_markdown(record: dict[str, Any]) -> str:
    """results.md: the setup, masking warnings, the Table 2-style table, sweep tables and figures."""
    out = [f"# Robustness evaluation: {record['name']}", ""]
    out += [f"- {line}" for line in describe_setup(record)]
    out += ["", "## Gradient-masking checks", ""]
    masking = record["masking"]
    if masking.get("skipped") == "interrupted":
        out.append("Not run: the evaluation was interrupted.")
    elif not masking["enabled"]:
        out.append("Checks disabled (--no-masking-checks).")
    elif masking["warnings"]:
        out += [f"- **Warning:** {w}" for w in masking["warnings"]]
    else:
        names = sorted({c["name"] for c in masking["checks"]})
        out.append(f"No check fired ({', '.join(names)}).")
    if record["results"].get("suite"):
        out += ["", "## Standard suite: robust accuracy after each attack", ""]
        out.append(markdown_table(*suite_table(record["results"])))
        if "suite.png" in record.get("figures", []):
            out += ["", "![robust accuracy after each attack, and the gradients spent](suite.png)"]
    if shows_rows(record["results"]):
        out += ["", "## Accuracy (%) per run, Worst and Avg over runs", ""]
        out.append(markdown_table(*protocol_table(record["results"])))
    if "accuracy.png" in record.get("figures", []):
        out += ["", "![robust accuracy per attack](accuracy.png)"]
    for sweep in record["sweeps"]:
        out += ["", f"## Sweep over {sweep['parameter']}: Avg (Worst) accuracy (%)", ""]
        out.append(markdown_table(*sweep_table(sweep)))
        figure = f"sweep_{sweep['parameter']}.png"
        if figure in record.get("figures", []):
            out += ["", f"![accuracy vs {sweep['parameter']}]({figure})"]
    if record.get("histogram"):
        stats = record["histogram"]
        out += ["", "## Gradient histograms (Figure 2)", ""]
        out.append(
            f"{stats['examples']} examples, {stats['components']} components; exactly zero: "
            f"{pct(stats['zero_fraction'])}%."
        )
        out.append("")
        header = ["b", "components at ±1 (%)", "zero (%)", "distinct values"]
        rows = [
            [b, pct(q["sign_like_fraction"]), pct(q["zero_fraction"]), str(q["distinct_values"])]
            for b, q in stats["quantized"].items()
        ]
        out.append(markdown_table(header, rows))
        if "histogram.png" in record.get("figures", []):
            out += ["", "![gradient histograms](histogram.png)"]
    return "\n".join(out) + "\n"


def render_summary(record: dict[str, Any]) -> str:
    """The terminal summary: setup lines, the main table, sweep tables, warnings."""
    out = describe_setup(record)
    if record["results"].get("suite"):
        out += ["", text_table(*suite_table(record["results"]))]
    if shows_rows(record["results"]):
        out += ["", text_table(*protocol_table(record["results"]))]
    for sweep in record["sweeps"]:
        out += ["", f"sweep over {sweep['parameter']} (Avg (Worst) %):", text_table(*sweep_table(sweep))]
    out += [f"WARNING: {w}" for w in record["masking"]["warnings"]]
    return "\n".join(out)


def write_outputs(record: dict[str, Any], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write results.json, results.md and the PNG figures into ``out_dir``; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    figures = []
    for sweep in record["sweeps"]:
        name = f"sweep_{sweep['parameter']}.png"
        paths[name] = plot_sweep(
            sweep, out_dir / name, title=f"{record['name']}: accuracy vs {sweep['parameter']}"
        )
        figures.append(name)
    histogram = record.get("histogram")
    if histogram and "panels" in histogram:
        paths["histogram.png"] = plot_histograms(histogram, out_dir / "histogram.png", title=record["name"])
        figures.append("histogram.png")
        record["histogram"] = histogram["stats"]
    results = record["results"]
    if results["n"] and results.get("rows") is not None:
        name, plot = ("suite.png", plot_suite) if results.get("suite") else ("accuracy.png", plot_rows)
        if plot is plot_suite or results["rows"]:
            paths[name] = plot(results, out_dir / name, title=record["name"])
            figures.insert(0, name)
    record["figures"] = figures
    arrays = record.pop("_per_example", None)
    if arrays is not None:
        paths["correctness.npz"] = out_dir / "correctness.npz"
        np.savez_compressed(paths["correctness.npz"], **arrays)
        record["per_example"] = {"file": "correctness.npz", "keys": sorted(arrays)}
    record.setdefault("created", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    paths["results.md"] = out_dir / "results.md"
    paths["results.md"].write_text(render_markdown(record))
    paths["results.json"] = out_dir / "results.json"
    write_json_last(record, paths["results.json"])
    return paths


def write_json_last(record: dict[str, Any], path: Path) -> None:
    """``results.json``, written last and atomically (a temporary file renamed): a folder holding it
    holds a whole result, which is how a finished chunk is recognised (:func:`finished_result`)."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(record, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(temporary, path)


def finished_result(folder: Path) -> dict[str, Any] | None:
    """The record in ``folder/results.json`` when it holds a finished (not partial) evaluation."""
    try:
        record = json.loads((folder / "results.json").read_text())
    except (OSError, ValueError):
        return None
    return None if record.get("results", {}).get("partial", True) else record


# ----------------------------------------------------------------------------------------------- merge
@dataclass
class Part:
    """One result folder of ``evaluate.py``: its record and per-example arrays."""

    folder: Path
    record: dict[str, Any]
    arrays: dict[str, np.ndarray]

    @property
    def results(self) -> dict[str, Any]:
        return self.record["results"]

    @property
    def index(self) -> np.ndarray:
        return self.arrays["index"]

    def span(self) -> str:
        return spans(self.index)


def spans(index: np.ndarray) -> str:
    """``0:1000`` for consecutive indices, else ``0:500,700:900``."""
    if index.size == 0:
        return "none"
    index = np.sort(index)
    breaks = np.flatnonzero(np.diff(index) != 1)
    starts, ends = np.r_[index[0], index[breaks + 1]], np.r_[index[breaks], index[-1]] + 1
    return ",".join(f"{a}:{b}" for a, b in zip(starts, ends, strict=True))


RESULT_FILES = ("results.json", "correctness.npz")
"""The files of a result folder that ``--merge`` reads (either may name the folder)."""


def load_part(path: str | os.PathLike) -> Part:
    """A result folder (or the ``correctness.npz`` in it); ValueError naming the path and the fix."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if not path.exists():
        raise ValueError(f"{path}: no such file or folder; pass a result folder of evaluate.py")
    if path.is_file() and path.name not in RESULT_FILES:
        raise ValueError(f"{path}: not a result folder of evaluate.py; pass the folder or its correctness.npz")
    try:
        record = json.loads((folder / "results.json").read_text())
        with np.load(folder / "correctness.npz") as data:
            arrays = {key: data[key] for key in data.files}
        record["results"]["settings"], arrays["clean"], arrays["robust"]  # noqa: B018
    except (OSError, KeyError, ValueError, TypeError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise ValueError(
            f"{path}: not a result folder of evaluate.py (results.json and correctness.npz: {exc})"
        ) from None
    if record["results"].get("partial"):
        raise ValueError(
            f"{folder}: an interrupted (partial) evaluation; leave it out and merge the chunk's finished "
            "folder (rerun the chunk with --skip-done)"
        )
    arrays.setdefault("index", np.arange(arrays["clean"].size))
    return Part(folder, record, arrays)


def evaluation_key(part: Part) -> str:
    """What makes parts chunks of one evaluation: the protocol, its settings and the batch size."""
    results = part.results
    return json.dumps([results.get("protocol"), results["settings"], part.record.get("batch_size")])


def first_difference(a: Any, b: Any, where: str = "") -> str:
    """The first setting that differs between two nested records, as ``key a vs b``."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in [*a, *(k for k in b if k not in a)]:
            if a.get(key) != b.get(key):
                return first_difference(a.get(key), b.get(key), f"{where}.{key}" if where else key)
    return f"{where or 'value'} {a} vs {b}"


def check_same_model(parts: Sequence[Part]) -> None:
    """All parts evaluate one checkpoint on one dataset at one radius; else a one-line ValueError."""
    first = parts[0]
    for part in parts[1:]:
        for what, read in (
            ("checkpoint sha256", lambda p: (p.record.get("checkpoint") or {}).get("sha256")),
            ("dataset", lambda p: (p.record.get("data") or {}).get("dataset")),
            ("eps", lambda p: p.results["settings"].get("eps")),
        ):
            if read(part) != read(first):
                raise ValueError(
                    f"{part.folder}: {what} {read(part)} differs from {first.folder}'s {read(first)}; "
                    "merge evaluations of one checkpoint, dataset and eps"
                )


def join_chunks(parts: Sequence[Part]) -> dict[str, np.ndarray]:
    """The per-example arrays of one evaluation's chunks, sorted by index. An example in two chunks
    must have the same outcome in both (one is kept); else a one-line ValueError."""
    keys = set(parts[0].arrays)
    for part in parts[1:]:
        if set(part.arrays) != keys:
            raise ValueError(f"{part.folder}: other per-example keys than {parts[0].folder}")
    index = np.concatenate([part.index for part in parts])
    joined = {key: np.concatenate([part.arrays[key] for part in parts]) for key in keys}
    order = np.argsort(index, kind="stable")
    for key in keys:
        joined[key] = joined[key][order]
    index = index[order]
    repeated = np.flatnonzero(np.diff(index) == 0) + 1  # the second of each pair of equal indices
    if repeated.size:
        for key in keys:
            differs = joined[key][repeated] != joined[key][repeated - 1]
            if differs.any():
                examples = index[repeated][differs]
                owners = [p.folder for p in parts if np.isin(examples, p.index).any()]
                raise ValueError(
                    f"{owners[0]} and {owners[-1]} both evaluate examples {spans(examples)} with the same "
                    f"settings but disagree on them ({key}); merge only one of them"
                )
        keep = np.ones(index.size, dtype=bool)
        keep[repeated] = False
        joined = {key: value[keep] for key, value in joined.items()}
    return joined


def evaluation_summary(parts: Sequence[Part], arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """One evaluation over all its chunks: accuracies per example, the suite's breakdown and the
    paper rows recomputed from the joined arrays, and each part's cost."""
    first = parts[0].results
    n = int(arrays["clean"].size)
    clean, robust = arrays["clean"].astype(bool), arrays["robust"].astype(bool)

    def share(vector: np.ndarray) -> dict[str, Any]:
        return {"accuracy": float(vector.mean()) if n else 0.0, "correct": int(vector.sum())}

    summary: dict[str, Any] = {
        "protocol": first.get("protocol", "paper"),
        "settings": first["settings"],
        "n": n,
        "examples": spans(arrays["index"]),
        "clean": share(clean),
        "robust": share(robust & clean),
    }
    if first.get("suite"):
        fooled_by = arrays["fooled_by"]
        attacks = []
        for k, attack in enumerate(first["suite"]["attacks"]):
            survived = clean & ((fooled_by < 0) | (fooled_by > k))
            attacks.append(
                {"label": attack["label"], "fooled": int((fooled_by == k).sum()), **share(survived)}
            )
        summary["suite"] = {"attacks": attacks, **share(arrays["suite"].astype(bool))}
    rows = []
    for i, row in enumerate(first["rows"]):
        runs = [share(arrays[f"row{i}_run{r}"].astype(bool))["accuracy"] for r in range(len(row["seeds"]))]
        rows.append(
            {"label": row["label"], "run_accuracies": runs, "worst": min(runs), "avg": sum(runs) / len(runs)}
        )
    summary["rows"] = rows
    summary["parts"] = [
        {
            "folder": str(part.folder),
            "examples": part.span(),
            "n": part.results["n"],
            "clean": part.results["clean"]["accuracy"],
            "robust": part.results["ensemble"]["accuracy"],
            "cost": part.results.get("cost") or {},
            "attack_seconds": (part.results.get("time") or {}).get("seconds"),
            "wall_seconds": part.record.get("wall_seconds"),
            "device": (part.record.get("environment") or {}).get("device_name"),
        }
        for part in sorted(parts, key=lambda p: int(p.index.min()) if p.index.size else 0)
    ]
    total: dict[str, Any] = {}
    for key in ("gradients", "naive_gradients", "forwards"):
        values = [p["cost"].get(key) for p in summary["parts"]]
        total[key] = None if None in values else sum(values)
    total["wall_seconds"] = sum(p["wall_seconds"] or 0.0 for p in summary["parts"])
    summary["cost"] = total
    return summary


def merge_results(paths: Sequence[str | os.PathLike]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Merge ``evaluate.py`` result folders per example, by test-split index.

    Folders of the same settings (protocol, every setting, batch size) are chunks of one evaluation:
    they are joined by index (an example evaluated twice must agree). Different evaluations of the
    same checkpoint, dataset and eps (other attacks, seeds) are combined per example, as the worst
    case (AND), over the examples every one of them covers. Returns the merged record and the
    per-example arrays (one evaluation: its own keys; several: each one's prefixed ``e<j>_``).
    ValueError (one line) for a folder that is not a finished result, or parts that do not fit.
    """
    if not paths:
        raise ValueError("merge needs at least one result folder or correctness.npz")
    parts = [load_part(path) for path in paths]
    check_same_model(parts)
    groups: dict[str, list[Part]] = {}
    for part in parts:
        groups.setdefault(evaluation_key(part), []).append(part)
    joined = [join_chunks(group) for group in groups.values()]
    common = joined[0]["index"]
    for arrays in joined[1:]:
        common = np.intersect1d(common, arrays["index"])
    if common.size == 0:
        a, b = (group[0] for group in list(groups.values())[:2])
        raise ValueError(
            f"{a.folder} and {b.folder} share no example and differ in settings "
            f"({first_difference(a.results['settings'], b.results['settings'])}); chunks of one evaluation "
            "need the same settings"
        )
    evaluations = [
        evaluation_summary(group, arrays) for group, arrays in zip(groups.values(), joined, strict=True)
    ]
    merged: dict[str, np.ndarray] = {"index": common}
    for j, arrays in enumerate(joined):
        at = np.searchsorted(arrays["index"], common)
        clean = arrays["clean"][at].astype(bool)
        robust = arrays["robust"][at].astype(bool) & clean
        merged["clean"] = clean if j == 0 else merged["clean"] & clean
        merged["robust"] = robust if j == 0 else merged["robust"] & robust
        if len(joined) == 1:
            merged |= {key: value for key, value in arrays.items() if key not in merged}
        else:
            merged |= {f"e{j}_{key}": value[at] for key, value in arrays.items() if key != "index"}
    merged["robust"] &= merged["clean"]
    first = parts[0].record
    n = int(common.size)
    record = {
        "merged": True,
        "checkpoint": first.get("checkpoint"),
        "dataset": (first.get("data") or {}).get("dataset"),
        "n": n,
        "examples": spans(common),
        "clean": {"accuracy": float(merged["clean"].mean()), "correct": int(merged["clean"].sum())},
        "robust": {"accuracy": float(merged["robust"].mean()), "correct": int(merged["robust"].sum())},
        "evaluations": evaluations,
        "parts": len(parts),
    }
    return record, merged


def merged_report(record: dict[str, Any], markdown: bool) -> str:
    """The merged record as ``results.md`` (``markdown``) or the terminal summary."""
    table = markdown_table if markdown else text_table
    heading = (lambda t: ["", f"## {t}", ""]) if markdown else (lambda t: ["", t])
    ckpt = record.get("checkpoint") or {}
    lines = [
        f"Checkpoint: `{ckpt.get('path')}` (sha256 {str(ckpt.get('sha256'))[:12]})",
        f"Examples: {record['n']} of the {record['dataset']} test split ({record['examples']}), "
        f"from {record['parts']} result folders",
        f"Per-example worst case over {len(record['evaluations'])} evaluation(s): clean {pct(record['clean']['accuracy'])} %, "
        f"robust {pct(record['robust']['accuracy'])} %",
    ]
    out = [f"# Merged evaluation: {record['name']}", ""] if markdown else []
    out += [f"- {line}" for line in lines] if markdown else lines
    for j, evaluation in enumerate(record["evaluations"], 1):
        s = evaluation["settings"]
        what = (
            f"suite {' -> '.join(s['suite_attacks'])}, rows {', '.join(s['paper_rows']) or 'none'}"
            if evaluation["protocol"] == "standard"
            else f"attacks {', '.join(s['attacks'])}, {s['runs']} run(s), {s['restarts']} restart(s)"
        )
        out += heading(
            f"Evaluation {j}: {evaluation['protocol']}, eps {s['eps']:g}, {what}, seed {s['seed']}; "
            f"{evaluation['n']} examples ({evaluation['examples']}): clean {pct(evaluation['clean']['accuracy'])} %, "
            f"robust {pct(evaluation['robust']['accuracy'])} %"
        )
        if evaluation.get("suite"):
            rows = [
                [a["label"], str(a["fooled"]), pct(a["accuracy"])] for a in evaluation["suite"]["attacks"]
            ]
            out.append(table(["Attack", "Fooled", "Robust after (%)"], rows))
        if evaluation["rows"]:
            runs = max(len(r["run_accuracies"]) for r in evaluation["rows"])
            rows = [
                [r["label"], *[pct(a) for a in r["run_accuracies"]], *[""] * (runs - len(r["run_accuracies"])),
                 pct(r["worst"]), pct(r["avg"])]
                for r in evaluation["rows"]
            ]  # fmt: skip
            out += ["", table(["Row", *[f"Run {i + 1}" for i in range(runs)], "Worst", "Avg"], rows)]
        header = [
            "Part",
            "Examples",
            "Clean (%)",
            "Robust (%)",
            "Gradients",
            "Naive",
            "Attacks (s)",
            "Wall (s)",
            "Device",
        ]
        rows = [
            [p["folder"], p["examples"], pct(p["clean"]), pct(p["robust"]), count(p["cost"].get("gradients")),
             count(p["cost"].get("naive_gradients")), seconds(p["attack_seconds"]), seconds(p["wall_seconds"]),
             str(p["device"] or "")]
            for p in evaluation["parts"]
        ]  # fmt: skip
        total = evaluation["cost"]
        rows.append(
            ["Total", evaluation["examples"], pct(evaluation["clean"]["accuracy"]), pct(evaluation["robust"]["accuracy"]),
             count(total["gradients"]), count(total["naive_gradients"]), "", seconds(total["wall_seconds"]), ""]
        )  # fmt: skip
        out += ["", table(header, rows)]
    return "\n".join(out) + "\n"


def seconds(value: float | None) -> str:
    return "" if value is None else f"{value:.0f}"


def write_merged(paths: Sequence[str | os.PathLike], out_dir: Path) -> str:
    """:func:`merge_results` of ``paths`` written to ``out_dir`` (``correctness.npz``, ``results.md``,
    ``results.json``); returns the terminal summary and the files written."""
    record, merged = merge_results(paths)
    record["name"] = out_dir.name
    out_dir.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out_dir / "correctness.npz", **merged)
    (out_dir / "results.md").write_text(merged_report(record, markdown=True))
    write_json_last(record, out_dir / "results.json")
    written = ", ".join(str(out_dir / name) for name in ("results.json", "results.md", "correctness.npz"))
    return merged_report(record, markdown=False) + f"wrote {written}"


def default_result_name(ckpt: Path) -> str:
    """``<parent>_<stem>`` for generic names such as ``last.ckpt``, else the file's stem."""
    stem = ckpt.stem
    generic = stem in ("last", "best", "model", "checkpoint") or stem.startswith(("epoch=", "last-"))
    if generic and ckpt.parent.name:
        return f"{ckpt.parent.name}_{stem}".replace("=", "")
    return stem


def result_folder(out_dir: Path, name: str, overwrite: bool = False) -> Path:
    """``OUT_DIR/NAME``, or ``NAME-v1``, ``-v2``... when it already holds results (unless ``overwrite``)."""
    folder, version = out_dir / name, 0
    while not overwrite and folder.exists() and any(folder.iterdir()):
        version += 1
        folder = out_dir / f"{name}-v{version}"
    return folder


def strip_timing(value: Any) -> Any:
    """``value`` without the keys that legitimately differ between identical runs (for comparisons)."""
    if isinstance(value, dict):
        return {k: strip_timing(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [strip_timing(v) for v in value]
    return value
