"""The two evaluation protocols: ``standard`` (an AutoAttack-strength suite) and ``paper``.

``standard`` runs APGD-CE, APGD-T, FAB-T and Square in AutoAttack's order (native FAB-T, ``fab_t``),
each on the examples still robust, plus PQGD and BLOB_QG rows so the paper's
comparison stays visible. ``paper`` is the paper's protocol (Liu & Tsang, Sec. 4.1; Tables 2-6,
Figures 3-5) and its sweeps:

For every attack (and every ``b`` of a quantized one) the test examples are attacked in ``runs``
independent runs; run ``r`` draws its random starts from seed ``seed + r`` (per batch, see
:func:`~qgtrain.evaluation.protocol.adversarial_correct`). Inside a run, ``restarts`` random starts
are merged per example: an example counts as robust only if no restart fools the model (Sec. 4.1,
"Practical Issues"). A row reports the accuracy of each run, their minimum ("Worst") and mean
("Avg"), as in Table 2. The ensemble row is the per-example worst case over every attack and run.
All counting goes through ``protocol.py``'s one engine, with early exit inside a run.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from qgtrain.attacks import ATTACK_LOSSES, Attack, attack_class, attack_for_budget
from qgtrain.attacks.base import DEFAULT_EPS
from qgtrain.evaluation.protocol import (
    AttackCost,
    SuiteOutcome,
    check_evaluation_attack,
    evaluate_suite,
    worst_case_correct,
)

SWEEPABLE = ("eps", "steps", "b")
"""The settings a sweep of the paper protocol may vary (Figures 3-5: eps, steps and b)."""
PAPER_ATTACKS = ("pgd", "pqgd", "blob", "blob_qg")
"""The paper protocol's default attacks (Table 2)."""
AUTOATTACK = ("apgd_ce", "apgd_t", "fab_t", "square")
"""AutoAttack's standard version, in its order: the standard suite's default and its choices."""
PAPER_ROWS = ("pqgd", "blob_qg")
"""The paper's attacks the standard protocol reports beside the suite by default."""


class SettingError(ValueError):
    """A setting outside what it allows: ``field`` names it, ``reason`` says what is allowed."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


@dataclass(frozen=True)
class Rule:
    """What a setting allows: ``test`` says whether a value is allowed, ``what`` says it in words."""

    what: str
    test: Callable[[Any], bool]

    def check(self, field: str, value: Any) -> None:
        """:class:`SettingError` ``must be <what>, got <value>`` unless ``value`` passes."""
        try:
            allowed = self.test(value)
        except TypeError:  # a value of another type (a comparison or a lookup it does not support)
            allowed = False
        if not allowed:
            raise SettingError(field, f"must be {self.what}, got {value!r}")

    def or_none(self) -> Rule:
        return Rule(self.what, lambda v: v is None or self.test(v))


def is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


RADIUS = Rule("a number in (0, 1] (inputs are in [0, 1])", lambda v: is_number(v) and 0 < v <= 1)
STEP_SIZE = Rule("a number > 0", lambda v: is_number(v) and v > 0)
COUNT = Rule("an integer >= 1", lambda v: is_integer(v) and v >= 1)
INTEGER = Rule("an integer", is_integer)
LEVELS = Rule("a list of integers >= 1 (b=1 is the sign)", lambda v: isinstance(v, list) and bool(v) and all(COUNT.test(b) for b in v))  # fmt: skip
LOSS = Rule(f"one of {', '.join(sorted(ATTACK_LOSSES))}", ATTACK_LOSSES.__contains__)


def check_fields(settings: Any, rules: dict[str, Rule]) -> None:
    """Each field of ``settings`` named in ``rules`` passes its rule, else :class:`SettingError`."""
    for name, rule in rules.items():
        rule.check(name, getattr(settings, name))


def check_attack_names(field: str, names: Any) -> None:
    """``names`` is a list of registered attacks (or ``torchattacks.<Class>``) that stay in the
    threat model (:func:`~qgtrain.evaluation.protocol.check_evaluation_attack`)."""
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise SettingError(field, f"must be a list of attack names, got {names!r}")
    try:
        for name in names:
            check_evaluation_attack(attack_class(name))
    except ValueError as exc:
        raise SettingError(field, str(exc)) from None


def fraction(correct: torch.Tensor) -> float:
    """Accuracy of a boolean vector as ``count / n`` in double precision (0 for no examples)."""
    return int(correct.sum()) / correct.numel() if correct.numel() else 0.0


class Progress(Protocol):
    """The part of a ``tqdm`` bar the runner uses."""

    def update(self, n: float = 1) -> Any: ...

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> Any: ...


def is_quantized(name: str) -> bool:
    """Quantized attacks (class default ``b > 1``: PQGD, BLOB_QG) get one row per ``b`` of ``--b``."""
    return attack_class(name).default_b > 1


class TensorBatches:
    """Re-iterable fixed batches ``(x in [0, 1], y)`` over in-memory images (uint8 or float).

    ``start`` is the index of the first image in its split (a chunk ``--range START:STOP``): batch
    ``i`` is batch ``start // batch_size + i`` of the whole split, and draws that batch's random
    stream, so chunks whose ``start`` is a multiple of ``batch_size`` give what one run over the
    whole split gives for their examples.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, start: int = 0) -> None:
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.images = images
        self.labels = labels
        self.batch_size = int(batch_size)
        self.start = int(start)

    @property
    def first_batch_index(self) -> int:
        """The number of this chunk's first batch in the whole split (its random stream)."""
        return self.start // self.batch_size

    def __len__(self) -> int:
        return math.ceil(self.labels.shape[0] / self.batch_size)

    @property
    def num_examples(self) -> int:
        return int(self.labels.shape[0])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, self.num_examples, self.batch_size):
            x = self.images[start : start + self.batch_size]
            x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
            yield x, self.labels[start : start + self.batch_size].long()

    def head(self, num_batches: int) -> TensorBatches:
        """The first ``num_batches`` whole batches (the same batches, so the same RNG streams)."""
        end = min(num_batches * self.batch_size, self.num_examples)
        return TensorBatches(self.images[:end], self.labels[:end], self.batch_size, self.start)


