"""Planning an evaluation: its naive budget, what that takes here, and what to run next.

The budget counts every example, step, restart and run with no early exit, so it bounds what an
evaluation spends; the time of one input gradient and one forward pass, timed on this machine,
turns it into an upper bound in seconds. ``evaluate.py`` prints it as a one-line plan, and the
end-of-training summary uses it to size the evaluations it suggests to the machine.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import torch
from torch import nn

from qgtrain.attacks import attack_for_budget
from qgtrain.evaluation.protocol import eval_mode
from qgtrain.evaluation.runner import ProtocolSettings, StandardSettings, TensorBatches
from qgtrain.models import DATASET_SPECS


def planned_parts(
    settings: ProtocolSettings | StandardSettings,
    num_examples: int,
    sweeps: Sequence[tuple[str, Sequence[float | int]]] = (),
) -> list[tuple[str, int, int]]:
    """The naive budget per part, ``(label, example-gradients, forward queries)``: every example,
    step, restart and run, no early exit (an upper bound of what the evaluation spends). The
    standard protocol's parts are the suite's attacks, then its paper rows; the paper protocol's,
    its attack variants (over every sweep point)."""
    if isinstance(settings, StandardSettings):
        attacks = [*settings.suite(), *(spec.build() for spec in settings.row_specs())]
        runs = 1
    else:
        plans = [settings] + [settings.with_value(p, v) for p, values in sweeps for v in values]
        specs = list(dict.fromkeys(spec for plan in plans for spec in plan.specs()))
        attacks = [spec.build() for spec in specs]
        runs = settings.runs
    return [
        (a.label, a.gradients_per_example * num_examples * runs, a.forwards_per_example * num_examples * runs)
        for a in attacks
    ]


def planned_cost(
    settings: ProtocolSettings | StandardSettings,
    num_examples: int,
    sweeps: Sequence[tuple[str, Sequence[float | int]]] = (),
) -> tuple[int, int]:
    """The naive budget ``(example-gradients, forward queries)`` summed over :func:`planned_parts`."""
    parts = planned_parts(settings, num_examples, sweeps)
    return sum(g for _, g, _ in parts), sum(f for _, _, f in parts)


def probe_seconds(
    model: nn.Module, batches: TensorBatches, device: torch.device | str | None, repeats: int = 2
) -> tuple[float, float]:
    """Seconds per example of one input gradient and of one forward pass, timed on the first batch."""
    x, y = next(iter(batches.head(1)))
    if device is not None:
        x, y = x.to(device), y.to(device)
    attack = attack_for_budget("pgd", 0.1, 1)
    with eval_mode(model), torch.inference_mode(False):
        attack.input_gradient(model, x, y)  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            attack.input_gradient(model, x, y)
        per_gradient = (time.perf_counter() - start) / (repeats * x.shape[0])
        start = time.perf_counter()
        with torch.no_grad():
            for _ in range(repeats):
                model(x)
        per_forward = (time.perf_counter() - start) / (repeats * x.shape[0])
    return per_gradient, per_forward


def format_duration(seconds: float) -> str:
    """``42 s``, ``12 min``, ``3.5 h``, ``2.1 days``."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


QUICK_EXAMPLES = 1000
QUICK_SUITE = ("apgd_ce", "apgd_t")
"""The evaluation suggested where the full one does not fit the machine: the first 1,000 test images
under AutoAttack's two APGD attacks alone, APGD-CE -> APGD-T (Croce & Hein, 2020)."""


def suggested_evaluations(
    ckpt: str | os.PathLike,
    model: nn.Module,
    dataset: str,
    device: torch.device | str | None = None,
    split_size: int = 10_000,
    fits_seconds: float = 3600.0,
) -> list[tuple[str, float]]:
    """The ``evaluate.py`` commands to run next on ``ckpt``, each with the time it takes at most
    here (its naive budget, :func:`planned_cost`, at the speed of one gradient and forward pass timed
    on random inputs of ``dataset``'s shape): the full standard evaluation of the test split
    (``split_size``: 10,000 for MNIST, Fashion-MNIST and CIFAR-10), and,
    first, when that takes longer than ``fits_seconds`` here (a CPU), the quick one
    (:data:`QUICK_EXAMPLES`, :data:`QUICK_SUITE`, no paper rows)."""
    spec = DATASET_SPECS[dataset]
    x = torch.rand(200, spec.channels, spec.size, spec.size)
    probe = TensorBatches(x, torch.zeros(200, dtype=torch.long), 200)
    per_gradient, per_forward = probe_seconds(model, probe, device)

    def seconds(settings: StandardSettings, n: int) -> float:
        gradients, forwards = planned_cost(settings, n)
        return gradients * per_gradient + forwards * per_forward

    base = f"python evaluate.py --ckpt {ckpt}"
    full = (base, seconds(StandardSettings(num_classes=spec.num_classes), split_size))
    if full[1] <= fits_seconds:
        return [full]
    quick = StandardSettings(suite_attacks=list(QUICK_SUITE), paper_rows=[], num_classes=spec.num_classes)
    command = f"{base} --n {QUICK_EXAMPLES} --suite {','.join(QUICK_SUITE)} --attacks none"
    return [(command, seconds(quick, QUICK_EXAMPLES)), full]


def describe_suggestions(suggestions: Sequence[tuple[str, float]], device: torch.device | str | None) -> str:
    """Lines for the end-of-run summary: each command with its time at most here; where there are
    two, the first fits this machine and the second (the full evaluation) is a GPU job."""
    where = torch.device(device or "cpu").type
    if len(suggestions) == 1:
        command, seconds = suggestions[0]
        return f"  next: {command}   # at most {format_duration(seconds)} here ({where})"
    (quick, quick_seconds), (full, full_seconds) = suggestions
    return (
        f"  next: {quick}   # at most {format_duration(quick_seconds)} here ({where})\n"
        f"  full evaluation (a GPU job): {full}   # at most {format_duration(full_seconds)} here"
    )


def describe_plan(
    settings: ProtocolSettings | StandardSettings,
    model: nn.Module,
    batches: TensorBatches,
    device: torch.device | str | None,
    sweeps: Sequence[tuple[str, Sequence[float | int]]] = (),
) -> str:
    """One line: the naive budget (:func:`planned_parts`), each part's share of it (its gradients
    and queries at the speed :func:`probe_seconds` measures here), and the time it takes at most."""
    parts = planned_parts(settings, batches.num_examples, sweeps)
    per_gradient, per_forward = probe_seconds(model, batches, device)
    cost = [(label, g * per_gradient + f * per_forward) for label, g, f in parts]
    total = sum(seconds for _, seconds in cost) or 1.0

    def share(part: list[tuple[str, float]]) -> str:
        return ", ".join(f"{label} {100 * seconds / total:.0f}%" for label, seconds in part)

    shares = share(cost)
    if isinstance(settings, StandardSettings):
        k = len(settings.suite_attacks)
        suite = sum(seconds for _, seconds in cost[:k])
        rows = share(cost[k:]) if cost[k:] else "no paper rows"
        shares = f"suite {100 * suite / total:.0f}% ({share(cost[:k])}), {rows}"
    gradients, forwards = sum(g for _, g, _ in parts), sum(f for _, _, f in parts)
    protocol = "standard" if isinstance(settings, StandardSettings) else "paper"
    return (
        f"plan: {protocol} protocol, at most {gradients:.3g} example-gradients and {forwards:.3g} forward "
        f"queries, shared {shares}; at most {format_duration(total)} here (no early exit, at "
        f"{1000 * per_gradient:.2f} ms per example-gradient); Ctrl-C writes what is done"
    )
