"""Networks taking inputs in [0, 1] (normalised inside), and a name -> class registry."""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from qgtrain.models.base import Network
from qgtrain.models.mnist import MadryMNIST, TinyCNN
from qgtrain.models.normalization import DATASET_SPECS, DatasetSpec, Normalize, dataset_spec
from qgtrain.models.resnet import PreActResNet18, WideResNet

MODELS: dict[str, type[Network]] = {
    "madry_mnist": MadryMNIST,
    "tiny_cnn": TinyCNN,
    "preact_resnet18": PreActResNet18,
    "wide_resnet": WideResNet,
}


def available_models() -> list[str]:
    return list(MODELS)


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Instantiate the network registered under ``name``."""
    try:
        cls = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}") from None
    return cls(**kwargs)


def model_spec(net: nn.Module) -> dict[str, Any]:
    """``{"name": ..., "kwargs": {...}}`` that rebuilds ``net`` with :func:`build_model`.

    Read from the constructor's parameters, which every registered model stores as attributes.
    """
    for name, cls in MODELS.items():
        if type(net) is cls:
            params = inspect.signature(cls.__init__).parameters
            kwargs = {p: getattr(net, p) for p in params if p != "self" and hasattr(net, p)}
            return {"name": name, "kwargs": kwargs}
    raise ValueError(f"{type(net).__name__} is not a registered qgtrain model ({', '.join(MODELS)})")


__all__ = [
    "DATASET_SPECS",
    "DatasetSpec",
    "MODELS",
    "MadryMNIST",
    "Network",
    "Normalize",
    "PreActResNet18",
    "TinyCNN",
    "WideResNet",
    "available_models",
    "build_model",
    "dataset_spec",
    "model_spec",
]
