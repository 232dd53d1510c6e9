"""The cheap-training study's record: every machine's judged rows in one committed JSON file.

A study's outputs (checkpoints, logs, ``results.json``) stay on the machine that made them; the
record keeps, per budget and run, the cost, the label and per seed (``"S"``) what ``--report`` reads
from them (clean, pair and whole-suite robust %, the monitor and the training attack per epoch, when
it was judged, and which of the judged images the pair left robust, packed: :func:`packed`). A report
on another machine merges its own judgements over it, seed by seed, so a study that spans machines
still reports, ranks, plots and pairs every run it judged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import write_json

RECORD = Path(__file__).resolve().parent / "records" / "cheap_training.json"
Rows = dict[str, dict[str, Any]]  # run -> {"cost", "label", "one_gradient", "seeds": {"S": {...}}}


def per_seed(row: dict[str, Any], key: str) -> list[Any]:
    """``key`` of each of the row's seeds that has it, in seed order."""
    return [row["seeds"][s][key] for s in sorted(row["seeds"], key=int) if key in row["seeds"][s]]


def packed(robust: np.ndarray) -> str:
    """Per-example booleans (images 0 .. n-1) as hex, 8 images a byte (1,000 images: 250 characters)."""
    return np.packbits(np.asarray(robust, dtype=bool)).tobytes().hex()


def unpacked(text: str, n: int) -> np.ndarray:
    """:func:`packed`'s ``n`` booleans back."""
    return np.unpackbits(np.frombuffer(bytes.fromhex(text), dtype=np.uint8), count=n).astype(bool)


def merged(recorded: Rows, measured: Rows) -> Rows:
    """``recorded`` with ``measured`` over it seed by seed; seeds and runs only the record has are kept."""
    over = lambda run, row: {**row, "seeds": {**recorded.get(run, {}).get("seeds", {}), **row["seeds"]}}  # noqa: E731
    return {**recorded, **{run: over(run, row) for run, row in measured.items()}}


def read_record(path: Path | None) -> dict[str, Rows]:
    """The record's budgets (none when ``path`` is None or absent)."""
    return json.loads(path.read_text())["budgets"] if path is not None and path.is_file() else {}


def write_record(path: Path, budgets: dict[str, Rows]) -> None:
    """``budgets`` over the record's own, budget by budget (others stay), written atomically."""
    write_json(path, {"budgets": {**read_record(path), **budgets}})
