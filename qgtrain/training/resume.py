"""Run folders: a run's name and version, where it resumes from, whether a checkpoint fits it, and
what a resumed run must restore (issue 14, exact mid-epoch resume).

A run folder holds up to three resumable checkpoints: ``step.ckpt`` (inside an epoch, see
:class:`~qgtrain.training.checkpoint_io.StepCheckpoint`), ``last.ckpt`` (end of every epoch) and
``interrupted.ckpt`` (Ctrl-C, SIGTERM, SIGUSR1). The resume point is the one furthest along in
training (global step, then completed epochs; the newest written on a tie), whatever the files'
modification times say (a copied folder has new ones). ``interrupted.ckpt`` is removed once the run
resumed from it has written a newer checkpoint, which supersedes it.

Epochs are numbered from 0 everywhere, as Lightning's progress bar (``Epoch 0``), its ``epoch``
scalar in TensorBoard and ``checkpoint["epoch"]`` count them.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import shlex
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from qgtrain.checkpoint_files import CheckpointError, read_checkpoint

log = logging.getLogger(__name__)

INTERRUPTED_CHECKPOINT = "interrupted.ckpt"
RESUMABLE = ("step.ckpt", "last.ckpt", INTERRUPTED_CHECKPOINT)
LOG_VERSION = re.compile(r"version_(\d+)")


class ResumeError(ValueError):
    """``--resume`` cannot continue this run; the one-line message says why and what to pass."""


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
    another run's files (its checkpoints, or the lock of a run writing there now)."""
    def taken(name: str) -> bool:
        folder = checkpoint_root / name
        return (folder.is_dir() and any(folder.iterdir())) or RunLock(folder).path.exists()

    name, version = base, 0
    while taken(name):
        version += 1
        name = f"{base}-v{version}"
    return name


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


RUN_RECORD_FLAGS = {
    "dataset": "--dataset",
    "net": "--net",
    "objective": "--model.objective",
    "inner": "--inner",
    "eps": "--eps",
    "optimizer": "--model.optimizer",
}
"""What defines a run (recorded in ``checkpoint["qgtrain"]``) and the flag that sets each."""


def run_record(module: L.LightningModule, dataset: str | None, optimizer: Any) -> dict[str, Any]:
    """This run's values of :data:`RUN_RECORD_FLAGS`, as a checkpoint records them."""
    from qgtrain.models import model_spec

    try:
        net = describe_net(model_spec(module.net), type(module.net).__name__)
    except ValueError:
        net = type(module.net).__name__
    inner = getattr(module, "inner", None)
    return {
        "dataset": dataset,
        "net": net,
        "objective": module.hparams.get("objective"),
        "inner": inner.name if inner is not None else "none",
        "eps": float(inner.eps) if inner is not None else None,
        "optimizer": f"{type(optimizer).__module__}.{type(optimizer).__qualname__}",
    }


