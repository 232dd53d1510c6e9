"""Short flags for ``train.py``: a thin layer that rewrites them into LightningCLI arguments.

``--inner pqgd --steps 10`` becomes ``--model.inner=qgtrain.attacks.PQGD
--model.inner.init_args.steps=10``; the resolved config (``--print_config``, the saved
``config.yaml``) stays the single source of truth. Short flags are applied after ``--config`` files
and any long LightningCLI arguments.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qgtrain.attacks import ATTACKS
from qgtrain.data import DATAMODULES
from qgtrain.models import MODELS

INNER_CHOICES = ["none", *ATTACKS]


class UsageError(ValueError):
    """A bad command-line value: reported as one line, exit status 2."""


def configs_dir() -> Path:
    """``./configs`` when it exists, else the repository's ``configs/`` beside the package."""
    local = Path.cwd() / "configs"
    return local if local.is_dir() else Path(__file__).resolve().parents[2] / "configs"


def _positive_int(name: str, value: str) -> int:
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not number.is_integer() or number < 1:
        raise UsageError(f"{name} must be an integer >= 1, got {value}")
    return int(number)


def _non_negative_int(name: str, value: str) -> int:
    if not value.isdigit():
        raise UsageError(f"{name} must be an integer >= 0, got {value}")
    return int(value)


def _float_in(name: str, value: str, low: float, high: float) -> float:
    """A number in ``(low, high]``."""
    try:
        number = float(value)
    except ValueError:
        raise UsageError(f"{name} must be a number, got {value}") from None
    if not low < number <= high:
        raise UsageError(f"{name} must be in ({low:g}, {high:g}], got {value}")
    return number


def _radius(name: str, value: str) -> float:
    return _float_in(name, value, 0.0, 1.0)


def _positive_float(name: str, value: str) -> float:
    return _float_in(name, value, 0.0, float("inf"))


def _attack_name(name: str, value: str) -> str:
    if value not in ATTACKS:
        raise UsageError(f"{name} must be one of {', '.join(ATTACKS)}, got {value}")
    return value


def _text(name: str, value: str) -> str:
    return value


@dataclass(frozen=True)
class ShortFlag:
    """A short flag: its help, how its value is checked, and the LightningCLI keys it sets.

    Flags without ``targets`` (``--dataset``, ``--inner``, ``--model``) are handled by
    :func:`expand_short_flags` itself: they choose config files and classes.
    """

    flag: str
    help: str
    targets: tuple[str, ...] = ()
    parse: Callable[[str, str], object] = _text

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


INNER_ARGS = "--model.inner.init_args"
SHORT_FLAGS: list[ShortFlag] = [
    ShortFlag("--dataset", f"dataset, loads configs/<name>.yaml: {', '.join(DATAMODULES)}"),
    ShortFlag("--inner", f"inner maximiser: {', '.join(INNER_CHOICES)}"),
    ShortFlag("--steps", "inner attack steps (integer >= 1)", (f"{INNER_ARGS}.steps",), _positive_int),
    ShortFlag(
        "--eps",
        "L-inf radius in pixel units, (0, 1]; also used by validation and robustness evaluation",
        (f"{INNER_ARGS}.eps", "--model.val_attack.init_args.eps", "--robustness.eps"),
        _radius,
    ),
    ShortFlag("--alpha", "inner attack step size (> 0)", (f"{INNER_ARGS}.alpha",), _positive_float),
    ShortFlag(
        "--b",
        "quantization level of the inner attack (integer >= 1; 1 = sign gradient)",
        (f"{INNER_ARGS}.b",),
        _positive_int,
    ),
    ShortFlag(
        "--model", f"network: {', '.join(MODELS)} (a dotted LightningCLI --model.* argument passes through)"
    ),
    ShortFlag("--epochs", "training epochs", ("--trainer.max_epochs",), _positive_int),
    ShortFlag("--batch-size", "training batch size", ("--data.init_args.batch_size",), _positive_int),
    ShortFlag("--lr", "learning rate", ("--model.optimizer.init_args.lr",), _positive_float),
    ShortFlag("--devices", "devices per node (int or 'auto')", ("--trainer.devices",)),
    ShortFlag("--num-nodes", "number of nodes", ("--trainer.num_nodes",), _positive_int),
    ShortFlag("--strategy", "auto, ddp, ddp_spawn, ...", ("--trainer.strategy",)),
    ShortFlag("--precision", "32-true, 16-mixed, bf16-mixed", ("--trainer.precision",)),
    ShortFlag(
        "--seed",
        "seed of everything: data split and order, attacks, initialisation",
        ("--seed_everything", "--model.seed", "--data.init_args.seed"),
        _non_negative_int,
    ),
    ShortFlag(
        "--data-dir", "data root (default: $QGTRAIN_DATA, else ./data)", ("--data.init_args.data_dir",)
    ),
    ShortFlag("--run-name", "run name (default: <dataset>-<inner>-k<steps>-b<b>)", ("--run_name",)),
    ShortFlag(
        "--resume",
        "continue from a checkpoint: a .ckpt path, a run folder, or 'last' for this run name",
        ("--resume",),
    ),
    ShortFlag(
        "--ckpt-every-steps",
        "also write step.ckpt every N training steps inside an epoch (0 = off)",
        ("--ckpt_every_steps",),
        _non_negative_int,
    ),
    ShortFlag(
        "--ckpt-every-minutes",
        "write step.ckpt every T minutes of training (default 10; 0 = off)",
        ("--ckpt_every_minutes",),
    ),
    ShortFlag(
        "--eval-every",
        "robustness evaluation every N epochs (0 = off); also the TensorBoard views",
        ("--robustness.every_n_epochs", "--visualization.every_n_epochs"),
        _non_negative_int,
    ),
    ShortFlag(
        "--eval-attack",
        f"robustness evaluation's main attack: {', '.join(ATTACKS)}",
        ("--robustness.attack",),
        _attack_name,
    ),
    ShortFlag(
        "--eval-steps",
        "robustness evaluation attack steps (integer >= 1)",
        ("--robustness.steps",),
        _positive_int,
    ),
    ShortFlag(
        "--eval-size",
        "robustness evaluation subset of the validation split (examples)",
        ("--robustness.subset_size",),
        _positive_int,
    ),
    ShortFlag(
        "--eval-b",
        "quantization level of the robustness evaluation's main attack (integer >= 1)",
        ("--robustness.b",),
        _positive_int,
    ),
]


