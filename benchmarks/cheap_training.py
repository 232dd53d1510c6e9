"""Which inner maximiser buys the most AutoAttack-strength robustness per gradient?

Each training run is a ``train.py`` command (``configs/mnist.yaml`` at ``--eps 0.3``, the run's
inner-maximiser flags, the budget's flags, ``--seed S --run-name <run>_s<S>``, ``--resume last`` when it has a resumable
checkpoint); each judgement an ``evaluate.py`` command: APGD-CE -> APGD-T (``--suite apgd_ce,apgd_t
--attacks none``) for every run, the whole suite for one-gradient runs (where gradient masking is the
risk) and, once every run is judged, for the runs on the Pareto frontier. Cost per example = data
passes x (``inner.gradients_per_example`` + the objective's ``TRAINING_PASSES``: 2 for TRADES), the
attack and objective read from the checkpoint's record. Free-m runs ``--epochs`` = a multiple of m.
Budgets: ``main`` (the README's main job: configs/mnist.yaml, the full split, 10 epochs; ``main`` is
the main job until 2026-12-07, at eps 0.3, ``main_eps04`` the main job since),
``robust`` (the full 55,000-image split, 3 epochs), ``cpu`` (docs/RESULTS.md section 3: the
first 20,000 images, 3 epochs, its monitor and the step sizes its sweep chose), ``smoke`` (the test's).

``OUT/cheap_training/<budget>/``: train.py's ``checkpoints/<run>_s<S>/``, ``logs/<run>_s<S>/``;
``<run>_s<S>.train.log``; ``<run>_s<S>.done``, touched by the step's shell after exit 0 (also when the
study was killed and its child ran on); evaluate.py's ``results/<name>/`` and ``.eval.log``. The steps
run through ``benchmarks/steps.py``: a step is done when its file exists; one that a live process runs
is left to it. ``--report`` merges this machine's judgements into ``benchmarks/study_record.py``'s
committed record (every machine's rows; a seed judged here replaces its recorded one), reports that.

    python -m benchmarks.cheap_training --dry-run                 # the plan and the commands
    python -m benchmarks.cheap_training                           # train and judge (2 processes)
    python -m benchmarks.cheap_training --judge-only              # judge what has finished training
    python -m benchmarks.cheap_training --report                  # tables, JSON, Pareto plot, record
"""

from __future__ import annotations

import math
import shlex
import sys
from argparse import ArgumentParser, RawDescriptionHelpFormatter
from dataclasses import dataclass, field, replace
from pathlib import Path
from statistics import mean
from typing import Any

import numpy as np

from benchmarks.common import DEFAULT_OUT, EPS, fail, write_json
from benchmarks.steps import Step, judgement, log, run_steps, scalars
from benchmarks.study_record import RECORD, merged, packed, per_seed, read_record, unpacked, write_record
from qgtrain.attacks import Attack, attack_for_budget, build_attack
from qgtrain.evaluation.planning import format_duration
from qgtrain.evaluation.plots import headless_pyplot, label_points, save_figure
from qgtrain.evaluation.rendering import markdown_table, text_table
from qgtrain.evaluation.runner import StandardSettings
from qgtrain.training.module import TRAINING_PASSES, awp_data_passes

FALLBACK_MS_PER_GRADIENT = 0.93  # training ms per example-gradient before a run here measures it (RESULTS §3)
PAIR = ("apgd_ce", "apgd_t")  # the judge of every run
JUDGES = (("pair", ""), ("full", "_full"))  # results/<run>_s<S><suffix>/: APGD-CE -> APGD-T, whole suite


