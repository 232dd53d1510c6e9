"""Which inner maximiser buys the most AutoAttack-strength robustness per gradient? (issue 13)

Every inner maximiser trains the main job's model with the main job's recipe, read from
``configs/mnist.yaml`` (MadryMNIST, eps = 0.3, Adam 1e-3, piecewise learning rate, eps warm-up over
the first epoch, Madry objective, attack in eval mode, channels_last, the module's other options,
batch 100, 5,000 validation images), on the
same training images in the same order, from the same initialisation (``--seed``), for the same
number of epochs. The grid (``--runs``, names below): the PGD-40 reference (``pgd40``, alpha 0.01,
Madry et al.); FGSM-RS (alpha 1.25 eps) and N-FGSM (noise 2 eps, alpha eps, no eps projection),
each with the sign (``fgsm_rs``, ``nfgsm``) and with b = 100 (``fgsm_rs_b100``, ``nfgsm_b100``;
N-FGSM also with alpha = eps / b, ``nfgsm_b100_small_alpha``, since nothing bounds its step);
PGD-k and PQGD-k (b = 100) for k in {10, 5, 2} (``pgd10``, ``pqgd10_b100``, ...).

Step size of PGD-k / PQGD-k: a sweep, as in the first version of this study. Candidates: the
attack class's ``default_alpha`` (2.5 eps / k) times 0.4, 1 and 1.6, and the paper's 0.01; the
chosen alpha is the candidate that makes the k-step attack strongest (lowest accuracy, ties: the
class default) against the seed-0 PGD-40 model of the same budget on ``sweep_size`` held-out
*validation* images (never the test images). The sweep of a run needs only the PGD-40 checkpoint,
which is stored as soon as its training ends; single-step runs keep their published step sizes and
need no sweep, so a second process trains them meanwhile. A second seed reuses the seed-0 sweep
(seeds are paired: data, order, sweep and evaluation never depend on ``--seed``).

Judged by the ``standard`` suite, ``StandardSettings(eps).suite()`` (APGD-CE 100 steps -> APGD-T
9 targets -> Square 5000 queries, each attack on the examples still robust), through
``qgtrain.evaluation.protocol.evaluate_suite``, on the first ``--eval-size`` test images (default
1000), seed 0. Cost = gradient computations per training example = epochs x
(``inner.gradients_per_example`` + 1 training pass). Catastrophic overfitting: the training
callback ``RobustnessEvaluation`` (BLOB_QG + APGD-T on a fixed validation subset after every epoch)
runs during training; its guard is reported with the per-epoch series: ``drop`` (robust accuracy
fell more than ``overfit_margin`` below its best, ``check_overfitting``) or ``gap`` (a single-step
run's ``train/adv_acc`` exceeds the monitor's accuracy by more than ``overfit_gap`` after the eps
warm-up, ``overfit_gap_exceeded``; recomputed from the series, so runs stored before that check
existed are judged the same way).

Budgets (``--budget``): ``cpu`` (default): 20,000 training images (the first 20,000 of the main
job's seeded training split), 3 epochs, monitor on 500 validation images with 10-step attacks,
sweep on 500 validation images. ``full``: the main job exactly (all 55,000 images, 10 epochs, the
config's monitor: 1,000 images, 20 steps) for a GPU. ``smoke``: 500 images, 1 epoch, runs pgd40
and pqgd2_b100, evaluation on 50 images with a reduced suite (APGD 10 steps, 2 targets, Square
100 queries): a check that the script works, not a result.

Resumable: every finished step is its own file under ``OUT/cheap_training/<tag>/`` as soon as it
is done: ``runs/<run>_s<seed>.ckpt`` (a weights-only Lightning checkpoint written by the library,
readable by ``load_model_from_checkpoint``) and ``.train.json``, ``sweep/<run>.json``,
``runs/<run>_s<seed>.eval_<suite><n>.json``. A process claims a step with an exclusive ``flock``
(released by the kernel if the process dies), so a killed study continues with what it has not
finished, and two processes, on disjoint or on the same ``--runs``, never write the same file.
``--report`` prints the table and writes ``OUT/cheap_training_<tag>.{json,png}`` (robust accuracy
against cost, Pareto frontier marked) from what is stored.

Time (benchmarks/README.md has the arithmetic): the cpu budget trains 5.34 M example-gradients
(40-65 min for two single-thread processes on this 2-core machine); judging 11 models with the
standard suite on 1,000 images adds 1.6-4 CPU-hours (Square's 5,000 queries per robust image), so
the whole cpu study takes ~1.5-2.7 h (more under heavy load), not 90 minutes, unless evaluated on
fewer images or on a GPU.

    python benchmarks/cheap_training.py --runs pgd40 pgd2 pqgd2_b100 pgd5 fgsm_rs &         # process 1
    python benchmarks/cheap_training.py --runs fgsm_rs_b100 nfgsm nfgsm_b100 pgd10 pqgd10_b100 \
        pqgd5_b100 &                                                                       # process 2
    python benchmarks/cheap_training.py --report
    python benchmarks/cheap_training.py --seed 1 --runs pgd10 pqgd10_b100                 # close call
    python benchmarks/cheap_training.py --budget full                                      # GPU
    python benchmarks/cheap_training.py --smoke && python benchmarks/cheap_training.py --smoke --report
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import importlib
import inspect
import json
import logging
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml

from common import REPO_ROOT, add_common_args, environment, fail, format_table, mnist_datamodule, setup_threads, write_json  # isort: skip  # fmt: skip
from torch import nn

from qgtrain.attacks import Attack, attack_class, attack_for_budget
from qgtrain.callbacks import RobustnessEvaluation, subset_indices
from qgtrain.callbacks.robustness import overfit_gap_exceeded
from qgtrain.checkpoint_files import CheckpointError, file_sha256
from qgtrain.data import MNISTDataModule
from qgtrain.evaluation import TensorBatches
from qgtrain.evaluation.checkpoints import load_model_from_checkpoint
from qgtrain.evaluation.protocol import evaluate_suite
from qgtrain.evaluation.runner import StandardSettings, fraction
from qgtrain.training import AdversarialTraining
from qgtrain.training.checkpoint_io import AtomicCheckpointIO

MAIN_CONFIG = REPO_ROOT / "configs" / "mnist.yaml"
REFERENCE = "pgd40"
PROTOCOL_SEED = 0
"""Data split and order, alpha sweep, monitor and evaluation use this seed; ``--seed`` changes only
the initialisation and the inner attack's random starts, so runs with different seeds are paired."""
PAPER_ALPHA = 0.01
ALPHA_FACTORS = (1.0, 0.4, 1.6)
"""Sweep candidates: these multiples of the class's ``default_alpha`` (first: the default), then 0.01."""
CLOSE_CALL = 2.0
"""Points of robust accuracy within which two runs need a second seed before one is called better."""


