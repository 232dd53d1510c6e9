"""The cheap-training study's committed record (benchmarks/study_record.py): ``--report`` merges this
machine's judgements over the record seed by seed, keeps what only the record has, and writes the
merge back; the committed record's rows are runs of their budget's grid at the grid's cost."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from benchmarks import cheap_training


@pytest.fixture()
def study(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    return cheap_training


def seed(pair: float, judged: str = "2026-12-01") -> dict:
    return {"judged": judged, "clean": 99.0, "pair": pair, "monitor": [0.5], "train_adv": []}


def row(cost: int, **seeds: dict) -> dict:
    return {"cost": cost, "label": "pgd", "one_gradient": False, "seeds": seeds}


PGD2 = {"name": "pgd", "eps": 0.3, "alpha": 0.375, "steps": 2}


def judged_here(folder: Path, name: str, accuracy: float, inner: dict = PGD2, robust: np.ndarray | None = None,
                start: int = 0) -> None:  # fmt: skip
    """evaluate.py's results.json for ``name`` as the report reads it (no logs: empty series) and,
    given ``robust``, its correctness.npz for the test images from ``start``."""
    path = folder / "results" / name / "results.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({
        "created": "2026-12-03T12:00:00+00:00", "checkpoint": {"training": {"inner": inner}},
        "results": {"clean": {"accuracy": 0.98}, "suite": {"accuracy": accuracy}},
    }))  # fmt: skip
    if robust is not None:
        np.savez_compressed(path.parent / "correctness.npz", index=start + np.arange(robust.size), suite=robust)


def test_a_seed_judged_here_replaces_its_record_and_the_rest_of_the_record_stays(study) -> None:
    """Control: a plain dict update (run over run) would drop the recorded seed 1 of pgd10."""
    recorded = {"pgd10": row(33, **{"0": seed(80.0), "1": seed(81.0)}), "gone": row(9, **{"0": seed(5.0)})}
    measured = {"pgd10": row(33, **{"0": seed(84.2, "2026-12-03")}), "pgd5": row(18, **{"0": seed(70.0)})}
    rows = study.merged(recorded, measured)
    assert {run: sorted(r["seeds"]) for run, r in rows.items()} == {"pgd10": ["0", "1"], "gone": ["0"], "pgd5": ["0"]}
    assert study.per_seed(rows["pgd10"], "pair") == [84.2, 81.0]  # seed 0 from here, seed 1 recorded
    assert recorded["pgd10"]["seeds"]["0"]["pair"] == 80.0  # the record read is not edited in place
    assert study.per_seed({**recorded, **measured}["pgd10"], "pair") != study.per_seed(rows["pgd10"], "pair")


def test_per_seed_is_in_seed_order_and_skips_seeds_without_the_key(study) -> None:
    """Seeds "10" and "2": numeric order, not string order; only seed 2 has a whole-suite value."""
    mixed = row(6, **{"10": seed(1.0), "2": {**seed(2.0), "full": 1.9}})
    assert study.per_seed(mixed, "pair") == [2.0, 1.0] and study.per_seed(mixed, "full") == [1.9]


def test_the_report_merges_this_machines_judgements_into_the_record(study, tmp_path, capsys) -> None:
    """The smoke budget: pgd2 seed 0 judged here (40 %) replaces its recorded 12.3 %; its recorded
    seed 7, a run no longer in the grid and another budget stay, and the tables show them. Control:
    the same report without a record shows only this machine's run and writes no record."""
    folder = tmp_path / "cheap_training" / "smoke"
    judged_here(folder, "pgd2_s0", 0.40)
    record = tmp_path / "record.json"
    recorded = {"smoke": {"pgd2": row(9, **{"0": seed(12.3), "7": seed(30.0)}), "gone": row(4, **{"0": seed(3.0)})},
                "robust": {"pgd10": row(33, **{"0": seed(84.2)})}}  # fmt: skip
    record.write_text(json.dumps({"budgets": recorded}))
    study.report(tmp_path, ["smoke"], record)
    shown = capsys.readouterr().out
    budgets = json.loads(record.read_text())["budgets"]
    assert budgets["robust"] == recorded["robust"]
    assert budgets["smoke"]["gone"] == recorded["smoke"]["gone"]
    pgd2 = budgets["smoke"]["pgd2"]
    assert study.per_seed(pgd2, "pair") == [40.0, 30.0] and pgd2["seeds"]["0"]["judged"].startswith("2026-12-03")
    assert "gone" in shown and "s0 s7" in shown
    merged = record.read_text()
    study.report(tmp_path, ["smoke"], None)
    alone = capsys.readouterr().out
    assert "pgd2" in alone and "gone" not in alone and "s7" not in alone
    assert record.read_text() == merged