@dataclass(frozen=True)
class Run:
    """One method of the grid: ``train.py --inner NAME [--steps K] [--alpha A] [--b B] [EXTRA...]``."""

    name: str
    inner: str
    steps: int | None = None
    alpha: float | None = None
    b: int | None = None
    seeds: tuple[int, ...] = (0,)
    extra: tuple[str, ...] = ()  # further train.py arguments (the cheap methods' flags)
    objective: str = "madry"
    epochs: int | None = None  # data passes, when not the budget's (free-m: a multiple of m)

    def flags(self) -> list[str]:
        given = (("--steps", self.steps), ("--alpha", self.alpha), ("--b", self.b))
        objective = ["--model.objective", self.objective] if self.objective != "madry" else []
        return ["--inner", self.inner, *(str(v) for p in given if p[1] is not None for v in p), *objective, *self.extra]  # fmt: skip

    def cost(self, budget: Budget) -> int:
        """Gradient computations per training example (for the plan; the report reads the record's):
        ``--awp`` (no grid warms it up) adds the objective's passes on every data pass."""
        passes = self.epochs or budget.epochs
        gamma = float(self.extra[self.extra.index("--awp") + 1]) if "--awp" in self.extra else 0.0
        return cost(self.attack(), passes, self.objective, awp_data_passes(passes, gamma, 0))

    def attack(self) -> Attack:
        """The attack these flags train with (for the plan; the report rebuilds the recorded one)."""
        return attack_for_budget(self.inner, EPS, self.steps or 1, alpha=self.alpha, b=self.b)


@dataclass(frozen=True)
class Budget:
    """What train.py and evaluate.py are given beyond the runs' own flags."""

    name: str
    grid: tuple[Run, ...]
    epochs: int = 3
    train_flags: tuple[str, ...] = ()  # after the run's flags, before --epochs
    train_images: int = 55_000  # for the plan's estimate only
    n: int = 1000  # test images judged
    suite: dict[str, int] = field(default_factory=dict)  # StandardSettings overrides (evaluate.py flags)
    baseline: str | None = None  # the run the report pairs every other run against, image by image


