"""Resume points: which checkpoint a run continues from, whether there is anything left to train,
and what a resumed run continues (its folder, its epoch and step, its TensorBoard curves).

A run folder holds up to three resumable checkpoints: ``step.ckpt`` (inside an epoch, see
:class:`~qgtrain.checkpoints.callbacks.StepCheckpoint`), ``last.ckpt`` (end of every epoch) and
``interrupted.ckpt`` (Ctrl-C, SIGTERM, SIGUSR1). The resume point is the one furthest along in
training (global step, then completed epochs; the newest written on a tie), whatever the files'
modification times say (a copied folder has new ones). ``interrupted.ckpt`` is removed once the run
resumed from it has written a newer checkpoint, which supersedes it.

Epochs are numbered from 0 everywhere, as Lightning's progress bar (``Epoch 0``), its ``epoch``
scalar in TensorBoard and ``checkpoint["epoch"]`` count them.
"""

from __future__ import annotations

import logging
import re
import shlex
from pathlib import Path
from typing import Any

import lightning as L
import torch

from qgtrain.checkpoints.files import CheckpointError, read_checkpoint
from qgtrain.checkpoints.run_folders import run_versions, unique_run_name

log = logging.getLogger(__name__)

INTERRUPTED_CHECKPOINT = "interrupted.ckpt"
RESUMABLE = ("step.ckpt", "last.ckpt", INTERRUPTED_CHECKPOINT)
LOG_VERSION = re.compile(r"version_(\d+)")


class ResumeError(ValueError):
    """``--resume`` cannot continue this run; the one-line message says why and what to pass."""


