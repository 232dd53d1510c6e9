"""Helpers shared by the benchmark scripts: threads, MNIST tensors, tables, JSON, the command line.

Data, batching, attacks and accuracy come from the library (``qgtrain.data``,
``qgtrain.evaluation``); nothing here re-implements an attack loop, a batcher or an accuracy counter.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from qgtrain.attacks.base import DEFAULT_EPS
from qgtrain.checkpoints import atomic_write
from qgtrain.data import DataError, MNISTDataModule
from qgtrain.evaluation import TensorBatches

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "out"
EPS = DEFAULT_EPS


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Arguments every benchmark takes: threads, output folder, data folder, seed."""
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: leaves the other core of a shared 2-core machine free)",
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="output folder (default benchmarks/out)"
    )
    parser.add_argument("--data-dir", default=None, help="dataset root (default: $QGTRAIN_DATA or ./data)")
    parser.add_argument("--seed", type=int, default=0, help="seed for initialisation, data order, attacks")


def fail(message: str) -> None:
    """One-line error, exit status 2 (the house rule for bad input)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def setup_threads(threads: int) -> None:
    if threads < 1:
        fail(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            names = [line.split(":", 1)[1].strip() for line in info if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or "cpu"


def environment(threads: int) -> dict[str, Any]:
    """What the numbers were measured on."""
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else cpu_model()
    return {
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "command": invocation(),
    }


def invocation() -> str:
    """The command line that runs this benchmark again: ``python -m benchmarks.<name> ...`` for a
    script of this package (``sys.argv[0]`` is its file under ``-m``), else ``python`` and argv."""
    script = Path(sys.argv[0])
    if script.suffix == ".py" and script.resolve().parent == Path(__file__).resolve().parent:
        return " ".join(["python", "-m", f"{__package__}.{script.stem}", *sys.argv[1:]])
    return " ".join(["python", *sys.argv])


def mnist_datamodule(
    data_dir: str | None, train_subset: int | None, val_size: int, batch_size: int, seed: int
) -> MNISTDataModule:
    """The library's MNIST module, set up for fit and test (no download: the files must be there)."""
    try:
        dm = MNISTDataModule(
            data_dir=data_dir,
            batch_size=batch_size,
            eval_batch_size=250,
            val_size=val_size,
            train_subset=train_subset,
            download=False,
            seed=seed,
        )
        dm.prepare_data()
        dm.setup("fit")
        dm.setup("test")
    except DataError as exc:
        fail(str(exc).splitlines()[0])
    return dm


def dataset_tensors(dataset: Any, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` examples of an in-memory dataset as ``(x in [0,1], y)`` tensors."""
    n = len(dataset) if n is None else min(n, len(dataset))
    xs, ys = zip(*(dataset[i] for i in range(n)), strict=True)
    return torch.stack(xs), torch.as_tensor(ys)


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> TensorBatches:
    """The library's fixed batches over in-memory ``(x, y)`` (re-iterable, same batches every time)."""
    return TensorBatches(x, y, batch_size)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], title: str = "") -> str:
    """A fixed-width text table; floats with 2 decimals."""

    def cell(value: Any) -> str:
        if value is None:
            return "—"
        if isinstance(value, float):
            return f"{value:.2f}"
        return str(value)

    body = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in body)) if body else len(c) for i, c in enumerate(columns)]
    lines = [title] if title else []
    lines.append("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in body)
    return "\n".join(lines)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write through the library's :func:`~qgtrain.checkpoints.files.atomic_write`: a killed
    run leaves no half file."""
    text = json.dumps(payload, indent=2, default=str) + "\n"
    atomic_write(path, lambda handle: handle.write(text.encode()))
