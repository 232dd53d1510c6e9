"""One evaluation job end to end: the protocol (``standard`` or ``paper``), the sweeps, the
gradient-masking checks and the gradient histograms, gathered into one JSON-ready record.

:func:`run_evaluation` returns that record, holding every number and the full configuration; the
text (``rendering.py``) and the files (``outputs.py``) are made *from it*, so they always agree.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from qgtrain.evaluation.environment import environment_info
from qgtrain.evaluation.masking import (
    MaskingCheck,
    check_output_probabilities,
    check_randomized,
    check_restarts,
    check_score_based,
    check_steps,
    check_sweep,
    check_zero_gradients,
    input_gradients,
)
from qgtrain.evaluation.outputs import per_example_arrays
from qgtrain.evaluation.plots import gradient_histograms
from qgtrain.evaluation.runner import (
    Progress,
    ProtocolResult,
    ProtocolRunner,
    ProtocolSettings,
    StandardResult,
    StandardSettings,
    SweepResult,
    TensorBatches,
    run_standard,
)

log = logging.getLogger(__name__)


def run_masking_checks(
    model: nn.Module,
    batches: TensorBatches,
    main: ProtocolResult | StandardResult,
    device: torch.device | str | None,
    loss: str,
    seed: int,
) -> list[MaskingCheck]:
    """The per-model checks on the first batch, steps/restarts checks for every row, and (standard
    protocol) whether the score-based Square fooled examples the gradient attacks left robust."""
    first = batches.head(1)
    x, y = next(iter(first))
    if device is not None:
        x, y = x.to(device), y.to(device)
    checks = [
        check_output_probabilities(model, x),
        check_randomized(model, x),
        check_zero_gradients(model, x, y, loss),
    ]
    k = first.num_examples
    for row in main.rows:
        if row.run_correct[0].numel() < k:
            continue
        full = row.run_correct[0][:k]
        steps = check_steps(model, row.spec, first, full, row.seeds[0], device)
        # An unused seed, so the single restart's start is independent of run 0's first restart.
        restarts = check_restarts(model, row.spec, first, full, seed + 1000, device)
        checks.extend(c for c in (steps, restarts) if c is not None)
    if isinstance(main, StandardResult):
        checks.extend(check_score_based(main.suite.labels, main.suite.fooled_counts(), main.suite.clean))
    return checks


def run_evaluation(
    model: nn.Module,
    batches: TensorBatches,
    settings: ProtocolSettings | StandardSettings,
    device: torch.device | str,
    sweeps: Sequence[tuple[str, Sequence[float | int]]] = (),
    histogram_b: Sequence[int] | None = None,
    masking: bool = True,
    progress: Progress | None = None,
    on_estimate: Callable[[float, int], None] | None = None,
) -> dict[str, Any]:
    """Run the protocol (``standard`` or ``paper``), the sweeps (paper), the masking checks and the
    histograms; return the record. Ctrl-C during the protocol returns what is finished, marked
    ``partial`` (then no sweep, check or histogram runs; :func:`~qgtrain.evaluation.rendering.nothing_finished` tells whether
    anything did).

    The caller may add ``name``, ``checkpoint``, ``data``, ``config`` and ``command`` before writing.
    ``progress.total`` (when the bar has one) is set to the number of attacked batches to run;
    ``on_estimate`` gets the standard protocol's time estimate after its first batch.
    """
    start = time.perf_counter()
    model = model.to(device)
    loss = getattr(settings, "loss", "ce")
    sweep_results: list[SweepResult] = []
    if isinstance(settings, StandardSettings):
        _set_total(progress, len(batches) * (1 + len(settings.row_specs())))
        main: ProtocolResult | StandardResult = run_standard(
            model, batches, settings, device, progress, on_estimate
        )
    else:
        runner = ProtocolRunner(model, batches, device, progress)
        plans = [settings] + [settings.with_value(p, v) for p, values in sweeps for v in values]
        _set_total(progress, runner.batch_cost(plans))
        try:
            main = runner.evaluate(settings)
            sweep_results = [runner.sweep(settings, p, values) for p, values in sweeps]
        except KeyboardInterrupt:
            main = runner.partial_result(settings)
            sweep_results = []

    record: dict[str, Any] = {
        "name": "evaluation",
        "batch_size": batches.batch_size,
        "environment": environment_info(device),
        "results": main.to_dict(),
        "sweeps": [s.to_dict() for s in sweep_results],
        "_per_example": per_example_arrays(main, batches.start),
    }
    checks: list[MaskingCheck] = []
    masking_start = time.perf_counter()
    partial = record["results"]["partial"]
    skipped = "--no-masking-checks" if not masking else "interrupted" if partial else None
    record["histogram"] = None
    try:
        if skipped is None:
            checks = run_masking_checks(model, batches, main, device, loss, settings.seed)
            for sweep in sweep_results:
                checks.extend(check_sweep(sweep.parameter, sweep.values, sweep.series(), main.clean.numel()))
        if histogram_b is not None and not partial:
            x, y = next(iter(batches.head(1)))
            grad = input_gradients(model, x.to(device), y.to(device), loss).cpu()
            record["histogram"] = gradient_histograms(grad, histogram_b)
    except KeyboardInterrupt:  # the protocol's numbers are kept; the checks are marked unfinished
        record["results"]["partial"] = True
        skipped = skipped or "interrupted"
    warnings = [c.warning for c in checks if c.warning]
    for warning in warnings:
        log.warning("gradient masking? %s", warning)
    record["masking"] = {
        "enabled": skipped is None,
        "skipped": skipped,
        "checks": [c.to_dict() for c in checks],
        "warnings": warnings,
        "masking_seconds": time.perf_counter() - masking_start,
    }
    record["wall_seconds"] = time.perf_counter() - start
    return record


def _set_total(progress: Progress | None, total: int) -> None:
    if progress is not None and hasattr(progress, "total"):
        progress.total = total
        if hasattr(progress, "refresh"):
            progress.refresh()

