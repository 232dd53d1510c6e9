"""Is qgtrain's ``standard`` suite as strong as AutoAttack, and how much does early exit save?

On each model, the same N MNIST test images (the first, or from ``--first``; eps = 0.3), side by side:

* ``ours_standard``: qgtrain's suite (APGD-CE -> APGD-T (9 targets) -> Square 5000), early exit,
  through ``qgtrain.evaluation.protocol`` (the engine evaluate.py and the callback use);
* ``autoattack`` (``--reference autoattack``): the original AutoAttack (Croce & Hein's code,
  ``fra31/auto-attack``, ``version="standard"``), when importable: a measuring instrument installed
  into the environment by hand, never a dependency of qgtrain; its attacks run one at a time on the
  examples still robust, exactly as its own loop does, so its per-attack breakdown is recorded;
* ``torchattacks_aa``: ``torchattacks.AutoAttack(version="standard")`` (APGD-CE, APGD-T, FAB-T,
  Square), accuracy by the same rule (correct clean and on its output). Note: torchattacks 3.5 builds
  its APGD, APGD-T and FAB-T with its default of 10 steps, not AutoAttack's 100; ``torchattacks_aa100``
  is the same four attacks at 100 steps (Croce & Hein's budget), ``ours_standard_steps10`` ours at 10;
* ``apgd_ce_b{1,100,1000}``, ``apgd_t_b{1,100,1000}``: APGD with the sign vs quantized gradients;
* ``old_*``: the previous evaluations (PGD/PQGD/BLOB_QG), and ``monitor_*``: candidate defaults of
  the training callback, with their gradient cost as a share of one epoch of the main job.

Each row is stored as its own JSON file under ``OUT/evaluation_strength/<model>/`` as soon as it is
done, so a killed run resumes with the rows it has not finished, and several processes can work
on different ``--rows`` at once; ``--report`` prints the table from what is stored.

    python -m benchmarks.evaluation_strength --ckpt checkpoints/mnist-.../last.ckpt --name madry
    python -m benchmarks.evaluation_strength --tiny --name tiny          # trains the TinyCNN first
    python -m benchmarks.evaluation_strength --ckpt ... --name madry --reference autoattack --rows ours_standard autoattack
    python -m benchmarks.evaluation_strength --ckpt ... --name madry_5000 --first 5000 --suite apgd_ce apgd_t --seed 1 --reference autoattack --rows ours_standard autoattack
    python -m benchmarks.evaluation_strength --name madry --report
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.common import (
    EPS,
    add_common_args,
    dataset_tensors,
    environment,
    fail,
    format_table,
    mnist_datamodule,
    setup_threads,
    write_json,
)
from qgtrain.attacks import Attack, attack_for_budget
from qgtrain.checkpoints import CheckpointError, atomic_torch_save, load_model_from_checkpoint
from qgtrain.evaluation import TensorBatches
from qgtrain.evaluation.protocol import evaluate_suite
from qgtrain.evaluation.runner import StandardSettings

MAIN_JOB_EPOCH_GRADIENTS = 55_000 * 11
"""One epoch of the main job: 55k images x (10 PQGD gradients + 1 training backward)."""


def suite_rows(suite: list[str] | None = None) -> dict[str, Callable[[], list[Attack]]]:
    """Every row but torchattacks', as a sequence of qgtrain attacks run with early exit;
    ``suite``: the attacks of ``ours_standard`` (default: AutoAttack's four)."""
    settings = StandardSettings(eps=EPS) if suite is None else StandardSettings(eps=EPS, suite_attacks=suite)
    rows: dict[str, Callable[[], list[Attack]]] = {
        "ours_standard": settings.suite,
        "ours_standard_steps10": lambda: StandardSettings(eps=EPS, steps=10).suite(),
    }
    for b in (1, 100, 1000):
        rows[f"apgd_ce_b{b}"] = lambda b=b: [attack_for_budget("apgd_ce", EPS, 100, b=b)]
        rows[f"apgd_t_b{b}"] = lambda b=b: [attack_for_budget("apgd_t", EPS, 100, b=b)]
    rows["old_monitor_blobqg20_pgd20"] = lambda: [
        attack_for_budget("blob_qg", EPS, 20),
        attack_for_budget("pgd", EPS, 20),
    ]
    rows["old_ensemble_100x5"] = lambda: [
        attack_for_budget("pgd", EPS, 100, restarts=5),
        attack_for_budget("pqgd", EPS, 100, alpha=0.01, restarts=5),
        attack_for_budget("blob_qg", EPS, 100, alpha=0.01, restarts=5),
    ]
    for steps, targets in ((20, 1), (20, 2), (20, 3), (20, 9), (15, 3), (10, 3)):
        rows[f"monitor_blobqg20_apgdt{steps}x{targets}"] = lambda k=steps, t=targets: [
            attack_for_budget("blob_qg", EPS, 20),
            attack_for_budget("apgd_t", EPS, k, targets=t),
        ]
    rows["monitor_blobqg20_apgdce20_apgdt20x3"] = lambda: [
        attack_for_budget("blob_qg", EPS, 20),
        attack_for_budget("apgd_ce", EPS, 20),
        attack_for_budget("apgd_t", EPS, 20, targets=3),
    ]
    return rows


def run_suite(
    model: nn.Module, attacks: list[Attack], x: torch.Tensor, y: torch.Tensor, batch: int, seed: int = 0
) -> dict:
    start = time.perf_counter()
    outcome = evaluate_suite(model, attacks, TensorBatches(x, y, batch), seed=seed)
    seconds = time.perf_counter() - start
    gradients = sum(c.gradients for c in outcome.costs)
    naive = sum(c.naive_gradients for c in outcome.costs)
    return {
        "clean": 100 * outcome.clean.float().mean().item(),
        "robust": 100 * outcome.robust.float().mean().item(),
        "seconds": seconds,
        "gradients": gradients,
        "naive_gradients": naive,
        "forwards": sum(c.forwards for c in outcome.costs),
        "epoch_share": gradients / MAIN_JOB_EPOCH_GRADIENTS,
        "breakdown": dict(zip(outcome.labels, outcome.fooled_counts(), strict=True)),
        "robust_after": {
            label: 100 * after.float().mean().item()
            for label, after in zip(outcome.labels, outcome.after, strict=True)
        },
        "attack_seconds": {
            label: cost.seconds for label, cost in zip(outcome.labels, outcome.costs, strict=True)
        },
        "attacks": [a.config() for a in attacks],
        "robust_vector": outcome.robust.int().tolist(),
    }


def torchattacks_reference(model: nn.Module, steps: int | None) -> Any:
    """``torchattacks.AutoAttack(version="standard")`` as shipped (its APGD, APGD-T and FAB-T take
    torchattacks' default of 10 steps), or (``steps``) the same four attacks with Croce & Hein's budget."""
    try:
        import torchattacks
    except ImportError:
        fail("torchattacks is needed for the reference rows: pip install -e '.[bench]'")
    if steps is None:
        return torchattacks.AutoAttack(model, norm="Linf", eps=EPS, version="standard", n_classes=10, seed=0)
    return torchattacks.MultiAttack(
        [
            torchattacks.APGD(model, eps=EPS, steps=steps, loss="ce", n_restarts=1, seed=0),
            torchattacks.APGDT(model, eps=EPS, steps=steps, n_classes=10, n_restarts=1, seed=0),
            torchattacks.FAB(
                model, eps=EPS, steps=steps, multi_targeted=True, n_classes=10, n_restarts=1, seed=0
            ),
            torchattacks.Square(model, eps=EPS, n_queries=5000, n_restarts=1, seed=0),
        ]
    )


def run_torchattacks(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int, steps: int | None
) -> dict:
    model.eval()
    start = time.perf_counter()
    correct = []
    attack = torchattacks_reference(model, steps)
    for i in range(0, len(y), batch):
        xb, yb = x[i : i + batch], y[i : i + batch]
        adv = attack(xb, yb)
        with torch.no_grad():
            correct.append((model(xb).argmax(1) == yb) & (model(adv).argmax(1) == yb))
    seconds = time.perf_counter() - start
    robust = torch.cat(correct)
    with torch.no_grad():
        clean = torch.cat(
            [model(x[i : i + batch]).argmax(1) == y[i : i + batch] for i in range(0, len(y), batch)]
        )
    return {
        "clean": 100 * clean.float().mean().item(),
        "robust": 100 * robust.float().mean().item(),
        "seconds": seconds,
        "gradients": None,
        "naive_gradients": None,
        "robust_vector": robust.int().tolist(),
    }


AUTOATTACK_ORDER = ("apgd-ce", "apgd-t", "fab-t", "square")
"""The original AutoAttack's standard version, in its order."""
AUTOATTACK_ORDER_OURS = ("apgd_ce", "apgd_t", "fab_t", "square")
"""Our names of the same four attacks (``--suite``), in the same order."""


def original_autoattack() -> Any:
    """The ``autoattack`` package (fra31/auto-attack), or None when it is not installed here."""
    try:
        import autoattack
    except ImportError:
        return None
    return autoattack


def run_original_autoattack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    batch: int,
    seed: int = 0,
    order: tuple[str, ...] = AUTOATTACK_ORDER,
) -> dict:
    """The original AutoAttack, standard version, batch ``batch``: each attack of ``order`` in turn on
    the examples still robust (what ``run_standard_evaluation`` does in one call: the same batches,
    the same seed per attack), so the robust accuracy after each attack and its time are recorded."""
    autoattack = original_autoattack()
    model.eval()
    adversary = autoattack.AutoAttack(
        model, norm="Linf", eps=EPS, version="standard", seed=seed, device=str(x.device), verbose=False
    )
    start = time.perf_counter()
    with torch.no_grad():
        clean = torch.cat(
            [model(x[i : i + batch]).argmax(1) == y[i : i + batch] for i in range(0, len(y), batch)]
        )
    robust = clean.clone()
    robust_after, attack_seconds, breakdown = {}, {}, {}
    for name in order:
        index = robust.nonzero().squeeze(1)
        attack_start = time.perf_counter()
        if index.numel():
            adversary.attacks_to_run = [name]
            adversary.version = "custom"
            x_adv = adversary.run_standard_evaluation(x[index], y[index], bs=batch)
            with torch.no_grad():
                fooled = torch.cat(
                    [
                        model(x_adv[i : i + batch]).argmax(1) != y[index][i : i + batch]
                        for i in range(0, len(index), batch)
                    ]
                )
            robust[index[fooled]] = False
            breakdown[name] = int(fooled.sum())
        attack_seconds[name] = time.perf_counter() - attack_start
        robust_after[name] = 100 * robust.float().mean().item()
    return {
        "clean": 100 * clean.float().mean().item(),
        "robust": 100 * robust.float().mean().item(),
        "seconds": time.perf_counter() - start,
        "gradients": None,
        "naive_gradients": None,
        "breakdown": breakdown,
        "robust_after": robust_after,
        "attack_seconds": attack_seconds,
        "reference": f"autoattack {getattr(autoattack, '__version__', '(fra31/auto-attack)')}, version standard, "
        f"seed {seed}, attacks {','.join(order)}",
        "robust_vector": robust.int().tolist(),
    }