# fmt: off
TRADES = {"objective": "trades", "extra": ("--model.beta", "6.0")}
ATTA = {"extra": ("--model.atta", "true")}  # alpha: eps / 2 (k = 1), eps / 3 (k = 2), Zheng et al.'s CIFAR ratios
FREE = lambda m: {"extra": ("--replays", str(m)), "epochs": m}  # noqa: E731  # one epoch of m replays
CHEAP = (  # free AT, ATTA and TRADES, each with the sign and with b = 100, one seed
    Run("free4", "free", b=1, **FREE(4)), Run("free4_b100", "free", b=100, **FREE(4)),
    Run("free8", "free", b=1, **FREE(8)), Run("free8_b100", "free", b=100, **FREE(8)),
    Run("atta1", "pgd", 1, 0.15, **ATTA), Run("atta1_b100", "pqgd", 1, 0.15, **ATTA),
    Run("atta2", "pgd", 2, 0.1, **ATTA), Run("atta2_b100", "pqgd", 2, 0.1, **ATTA),
    Run("trades_pgd10", "pgd", 10, 0.12, **TRADES), Run("trades_pqgd10_b100", "pqgd", 10, 0.075, **TRADES),
)
ROBUST = (  # PGD vs PQGD at k = 40, 10, 5, two seeds per PGD-vs-PQGD pair; small_alpha: eps/k (PQGD's rule since 2026-12-04)
    Run("pgd40", "pgd", 40, 0.01), Run("pgd10", "pgd", 10, 0.12, seeds=(0, 1)),
    Run("pqgd10_b100", "pqgd", 10, 0.075, seeds=(0, 1)), Run("pqgd10_b100_small_alpha", "pqgd", 10, 0.03),
    Run("pgd5", "pgd", 5, 0.15, seeds=(0, 1)), Run("pqgd5_b100", "pqgd", 5, 0.15, seeds=(0, 1)),
    Run("pqgd5_b100_small_alpha", "pqgd", 5, 0.06), Run("nfgsm", "nfgsm"), *CHEAP,
)
CPU = (  # docs/RESULTS.md section 3: the step sizes its sweep chose, its seeds
    Run("pgd40", "pgd", 40, 0.01, seeds=(0, 1)), Run("pgd10", "pgd", 10, 0.12), Run("pqgd10_b100", "pqgd", 10, 0.075),
    Run("pgd5", "pgd", 5, 0.15, seeds=(0, 1)), Run("pqgd5_b100", "pqgd", 5, 0.06),
    Run("pgd2", "pgd", 2, 0.375, seeds=(0, 1)), Run("pqgd2_b100", "pqgd", 2, 0.15, seeds=(0, 1)),
    Run("fgsm_rs", "fgsm_rs"), Run("fgsm_rs_b100", "fgsm_rs", b=100), Run("nfgsm", "nfgsm"),
    Run("nfgsm_b100", "nfgsm", b=100), Run("nfgsm_b100_small_alpha", "nfgsm", alpha=0.003, b=100), *CHEAP,
)
AWP, AWP_TRADES = ("--awp", "0.01"), ("--awp", "0.005")  # gamma: csdongxian/AWP's PGD-AT / TRADES
EMA_FROM_START, EMA = ("--ema",), ("--ema", "--ema-start-step", "550")  # the average from step 0, or after epoch 0
EMA_FAST = (*EMA, "--ema-decay", "0.995")  # 0.999 lags the raw weights at 10 epochs (docs/RESULTS.md §3)
MAIN = (  # the README's main job (configs/mnist.yaml, 10 epochs, the full split; main_eps04 since 2026-12-07) and the recipes around it
    Run("main", "pqgd", 10, seeds=(0, 1)), Run("pgd10", "pgd", 10, 0.12, seeds=(0, 1)),
    Run("main_ema", "pqgd", 10, extra=EMA_FROM_START), Run("main_ema_e1", "pqgd", 10, extra=EMA),
    Run("main_awp", "pqgd", 10, extra=AWP, seeds=(0, 1)),  # seed 1: the best three of seed 0 (docs/RESULTS.md §3)
    Run("main_awp_ema", "pqgd", 10, extra=AWP + EMA), Run("pgd10_ema", "pgd", 10, 0.12, extra=EMA),
    Run("pgd10_awp", "pgd", 10, 0.12, extra=AWP), Run("pgd10_awp_ema995", "pgd", 10, 0.12, extra=AWP + EMA_FAST),
    Run("trades_pgd10_awp_ema995", "pgd", 10, 0.12, objective="trades", extra=("--model.beta", "6.0", *AWP_TRADES, *EMA_FAST)),
    Run("mart_pgd10", "pgd", 10, 0.12, objective="mart"), Run("rgd10", "rgd", 10),
    Run("main_eps04", "pqgd", 10, extra=("--model.inner.init_args.eps", "0.4"), seeds=(0, 1)),  # the inner maximiser only (α = ε/k)
    # main_eps05 (eps 0.5) was stopped at epoch 2, collapsed to chance: at eps 0.5 every image reaches the
    # all-0.5 image, so no robust classifier exists (docs/RESULTS.md section 3)
)
# Every run trains at the judged radius unless its own flags set another: configs/mnist.yaml trains at
# eps 0.4 since 2026-12-07 (main_eps04's recipe), and the grids' rows stay the recipes they were.
AT_THE_THREAT_MODEL = ("--eps", str(EPS))
SMOKE = (  # a tiny network on 400 images; step.ckpt every 2 steps
    "--model.net", "qgtrain.models.TinyCNN", "--data.init_args.train_subset", "400",
    "--data.init_args.val_size", "200", "--batch-size", "20", "--eval-size", "50", "--eval-steps", "2",
    "--trainer.limit_val_batches", "1", "--visualization.every_n_epochs", "0", "--ckpt-every-steps", "2",
)
BUDGETS = {
    "main": Budget("main", MAIN, epochs=10, baseline="main"),
    "robust": Budget("robust", ROBUST),
    "cpu": Budget("cpu", CPU, train_flags=("--data.init_args.train_subset", "20000", "--eval-size", "500",
                                           "--eval-steps", "10"), train_images=20_000),
    "smoke": Budget("smoke", (Run("pgd2", "pgd", 2, 0.375), Run("pqgd2_b100", "pqgd", 2)), epochs=2,
                    train_flags=SMOKE, train_images=400, n=50, suite={"steps": 5, "targets": 2, "queries": 50}),
}
# fmt: on


