"""Short flags of ``train.py``: one row per flag, naming the LightningCLI keys it sets.

:func:`expand` rewrites each flag, where it stands, into those keys (``--steps 10`` is
``--model.inner.init_args.steps=10``), so jsonargparse parses the command line once, in order;
``--inner`` and ``--eps`` are parser actions on the config resolved so far, and each ``alpha: null``
becomes its class's rule last, so ``--print_config`` and ``config.yaml`` show the step size used.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from pydoc import locate
from typing import Any

from jsonargparse import ActionYesNo, Namespace

from qgtrain.attacks import ATTACKS
from qgtrain.checkpoints import DEFAULT_CKPT_MINUTES
from qgtrain.cli import ConfigAction, UsageError
from qgtrain.data import DATAMODULES
from qgtrain.models import MODELS
from qgtrain.training.weight_averaging import DEFAULT_EMA_DECAY

INNER = "model.inner.init_args"
VALIDATION = "model.val_attack.init_args"


@dataclass(frozen=True)
class ShortFlag:
    """``flag VALUE`` sets every key in ``keys`` to VALUE; with ``choices`` (a registry), VALUE is a
    name and ``keys[0]`` gets its class. ``minimum``: only where no class checks the value itself."""

    flag: str
    keys: tuple[str, ...]
    help: str
    choices: Mapping[str, type | None] | None = None
    minimum: int | None = None


RUN_OPTIONS = (  # (key, type, default, help, short flag or ""): top-level keys beside LightningCLI's
    ("run_name", str | None, None, "run name (null: <dataset>-<net>-<inner>-k<steps>-b<b>)", "--run-name"),
    ("checkpoint_root", str, "checkpoints", "checkpoints go to ROOT/<run>/", ""),
    ("log_root", str, "logs", "TensorBoard logs go to ROOT/<run>/version_N/", ""),
    ("resume", str | None, None, "continue from a .ckpt, a run folder, or 'last' for this run name", "--resume"),
    ("resume_override", bool, False, "with --resume: continue a checkpoint whose run definition differs (dataset, net, objective, inner attack or its arguments, training hyperparameters, batch size, weight average, optimizer or its settings; recorded in the new checkpoints)", "--resume-override"),
    ("ckpt_every_steps", int, 0, "also write step.ckpt every N steps (0 = off)", "--ckpt-every-steps"),
    ("ckpt_every_minutes", float, DEFAULT_CKPT_MINUTES, "write step.ckpt every T minutes (0 = off)", "--ckpt-every-minutes"),
    ("ema", bool, False, "exponential moving average of the weights: validated, monitored, checkpointed, evaluated", "--ema"),
    ("ema_decay", float, DEFAULT_EMA_DECAY, "its decay per optimizer step (with --ema)", "--ema-decay"),
    ("ema_start_step", int, 0, "the optimizer step it starts at; the current weights until then (with --ema)", "--ema-start-step"),
    ("verbose", bool, False, "also show other libraries' start-up lines (Lightning's, deprecations)", "--verbose"),
)  # fmt: skip
EVAL, VIEWS = "robustness", "visualization"  # the robustness evaluation and its TensorBoard views
SHORT_FLAGS: tuple[ShortFlag, ...] = (
    ShortFlag("--dataset", ("config",), "dataset; loads configs/<name>.yaml (give it first)", DATAMODULES),
    ShortFlag("--inner", ("model.inner",), "inner attack (none: standard training)", {"none": None, **ATTACKS}),
    ShortFlag("--steps", (f"{INNER}.steps",), "inner attack steps"),
    ShortFlag("--eps", (f"{INNER}.eps", f"{VALIDATION}.eps"), "L-inf radius in pixels (robustness follows)"),
    ShortFlag("--alpha", (f"{INNER}.alpha",), "inner attack step size"),
    ShortFlag("--b", (f"{INNER}.b",), "quantization level of the inner attack (1 = sign gradient)"),
    ShortFlag("--replays", (f"{INNER}.replays",), "free AT: times each batch is replayed (m)"),
    ShortFlag("--net", ("model.net",), "network", MODELS),
    ShortFlag("--epochs", ("trainer.max_epochs",), "training epochs", minimum=1),
    ShortFlag("--batch-size", ("data.init_args.batch_size",), "training batch size"),
    ShortFlag("--lr", ("model.optimizer.init_args.lr",), "learning rate"),
    ShortFlag("--awp", ("model.awp_gamma",), "AWP: relative size gamma of the weight perturbation (0 = off)"),
    ShortFlag("--devices", ("trainer.devices",), "devices per node (a count, GPU indices or auto)"),
    ShortFlag("--num-nodes", ("trainer.num_nodes",), "number of nodes"),
    ShortFlag("--strategy", ("trainer.strategy",), "auto, ddp, ddp_spawn, ..."),
    ShortFlag("--precision", ("trainer.precision",), "32-true, 16-mixed, bf16-mixed"),
    ShortFlag("--seed", ("seed_everything", "model.seed", "data.init_args.seed"), "seed of all", minimum=0),
    ShortFlag("--data-dir", ("data.init_args.data_dir",), "data root (null: $QGTRAIN_DATA, else ./data)"),
    *(ShortFlag(flag, (key,), text) for key, _, _, text, flag in RUN_OPTIONS if flag),
    ShortFlag("--eval-every", (f"{EVAL}.every_n_epochs", f"{VIEWS}.every_n_epochs"), "every N epochs (0 = off)"),
    ShortFlag("--eval-attack", (f"{EVAL}.attack",), f"the evaluation's main attack: {', '.join(ATTACKS)}"),
    ShortFlag("--eval-steps", (f"{EVAL}.steps",), "robustness evaluation attack steps"),
    ShortFlag("--eval-size", (f"{EVAL}.subset_size",), "validation images in the robustness evaluation"),
    ShortFlag("--eval-b", (f"{EVAL}.b",), "quantization level of the robustness evaluation's main attack"),
)  # fmt: skip
FLAGS: dict[str, ShortFlag] = {row.flag: row for row in SHORT_FLAGS}
PARSER_ACTIONS = ("--inner", "--eps")  # they read the config resolved so far: parser actions, not rewritten
RUN_KEYS = {key for key, *_ in RUN_OPTIONS}


def configs_dir() -> Path:
    """``./configs`` when it exists, else the repository's ``configs/`` beside the package."""
    local = Path.cwd() / "configs"
    return local if local.is_dir() else Path(__file__).resolve().parents[2] / "configs"