def class_specific_defaults(cls: type) -> dict[str, str]:
    """Arguments reset when ``--inner`` switches class: ``b`` always; single-step attacks also
    ``steps``, ``alpha`` (null: derived from eps) and ``random_start``."""
    params = inspect.signature(cls.__init__).parameters
    reset = {"b": str(params["b"].default)}
    if params["steps"].default == 1:
        reset.update(steps="1", alpha="null", random_start=str(params["random_start"].default).lower())
    return reset


def short_flag_help() -> str:
    width = max(len(f.flag) for f in SHORT_FLAGS)
    lines = ["Short flags (rewritten into the LightningCLI arguments listed further below):"]
    lines += [f"  {f.flag.ljust(width)}  {f.help}" for f in SHORT_FLAGS]
    return "\n".join(lines)


def _split_short_flags(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Take the short flags out of ``argv``; everything else keeps its order.

    ``--model NAME`` is the alias only when NAME is a registered model; ``--model.net ...`` and
    other dotted LightningCLI keys pass through untouched.
    """
    flags = {f.flag for f in SHORT_FLAGS}
    known = argparse.Namespace(**{f.dest: None for f in SHORT_FLAGS})
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        flag, has_value, value = arg.partition("=")
        if flag in flags and not has_value:
            if i + 1 >= len(argv):
                raise UsageError(f"{flag} needs a value")
            value = argv[i + 1]
            i += 1
        if flag in flags and not (flag == "--model" and value not in MODELS and "." in value):
            setattr(known, flag.lstrip("-").replace("-", "_"), value)  # == ShortFlag.dest
        else:
            rest.append(arg)
            if flag in flags and not has_value:  # `--model some.dotted.Class`: LightningCLI's own
                rest.append(value)
        i += 1
    return known, rest


def expand_short_flags(argv: list[str]) -> list[str]:
    """Rewrite short flags into LightningCLI arguments (raises :class:`UsageError` on bad values)."""
    known, rest = _split_short_flags(argv)
    if known.model is not None and known.model not in MODELS:
        raise UsageError(f"--model must be one of {', '.join(MODELS)}, got {known.model}")

    head: list[str] = []
    classes: list[str] = []
    values: list[str] = []
    if known.dataset is not None:
        if known.dataset not in DATAMODULES:
            raise UsageError(f"--dataset must be one of {', '.join(DATAMODULES)}, got {known.dataset}")
        head += ["--config", str(configs_dir() / f"{known.dataset}.yaml")]
    if known.inner is not None:
        if known.inner not in INNER_CHOICES:
            raise UsageError(f"--inner must be one of {', '.join(INNER_CHOICES)}, got {known.inner}")
        if known.inner == "none":
            classes.append("--model.inner=null")
            for flag in ("steps", "alpha", "b"):
                if getattr(known, flag) is not None:
                    raise UsageError(f"--{flag} needs an inner attack, but --inner is none")
        else:
            cls = ATTACKS[known.inner]
            classes.append(f"--model.inner={cls.__module__.rsplit('.', 1)[0]}.{cls.__name__}")
            # init_args of the config's attack carry over to the new class (eps, alpha, steps...);
            # those whose meaning depends on the class are reset to the new class's defaults.
            values += [f"{INNER_ARGS}.{key}={value}" for key, value in class_specific_defaults(cls).items()]
    if known.model is not None:
        cls = MODELS[known.model]
        classes.append(f"--model.net={cls.__module__.rsplit('.', 1)[0]}.{cls.__name__}")
    no_inner = known.inner == "none"  # then `--eps` sets only validation and evaluation radii
    for flag in SHORT_FLAGS:
        value = getattr(known, flag.dest)
        if flag.targets and value is not None:
            parsed = flag.parse(flag.flag, value)
            targets = [t for t in flag.targets if not (no_inner and t.startswith(INNER_ARGS))]
            values += [f"{target}={parsed}" for target in targets]
    return head + rest + classes + values


def main_usage_error(prog: str, message: str) -> None:
    """Print ``prog: error: message`` on one line and exit with status 2."""
    sys.stderr.write(f"{prog}: error: {message}\n")
    raise SystemExit(2)
