"""Short flags of ``train.py``: one row per flag, naming the LightningCLI keys it sets.

Each row is an argument of the LightningCLI parser itself (:func:`add_short_flags`), so the command
line is parsed once, by jsonargparse, in the order it was typed: ``--steps 10`` does exactly what
``--model.inner.init_args.steps=10`` does at that place (:func:`set_key` hands the value to the
parser's own action for the key), after the default config file (``configs/mnist.yaml``) and any
``--config`` before it. jsonargparse types the value and the class that uses it checks it
(``Attack.__init__`` rejects ``--eps 2``); ``cli/train.py`` reports that as one line naming the flag
(:func:`name_the_flag`). ``--eps`` sets the inner and validation radii; the robustness evaluation
has ``eps: null`` and takes the validation radius. The resolved config (``--print_config``, the
saved ``config.yaml``) stays the single source of truth.

``--inner NAME`` reads the inner attack's class that the config resolved to so far: when NAME is
another class, the arguments whose meaning depends on the class (``b``, ``alpha``, ``random_start``;
``steps`` of single-step attacks) take the new class's defaults, unless a flag before it set them.
Once every flag is applied, an attack's ``alpha: null`` is replaced by the number its class's rule
gives (:class:`ResolveStepSize`), so ``--print_config`` and the saved ``config.yaml`` show the step
size that is used.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from pydoc import locate
from typing import Any

from jsonargparse import ActionYesNo

from qgtrain.attacks import ATTACKS
from qgtrain.cli import UsageError
from qgtrain.data import DATAMODULES
from qgtrain.models import MODELS
from qgtrain.training.checkpoint_io import DEFAULT_CKPT_MINUTES
from qgtrain.training.weight_averaging import DEFAULT_EMA_DECAY

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


RUN_OPTIONS = (  # (key, type, default, help, short flag or ""): top-level keys beside LightningCLI's
    ("run_name", str | None, None, "run name (null: <dataset>-<net>-<inner>-k<steps>-b<b>)", "--run-name"),
    ("checkpoint_root", str, "checkpoints", "checkpoints go to ROOT/<run>/", ""),
    ("log_root", str, "logs", "TensorBoard logs go to ROOT/<run>/version_N/", ""),
    ("resume", str | None, None, "continue from a .ckpt, a run folder, or 'last' for this run name", "--resume"),
    ("resume_override", bool, False, "with --resume: continue a checkpoint whose dataset, net, objective, inner attack, eps or optimizer differ (recorded in the new checkpoints)", "--resume-override"),
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
    ShortFlag(
        "--inner", ("model.inner",), "inner attack (none: standard training)", {"none": None, **ATTACKS}
    ),
    ShortFlag("--steps", (f"{INNER}.steps",), "inner attack steps"),
    ShortFlag("--eps", (f"{INNER}.eps", f"{VALIDATION}.eps"), "L-inf radius in pixels (robustness follows)"),
    ShortFlag("--alpha", (f"{INNER}.alpha",), "inner attack step size"),
    ShortFlag("--b", (f"{INNER}.b",), "quantization level of the inner attack (1 = sign gradient)"),
    ShortFlag("--replays", (f"{INNER}.replays",), "free AT: times each batch is replayed (m)", minimum=1),
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


def default_config() -> Path:
    """``configs/mnist.yaml``: the parser's default config file, under every ``--config``."""
    return configs_dir() / "mnist.yaml"


def class_path(cls: type) -> str:
    """``qgtrain.attacks.PQGD`` for ``qgtrain.attacks.pgd.PQGD`` (the package exports it)."""
    return f"{cls.__module__.rsplit('.', 1)[0]}.{cls.__name__}"


def class_specific_defaults(cls: type) -> dict[str, str]:
    """Arguments reset when ``--inner`` switches to ``cls`` from another class, whose meaning depends
    on the class: ``b`` (where the class takes one), ``alpha`` (null: the class's step-size rule of
    eps and steps) and ``random_start`` (RGD starts at ``x``, PGD in the ball); single-step attacks
    also ``steps``."""
    accepted = cls.constructor_defaults()
    start = str(accepted.get("random_start")).lower()
    pairs = (("b", str(cls.default_b)), ("alpha", "null"), ("random_start", start))
    reset = {key: value for key, value in pairs if key in accepted}
    if cls.single_step:
        reset.update(steps="1")
    return reset