def default_config() -> Path:
    """``configs/mnist.yaml``, the parser's default config file."""
    return configs_dir() / "mnist.yaml"


def class_path(cls: type) -> str:
    """``qgtrain.attacks.PQGD`` for ``qgtrain.attacks.pgd.PQGD`` (the package exports it)."""
    return f"{cls.__module__.rsplit('.', 1)[0]}.{cls.__name__}"


def needs_inner(flag: str) -> bool:
    """Whether every key ``flag`` sets is an argument of the inner attack."""
    return all(key.startswith(INNER) for key in FLAGS[flag].keys)


def expand(argv: list[str], given: dict[str, str], set_before_inner: list[set[str]]) -> list[str]:
    """``argv`` with each short flag replaced by the keys it sets, where it stands; records the flags
    in ``given`` and, for each ``--inner``, the keys that flags before it set."""
    out, rest = [], list(argv)
    while rest:
        flag, eq, value = rest.pop(0).partition("=")
        row = FLAGS.get(flag)
        if row is None or row.keys[0] in RUN_KEYS:
            out.append(flag + eq + value)
            continue
        if not eq:
            if not rest:
                raise UsageError(f"{flag} needs a value")
            value = rest.pop(0)
        if row.minimum is not None and not (value.isdigit() and int(value) >= row.minimum):
            raise UsageError(f"{flag} must be an integer >= {row.minimum}, got {value}")
        if row.choices is not None and value not in row.choices:
            raise UsageError(f"{flag} must be one of {', '.join(row.choices)}, got {value}")
        if flag == "--dataset" and given:
            raise UsageError(f"--dataset {value} loads a config that would override {', '.join(given)}: give it first")
        needing = [earlier for earlier in given if needs_inner(earlier)]
        if flag == "--inner" and value == "none" and needing:
            raise UsageError(f"{needing[0]} needs an inner attack, but --inner is none")
        if flag == "--inner":
            set_before_inner.append({key for earlier in given for key in FLAGS[earlier].keys})
        if flag in PARSER_ACTIONS:
            out += [flag, value]
        elif flag == "--dataset":
            out += ["--config", str(configs_dir() / f"{value}.yaml")]
        else:
            text = class_path(row.choices[value]) if row.choices is not None else value
            out += [f"--{key}={text}" for key in row.keys]
        given[flag] = value
    return out


