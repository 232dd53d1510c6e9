"""The min-max LightningModule with an injected network and inner maximiser."""

from qgtrain.training.module import AdversarialTraining, NonFiniteLossError, lr_lambda

__all__ = ["AdversarialTraining", "NonFiniteLossError", "lr_lambda"]
