"""Safe reading of checkpoint files (``weights_only``), shared by training (resume) and evaluation,
and the start-up probe that an output folder can be written.

A neutral module below both: ``qgtrain.training`` and ``qgtrain.evaluation`` import it, neither
imports the other for it.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the one-line message names the file and the fix."""


def file_sha256(path: Path) -> str:
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
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({_first_line(exc)})") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror or _first_line(exc)}") from None
    except Exception as exc:  # the unpickler raises anything (IndexError, KeyError...) on garbage
        if "zip archive" in str(exc) or isinstance(exc, EOFError | zipfile.BadZipFile):
            reason = "truncated or corrupt"
        else:
            reason = "not a PyTorch checkpoint"
        raise CheckpointError(
            f"cannot load {path}: {reason} ({type(exc).__name__}: {_first_line(exc)[:120]}); "
            "re-copy or re-save the checkpoint"
        ) from None


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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