def refuse_arguments_without_an_attack(config: Namespace, given: Mapping[str, str]) -> None:
    """Arguments of a null attack (``--inner none --steps 3``; jsonargparse builds the base class
    ``Attack``) are refused, naming the flag."""
    for key in ("inner", "val_attack"):
        attack = config.model.get(key)
        if attack is not None and attack.class_path.rsplit(".", 1)[-1] == "Attack":
            flag = next((f for f in given if key == "inner" and needs_inner(f)), None)
            if flag is not None:
                raise UsageError(f"{flag} needs an inner attack, but model.inner is null (--inner none or the config)")
            raise UsageError(f"model.{key} has arguments but no attack class; choose one with --inner NAME")


def switch_attack(parser: Any, namespace: Namespace, name: str) -> None:
    """``--inner NAME``: the inner attack becomes NAME's class, or null. Another class than the
    config's takes its own ``b``, ``random_start`` (and a single-step class its ``steps``),
    ``alpha: null`` (its rule) and the threat model's ``eps`` (the validation attack's: a config's
    training radius beyond it, mnist.yaml's 0.4, belongs to the config's recipe), unless a flag
    before ``--inner`` set them; other arguments carry over."""
    cls, current, set_before = ATTACKS.get(name), namespace.get("model.inner"), parser.set_before_inner.pop(0)
    if cls is None:
        namespace["model.inner"] = None
    elif current is None or locate(current.class_path) is not cls:
        args = dict(cls.constructor_defaults())
        specific = {"b", "alpha", "random_start"} | ({"steps"} if cls.single_step else set())
        carried = vars(current.init_args) if current is not None and current.get("init_args") else {}
        args |= {k: v for k, v in carried.items() if k in args and (k not in specific or f"{INNER}.{k}" in set_before)}
        if "alpha" in args and f"{INNER}.alpha" not in set_before:
            args["alpha"] = None
        threat = namespace.get(f"{VALIDATION}.eps") if namespace.get("model.val_attack") is not None else None
        if "eps" in args and threat is not None and f"{INNER}.eps" not in set_before:
            args["eps"] = threat
        namespace["model.inner"] = Namespace(class_path=class_path(cls), init_args=Namespace(**args))


def set_radius(parser: Any, namespace: Namespace, eps: float) -> None:
    """``--eps``: the radius of each attack the config has (standard training has no inner one)."""
    for key in FLAGS["--eps"].keys:
        if namespace.get(key.rsplit(".init_args", 1)[0]) is not None:
            namespace[key] = eps


def resolve_step_sizes(parser: Any, namespace: Namespace, value: Any) -> None:
    """Each attack's ``alpha: null`` becomes :meth:`~qgtrain.attacks.base.Attack.default_alpha` of its
    eps and steps; :data:`RESOLVE_STEP_SIZE`, appended to the command line, runs it last. Steps that
    are not a count >= 1 leave it null: the class's own check refuses them, naming the flag."""
    for key in ("model.inner", "model.val_attack"):
        attack = namespace.get(key)
        cls = locate(attack.class_path) if attack is not None else None
        args = {**cls.constructor_defaults(), **vars(attack.get("init_args") or Namespace())} if cls else {}
        counted = isinstance(args.get("steps"), int) and args["steps"] >= 1
        if "alpha" in args and args["alpha"] is None and counted:
            namespace[f"{key}.init_args.alpha"] = cls.default_alpha(float(args["eps"]), int(args["steps"]))