@dataclass(frozen=True)
class AttackSpec:
    """One attack configuration (one row of Table 2)."""

    name: str
    eps: float
    alpha: float
    steps: int
    b: int
    restarts: int
    loss: str = "ce"

    @property
    def label(self) -> str:
        return f"{self.name} (b={self.b})" if is_quantized(self.name) else self.name

    def build(self) -> Attack:
        return attack_for_budget(
            self.name, self.eps, self.steps, self.alpha, self.b, restarts=self.restarts, loss=self.loss
        )

    def replace(self, **changes: Any) -> AttackSpec:
        return dataclasses.replace(self, **changes)


@dataclass
class ProtocolSettings:
    """The attack-side configuration of one protocol evaluation."""

    attacks: list[str] = field(default_factory=lambda: list(PAPER_ATTACKS))
    eps: float = DEFAULT_EPS
    alpha: float = 0.01
    steps: int = 200
    b_values: list[int] = field(default_factory=lambda: [100, 200])
    restarts: int = 50
    runs: int = 5
    loss: str = "ce"
    seed: int = 0

    def __post_init__(self) -> None:
        """Each setting is one it allows (:class:`SettingError` naming the field otherwise)."""
        check_attack_names("attacks", self.attacks)
        rules = {"eps": RADIUS, "alpha": STEP_SIZE, "steps": COUNT, "b_values": LEVELS, "restarts": COUNT, "runs": COUNT, "loss": LOSS, "seed": INTEGER}  # fmt: skip
        check_fields(self, rules)

    @property
    def seeds(self) -> list[int]:
        """Run ``r`` uses seed ``seed + r``."""
        return [self.seed + r for r in range(self.runs)]

    def specs(self) -> list[AttackSpec]:
        """One spec per attack, or per ``(attack, b)`` for quantized attacks, in the given order.

        Single-step attacks (FGSM, FGSM-RS) take their one step of their own size whatever ``steps``
        and ``alpha`` say.
        """
        specs = []
        for name in self.attacks:
            cls = attack_class(name)
            steps, alpha = self.steps, self.alpha
            if cls.single_step:
                steps, alpha = 1, cls.default_alpha(self.eps, 1)
            for b in self.b_values if is_quantized(name) else [1]:
                specs.append(AttackSpec(name, self.eps, alpha, steps, b, self.restarts, self.loss))
        return specs

    def check(self) -> None:
        """Build every attack once, so a bad one (an unknown torchattacks class, a missing package)
        is a one-line ValueError before any batch is attacked."""
        if not self.attacks:
            raise ValueError("the paper protocol needs at least one attack (none is for --protocol standard)")
        for spec in self.specs():
            spec.build()

    def with_value(self, parameter: str, value: float | int) -> ProtocolSettings:
        """These settings with ``eps``, ``steps`` or ``b`` (every quantized attack's b) set to ``value``."""
        if parameter == "b":
            return dataclasses.replace(self, b_values=[value])
        if parameter in ("eps", "steps"):
            return dataclasses.replace(self, **{parameter: value})
        raise ValueError(f"cannot sweep {parameter!r}; choose one of {', '.join(SWEEPABLE)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class RowResult:
    """One attack evaluated in several independent runs."""

    spec: AttackSpec
    seeds: list[int]
    run_correct: list[torch.Tensor]
    run_seconds: list[float]
    run_costs: list[AttackCost] = field(default_factory=list)

    @property
    def cost(self) -> AttackCost:
        total = AttackCost()
        for cost in self.run_costs:
            total += cost
        return total

    @property
    def run_accuracies(self) -> list[float]:
        return [fraction(c) for c in self.run_correct]

    @property
    def worst(self) -> float:
        """Table 2's "Worst": the lowest accuracy over runs."""
        return min(self.run_accuracies)

    @property
    def avg(self) -> float:
        """Table 2's "Avg": the mean accuracy over runs."""
        return sum(self.run_accuracies) / len(self.run_accuracies)

    @property
    def per_example_worst(self) -> torch.Tensor:
        """Robust in every run (AND over runs)."""
        return worst_case_correct(self.run_correct)

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.spec.label,
            "attack": self.spec.name,
            "config": self.spec.build().config(),
            "seeds": list(self.seeds),
            "run_accuracies": self.run_accuracies,
            "run_correct_counts": [int(c.sum()) for c in self.run_correct],
            "worst": self.worst,
            "avg": self.avg,
            "per_example_worst_over_runs": fraction(self.per_example_worst),
            "run_seconds": list(self.run_seconds),
            "seconds": float(sum(self.run_seconds)),
            "cost": self.cost.to_dict(),
        }


