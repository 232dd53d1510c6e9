"""The cheap-training study's cost per training example (benchmarks/cheap_training.py): data passes x
(the inner attack's gradients + the objective's training passes), the same rule in the plan and in
the report, which reads the objective from the checkpoint's record; and the plan built from it (cheapest first, `--runs`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from benchmarks import cheap_training


@pytest.fixture()
def study():
    return cheap_training


def test_each_method_costs_its_gradients_and_training_passes_per_data_pass(study) -> None:
    """PGD-10: 3 x (10 + 1); TRADES over PGD-10 also trains on f(x): 3 x (10 + 2); free-4's one
    epoch of 4 replays: 4 passes x (0 + 1); ATTA-1: 3 x (1 + 1). Control: the old rule (+1 for every
    objective, the budget's epochs for every run) gave TRADES 33 and free-4 3."""
    robust = study.BUDGETS["robust"]
    costs = {run.name: run.cost(robust) for run in robust.grid}
    assert costs["pgd10"] == 33 and costs["trades_pgd10"] == 36
    assert costs["free4"] == 4 and costs["free8_b100"] == 8 and costs["atta1"] == 6
    assert costs["trades_pgd10"] != robust.epochs * (10 + 1) and costs["free4"] != robust.epochs


def test_the_report_reads_the_objective_and_atta_the_checkpoint_records(study) -> None:
    inner = {"name": "pgd", "eps": 0.3, "alpha": 0.12, "steps": 10}
    assert study.method_row({"inner": inner, "objective": "trades"}, 3)["cost"] == 36
    assert study.method_row({"inner": inner}, 3)["cost"] == 33  # a record from before TRADES: madry
    assert (
        study.method_row({"inner": inner, "objective": "trades", "atta": True}, 3)["label"]
        == "pgd, trades, ATTA"
    )
    assert study.method_row({"inner": inner, "atta": False}, 3)["label"] == "pgd"


def test_the_label_says_when_the_training_radius_or_the_judged_weights_differ(study) -> None:
    """A run trained beyond the judged radius (``main_eps04``) and one judged on its weight average
    read apart from their twins in the report; the control, the same record at 0.3 with raw
    weights, reads plain."""
    inner = {"name": "pqgd", "eps": 0.4, "alpha": 0.04, "steps": 10, "b": 100}
    assert study.method_row({"inner": inner}, 10, averaged=True)["label"] == "pqgd (b=100), ε 0.4, EMA"
    assert study.method_row({"inner": {**inner, "eps": 0.3}}, 10)["label"] == "pqgd (b=100)"


def test_free_runs_have_a_whole_number_of_epochs(study) -> None:
    """train.py refuses --epochs that the replays do not divide; every free run of every grid passes."""
    for budget in study.BUDGETS.values():
        for run in budget.grid:
            if run.inner == "free":
                replays = int(run.extra[run.extra.index("--replays") + 1])
                assert (run.epochs or budget.epochs) % replays == 0, (budget.name, run.name)


def test_cheapest_training_is_planned_first_and_one_gradient_runs_get_the_whole_suite(
    study, tmp_path
) -> None:
    """Training steps in ascending cost (a study stopped at a session's end has whole rows, PGD-40
    last); the whole suite goes to every run with at most one input gradient per step: N-FGSM and
    free (class trait single_step) and ATTA-1 (PGD with one step) too. Control: ATTA-2 and PGD-5 get
    only the APGD-CE -> APGD-T pair."""
    robust = study.BUDGETS["robust"]
    steps = study.Study(robust, tmp_path, None).steps()
    trained = [step.label.removeprefix("train ") for step in steps if step.marker]
    by_name = {f"{run.name}_s{seed}": run for run in robust.grid for seed in run.seeds}
    costs = [by_name[name].cost(robust) for name in trained]
    assert costs == sorted(costs) and trained[-1] == "pgd40_s0" and len(trained) == len(by_name)
    whole = {
        step.label.removeprefix("judge ").removesuffix("_full")
        for step in steps
        if step.label.endswith("_full")
    }
    assert {"nfgsm_s0", "free4_s0", "free8_b100_s0", "atta1_s0", "atta1_b100_s0"} <= whole
    assert not whole & {"atta2_s0", "pgd5_s0", "pgd10_s0", "pgd40_s0"}


def test_an_interrupted_run_is_planned_first_and_resumes(study, tmp_path) -> None:
    """PGD-40, the dearest run, holding ``interrupted.ckpt`` and no ``.done`` marker, trains first
    with ``--resume last``; the others keep their order by cost. Controls: in an empty folder PGD-40
    is last and starts afresh, and a finished run's ``last.ckpt`` (with its marker) does not move it."""
    robust = study.BUDGETS["robust"]

    def trained(folder: Path) -> list[tuple[str, bool]]:
        steps = study.Study(robust, folder, None).steps()
        return [(s.label.removeprefix("train "), "--resume" in s.command) for s in steps if s.marker]

    fresh = trained(tmp_path / "empty")
    assert fresh[-1] == ("pgd40_s0", False)
    grid = tmp_path / "grid"
    for name, checkpoint in (("pgd40_s0", "interrupted.ckpt"), ("pgd10_s0", "last.ckpt")):
        (grid / "checkpoints" / name).mkdir(parents=True)
        (grid / "checkpoints" / name / checkpoint).write_bytes(b"")
    (grid / "pgd10_s0.done").touch()
    order = trained(grid)
    assert order[0] == ("pgd40_s0", True)
    assert [name for name, _ in order[1:]] == [name for name, _ in fresh[:-1]]


def test_runs_plans_only_the_named_runs_and_refuses_an_unknown_one_naming_the_grid(
    study, tmp_path, capsys
) -> None:
    """``--runs atta1 atta1_b100`` on the cpu budget plans their training and judgements only (both
    one-gradient runs: the pair and the whole suite). Control: without ``--runs``, the whole grid."""
    cpu = study.BUDGETS["cpu"]
    labels = [
        step.label
        for step in study.Study(study.with_runs(cpu, ["atta1", "atta1_b100"]), tmp_path, None).steps()
    ]
    assert labels == [
        f"{kind} atta1{b}_s0{end}"
        for b in ("", "_b100")
        for kind, end in (("train", ""), ("judge", ""), ("judge", "_full"))
    ]
    everything = study.Study(study.with_runs(cpu, None), tmp_path, None).steps()
    assert len([step for step in everything if step.marker]) == sum(len(run.seeds) for run in cpu.grid)
    with pytest.raises(SystemExit) as refused:
        study.with_runs(cpu, ["atta1", "atta3"])
    message = capsys.readouterr().err
    assert refused.value.code == 2 and message.count("\n") == 1
    assert "no run atta3 in budget cpu" in message and "atta2_b100" in message


def test_each_grid_run_trains_at_the_judged_radius_unless_its_flags_set_another(
    study, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """configs/mnist.yaml trains at eps 0.4 since 2026-12-07; the study's commands start with
    ``--eps 0.3``, so the recorded rows stay the recipes they were: ``main`` PQGD-10 at 0.3 (alpha
    0.03), ``pgd10`` at 0.3 (alpha 0.12), ``main_eps04`` at 0.4 (alpha 0.04); validation at 0.3.
    Control: ``main``'s command without that prefix trains at the config's 0.4."""
    from qgtrain.cli.train import main as train_main

    def inner(command: list[str]) -> dict:
        with pytest.raises(SystemExit):
            train_main([*command[command.index("train.py") + 1 :], "--print_config"])
        model = yaml.safe_load(capsys.readouterr().out)["model"]
        assert model["val_attack"]["init_args"]["eps"] == 0.3
        return model["inner"]["init_args"]

    plan = study.Study(study.BUDGETS["main"], tmp_path, None, None)
    command = {run.name: plan.train(run, 0).command for run in study.BUDGETS["main"].grid}
    assert inner(command["main"]).items() >= {"eps": 0.3, "alpha": pytest.approx(0.03), "b": 100}.items()
    assert inner(command["pgd10"]).items() >= {"eps": 0.3, "alpha": 0.12}.items()
    assert inner(command["main_eps04"]).items() >= {"eps": 0.4, "alpha": pytest.approx(0.04)}.items()
    bare = [arg for arg in command["main"] if arg not in study.AT_THE_THREAT_MODEL]
    assert inner(bare)["eps"] == 0.4