# ------------------------------------------------------------------------------------ steps
class Study:
    """The steps of one budget's folder, planned again after every finished step."""

    def __init__(self, budget: Budget, folder: Path, data_dir: str | None, record: Path | None = None,
                 again: bool = False) -> None:  # fmt: skip
        self.budget, self.folder, self.grid, self.record, self.again = budget, folder, budget.grid, record, again
        self.data = ["--data-dir", data_dir] if data_dir else []

    def train(self, run: Run, seed: int) -> Step:
        name, checkpoints = f"{run.name}_s{seed}", self.folder / "checkpoints"
        command = [
            sys.executable, "train.py", *AT_THE_THREAT_MODEL, *run.flags(), *self.budget.train_flags, *self.data,
            "--epochs", str(run.epochs or self.budget.epochs), "--seed", str(seed), "--run-name", name,
            "--checkpoint_root", str(checkpoints), "--log_root", str(self.folder / "logs"),
        ]  # fmt: skip
        done = self.folder / f"{name}.done"
        if self.resumable(run, seed):
            command += ["--resume", "last"]
        gradients = run.cost(self.budget) * self.budget.train_images
        return Step(f"train {name}", command, self.folder / f"{name}.train.log", done, (), True, gradients)

    def resumable(self, run: Run, seed: int) -> bool:
        """Whether the seed's run folder holds a checkpoint that ``--resume last`` continues from."""
        folder = self.folder / "checkpoints" / f"{run.name}_s{seed}"
        return any((folder / f).is_file() for f in ("step.ckpt", "last.ckpt", "interrupted.ckpt"))

    def interrupted(self, run: Run, seed: int) -> bool:
        """A run started and stopped before its end: resumable and not done."""
        return self.resumable(run, seed) and not self.train(run, seed).done()

    def judge(self, run: Run, seed: int, whole_suite: bool) -> Step:
        name = f"{run.name}_s{seed}"
        result, results = f"{name}_full" if whole_suite else name, self.folder / "results"
        suite_flags = [str(v) for key, value in self.budget.suite.items() for v in (f"--{key}", value)]
        best = self.folder / "checkpoints" / name / "best.ckpt"
        command = [
            sys.executable, "evaluate.py", "--ckpt", str(best), *([] if whole_suite else ["--suite", ",".join(PAIR)]),
            "--attacks", "none", "--n", str(self.budget.n), *suite_flags, *self.data,
            "--threads", "1", "--out-dir", str(results), "--name", result, "--overwrite",
        ]  # fmt: skip
        needs = (self.folder / f"{name}.done", best)
        log, target = results / f"{result}.eval.log", results / result / "results.json"
        suite = StandardSettings(eps=EPS, paper_rows=[], **self.budget.suite).suite()
        attacks = [a for a in suite if whole_suite or a.name in PAIR]
        gradients = self.budget.n * sum(a.gradients_per_example for a in attacks)
        forwards = self.budget.n * sum(a.forwards_per_example for a in attacks)
        return Step(f"judge {result}", command, log, target, needs, False, gradients, forwards)

    def steps(self, train: bool = True, judge: bool = True) -> list[Step]:
        """Training, the APGD-CE -> APGD-T judgement of every run, the whole suite for one-gradient
        runs, and for this grid's runs on the frontier once every seed of the budget's whole grid is
        judged (here or in the record; ``--runs`` plans a part, not its own frontier). A seed the record
        holds and this machine never started is planned only ``again`` (for a frontier run's whole suite).
        Interrupted runs first, then the cheapest training, so a study stopped at a session's end has
        finished whole rows."""
        whole = BUDGETS[self.budget.name]
        recorded = read_record(self.record).get(whole.name, {})
        rows, planned = merged(recorded, method_rows(whole, self.folder)), []
        seeds = [(run, seed) for run in self.grid for seed in run.seeds]
        for run, seed in sorted(seeds, key=lambda rs: (not self.interrupted(*rs), rs[0].cost(self.budget))):
            whole_suite = one_gradient(run.attack())
            held = str(seed) in recorded.get(run.name, {}).get("seeds", {})
            if held and not self.again and not self.train(run, seed).log.exists():
                continue  # judged on another machine
            planned += [self.train(run, seed)] if train else []
            planned += [self.judge(run, seed, False)] + ([self.judge(run, seed, True)] if whole_suite else [])
        if judge and all(str(s) in rows.get(r.name, {}).get("seeds", {}) for r in whole.grid for s in r.seeds):
            front = frontier(rows)
            here = [(r, s) for r in self.grid if r.name in front for s in r.seeds if self.judge(r, s, False).done()]
            planned += [self.judge(r, s, True) for r, s in here]  # a seed judged elsewhere: no checkpoint here
        unique = {step.label: step for step in planned}.values()
        return [step for step in unique if judge or step.marker]

    def plan_line(self, steps: list[Step], jobs: int) -> str:
        ms = measured_ms_per_gradient(self.budget, self.folder)
        todo = [step for step in steps if not step.done()]
        train = sum(step.gradients for step in todo if step.marker)
        gradients = sum(step.gradients for step in todo if not step.marker)
        forwards = sum(step.forwards for step in todo if not step.marker)
        return (
            f"plan: {self.folder}: {len(steps) - len(todo)} of {len(steps)} steps done; training {train / 1e6:.1f} M "
            f"example-gradients (resumed runs: less), judging <= {gradients / 1e6:.1f} M and {forwards / 1e6:.1f} M "
            f"forward queries (no early exit); at {ms:.2f} ms per example-gradient on {jobs} processes: "
            f"{format_duration(train * ms / 1e3 / jobs)} + {format_duration(gradients * ms / 1e3 / jobs)}"
        )


