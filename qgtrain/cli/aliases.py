"""Short flags of ``train.py``: one row per flag, naming the LightningCLI keys it sets.

Trace ``--eps 0.2``: its row in :data:`SHORT_FLAGS` lists ``model.inner.init_args.eps`` and
``model.val_attack.init_args.eps``, so :func:`expand_short_flags` appends
``--model.inner.init_args.eps=0.2 --model.val_attack.init_args.eps=0.2`` after the config files and
long arguments. jsonargparse types the value and ``Attack.__init__`` (``attacks/base.py``) rejects a
radius outside ``(0, 1]``; that message comes out as one line naming the flag (:func:`name_the_flag`,
used by ``cli/train.py``). The robustness evaluation has ``eps: null`` and takes the module's
``val_attack`` radius (``RobustnessEvaluation.resolve_eps``). The resolved config
(``--print_config``, the saved ``config.yaml``) stays the single source of truth.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from pydoc import locate
from typing import Any

import yaml

from qgtrain.attacks import ATTACKS
from qgtrain.cli import UsageError
from qgtrain.data import DATAMODULES
from qgtrain.models import MODELS

INNER = "model.inner.init_args"
VALIDATION = "model.val_attack.init_args"


@dataclass(frozen=True)
class ShortFlag:
    """``flag VALUE`` sets every key in ``keys`` to VALUE.

    With ``choices`` (a registry), VALUE is a registered name and ``keys[0]`` gets its class:
    ``--dataset`` loads ``configs/<name>.yaml`` instead, ``--inner none`` means no inner attack.
    ``minimum`` is checked only where no class downstream checks the value itself.
    """

    flag: str
    keys: tuple[str, ...]
    help: str
    choices: Mapping[str, type | None] | None = None
    minimum: int | None = None


EVAL, VIEWS = "robustness", "visualization"  # the robustness evaluation and its TensorBoard views
SHORT_FLAGS: tuple[ShortFlag, ...] = (
    ShortFlag("--dataset", ("data",), "dataset; loads configs/<name>.yaml", DATAMODULES),
    ShortFlag(
        "--inner", ("model.inner",), "inner attack (none: standard training)", {"none": None, **ATTACKS}
    ),
    ShortFlag("--steps", (f"{INNER}.steps",), "inner attack steps"),
    ShortFlag("--eps", (f"{INNER}.eps", f"{VALIDATION}.eps"), "L-inf radius in pixels (robustness follows)"),
    ShortFlag("--alpha", (f"{INNER}.alpha",), "inner attack step size"),
    ShortFlag("--b", (f"{INNER}.b",), "quantization level of the inner attack (1 = sign gradient)"),
    ShortFlag("--model", ("model.net",), "network", MODELS),
    ShortFlag("--epochs", ("trainer.max_epochs",), "training epochs", minimum=1),
    ShortFlag("--batch-size", ("data.init_args.batch_size",), "training batch size"),
    ShortFlag("--lr", ("model.optimizer.init_args.lr",), "learning rate"),
    ShortFlag("--devices", ("trainer.devices",), "devices per node (a count, GPU indices or auto)"),
    ShortFlag("--num-nodes", ("trainer.num_nodes",), "number of nodes"),
    ShortFlag("--strategy", ("trainer.strategy",), "auto, ddp, ddp_spawn, ..."),
    ShortFlag("--precision", ("trainer.precision",), "32-true, 16-mixed, bf16-mixed"),
    ShortFlag("--seed", ("seed_everything", "model.seed", "data.init_args.seed"), "seed of all", minimum=0),
    ShortFlag("--data-dir", ("data.init_args.data_dir",), "data root (null: $QGTRAIN_DATA, else ./data)"),
    ShortFlag("--run-name", ("run_name",), "run name (null: <dataset>-<model>-<inner>-k<steps>-b<b>)"),
    ShortFlag("--resume", ("resume",), "continue from a .ckpt, a run folder, or 'last' for this run name"),
    ShortFlag("--ckpt-every-steps", ("ckpt_every_steps",), "also write step.ckpt every N steps (0 = off)"),
    ShortFlag("--ckpt-every-minutes", ("ckpt_every_minutes",), "write step.ckpt every T minutes (0 = off)"),
    ShortFlag(
        "--eval-every", (f"{EVAL}.every_n_epochs", f"{VIEWS}.every_n_epochs"), "every N epochs (0 = off)"
    ),
    ShortFlag("--eval-attack", (f"{EVAL}.attack",), f"the evaluation's main attack: {', '.join(ATTACKS)}"),
    ShortFlag("--eval-steps", (f"{EVAL}.steps",), "robustness evaluation attack steps"),
    ShortFlag("--eval-size", (f"{EVAL}.subset_size",), "validation images in the robustness evaluation"),
    ShortFlag("--eval-b", (f"{EVAL}.b",), "quantization level of the robustness evaluation's main attack"),
)
FLAGS: dict[str, ShortFlag] = {row.flag: row for row in SHORT_FLAGS}


def configs_dir() -> Path:
    """``./configs`` when it exists, else the repository's ``configs/`` beside the package."""
    local = Path.cwd() / "configs"
    return local if local.is_dir() else Path(__file__).resolve().parents[2] / "configs"


