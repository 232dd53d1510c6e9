"""The checkpoint file format: written atomically (complete and loadable, or absent), read with
``torch.load(..., weights_only=True)`` (no pickled code runs), identified by its SHA-256; and the
start-up probe that an output folder can be written.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

TRAINED_WEIGHTS = "current_model_state"
"""Where Lightning's ``WeightAveraging`` callbacks (``train.py --ema``) put the trained weights of a
checkpoint whose ``state_dict`` they replace with the averaged ones (``on_save_checkpoint``)."""


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the one-line message names the file and the fix."""


def file_sha256(path: Path) -> str:
    """The file's SHA-256, hex (the evaluation record's identity of a checkpoint)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_checkpoint(path: str | os.PathLike) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with one-line errors."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory; pass the .ckpt/.pt file inside it")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); the save was interrupted")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower():
            raise CheckpointError(
                f"refusing to load {path}: it holds pickled Python objects other than tensors and plain "
                "containers (weights_only=True), or is not a PyTorch file; only checkpoints written by "
                "qgtrain or torch.save(model.state_dict()) are accepted"
            ) from None
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({first_line(exc)})") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror or first_line(exc)}") from None
    except Exception as exc:  # the unpickler raises anything (IndexError, KeyError...) on garbage
        if "zip archive" in str(exc) or isinstance(exc, EOFError | zipfile.BadZipFile):
            reason = "truncated or corrupt"
        else:
            reason = "not a PyTorch checkpoint"
        raise CheckpointError(
            f"cannot load {path}: {reason} ({type(exc).__name__}: {first_line(exc)[:120]}); "
            "re-copy or re-save the checkpoint"
        ) from None


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`atomic_write`."""
    atomic_write(path, lambda handle: torch.save(obj, handle))


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> None:
    """``write(handle)`` into a temporary file in the same folder, fsync, then rename over ``path``:
    ``path`` is complete or as it was, never half written (the one atomic write; benchmarks use it).
    An ``OSError`` (a full disk: ``ENOSPC``) is raised again naming ``path``, of the same kind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:  # a write or fsync error carries no file name: name the target
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
    finally:
        if tmp.exists():
            tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that never leaves a truncated file and loads with ``weights_only=True``."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(
        self, path: Any, map_location: Any = "cpu", weights_only: bool | None = None
    ) -> dict[str, Any]:
        return read_checkpoint(path)  # weights_only=True; one-line CheckpointError on any failure


class OutputFolderError(ValueError):
    """An output folder cannot be written; the one-line message names it and the fix."""


def check_writable(folder: Path, what: str) -> None:
    """Fail at start, not after an epoch, when an output folder cannot be written
    (:class:`OutputFolderError`).

    Folders created for the probe are removed again, so a run that fails later at start-up (a bad
    config value) leaves nothing behind; Lightning creates them when it first writes.
    """
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        try:
            with open(probe, "wb") as handle:
                handle.write(b"\0" * 65536)
                handle.flush()
                os.fsync(handle.fileno())
        finally:
            probe.unlink(missing_ok=True)
    except OSError as exc:
        raise OutputFolderError(
            f"cannot write the {what} folder {folder}: {exc.strerror or exc}; choose another"
        ) from None
    finally:
        for path in created:  # deepest first
            try:
                path.rmdir()
            except OSError:
                pass  # not empty (another run wrote there meanwhile) or never made


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