# ------------------------------------------------------------------------------------ reading
def measured_ms_per_gradient(budget: Budget, folder: Path) -> float:
    """Training ms per example-gradient of the finished runs (``perf/images_per_sec``), else the fallback."""
    rates = []
    for run in budget.grid:
        for seed in run.seeds:
            speed = scalars(folder / "logs" / f"{run.name}_s{seed}").get("perf/images_per_sec", [])
            if speed and (folder / f"{run.name}_s{seed}.done").exists():
                rates.append(1e3 * (run.epochs or budget.epochs) / (mean(speed) * run.cost(budget)))
    return mean(rates) if rates else FALLBACK_MS_PER_GRADIENT


def cost(attack: Attack, data_passes: int, objective: str, awp_passes: int = 0) -> int:
    """Gradient computations per training example: data passes x (the inner attack's gradients +
    the objective's training passes), + the objective's passes again on the ``awp_passes`` data passes
    AWP perturbs; free training's attack counts 0 (its gradient is the pass's)."""
    passes = TRAINING_PASSES[objective]
    return data_passes * (attack.gradients_per_example + passes) + awp_passes * passes


def one_gradient(attack: Attack) -> bool:
    """At most one input gradient per training step (FGSM-RS, N-FGSM, free, ATTA-1): the runs where
    gradient masking is the risk, judged by the whole suite."""
    return attack.gradients_per_example <= 1


def method_row(training: dict[str, Any], data_passes: int, averaged: bool = False) -> dict[str, Any]:
    """The cost, label and one-gradient rule of the training a checkpoint records (``objective``:
    recorded since TRADES joined, earlier records are all madry; ``atta``: since 2026-12-03;
    ``averaged``: the judged weights are the EMA's)."""
    config, objective = dict(training["inner"]), training.get("objective", "madry")
    attack = build_attack(config.pop("name"), **config)
    gamma = training.get("awp_gamma", 0.0)  # recorded since AWP joined
    awp = awp_data_passes(data_passes, gamma, training.get("awp_warmup_epochs", 0), getattr(attack, "replays", 1))
    label = attack.label + ("" if objective == "madry" else f", {objective}") + (", ATTA" if training.get("atta") else "")
    label += f", AWP {gamma:g}" if gamma else ""
    label += f", ε {attack.eps:g}" if attack.eps != EPS else ""  # trained beyond the judged radius
    label += ", EMA" if averaged else ""
    return {"cost": cost(attack, data_passes, objective, awp), "label": label, "one_gradient": one_gradient(attack), "seeds": {}}


