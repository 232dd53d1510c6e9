"""Per-step cost of the attacks on MadryMNIST, and our PGD against torchattacks.PGD.

Timing: an *untrained* MadryMNIST in eval mode (the cost of a step does not depend on the weights),
one batch (real MNIST test images when the data is found, else uniform noise), eps 0.3,
alpha 0.01. After a warm-up round, ``--repeats`` rounds run every attack once each, interleaved
(the order rotates every round), so drifts of a shared machine hit all attacks alike. Reported:
the median per-step time of each attack and, per ratio, the median of the per-round paired
ratios. Targets: PQGD / PGD <= 1.05 (quantization is a few element-wise ops per step) and
ours / torchattacks.PGD <= 0.8.

Memory layout: the library attacks run on the network in ``--memory-format`` (default
``channels_last``, what ``AdversarialTraining(channels_last=True)`` does; the attacks follow the
parameters' layout) and, on CPU, run the stem convolution's backward without oneDNN
(``qgtrain.attacks.cpu_kernels.native_stem_backward``). In the same rounds ``pgd_contiguous`` is the
legacy path (our PGD on the contiguous network, oneDNN everywhere: "before"), ``torchattacks_pgd`` is torchattacks on the contiguous network (its
ordinary use) and ``torchattacks_pgd_same_layout`` torchattacks on our layout (what the layout
alone buys it). Accuracy and per-example agreement are reported for each of them.

Accuracy: the same attacks on a *trained* MadryMNIST (``--ckpt``, else trained here for
``--train-seconds`` on MNIST), first ``--eval-size`` test images, counted by the library's
``adversarial_correct`` (correct clean and adversarially). torchattacks uses a mean-reduced
cross-entropy (same gradient sign) and draws its random start exactly as we do, so under the same
per-batch seed the two PGDs should agree almost example for example.

    python -m benchmarks.attack_speed                          # batch 256, 10 steps, 5 rounds, 1 thread
    python -m benchmarks.attack_speed --steps 20 --repeats 7 --threads 2 --ckpt model.ckpt
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import (
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
from qgtrain.attacks import Attack, build_attack
from qgtrain.checkpoints import CheckpointError, load_model_from_checkpoint
from qgtrain.data import MNISTDataModule, resolve_data_dir
from qgtrain.evaluation import adversarial_correct, clean_correct
from qgtrain.models import MadryMNIST

ALPHA = 0.01
TORCHATTACKS = "torchattacks_pgd"
CONTROL = "pgd_control"
"""A second PGD instance timed like the others: its ratio to ``pgd`` is the noise floor (A/A test)."""
LEGACY = "pgd_contiguous"
"""Our PGD on the contiguous network: the path before channels_last ("before")."""
TORCHATTACKS_SAME_LAYOUT = "torchattacks_pgd_same_layout"
"""torchattacks.PGD on the network in our layout (``--memory-format``)."""
CONTIGUOUS_LABELS = (LEGACY, TORCHATTACKS)
LOOP_STEPS = 100
MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


def TorchattacksPGD(eps: float, alpha: float, steps: int) -> Attack:  # noqa: N802 (a factory)
    """torchattacks.PGD through the library's adapter (``torchattacks.<Class>``), so the one
    evaluation engine counts its accuracy like ours."""
    try:
        import torchattacks  # noqa: F401
    except ImportError:
        fail("torchattacks is not installed: pip install -e '.[bench]'")
    return build_attack(
        "torchattacks.PGD", eps=eps, attack_kwargs={"alpha": alpha, "steps": steps, "random_start": True}
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-size", type=int, default=256, help="attack batch (BLOB's particle count)")
    parser.add_argument("--steps", type=int, default=10, help="attack steps per run")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (after one warm-up round)")
    parser.add_argument("--b", type=int, default=100, help="quantization level of PQGD and BLOB_QG")
    parser.add_argument("--ckpt", default=None, help="trained MNIST checkpoint or state dict for accuracy")
    parser.add_argument("--model", default=None, help="architecture of a plain state dict given by --ckpt")
    parser.add_argument(
        "--train-seconds",
        type=float,
        default=30.0,
        help="without --ckpt: train MadryMNIST this long for the accuracy part (0 skips accuracy)",
    )
    parser.add_argument("--eval-size", type=int, default=1024, help="test images for the accuracy part")
    parser.add_argument(
        "--memory-format",
        choices=list(MEMORY_FORMATS),
        default="channels_last",
        help="layout of the network for the library attacks (contiguous: the legacy path everywhere)",
    )
    add_common_args(parser)
    return parser.parse_args()


def attack_set(steps: int, b: int) -> dict[str, Any]:
    """Label -> attack (each callable as ``attack(model, x, y)``); same eps, alpha and steps."""
    common = {"eps": EPS, "alpha": ALPHA, "steps": steps}
    return {
        "pgd": build_attack("pgd", **common),
        "pqgd": build_attack("pqgd", b=b, **common),
        "blob": build_attack("blob", **common),
        "blob_qg": build_attack("blob_qg", b=b, **common),
        TORCHATTACKS: TorchattacksPGD(**common),
        LEGACY: legacy_pgd(**common),
        TORCHATTACKS_SAME_LAYOUT: TorchattacksPGD(**common),
    }


def legacy_pgd(**kwargs: Any) -> Attack:
    """Our PGD without the library's CPU speed options: oneDNN for every backward (and, via
    ``models_per_label``, the contiguous network)."""
    attack = build_attack("pgd", **kwargs)
    attack.native_stem_backward = False
    return attack


def models_per_label(
    labels: list[str], model: nn.Module, memory_format: torch.memory_format
) -> dict[str, nn.Module]:
    """Label -> the network it attacks: ``model`` (contiguous) for the legacy and torchattacks rows,
    a copy in ``memory_format`` (same weights) for the others."""
    ours = copy.deepcopy(model).to(memory_format=memory_format)
    return {label: model if label in CONTIGUOUS_LABELS else ours for label in labels}


def load_mnist(data_dir: str | None, seed: int) -> MNISTDataModule | None:
    """The library's MNIST module if the files are there, else None (timing then uses noise)."""
    if not (resolve_data_dir(data_dir) / MNISTDataModule.folder).exists():
        return None
    return mnist_datamodule(data_dir, None, 0, 128, seed)