@dataclass
class ProtocolResult:
    """Clean accuracy, one row per attack variant, and the per-example worst case over all rows."""

    settings: ProtocolSettings
    clean: torch.Tensor
    rows: list[RowResult]
    partial: bool = False
    unfinished: list[str] = field(default_factory=list)
    """Labels of the rows an interrupt left unfinished (left out of ``rows``)."""

    @property
    def num_examples(self) -> int:
        return int(self.clean.numel())

    @property
    def clean_accuracy(self) -> float:
        return fraction(self.clean)

    @property
    def ensemble_correct(self) -> torch.Tensor:
        """Robust to every attack in every run (and correct clean): the AND of all vectors."""
        return worst_case_correct([self.clean, *(c for row in self.rows for c in row.run_correct)])

    @property
    def ensemble_accuracy(self) -> float:
        return fraction(self.ensemble_correct)

    def to_dict(self) -> dict[str, Any]:
        total = AttackCost()
        for row in self.rows:
            total += row.cost
        return {
            "protocol": "paper",
            "partial": self.partial,
            "unfinished": list(self.unfinished),
            "settings": self.settings.to_dict(),
            "n": self.num_examples,
            "clean": {"accuracy": self.clean_accuracy, "correct": int(self.clean.sum())},
            "cost": total.to_dict(),
            "rows": [row.to_dict() for row in self.rows],
            "ensemble": {
                "accuracy": self.ensemble_accuracy,
                "correct": int(self.ensemble_correct.sum()),
                "over": [row.spec.label for row in self.rows],
            },
        }


@dataclass
class SweepResult:
    """The protocol evaluated at every value of one parameter (Figures 3-5)."""

    parameter: str
    values: list[float | int]
    points: list[ProtocolResult]

    def line_key(self, spec: AttackSpec) -> str:
        """One plotted line per attack variant; for a sweep over ``b``, one per attack."""
        return spec.name if self.parameter == "b" else spec.label

    def series(self) -> dict[str, dict[str, list[float]]]:
        """``{line: {"avg": [...], "worst": [...], "best": [...]}}`` over the swept values."""
        lines: dict[str, dict[str, list[float]]] = {}
        for point in self.points:
            for row in point.rows:
                line = lines.setdefault(self.line_key(row.spec), {"avg": [], "worst": [], "best": []})
                line["avg"].append(row.avg)
                line["worst"].append(row.worst)
                line["best"].append(max(row.run_accuracies))
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {
            "parameter": self.parameter,
            "values": list(self.values),
            "series": self.series(),
            "ensemble": [p.ensemble_accuracy for p in self.points],
            "points": [
                {"value": v, "rows": [r.to_dict() for r in p.rows], "ensemble": p.ensemble_accuracy}
                for v, p in zip(self.values, self.points, strict=True)
            ],
        }


