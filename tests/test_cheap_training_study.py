"""benchmarks/cheap_training.py's bookkeeping: step plan, claims, cost from the attack classes, frontier."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
_spec = importlib.util.spec_from_file_location("cheap_training", REPO / "benchmarks" / "cheap_training.py")
study = importlib.util.module_from_spec(_spec)
sys.modules["cheap_training"] = study  # dataclasses look their module up there
_spec.loader.exec_module(study)


def test_plan_puts_the_reference_and_the_sweep_before_a_swept_run(tmp_path):
    store = study.Store(tmp_path, "standard", 1000)
    steps = [(s.kind, s.run, s.seed) for s in store.plan(["pgd10", "fgsm_rs"], seed=1)]
    assert steps == [
        ("train", "pgd40", 0),  # the sweep's reference is always seed 0
        ("sweep", "pgd10", 0),
        ("train", "pgd10", 1),
        ("eval", "pgd10", 1),
        ("train", "fgsm_rs", 1),  # single-step: published step size, no sweep
        ("eval", "fgsm_rs", 1),
    ]


@pytest.mark.parametrize(
    ("run", "per_epoch"), [("pgd40", 41), ("pqgd5_b100", 6), ("pgd2", 3), ("fgsm_rs", 2), ("nfgsm_b100", 2)]
)
def test_cost_is_the_attacks_gradients_plus_the_training_pass(run, per_epoch):
    assert study.GRID[run].cost_per_epoch(0.3) == per_epoch


def test_a_claim_excludes_others_and_dies_with_its_process(tmp_path):
    step = study.Store(tmp_path, "standard", 1000).train("pgd40", 0)
    with study.claim(step) as first, study.claim(step) as second:
        assert first and not second
    with study.claim(step) as again:
        assert again  # released on exit
    lock = study.lock_path(step)
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import fcntl,sys,time; f=open({str(lock)!r},'a+'); "
         "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with study.claim(step) as mine:
            assert not mine  # control: another live process holds it
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    with study.claim(step) as mine:
        assert mine  # the kernel released the killed holder's lock


def test_pareto_front_keeps_only_undominated_points():
    points = {
        "cheap": (6, 40.0),
        "mid": (18, 60.0),
        "dominated": (33, 55.0),
        "tie": (18, 60.0),
        "top": (123, 70.0),
    }
    assert study.pareto_front(points) == ["cheap", "mid", "tie", "top"]