def training_progress(path: Path) -> tuple[int, int]:
    """``(global step, completed epochs)`` of a checkpoint file, read through a memory map (only the
    counters are touched); ``(-1, -1)`` when the file cannot be read (it then ranks last)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(checkpoint.get("global_step", 0)), completed_epochs(checkpoint)
    except Exception as exc:  # empty, truncated or foreign: read_checkpoint says why if it is chosen
        log.warning("cannot read %s to rank it among the resume points (%s)", path, type(exc).__name__)
        return -1, -1


def furthest_resumable(folder: Path) -> Path | None:
    """The resumable checkpoint of ``folder`` furthest along in training, or ``None``: the highest
    global step, then the most completed epochs (``last.ckpt`` after a ``step.ckpt`` of the epoch's
    last batch), then the newest written. A stale ``interrupted.ckpt`` of an earlier session never
    wins over a ``last.ckpt`` that trained further, whichever file is newer on disk."""
    found = [folder / name for name in RESUMABLE if (folder / name).is_file()]
    return max(found, key=lambda p: (*training_progress(p), p.stat().st_mtime_ns)) if found else None


def latest_checkpoint(checkpoint_root: Path, base: str) -> Path | None:
    """:func:`furthest_resumable` of the newest run named ``base`` (or ``base-vN``) that has one."""
    for run in reversed(run_versions(checkpoint_root, base)):
        found = furthest_resumable(run)
        if found is not None:
            return found
    return None


def resolve_resume(resume: str, checkpoint_root: Path, base: str) -> Path:
    """A ``.ckpt`` file; a run folder (the one of ``step.ckpt``, ``last.ckpt``, ``interrupted.ckpt``
    furthest along); or ``last``: that checkpoint of the newest run named ``base`` or ``base-vN``."""
    if resume == "last":
        path = latest_checkpoint(checkpoint_root, base)
        if path is None:
            raise ResumeError(
                f"--resume last: no checkpoint of a run named {base} (or {base}-vN) in "
                f"{checkpoint_root}; pass a .ckpt file or a run folder"
            )
        return path
    path = Path(resume)
    if path.is_dir():
        found = furthest_resumable(path)
        if found is None:
            raise ResumeError(f"--resume: no checkpoint ({', '.join(RESUMABLE)}) in {path}")
        return found
    if not path.is_file():
        raise ResumeError(f"--resume: no checkpoint at {path}; pass a .ckpt file, a run folder, or 'last'")
    return path


def completed_epochs(checkpoint: dict[str, Any]) -> int:
    """Epochs whose batches were all trained when ``checkpoint`` was written (Lightning's fit-loop
    progress: ``processed`` counts an epoch before its end hooks, which write ``last.ckpt``, run)."""
    try:
        return int(checkpoint["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"])
    except (KeyError, TypeError):
        return int(checkpoint.get("epoch", 0))


def resumes_at(checkpoint: dict[str, Any]) -> tuple[int, int]:
    """``(epoch, global step)`` where a run resumed from ``checkpoint`` continues, the epoch as the
    progress bar numbers it: a ``last.ckpt`` written at the end of epoch 0 continues in epoch 1."""
    epoch = max(int(checkpoint.get("epoch", 0)), completed_epochs(checkpoint))
    return epoch, int(checkpoint.get("global_step", 0))


def finished_message(
    checkpoint: dict[str, Any], path: Path, max_epochs: int | None, max_steps: int
) -> str | None:
    """Why resuming ``checkpoint`` would train nothing (and how to extend the run), else ``None``."""
    epochs, step = completed_epochs(checkpoint), int(checkpoint.get("global_step", 0))
    # free training's epochs are data passes / replays; --epochs (max_epochs) counts data passes
    replays = int(((checkpoint.get("qgtrain") or {}).get("inner") or {}).get("replays", 1))
    epochs, unit = epochs * replays, "data passes" if replays > 1 else "epochs"
    if max_steps is not None and max_steps > 0 and step >= max_steps:
        return (
            f"the run in {path.parent} is finished ({step} of max_steps={max_steps} steps in {path.name}); "
            f"to train longer resume with a larger --trainer.max_steps"
        )
    if max_epochs is not None and max_epochs > 0 and epochs >= max_epochs and (max_steps or -1) <= 0:
        return (
            f"the run in {path.parent} is finished ({epochs} of {max_epochs} {unit} in {path.name}); "
            f"to train longer resume with --epochs N (N > {epochs})"
        )
    return None


def start_point(
    name: str | None,
    resume: str | None,
    checkpoint_root: Path,
    base: str,
    max_epochs: int | None,
    max_steps: int,
) -> tuple[str, Path | None, dict[str, Any] | None]:
    """``(run name, checkpoint path, checkpoint)`` of a run: a new one is ``name``, else ``base``,
    with ``-vN`` when that folder holds another run's files (whoever chose the name); with
    ``resume`` the run of that checkpoint, read without pickle code (a ``name`` that would write
    into another run's folder gets ``-vN`` too). A checkpoint that is crafted, or of a finished run,
    is refused with :class:`ResumeError`."""
    if not resume:
        return unique_run_name(checkpoint_root, name or base), None, None
    path = resolve_resume(resume, checkpoint_root, base)
    try:
        checkpoint = read_checkpoint(path)
    except CheckpointError as exc:
        raise ResumeError(f"--resume: {exc}") from None
    finished = finished_message(checkpoint, path, max_epochs, max_steps)
    if finished:
        raise ResumeError(f"--resume: {finished}")
    run = path.parent.name if name is None or resume == "last" else name  # last: the version it found
    folder = checkpoint_root / run
    if folder.resolve() != path.parent.resolve() and folder.is_dir() and any(folder.iterdir()):
        run = unique_run_name(checkpoint_root, run)  # not the resumed run's folder: another run's
    return run, path, checkpoint


def resume_command(script: str, argv: list[str], checkpoint: str | Path) -> str:
    """The command line that continues this run: ``argv`` without its ``--resume``, plus ``--resume``."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--resume":
            skip = True
        elif not arg.startswith("--resume="):
            kept.append(arg)
    return shlex.join(["python", script, *kept, "--resume", str(checkpoint)])


def first_logged_step(checkpoint: dict[str, Any]) -> int:
    """The logger step at which a run resumed from ``checkpoint`` logs first: Lightning's
    ``_batches_that_stepped``, plus the one that ``TrainingEpochLoop.reset`` adds for a checkpoint
    written in a batch's end hooks (a step checkpoint: that batch processed, not yet completed).
    Under free training it counts batches, not the replays' optimizer steps of ``global_step``."""
    try:
        loop = checkpoint["loops"]["fit_loop"]
        stepped = int(loop["epoch_loop.state_dict"]["_batches_that_stepped"])
        batches = loop["epoch_loop.batch_progress"]["total"]
        return stepped + int(batches["processed"] > batches["completed"])
    except (KeyError, TypeError):
        return int(checkpoint.get("global_step", 0))


def log_continuation(log_folder: Path, checkpoint: dict[str, Any] | None) -> dict[str, int]:
    """``TensorBoardLogger`` arguments that make a resumed run continue its run's curves.

    ``version``: the newest ``log_folder/version_N`` (a run folder's versions are all that run's, as
    its checkpoint folder is), instead of a new ``version_N+1``. ``purge_step``: the resumed run's
    :func:`first_logged_step`; its event file starts with a marker there, and TensorBoard drops what
    the stopped run logged at that step and after (the resumed run logs those steps again), so each
    step has one value. ``{}`` for a new run, or when the folder has no version yet.
    """
    if checkpoint is None or not log_folder.is_dir():
        return {}
    versions = [int(m.group(1)) for p in log_folder.iterdir() if (m := LOG_VERSION.fullmatch(p.name))]
    if not versions:
        return {}
    return {"version": max(versions), "purge_step": first_logged_step(checkpoint)}


def remove_superseded_interrupt(trainer: L.Trainer, folder: Path, written: Path) -> None:
    """Remove ``folder/interrupted.ckpt`` after ``written`` (a newer ``last.ckpt`` or ``step.ckpt``)
    when this run resumed from it: the run continued that checkpoint, so ``written`` holds all of it
    and more. An ``interrupted.ckpt`` this run did not start from is left alone."""
    interrupted = folder / INTERRUPTED_CHECKPOINT
    source = trainer.ckpt_path
    if not trainer.is_global_zero or not source or written.resolve() == interrupted.resolve():
        return
    if Path(source).resolve() == interrupted.resolve() and interrupted.is_file():
        interrupted.unlink()
        log.info("removed %s: superseded by %s (step %d)", interrupted, written.name, trainer.global_step)
