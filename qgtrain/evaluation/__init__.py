"""Robustness evaluation shared by ``evaluate.py`` and the training callbacks.

``protocol`` holds the one accuracy counter; ``runner`` the paper's protocol (runs, restarts,
Worst/Avg, per-example worst case, sweeps); ``checkpoints`` safe loading; ``masking`` the
gradient-masking checks; ``plots`` and ``report`` the figures and the results files.
"""

from qgtrain.evaluation.checkpoints import CheckpointError, CheckpointInfo, load_model_from_checkpoint
from qgtrain.evaluation.masking import MaskingCheck
from qgtrain.evaluation.protocol import (
    Batches,
    adversarial_correct,
    clean_correct,
    eval_mode,
    iterate_batches,
    worst_case_correct,
)
from qgtrain.evaluation.runner import (
    AttackSpec,
    ProtocolResult,
    ProtocolRunner,
    ProtocolSettings,
    RowResult,
    SweepResult,
    TensorBatches,
    describe_suggestions,
    suggested_evaluations,
)

__all__ = [
    "AttackSpec",
    "Batches",
    "CheckpointError",
    "CheckpointInfo",
    "MaskingCheck",
    "ProtocolResult",
    "ProtocolRunner",
    "ProtocolSettings",
    "RowResult",
    "SweepResult",
    "TensorBatches",
    "adversarial_correct",
    "clean_correct",
    "describe_suggestions",
    "eval_mode",
    "iterate_batches",
    "load_model_from_checkpoint",
    "suggested_evaluations",
    "worst_case_correct",
]