def method_rows(budget: Budget, folder: Path) -> dict[str, dict[str, Any]]:
    """Per run of the grid with a judgement: cost, label, and per seed (``"S"``) when it was judged,
    clean / pair / whole-suite robust accuracy (%), the monitor's worst case and train/adv_acc per
    epoch, and ``pair_robust``: which of the judged images the pair left robust (:func:`pair_robust`)."""
    rows: dict[str, dict[str, Any]] = {}
    for run in budget.grid:
        for seed in run.seeds:
            name = f"{run.name}_s{seed}"
            paths = {kind: folder / "results" / f"{name}{end}" / "results.json" for kind, end in JUDGES}
            records = {kind: r for kind, path in paths.items() if (r := judgement(path)) is not None}
            if "pair" not in records:
                continue
            first, series = records["pair"], scalars(folder / "logs" / name)
            averaged = first["checkpoint"].get("weights") == "averaged"  # recorded since EMA joined
            row = rows.setdefault(run.name, method_row(first["checkpoint"]["training"], run.epochs or budget.epochs, averaged))
            row["seeds"][str(seed)] = {
                "judged": first.get("created"), "clean": 100 * first["results"]["clean"]["accuracy"],
                **{kind: 100 * record["results"]["suite"]["accuracy"] for kind, record in records.items()},
                "monitor": series.get("robust/worst_acc", []), "train_adv": series.get("train/adv_acc", []),
                **pair_robust(paths["pair"].parent, budget.n),
            }  # fmt: skip
    return rows


def pair_robust(result: Path, n: int) -> dict[str, str]:
    """``{"pair_robust": packed}``: the suite's per-example robustness from the judgement's
    ``correctness.npz``, when it holds exactly the test images 0 .. n-1 (else nothing to pair)."""
    try:
        with np.load(result / "correctness.npz") as arrays:
            index, robust = arrays["index"], arrays["suite"]
    except (OSError, ValueError, KeyError):
        return {}
    return {"pair_robust": packed(robust)} if np.array_equal(index, np.arange(n)) else {}


def sign_test(run: np.ndarray, baseline: np.ndarray) -> tuple[int, int, float]:
    """Images robust for ``run`` only, for ``baseline`` only, and the exact two-sided sign test's p
    that the two are equally likely (McNemar's exact test on the paired judgement)."""
    wins, losses = int(np.sum(run & ~baseline)), int(np.sum(~run & baseline))
    n, k = wins + losses, min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n if n else 1.0
    return wins, losses, min(1.0, 2 * tail)


def paired_table(name: str, rows: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[str]]] | None:
    """Each run's seeds against each seed of the budget's baseline, image by image (:func:`sign_test`);
    None unless the baseline and another run have seeds that carry ``pair_robust``."""
    n, base = BUDGETS[name].n, BUDGETS[name].baseline
    robust = lambda row: {s: unpacked(v["pair_robust"], n) for s, v in row["seeds"].items() if "pair_robust" in v}  # noqa: E731
    against = robust(rows[base]) if base in rows else {}
    if not against:
        return None
    header = ["run", "seed", *(f"vs {base} s{s}: run only / {base} only (p)" for s in sorted(against, key=int))]
    table = []
    for run, row in ((r, row) for r, row in rows.items() if r != base):
        for seed, mask in sorted(robust(row).items(), key=lambda item: int(item[0])):
            tests = [sign_test(mask, against[s]) for s in sorted(against, key=int)]
            table.append([run, f"s{seed}", *(f"{wins} / {losses} ({p:.2g})" for wins, losses, p in tests)])
    return (header, table) if table else None


def frontier(rows: dict[str, dict[str, Any]]) -> list[str]:
    """Runs whose (cost, mean pair robust %) no other run matches or beats in both, one strictly."""
    points = {run: (row["cost"], mean(per_seed(row, "pair"))) for run, row in rows.items()}
    beats = lambda q, p: q[0] <= p[0] and q[1] >= p[1] and q != p  # noqa: E731
    return [name for name, p in points.items() if not any(beats(q, p) for q in points.values())]


# ------------------------------------------------------------------------------------ report
def summary(values: list[float]) -> str:
    if not values:
        return "—"
    each = f" ± {(max(values) - min(values)) / 2:.1f} ({', '.join(f'{v:.1f}' for v in values)})"
    return f"{mean(values):.1f}{each if len(values) > 1 else ''}"


