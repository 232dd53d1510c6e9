"""qgtrain's FAB-T (``fab_t``) against the original AutoAttack's FAB-T on the same examples.

Both with AutoAttack's standard settings (L-inf, 9 targets, 100 iterations, alpha_max 0.1, eta 1.05,
beta 0.9, one run per target from the clean input), on the first N MNIST test images, either on every
example classified correctly (``--on clean``) or, as in AutoAttack's suite, only on those APGD-CE and
APGD-T leave robust (``--on suite``, ours computed once and given to both). Reports robust accuracy,
per-example disagreements, wall time and input-gradient evaluations (the original's counted by a
wrapper around the network: rows through a forward pass with gradients enabled).
The original is a measuring instrument only (``pip install --no-deps <copy of fra31/auto-attack>``).

    python -m benchmarks.fab_t_vs_original --tiny --n 200 --threads 1
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks.common import (
    EPS,
    add_common_args,
    dataset_tensors,
    environment,
    fail,
    mnist_datamodule,
    setup_threads,
    write_json,
)
from qgtrain.attacks import FABT, attack_for_budget
from qgtrain.evaluation.protocol import attack_batch


class CountingNet(nn.Module):
    """The network, counting example rows through forward passes with and without gradients."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.gradient_rows = 0
        self.forward_rows = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            self.gradient_rows += x.shape[0]
        else:
            self.forward_rows += x.shape[0]
        return self.net(x)


def load(args: argparse.Namespace, folder: Path) -> nn.Module:
    """``--ckpt``, or ``--tiny``: evaluation_strength's network loader (its TinyCNN trained once), with
    the parameters frozen."""
    from benchmarks.evaluation_strength import load as load_network

    return load_network(args, folder).requires_grad_(
        False
    )  # the original backpropagates into parameters otherwise


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_args(parser)
    parser.add_argument("--ckpt", help="a train.py checkpoint")
    parser.add_argument("--tiny", action="store_true", help="train (or reuse) evaluation_strength's TinyCNN")
    parser.add_argument("--n", type=int, default=200, help="the first N MNIST test images")
    parser.add_argument("--on", choices=["clean", "suite"], default="clean", help="which examples FAB-T sees")
    parser.add_argument("--name", default="tiny", help="output subfolder")
    args = parser.parse_args()
    setup_threads(args.threads)
    try:
        from autoattack.fab_pt import FABAttack_PT
    except ImportError:
        fail("the original AutoAttack is not importable: pip install --no-deps <copy of fra31/auto-attack>")
    folder = Path(args.out) / "fab_t" / args.name
    folder.mkdir(parents=True, exist_ok=True)
    model = load(args, folder)
    dm = mnist_datamodule(args.data_dir, 1000, 1000, 100, args.seed)
    x, y = dataset_tensors(dm.test_set, args.n)
    with torch.no_grad():
        attacked = model(x).argmax(1) == y
    if args.on == "suite":
        suite = [attack_for_budget("apgd_ce", EPS, 100), attack_for_budget("apgd_t", EPS, 100)]
        attacked = attack_batch(model, suite, x, y, stream_seed=args.seed).robust
    index = attacked.nonzero().squeeze(1)

    start = time.perf_counter()
    torch.manual_seed(args.seed)
    ours = FABT(eps=EPS).perturb(model, x, y, early_exit=True, active=attacked)
    ours_seconds = time.perf_counter() - start
    with torch.no_grad():
        ours_robust = attacked & (model(ours.x_adv).argmax(1) == y)
    assert (ours.x_adv - x).abs().max() <= EPS + 1e-6

    counting = CountingNet(model)
    original = FABAttack_PT(
        counting, norm="Linf", n_restarts=1, n_iter=100, eps=EPS, alpha_max=0.1, eta=1.05, beta=0.9,
        seed=args.seed, targeted=True, n_target_classes=9, device=str(x.device),
    )  # fmt: skip
    start = time.perf_counter()
    adv = original.perturb(x[index], y[index])
    original_seconds = time.perf_counter() - start
    original_robust = attacked.clone()
    with torch.no_grad():
        fooled = (model(adv).argmax(1) != y[index]) & ((adv - x[index]).flatten(1).abs().amax(1) <= EPS)
    original_robust[index[fooled]] = False

    n = len(y)
    result = {
        "n": n,
        "eps": EPS,
        "on": args.on,
        "attacked": int(attacked.sum()),
        "ours": {
            "robust_%": 100 * float(ours_robust.float().mean()),
            "seconds": ours_seconds,
            "gradients": ours.gradients,
            "forwards": ours.forwards,
            "naive_gradients": int(attacked.sum()) * FABT(eps=EPS).gradients_per_example,
        },
        "original": {
            "robust_%": 100 * float(original_robust.float().mean()),
            "seconds": original_seconds,
            "gradients": counting.gradient_rows,
            "forwards": counting.forward_rows,
        },
        "disagreements": int((ours_robust != original_robust).sum()),
        "robust_only_in_ours": int((ours_robust & ~original_robust).sum()),
        "environment": environment(args.threads),
    }
    write_json(folder / f"{args.on}_n{n}.json", result)
    for who in ("ours", "original"):
        r = result[who]
        print(
            f"{who:>8}: robust {r['robust_%']:.1f}% of {n} ({result['attacked']} attacked), "
            f"{r['seconds']:.0f} s, {r['gradients']} gradients, {r['forwards']} forward rows"
        )
    print(f"disagreements {result['disagreements']} (robust only in ours: {result['robust_only_in_ours']})")


if __name__ == "__main__":
    main()
