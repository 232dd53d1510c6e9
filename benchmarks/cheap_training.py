"""Headline benchmark: how robust a model does each inner maximiser buy per unit of training cost?

Same network, data, seed, epochs and evaluation for every inner maximiser: FGSM-RS, PGD-k and
PQGD-k (b in {100, 1000}) for k in {2, 5, 10}, and Madry's PGD-40 (alpha 0.01) as reference.
The step size of PGD-k / PQGD-k is chosen per (attack, k, b) by a small sweep: the alpha that
makes the k-step attack strongest against the PGD-40 model, on held-out validation examples
(not the test subset). Every trained model is evaluated with one protocol on a fixed test subset:
clean accuracy and the per-example worst case over PGD-100 with restarts and BLOB_QG-100.

Cost is counted in gradient computations per training example: epochs x (k + 1) (one input
gradient per inner step plus the training step; FGSM-RS: 2).

    python benchmarks/cheap_training.py                 # reduced CPU budget (~40 min on 1 thread)
    python benchmarks/cheap_training.py --budget full   # GPU budget (MadryMNIST, all of MNIST)
    python benchmarks/cheap_training.py --seed 1 --runs pgd10 --reuse-reference benchmarks/out/cheap_training.json  # replicate
    python benchmarks/cheap_training.py --runs pgd5 --epochs 1 --train-subset 1000 --eval-size 100  # smoke
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from common import (
    EPS,
    add_common_args,
    dataset_tensors,
    environment,
    evaluation_attacks,
    fail,
    format_table,
    mnist_datamodule,
    robust_accuracy,
    setup_threads,
    write_json,
)
from torch import nn

from qgtrain.attacks import Attack, build_attack
from qgtrain.evaluation.checkpoints import CheckpointError, load_model_from_checkpoint
from qgtrain.models import build_model, model_spec
from qgtrain.training import AdversarialTraining

BUDGETS: dict[str, dict[str, Any]] = {
    # CPU: TinyCNN (width 16), 10k training examples, 3 epochs, eps ramped over the first epoch.
    "reduced": {
        "model": "tiny_cnn",
        "train_subset": 10_000,
        "epochs": 3,
        "eps_warmup_epochs": 1.0,
        "lr_schedule": "constant",
        "batch_size": 100,
        "val_examples": 500,
        "sweep_examples": 500,
        "eval_size": 500,
        "eval_steps": 100,
        "eval_restarts": 2,
        "eval_pqgd": False,
        "accelerator": "cpu",
    },
    # GPU: Madry's CNN, all 55k training examples, 10 epochs (configs/mnist.yaml), 10k test examples.
    "full": {
        "model": "madry_mnist",
        "train_subset": None,
        "epochs": 10,
        "eps_warmup_epochs": 1.0,
        "lr_schedule": "piecewise",
        "batch_size": 100,
        "val_examples": 1000,
        "sweep_examples": 1000,
        "eval_size": 10_000,
        "eval_steps": 100,
        "eval_restarts": 3,
        "eval_pqgd": True,
        "accelerator": "auto",
    },
}
REFERENCE = "pgd40"
PROTOCOL_SEED = 0
"""Data split and order, alpha sweep and evaluation use this fixed seed; ``--seed`` changes only the
initialisation and the inner attack's random starts, so runs with different seeds are paired."""
STEPS = (2, 5, 10)
QUANT_LEVELS = (100, 1000)


@dataclass
class RunSpec:
    """One inner maximiser of the grid."""

    name: str
    attack: str
    steps: int
    b: int = 1
    alpha: float | None = None  # None: chosen by the sweep
    alpha_candidates: list[float] = field(default_factory=list)

    def build(self) -> Attack:
        kwargs: dict[str, Any] = {"eps": EPS, "steps": self.steps}
        if self.alpha is not None:
            kwargs["alpha"] = self.alpha
        if self.attack in ("pqgd",):
            kwargs["b"] = self.b
        return build_attack(self.attack, **kwargs)

    def cost_per_epoch(self) -> int:
        """Gradient computations per training example per epoch: k input gradients + 1 training step."""
        return self.steps + 1


def unique(values: list[float]) -> list[float]:
    out: list[float] = []
    for v in values:
        if all(not math.isclose(v, u, rel_tol=1e-9) for u in out):
            out.append(round(v, 6))
    return out


