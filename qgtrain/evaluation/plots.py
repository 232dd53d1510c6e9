"""Figures in the style of the paper: accuracy against a swept value (Figs. 3-5), gradient histograms (Fig. 2)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from qgtrain.attacks.quantize import quantize_gradient

SWEEP_AXIS = {"eps": "perturbation bound ε", "steps": "number of steps", "b": "quantization level b"}


def headless_pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (no display needed), imported only when a plot is drawn."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_sweep(sweep: dict[str, Any], path: str | os.PathLike, title: str = "") -> Path:
    """Robust accuracy (Avg over runs, bars from Worst to best run) per attack variant vs the swept value."""
    plt = headless_pyplot()
    parameter, values = sweep["parameter"], sweep["values"]
    fig, ax = plt.subplots(figsize=(6.0, 4.2))
    markers = "osD^v<>ph*"
    for i, (line, numbers) in enumerate(sweep["series"].items()):
        avg = [100 * a for a in numbers["avg"]]
        lower = [100 * (a - w) for a, w in zip(numbers["avg"], numbers["worst"], strict=True)]
        upper = [100 * (b - a) for a, b in zip(numbers["avg"], numbers["best"], strict=True)]
        dashed = line in ("pgd", "blob")  # sign-gradient baselines
        ax.errorbar(
            values,
            avg,
            yerr=[lower, upper],
            marker=markers[i % len(markers)],
            linestyle="--" if dashed else "-",
            capsize=3,
            label=line,
        )
    ax.plot(values, [100 * e for e in sweep["ensemble"]], color="black", linestyle=":", label="worst case")
    ax.set_xlabel(SWEEP_AXIS.get(parameter, parameter))
    ax.set_ylabel("robust accuracy (%)")
    if parameter == "b" and len(values) > 1 and min(values) > 0 and max(values) / min(values) >= 50:
        ax.set_xscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or f"accuracy vs {parameter}")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


LABEL_OFFSETS = tuple((side, dy) for dy in (4, -9, 13, -18, 22, -27) for side in (5, -5))
"""Where `label_points` tries a name, in points from its point: right then left of it (a negative x
ends the text there), just above, just below, then further out."""


def label_points(ax: Any, points: Sequence[tuple[float, float, str]], fontsize: float = 7) -> list[Any]:
    """Name each point (x, y, name), the highest first, at the first of ``LABEL_OFFSETS`` with the
    fewest clashes: names placed before it overlapped, other points covered, leaving the axes. Call it
    once the axes' limits and scales are final: the check is in display coordinates."""
    fig = ax.figure
    fig.tight_layout()  # the layout the figure is saved with (``save_figure`` applies it again)
    ax.autoscale_view()
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    points = sorted(points, key=lambda point: -point[1])
    marks = [ax.transData.transform((x, y)) for x, y, _ in points]
    placed: list[Any] = []
    for i, (x, y, name) in enumerate(points):
        others = [mark for j, mark in enumerate(marks) if j != i]
        best, fewest = None, 0
        for dx, dy in LABEL_OFFSETS:
            note = ax.annotate(name, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=fontsize,
                               ha="right" if dx < 0 else "left")  # fmt: skip
            text = note.get_window_extent(renderer)
            box = text.padded(3)
            inside = frame.contains(text.x0, text.y0) and frame.contains(text.x1, text.y1)
            clashes = sum(box.overlaps(other.get_window_extent(renderer)) for other in placed)
            clashes += sum(box.contains(*mark) for mark in others) + (0 if inside else 1)
            if best is None or clashes < fewest:  # the first of the fewest
                if best is not None:
                    best.remove()
                best, fewest = note, clashes
            else:
                note.remove()
            if fewest == 0:
                break
        placed.append(best)
    return placed