def test_the_frontiers_whole_suite_waits_for_every_seed_of_the_whole_grid(study, tmp_path) -> None:
    """Smoke budget, ``--runs pqgd2_b100`` judged here at 40 %: with pgd2 judged only in the record
    (12.3 % at the same cost) the whole grid is judged and pqgd2_b100, alone on the frontier, gets
    the whole suite. Controls: without the record pgd2 is unjudged and nothing more is planned; where
    pqgd2_b100 is judged only in the record (no checkpoint on this machine) its whole suite is not."""
    folder = tmp_path / "cheap_training" / "smoke"
    judged_here(folder, "pqgd2_b100_s0", 0.40, {"name": "pqgd", "eps": 0.3, "steps": 2, "b": 100})
    part = study.with_runs(study.BUDGETS["smoke"], ["pqgd2_b100"])
    record = tmp_path / "record.json"
    whole_suite = lambda path: [s.label for s in study.Study(part, folder, None, path).steps() if s.label.endswith("_full")]  # noqa: E731
    record.write_text(json.dumps({"budgets": {"smoke": {"pgd2": row(9, **{"0": seed(12.3)})}}}))
    assert whole_suite(record) == ["judge pqgd2_b100_s0_full"]
    assert whole_suite(None) == []
    elsewhere = tmp_path / "elsewhere"
    judged_here(elsewhere, "pgd2_s0", 0.123)
    record.write_text(json.dumps({"budgets": {"smoke": {"pqgd2_b100": row(9, **{"0": seed(40.0)})}}}))
    assert [s.label for s in study.Study(part, elsewhere, None, record).steps() if s.label.endswith("_full")] == []


def test_a_seed_the_record_holds_is_not_trained_again_unless_this_machine_started_it(study, tmp_path) -> None:
    """pgd2 seed 0 judged on another machine: planned neither for training nor for judging here,
    unless asked ``again`` (``--again``: how a frontier run judged elsewhere gets its whole suite).
    Controls: without the record it is planned; once this machine has its training log, it is too."""
    folder = tmp_path / "cheap_training" / "smoke"
    record = tmp_path / "record.json"
    record.write_text(json.dumps({"budgets": {"smoke": {"pgd2": row(9, **{"0": seed(12.3)})}}}))
    planned = lambda path, again=False: {s.label for s in study.Study(study.BUDGETS["smoke"], folder, None, path, again).steps()}  # noqa: E731
    assert planned(record) == {"train pqgd2_b100_s0", "judge pqgd2_b100_s0"}
    assert planned(None) == planned(record) | {"train pgd2_s0", "judge pgd2_s0"}
    assert planned(record, again=True) == planned(None)
    folder.mkdir(parents=True)
    (folder / "pgd2_s0.train.log").write_text("started here\n")
    assert planned(record) == planned(None)


