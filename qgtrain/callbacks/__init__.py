"""Training callbacks: robustness evaluation against BLOB_QG with an overfitting guard, TensorBoard views.

Tag names are documented in docs/MONITORING.md.
"""

from qgtrain.callbacks.robustness import (
    RobustnessEvaluation,
    default_alpha,
    run_hyperparameters,
    shard_batches,
    subset_indices,
    validation_dataset,
)
from qgtrain.callbacks.visualization import AttackRecorder, AttackVisualization

__all__ = [
    "AttackRecorder",
    "AttackVisualization",
    "RobustnessEvaluation",
    "default_alpha",
    "run_hyperparameters",
    "shard_batches",
    "subset_indices",
    "validation_dataset",
]
