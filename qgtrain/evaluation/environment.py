"""What an evaluation runs on: the device it is given, the progress bar it shows, and the library
versions and device facts recorded in ``results.json``."""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from typing import Any

import torch

from qgtrain import __version__
from qgtrain.evaluation.runner import Progress

PACKAGES = ("torch", "torchvision", "lightning", "torchmetrics", "numpy", "matplotlib", "tqdm")
"""The libraries whose versions ``results.json`` records."""


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

    # delay > 0: no first line with total=0; the bar shows once the planner sets the batch count
    with tqdm(total=0, unit="batch", desc="attacking", dynamic_ncols=True, file=sys.stderr, delay=1e-6) as bar:
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