# ------------------------------------------------------------------------------------ the main job
@dataclass(frozen=True)
class MainJob:
    """The settings of ``python train.py`` (configs/mnist.yaml), so the study cannot drift from them."""

    config: dict[str, Any]

    @classmethod
    def load(cls, path: Path = MAIN_CONFIG) -> MainJob:
        return cls(yaml.safe_load(path.read_text()))

    @property
    def eps(self) -> float:
        return float(self.config["model"]["inner"]["init_args"]["eps"])

    @property
    def epochs(self) -> int:
        return int(self.config["trainer"]["max_epochs"])

    @property
    def data(self) -> dict[str, Any]:
        return self.config["data"]["init_args"]

    @property
    def monitor(self) -> dict[str, Any]:
        """``RobustnessEvaluation`` arguments of the main job (its ``robustness:`` section)."""
        return dict(self.config["robustness"])

    def module_options(self) -> dict[str, Any]:
        """``AdversarialTraining`` arguments of the main job but the network, the attacks, the
        optimizer (a class path there) and the seed (the study's ``--seed``)."""
        skip = ("net", "inner", "val_attack", "optimizer", "seed")
        return {k: v for k, v in self.config["model"].items() if k not in skip}

    def recipe(self) -> dict[str, Any]:
        """What the study takes from the main job (not its inner attack, which the study varies)."""
        model = self.config["model"]
        data = {k: self.data[k] for k in ("batch_size", "eval_batch_size", "val_size", "seed")}
        return {
            "eps": self.eps,
            "net": model["net"],
            "optimizer": model["optimizer"],
            **self.module_options(),
            "data": data,
        }

    def network(self) -> nn.Module:
        return _instantiate(self.config["model"]["net"])

    def module(self, net: nn.Module, inner: Attack, seed: int) -> AdversarialTraining:
        optimizer = self.config["model"]["optimizer"]
        return AdversarialTraining(
            net,
            inner=inner,
            optimizer=functools.partial(_import(optimizer["class_path"]), **optimizer.get("init_args", {})),
            seed=seed,
            **self.module_options(),
        )


