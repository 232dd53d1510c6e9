"""Robustness evaluation shared by ``evaluate.py`` and the training callbacks.

``protocol`` holds the one accuracy counter; ``runner`` the two protocols (the paper's: runs,
restarts, Worst/Avg, per-example worst case, sweeps; the standard suite); ``planning`` their naive
budget, its time here and the evaluations to suggest; ``job`` one evaluation end to end (the
record); ``rendering`` its tables and text; ``outputs`` its files, result folders and merges;
``environment`` the device, progress bar and library versions; ``masking`` the gradient-masking
checks; ``plots`` the figures. Loading a checkpoint is :mod:`qgtrain.checkpoints.loading`.
"""

from qgtrain.evaluation.masking import MaskingCheck
from qgtrain.evaluation.planning import describe_suggestions, suggested_evaluations
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
)

__all__ = [
    "AttackSpec",
    "Batches",
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
    "suggested_evaluations",
    "worst_case_correct",
]
