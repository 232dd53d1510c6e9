"""Interruption: on Ctrl-C, SIGTERM, SIGHUP and SIGUSR1 during training save ``interrupted.ckpt``
(atomically) and stop cleanly; under SLURM requeue the job, which then resumes by itself.

Lightning's ``_SignalConnector`` turns SIGTERM into a flag that its loops check after every training
batch; they then raise ``SIGTERMException`` (under DDP after broadcasting the flag from rank 0, so
every rank stops at the same batch). SIGUSR1, what SLURM sends before a time limit
(``#SBATCH --signal=USR1@90``), and the first Ctrl-C are routed through the same handler. Lightning's own SLURM SIGUSR1
handler is replaced: it saves ``hpc_ckpt_N.ckpt`` in the middle of whatever the process is doing
(the signal interrupts a training step) and keeps training; here the checkpoint is taken at the
batch boundary, and under SLURM with auto-requeue on (Lightning's ``SLURMEnvironment`` default) the
job is then requeued with ``scontrol requeue`` as Lightning does. The first signal is reported in
one line naming it (``SIGUSR1: stopping at the end of this batch``); Lightning's notice, which calls
every signal ``SIGTERM`` (``[rank: 0] Received SIGTERM: 2`` for Ctrl-C), is silenced. SIGHUP (the
terminal closed) is handled as SIGTERM. Exit statuses: 130 (Ctrl-C), 143 (SIGTERM), 129 (SIGHUP),
138 (SIGUSR1): 128 + the signal number, as a shell reports a killed command.

A batch that does not end soon after the signal (an attack with a huge step count) is not waited
for: after :data:`ATTACK_GRACE_S` seconds the attack raises between two iterations
(:func:`qgtrain.attacks.limits.request_stop`), and the run stops without a checkpoint (the state is
mid-step), naming the latest one.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.connectors import signal_connector
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from qgtrain.attacks.limits import AttackInterrupted, clear_stop, request_stop
from qgtrain.checkpoints.resume import INTERRUPTED_CHECKPOINT
from qgtrain.compat import cluster_environment

log = logging.getLogger(__name__)
SIGNAL_NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}
for _name in ("SIGUSR1", "SIGHUP"):
    if hasattr(signal, _name):
        SIGNAL_NAMES[getattr(signal, _name)] = _name
HANDLED_SIGNALS = tuple(SIGNAL_NAMES)
ATTACK_GRACE_S = 10.0
"""Seconds a batch may still take after a signal before the attack running in it is interrupted."""
LIGHTNING_SIGNAL_LOG = logging.getLogger(signal_connector.__name__)
"""Lightning's SIGTERM handler logs here; silenced while it runs inside ours, which names the signal."""


def signal_name(signum: int | None) -> str:
    """``Ctrl-C``, ``SIGTERM``, ``SIGUSR1``, else ``signal N``."""
    return SIGNAL_NAMES.get(signum or signal.SIGINT, f"signal {signum}")


def stopping_message(signum: int) -> str:
    """The one line written when a signal arrives (Lightning's own notice is silenced)."""
    again = " (Ctrl-C again to stop now)" if signum == signal.SIGINT else ""
    return f"{signal_name(signum)}: stopping at the end of this batch{again}"


def _drop(record: logging.LogRecord) -> bool:
    return False


def slurm_requeued() -> bool:
    """True in a SLURM job that was requeued (``SLURM_RESTART_COUNT`` >= 1)."""
    return "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0