RESOLVE_STEP_SIZE = "--resolve_step_size"


def request_help(parser: Any, namespace: Namespace, value: Any) -> None:
    """``-h/--help`` marks the request; the help is printed after the parse, with resolved values."""
    parser.help_requested = True


def add_short_flags(parser: Any) -> None:
    """``-h/--help`` (printed after the parse, with the resolved values), :data:`RUN_OPTIONS` (also
    under their short flags), :data:`PARSER_ACTIONS` and :data:`RESOLVE_STEP_SIZE`."""
    parser.add_argument("-h", "--help", action=ConfigAction, apply=request_help, nargs=0, help="Show this help message and exit.")
    for key, kind, default, text, flag in RUN_OPTIONS:
        names = [f"--{key}", *([flag] if flag and flag != f"--{key}" else [])]
        if kind is bool:
            parser.add_argument(*names, action=ActionYesNo, nargs="?", default=default, help=text)
        else:
            parser.add_argument(*names, type=kind, default=default, help=text)
    parser.add_argument("--inner", action=ConfigAction, apply=switch_attack, help=argparse.SUPPRESS)
    parser.add_argument("--eps", action=ConfigAction, apply=set_radius, type=float, help=argparse.SUPPRESS)
    parser.add_argument(RESOLVE_STEP_SIZE, action=ConfigAction, apply=resolve_step_sizes, nargs=0, help=argparse.SUPPRESS)


def name_the_flag(message: str, given: Mapping[str, str]) -> str:
    """``--steps must be ...`` for ``steps must be ...`` when ``--steps`` set the key the message starts
    with (its path without ``init_args``, or its last part); a message quoting a flag's value
    (``unknown attack 'cw'``) gets the flag in front."""
    for exact in (True, False):
        for flag in given:
            for key in FLAGS[flag].keys:
                name = key.replace(".init_args", "") if exact else key.rsplit(".", 1)[-1]
                for quoted in (name, f"`{name}`"):  # Lightning quotes its argument names
                    if message.startswith(quoted) and message[len(quoted) : len(quoted) + 1] in (" ", ":"):
                        return flag + message[len(quoted) :]
    quoted = next((flag for flag, value in given.items() if f"'{value}'" in message), None)
    return f"{quoted}: {message}" if quoted else message


def short_flag_help(config: Any = None, source: str = "") -> str:
    """The table: each flag with its value in ``config`` and the keys it sets."""

    def shown(row: ShortFlag) -> str:
        if config is not None and row.choices is None and len(row.keys) > 1:  # --eps 0.4/0.3: each key's, where they differ
            values = list(dict.fromkeys(str(v) for key in row.keys if (v := config.get(key)) is not None))
            if len(values) > 1:
                return "/".join(values)
        value = config.get("data" if row.flag == "--dataset" else row.keys[0]) if config is not None else None
        if row.choices is not None:
            if row.flag == "--inner" and config is not None and value is None:
                return "none"
            path = getattr(value, "class_path", None)
            return next((name for name, cls in row.choices.items() if cls and class_path(cls) == path), "?")
        return str(value).lower() if isinstance(value, bool) else "null" if value is None else str(value)

    values = [shown(row) for row in SHORT_FLAGS]
    width = max(len(row.flag) for row in SHORT_FLAGS) + 1 + min(max(map(len, values)), 12)
    lines = [f"Short flags, with their values from {source or 'the resolved config'}:"]
    for row, value in zip(SHORT_FLAGS, values, strict=True):
        choices = f": {', '.join(row.choices)}" if row.choices is not None else ""
        keys = ", ".join(row.keys) if row.flag != "--dataset" else "--config configs/<name>.yaml"
        lines += [f"  {f'{row.flag} {value}'.ljust(width)}  {row.help}{choices}", f"  {''.ljust(width)}    sets {keys}"]
    return "\n".join(lines)
