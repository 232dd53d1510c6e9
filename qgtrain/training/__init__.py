"""The min-max LightningModule with an injected network and inner maximiser."""

from qgtrain.training.module import AdversarialTraining, NonFiniteLossError, lr_lambda
from qgtrain.training.trainer import quiet_trainer

__all__ = ["AdversarialTraining", "NonFiniteLossError", "lr_lambda", "quiet_trainer"]