def class_path(cls: type) -> str:
    """``qgtrain.attacks.PQGD`` for ``qgtrain.attacks.pgd.PQGD`` (the package exports it)."""
    return f"{cls.__module__.rsplit('.', 1)[0]}.{cls.__name__}"


def class_specific_defaults(cls: type) -> dict[str, str]:
    """Arguments reset when ``--inner`` switches to ``cls`` from another class: ``b`` (where the class
    takes one) and ``alpha`` (null: the class's step-size rule of eps and steps), whose meaning
    depends on the class; single-step attacks also ``steps`` and ``random_start``."""
    accepted = cls.constructor_defaults()
    reset = {key: value for key, value in (("b", str(cls.default_b)), ("alpha", "null")) if key in accepted}
    if cls.single_step:
        reset.update(steps="1", random_start=str(accepted["random_start"]).lower())
    return reset


def default_config() -> Path:
    """``configs/mnist.yaml``: what ``train.py`` reads when no ``--config`` is given."""
    return configs_dir() / "mnist.yaml"


def config_files(args: list[str]) -> list[str]:
    """The ``--config`` files among ``args`` (``--config F``, ``-c F``, ``--config=F``), in order."""
    files = []
    for flag, value in zip(args, [*args[1:], ""][: len(args)], strict=True):
        if flag in ("--config", "-c"):
            files.append(value)
        elif flag.startswith("--config="):
            files.append(flag.split("=", 1)[1])
    return files


def configured_inner(args: list[str]) -> Any:
    """The class the config files (else :func:`default_config`), then any ``--model.inner=``
    argument among ``args``, give the inner attack, the last one winning; None when none names one."""
    found = None
    for file in config_files(args) or [str(default_config())]:
        try:
            inner = (yaml.safe_load(Path(file).read_text()) or {}).get("model", {}).get("inner")
        except (OSError, yaml.YAMLError, AttributeError):
            continue  # jsonargparse reports a bad file itself
        if isinstance(inner, dict) and "class_path" in inner:
            found = locate(inner["class_path"])
    for arg in args:
        if arg.startswith("--model.inner="):
            found = locate(arg.split("=", 1)[1])
    return found