def budget_table(name: str, rows: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[str]], list[str]]:
    front = frontier(rows)
    header = ["run", "inner", "cost", "seeds", "clean %", "APGD-CE→APGD-T %", "whole suite %", "frontier",
              "monitor worst % per epoch (first seed)", "train adv. % per epoch"]  # fmt: skip
    per_epoch = lambda values: " ".join(f"{100 * v:.1f}" for v in values)  # noqa: E731
    table = [
        [run, row["label"], str(row["cost"]), " ".join(f"s{s}" for s in sorted(row["seeds"], key=int)),
         summary(per_seed(row, "clean")), summary(per_seed(row, "pair")), summary(per_seed(row, "full")),
         "*" if run in front else "", *(per_epoch(next(iter(per_seed(row, key)), [])) for key in ("monitor", "train_adv"))]
        for run, row in rows.items()
    ]  # fmt: skip
    return header, table, front


def report(out: Path, names: list[str], record: Path | None) -> None:
    """Tables, JSON and plot of this machine's judgements merged into ``record`` (written back)."""
    recorded = read_record(record)
    stored = {name: merged(recorded.get(name, {}), method_rows(BUDGETS[name], out / "cheap_training" / name)) for name in names}  # fmt: skip
    stored = {name: rows for name, rows in stored.items() if rows}
    if not stored:
        print(f"nothing judged yet under {out / 'cheap_training'} ({', '.join(names)}) or in {record}")
        return
    if record:
        write_record(record, stored)
        print(f"wrote {record}")
    markdown, fronts = [], {}
    for name, rows in stored.items():
        header, table, fronts[name] = budget_table(name, rows)
        title = (f"budget {name}: robust accuracy on the first {BUDGETS[name].n} test images, mean ± half "
                 "the range over seeds (per seed); cost = gradient computations per training example")  # fmt: skip
        print(f"{title}\n{text_table(header, table)}\n")
        markdown += [f"### {title}", "", markdown_table(header, table), ""]
        if (pairs := paired_table(name, rows)) is not None:
            title = f"budget {name}: image by image against {BUDGETS[name].baseline}, exact two-sided sign test"
            print(f"{title}\n{text_table(*pairs)}\n")
            markdown += [f"### {title}", "", markdown_table(*pairs), ""]
    if len(stored) > 1:
        header = ["run", "cost", *(f"{n} %" for n in stored), *(f"{n} rank" for n in stored)]
        ranks = {n: sorted(rows, key=lambda r: -mean(per_seed(rows[r], "pair"))) for n, rows in stored.items()}
        runs = list(dict.fromkeys(r for rows in stored.values() for r in rows))
        table = [[run, str(next(rows[run]["cost"] for rows in stored.values() if run in rows)),
                  *(summary(per_seed(rows[run], "pair")) if run in rows else "—" for rows in stored.values()),
                  *(str(ranks[n].index(run) + 1) if run in ranks[n] else "—" for n in stored)] for run in runs]  # fmt: skip
        print(f"budgets side by side\n{text_table(header, table)}\n")
        markdown += ["### budgets side by side", "", markdown_table(header, table), ""]
    for name in (n for n in names if n not in stored):
        print(f"budget {name}: nothing judged in {out / 'cheap_training' / name} or in {record} (cpu: RESULTS.md §3)")
    tag = "_".join(stored)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"cheap_training_{tag}.md").write_text("\n".join(markdown))
    write_json(out / f"cheap_training_{tag}.json", {"budgets": stored, "pareto_front": fronts})
    plot(stored, fronts, out / f"cheap_training_{tag}.png")
    print(f"wrote {out / f'cheap_training_{tag}'}.{{md,json,png}}")


