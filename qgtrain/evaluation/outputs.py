"""An evaluation's files and folders: ``results.json``, ``results.md``, ``correctness.npz`` (per
example, by test-split index) and the figures; result folders (``-vN`` versions, finished results);
and the merge of result folders per example (chunks of one evaluation, and several evaluations of
one checkpoint).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qgtrain.evaluation.plots import plot_histograms, plot_rows, plot_suite, plot_sweep
from qgtrain.evaluation.rendering import merged_report, render_markdown
from qgtrain.evaluation.runner import ProtocolResult, StandardResult

TIMING_KEYS = frozenset(
    {"run_seconds", "seconds", "estimated_seconds", "wall_seconds", "created", "masking_seconds"}
)
"""Keys whose values differ between identical runs (everything else is reproducible)."""


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

