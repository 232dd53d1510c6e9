"""Whether a checkpoint fits the run that resumes it: the same network and number of processes
(else Lightning fails with a size-mismatch traceback or resumes another data shard), averaged
weights only with averaging, and the same run definition (dataset, network, objective, the inner
attack and its arguments, the module's and the data's training hyperparameters, the weight
average's decay and start, the optimizer and its settings)
unless ``--resume-override`` continues the weights under another one, which :class:`WeightsOrigin`
then applies to the restored optimizer and records in every later checkpoint.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from qgtrain.checkpoints.files import TRAINED_WEIGHTS
from qgtrain.checkpoints.resume import ResumeError
from qgtrain.models import model_spec

RUN_RECORD_FLAGS = {
    "dataset": "--dataset",
    "net": "--net",
    "objective": "--model.objective",
    "inner": "--inner",
    "eps": "--eps",
    "optimizer": "--model.optimizer",
}
"""What defines a run (recorded in ``checkpoint["qgtrain"]``) and the flag that sets each; beside
them the keys of :func:`run_settings`, flags by :func:`flag_of`."""
SHORT_FLAGS = {
    "inner.steps": "--steps", "inner.alpha": "--alpha", "inner.b": "--b", "inner.replays": "--replays",
    "optimizer.lr": "--lr", "awp_gamma": "--awp", "seed": "--seed", "data.batch_size": "--batch-size",
    "ema.decay": "--ema-decay", "ema.start_step": "--ema-start-step",
}  # fmt: skip
"""Record keys that train.py sets with a short flag."""
HYPERPARAMETERS_NOT_COMPARED = frozenset(
    {"objective", "track_clean_accuracy", "clean_accuracy_every_n_batches", "channels_last", "compile_net"}
)
"""Module hyperparameters a resume may change: how the run computes or logs, not what it trains
(``objective`` is compared as recorded in ``checkpoint["qgtrain"]``)."""
DATA_NOT_COMPARED = frozenset({"data_dir", "download", "num_workers", "eval_batch_size", "yield_indices", "seed"})
"""Data-module hyperparameters a resume may change: where the files are and how they are loaded
(``seed`` is the module's, compared there: ``--seed`` sets both)."""
OPTIMIZER_NOT_COMPARED = frozenset(
    {"params", "initial_lr", "foreach", "fused", "capturable", "differentiable"}
)
"""Parameter-group keys that are not settings of the run (``initial_lr`` is the recorded ``lr``)."""


def flag_of(key: str) -> str:
    """The train.py flag that sets the record key ``key``."""
    if (known := RUN_RECORD_FLAGS.get(key) or SHORT_FLAGS.get(key)) is not None:
        return known
    group, _, name = key.partition(".")
    if group in ("inner", "optimizer") and name:
        return f"--model.{group}.init_args.{name}"
    return f"--data.init_args.{name}" if group == "data" and name else f"--model.{key}"


def run_settings(
    inner: dict[str, Any] | None, hparams: Any, group: dict[str, Any] | None, data: Any, average: Any
) -> dict[str, Any]:
    """The record's keys beside :data:`RUN_RECORD_FLAGS`: ``inner.KEY``, the inner attack's arguments
    (its ``config()``); the module's hyperparameters; ``data.KEY``, the data module's; ``ema.KEY``,
    the weight average's decay and start step (its callback state); ``optimizer.KEY``, the first
    parameter group's settings (its base ``lr``: ``initial_lr`` once a scheduler ran)."""
    record = {f"inner.{k}": v for k, v in (inner or {}).items() if k not in ("name", "eps")}
    record |= {
        k: v
        for k, v in dict(hparams or {}).items()
        if k not in HYPERPARAMETERS_NOT_COMPARED and not k.startswith("_")
    }
    record |= {
        f"data.{k}": v for k, v in dict(data or {}).items() if k not in DATA_NOT_COMPARED and not k.startswith("_")
    }
    record |= {f"ema.{k}": v for k, v in dict(average or {}).items() if k in ("decay", "start_step")}
    if group:
        group = {**group, "lr": group.get("initial_lr", group.get("lr"))}
        record |= {f"optimizer.{k}": v for k, v in group.items() if k not in OPTIMIZER_NOT_COMPARED}
    return record


def same(a: Any, b: Any) -> bool:
    """Equal values, floats to rounding and a tuple equal to a list of the same items."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def run_record(
    module: L.LightningModule, datamodule: L.LightningDataModule, optimizer: Any, average: Callback | None
) -> dict[str, Any]:
    """This run's values of :data:`RUN_RECORD_FLAGS` and :func:`run_settings`, as a checkpoint
    records them; ``average``: the weight-averaging callback, if any."""
    try:
        net = describe_net(model_spec(module.net), type(module.net).__name__)
    except ValueError:
        net = type(module.net).__name__
    inner = getattr(module, "inner", None)
    return {
        "dataset": getattr(datamodule, "name", None),
        "net": net,
        "objective": module.hparams.get("objective"),
        "inner": inner.name if inner is not None else "none",
        "eps": float(inner.eps) if inner is not None else None,
        "optimizer": f"{type(optimizer).__module__}.{type(optimizer).__qualname__}",
        **run_settings(
            inner.config() if inner is not None else None, module.hparams, optimizer.param_groups[0],
            datamodule.hparams, average.state_dict() if average is not None else None,
        ),  # fmt: skip
    }


def recorded_run(checkpoint: dict[str, Any], average_key: str | None = None) -> dict[str, Any]:
    """The checkpoint's values of :data:`RUN_RECORD_FLAGS` and :func:`run_settings` (the weight
    average's from the callback state under ``average_key``); a key an older checkpoint did not
    record is absent (then it is not compared)."""
    meta = checkpoint.get("qgtrain") or {}
    record: dict[str, Any] = {}
    if meta.get("dataset"):
        record["dataset"] = meta["dataset"]
    if meta.get("net"):
        record["net"] = describe_net(meta["net"], "")
    if "objective" in meta:
        record["objective"] = meta["objective"]
    if "inner" in meta:
        inner = meta["inner"] or {}
        record["inner"] = inner.get("name", "none")
        record["eps"] = float(inner["eps"]) if "eps" in inner else None
    if meta.get("optimizer"):
        record["optimizer"] = meta["optimizer"]
    states = checkpoint.get("optimizer_states") or [{}]
    groups = states[0].get("param_groups") or [None]
    return record | run_settings(
        meta.get("inner"), checkpoint.get("hyper_parameters"), groups[0],
        checkpoint.get("datamodule_hyper_parameters"), (checkpoint.get("callbacks") or {}).get(average_key),
    )  # fmt: skip


def record_differences(
    checkpoint: dict[str, Any], this_run: dict[str, Any], optimizer: Any, average_key: str | None = None
) -> list[tuple[str, Any, Any]]:
    """``(key, recorded, this run's)`` for each defining value that differs, in the record's order. A
    key the checkpoint does not record is not compared; another inner attack class or optimizer
    class hides its arguments' differences, and another objective the inner loss it picks. An
    optimizer that an older checkpoint did not record is compared by the names of its state
    (``momentum`` for SGD, ``betas`` for Adam): loading another class's state fails inside Lightning."""
    recorded = recorded_run(checkpoint, average_key)
    if "optimizer" not in recorded:
        saved = checkpoint.get("optimizer_states") or []
        wanted = optimizer.state_dict()["param_groups"]
        if saved and saved[0].get("param_groups") and wanted:
            ignore = {"params", "initial_lr"}
            saved_keys = set(saved[0]["param_groups"][0]) - ignore
            if not set(wanted[0]) - ignore <= saved_keys:
                recorded["optimizer"] = "another optimizer"
    changed = {key for key, value in this_run.items() if key in recorded and not same(recorded[key], value)}
    hidden = {key for key in changed if key.split(".")[0] in changed and "." in key}
    hidden |= {"inner.loss"} if "objective" in changed else set()
    return [(key, recorded[key], this_run[key]) for key in this_run if key in changed - hidden]


def describe_net(spec: dict[str, Any] | None, fallback: str) -> str:
    """``madry_mnist()`` / ``tiny_cnn(width=8)`` from a ``model_spec``, else ``fallback``."""
    if not spec:
        return fallback
    kwargs = ", ".join(f"{key}={value}" for key, value in sorted(spec.get("kwargs", {}).items()))
    return f"{spec['name']}({kwargs})"


def check_resume_compatible(
    checkpoint: dict[str, Any],
    path: Path,
    module: L.LightningModule,
    world_size: int,
    averaging: bool = False,
) -> None:
    """The network and the number of training processes must be the checkpoint's (one line, else
    Lightning fails with a size-mismatch traceback or resumes a different data shard), and a
    checkpoint with averaged weights needs a run that averages (``averaging``): without, Lightning
    would continue training from its ``state_dict``, the averaged weights, not the trained ones."""
    saved, wanted = checkpoint.get("state_dict", {}), module.state_dict()
    same_shapes = saved.keys() == wanted.keys() and all(
        tuple(saved[key].shape) == tuple(wanted[key].shape) for key in wanted
    )
    meta = checkpoint.get("qgtrain") or {}
    if not same_shapes:
        try:
            requested = model_spec(module.net)
        except ValueError:
            requested = None
        raise ResumeError(
            f"--resume: {path} holds a {describe_net(meta.get('net'), 'different network')} network, "
            f"this run builds {describe_net(requested, type(module.net).__name__)}; pass the "
            "checkpoint's --model / --config"
        )
    if TRAINED_WEIGHTS in checkpoint and not averaging:
        raise ResumeError(
            f"--resume: {path} holds averaged weights (it was trained with --ema); resume with --ema"
        )
    processes = meta.get("world_size")
    if processes is not None and processes != world_size:
        raise ResumeError(
            f"--resume: {path} was written by {processes} training process(es), this run has "
            f"{world_size}; resume with the same --devices and --num-nodes"
        )


def check_run_record(
    checkpoint: dict[str, Any], path: Path, this_run: dict[str, Any], optimizer: Any, override: bool,
    average_key: str | None = None,
) -> list[tuple[str, Any, Any]]:  # fmt: skip
    """The differences between what ``checkpoint`` records (:func:`record_differences`) and this run:
    without ``override`` they are refused in one line naming the first and the flags that resume as
    recorded, all of them (a changed ``--steps`` also changes the α of PQGD's rule ε / steps: the
    flag the user changed may come second); with it they are returned (logged by the caller, kept in
    the new checkpoints by :class:`WeightsOrigin`)."""
    differences = record_differences(checkpoint, this_run, optimizer, average_key)
    if differences and not override:
        key, recorded, wanted = differences[0]
        also = f" (and {', '.join(d[0] for d in differences[1:])})" if len(differences) > 1 else ""
        as_recorded = " ".join(
            dict.fromkeys(
                f"{flag_of(k)} {old}" if old != "another optimizer" else f"{flag_of(k)} of the run that wrote it"
                for k, old, _ in differences
            )
        )
        raise ResumeError(
            f"--resume: {path} was trained with {key} {recorded}, this run has {wanted}{also}; resume "
            f"with {as_recorded}, or pass --resume-override to continue its weights with this run's"
        )
    return differences


class WeightsOrigin(Callback):
    """Where a run's weights came from when ``--resume-override`` continued a checkpoint of another
    run definition: the checkpoint's path and the recorded values that changed, kept in every
    checkpoint of the run (Lightning's callback state, restored on a later resume, so the history
    accumulates). A changed optimizer starts fresh: its state is dropped from the loaded checkpoint
    (Lightning zips the optimizers with the saved states, so an empty list loads none). A changed
    optimizer setting is written into the loaded state, which Lightning restores over the fresh
    optimizer's: a new base ``lr`` rescales the current one and the schedulers' ``base_lrs``."""

    def __init__(self) -> None:
        self.history: list[dict[str, Any]] = []
        self._pending: dict[str, Any] | None = None
        self._optimizer_settings: dict[str, Any] = {}

    def continue_changed(self, path: Path, differences: list[tuple[str, Any, Any]]) -> None:
        self._pending = {
            "checkpoint": str(path),
            "changed": {key: {"recorded": str(old), "now": str(new)} for key, old, new in differences},
        }
        self._optimizer_settings = {
            key[len("optimizer.") :]: new for key, _, new in differences if key.startswith("optimizer.")
        }

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._pending is not None and "optimizer" in self._pending["changed"]:
            checkpoint["optimizer_states"] = []  # another class: its state cannot be loaded
            checkpoint["lr_schedulers"] = []
        for name, value in self._optimizer_settings.items():
            for state in checkpoint.get("optimizer_states", []):
                for group in state.get("param_groups", []):
                    if name == "lr":
                        group["lr"] *= value / group.get("initial_lr", group["lr"])
                        group["initial_lr"] = value
                    else:
                        group[name] = value
            for scheduler in checkpoint.get("lr_schedulers", []) if name == "lr" else []:
                if scheduler.get("base_lrs"):
                    scale = [value / base for base in scheduler["base_lrs"]]
                    scheduler["base_lrs"] = [value] * len(scale)
                    if scheduler.get("_last_lr"):
                        scheduler["_last_lr"] = [
                            lr * k for lr, k in zip(scheduler["_last_lr"], scale, strict=False)
                        ]

    def state_dict(self) -> dict[str, Any]:
        history = self.history + ([self._pending] if self._pending is not None else [])
        return {"weights_from": history} if history else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("weights_from", []))
