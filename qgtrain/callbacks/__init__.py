"""Training callbacks: robustness evaluation against BLOB_QG with an overfitting guard, TensorBoard views,
the run's time estimate.

Tag names are documented in docs/MONITORING.md.
"""

from qgtrain.callbacks.robustness import RobustnessEvaluation, run_hyperparameters
from qgtrain.callbacks.run_eta import RunEstimate
from qgtrain.callbacks.validation_data import shard_batches, subset_indices, validation_dataset
from qgtrain.callbacks.visualization import AttackRecorder, AttackVisualization

__all__ = [
    "AttackRecorder",
    "AttackVisualization",
    "RobustnessEvaluation",
    "RunEstimate",
    "run_hyperparameters",
    "shard_batches",
    "subset_indices",
    "validation_dataset",
]