class ProtocolRunner:
    """Evaluates attack specs on fixed batches, caching every (spec, seeds) row it has computed."""

    def __init__(
        self,
        model: nn.Module,
        batches: TensorBatches,
        device: torch.device | str | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.model = model
        self.batches = batches
        self.device = device
        self.progress = progress
        self._rows: dict[tuple[AttackSpec, tuple[int, ...]], RowResult] = {}
        self._clean: torch.Tensor | None = None

    def batch_cost(self, settings_list: Sequence[ProtocolSettings]) -> int:
        """Attacked batches still to run for these settings (for the progress bar's total)."""
        todo = {(spec, tuple(s.seeds)) for s in settings_list for spec in s.specs()} - set(self._rows)
        return sum(len(seeds) for _, seeds in todo) * len(self.batches)

    def clean(self) -> torch.Tensor:
        if self._clean is None:
            self._clean = evaluate_suite(self.model, [], self.batches, self.device).clean
        return self._clean

    def row(self, spec: AttackSpec, seeds: Sequence[int]) -> RowResult:
        key = (spec, tuple(seeds))
        if key not in self._rows:
            attack = spec.build()
            correct, seconds, costs = [], [], []
            for run, seed in enumerate(seeds):
                if self.progress is not None:
                    self.progress.set_postfix_str(f"{spec.label} run {run + 1}/{len(seeds)}")
                start = time.perf_counter()
                outcome = evaluate_suite(
                    self.model,
                    [attack],
                    self.batches,
                    self.device,
                    seed=seed,
                    first_batch_index=self.batches.first_batch_index,
                    on_batch=self._advance if self.progress is not None else None,
                )
                correct.append(outcome.robust)
                costs.append(outcome.costs[0])
                seconds.append(time.perf_counter() - start)
            self._rows[key] = RowResult(spec, list(seeds), correct, seconds, costs)
        return self._rows[key]

    def finished_rows(self, settings: ProtocolSettings) -> list[RowResult]:
        """The rows of ``settings`` already computed (for a partial result after an interrupt)."""
        return [
            self._rows[k] for k in ((s, tuple(settings.seeds)) for s in settings.specs()) if k in self._rows
        ]

    def partial_result(self, settings: ProtocolSettings) -> ProtocolResult:
        """What an interrupt leaves: the finished rows (every run over every example), the others
        named as unfinished; clean accuracy only when a row finished (alone it is no evaluation)."""
        rows = self.finished_rows(settings)
        done = {row.spec for row in rows}
        unfinished = [spec.label for spec in settings.specs() if spec not in done]
        clean = self.clean() if rows else torch.zeros(0, dtype=torch.bool)
        return ProtocolResult(settings, clean, rows, partial=True, unfinished=unfinished)

    def _advance(self, batch_index: int) -> None:
        assert self.progress is not None
        self.progress.update(1)

    def evaluate(self, settings: ProtocolSettings) -> ProtocolResult:
        """Clean accuracy, then every attack variant over ``settings.runs`` runs."""
        rows = [self.row(spec, settings.seeds) for spec in settings.specs()]
        return ProtocolResult(settings, self.clean(), rows)

    def sweep(self, settings: ProtocolSettings, parameter: str, values: Sequence[float | int]) -> SweepResult:
        """The protocol at every value of ``parameter`` (rows not depending on it are reused)."""
        points = [self.evaluate(settings.with_value(parameter, v)) for v in values]
        return SweepResult(parameter, list(values), points)


# ---------------------------------------------------------------------------------------------- standard
@dataclass
class StandardSettings:
    """The ``standard`` protocol: AutoAttack's suite (APGD-CE -> APGD-T -> FAB-T -> Square, or the
    part of it named in ``suite_attacks``), each attack on the examples still robust, then the
    paper's PQGD and BLOB_QG rows (``paper_rows``; empty: the suite alone)."""

    eps: float = DEFAULT_EPS
    suite_attacks: list[str] = field(default_factory=lambda: list(AUTOATTACK))
    """The suite's attacks, run in this order: any of :data:`AUTOATTACK` (default: all four)."""
    steps: int = 100
    """APGD's and FAB-T's iterations per run (AutoAttack: 100)."""
    targets: int = 9
    """APGD-T's and FAB-T's target classes (AutoAttack: 9 each, for ten classes)."""
    queries: int = 5000
    """Square's queries (AutoAttack: 5000)."""
    b: int = 1
    """Quantization level of APGD's direction: 1 is AutoAttack's sign; > 1 quantized APGD."""
    paper_rows: list[str] = field(default_factory=lambda: list(PAPER_ROWS))
    paper_steps: int = 100
    paper_alpha: float = 0.01
    paper_b: int = 100
    num_classes: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        """Each setting is one it allows (see :meth:`ProtocolSettings.__post_init__`); the suite's
        names are checked by :meth:`suite`."""
        check_attack_names("paper_rows", self.paper_rows)
        rules = {"eps": RADIUS, "steps": COUNT, "targets": COUNT, "queries": COUNT, "b": COUNT, "paper_steps": COUNT, "paper_alpha": STEP_SIZE, "paper_b": COUNT, "seed": INTEGER}  # fmt: skip
        check_fields(self, rules)

    def suite(self) -> list[Attack]:
        """The attacks of the suite, in the order of ``suite_attacks``; a ValueError naming the
        choices for an unknown, repeated or missing name."""
        targets = min(self.targets, self.num_classes - 1)
        budgets: dict[str, dict[str, Any]] = {
            "apgd_ce": {"b": self.b},
            "apgd_t": {"b": self.b, "targets": targets},
            "fab_t": {"targets": targets},
            "square": {"queries": self.queries},
        }
        choose = f"choose from {','.join(AUTOATTACK)} (AutoAttack's order)"
        if not self.suite_attacks:
            raise ValueError(f"the suite needs at least one attack; {choose}")
        for name in self.suite_attacks:
            if name not in budgets:
                raise ValueError(f"{name!r} is not one of AutoAttack's attacks; {choose}")
            if self.suite_attacks.count(name) > 1:
                raise ValueError(f"{name!r} is named twice; {choose}")
        return [attack_for_budget(name, self.eps, self.steps, **budgets[name]) for name in self.suite_attacks]

    def check(self) -> None:
        """Build every attack of the suite and the rows once (see :meth:`ProtocolSettings.check`)."""
        self.suite()
        for spec in self.row_specs():
            spec.build()

    def row_specs(self) -> list[AttackSpec]:
        """The paper's rows (one run, one start each), for comparison with the suite."""
        return [
            AttackSpec(
                name,
                self.eps,
                self.paper_alpha,
                self.paper_steps,
                self.paper_b if is_quantized(name) else 1,
                1,
            )
            for name in self.paper_rows
        ]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class StandardResult:
    """The suite's per-example outcome (over the examples evaluated), then the paper rows."""

    settings: StandardSettings
    suite: SuiteOutcome
    suite_configs: list[dict[str, Any]]
    rows: list[RowResult]
    num_examples_planned: int
    partial: bool = False
    seconds: float = 0.0
    """Wall time of the attacks (suite and rows)."""
    estimated_seconds: float | None = None
    """What the attacks were estimated to take, from the first batch (None: no batch finished)."""
    unfinished: list[str] = field(default_factory=list)
    """Labels of the paper rows an interrupt left short of the suite's batches (left out of ``rows``)."""
    batches_planned: int = 0
    batches_finished: int = 0

    @property
    def clean(self) -> torch.Tensor:
        return self.suite.clean

    @property
    def ensemble_correct(self) -> torch.Tensor:
        """Robust to the suite and to every paper row (and correct clean)."""
        n = self.suite.clean.numel()
        return worst_case_correct([self.suite.robust, *(c[:n] for row in self.rows for c in row.run_correct)])

    def to_dict(self) -> dict[str, Any]:
        n = int(self.suite.clean.numel())
        fooled = self.suite.fooled_counts()
        suite_cost = AttackCost()
        attacks = []
        for k, (label, config, cost) in enumerate(
            zip(self.suite.labels, self.suite_configs, self.suite.costs, strict=True)
        ):
            suite_cost += cost
            attacks.append(
                {
                    "label": label,
                    "config": config,
                    "fooled": fooled[k],
                    "robust_after": fraction(self.suite.after[k]),
                    "cost": cost.to_dict(),
                }
            )
        total = AttackCost()
        total += suite_cost
        for row in self.rows:
            total += row.cost
        ensemble = self.ensemble_correct
        return {
            "protocol": "standard",
            "partial": self.partial,
            "unfinished": list(self.unfinished),
            "batches": {"finished": self.batches_finished, "planned": self.batches_planned},
            "settings": self.settings.to_dict(),
            "n": n,
            "n_planned": self.num_examples_planned,
            "clean": {"accuracy": fraction(self.clean), "correct": int(self.clean.sum())},
            "suite": {
                "label": "standard (" + ", ".join(self.suite.labels) + ")",
                "accuracy": fraction(self.suite.robust),
                "correct": int(self.suite.robust.sum()),
                "attacks": attacks,
                "cost": suite_cost.to_dict(),
            },
            "rows": [row.to_dict() for row in self.rows],
            "ensemble": {
                "accuracy": fraction(ensemble),
                "correct": int(ensemble.sum()),
                "over": ["suite", *(row.spec.label for row in self.rows)],
            },
            "cost": total.to_dict(),
            "time": {"estimated_seconds": self.estimated_seconds, "seconds": self.seconds},
        }


def run_standard(
    model: nn.Module,
    batches: TensorBatches,
    settings: StandardSettings,
    device: torch.device | str | None = None,
    progress: Progress | None = None,
    on_estimate: Callable[[float, int], None] | None = None,
) -> StandardResult:
    """Batch by batch: on batch ``i`` the suite, then each paper row, each under the stream
    ``(seed, i)`` (so every part gives what it gives alone over all batches).

    After the first batch the attacks' total time is estimated from it, in proportion to the
    examples, and passed to ``on_estimate(seconds, examples measured)``. Ctrl-C keeps the batches
    the suite finished, marked partial, with the paper rows that finished each of them (a row cut
    short on the last one is named in ``unfinished``). Batch ``i`` is batch
    ``batches.first_batch_index + i`` of the split, and draws its stream.
    """
    attacks = settings.suite()
    specs = settings.row_specs()
    row_attacks = [spec.build() for spec in specs]
    suite_parts: list[SuiteOutcome] = []
    row_parts: list[list[SuiteOutcome]] = [[] for _ in specs]
    row_seconds = [0.0 for _ in specs]
    estimate, partial, start = None, False, time.perf_counter()
    first = batches.first_batch_index
    try:
        for index, batch in enumerate(batches, start=first):
            one = [batch]
            if progress is not None:
                progress.set_postfix_str("suite")
            suite_parts.append(
                evaluate_suite(model, attacks, one, device, settings.seed, first_batch_index=index)
            )
            if progress is not None:
                progress.update(1)
            for k, (spec, attack) in enumerate(zip(specs, row_attacks, strict=True)):
                if progress is not None:
                    progress.set_postfix_str(spec.label)
                row_start = time.perf_counter()
                row_parts[k].append(
                    evaluate_suite(model, [attack], one, device, settings.seed, first_batch_index=index)
                )
                row_seconds[k] += time.perf_counter() - row_start
                if progress is not None:
                    progress.update(1)
            if index == first:
                measured = len(batch[1])
                estimate = (time.perf_counter() - start) * batches.num_examples / measured
                if on_estimate is not None:
                    on_estimate(estimate, measured)
    except KeyboardInterrupt:
        partial = True
    done = len(suite_parts)  # the batches the suite finished: the report covers them
    suite = SuiteOutcome.concatenate(suite_parts, [a.label for a in attacks])
    rows, unfinished = [], []
    for spec, parts, seconds in zip(specs, row_parts, row_seconds, strict=True):
        if len(parts) < done:
            unfinished.append(spec.label)
            continue
        outcome = SuiteOutcome.concatenate(parts, [spec.label])
        rows.append(RowResult(spec, [settings.seed], [outcome.robust], [seconds], outcome.costs))
    configs = [a.config() for a in attacks]
    seconds = time.perf_counter() - start
    return StandardResult(
        *(settings, suite, configs, rows, batches.num_examples, partial, seconds, estimate, unfinished),
        batches_planned=len(batches),
        batches_finished=done,
    )
