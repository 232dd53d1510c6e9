"""Run folders: a run's name, its ``-vN`` versions, and the lock that gives one process a folder.

A run writes its checkpoints to ``<checkpoint root>/<run>/`` (and its TensorBoard curves to
``<log root>/<run>/``). A new run never writes into a folder that holds another run's files: its
name gets ``-v1``, ``-v2``... instead, and :class:`RunLock` keeps two processes out of one folder.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
from pathlib import Path


def run_name(
    dataset: str,
    model: str,
    inner: str | None,
    steps: int = 0,
    b: int | None = 1,
    *,
    replays: int | None = None,
    atta: bool = False,
    objective: str = "madry",
    awp_gamma: float = 0.0,
    ema: bool = False,
) -> str:
    """``<dataset>-<model>-<inner>-k<steps>-b<b>`` (``<dataset>-<model>-standard`` without an inner
    attack), e.g. ``mnist-madry_mnist-pqgd-k10-b100``; ``b=None`` (an attack that takes no
    quantization level: RGD, FAB-T, Square) drops ``-b<b>``. Then what else changes the method: free
    training's ``-m<replays>``, ``-atta``, an objective other than madry (``-trades``, ``-mart``),
    AWP's ``-awp<gamma>`` and weight averaging's ``-ema``."""
    quantized = "" if b is None else f"-b{b}"
    name = f"{dataset}-{model}-standard" if inner is None else f"{dataset}-{model}-{inner}-k{steps}{quantized}"
    extras = [
        f"m{replays}" if replays else "",
        "atta" if atta else "",
        objective if objective != "madry" else "",
        f"awp{awp_gamma:g}" if awp_gamma else "",
        "ema" if ema else "",
    ]
    return "-".join([name, *(extra for extra in extras if extra)])


def check_run_name(name: str, flag: str = "--run-name") -> str:
    """``name`` when it is one path component (a folder under the checkpoint and log roots), else a
    one-line ``ValueError`` naming ``flag``: empty, ``.``, ``..`` or a path separator would put the
    run's files outside its root, where ``--resume last`` cannot find them."""
    separators = {"/", os.sep, *([os.altsep] if os.altsep else [])}
    if not name or name in (".", "..") or any(sep in name for sep in separators) or "\0" in name:
        raise ValueError(
            f"{flag} {name!r}: a name must be one folder name (not empty, '.', '..', no '/'); "
            "choose a plain name such as my-run"
        )
    return name


def unique_run_name(checkpoint_root: Path, base: str) -> str:
    """``base``, or ``base-v1``, ``base-v2``... so a new run never writes into a folder that holds
    another run's files (its checkpoints, or the lock of a run writing there now; the lock file of a
    run killed before its first checkpoint is not held, and takes nothing)."""
    def taken(name: str) -> bool:
        folder = checkpoint_root / name
        return (folder.is_dir() and any(folder.iterdir())) or RunLock(folder).held()

    name, version = base, 0
    while taken(name):
        version += 1
        name = f"{base}-v{version}"
    return name


def run_versions(checkpoint_root: Path, base: str) -> list[Path]:
    """``base``, ``base-v1``, ``base-v2``... that exist under ``checkpoint_root``, oldest first."""
    pattern = re.compile(rf"{re.escape(base)}(?:-v(\d+))?")
    versions = []
    if checkpoint_root.is_dir():
        for entry in checkpoint_root.iterdir():
            match = pattern.fullmatch(entry.name)
            if match and entry.is_dir():
                versions.append((int(match.group(1) or 0), entry))
    return [path for _, path in sorted(versions)]


class RunLock:
    """Exclusive ownership of a run folder by one process: an ``fcntl.flock`` on ``.<run>.lock``
    beside it (holding the owner's PID; beside, not inside, so the folder holds only the run's
    files), released when the process exits, however it exits, so no lock goes stale. A second
    writer gets :class:`RunFolderBusyError`. :meth:`release` removes the file while still holding the
    lock; :meth:`acquire` re-checks that the locked file is still the one at the path."""

    def __init__(self, folder: Path) -> None:
        folder = Path(folder)
        self.folder = folder
        self.path = folder.parent / f".{folder.name}.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise RunFolderBusyError(self.folder, self._owner()) from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:  # not a file its previous owner removed after we opened it
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def held(self) -> bool:
        """Whether a live process holds this lock. A killed owner's file stays behind (only a clean
        :meth:`release` removes it) but its ``flock`` went with the process."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except (FileNotFoundError, NotADirectoryError, PermissionError):  # the start checks refuse a bad root
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            return True
        finally:
            os.close(fd)  # closing releases the probe's shared lock
        return False

    def _owner(self) -> str:
        try:
            return self.path.read_text().strip() or "?"
        except OSError:
            return "?"

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)  # closing releases the lock
            self._fd = None


class RunFolderBusyError(RuntimeError):
    """Another process is writing this run folder now."""

    def __init__(self, folder: Path, pid: str) -> None:
        super().__init__(
            f"{folder} is being written by another training process (pid {pid}); wait for it to end, "
            "or start this run under another --run-name"
        )
