"""Attack strength on a robust MNIST model: PGD vs PQGD vs RGD, DAA-BLOB vs BLOB_QG (paper Fig. 4, Table 2).

Accuracy (%, lower = sharper attack) of one adversarially trained model under

* PGD and PQGD with b in {100, 200, 500, 1000} at steps in {10, 20, 40, 100}, all with the
  paper's alpha (0.01 at eps 0.3), plus PGD with the usual tuned step alpha = 2.5 eps / steps;
* RGD (raw gradient steps on an unclipped hidden perturbation, Yang et al. 2023) from the clean input,
  with the authors' step per example (``RGD.default_alpha``) or ``--rgd-alpha``;
* DAA-BLOB and BLOB_QG (b = 100) at the same steps (batch size recorded: BLOB couples a batch);
* PGD-100 with several random restarts, the usual strong baseline.

An example counts as robust when it is correct clean and on the attack's output
(``qgtrain.evaluation.adversarial_correct``); every attack sees the same examples and seed.
The paper's numbers (Madry et al.'s secret MNIST model) are printed beside ours where known;
'—' where we do not have them. Our model is not theirs: compare the *gaps*, not the levels.

    python -m benchmarks.attack_strength                       # the PGD-40 model of cheap_training.py
    python -m benchmarks.attack_strength --ckpt path.ckpt --eval-size 10000 --full
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from benchmarks.common import (
    DEFAULT_OUT,
    EPS,
    add_common_args,
    batches,
    dataset_tensors,
    environment,
    fail,
    format_table,
    mnist_datamodule,
    setup_threads,
    write_json,
)
from qgtrain.attacks import RGD, Attack, attack_for_budget
from qgtrain.checkpoints import CheckpointError, load_model_from_checkpoint
from qgtrain.evaluation import adversarial_correct, clean_correct

# The PGD-40 reference of `benchmarks/cheap_training.py` (CPU budget, seed 0).
DEFAULT_CKPT = DEFAULT_OUT / "cheap_training" / "cpu" / "runs" / "pgd40_s0.ckpt"
# Liu & Tsang, MNIST, Madry et al.'s secret model, eps = 0.3: accuracy (%) under 20-step attacks.
PAPER = {("pgd", 20): 94.26, ("pqgd", 20): 88.89}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--ckpt", default=str(DEFAULT_CKPT), help="checkpoint or state dict (default: PGD-40 model)"
    )
    parser.add_argument("--model", default=None, help="network name, needed for a plain state dict")
    parser.add_argument(
        "--eval-size", type=int, default=500, help="the first N MNIST test images (default 500)"
    )
    parser.add_argument("--batch-size", type=int, default=100, help="attack batch (BLOB's particle count)")
    parser.add_argument("--steps-list", nargs="+", type=int, default=[10, 20, 40, 100])
    parser.add_argument("--b-list", nargs="+", type=int, default=[100, 200, 500, 1000])
    parser.add_argument("--alpha", type=float, default=0.01, help="step of PGD/PQGD/BLOB (paper: 0.01)")
    parser.add_argument(
        "--restarts", type=int, default=5, help="random restarts of the PGD-100 baseline (0: skip it)"
    )
    parser.add_argument(
        "--tuned", action="store_true", help="also PQGD and the BLOBs with alpha = 2.5 eps / steps"
    )
    parser.add_argument(
        "--tuned-only", action="store_true", help="only the alpha = 2.5 eps / steps rows (a supplement)"
    )
    parser.add_argument(
        "--rgd-alpha", type=float, default=None, help="RGD's step (default: the class's, the authors' step)"
    )
    parser.add_argument("--tag", default="attack_strength", help="output file stem under --out")
    parser.add_argument("--skip-blob", action="store_true", help="only the PGD/PQGD comparison")
    parser.add_argument("--full", action="store_true", help="GPU budget: all 10000 test images, 10 restarts")
    add_common_args(parser)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    setup_threads(args.threads)
    if args.full:
        args.eval_size = 10_000
        args.restarts = max(args.restarts, 10)
    if args.eval_size < 1 or args.batch_size < 1 or args.restarts < 0 or any(s < 1 for s in args.steps_list):
        fail("--eval-size, --batch-size and --steps-list values must be >= 1, --restarts >= 0")
    if any(b < 1 for b in args.b_list):
        fail("--b-list values must be >= 1")
    if args.rgd_alpha is not None and not args.rgd_alpha > 0:
        fail(f"--rgd-alpha must be > 0, got {args.rgd_alpha}")
    try:
        model, info = load_model_from_checkpoint(args.ckpt, model=args.model)
    except CheckpointError as exc:
        fail(f"{exc} (train it with `python -m benchmarks.cheap_training --runs pgd40` or pass --ckpt)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device).eval()
    dm = mnist_datamodule(args.data_dir, None, 0, 100, args.seed)
    x, y = dataset_tensors(dm.test_set, args.eval_size)
    data = [(xb.to(device), yb.to(device)) for xb, yb in batches(x, y, args.batch_size)]
    clean = 100.0 * clean_correct(model, data).float().mean().item()
    print(
        f"model {info.model} {info.model_kwargs} from {args.ckpt}; clean accuracy {clean:.2f}% on {x.shape[0]}"
    )

    def accuracy(attack: Attack) -> tuple[float, float]:
        start = time.perf_counter()
        correct = adversarial_correct(model, attack, data, seed=args.seed)
        return 100.0 * correct.float().mean().item(), time.perf_counter() - start

    configs: list[tuple[str, str, dict[str, Any]]] = [("PGD a=2.5eps/k", "pgd", {})]
    if not args.tuned_only:
        configs.insert(0, ("PGD", "pgd", {"alpha": args.alpha}))
        configs += [(f"PQGD b={b}", "pqgd", {"alpha": args.alpha, "b": b}) for b in args.b_list]
        rgd_alpha = RGD.default_alpha(EPS, 1) if args.rgd_alpha is None else args.rgd_alpha  # any steps
        configs.append((f"RGD a={rgd_alpha:.4g}", "rgd", {"alpha": rgd_alpha}))
    if args.tuned or args.tuned_only:
        configs += [(f"PQGD b={b} a=2.5eps/k", "pqgd", {"b": b}) for b in args.b_list]
    if not args.skip_blob:
        if not args.tuned_only:
            configs += [
                ("DAA-BLOB", "blob", {"alpha": args.alpha}),
                ("BLOB_QG b=100", "blob_qg", {"alpha": args.alpha, "b": 100}),
            ]
        if args.tuned or args.tuned_only:
            configs += [
                ("DAA-BLOB a=2.5eps/k", "blob", {}),
                ("BLOB_QG b=100 a=2.5eps/k", "blob_qg", {"b": 100}),
            ]
    rows: list[dict[str, Any]] = []
    seconds: dict[str, float] = {}
    for label, name, kwargs in configs:
        row: dict[str, Any] = {"attack": label}
        for steps in args.steps_list:
            attack = attack_for_budget(name, EPS, steps, alpha=kwargs.get("alpha"), b=kwargs.get("b"))
            acc, sec = accuracy(attack)
            row[f"{steps} steps"] = acc
            seconds[f"{label}/{steps}"] = sec
            print(f"[{time.strftime('%H:%M:%S')}] {label} {steps} steps: {acc:.2f}% ({sec:.0f}s)", flush=True)
        family = "pqgd" if name == "pqgd" and kwargs.get("b") == 100 else name
        paper = PAPER.get((family, 20)) if label in ("PGD", "PQGD b=100") else None
        row["paper @20 steps"] = paper
        rows.append(row)
    restart_label = f"PGD-100 x{args.restarts} restarts a=0.0075"
    acc = None
    if args.restarts > 0:
        restarts = attack_for_budget("pgd", EPS, 100, restarts=args.restarts)
        acc, sec = accuracy(restarts)
        seconds[restart_label] = sec
        print(f"[{time.strftime('%H:%M:%S')}] {restart_label}: {acc:.2f}% ({sec:.0f}s)", flush=True)

    columns = ["attack", *[f"{s} steps" for s in args.steps_list], "paper @20 steps"]
    title = (
        f"attack strength: accuracy (%) of {info.model} ({args.ckpt}), first {x.shape[0]} MNIST test images, "
        f"eps={EPS}, alpha={args.alpha} unless stated, batch {args.batch_size}, seed {args.seed}; clean {clean:.2f}%; "
        "paper = Liu & Tsang on Madry's secret model (PGD-20 vs PQGD b=100, 20 steps)"
    )
    table = format_table(rows, columns, title)
    if acc is not None:
        table += f"\n{restart_label}: {acc:.2f}"
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.tag}.json"
    write_json(
        path,
        {
            "env": environment(args.threads),
            "checkpoint": info.to_dict(),
            "clean": clean,
            "rows": rows,
            "pgd100_restarts": {"restarts": args.restarts, "accuracy": acc},
            "seconds": seconds,
            "table": table,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