def test_the_committed_record_holds_runs_of_their_budgets_grid_at_the_grids_cost(study) -> None:
    """Every recorded row is a run its budget still plans, with the cost the plan gives it and a
    pair judgement per seed: a hand-edited or stale row that the report would mis-plot fails here."""
    budgets = study.read_record(study.RECORD)
    assert budgets, f"{study.RECORD} is empty"
    for budget, rows in budgets.items():
        grid = {run.name: run for run in study.BUDGETS[budget].grid}
        for name, recorded in rows.items():
            assert name in grid, (budget, name)
            assert recorded["cost"] == grid[name].cost(study.BUDGETS[budget]), (budget, name)
            assert all("pair" in s and "clean" in s for s in recorded["seeds"].values()), (budget, name)
            assert {int(s) for s in recorded["seeds"]} <= set(grid[name].seeds), (budget, name)


def test_sign_test_is_the_exact_two_sided_binomial(study) -> None:
    """22 images robust for the run only against 8 for the baseline only: p = 2 P(X <= 8), X ~ B(30, 1/2)
    = 0.0161; images robust (or fooled) for both do not count. Controls: 5 / 5 gives p = 1, and the
    test is symmetric in its two arguments."""
    run, base = np.zeros(100, bool), np.zeros(100, bool)
    run[:22], base[22:30], run[30:90], base[30:90] = True, True, True, True
    wins, losses, p = study.sign_test(run, base)
    assert (wins, losses) == (22, 8) and p == pytest.approx(0.016125, abs=1e-6)
    assert study.sign_test(base, run) == (8, 22, p)
    assert study.sign_test(run[17:27], base[17:27]) == (5, 5, 1.0)
    assert study.sign_test(run[30:], base[30:]) == (0, 0, 1.0)


def test_the_record_keeps_each_seeds_robust_images_so_a_later_machine_can_pair_them(
    study, tmp_path, monkeypatch, capsys
) -> None:
    """The smoke budget with pgd2 as its baseline: pgd2 seed 0 was judged on another machine (its
    per-example result only in the record), pqgd2_b100 here. The record gains pqgd2_b100's robust
    images, packed, and the report pairs them with the recorded pgd2's: 9 / 3 of 50. Control: a
    judgement of images 10..59 (not the budget's first 50) records nothing to pair, and no table."""
    monkeypatch.setitem(study.BUDGETS, "smoke", replace(study.BUDGETS["smoke"], baseline="pgd2"))
    rng = np.random.default_rng(0)
    baseline = rng.random(50) < 0.5
    run = baseline.copy()
    run[np.flatnonzero(~baseline)[:9]] = True
    run[np.flatnonzero(baseline)[:3]] = False
    record = tmp_path / "record.json"
    recorded = {"pgd2": row(9, **{"0": {**seed(50.0), "pair_robust": study.packed(baseline)}})}
    record.write_text(json.dumps({"budgets": {"smoke": recorded}}))
    folder = tmp_path / "cheap_training" / "smoke"
    judged_here(folder, "pqgd2_b100_s0", run.mean(), {"name": "pqgd", "eps": 0.3, "steps": 2, "b": 100}, run)
    study.report(tmp_path, ["smoke"], record)
    shown = capsys.readouterr().out
    kept = json.loads(record.read_text())["budgets"]["smoke"]["pqgd2_b100"]["seeds"]["0"]["pair_robust"]
    assert np.array_equal(study.unpacked(kept, 50), run) and len(kept) == 14  # 50 bits: 7 bytes
    assert "image by image against pgd2" in shown and "9 / 3 (0.15)" in shown
    other = tmp_path / "other"
    judged_here(other / "cheap_training" / "smoke", "pqgd2_b100_s0", run.mean(), robust=run, start=10)
    record.write_text(json.dumps({"budgets": {"smoke": recorded}}))
    study.report(other, ["smoke"], record)
    assert "image by image" not in capsys.readouterr().out
    assert "pair_robust" not in json.loads(record.read_text())["budgets"]["smoke"]["pqgd2_b100"]["seeds"]["0"]