ATTACK_KEYS = ("model.inner", "model.val_attack")
"""The config's attacks whose ``alpha: null`` :class:`ResolveStepSize` replaces by its number."""
RESOLVE_STEP_SIZE = "--resolve_step_size"
"""The hidden flag ``cli/train.py`` appends to the command line: applied last, after every flag."""


def resolved_step_size(attack: Any) -> float | None:
    """The step size the class of ``attack`` (a config's ``class_path``/``init_args``) will use when
    its ``alpha`` is null: :meth:`~qgtrain.attacks.base.Attack.default_alpha` of its eps and steps
    (PQGD: eps / steps); None when alpha is given or the class takes none."""
    cls = locate(attack.class_path)
    defaults = cls.constructor_defaults()
    args = attack.get("init_args") or {}
    if "alpha" not in defaults or args.get("alpha", defaults["alpha"]) is not None:
        return None
    return cls.default_alpha(float(args.get("eps", defaults["eps"])), int(args.get("steps", defaults["steps"])))


class ResolveStepSize(argparse.Action):
    """Writes each attack's resolved step size over its ``alpha: null`` (:func:`resolved_step_size`),
    through the parser's own action for the key. Its flag is appended after the user's command line,
    so it runs once every flag is applied (``--inner`` switching classes resets alpha to null first,
    ``--steps`` after it still counts) and before jsonargparse prints ``--print_config``."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0, **kwargs)

    def __call__(self, parser: Any, namespace: Any, value: Any, option_string: str | None = None) -> None:
        for key in ATTACK_KEYS:
            attack = namespace.get(key)
            alpha = resolved_step_size(attack) if attack is not None else None
            if alpha is not None:
                set_key(parser, namespace, f"{key}.init_args.alpha", repr(alpha))


def set_key(parser: argparse.ArgumentParser, namespace: Any, key: str, text: str) -> None:
    """Do what ``--key=text`` does at this point of the parse: the parser's own action for the key
    (jsonargparse resolves dotted keys inside a class's ``init_args``) types and stores the value."""
    found = parser._parse_optional(f"--{key}={text}")
    found = found[0] if isinstance(found, list) else found  # Python >= 3.12 returns a list of tuples
    action, option_string, explicit = found[0], found[1], found[-1]
    action(parser, namespace, parser._get_values(action, [explicit]), option_string)


def expansion(row: ShortFlag, value: str, namespace: Any, given: Mapping[str, str]) -> list[tuple[str, str]]:
    """The ``(key, text)`` pairs ``row.flag value`` sets, given the config resolved so far
    (``namespace``) and the short flags already applied (``given``)."""
    flag = row.flag
    if row.minimum is not None and not (value.isdigit() and int(value) >= row.minimum):
        raise UsageError(f"{flag} must be an integer >= {row.minimum}, got {value}")
    if row.choices is not None and value not in row.choices:
        raise UsageError(f"{flag} must be one of {', '.join(row.choices)}, got {value}")
    inner = namespace.get("model.inner")
    if flag == "--dataset":
        if given:
            raise UsageError(
                f"--dataset {value} loads a config that would override {', '.join(given)}: give it first"
            )
        return [("config", str(configs_dir() / f"{value}.yaml"))]
    if flag == "--inner":
        cls = row.choices[value]
        set_before = {key for earlier in given for key in FLAGS[earlier].keys}
        if cls is None:
            needing = [f for f in given if FLAGS[f].keys and all(k.startswith(INNER) for k in FLAGS[f].keys)]
            if needing:
                raise UsageError(f"{needing[0]} needs an inner attack, but --inner is none")
            return [(row.keys[0], "null")]
        pairs = [(row.keys[0], class_path(cls))]
        if inner is None or locate(inner.class_path) is not cls:  # another class than the config's
            resets = class_specific_defaults(cls).items()
            pairs += [(f"{INNER}.{k}", v) for k, v in resets if f"{INNER}.{k}" not in set_before]
        return pairs
    if row.choices is not None:
        return [(row.keys[0], class_path(row.choices[value]))]
    keys = [key for key in row.keys if not (inner is None and key.startswith(INNER))]
    if not keys:
        raise UsageError(
            f"{flag} needs an inner attack, but model.inner is null (--inner none or the config)"
        )
    return [(key, value) for key in keys]


class ShortFlagAction(argparse.Action):
    """Applies one :class:`ShortFlag` row where it stands in the command line; stores nothing of its
    own, so the config holds only the keys the row set. The flags given so far are kept on the
    parser (``parser.short_flags_given``) for the error lines that name them."""

    def __init__(self, option_strings: list[str], dest: str, row: ShortFlag, **kwargs: Any) -> None:
        metavar = "NAME" if row.choices is not None else "VALUE"
        super().__init__(
            option_strings, argparse.SUPPRESS, default=argparse.SUPPRESS, metavar=metavar, **kwargs
        )
        self.row = row

    def __call__(self, parser: Any, namespace: Any, value: Any, option_string: str | None = None) -> None:
        given: dict[str, str] = parser.short_flags_given
        for key, text in expansion(self.row, str(value), namespace, given):
            inner = namespace.get("model.inner")
            if key.startswith(f"{INNER}.") and inner is not None:
                cls, name = locate(inner.class_path), key.rsplit(".", 1)[-1]
                if name not in cls.constructor_defaults():
                    raise UsageError(
                        f"{self.row.flag}: --{key} is not an argument of {cls.__name__}, the class chosen "
                        "for model.inner"
                    )
            try:
                set_key(parser, namespace, key, text)
            except (argparse.ArgumentError, ValueError, TypeError) as exc:
                if isinstance(exc, UsageError):
                    raise
                reason = " ".join(str(exc).split())
                own = re.search(rf'Parser key "{key.rsplit(".", 1)[-1]}": (.*?)(?: - |$)', reason)
                raise UsageError(f"{self.row.flag}: {own.group(1) if own else reason}") from None
        given[self.row.flag] = str(value)


class HelpAfterParse(argparse.Action):
    """``-h/--help`` that only marks the request (``parser.help_requested``): the CLI prints the help
    once the parse has resolved the values the table shows."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0, **kwargs)

    def __call__(self, parser: Any, namespace: Any, value: Any, option_string: str | None = None) -> None:
        parser.help_requested = True


def add_short_flags(parser: Any) -> None:
    """Declare every row of :data:`SHORT_FLAGS` on the LightningCLI ``parser``, and the hidden
    :data:`RESOLVE_STEP_SIZE`."""
    parser.short_flags_given = {}
    parser.add_argument(RESOLVE_STEP_SIZE, action=ResolveStepSize, help=argparse.SUPPRESS)
    group = parser.add_argument_group("Short flags (applied in order, as the long keys they set)")
    for row in SHORT_FLAGS:
        if row.keys[0] in {key for key, *_ in RUN_OPTIONS}:
            continue  # a second spelling of the top-level option itself (add_run_options)
        group.add_argument(
            row.flag, action=ShortFlagAction, row=row, help=f"{row.help}; sets {', '.join(row.keys)}"
        )


def add_run_options(parser: Any) -> None:
    """The top-level options of :data:`RUN_OPTIONS`, each also under its short flag; a ``bool`` one is
    ``--key`` (on), ``--key false`` or ``--no_key``."""
    for key, kind, default, text, flag in RUN_OPTIONS:
        names = [f"--{key}", *([flag] if flag and flag != f"--{key}" else [])]
        if kind is bool:
            parser.add_argument(*names, action=ActionYesNo, nargs="?", default=default, help=text)
        else:
            parser.add_argument(*names, type=kind, default=default, help=text)


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
    if row.flag == "--dataset":
        value = config.get("data") if config is not None else None
        path = getattr(value, "class_path", None)
        return next((name for name, cls in row.choices.items() if cls and class_path(cls) == path), "?")
    value = config.get(row.keys[0]) if config is not None else None
    if row.choices is not None:
        if row.flag == "--inner" and config is not None and value is None:
            return "none"
        path = getattr(value, "class_path", None)
        return next((name for name, cls in row.choices.items() if cls and class_path(cls) == path), "?")
    if isinstance(value, bool):
        return str(value).lower()  # as YAML and the command line spell it
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