def requeue_slurm_job() -> bool:
    """``scontrol requeue <job>`` for this SLURM job (array jobs: ``<array job>_<task>``), as
    Lightning's ``_SignalConnector._slurm_sigusr_handler_fn`` does; True when it succeeded."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = (
        f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
        if array_job
        else os.environ.get("SLURM_JOB_ID", "")
    )
    if not re.fullmatch(r"[0-9_]+", job):
        log.warning("cannot requeue: no SLURM job id in the environment")
        return False
    try:
        result = subprocess.call(["scontrol", "requeue", job])
    except OSError as exc:
        log.warning("cannot requeue SLURM job %s: %s", job, exc)
        return False
    if result != 0:
        log.warning("requeuing SLURM job %s failed with status %d", job, result)
    return result == 0


class InterruptCheckpoint(Callback):
    """On Ctrl-C, SIGTERM or SIGUSR1 during ``fit``, write ``<dirpath>/interrupted.ckpt`` and stop.

    All three stop the run at the end of the current training batch (or after validation / the
    epoch's end hooks when they arrive there), where the checkpoint is consistent with the data
    loader's position: resuming continues at the next batch. A second Ctrl-C raises
    ``KeyboardInterrupt`` at once; Lightning catches it and exits with status 1, and nothing is saved
    (the state is mid-step). ``train.py`` turns either into one line and :attr:`exit_status`. The
    checkpoint goes through the trainer's checkpoint IO (atomic). Single-process runs only: under
    DDP a collective save from an exception handler could hang, so a DDP run stops without it and
    resumes from its latest step checkpoint.
    """

    def __init__(self, dirpath: str | Path) -> None:
        self.dirpath = Path(dirpath)
        self.interrupted = False
        self.signal: int | None = None
        self.saved_path: Path | None = None
        self.requeued = False
        self.epoch = 0
        self.global_step = 0
        self._previous: dict[int, Any] = {}

    # ------------------------------------------------------------ signals
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Lightning registered its handlers in ``Trainer._run``: route SIGTERM, SIGUSR1 and the
        first Ctrl-C through its SIGTERM handler, noting which signal came first."""
        clear_stop()
        if threading.current_thread() is not threading.main_thread():
            return
        lightning_sigterm = signal.getsignal(signal.SIGTERM)

        def handler(signum: int, frame: FrameType | None) -> None:
            if signum == signal.SIGINT and self.signal == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C: stop now, wherever the run is
            if self.signal is None:
                log.warning("%s", stopping_message(signum))
                request_stop(ATTACK_GRACE_S)  # an attack that outlasts the batch end stops here
            self.signal = self.signal or signum
            if callable(lightning_sigterm):
                # its "[rank: 0] Received SIGTERM: <number>" would call every signal SIGTERM
                LIGHTNING_SIGNAL_LOG.addFilter(_drop)
                try:
                    lightning_sigterm(signum, frame)
                finally:
                    LIGHTNING_SIGNAL_LOG.removeFilter(_drop)

        for signum in HANDLED_SIGNALS:
            self._previous.setdefault(signum, signal.getsignal(signum))
            signal.signal(signum, handler)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handlers()

    def _restore_handlers(self) -> None:
        """Lightning's SignalConnector.teardown restores the handlers it knows; SIGHUP is ours."""
        clear_stop()
        if threading.current_thread() is threading.main_thread():
            for signum, previous in self._previous.items():
                if signum not in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGUSR1", None)):
                    signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore_handlers()
        hard = isinstance(exception, KeyboardInterrupt)  # not at a batch boundary (or an attack's grace ran out)
        if not hard and not isinstance(exception, SIGTERMException):
            return
        if hard and not (isinstance(exception, AttackInterrupted) and self.signal is not None):
            self.signal = signal.SIGINT
        self.signal = self.signal or signal.SIGTERM
        self.interrupted = True
        self.epoch, self.global_step = trainer.current_epoch, trainer.global_step
        if (
            not hard
            and trainer.world_size == 1
            and trainer.state.fn == TrainerFn.FITTING
            and trainer.optimizers
        ):
            path = self.dirpath / INTERRUPTED_CHECKPOINT
            try:
                trainer.save_checkpoint(path, weights_only=False)  # full state: optimizer, loops, loader
                self.saved_path = path
            except Exception as exc:  # the interrupt must still end the run cleanly
                log.warning("could not save %s on interrupt: %s", path, exc)
        if (
            self.signal == getattr(signal, "SIGUSR1", None)
            and trainer.is_global_zero
            and _auto_requeue(trainer)
        ):
            self.requeued = requeue_slurm_job()

    # ------------------------------------------------------------ reporting
    @property
    def exit_status(self) -> int:
        """128 + the signal number: 130 Ctrl-C, 143 SIGTERM, 129 SIGHUP, 138 SIGUSR1."""
        return 128 + int(self.signal or signal.SIGINT)

    def message(self, resume_command: str) -> str:
        """One line for the user: what stopped the run, where, what was saved, how to continue."""
        where = f"interrupted by {signal_name(self.signal)} at epoch {self.epoch}, step {self.global_step}"
        requeued = "; SLURM job requeued, it resumes by itself" if self.requeued else ""
        if self.saved_path is not None:
            return f"{where}; saved {self.saved_path}{requeued}; continue with {resume_command}"
        return (
            f"{where}; no checkpoint saved at the interrupt{requeued}; "
            f"continue from the latest checkpoint with {resume_command}"
        )


def _auto_requeue(trainer: L.Trainer) -> bool:
    """Whether the trainer runs under SLURM with auto-requeue on (``SLURMEnvironment``'s default)."""
    environment = cluster_environment(trainer)
    return isinstance(environment, SLURMEnvironment) and environment.auto_requeue