def default_grid() -> list[RunSpec]:
    """The grid, most informative runs first (so a run cut short still answers the main question)."""
    grid = [RunSpec(REFERENCE, "pgd", 40, alpha=0.01)]  # Madry et al.'s MNIST setting
    for k in sorted(STEPS, reverse=True):
        grid.append(RunSpec(f"pgd{k}", "pgd", k, alpha_candidates=unique([EPS / k, 2.5 * EPS / k])))
        for b in QUANT_LEVELS[:1]:
            grid.append(pqgd_spec(k, b))
        if k == min(STEPS):
            grid.append(RunSpec("fgsm_rs", "fgsm_rs", 1))  # alpha = 1.25 eps (Wong et al.), library default
    for k in sorted(STEPS, reverse=True):
        for b in QUANT_LEVELS[1:]:
            grid.append(pqgd_spec(k, b))
    return grid


def pqgd_spec(k: int, b: int) -> RunSpec:
    candidates = unique([0.01, 0.02, EPS / k, 2.5 * EPS / k])
    return RunSpec(f"pqgd{k}_b{b}", "pqgd", k, b=b, alpha_candidates=candidates)


class EpochRecorder(L.Callback):
    """Per-epoch validation accuracies (catastrophic-overfitting watch) and pure training time."""

    def __init__(self) -> None:
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
        metrics = trainer.callback_metrics
        row = {"epoch": trainer.current_epoch + 1}
        for key in ("val/clean_acc", "val/adv_acc", "train/adv_acc", "train/clean_acc", "train/loss_epoch"):
            if key in metrics:
                row[key] = float(metrics[key])
        self.epochs.append(row)


