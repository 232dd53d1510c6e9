"""The paper's evaluation protocol (Liu & Tsang, Sec. 4.1; Tables 2-6, Figures 3-5) and its sweeps.

For every attack (and every ``b`` of a quantized one) the test examples are attacked in ``runs``
independent runs; run ``r`` draws its random starts from seed ``seed + r`` (per batch, see
:func:`~qgtrain.evaluation.protocol.adversarial_correct`). Inside a run, ``restarts`` random starts
are merged per example: an example counts as robust only if no restart fools the model (Sec. 4.1,
"Practical Issues"). A row reports the accuracy of each run, their minimum ("Worst") and mean
("Avg"), as in Table 2. The ensemble row is the per-example worst case over every attack and run.
All counting goes through ``protocol.py``'s one accuracy counter.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from qgtrain.attacks import Attack, build_attack
from qgtrain.evaluation.protocol import adversarial_correct, clean_correct, worst_case_correct

QUANTIZED_ATTACKS = ("pqgd", "blob_qg")
"""Attacks whose rows are repeated for every ``b`` of ``--b``; the others use ``b = 1`` (the sign)."""
SWEEPABLE = ("eps", "steps", "b")
SINGLE_STEP_ALPHA = {"fgsm": 1.0, "fgsm_rs": 1.25}
"""Single-step attacks ignore ``steps``/``alpha``: one step of ``factor * eps`` (their own defaults)."""


def fraction(correct: torch.Tensor) -> float:
    """Accuracy of a boolean vector as ``count / n`` in double precision (0 for no examples)."""
    return int(correct.sum()) / correct.numel() if correct.numel() else 0.0


class Progress(Protocol):
    """The part of a ``tqdm`` bar the runner uses."""

    def update(self, n: float = 1) -> Any: ...

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> Any: ...


class TensorBatches:
    """Re-iterable fixed batches ``(x in [0, 1], y)`` over in-memory images (uint8 or float)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> None:
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.images = images
        self.labels = labels
        self.batch_size = int(batch_size)

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
        return TensorBatches(self.images[:end], self.labels[:end], self.batch_size)


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
        return f"{self.name} (b={self.b})" if self.name in QUANTIZED_ATTACKS else self.name

    def build(self) -> Attack:
        return build_attack(
            self.name,
            eps=self.eps,
            alpha=self.alpha,
            steps=self.steps,
            b=self.b,
            restarts=self.restarts,
            loss=self.loss,
        )

    def replace(self, **changes: Any) -> AttackSpec:
        return dataclasses.replace(self, **changes)


@dataclass
class ProtocolSettings:
    """The attack-side configuration of one protocol evaluation."""

    attacks: list[str]
    eps: float = 0.3
    alpha: float = 0.01
    steps: int = 200
    b_values: list[int] = field(default_factory=lambda: [100, 200])
    restarts: int = 50
    runs: int = 5
    loss: str = "ce"
    seed: int = 0

    @property
    def seeds(self) -> list[int]:
        """Run ``r`` uses seed ``seed + r``."""
        return [self.seed + r for r in range(self.runs)]

    def specs(self) -> list[AttackSpec]:
        """One spec per attack, or per ``(attack, b)`` for quantized attacks, in the given order.

        ``fgsm``/``fgsm_rs`` take one step of ``eps`` / ``1.25 eps`` whatever ``steps`` and ``alpha`` say.
        """
        specs = []
        for name in self.attacks:
            steps, alpha = self.steps, self.alpha
            if name in SINGLE_STEP_ALPHA:
                steps, alpha = 1, SINGLE_STEP_ALPHA[name] * self.eps
            for b in self.b_values if name in QUANTIZED_ATTACKS else [1]:
                specs.append(AttackSpec(name, self.eps, alpha, steps, b, self.restarts, self.loss))
        return specs

    def with_value(self, parameter: str, value: float | int) -> ProtocolSettings:
        """These settings with ``eps``, ``steps`` or ``b`` (every quantized attack's b) set to ``value``."""
        if parameter == "b":
            return dataclasses.replace(self, b_values=[int(value)])
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
        }


@dataclass
class ProtocolResult:
    """Clean accuracy, one row per attack variant, and the per-example worst case over all rows."""

    settings: ProtocolSettings
    clean: torch.Tensor
    rows: list[RowResult]

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
        return {
            "settings": self.settings.to_dict(),
            "n": self.num_examples,
            "clean": {"accuracy": self.clean_accuracy, "correct": int(self.clean.sum())},
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
            self._clean = clean_correct(self.model, self.batches, self.device)
        return self._clean

    def row(self, spec: AttackSpec, seeds: Sequence[int]) -> RowResult:
        key = (spec, tuple(seeds))
        if key not in self._rows:
            attack = spec.build()
            correct, seconds = [], []
            for run, seed in enumerate(seeds):
                if self.progress is not None:
                    self.progress.set_postfix_str(f"{spec.label} run {run + 1}/{len(seeds)}")
                start = time.perf_counter()
                correct.append(
                    adversarial_correct(
                        self.model,
                        attack,
                        self.batches,
                        self.device,
                        seed=seed,
                        on_batch=self._advance if self.progress is not None else None,
                    )
                )
                seconds.append(time.perf_counter() - start)
            self._rows[key] = RowResult(spec, list(seeds), correct, seconds)
        return self._rows[key]

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
