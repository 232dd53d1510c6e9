"""Checkpoints: the files, the run folders that hold them, and how a run resumes from them.

- :mod:`~qgtrain.checkpoints.files`: the file format (atomic write, ``weights_only`` read, SHA-256)
  and the start-up probe that an output folder can be written;
- :mod:`~qgtrain.checkpoints.run_folders`: run names, their ``-vN`` versions, the run-folder lock;
- :mod:`~qgtrain.checkpoints.resume`: which checkpoint a run resumes from, finished runs, where a
  resumed run continues;
- :mod:`~qgtrain.checkpoints.compatibility`: whether a checkpoint fits the run that resumes it;
- :mod:`~qgtrain.checkpoints.callbacks`: the Lightning callbacks that write ``last.ckpt`` and
  ``step.ckpt`` and restore the data loader's position;
- :mod:`~qgtrain.checkpoints.interrupt`: ``interrupted.ckpt`` on a signal, SLURM requeue;
- :mod:`~qgtrain.checkpoints.loading`: a network rebuilt from a checkpoint, for evaluation.

The package sits below ``qgtrain.training``, ``qgtrain.evaluation`` and the command lines, and
imports none of them (nor ``qgtrain.callbacks``): the metric ``best.ckpt`` monitors is passed in.
"""

from qgtrain.checkpoints.callbacks import (
    DEFAULT_CKPT_MINUTES,
    LastCheckpoint,
    RestoreLoaderState,
    ResumePoint,
    StepCheckpoint,
    best_checkpoint,
)
from qgtrain.checkpoints.compatibility import (
    RUN_RECORD_FLAGS,
    WeightsOrigin,
    check_resume_compatible,
    check_run_record,
    run_record,
)
from qgtrain.checkpoints.files import (
    TRAINED_WEIGHTS,
    AtomicCheckpointIO,
    CheckpointError,
    OutputFolderError,
    atomic_torch_save,
    atomic_write,
    check_writable,
    file_sha256,
    read_checkpoint,
)
from qgtrain.checkpoints.interrupt import InterruptCheckpoint, requeue_slurm_job, slurm_requeued
from qgtrain.checkpoints.loading import CheckpointInfo, load_model_from_checkpoint
from qgtrain.checkpoints.resume import (
    INTERRUPTED_CHECKPOINT,
    RESUMABLE,
    ResumeError,
    finished_message,
    furthest_resumable,
    latest_checkpoint,
    log_continuation,
    resolve_resume,
    resume_command,
    resumes_at,
    start_point,
)
from qgtrain.checkpoints.run_folders import (
    RunFolderBusyError,
    RunLock,
    check_run_name,
    run_name,
    unique_run_name,
)

__all__ = [
    "DEFAULT_CKPT_MINUTES",
    "INTERRUPTED_CHECKPOINT",
    "RESUMABLE",
    "RUN_RECORD_FLAGS",
    "TRAINED_WEIGHTS",
    "AtomicCheckpointIO",
    "CheckpointError",
    "CheckpointInfo",
    "InterruptCheckpoint",
    "LastCheckpoint",
    "OutputFolderError",
    "RestoreLoaderState",
    "ResumeError",
    "ResumePoint",
    "RunFolderBusyError",
    "RunLock",
    "StepCheckpoint",
    "WeightsOrigin",
    "atomic_torch_save",
    "atomic_write",
    "best_checkpoint",
    "check_resume_compatible",
    "check_run_name",
    "check_run_record",
    "check_writable",
    "file_sha256",
    "finished_message",
    "furthest_resumable",
    "latest_checkpoint",
    "load_model_from_checkpoint",
    "log_continuation",
    "read_checkpoint",
    "requeue_slurm_job",
    "resolve_resume",
    "resume_command",
    "resumes_at",
    "run_name",
    "run_record",
    "slurm_requeued",
    "start_point",
    "unique_run_name",
]