def parse_short_flags(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """``({flag: value}, the other arguments in their order)``.

    ``--model NAME`` is the short flag; ``--model.net ...`` and other dotted keys pass through, as
    does LightningCLI's own ``--model <config>`` when the value is not a registered model.
    """
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    for row in SHORT_FLAGS:
        parser.add_argument(row.flag)
    try:
        known, rest = parser.parse_known_args(argv)
    except argparse.ArgumentError as exc:
        raise UsageError(str(exc)) from None
    given = {row.flag: getattr(known, row.flag[2:].replace("-", "_")) for row in SHORT_FLAGS}
    given = {flag: value for flag, value in given.items() if value is not None}
    if given.get("--model", "") not in MODELS and "." in given.get("--model", ""):
        rest = ["--model", given.pop("--model"), *rest]
    return given, rest


def expand_short_flags(argv: list[str]) -> list[str]:
    """Rewrite short flags into LightningCLI arguments, applied after ``--config`` files and long
    arguments (raises :class:`UsageError` for an unknown name)."""
    given, rest = parse_short_flags(argv)
    head: list[str] = []
    classes: list[str] = []
    values: list[str] = []
    no_inner = given.get("--inner") == "none"  # `--eps` then sets only the validation radius
    for flag, value in given.items():
        row = FLAGS[flag]
        if row.minimum is not None and not (value.isdigit() and int(value) >= row.minimum):
            raise UsageError(f"{flag} must be an integer >= {row.minimum}, got {value}")
        keys = [k for k in row.keys if not (no_inner and k.startswith(INNER))]
        if not keys:
            raise UsageError(f"{flag} needs an inner attack, but --inner is none")
        if row.choices is None:
            values += [f"--{key}={value}" for key in keys]
        elif value not in row.choices:
            raise UsageError(f"{flag} must be one of {', '.join(row.choices)}, got {value}")
        elif flag == "--dataset":
            head += ["--config", str(configs_dir() / f"{value}.yaml")]
        elif (cls := row.choices[value]) is None:
            classes.append(f"--{keys[0]}=null")
        else:
            classes.append(f"--{keys[0]}={class_path(cls)}")
            if flag == "--inner" and cls is not configured_inner(head + rest):
                # init_args of the config's attack carry over to the new class (eps, steps...); those
                # whose meaning depends on the class are reset to the new class's defaults.
                defaults = class_specific_defaults(cls).items()
                values[:0] = [f"--{INNER}.{key}={default}" for key, default in defaults]
    return head + rest + classes + values


def name_the_flag(message: str, given: Mapping[str, str]) -> str:
    """``steps must be ...`` becomes ``--steps must be ...`` when the short flag ``--steps`` set the
    key the message starts with (its dotted path without ``init_args``, or its last part); a message
    quoting a flag's value (``unknown attack 'cw'``) gets the flag in front."""
    for exact in (True, False):
        for flag in given:
            for key in FLAGS[flag].keys:
                name = key.replace(".init_args", "") if exact else key.rsplit(".", 1)[-1]
                for quoted in (name, f"`{name}`"):  # Lightning quotes its argument names
                    if message.startswith(quoted) and message[len(quoted) : len(quoted) + 1] in (" ", ":"):
                        return flag + message[len(quoted) :]
    quoted = next((flag for flag, value in given.items() if f"'{value}'" in message), None)
    return f"{quoted}: {message}" if quoted else message


def _shown(row: ShortFlag, config: Any) -> str:
    """The value the resolved ``config`` gives ``row`` (a registered name for class choices)."""
    value = config.get(row.keys[0]) if config is not None else None
    if row.choices is not None:
        if row.flag == "--inner" and config is not None and value is None:
            return "none"
        path = getattr(value, "class_path", None)
        return next((name for name, cls in row.choices.items() if cls and class_path(cls) == path), "?")
    return "null" if value is None else str(value)


def short_flag_help(config: Any = None, source: str = "") -> str:
    """The table: each flag with its value in ``config`` (the resolved defaults) and the keys it sets."""
    rows = [(row.flag, _shown(row, config), row) for row in SHORT_FLAGS]
    width = max(len(flag) for flag, _, _ in rows) + 1 + min(max(len(shown) for _, shown, _ in rows), 12)
    lines = [f"Short flags, with their values from {source or 'the resolved config'}:"]
    for flag, shown, row in rows:
        choices = f": {', '.join(row.choices)}" if row.choices is not None else ""
        keys = ", ".join(row.keys) if row.flag != "--dataset" else "--config configs/<name>.yaml"
        lines.append(f"  {f'{flag} {shown}'.ljust(width)}  {row.help}{choices}")
        lines.append(f"  {''.ljust(width)}    sets {keys}")
    return "\n".join(lines)