def train_tiny(data_dir: str | None, seed: int) -> nn.Module:
    """The TinyCNN of cheap_training.py's budget: width 16, PGD-10 training on 10k images, 3 epochs."""
    from qgtrain.models import TinyCNN
    from qgtrain.training import AdversarialTraining, quiet_trainer

    torch.manual_seed(seed)
    dm = mnist_datamodule(data_dir, 10_000, 1000, 100, seed)
    net = TinyCNN(dataset="mnist", width=16)
    inner = attack_for_budget("pgd", EPS, 10)
    module = AdversarialTraining(net, inner=inner, eps_warmup_epochs=1.0, seed=seed)
    trainer = quiet_trainer(max_epochs=3, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    return net.eval()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_args(parser)
    parser.add_argument("--ckpt", help="the model to evaluate (a train.py checkpoint)")
    parser.add_argument(
        "--tiny", action="store_true", help="train (or reuse) the TinyCNN of cheap_training's budget"
    )
    parser.add_argument("--name", required=True, help="the model's name in the output folder")
    parser.add_argument("--n", type=int, default=1000, help="N MNIST test images (default 1000)")
    parser.add_argument(
        "--first", type=int, default=0, help="index of the first test image (default 0; e.g. 5000: held-out images)"
    )
    parser.add_argument(
        "--suite",
        nargs="+",
        choices=AUTOATTACK_ORDER_OURS,
        default=None,
        help="the attacks of ours_standard and the original's row, in AutoAttack's order (default: all four)",
    )
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--rows", nargs="*", default=None, help="rows to run (default: all not yet stored)")
    parser.add_argument("--report", action="store_true", help="only print the table of the stored rows")
    parser.add_argument(
        "--reference",
        choices=["torchattacks", "autoattack"],
        default="torchattacks",
        help="what vs_AA compares with: torchattacks' AutoAttack (default) or the original AutoAttack "
        "(fra31/auto-attack, when importable)",
    )
    args = parser.parse_args()
    setup_threads(args.threads)
    folder = Path(args.out) / "evaluation_strength" / args.name
    folder.mkdir(parents=True, exist_ok=True)
    reference = "autoattack" if args.reference == "autoattack" else "torchattacks_aa"
    if reference == "autoattack" and original_autoattack() is None:
        print(
            "--reference autoattack: the original AutoAttack is not importable here (pip install --no-deps "
            "a copy of fra31/auto-attack into this environment); its rows are skipped",
            flush=True,
        )
        reference = "torchattacks_aa"
    every = [
        "ours_standard",
        *(["autoattack"] if reference == "autoattack" else []),
        "torchattacks_aa",
        *[r for r in suite_rows() if r != "ours_standard"],
        "torchattacks_aa100",
    ]
    if not args.report:
        model = load(args, folder)
        dm = mnist_datamodule(args.data_dir, 1000, 1000, 100, args.seed)
        x, y = dataset_tensors(dm.test_set, args.first + args.n)
        x, y = x[args.first :], y[args.first :]
        suite = None if args.suite is None else [a for a in AUTOATTACK_ORDER_OURS if a in args.suite]
        original_order = tuple(AUTOATTACK_ORDER[AUTOATTACK_ORDER_OURS.index(a)] for a in suite or AUTOATTACK_ORDER_OURS)
        for row in args.rows or every:
            path = folder / f"{row}.json"
            if path.exists():
                continue
            if row == "autoattack":
                result = run_original_autoattack(model, x, y, args.batch_size, args.seed, original_order)
            elif row in ("torchattacks_aa", "torchattacks_aa100"):
                steps = 100 if row.endswith("100") else None
                result = run_torchattacks(model, x, y, args.batch_size, steps)
            elif row in suite_rows():
                result = run_suite(model, suite_rows(suite)[row](), x, y, args.batch_size, args.seed)
            else:
                fail(f"unknown row {row!r}; choose from {', '.join(every)}")
            result.update(row=row, n=args.n, first=args.first, seed=args.seed, environment=environment(args.threads))
            write_json(path, result)
            print(f"{row}: robust {result['robust']:.2f}% in {result['seconds']:.0f} s", flush=True)
    report(folder, every, reference)


def load(args: argparse.Namespace, folder: Path) -> nn.Module:
    """The checkpoint's network, through the loader evaluate.py uses (``--tiny``: a plain state dict
    of :func:`train_tiny`'s TinyCNN, trained once and kept in ``folder``)."""
    architecture: tuple[str | None, str | None, dict[str, Any]] = (None, None, {})
    if args.tiny:
        path = folder / "tiny_cnn_pgd10.pt"
        if not path.exists():
            atomic_torch_save(train_tiny(args.data_dir, args.seed).state_dict(), path)
        args.ckpt, architecture = str(path), ("tiny_cnn", "mnist", {"width": 16})
    if args.ckpt is None:
        fail("pass --ckpt PATH or --tiny")
    try:
        model, _ = load_model_from_checkpoint(Path(args.ckpt), *architecture)
    except CheckpointError as exc:
        fail(str(exc).splitlines()[0])
    return model.eval()


def report(folder: Path, order: list[str], reference_row: str = "torchattacks_aa") -> None:
    """The rows' table against ``reference_row``, then (when stored) the original AutoAttack's
    per-attack breakdown beside ours: robust accuracy left after each attack and its time."""
    rows: list[dict[str, Any]] = []
    stored = {p.stem: json.loads(p.read_text()) for p in folder.glob("*.json")}
    reference = stored.get(reference_row)
    for name in order:
        if name not in stored:
            continue
        r = stored[name]
        row = {
            "row": name,
            "clean": r["clean"],
            "robust": r["robust"],
            "seconds": r["seconds"],
            "gradients": r.get("gradients"),
            "naive": r.get("naive_gradients"),
            "epoch_share_%": None if r.get("epoch_share") is None else 100 * r["epoch_share"],
        }
        if reference is not None:
            row["vs_AA"] = r["robust"] - reference["robust"]
            row["time_vs_AA"] = r["seconds"] / reference["seconds"]
        rows.append(row)
    columns = [
        "row",
        "clean",
        "robust",
        "vs_AA",
        "seconds",
        "time_vs_AA",
        "gradients",
        "naive",
        "epoch_share_%",
    ]
    title = f"evaluation strength: {folder.name} (accuracy %, eps {EPS}; vs_AA: against {reference_row})"
    print(format_table(rows, columns, title=title))
    breakdown = []
    ours, original = stored.get("ours_standard", {}), stored.get("autoattack", {})
    ours_after = list(ours.get("robust_after", {}).items())
    original_after = list(original.get("robust_after", {}).items())
    for k in range(max(len(ours_after), len(original_after))):
        line: dict[str, Any] = {"step": k + 1}
        if k < len(ours_after):
            label = ours_after[k][0]
            line |= {"ours": label, "ours_after": ours_after[k][1], "ours_s": ours["attack_seconds"][label]}
        if k < len(original_after):
            name = original_after[k][0]
            line |= {
                "original": name,
                "original_after": original_after[k][1],
                "original_s": original["attack_seconds"][name],
            }
        breakdown.append(line)
    if breakdown:
        columns = ["step", "ours", "ours_after", "ours_s", "original", "original_after", "original_s"]
        print(
            format_table(breakdown, columns, title="robust accuracy (%) after each attack, and its seconds")
        )
    if "robust_vector" in ours and "robust_vector" in original:
        mine, theirs = torch.tensor(ours["robust_vector"]).bool(), torch.tensor(original["robust_vector"]).bool()
        print(
            f"per example: robust for ours only {int((mine & ~theirs).sum())}, "
            f"for the original only {int((theirs & ~mine).sum())} (of {len(mine)})"
        )
    write_json(folder.parent / f"{folder.name}_summary.json", {"rows": rows, "breakdown": breakdown})


if __name__ == "__main__":
    main()