def plot(stored: dict[str, dict[str, dict[str, Any]]], fronts: dict[str, list[str]], path: Path) -> None:
    """Robust accuracy against cost per example, one panel per budget, seed range as error bars."""
    plt = headless_pyplot()
    fig, panels = plt.subplots(1, len(stored), figsize=(6.5 * len(stored), 5), sharey=True, squeeze=False)
    for ax, (name, rows) in zip(panels[0], stored.items(), strict=True):
        for row in rows.values():
            values = per_seed(row, "pair")
            y = mean(values)
            ax.errorbar(row["cost"], y, yerr=[[y - min(values)], [max(values) - y]], color="tab:blue", capsize=3,
                        marker="^" if row["one_gradient"] else ("s" if "b=" in row["label"] else "o"))  # fmt: skip
        front = sorted((rows[r]["cost"], mean(per_seed(rows[r], "pair"))) for r in fronts[name])
        ax.step(*zip(*front, strict=True), where="post", color="tab:blue", ls="--", label="frontier")
        ax.set(xscale="log", title=f"budget {name}", xlabel="training cost (gradient computations per training example)")
        costs = sorted({row["cost"] for row in rows.values()})
        near = [i > 0 and c < 1.2 * costs[i - 1] for i, c in enumerate(costs)]  # close to the last: a line lower
        ax.set_xticks(costs, [("\n" if n else "") + str(c) for c, n in zip(costs, near, strict=True)], minor=False)
        ax.minorticks_off()  # a tick at each cost, not 10^k
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    panels[0][0].set_ylabel("robust accuracy (%), APGD-CE → APGD-T")
    fig.suptitle("o sign, s quantized, ^ one gradient per step; bars: seeds", fontsize=10)
    for ax, rows in zip(panels[0], stored.values(), strict=True):  # once every panel's limits are final
        label_points(ax, [(row["cost"], mean(per_seed(row, "pair")), run) for run, row in rows.items()])
    save_figure(fig, plt, path)


# ------------------------------------------------------------------------------------ main
def with_runs(budget: Budget, names: list[str] | None) -> Budget:
    """``budget`` with only the named runs of its grid (all when ``names`` is None)."""
    known = [run.name for run in budget.grid]
    if unknown := [name for name in names or () if name not in known]:
        fail(f"--runs: no run {', '.join(unknown)} in budget {budget.name}; its runs: {' '.join(known)}")
    return replace(budget, grid=tuple(run for run in budget.grid if names is None or run.name in names))


def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--budget", choices=sorted(BUDGETS), default="robust")
    add("--jobs", type=int, choices=(1, 2), default=2, help="processes at a time, one thread each (2 cores)")
    add("--dry-run", action="store_true", help="print the plan line and the commands, run nothing")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--judge-only", action="store_true", help="judge finished runs; start no training")
    mode.add_argument("--train-only", action="store_true", help="train; judge later")
    mode.add_argument("--report", action="store_true", help="tables, JSON and Pareto plot of what is stored")
    add("--out", type=Path, default=DEFAULT_OUT, help="study folders: OUT/cheap_training/<budget>")
    add("--data-dir", help="passed to train.py and evaluate.py (default: $QGTRAIN_DATA)")
    add("--runs", nargs="+", metavar="RUN", help="only these runs of the budget's grid (the frontier: theirs)")
    add("--again", action="store_true", help="train and judge again the runs' seeds the record holds")
    add("--record", type=Path, help="the record --report merges into and the frontier counts (default: benchmarks/records/cheap_training.json; smoke: none)")
    args = parser.parse_args()
    budget = with_runs(BUDGETS[args.budget], args.runs)
    record = args.record or (None if budget.name == "smoke" else RECORD)
    if args.report:
        report(args.out, ["smoke"] if budget.name == "smoke" else ["main", "robust", "cpu"], record)
        return
    study = Study(budget, args.out / "cheap_training" / budget.name, args.data_dir, record, args.again)
    plan = lambda: study.steps(train=not args.judge_only, judge=not args.train_only)  # noqa: E731
    steps = plan()
    log(study.plan_line(steps, args.jobs))
    if args.dry_run:
        for step in steps:
            print(f"{'done' if step.done() else 'todo'}  {step.label}: {shlex.join(step.command)}")
        return
    failed = run_steps(plan, args.jobs)
    left = [s.label for s in plan() if not s.done()]
    log(f"finished; failed: {', '.join(failed) or 'none'}; not done: {', '.join(left) or 'none'}")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
