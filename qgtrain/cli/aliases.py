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


def _float_in(name: str, value: str, low: float, high: float, low_open: bool = True) -> float:
    try:
        number = float(value)
    except ValueError:
        raise UsageError(f"{name} must be a number, got {value}") from None
    ok = (number > low if low_open else number >= low) and number <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise UsageError(f"{name} must be in {bracket}{low:g}, {high:g}], got {value}")
    return number


@dataclass(frozen=True)
class ShortFlag:
    flag: str
    help: str


SHORT_FLAGS: list[ShortFlag] = [
    ShortFlag("--dataset", f"dataset, loads configs/<name>.yaml: {', '.join(DATAMODULES)}"),
    ShortFlag("--inner", f"inner maximiser: {', '.join(INNER_CHOICES)}"),
    ShortFlag("--steps", "inner attack steps (integer >= 1)"),
    ShortFlag(
        "--eps", "L-inf radius in pixel units, (0, 1]; also used by validation and robustness evaluation"
    ),
    ShortFlag("--alpha", "inner attack step size (> 0)"),
    ShortFlag("--b", "quantization level of the inner attack (integer >= 1; 1 = sign gradient)"),
    ShortFlag(
        "--model", f"network: {', '.join(MODELS)} (a dotted LightningCLI --model.* argument passes through)"
    ),
    ShortFlag("--epochs", "training epochs"),
    ShortFlag("--batch-size", "training batch size"),
    ShortFlag("--lr", "learning rate"),
    ShortFlag("--devices", "devices per node (int or 'auto')"),
    ShortFlag("--num-nodes", "number of nodes"),
    ShortFlag("--strategy", "auto, ddp, ddp_spawn, ..."),
    ShortFlag("--precision", "32-true, 16-mixed, bf16-mixed"),
    ShortFlag("--seed", "seed of everything: data split and order, attacks, initialisation"),
    ShortFlag("--data-dir", "data root (default: $QGTRAIN_DATA, else ./data)"),
    ShortFlag("--run-name", "run name (default: <dataset>-<inner>-k<steps>-b<b>)"),
    ShortFlag(
        "--resume", "continue from a checkpoint: a .ckpt path, a run folder, or 'last' for this run name"
    ),
    ShortFlag("--eval-every", "robustness evaluation every N epochs (0 = off); also the TensorBoard views"),
    ShortFlag("--eval-attack", f"robustness evaluation's main attack: {', '.join(ATTACKS)}"),
    ShortFlag("--eval-steps", "robustness evaluation attack steps (integer >= 1)"),
    ShortFlag("--eval-size", "robustness evaluation subset of the validation split (examples)"),
    ShortFlag("--eval-b", "quantization level of the robustness evaluation's main attack (integer >= 1)"),
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
    known = argparse.Namespace(**{f.flag.lstrip("-").replace("-", "_"): None for f in SHORT_FLAGS})
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
            setattr(known, flag.lstrip("-").replace("-", "_"), value)
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
    inner = "--model.inner.init_args"
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
            values += [f"{inner}.{key}={value}" for key, value in class_specific_defaults(cls).items()]
    if known.model is not None:
        cls = MODELS[known.model]
        classes.append(f"--model.net={cls.__module__.rsplit('.', 1)[0]}.{cls.__name__}")
    if known.steps is not None:
        values.append(f"{inner}.steps={_positive_int('--steps', known.steps)}")
    if known.eps is not None:
        eps = _float_in("--eps", known.eps, 0.0, 1.0)
        values += [f"{inner}.eps={eps}", f"--model.val_attack.init_args.eps={eps}", f"--robustness.eps={eps}"]
    if known.alpha is not None:
        values.append(f"{inner}.alpha={_float_in('--alpha', known.alpha, 0.0, float('inf'))}")
    if known.b is not None:
        values.append(f"{inner}.b={_positive_int('--b', known.b)}")
    if known.epochs is not None:
        values.append(f"--trainer.max_epochs={_positive_int('--epochs', known.epochs)}")
    if known.batch_size is not None:
        values.append(f"--data.init_args.batch_size={_positive_int('--batch-size', known.batch_size)}")
    if known.lr is not None:
        values.append(f"--model.optimizer.init_args.lr={_float_in('--lr', known.lr, 0.0, float('inf'))}")
    if known.devices is not None:
        values.append(f"--trainer.devices={known.devices}")
    if known.num_nodes is not None:
        values.append(f"--trainer.num_nodes={_positive_int('--num-nodes', known.num_nodes)}")
    if known.strategy is not None:
        values.append(f"--trainer.strategy={known.strategy}")
    if known.precision is not None:
        values.append(f"--trainer.precision={known.precision}")
    if known.seed is not None:
        if not known.seed.isdigit():
            raise UsageError(f"--seed must be an integer >= 0, got {known.seed}")
        seed = int(known.seed)
        values += [f"--seed_everything={seed}", f"--model.seed={seed}", f"--data.init_args.seed={seed}"]
    if known.data_dir is not None:
        values.append(f"--data.init_args.data_dir={known.data_dir}")
    if known.run_name is not None:
        values.append(f"--run_name={known.run_name}")
    if known.resume is not None:
        values.append(f"--resume={known.resume}")
    values += _eval_flags(known)
    return head + rest + classes + values


def _eval_flags(known: argparse.Namespace) -> list[str]:
    """The ``--eval-*`` flags as ``--robustness.*`` (and ``--visualization.every_n_epochs``) arguments."""
    values = []
    if known.eval_every is not None:
        if not known.eval_every.isdigit():
            raise UsageError(
                f"--eval-every must be an integer >= 0 (0 turns evaluation off), got {known.eval_every}"
            )
        every = int(known.eval_every)
        values += [f"--robustness.every_n_epochs={every}", f"--visualization.every_n_epochs={every}"]
    if known.eval_attack is not None:
        if known.eval_attack not in ATTACKS:
            raise UsageError(f"--eval-attack must be one of {', '.join(ATTACKS)}, got {known.eval_attack}")
        values.append(f"--robustness.attack={known.eval_attack}")
    if known.eval_steps is not None:
        values.append(f"--robustness.steps={_positive_int('--eval-steps', known.eval_steps)}")
    if known.eval_size is not None:
        values.append(f"--robustness.subset_size={_positive_int('--eval-size', known.eval_size)}")
    if known.eval_b is not None:
        values.append(f"--robustness.b={_positive_int('--eval-b', known.eval_b)}")
    return values


def main_usage_error(prog: str, message: str) -> None:
    """Print ``prog: error: message`` on one line and exit with status 2."""
    sys.stderr.write(f"{prog}: error: {message}\n")
    raise SystemExit(2)