def train_one(
    spec: RunSpec, cfg: dict[str, Any], dm: Any, args: argparse.Namespace
) -> tuple[nn.Module, dict]:
    """Train one model with ``spec``'s inner maximiser; same seed, data and schedule for all."""
    L.seed_everything(args.seed, workers=True, verbose=False)
    net = build_model(cfg["model"])
    module = AdversarialTraining(
        net,
        inner=spec.build(),
        val_attack=build_attack("pgd", eps=EPS, alpha=0.04, steps=10),
        optimizer=lambda params: torch.optim.Adam(params, lr=1e-3),
        lr_schedule=cfg["lr_schedule"],
        eps_warmup_epochs=cfg["eps_warmup_epochs"],
        seed=args.seed,
    )
    recorder = EpochRecorder()
    val_batches = max(1, math.ceil(cfg["val_examples"] / dm.eval_batch_size))
    trainer = L.Trainer(
        accelerator=cfg["accelerator"],
        devices=1,
        max_epochs=cfg["epochs"],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        inference_mode=False,
        num_sanity_val_steps=0,
        limit_val_batches=val_batches,
        callbacks=[recorder],
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    fit_seconds = time.perf_counter() - start
    info = {
        "fit_seconds": fit_seconds,
        "train_seconds": recorder.train_seconds,
        "epochs": recorder.epochs,
        "inner": module.inner.config(),
    }
    return net.cpu().eval(), info


def save_model(net: nn.Module, spec: RunSpec, path: Path) -> None:
    """A checkpoint ``qgtrain.evaluation.checkpoints.load_model_from_checkpoint`` reads (weights only)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {f"net.{k}": v.detach().cpu() for k, v in net.state_dict().items()}
    torch.save(
        {"state_dict": state, "qgtrain": {"net": model_spec(net), "inner": spec.build().config()}}, path
    )


def alpha_sweep(
    reference: nn.Module, specs: list[RunSpec], x: torch.Tensor, y: torch.Tensor, seed: int
) -> list[dict[str, Any]]:
    """For each spec with candidates: accuracy of the k-step attack on the reference model per alpha."""
    rows = []
    for spec in specs:
        if spec.alpha is not None or not spec.alpha_candidates:
            continue
        results = []
        for alpha in spec.alpha_candidates:
            kwargs: dict[str, Any] = {"eps": EPS, "alpha": alpha, "steps": spec.steps}
            if spec.attack == "pqgd":
                kwargs["b"] = spec.b
            acc = robust_accuracy(reference, {"a": build_attack(spec.attack, **kwargs)}, x, y, 250, seed)["a"]
            results.append((alpha, acc))
            rows.append({"run": spec.name, "alpha": f"{alpha:.4g}", "acc_on_pgd40_model": acc})
        best = min(results, key=lambda r: r[1])  # the strongest attack; ties: the first candidate
        spec.alpha = best[0]
        for row in rows:
            if row["run"] == spec.name:
                row["chosen"] = "*" if row["alpha"] == f"{spec.alpha:.4g}" else ""
    return rows


def reuse_reference(
    path: Path, cfg: dict[str, Any], results: dict[str, Any], rows: list[dict[str, Any]]
) -> nn.Module:
    """Load the PGD-40 model, its timings and its evaluation from an earlier run's JSON."""
    try:
        earlier = json.loads(path.read_text())
        entry = earlier["runs"][REFERENCE]
        ckpt = earlier["reference_model"]
    except (OSError, ValueError, KeyError) as exc:
        fail(f"--reuse-reference {path}: no trained {REFERENCE} in it ({type(exc).__name__}: {exc})")
    if earlier.get("budget") != cfg:
        fail(f"--reuse-reference {path} was run with budget {earlier.get('budget')}, not {cfg}")
    try:
        model, _ = load_model_from_checkpoint(ckpt)
    except CheckpointError as exc:
        fail(str(exc))
    results["runs"][REFERENCE] = {**entry, "reused_from": str(path)}
    results["reference_model"] = ckpt
    rows.append({**entry["row"], "run": f"{REFERENCE} (reused, seed {earlier.get('seed', 0)})"})
    print(f"reusing {REFERENCE} from {path} ({ckpt}): {entry['row']}", flush=True)
    return model.eval()


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"pgd": ("o", "tab:blue"), "pqgd": ("s", "tab:orange"), "fgsm_rs": ("^", "tab:green")}
    for row in rows:
        marker, color = styles.get(row["attack"], ("x", "k"))
        if row["run"].startswith(REFERENCE):
            marker, color = "*", "tab:red"
        ax.scatter(row["cost"], row["robust"], marker=marker, color=color, s=60)
        ax.annotate(
            row["run"], (row["cost"], row["robust"]), textcoords="offset points", xytext=(4, 4), fontsize=8
        )
    ax.set_xscale("log")
    ax.set_xlabel("training cost (gradient computations per training example)")
    ax.set_ylabel("robust accuracy, ensemble worst case (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--budget", choices=sorted(BUDGETS), default="reduced", help="preset (default reduced)"
    )
    parser.add_argument("--full", action="store_true", help="same as --budget full (GPU)")
    parser.add_argument("--runs", nargs="+", default=None, help="subset of the grid by name (default: all)")
    parser.add_argument("--model", default=None, help="override the budget's network (tiny_cnn, madry_mnist)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--train-subset", type=int, default=None, help="training examples (0: all)")
    parser.add_argument(
        "--eval-size", type=int, default=None, help="fixed test subset: the first N test images"
    )
    parser.add_argument("--eval-steps", type=int, default=None)
    parser.add_argument("--eval-restarts", type=int, default=None)
    parser.add_argument("--sweep-examples", type=int, default=None)
    parser.add_argument("--val-examples", type=int, default=None)
    parser.add_argument(
        "--reuse-reference",
        type=Path,
        default=None,
        help="JSON of an earlier run with the same budget: reuse its trained and evaluated PGD-40 model",
    )
    parser.add_argument("--tag", default="cheap_training", help="output file stem under --out")
    add_common_args(parser)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    setup_threads(args.threads)
    cfg = dict(BUDGETS["full" if args.full else args.budget])
    for key in (
        "model",
        "epochs",
        "eval_size",
        "eval_steps",
        "eval_restarts",
        "sweep_examples",
        "val_examples",
    ):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if args.train_subset is not None:
        cfg["train_subset"] = args.train_subset or None
    for key in ("epochs", "eval_size", "eval_steps", "eval_restarts", "sweep_examples", "val_examples"):
        if cfg[key] < 1:
            fail(f"--{key.replace('_', '-')} must be >= 1, got {cfg[key]}")

    grid = default_grid()
    names = [s.name for s in grid]
    if args.runs is not None:
        unknown = [r for r in args.runs if r not in names]
        if unknown:
            fail(f"unknown run(s) {', '.join(unknown)}; choose from {', '.join(names)}")
    selected = [s for s in grid if args.runs is None or s.name in args.runs or s.name == REFERENCE]
    needs_sweep = any(s.alpha is None for s in selected)

    val_size = max(cfg["val_examples"], cfg["sweep_examples"])
    dm = mnist_datamodule(args.data_dir, cfg["train_subset"], val_size, cfg["batch_size"], PROTOCOL_SEED)
    x_test, y_test = dataset_tensors(dm.test_set, cfg["eval_size"])
    x_sweep, y_sweep = dataset_tensors(dm.val_set, cfg["sweep_examples"])
    eval_attacks = evaluation_attacks(cfg["eval_steps"], cfg["eval_restarts"], 100, cfg["eval_pqgd"])
    args.out.mkdir(parents=True, exist_ok=True)
    env = environment(args.threads)
    print(f"budget: {cfg}", flush=True)
    print(f"train examples: {len(dm.train_set)}, eval: first {x_test.shape[0]} test images", flush=True)

    results: dict[str, Any] = {"env": env, "budget": cfg, "seed": args.seed, "runs": {}, "sweep": []}
    json_path = args.out / f"{args.tag}.json"
    ordered = [s for s in selected if s.name == REFERENCE] + [s for s in selected if s.name != REFERENCE]
    if args.runs is not None and REFERENCE not in args.runs and not needs_sweep:
        ordered = [s for s in ordered if s.name != REFERENCE]
    rows: list[dict[str, Any]] = []
    reference: nn.Module | None = None
    if args.reuse_reference is not None:
        reference = reuse_reference(args.reuse_reference, cfg, results, rows)
        ordered = [s for s in ordered if s.name != REFERENCE]
    for spec in ordered:
        if spec.alpha is None:  # first model that needs a swept alpha: run the sweep on the reference
            if reference is None:
                fail("internal: the PGD-40 reference must be trained before the sweep")
            sweep_start = time.perf_counter()
            results["sweep"] = alpha_sweep(reference, ordered, x_sweep, y_sweep, PROTOCOL_SEED)
            results["sweep_seconds"] = time.perf_counter() - sweep_start
            print(
                format_table(
                    results["sweep"],
                    ["run", "alpha", "acc_on_pgd40_model", "chosen"],
                    f"alpha sweep: accuracy (%) of the k-step attack on the PGD-40 model, "
                    f"{x_sweep.shape[0]} validation examples (lower = stronger)",
                ),
                flush=True,
            )
            write_json(json_path, results)
        print(f"[{time.strftime('%H:%M:%S')}] training {spec.name} (alpha={spec.alpha})", flush=True)
        net, info = train_one(spec, cfg, dm, args)
        if spec.name == REFERENCE:
            reference = net
            ckpt = args.out / f"{args.tag}_{REFERENCE}_{cfg['model']}.pt"
            save_model(net, spec, ckpt)
            results["reference_model"] = str(ckpt)
        eval_start = time.perf_counter()
        acc = robust_accuracy(net, eval_attacks, x_test, y_test, 100, PROTOCOL_SEED)
        eval_seconds = time.perf_counter() - eval_start
        row = {
            "run": spec.name,
            "attack": spec.attack,
            "k": spec.steps,
            "b": spec.b if spec.attack == "pqgd" else None,
            "alpha": f"{spec.alpha if spec.alpha is not None else info['inner']['alpha']:.4g}",
            "cost": cfg["epochs"] * spec.cost_per_epoch(),
            "train_s": info["train_seconds"],
            "clean": acc["clean"],
            **{name: acc[name] for name in eval_attacks},
            "robust": acc["worst"],
            "val_adv_per_epoch": " ".join(
                f"{e.get('val/adv_acc', float('nan')) * 100:.1f}" for e in info["epochs"]
            ),
        }
        rows.append(row)
        results["runs"][spec.name] = {
            **asdict(spec),
            **info,
            "accuracy": acc,
            "eval_seconds": eval_seconds,
            "row": row,
        }
        print(
            f"[{time.strftime('%H:%M:%S')}] {spec.name}: clean {acc['clean']:.1f} robust {acc['worst']:.1f} "
            f"(train {info['train_seconds']:.0f}s, fit {info['fit_seconds']:.0f}s, eval {eval_seconds:.0f}s) "
            f"val PGD-10 per epoch: {row['val_adv_per_epoch']}",
            flush=True,
        )
        write_json(json_path, results)

    columns = [
        "run",
        "k",
        "b",
        "alpha",
        "cost",
        "train_s",
        "clean",
        *eval_attacks,
        "robust",
        "val_adv_per_epoch",
    ]
    title = (
        f"cheap training: {cfg['model']}, {len(dm.train_set)} MNIST training examples, {cfg['epochs']} epochs, "
        f"eps={EPS} (warm-up {cfg['eps_warmup_epochs']} epoch), training seed {args.seed}; robust = per-example worst "
        f"case of {', '.join(eval_attacks)} on the first {x_test.shape[0]} test images; cost = gradient "
        f"computations per training example; val_adv_per_epoch = PGD-10 accuracy on {cfg['val_examples']} "
        "validation images after each epoch"
    )
    table = format_table(rows, columns, title)
    print(table, flush=True)
    results["table"] = table
    write_json(json_path, results)
    if rows:
        plot(rows, args.out / f"{args.tag}.png", f"{cfg['model']}, {cfg['epochs']} epochs, eps {EPS}")
        print(f"wrote {json_path} and {args.out / f'{args.tag}.png'}")


if __name__ == "__main__":
    main()