def _import(class_path: str) -> Any:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _instantiate(spec: dict[str, Any]) -> Any:
    return _import(spec["class_path"])(**spec.get("init_args", {}))


# ------------------------------------------------------------------------------------ budgets
@dataclass(frozen=True)
class Budget:
    """What one study trains and how it is judged; the training part is fixed per output folder."""

    name: str
    train_subset: int | None  # None: the whole training split (55,000)
    epochs: int | None  # None: the main job's
    sweep_size: int
    monitor: dict[str, Any] = field(default_factory=dict)  # overrides of the main job's monitor
    eval_size: int = 1000
    suite: str = "standard"
    runs: tuple[str, ...] | None = None  # default --runs (None: the whole grid)

    def suite_settings(self, eps: float) -> StandardSettings:
        if self.suite == "standard":
            return StandardSettings(eps=eps)
        return StandardSettings(eps=eps, steps=10, targets=2, queries=100)  # "reduced" (smoke only)

    def training_record(self, job: MainJob) -> dict[str, Any]:
        """The settings every stored run of a folder must share."""
        return {
            "budget": self.name,
            "train_subset": self.train_subset,
            "epochs": self.epochs or job.epochs,
            "sweep_size": self.sweep_size,
            "monitor": {**job.monitor, **self.monitor},
            "recipe": job.recipe(),
        }


BUDGETS = {
    "cpu": Budget("cpu", 20_000, 3, 500, {"subset_size": 500, "steps": 10}),
    "full": Budget("full", None, None, 1000),
    "smoke": Budget(
        "smoke", 500, 1, 100, {"subset_size": 100, "steps": 5}, 50, "reduced", (REFERENCE, "pqgd2_b100")
    ),
}


# ------------------------------------------------------------------------------------ the grid
@dataclass(frozen=True)
class Run:
    """One inner maximiser; ``alpha=None``: the class default (single-step) or the sweep's choice."""

    name: str
    attack: str
    steps: int
    b: int = 1
    alpha: float | None = None
    sweep: bool = False

    def build(self, eps: float, alpha: float | None = None) -> Attack:
        return attack_for_budget(self.attack, eps, self.steps, alpha=alpha or self.alpha, b=self.b)

    def candidates(self, eps: float) -> list[float]:
        default = attack_class(self.attack).default_alpha(eps, self.steps)
        values: list[float] = []
        for value in (*(f * default for f in ALPHA_FACTORS), PAPER_ALPHA):
            if all(abs(value - v) > 1e-9 for v in values):
                values.append(round(value, 6))
        return values

    def cost_per_epoch(self, eps: float) -> int:
        """Gradient computations per training example and epoch: the attack's, plus the training pass."""
        return self.build(eps).gradients_per_example + 1


GRID: dict[str, Run] = {
    run.name: run
    for run in (
        Run(REFERENCE, "pgd", 40, alpha=PAPER_ALPHA),  # Madry et al.'s MNIST setting
        Run("fgsm_rs", "fgsm_rs", 1),
        Run("fgsm_rs_b100", "fgsm_rs", 1, b=100),
        Run("nfgsm", "nfgsm", 1),
        Run("nfgsm_b100", "nfgsm", 1, b=100),
        # N-FGSM has no eps projection to absorb the quantized step's size: alpha * qg moves a pixel by
        # up to alpha * b. With alpha = eps / b (0.3 / 100 at the main job's eps) the largest moves eps.
        Run("nfgsm_b100_small_alpha", "nfgsm", 1, b=100, alpha=0.003),
        *(
            run
            for k in (10, 5, 2)
            for run in (
                Run(f"pgd{k}", "pgd", k, sweep=True),
                Run(f"pqgd{k}_b100", "pqgd", k, b=100, sweep=True),
            )
        ),
    )
}


# ------------------------------------------------------------------------------------ storage
@dataclass(frozen=True)
class Step:
    """One stored result: ``kind`` in train / sweep / eval; done when ``output`` exists."""

    kind: str
    run: str
    seed: int
    output: Path
    needs: tuple[Step, ...] = ()


