"""Loading a model for evaluation: rebuild a registered network from a qgtrain checkpoint or a plain
state dict.

Files are read with ``torch.load(..., weights_only=True)``: only tensors and plain containers are
unpickled, so a crafted file cannot execute code. Every failure (missing, truncated, foreign file,
unknown architecture, mismatched weights) raises :class:`CheckpointError` with a one-line message.
A checkpoint of a run with weight averaging (``train.py --ema``) holds the averaged weights as its
``state_dict``, which are loaded by default; ``weights="raw"`` loads the trained ones beside them.
"""

from __future__ import annotations

import inspect
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from qgtrain.checkpoints.files import (
    TRAINED_WEIGHTS,
    CheckpointError,
    file_sha256,
    first_line,
    read_checkpoint,
)
from qgtrain.models import DATASET_SPECS, MODELS, available_models, build_model

log = logging.getLogger(__name__)

NET_PREFIX = "net."
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile


@dataclass
class CheckpointInfo:
    """What was loaded, for the evaluation record."""

    path: str
    format: str  # "lightning" (a qgtrain training checkpoint) or "state_dict"
    model: str
    model_kwargs: dict[str, Any]
    dataset: str
    sha256: str
    num_parameters: int
    epoch: int | None = None
    global_step: int | None = None
    training: dict[str, Any] = field(default_factory=dict)  # checkpoint["qgtrain"]: inner attack, version
    weights: str = "raw"  # "averaged" (train.py --ema) or "raw" (the trained weights)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _network_state(state: dict[str, Any], lightning: bool, path: Path) -> dict[str, torch.Tensor]:
    """The network's tensors: ``net.*`` of a training checkpoint, or the whole state dict, unwrapped."""
    tensors = {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if lightning or any(k.startswith(NET_PREFIX) for k in tensors):
        tensors = {k[len(NET_PREFIX) :]: v for k, v in tensors.items() if k.startswith(NET_PREFIX)}
    for prefix in WRAPPER_PREFIXES:
        if tensors and all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix) :]: v for k, v in tensors.items()}
    if not tensors:
        raise CheckpointError(f"{path} holds no network weights (no tensors under state_dict/net.*)")
    return tensors


def _default_dataset(name: str) -> str:
    """The ``dataset`` default of the model's constructor (``"mnist"`` when it has none)."""
    parameter = inspect.signature(MODELS[name].__init__).parameters.get("dataset")
    default = parameter.default if parameter is not None else inspect.Parameter.empty
    return default if isinstance(default, str) else "mnist"


def _describe_mismatch(missing: list[str], unexpected: list[str], shapes: list[str]) -> str:
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} keys (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
    if shapes:
        parts.append(f"shape mismatch at {shapes[0]}")
    return "; ".join(parts)


def load_model_from_checkpoint(
    path: str | os.PathLike,
    model: str | None = None,
    dataset: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    weights: Literal["averaged", "raw"] = "averaged",
) -> tuple[nn.Module, CheckpointInfo]:
    """Rebuild the network stored at ``path``; return it (CPU, eval mode) and what was loaded.

    A qgtrain training checkpoint records its architecture in ``checkpoint["qgtrain"]["net"]``
    (``{"name", "kwargs"}``, see ``AdversarialTraining.on_save_checkpoint``); ``model`` and
    ``dataset`` may be given but must agree with it. A plain state dict needs ``model`` (and
    ``dataset``, default: the model's own default); ``model_kwargs`` adds constructor arguments (e.g. ``width``).
    ``weights``: a checkpoint with averaged weights gives those (``averaged``) or the trained ones
    (``raw``); other files hold only the trained ones, which either value loads.
    """
    if weights not in ("averaged", "raw"):
        raise ValueError(f"weights must be 'averaged' or 'raw', got {weights!r}")
    path = Path(path)
    loaded = read_checkpoint(path)
    if not isinstance(loaded, dict):
        raise CheckpointError(
            f"{path} holds a {type(loaded).__name__}, not a checkpoint or state dict; save "
            "model.state_dict() or use a checkpoint written by train.py"
        )
    lightning = isinstance(loaded.get("state_dict"), dict)
    averaged = lightning and isinstance(loaded.get(TRAINED_WEIGHTS), dict)
    state = loaded["state_dict"] if lightning else loaded
    if averaged and weights == "raw":
        state, averaged = loaded[TRAINED_WEIGHTS], False
    meta = loaded.get("qgtrain") if isinstance(loaded.get("qgtrain"), dict) else {}
    spec = meta.get("net") if isinstance(meta.get("net"), dict) else None
    tensors = _network_state(state, lightning, path)

    kwargs: dict[str, Any] = {}
    if spec is not None:
        name = spec.get("name")
        kwargs = dict(spec.get("kwargs") or {})
        if model is not None and model != name:
            raise CheckpointError(f"{path} holds a {name!r} network, but --model {model!r} was given")
        if name not in available_models():
            raise CheckpointError(
                f"{path} holds an unknown architecture {name!r}; known: {', '.join(available_models())}"
            )
    elif model is None:
        raise CheckpointError(
            f"{path} does not record its architecture (a plain state dict); pass --model NAME "
            f"(one of {', '.join(available_models())}) and --dataset"
        )
    else:
        name = model
        if name not in available_models():
            raise CheckpointError(f"unknown model {name!r}; choose one of {', '.join(available_models())}")
    kwargs.update(model_kwargs or {})
    recorded = kwargs.get("dataset")
    if dataset is not None and recorded is not None and dataset != recorded:
        raise CheckpointError(
            f"{path} was trained on {recorded!r}, but --dataset {dataset!r} was given; drop --dataset"
        )
    dataset = dataset or recorded or _default_dataset(name)
    if dataset not in DATASET_SPECS:
        raise CheckpointError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASET_SPECS)}")
    if "dataset" in kwargs or spec is None:
        kwargs["dataset"] = dataset
    try:
        net = build_model(name, **kwargs)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"cannot build {name!r} with {kwargs}: {first_line(exc)}") from None

    own = net.state_dict()
    missing = [k for k in own if k not in tensors]
    unexpected = [k for k in tensors if k not in own]
    shapes = [
        f"{k}: {tuple(tensors[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in tensors and tensors[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"{path} does not match {name}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}): "
            f"{_describe_mismatch(missing, unexpected, shapes)}"
        )
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(
            f"{path} has non-finite (NaN/inf) weights in {bad[0]}; use an earlier checkpoint"
        )
    net.load_state_dict(tensors, strict=True)
    net.eval()
    info = CheckpointInfo(
        path=str(path),
        format="lightning" if lightning else "state_dict",
        model=name,
        model_kwargs=kwargs,
        dataset=dataset,
        sha256=file_sha256(path),
        num_parameters=sum(p.numel() for p in net.parameters()),
        epoch=loaded.get("epoch") if isinstance(loaded.get("epoch"), int) else None,
        global_step=loaded.get("global_step") if isinstance(loaded.get("global_step"), int) else None,
        training={k: v for k, v in meta.items() if k != "net"},
        weights="averaged" if averaged else "raw",
    )
    if averaged:
        log.info(
            "%s: evaluating its averaged weights (train.py --ema; --weights raw: the trained ones)", path
        )
    return net, info
