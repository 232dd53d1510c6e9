"""The base class of qgtrain's networks: the type ``--model.net`` accepts."""

from __future__ import annotations

from torch import nn


class Network(nn.Module):
    """An image classifier taking inputs in [0, 1] (normalised inside) and returning logits.

    Subclasses are registered in :data:`qgtrain.models.MODELS`, from which a checkpoint's
    ``model_spec`` rebuilds them; ``--model.net`` lists exactly these.

    Args:
        dataset: Dataset whose input shape, classes and normalisation the network is built for.
    """