class Store:
    """The files of one study folder."""

    def __init__(self, folder: Path, suite: str, eval_size: int) -> None:
        self.folder = folder
        self.tag = f"{suite}{eval_size}"

    def checkpoint(self, run: str, seed: int) -> Path:
        return self.folder / "runs" / f"{run}_s{seed}.ckpt"

    def train(self, run: str, seed: int) -> Step:
        needs = (self.sweep(run),) if GRID[run].sweep else ()
        return Step("train", run, seed, self.folder / "runs" / f"{run}_s{seed}.train.json", needs)

    def sweep(self, run: str) -> Step:
        return Step("sweep", run, 0, self.folder / "sweep" / f"{run}.json", (self.train(REFERENCE, 0),))

    def evaluation(self, run: str, seed: int) -> Step:
        path = self.folder / "runs" / f"{run}_s{seed}.eval_{self.tag}.json"
        return Step("eval", run, seed, path, (self.train(run, seed),))

    def plan(self, runs: list[str], seed: int, evaluate: bool = True) -> list[Step]:
        """Every step the evaluations (or, ``evaluate=False``, the trainings) of ``runs`` need,
        dependencies first, in the order given."""
        ordered: list[Step] = []

        def visit(step: Step) -> None:
            for need in step.needs:
                visit(need)
            if step not in ordered:
                ordered.append(step)

        for run in runs:
            visit(self.evaluation(run, seed) if evaluate else self.train(run, seed))
        return ordered


def lock_path(step: Step) -> Path:
    return step.output.parent.parent / "locks" / f"{step.output.name}.lock"


