"""How long does our suite take beside the original AutoAttack, on the same images and model?

The two run alternately in one process (``--rounds`` rounds, each variant once per round, in the same
order), so a change in the machine's load falls on both; the median time of each variant and its
ratio to the original at each batch size are reported, with each run's robust accuracy (the answers
must agree for the times to compare). Variants: the original AutoAttack (``fra31/auto-attack``,
installed by hand, never a dependency) and our ``standard`` suite through ``evaluate.py``'s engine,
each at every ``--batch-sizes`` value. Beside them, the arithmetic floor: the model's FLOPs per
example-gradient (forward and input-gradient, counted by ``torch.utils.flop_counter``), the device's
dense matrix-multiply rate (on CPU at the same threads), and, for APGD-CE alone, the seconds its steps on
every image would take at that rate. The result goes to ``OUT/suite_speed/<name>.json``.

    python -m benchmarks.suite_speed --ckpt checkpoints/run/best.ckpt --name main10_s0_e6 --first 5000 --n 500 --suite apgd_ce
    python -m benchmarks.suite_speed --ckpt checkpoints/run/best.ckpt --name main10_s0_e6_gpu --n 1000 --device cuda  # on a GPU machine
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import (
    add_common_args,
    dataset_tensors,
    environment,
    fail,
    mnist_datamodule,
    setup_threads,
    write_json,
)
from benchmarks.evaluation_strength import (
    AUTOATTACK_ORDER,
    AUTOATTACK_ORDER_OURS,
    load,
    original_autoattack,
    run_original_autoattack,
    run_suite,
    suite_rows,
)
from qgtrain.evaluation.runner import StandardSettings

PEAK_SIDE = 1024
"""The side of the square matrices whose product measures the CPU's dense matrix-multiply rate."""


def flop_per_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """FLOPs of one example's loss gradient w.r.t. its input: the forward and the input-gradient
    backward, weight gradients not computed (as in both codes' attacks)."""
    frozen = copy.deepcopy(model).eval().requires_grad_(False)
    inputs = x[:8].clone().requires_grad_(True)
    with FlopCounterMode(display=False) as counter:
        nn.functional.cross_entropy(frozen(inputs), y[:8], reduction="sum").backward()
    return counter.get_total_flops() / len(inputs)


def matmul_rate(device: torch.device, repeats: int = 10) -> float:
    """FLOP/s of a :data:`PEAK_SIDE`-square float32 ``torch.mm`` on ``device`` (on CPU at torch's
    threads), the median."""
    a, b = (torch.randn(PEAK_SIDE, PEAK_SIDE, device=device) for _ in range(2))
    times = []
    for _ in range(repeats + 2):
        start = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * PEAK_SIDE**3 / statistics.median(times[2:])


def arithmetic_floor(model: nn.Module, x: torch.Tensor, y: torch.Tensor, suite: list[str]) -> dict[str, Any]:
    """The model's FLOPs per gradient, the matrix-multiply rate, and (APGD-CE alone) the seconds of
    ``len(x)`` × its steps gradients at that rate: no code doing the same arithmetic runs faster."""
    flop, rate = flop_per_gradient(model, x, y), matmul_rate(x.device)
    steps = StandardSettings().steps
    return {
        "mflop_per_gradient": flop / 1e6,
        "matmul_gflops": rate / 1e9,
        "ms_per_gradient_at_matmul_rate": flop / rate * 1e3,
        "apgd_ce_seconds_at_matmul_rate": len(x) * steps * flop / rate if suite == ["apgd_ce"] else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_args(parser)
    parser.add_argument("--ckpt", required=True, help="the model (a train.py checkpoint)")
    parser.add_argument("--name", required=True, help="the result's name: OUT/suite_speed/<name>.json")
    parser.add_argument("--first", type=int, default=0, help="index of the first MNIST test image")
    parser.add_argument("--n", type=int, default=500, help="test images (default 500)")
    parser.add_argument(
        "--suite", nargs="+", choices=AUTOATTACK_ORDER_OURS, default=["apgd_ce"], help="attacks, both sides"
    )
    parser.add_argument(
        "--batch-sizes", nargs="+", type=int, default=[250, 100], help="default: 250 (the original's) and 100"
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="alternating rounds (default 3; the median is reported)"
    )
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N: both codes run there")
    parser.set_defaults(tiny=False)  # evaluation_strength.load's --tiny, not offered here
    args = parser.parse_args()
    setup_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {args.device}: CUDA is not available here")
    if original_autoattack() is None:
        fail(
            "the original AutoAttack is not importable here: pip install --no-deps a copy of fra31/auto-attack"
        )
    model = load(args, Path(args.out))
    x, y = dataset_tensors(
        mnist_datamodule(args.data_dir, 1000, 1000, 100, args.seed).test_set, args.first + args.n
    )
    model, x, y = model.to(device), x[args.first :].to(device), y[args.first :].to(device)
    suite = [a for a in AUTOATTACK_ORDER_OURS if a in args.suite]
    order = tuple(AUTOATTACK_ORDER[AUTOATTACK_ORDER_OURS.index(a)] for a in suite)
    variants = {}
    for batch in args.batch_sizes:
        variants[f"original_b{batch}"] = lambda b=batch: run_original_autoattack(
            model, x, y, b, args.seed, order
        )
        variants[f"ours_b{batch}"] = lambda b=batch: run_suite(
            model, suite_rows(suite)["ours_standard"](), x, y, b, args.seed
        )
    floor = arithmetic_floor(model, x, y, suite)
    print(
        f"arithmetic: {floor['mflop_per_gradient']:.1f} MFLOP per example-gradient; torch.mm at "
        f"{floor['matmul_gflops']:.1f} GFLOP/s; {floor['ms_per_gradient_at_matmul_rate']:.3f} ms per gradient at that rate",
        flush=True,
    )
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    robust: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(args.rounds):
        for name, run in variants.items():
            result = run()
            seconds[name].append(result["seconds"])
            robust[name].append(result["robust"])
            print(
                f"round {round_}: {name} {result['seconds']:.1f} s, robust {result['robust']:.2f} %",
                flush=True,
            )
    median = {name: statistics.median(times) for name, times in seconds.items()}
    rows = {
        name: {
            "median_seconds": median[name],
            "vs_original_same_batch": median[name] / median[f"original_b{name.rsplit('_b', 1)[1]}"],
            "vs_original_b250": median[name] / median["original_b250"] if "original_b250" in median else None,
            "seconds": seconds[name],
            "robust": robust[name],
        }
        for name in variants
    }
    for name, row in rows.items():
        print(
            f"{name}: {row['median_seconds']:.1f} s, {row['vs_original_same_batch']:.3f}x the original at the same batch"
        )
    if floor["apgd_ce_seconds_at_matmul_rate"] is not None:
        print(f"APGD-CE's gradients at the matmul rate: {floor['apgd_ce_seconds_at_matmul_rate']:.1f} s")
    payload = {
        "ckpt": args.ckpt,
        "first": args.first,
        "n": args.n,
        "suite": suite,
        "rows": rows,
        "arithmetic_floor": floor,
        "environment": environment(args.threads),
    }
    write_json(Path(args.out) / "suite_speed" / f"{args.name}.json", payload)


if __name__ == "__main__":
    main()