def save_figure(fig: Any, plt: Any, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Lay ``fig`` out, write it to ``path`` and close it."""
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_suite(results: dict[str, Any], path: str | os.PathLike, title: str = "") -> Path:
    """The standard protocol (``results.json``'s ``results``): robust accuracy left after each attack
    of the suite in order (clean first; the paper rows as horizontal lines), and what each attack
    spent against the naive count (example-gradients; Square, gradient-free: forward queries)."""
    plt = headless_pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10.0, 4.0))
    attacks = results["suite"]["attacks"]
    labels = ["clean", *(a["label"] for a in attacks)]
    accuracy = [100 * results["clean"]["accuracy"], *(100 * a["robust_after"] for a in attacks)]
    left.plot(range(len(labels)), accuracy, marker="o", color="black", label="suite, per example")
    for position, value in enumerate(accuracy):
        left.annotate(f"{value:.1f}", (position, value), textcoords="offset points", xytext=(0, 6))
    for i, row in enumerate(results["rows"]):
        left.axhline(
            100 * row["worst"], color=f"C{i + 1}", linestyle="--", linewidth=1, label=f"{row['label']} alone"
        )
    left.set_xticks(range(len(labels)), labels, rotation=20)
    left.set_ylabel("accuracy left after the attack (%)")
    left.set_title("robust accuracy after each attack")
    left.grid(True, alpha=0.3)
    left.legend(fontsize=8)
    parts = [*attacks, *({"label": r["label"], "cost": r["cost"]} for r in results["rows"])]
    spent, naive, names = [], [], []
    for part in parts:
        cost = part["cost"]
        queries = not cost["naive_gradients"]  # a score-based attack: count its forward queries
        spent.append(cost["forwards"] if queries else cost["gradients"] or 0)
        naive.append(cost["naive_forwards"] if queries else cost["naive_gradients"])
        names.append(f"{part['label']} (queries)" if queries else part["label"])
    positions = range(len(names))
    right.bar(
        [i - 0.2 for i in positions], naive, width=0.4, color="lightgray", label="naive (no early exit)"
    )
    right.bar([i + 0.2 for i in positions], spent, width=0.4, color="tab:blue", label="spent")
    right.set_xticks(list(positions), names, rotation=20)
    right.set_yscale("log")
    right.set_ylabel("example-gradients (Square: queries)")
    right.set_title("cost against the naive count")
    right.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, plt, path)


def plot_rows(results: dict[str, Any], path: str | os.PathLike, title: str = "") -> Path:
    """The paper protocol (Table 2 as bars): per attack variant the Avg over runs with a bar from
    its Worst to its best run, beside the clean accuracy and the per-example worst case."""
    plt = headless_pyplot()
    rows = results["rows"]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(rows) + 2), 4.0))
    avg = [100 * r["avg"] for r in rows]
    low = [100 * (r["avg"] - r["worst"]) for r in rows]
    high = [100 * (max(r["run_accuracies"]) - r["avg"]) for r in rows]
    ax.bar(
        range(len(rows)),
        avg,
        yerr=[low, high],
        capsize=4,
        color="tab:blue",
        label="Avg (bar: Worst to best run)",
    )
    ax.axhline(100 * results["clean"]["accuracy"], color="gray", linestyle="--", label="clean")
    ax.axhline(100 * results["ensemble"]["accuracy"], color="black", linestyle=":", label="worst case")
    ax.set_xticks(range(len(rows)), [r["label"] for r in rows], rotation=20)
    ax.set_ylabel("robust accuracy (%)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "robust accuracy per attack")
    return save_figure(fig, plt, path)


def gradient_histograms(grad: torch.Tensor, b_values: Sequence[int]) -> dict[str, Any]:
    """Per-component values of the normalised gradient ``g / M``, ``sign(g)`` and ``ζ(b g / M)`` (Fig. 2).

    Returns the flattened tensors (for plotting) and summary statistics (for results.json).
    """
    flat = grad.reshape(grad.shape[0], -1).float()
    row_max = flat.abs().amax(dim=1, keepdim=True)
    normalised = flat / torch.where(row_max > 0, row_max, torch.ones_like(row_max))
    panels: dict[str, torch.Tensor] = {"raw g/M": normalised.flatten(), "sign(g)": torch.sign(flat).flatten()}
    stats: dict[str, Any] = {
        "examples": int(flat.shape[0]),
        "components": int(flat.numel()),
        "zero_fraction": float((flat == 0).float().mean()),
        "abs_normalised_quantiles": {
            str(q): float(torch.quantile(normalised.abs().flatten()[:1_000_000], q)) for q in (0.5, 0.9, 0.99)
        },
        "quantized": {},
    }
    for b in b_values:
        q = quantize_gradient(flat, int(b)).flatten()
        panels[f"ζ(b·g/M), b={b}"] = q
        stats["quantized"][str(b)] = {
            "sign_like_fraction": float((q.abs() == 1).float().mean()),  # components quantized to ±1
            "zero_fraction": float((q == 0).float().mean()),
            "distinct_values": int(q.unique().numel()),
        }
    return {"panels": panels, "stats": stats}


def plot_histograms(histograms: dict[str, Any], path: str | os.PathLike, title: str = "") -> Path:
    """One panel per gradient representation (log-scaled counts except the sign's), as the paper's Figure 2."""
    plt = headless_pyplot()
    panels = histograms["panels"]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.0), squeeze=False)
    for ax, (name, values) in zip(axes[0], panels.items(), strict=True):
        data = values.cpu().numpy()
        if name.startswith("sign"):
            ax.hist(data, bins=[-1.5, -0.5, 0.5, 1.5], rwidth=0.6)
        elif name.startswith("ζ"):
            lo, hi = int(data.min()), int(data.max())
            step = max(1, (hi - lo + 1) // 201 + 1)  # one bin per integer level up to b = 100
            ax.hist(data, bins=[v - 0.5 for v in range(lo, hi + step + 1, step)])
            ax.set_yscale("log")
        else:
            ax.hist(data, bins=101)
            ax.set_yscale("log")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("component value")
    axes[0][0].set_ylabel("count")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
