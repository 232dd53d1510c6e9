"""`label_points`: the names of close points neither overlap each other nor cover another point, and
each stays inside the axes, beside its own point; the control (every name at the first offset) overlaps."""

from __future__ import annotations

from typing import Any

import pytest

from qgtrain.evaluation.plots import LABEL_OFFSETS, headless_pyplot, label_points

# A crowded corner like the study's: two pairs of runs at nearly the same cost and accuracy.
POINTS = [(33, 84.35, "pgd10"), (33, 83.15, "pqgd10_b100"), (36, 84.6, "trades_pgd10"),
          (36, 84.0, "trades_pqgd10_b100"), (18, 82.7, "pgd5"), (123, 80.2, "pgd40"), (4, 1.1, "free4")]  # fmt: skip


@pytest.fixture
def axes() -> Any:
    plt = headless_pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for x, y, _ in POINTS:
        ax.plot([x], [y], marker="o")
    ax.set_xscale("log")
    yield ax
    plt.close(fig)


def boxes(ax: Any, notes: list[Any]) -> list[Any]:
    renderer = ax.figure.canvas.get_renderer()
    return [note.get_window_extent(renderer) for note in notes]


def overlapping(extents: list[Any]) -> list[tuple[int, int]]:
    return [(i, j) for i, a in enumerate(extents) for j, b in enumerate(extents) if i < j and a.overlaps(b)]


def test_close_points_get_names_that_neither_overlap_nor_cover_another_point(axes: Any) -> None:
    notes = label_points(axes, POINTS)
    extents = boxes(axes, notes)
    assert sorted(note.get_text() for note in notes) == sorted(name for *_, name in POINTS)
    assert overlapping(extents) == []
    frame = axes.get_window_extent(axes.figure.canvas.get_renderer())
    for note, extent in zip(notes, extents, strict=True):
        x, y = next((px, py) for px, py, name in POINTS if name == note.get_text())
        others = [axes.transData.transform((qx, qy)) for qx, qy, name in POINTS if name != note.get_text()]
        assert not any(extent.contains(*mark) for mark in others), note.get_text()
        assert frame.x0 <= extent.x0 and extent.x1 <= frame.x1 and frame.y0 <= extent.y0 and extent.y1 <= frame.y1
        assert tuple(note.xyann) in LABEL_OFFSETS and note.xy == (x, y)  # beside its own point


def test_control_every_name_at_the_first_offset_overlaps(axes: Any) -> None:
    axes.figure.tight_layout()
    notes = [axes.annotate(name, (x, y), textcoords="offset points", xytext=LABEL_OFFSETS[0], fontsize=7)
             for x, y, name in POINTS]  # fmt: skip
    assert overlapping(boxes(axes, notes)) != []
