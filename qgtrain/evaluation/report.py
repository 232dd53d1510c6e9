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
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
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


def per_example_arrays(result: ProtocolResult | StandardResult) -> dict[str, np.ndarray]:
    """Per-example correctness for ``correctness.npz``: ``clean``, ``robust`` (the worst case over
    everything evaluated), ``row<i>_run<r>`` per row and run, and for the suite ``suite`` and
    ``fooled_by`` (index of the first suite attack that fooled each example, -1 none)."""
    arrays: dict[str, np.ndarray] = {
        "clean": result.clean.numpy(),
        "robust": result.ensemble_correct.numpy(),
        "index": np.arange(result.clean.numel()),
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
    ``partial`` (then no sweep, check or histogram runs).

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
            main = ProtocolResult(settings, runner.clean(), runner.finished_rows(settings), partial=True)
            sweep_results = []

    record: dict[str, Any] = {
        "name": "evaluation",
        "batch_size": batches.batch_size,
        "environment": environment_info(device),
        "results": main.to_dict(),
        "sweeps": [s.to_dict() for s in sweep_results],
        "_per_example": per_example_arrays(main),
    }
    checks: list[MaskingCheck] = []
    masking_start = time.perf_counter()
    partial = record["results"]["partial"]
    record["histogram"] = None
    try:
        if masking and not partial:
            checks = run_masking_checks(model, batches, main, device, loss, settings.seed)
            for sweep in sweep_results:
                checks.extend(check_sweep(sweep.parameter, sweep.values, sweep.series(), main.clean.numel()))
        if histogram_b is not None and not partial:
            x, y = next(iter(batches.head(1)))
            grad = input_gradients(model, x.to(device), y.to(device), loss).cpu()
            record["histogram"] = gradient_histograms(grad, histogram_b)
    except KeyboardInterrupt:  # the protocol's numbers are kept; the checks are marked unfinished
        record["results"]["partial"] = True
        masking = False
    warnings = [c.warning for c in checks if c.warning]
    for warning in warnings:
        log.warning("gradient masking? %s", warning)
    record["masking"] = {
        "enabled": masking and not partial,
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
        lines.append(
            f"Data: {data['dataset']} test split, first {data['n']} of {data['split_size']} examples, "
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
        lines.append(
            f"PARTIAL: interrupted; {results['n']} of {results.get('n_planned', results['n'])} examples "
            "and the finished rows only"
        )
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


def render_markdown(record: dict[str, Any]) -> str:
    """results.md: the setup, masking warnings, the Table 2-style table, sweep tables and figures."""
    out = [f"# Robustness evaluation: {record['name']}", ""]
    out += [f"- {line}" for line in describe_setup(record)]
    out += ["", "## Gradient-masking checks", ""]
    masking = record["masking"]
    if not masking["enabled"]:
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
    paths["results.json"] = out_dir / "results.json"
    paths["results.json"].write_text(json.dumps(record, indent=2, sort_keys=False, default=str) + "\n")
    paths["results.md"] = out_dir / "results.md"
    paths["results.md"].write_text(render_markdown(record))
    return paths


def merge_correctness(paths: Sequence[str | os.PathLike]) -> dict[str, np.ndarray]:
    """Merge evaluations of the same examples per example: ``clean`` and ``robust`` are the ANDs of
    the files' vectors (robust to everything any file ran). One-line error when they disagree in size."""
    if not paths:
        raise ValueError("merge needs at least one correctness.npz")
    merged: dict[str, np.ndarray] = {}
    for path in paths:
        try:
            with np.load(path) as data:
                clean, robust = data["clean"].astype(bool), data["robust"].astype(bool)
        except (OSError, KeyError, ValueError) as exc:
            raise ValueError(f"{path}: not a correctness.npz written by evaluate.py ({exc})") from None
        if merged and clean.shape != merged["clean"].shape:
            raise ValueError(
                f"{path}: {clean.size} examples but the first file has {merged['clean'].size}; "
                "merge evaluations of the same examples (--n, dataset)"
            )
        merged["clean"] = clean if not merged else merged["clean"] & clean
        merged["robust"] = robust if "robust" not in merged else merged["robust"] & robust
    merged["robust"] &= merged["clean"]
    return merged


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


def write_merged(paths: Sequence[str | os.PathLike], out_dir: Path) -> str:
    """:func:`merge_correctness` of ``paths`` written to ``out_dir/correctness.npz``; a summary line."""
    merged = merge_correctness(paths)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = merged["clean"].size
    np.savez_compressed(out_dir / "correctness.npz", **merged, index=np.arange(n))
    return (
        f"merged {len(paths)} evaluations of {n} examples: clean {100 * merged['clean'].mean():.2f}%, "
        f"robust (per-example worst case) {100 * merged['robust'].mean():.2f}%; wrote {out_dir / 'correctness.npz'}"
    )


def strip_timing(value: Any) -> Any:
    """``value`` without the keys that legitimately differ between identical runs (for comparisons)."""
    if isinstance(value, dict):
        return {k: strip_timing(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [strip_timing(v) for v in value]
    return value