@contextlib.contextmanager
def claim(step: Step) -> Iterator[bool]:
    """An exclusive non-blocking ``flock`` on :func:`lock_path`: True while this process holds it.

    The kernel drops the lock when the holder exits or is killed, so no claim outlives its process.
    """
    lock = lock_path(step)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            handle.truncate(0)
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def create_or_check(path: Path, record: dict[str, Any]) -> None:
    """Write ``record`` to ``path`` if absent (atomically, first writer wins); else it must be equal."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    try:
        os.link(tmp, path)
    except FileExistsError:
        stored = json.loads(path.read_text())
        if stored != json.loads(tmp.read_text()):
            changed = sorted(k for k in {*stored, *record} if stored.get(k) != record.get(k))
            fail(
                f"{path.parent} holds a study with other training settings ({', '.join(changed)} differ); "
                "pass --tag NAME to start another study"
            )
    finally:
        tmp.unlink()


# ------------------------------------------------------------------------------------ training
class EpochRecorder(L.Callback):
    """Per epoch: the robustness callback's results and the training metrics; time inside training batches."""

    def __init__(self, monitor: RobustnessEvaluation) -> None:
        self.monitor = monitor
        self.epochs: list[dict[str, float]] = []
        self.train_seconds = 0.0
        self._start = 0.0

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int
    ) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        self.train_seconds += time.perf_counter() - self._start

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        row: dict[str, float] = {"epoch": trainer.current_epoch + 1}
        if self.monitor.is_due(trainer):  # runs after the monitor (callback order), so these are fresh
            row.update(self.monitor.last_results)
        self.epochs.append(row)

    def _epoch_metrics(self, trainer: L.Trainer) -> None:
        """The previous epoch's training metrics (Lightning reduces them after the epoch-end hooks)."""
        if self.epochs:
            for key in ("train/adv_acc", "train/clean_acc", "train/loss_epoch"):
                if key in trainer.callback_metrics:
                    self.epochs[-1][key] = float(trainer.callback_metrics[key])

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_metrics(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_metrics(trainer)


class Study:
    """Executes the steps of one study folder."""

    def __init__(self, job: MainJob, budget: Budget, store: Store, args: argparse.Namespace) -> None:
        self.job = job
        self.budget = budget
        self.store = store
        self.args = args
        self.eps = job.eps
        self.record = budget.training_record(job)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"  # Lightning's "auto" choice too
        self._dm: MNISTDataModule | None = None

    @property
    def dm(self) -> MNISTDataModule:
        if self._dm is None:
            data = self.job.data
            self._dm = mnist_datamodule(
                self.args.data_dir,
                self.budget.train_subset,
                data["val_size"],
                data["batch_size"],
                data["seed"],
            )
        return self._dm

    def batches(self, split: str, n: int) -> TensorBatches:
        """The first ``n`` test images, or a fixed seeded subset of ``n`` validation images."""
        dataset = self.dm.test_set if split == "test" else self.dm.val_set
        index = (
            torch.arange(min(n, len(dataset)))
            if split == "test"
            else subset_indices(len(dataset), n, PROTOCOL_SEED)
        )
        return TensorBatches(dataset.images[index], dataset.labels[index], self.job.data["eval_batch_size"])

    def load(self, run: str, seed: int) -> nn.Module:
        try:
            model, _ = load_model_from_checkpoint(self.store.checkpoint(run, seed))
        except CheckpointError as exc:
            fail(f"{exc}; delete {self.store.train(run, seed).output} to train {run} again")
        if self.job.module_options().get("channels_last"):  # the main job's layout: same results, faster
            model = model.to(memory_format=torch.channels_last)
        return model.to(self.device).eval()

    def execute(self, step: Step) -> None:
        start = time.perf_counter()
        result = {"sweep": self.sweep, "train": self.train, "eval": self.evaluate}[step.kind](step)
        result.update(
            run=step.run,
            seed=step.seed,
            step=step.kind,
            seconds=time.perf_counter() - start,
            environment=environment(self.args.threads),
            settings=self.record,
        )
        write_json(step.output, result)

    def chosen_alpha(self, run: str) -> float:
        return json.loads(self.store.sweep(run).output.read_text())["alpha"]

    def sweep(self, step: Step) -> dict[str, Any]:
        """Accuracy of the run's k-step attack per candidate alpha against the seed-0 PGD-40 model."""
        run = GRID[step.run]
        reference = self.load(REFERENCE, 0)
        batches = self.batches("val", self.budget.sweep_size)
        rows = []
        for alpha in run.candidates(self.eps):
            outcome = evaluate_suite(
                reference, [run.build(self.eps, alpha)], batches, self.device, PROTOCOL_SEED
            )
            rows.append({"alpha": alpha, "accuracy": 100 * fraction(outcome.robust)})
            log(f"sweep {run.name}: alpha {alpha:.4g} -> {rows[-1]['accuracy']:.1f}% on {REFERENCE}")
        best = min(rows, key=lambda r: r["accuracy"])  # the strongest; ties: the first (class default)
        return {
            "alpha": best["alpha"],
            "candidates": rows,
            "examples": batches.num_examples,
            "reference": str(self.store.checkpoint(REFERENCE, 0).relative_to(self.store.folder)),
            "reference_sha256": file_sha256(self.store.checkpoint(REFERENCE, 0)),
        }

    def train(self, step: Step) -> dict[str, Any]:
        run = GRID[step.run]
        inner = run.build(self.eps, self.chosen_alpha(run.name) if run.sweep else None)
        L.seed_everything(step.seed, workers=True, verbose=False)
        module = self.job.module(self.job.network(), inner, step.seed)
        monitor = RobustnessEvaluation(**self.record["monitor"], log_hparams=False)
        recorder = EpochRecorder(monitor)
        epochs = self.record["epochs"]
        trainer = L.Trainer(
            accelerator="auto",
            devices=1,
            max_epochs=epochs,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            inference_mode=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,  # the robustness callback is the per-epoch check
            plugins=[AtomicCheckpointIO()],
            callbacks=[monitor, recorder],
        )
        log(
            f"train {run.name} (seed {step.seed}): {inner!r}, {epochs} epochs on {len(self.dm.train_set)} images"
        )
        start = time.perf_counter()
        trainer.fit(module, datamodule=self.dm)
        fit_seconds = time.perf_counter() - start
        checkpoint = self.store.checkpoint(run.name, step.seed)
        trainer.save_checkpoint(checkpoint, weights_only=True)
        cost = epochs * run.cost_per_epoch(self.eps)
        examples = len(self.dm.train_set)
        return {
            "inner": inner.config(),
            "label": inner.label,
            "single_step": inner.single_step,
            "cost": cost,
            "train_examples": examples,
            "training_gradients": cost * examples,
            "fit_seconds": fit_seconds,
            "train_seconds": recorder.train_seconds,
            "epochs": recorder.epochs,
            "overfit_detected": monitor.overfit_detected,
            "overfit_margin": monitor.overfit_margin,
            "best_worst_acc": monitor.best_worst_acc,
            "best_epoch": monitor.best_epoch,
            "checkpoint": str(checkpoint.relative_to(self.store.folder)),
            "checkpoint_sha256": file_sha256(checkpoint),
        }

    def evaluate(self, step: Step) -> dict[str, Any]:
        model = self.load(step.run, step.seed)
        attacks = self.budget.suite_settings(self.eps).suite()
        batches = self.batches("test", self.args.eval_size)
        outcome = evaluate_suite(model, attacks, batches, self.device, PROTOCOL_SEED)
        result = {
            "suite": self.budget.suite,
            "examples": batches.num_examples,
            "clean": 100 * fraction(outcome.clean),
            "robust": 100 * fraction(outcome.robust),
            "after": {
                label: 100 * fraction(a) for label, a in zip(outcome.labels, outcome.after, strict=True)
            },
            "fooled_first": dict(zip(outcome.labels, outcome.fooled_counts(), strict=True)),
            "attacks": [a.config() for a in attacks],
            "costs": {label: c.to_dict() for label, c in zip(outcome.labels, outcome.costs, strict=True)},
            "robust_vector": "".join("1" if r else "0" for r in outcome.robust.tolist()),
        }
        log(
            f"eval {step.run} (seed {step.seed}): clean {result['clean']:.1f}% robust {result['robust']:.1f}%"
        )
        return result

    def run(self, steps: list[Step], poll_seconds: float) -> None:
        """Do every step not stored yet whose inputs are stored and which no other process holds."""
        waiting_since = None
        while True:
            pending = [s for s in steps if not s.output.exists()]
            if not pending:
                return
            for step in pending:
                if not all(n.output.exists() for n in step.needs):
                    continue
                with claim(step) as mine:
                    if mine and not step.output.exists():
                        self.execute(step)
                        waiting_since = None
                        break
            else:
                if waiting_since is None:
                    waiting_since = time.time()
                    held = ", ".join(f"{s.kind} {s.run} s{s.seed}" for s in pending)
                    log(f"waiting for steps another process holds or needs first: {held}")
                time.sleep(poll_seconds)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ------------------------------------------------------------------------------------ report
def load_results(store: Store) -> dict[str, dict[int, dict[str, Any]]]:
    """``{run: {seed: {"train": ..., "eval": ...}}}`` from the stored files."""
    results: dict[str, dict[int, dict[str, Any]]] = {}
    for path in sorted((store.folder / "runs").glob("*.train.json")):
        train = json.loads(path.read_text())
        if train["run"] not in GRID:  # stored by a version of this script with a larger grid
            log(f"skipping {path.name}: run {train['run']!r} is not in this script's grid")
            continue
        entry = results.setdefault(train["run"], {}).setdefault(train["seed"], {})
        entry["train"] = train
        evaluation = store.evaluation(train["run"], train["seed"]).output
        if evaluation.exists():
            entry["eval"] = json.loads(evaluation.read_text())
    return results


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names whose (cost, robust) no other point matches or beats in both with one strictly better."""
    return [
        name
        for name, (cost, robust) in points.items()
        if not any(
            c <= cost and r >= robust and (c < cost or r > robust)
            for other, (c, r) in points.items()
            if other != name
        )
    ]


def report(store: Store, out: Path, tag: str) -> None:
    results = load_results(store)
    if not results:
        print(f"nothing stored yet in {store.folder}")
        return
    sweeps = {p.stem: json.loads(p.read_text()) for p in sorted((store.folder / "sweep").glob("*.json"))}
    rows, points = [], {}
    for name in [n for n in GRID if n in results]:
        seeds = results[name]
        first = seeds[min(seeds)]["train"]
        evaluated = {s: e["eval"] for s, e in seeds.items() if "eval" in e}
        robust = [evaluated[s]["robust"] for s in sorted(evaluated)]
        mean = sum(robust) / len(robust) if robust else None
        if mean is not None:
            points[name] = (first["cost"], mean)
        monitor = first["epochs"]
        rows.append(
            {
                "run": name,
                "inner": first["label"],
                "k": first["inner"]["steps"],
                "alpha": f"{first['inner']['alpha']:.4g}",
                "cost": first["cost"],
                "clean": _mean([e["clean"] for e in evaluated.values()]),
                "robust_by_seed": " / ".join(f"s{s}: {evaluated[s]['robust']:.1f}" for s in sorted(evaluated))
                or "—",
                "robust": mean,
                "train_min": _mean([e["train"]["fit_seconds"] / 60 for e in seeds.values()]),
                "eval_min": _mean([e["seconds"] / 60 for e in evaluated.values()]),
                "overfit_guard": overfit_verdict(
                    seeds, warmup_epochs=settings_of(first)["eps_warmup_epochs"]
                ),
                "monitor_worst_per_epoch": " ".join(
                    f"{100 * e.get('robust/worst_acc', float('nan')):.1f}" for e in monitor
                ),
                "train_adv_per_epoch": " ".join(
                    f"{100 * e.get('train/adv_acc', float('nan')):.1f}" for e in monitor
                ),
            }
        )
    front = pareto_front(points)
    for row in rows:
        row["pareto"] = "*" if row["run"] in front else ""
    close = [
        (a, b)
        for i, a in enumerate(points)
        for b in list(points)[i + 1 :]
        if (a in front or b in front) and abs(points[a][1] - points[b][1]) <= CLOSE_CALL
    ]
    single_seed = sorted({r for pair in close for r in pair if len(results[r]) < 2}, key=list(GRID).index)
    first_train = next(s[min(s)]["train"] for s in results.values())
    settings = first_train["settings"]
    title = (
        f"cheap training ({settings['budget']}, {store.folder}): MadryMNIST, eps {first_train['inner']['eps']}, "
        f"{first_train['train_examples']} training images, {settings['epochs']} epochs, main job's recipe; "
        f"robust = standard suite ({store.tag}) on the first test images, % (mean over seeds); cost = gradient "
        "computations per training example; overfit_guard = drop (check_overfitting fired) / gap (train/adv_acc "
        "above the monitor by more than overfit_gap after warm-up, single-step runs) / no; "
        "monitor_worst_per_epoch = the callback's worst case on validation images after each epoch"
    )
    columns = [
        "run", "inner", "k", "alpha", "cost", "clean", "robust_by_seed", "robust", "pareto",
        "train_min", "eval_min", "overfit_guard", "monitor_worst_per_epoch", "train_adv_per_epoch",
    ]  # fmt: skip
    print(format_table(rows, columns, title))
    sweep_rows = [
        {
            "run": run,
            "alpha": f"{c['alpha']:.4g}",
            "accuracy": c["accuracy"],
            "chosen": "*" if c["alpha"] == s["alpha"] else "",
        }
        for run, s in sweeps.items()
        for c in s["candidates"]
    ]
    if sweep_rows:
        print(
            format_table(
                sweep_rows,
                ["run", "alpha", "accuracy", "chosen"],
                f"alpha sweep: k-step attack vs {REFERENCE} (seed 0), validation images, accuracy %",
            )
        )
    gradients = sum(e["train"]["training_gradients"] for s in results.values() for e in s.values())
    seconds = sum(e["train"]["train_seconds"] for s in results.values() for e in s.values())
    print(
        f"training: {gradients} example-gradients in {seconds:.0f} s inside training batches = {1e3 * seconds / max(gradients, 1):.3f} ms per gradient"
    )
    for a, b in close:
        print(
            f"close call (<= {CLOSE_CALL} points, one on the frontier): {a} {points[a][1]:.1f}% vs {b} {points[b][1]:.1f}%"
        )
    if single_seed:
        print(
            f"before calling a winner: python benchmarks/cheap_training.py --budget {settings['budget']} --seed 1 --runs {' '.join(single_seed)}"
        )
    summary = {
        "folder": str(store.folder),
        "settings": settings,
        "rows": rows,
        "pareto_front": front,
        "close_calls": close,
        "second_seed_needed": single_seed,
        "sweeps": sweeps,
        "ms_per_training_gradient": 1e3 * seconds / max(gradients, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"cheap_training_{tag}.json", summary)
    if points:
        short = (
            f"MadryMNIST, eps {first_train['inner']['eps']}, {first_train['train_examples']} images x "
            f"{settings['epochs']} epochs ({settings['budget']} budget); {store.tag} test images"
        )
        plot(rows, points, front, out / f"cheap_training_{tag}.png", short)
        print(f"wrote {out / f'cheap_training_{tag}.json'} and {out / f'cheap_training_{tag}.png'}")


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def plot(
    rows: list[dict[str, Any]],
    points: dict[str, tuple[float, float]],
    front: list[str],
    path: Path,
    title: str,
) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for row in rows:
        if row["run"] not in points:
            continue
        cost, robust = points[row["run"]]
        quantized = "b=" in row["inner"]
        marker = "^" if row["k"] == 1 else ("*" if row["run"] == REFERENCE else "o")
        ax.scatter(cost, robust, marker=marker, s=90 if row["run"] in front else 45,
                   color="tab:orange" if quantized else "tab:blue",
                   edgecolors="black" if row["run"] in front else "none", zorder=3)  # fmt: skip
        ax.annotate(row["run"], (cost, robust), textcoords="offset points", xytext=(5, 4), fontsize=8)
    frontier = sorted(points[n] for n in front)
    ax.step(
        [c for c, _ in frontier],
        [r for _, r in frontier],
        where="post",
        color="gray",
        ls="--",
        label="Pareto frontier",
    )
    ax.scatter([], [], marker="o", color="tab:blue", label="sign (b=1)")
    ax.scatter([], [], marker="o", color="tab:orange", label="quantized (b=100)")
    ax.scatter([], [], marker="^", color="gray", label="single-step")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("training cost (gradient computations per training example)")
    ax.set_ylabel("robust accuracy, standard suite (%)")
    ax.set_title(title, fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------ main
def settings_of(train: dict[str, Any]) -> dict[str, Any]:
    """The recipe a stored training step used (``settings.recipe``, else the job's defaults)."""
    return {"eps_warmup_epochs": 1.0, **train["settings"].get("recipe", {})}


def overfit_verdict(seeds: dict[int, dict[str, Any]], warmup_epochs: float) -> str:
    """``drop``, ``gap`` or ``no`` over a run's seeds: the callback's two catastrophic-overfitting checks."""
    gap = inspect.signature(RobustnessEvaluation).parameters["overfit_gap"].default
    verdicts = set()
    for entry in seeds.values():
        train = entry["train"]
        if train["overfit_detected"]:
            verdicts.add("drop")
        if train["single_step"]:
            for epoch in train["epochs"]:
                after_warmup = epoch["epoch"] > warmup_epochs  # counted from 1; epoch 1 ramps eps
                worst, adv = epoch.get("robust/worst_acc"), epoch.get("train/adv_acc")
                if (
                    after_warmup
                    and worst is not None
                    and adv is not None
                    and overfit_gap_exceeded(adv, worst, gap)
                ):
                    verdicts.add("gap")
    return "+".join(sorted(verdicts)) or "no"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="cpu", help="preset (default cpu)")
    parser.add_argument("--full", action="store_true", help="same as --budget full (a GPU)")
    parser.add_argument(
        "--smoke", action="store_true", help="same as --budget smoke (a quick end-to-end check)"
    )
    parser.add_argument(
        "--runs", nargs="+", default=None, help=f"runs of the grid (default: all): {' '.join(GRID)}"
    )
    parser.add_argument(
        "--eval-size", type=int, default=None, help="the first N test images (default 1000; smoke 50)"
    )
    parser.add_argument(
        "--report", action="store_true", help="print the table, write the JSON summary and plot"
    )
    parser.add_argument(
        "--tag", default=None, help="study folder OUT/cheap_training/TAG (default: the budget's name)"
    )
    parser.add_argument(
        "--skip-eval",
        action="store_true",
        help="train (and sweep) only; evaluate later with the same command without this flag",
    )
    parser.add_argument(
        "--poll-seconds", type=float, default=30.0, help="wait between checks for other processes"
    )
    add_common_args(parser)
    args = parser.parse_args()
    if args.full and args.smoke:
        fail("--full and --smoke exclude each other")
    args.budget = "full" if args.full else "smoke" if args.smoke else args.budget
    unknown = [r for r in args.runs or [] if r not in GRID]
    if unknown:
        fail(f"unknown run(s) {', '.join(unknown)}; choose from {', '.join(GRID)}")
    if args.eval_size is not None and args.eval_size < 1:
        fail(f"--eval-size must be >= 1, got {args.eval_size}")
    if args.seed < 0:
        fail(f"--seed must be >= 0, got {args.seed}")
    return args


def quiet_lightning() -> None:
    """Keep the log to the study's lines and real warnings (the overfitting guard's among them)."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    for message in (".*set_vital.*", ".*LeafSpec.*"):
        warnings.filterwarnings("ignore", message=message)


def main() -> None:
    args = parse_args()
    quiet_lightning()
    setup_threads(args.threads)
    budget = BUDGETS[args.budget]
    args.eval_size = args.eval_size or budget.eval_size
    job = MainJob.load()
    tag = args.tag or budget.name
    store = Store(args.out / "cheap_training" / tag, budget.suite, args.eval_size)
    if args.report:
        report(store, args.out, tag)
        return
    study = Study(job, budget, store, args)
    create_or_check(store.folder / "budget.json", study.record)
    runs = [r for r in GRID if r in (args.runs or budget.runs or GRID)]
    steps = store.plan(runs, args.seed, evaluate=not args.skip_eval)
    examples = len(study.dm.train_set)
    planned = sum(
        GRID[s.run].cost_per_epoch(job.eps) * study.record["epochs"] * examples
        for s in steps
        if s.kind == "train" and not s.output.exists()
    )
    log(
        f"budget {budget.name} -> {store.folder}: {examples} training images, {study.record['epochs']} epochs, "
        f"eval {budget.suite} on {args.eval_size} test images; {len(steps)} steps "
        f"({sum(s.output.exists() for s in steps)} stored); training still to do: {planned} example-gradients"
    )
    study.run(steps, args.poll_seconds)
    report(store, args.out, tag)


if __name__ == "__main__":
    main()