def time_attacks(
    attacks: dict[str, Callable[..., torch.Tensor]],
    models: dict[str, nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    repeats: int,
    seed: int,
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall-clock and process-CPU seconds per step of each attack in each timed round.

    One warm-up round first; the order rotates every round. CPU time is what this process itself
    spent: on a shared machine it is not inflated by other jobs taking the cores away.
    """
    labels = list(attacks)
    wall: dict[str, list[float]] = {label: [] for label in labels}
    cpu: dict[str, list[float]] = {label: [] for label in labels}
    for round_index in range(repeats + 1):
        shift = round_index % len(labels)
        for label in labels[shift:] + labels[:shift]:
            torch.manual_seed(seed + round_index)
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            attacks[label](models[label], x, y)
            elapsed_wall, elapsed_cpu = time.perf_counter() - start_wall, time.process_time() - start_cpu
            if round_index > 0:
                wall[label].append(elapsed_wall / steps)
                cpu[label].append(elapsed_cpu / steps)
        if round_index == 0:
            print(f"[{time.strftime('%H:%M:%S')}] warm-up done", flush=True)
        else:
            cells = ", ".join(f"{k} {1e3 * wall[k][-1]:.0f}/{1e3 * cpu[k][-1]:.0f}" for k in labels)
            print(
                f"[{time.strftime('%H:%M:%S')}] round {round_index}/{repeats} ms/step wall/cpu: {cells}",
                flush=True,
            )
    return wall, cpu


def direction_cost(
    attacks: dict[str, Any], model: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> dict[str, float]:
    """CPU seconds of one call of each library attack's direction hook (sign, quantize, BLOB kernel)."""
    x_req = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x_req), y, reduction="sum"), x_req)
    out: dict[str, float] = {}
    for label, attack in attacks.items():
        if not hasattr(attack, "direction"):
            continue
        attack.direction(grad, x)
        start = time.process_time()
        for _ in range(20):
            attack.direction(grad, x)
        out[label] = (time.process_time() - start) / 20
    return out


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median over rounds of the per-round ratio (robust to slow drifts of a shared machine)."""
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


def train_madry(dm: MNISTDataModule, seconds: float, seed: int) -> tuple[nn.Module, str]:
    """MadryMNIST trained normally (Adam 1e-3, batch 128) for about ``seconds``."""
    torch.manual_seed(seed)
    model = MadryMNIST().train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    start, seen = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        for x, y in dm.train_dataloader():
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += x.shape[0]
            if time.perf_counter() - start >= seconds:
                break
    model.eval()
    for p in model.parameters():
        p.grad = None
    elapsed = time.perf_counter() - start
    return model, f"MadryMNIST trained here, clean CE, {seen} examples in {elapsed:.0f}s (seed {seed})"


AGREEMENT_PAIRS = (
    ("pgd", TORCHATTACKS),
    (LEGACY, TORCHATTACKS),
    ("pgd", LEGACY),
    ("pgd", TORCHATTACKS_SAME_LAYOUT),
)
"""Pairs whose per-example outcomes are compared (target >= 99 % each)."""
AGREEMENT_TARGET_PCT = 99.0


def accuracy_table(
    models: dict[str, nn.Module],
    attacks: dict[str, Any],
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    seed: int,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Accuracy (%) clean and under each attack (on its own network), via the library's counter, and
    the per-example agreement of each pair in ``AGREEMENT_PAIRS``."""
    data = batches(x, y, batch_size)
    accuracy = {"clean": 100.0 * clean_correct(models[LEGACY], data).float().mean().item()}
    correct: dict[str, torch.Tensor] = {}
    for label, attack in attacks.items():
        start = time.perf_counter()
        correct[label] = adversarial_correct(models[label], attack, data, seed=seed, early_exit=False)
        accuracy[label] = 100.0 * correct[label].float().mean().item()
        print(
            f"[{time.strftime('%H:%M:%S')}] accuracy under {label}: {accuracy[label]:.2f}% "
            f"({time.perf_counter() - start:.0f}s)",
            flush=True,
        )
    agreement: dict[str, Any] = {"examples": int(x.shape[0])}
    for a, b in AGREEMENT_PAIRS:
        agreement[f"{a} vs {b}"] = 100.0 * (correct[a] == correct[b]).float().mean().item()
    agreement["same_outcome_pct"] = agreement[f"pgd vs {TORCHATTACKS}"]
    return accuracy, agreement