def recorded_run(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's values of :data:`RUN_RECORD_FLAGS`; a key an older checkpoint did not
    record is absent (then it is not compared)."""
    meta = checkpoint.get("qgtrain") or {}
    record: dict[str, Any] = {}
    if meta.get("dataset"):
        record["dataset"] = meta["dataset"]
    if meta.get("net"):
        record["net"] = describe_net(meta["net"], "")
    if "objective" in meta:
        record["objective"] = meta["objective"]
    if "inner" in meta:
        inner = meta["inner"] or {}
        record["inner"] = inner.get("name", "none")
        record["eps"] = float(inner["eps"]) if "eps" in inner else None
    if meta.get("optimizer"):
        record["optimizer"] = meta["optimizer"]
    return record


def record_differences(
    checkpoint: dict[str, Any], this_run: dict[str, Any], optimizer: Any
) -> list[tuple[str, Any, Any]]:
    """``(key, recorded, this run's)`` for each defining value that differs. An optimizer that an
    older checkpoint did not record is compared by the names of its state (``momentum`` for SGD,
    ``betas`` for Adam): loading another class's state fails inside Lightning."""
    recorded = recorded_run(checkpoint)
    differences = [
        (key, recorded[key], this_run[key])
        for key in RUN_RECORD_FLAGS
        if key in recorded and recorded[key] != this_run[key]
        and not (key == "eps" and recorded[key] is not None and this_run[key] is not None
                 and abs(recorded[key] - this_run[key]) < 1e-9)
    ]  # fmt: skip
    if "optimizer" not in recorded:
        saved = checkpoint.get("optimizer_states") or []
        wanted = optimizer.state_dict()["param_groups"]
        if saved and saved[0].get("param_groups") and wanted:
            ignore = {"params", "initial_lr"}
            saved_keys = set(saved[0]["param_groups"][0]) - ignore
            if not set(wanted[0]) - ignore <= saved_keys:
                differences.append(("optimizer", "another optimizer", this_run["optimizer"]))
    return differences


def describe_net(spec: dict[str, Any] | None, fallback: str) -> str:
    """``madry_mnist()`` / ``tiny_cnn(width=8)`` from a ``model_spec``, else ``fallback``."""
    if not spec:
        return fallback
    kwargs = ", ".join(f"{key}={value}" for key, value in sorted(spec.get("kwargs", {}).items()))
    return f"{spec['name']}({kwargs})"


def check_resume_compatible(
    checkpoint: dict[str, Any],
    path: Path,
    module: L.LightningModule,
    world_size: int,
    averaging: bool = False,
) -> None:
    """The network and the number of training processes must be the checkpoint's (one line, else
    Lightning fails with a size-mismatch traceback or resumes a different data shard), and a
    checkpoint with averaged weights needs a run that averages (``averaging``): without, Lightning
    would continue training from its ``state_dict``, the averaged weights, not the trained ones."""
    from qgtrain.evaluation.checkpoints import TRAINED_WEIGHTS
    from qgtrain.models import model_spec

    saved, wanted = checkpoint.get("state_dict", {}), module.state_dict()
    same_shapes = saved.keys() == wanted.keys() and all(
        tuple(saved[key].shape) == tuple(wanted[key].shape) for key in wanted
    )
    meta = checkpoint.get("qgtrain") or {}
    if not same_shapes:
        try:
            requested = model_spec(module.net)
        except ValueError:
            requested = None
        raise ResumeError(
            f"--resume: {path} holds a {describe_net(meta.get('net'), 'different network')} network, "
            f"this run builds {describe_net(requested, type(module.net).__name__)}; pass the "
            "checkpoint's --model / --config"
        )
    if TRAINED_WEIGHTS in checkpoint and not averaging:
        raise ResumeError(
            f"--resume: {path} holds averaged weights (it was trained with --ema); resume with --ema"
        )
    processes = meta.get("world_size")
    if processes is not None and processes != world_size:
        raise ResumeError(
            f"--resume: {path} was written by {processes} training process(es), this run has "
            f"{world_size}; resume with the same --devices and --num-nodes"
        )


def check_run_record(
    checkpoint: dict[str, Any], path: Path, this_run: dict[str, Any], optimizer: Any, override: bool
) -> list[tuple[str, Any, Any]]:
    """The differences between what ``checkpoint`` records (dataset, network, objective, inner
    attack, eps, optimizer) and this run: without ``override`` the first is refused in one line
    naming the flag that resumes as recorded; with it they are returned (logged by the caller, kept
    in the new checkpoints by :class:`WeightsOrigin`)."""
    differences = record_differences(checkpoint, this_run, optimizer)
    if differences and not override:
        key, recorded, wanted = differences[0]
        also = f" (and {', '.join(d[0] for d in differences[1:])})" if len(differences) > 1 else ""
        as_recorded = f"{RUN_RECORD_FLAGS[key]} {recorded}" if recorded != "another optimizer" else (
            f"{RUN_RECORD_FLAGS[key]} of the run that wrote it"
        )
        raise ResumeError(
            f"--resume: {path} was trained with {key} {recorded}, this run has {wanted}{also}; resume "
            f"with {as_recorded}, or pass --resume-override to continue its weights with this run's"
        )
    return differences


class WeightsOrigin(Callback):
    """Where a run's weights came from when ``--resume-override`` continued a checkpoint of another
    run definition: the checkpoint's path and the recorded values that changed, kept in every
    checkpoint of the run (Lightning's callback state, restored on a later resume, so the history
    accumulates). A changed optimizer starts fresh: its state is dropped from the loaded checkpoint
    (Lightning zips the optimizers with the saved states, so an empty list loads none)."""

    def __init__(self) -> None:
        self.history: list[dict[str, Any]] = []
        self._pending: dict[str, Any] | None = None

    def continue_changed(self, path: Path, differences: list[tuple[str, Any, Any]]) -> None:
        self._pending = {
            "checkpoint": str(path),
            "changed": {key: {"recorded": str(old), "now": str(new)} for key, old, new in differences},
        }

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._pending is not None and "optimizer" in self._pending["changed"]:
            checkpoint["optimizer_states"] = []  # another class: its state cannot be loaded
            checkpoint["lr_schedulers"] = []

    def state_dict(self) -> dict[str, Any]:
        history = self.history + ([self._pending] if self._pending is not None else [])
        return {"weights_from": history} if history else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("weights_from", []))


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


def slurm_requeued() -> bool:
    """True in a SLURM job that was requeued (``SLURM_RESTART_COUNT`` >= 1)."""
    return "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0


class RestoreLoaderState(Callback):
    """Hand the checkpoint's ``StatefulDataLoader`` state to the loader when Lightning did not, and
    give the epoch resumed inside it its progress bar.

    Lightning 2.6 restores a stateful loader in ``FitLoop.setup_data``, but when
    ``configure_optimizers`` reads ``trainer.estimated_stepping_batches`` (as
    :class:`~qgtrain.training.AdversarialTraining` does for its LR schedule), the loader was set up
    before the checkpoint was read, and the state is silently dropped (Lightning issue #20550):
    the resumed epoch would start again at its first batch. At ``on_train_start`` the fit loop has
    read the checkpoint; this loads the pending state through the fit loop's own method (which
    applies it only when restarting inside an epoch) and recreates the batch iterator from it.

    An epoch resumed inside gets no ``on_train_epoch_start`` (it started before the checkpoint), the
    hook in which the progress bar sets the epoch's total and its ``Epoch N`` label: the bar would
    count ``80/?``. Before the first resumed batch the progress bar's hook is called, and a tqdm
    bar starts at the batches already done (``80/550``, its rate from the resumed batches only).
    """

    def __init__(self) -> None:
        self._resumed_inside_epoch = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loop = trainer.fit_loop
        self._resumed_inside_epoch = loop.restarted_mid_epoch
        if not getattr(loop, "_combined_loader_states_to_load", None) or loop._data_fetcher is None:
            return
        loop._load_combined_loader_states()
        if not loop._combined_loader_states_to_load:  # loaded: iterate from the restored position
            iter(loop._data_fetcher)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self._resumed_inside_epoch:
            return
        self._resumed_inside_epoch = False
        bar = trainer.progress_bar_callback
        if bar is None:
            return
        bar.on_train_epoch_start(trainer, pl_module)
        tqdm_bar = getattr(bar, "train_progress_bar", None)  # TQDMProgressBar; Rich counts from the update
        if tqdm_bar is not None and hasattr(tqdm_bar, "initial"):
            tqdm_bar.initial = tqdm_bar.n = batch_idx
            tqdm_bar.refresh()