def main() -> None:
    args = parse_args()
    setup_threads(args.threads)
    if min(args.batch_size, args.steps, args.repeats, args.eval_size, args.b) < 1:
        fail("--batch-size, --steps, --repeats, --eval-size and --b must be >= 1")
    if args.train_seconds < 0:
        fail(f"--train-seconds must be >= 0, got {args.train_seconds}")
    dm = load_mnist(args.data_dir, args.seed)
    if dm is not None:
        x_time, y_time = dataset_tensors(dm.test_set, args.batch_size)
        inputs = f"first {x_time.shape[0]} MNIST test images"
    else:
        generator = torch.Generator().manual_seed(args.seed)
        x_time = torch.rand(args.batch_size, 1, 28, 28, generator=generator)
        y_time = torch.randint(0, 10, (args.batch_size,), generator=generator)
        inputs = f"{args.batch_size} uniform-noise images (MNIST not found: set QGTRAIN_DATA)"
    attacks = attack_set(args.steps, args.b)
    checkpoint_model: tuple[nn.Module, str] | None = None
    if args.ckpt is not None:  # fail on a bad checkpoint before minutes of timing
        try:
            loaded, info = load_model_from_checkpoint(args.ckpt, model=args.model)
        except CheckpointError as exc:
            fail(str(exc).splitlines()[0])
        checkpoint_model = (loaded, f"{info.model} {info.model_kwargs} from {args.ckpt}")

    memory_format = MEMORY_FORMATS[args.memory_format]
    torch.manual_seed(args.seed)
    timing_model = MadryMNIST().eval()
    print(
        f"timing: untrained MadryMNIST, {inputs}, {args.steps} steps, {torch.get_num_threads()} thread(s), "
        f"library attacks on the {args.memory_format} network"
    )
    timed = {**attacks, CONTROL: build_attack("pgd", eps=EPS, alpha=ALPHA, steps=args.steps)}
    timing_models = models_per_label(list(timed), timing_model, memory_format)
    wall, cpu = time_attacks(timed, timing_models, x_time, y_time, args.steps, args.repeats, args.seed)
    hook = direction_cost(attacks, timing_models["pgd"], x_time, y_time)
    # the loop's own cost: the same attacks on a linear model, where the network costs almost nothing
    print(f"loop overhead: linear 784->10 model, {LOOP_STEPS} steps")
    linear = nn.Sequential(nn.Flatten(), nn.Linear(784, 10)).eval()
    loop_attacks = {
        **attack_set(LOOP_STEPS, args.b),
        CONTROL: build_attack("pgd", eps=EPS, alpha=ALPHA, steps=LOOP_STEPS),
    }
    linear_models = dict.fromkeys(loop_attacks, linear)
    _, loop_cpu = time_attacks(
        loop_attacks, linear_models, x_time, y_time, LOOP_STEPS, args.repeats, args.seed
    )

    accuracy: dict[str, float] = {}
    agreement: dict[str, Any] = {}
    accuracy_model = "none"
    if args.ckpt is not None:
        model, accuracy_model = checkpoint_model
    elif dm is not None and args.train_seconds > 0:
        model, accuracy_model = train_madry(dm, args.train_seconds, args.seed)
    if dm is not None and accuracy_model != "none":
        model.eval()
        x_eval, y_eval = dataset_tensors(dm.test_set, args.eval_size)
        accuracy_models = models_per_label(list(attacks), model, memory_format)
        accuracy, agreement = accuracy_table(
            accuracy_models, attacks, x_eval, y_eval, args.batch_size, args.seed
        )

    ratios = {
        f"{CONTROL}/pgd (noise floor)": None,
        "pqgd/pgd": 1.05,
        "blob/pgd": None,
        "blob_qg/pgd": None,
        f"pgd/{TORCHATTACKS}": 0.8,
        f"{LEGACY}/{TORCHATTACKS} (before)": None,
        f"pgd/{LEGACY} (after/before)": None,
        f"pgd/{TORCHATTACKS_SAME_LAYOUT} (same layout)": None,
    }
    clocks = (("cpu", cpu), ("wall", wall), ("loop cpu", loop_cpu))
    ratio_values = {
        clock: {
            name: paired_ratio(times[name.split("/")[0]], times[name.split("/")[1].split(" ")[0]])
            for name in ratios
        }
        for clock, times in clocks
    }
    rows = [
        {
            "attack": label,
            "cpu ms/step": 1e3 * statistics.median(cpu[label]),
            "wall ms/step": 1e3 * statistics.median(wall[label]),
            "wall min": 1e3 * min(wall[label]),
            "vs pgd (cpu)": paired_ratio(cpu[label], cpu["pgd"]),
            "vs pgd (wall)": paired_ratio(wall[label], wall["pgd"]),
            "direction ms": 1e3 * hook[label] if label in hook else None,
            "loop-only cpu us/step": 1e6 * statistics.median(loop_cpu[label]),
            "accuracy %": accuracy.get(label),
        }
        for label in timed
    ]
    title = (
        f"attack cost per step: MadryMNIST, batch {args.batch_size}, {args.steps} steps, eps {EPS}, "
        f"alpha {ALPHA}, b {args.b}, {args.repeats} interleaved rounds (medians), "
        f"{torch.get_num_threads()} thread(s)"
    )
    print()
    print(format_table(rows, list(rows[0]), title))
    print()
    # typical per-round deviation of the A/A pair: how far a ratio strays from 1 by chance alone
    noise = statistics.median(abs(a / b - 1.0) for a, b in zip(cpu[CONTROL], cpu["pgd"], strict=True))
    print(f"{'ratio (median of per-round ratios)':48s} cpu     wall    loop-only cpu")
    for name, target in ratios.items():
        value = ratio_values["cpu"][name]
        verdict = ""
        if target is not None:
            status = "ok" if value <= target else "within noise" if value <= target + noise else "MISSED"
            verdict = f"  target <= {target:.2f} (cpu): {status}"
        print(
            f"{name:48s} {value:.3f}   {ratio_values['wall'][name]:.3f}   "
            f"{ratio_values['loop cpu'][name]:.3f}{verdict}"
        )
    print(f"noise: median per-round |{CONTROL}/pgd - 1| = {100 * noise:.1f}% (cpu)")
    if accuracy:
        print(
            f"clean accuracy {accuracy['clean']:.2f}% on {agreement['examples']} MNIST test images; "
            f"accuracy model: {accuracy_model}"
        )
        for a, b in AGREEMENT_PAIRS:
            value = agreement[f"{a} vs {b}"]
            status = "ok" if value >= AGREEMENT_TARGET_PCT else "MISSED"
            print(
                f"{a} and {b} agree on {value:.2f}% of examples (same per-batch seed, same random "
                f"start; target >= {AGREEMENT_TARGET_PCT:.0f}%: {status})"
            )
    else:
        print("accuracy: skipped (needs MNIST and a model: --ckpt, or --train-seconds > 0)")

    payload = {
        "environment": environment(torch.get_num_threads()),
        "settings": {
            "model_timing": "MadryMNIST (untrained, eval mode)",
            "memory_format": args.memory_format,
            "inputs_timing": inputs,
            "batch_size": args.batch_size,
            "steps": args.steps,
            "eps": EPS,
            "alpha": ALPHA,
            "b": args.b,
            "repeats": args.repeats,
            "accuracy_model": accuracy_model,
            "eval_size": agreement.get("examples", 0),
        },
        "loop_model": f"linear 784->10, {LOOP_STEPS} steps",
        "per_step_seconds": {clock: times for clock, times in clocks},
        "median_ms_per_step": {
            clock: {k: 1e3 * statistics.median(v) for k, v in times.items()} for clock, times in clocks
        },
        "direction_ms_per_call": {k: 1e3 * v for k, v in hook.items()},
        "noise_cpu_per_round": noise,
        "ratios": {
            name: {**{clock: ratio_values[clock][name] for clock, _ in clocks}, "target": target}
            for name, target in ratios.items()
        },
        "accuracy_pct": accuracy,
        "pgd_vs_torchattacks": agreement,
    }
    out = args.out / "attack_speed.json"
    write_json(out, payload)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
