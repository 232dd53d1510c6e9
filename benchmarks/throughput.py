"""Training throughput per inner attack, and how close the attack loop is to its own arithmetic bound.

For each network and inner attack (FGSM-RS, PGD-k, PQGD-k with b=100, k in {2, 5, 10}) three
times are measured in the same process, interleaved, median over repeats, on one real MNIST batch:

* ``t_input_grad``: one forward + backward w.r.t. the input of the eval-mode network (timed as
  k passes in a row, divided by k, so that it spans as long as the attack it is compared with);
* ``t_train_step``: forward + backward + Adam step of the train-mode network on a batch;
  both on the batch plus uniform noise in the eps-ball (inputs like the attack's, see below);
* ``t_adv_step``: a full adversarial training step as :class:`AdversarialTraining` does it
  (``module.craft(x, y)``, i.e. the library attack in eval mode, then the same training step).

``efficiency = (k * t_input_grad + t_train_step) / t_adv_step``: 1.0 means the attack loop adds
nothing beyond its gradient passes (target >= 0.9); ``attack share`` is the crafting time over the
step time (both medians over repeats of the per-repeat ratio). ``lightning img/s`` is the
module's own ``perf/images_per_sec`` meter under ``Trainer.fit`` over a few batches (its whole
training step: clean-accuracy forward pass, metrics and logging included), as seconds per batch
(``lightning_vs_bound`` = that over the bound).

Variants, measured side by side in the same repeats: ``before`` (contiguous network,
oneDNN for every backward, clean-accuracy forward on every batch) and ``after`` (channels_last,
the attacks' native CPU stem backward, clean accuracy on every 10th batch, as configs/mnist.yaml).
``*_vs_before`` are medians of paired per-repeat ratios.

    python -m benchmarks.throughput                      # CPU, TinyCNN and MadryMNIST, batch 128
    python -m benchmarks.throughput --models tiny_cnn --repeats 3
    python -m benchmarks.throughput --profile pqgd --steps-list 10   # op-level profile of one attack
    # the main job (--inner pqgd --steps 10 on configs/mnist.yaml: MadryMNIST, batch 100), before vs after:
    python -m benchmarks.throughput --models madry_mnist --attacks pqgd --steps-list 10 --batch-size 100 \
        --repeats 5 --lightning-batches 20
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

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
from qgtrain.attacks import Attack, attack_class, attack_for_budget, build_attack
from qgtrain.models import build_model
from qgtrain.training import AdversarialTraining, quiet_trainer


def inner_attacks(steps_list: list[int], attacks: list[str]) -> list[tuple[str, int, Attack]]:
    """(label, k, attack) for every requested inner maximiser; alpha as in cheap_training's defaults."""
    out: list[tuple[str, int, Attack]] = []
    if "fgsm_rs" in attacks:
        out.append(("fgsm_rs", 1, build_attack("fgsm_rs", eps=EPS)))
    for name in ("pgd", "pqgd", "blob_qg"):
        if name not in attacks:
            continue
        for k in steps_list:
            b = 100 if attack_class(name).default_b > 1 else None  # quantized attacks at b = 100
            out.append((f"{name}{k}", k, attack_for_budget(name, EPS, k, b=b)))
    return out


@dataclass(frozen=True)
class Variant:
    """One way of running the same training step: the library's speed options."""

    channels_last: bool
    native_stem_backward: bool
    clean_accuracy_every_n_batches: int


VARIANTS = {
    # before the speed options: contiguous network, oneDNN everywhere, clean-accuracy forward on every batch
    "before": Variant(channels_last=False, native_stem_backward=False, clean_accuracy_every_n_batches=1),
    # after: configs/mnist.yaml's channels_last and sampled clean accuracy; the attacks' CPU stem backward
    "after": Variant(channels_last=True, native_stem_backward=True, clean_accuracy_every_n_batches=10),
}


def variant_attack(attack: Attack, variant: Variant) -> Attack:
    copied = copy.copy(attack)
    copied.native_stem_backward = variant.native_stem_backward
    return copied


def variant_module(net: torch.nn.Module, attack: Attack, variant: Variant) -> AdversarialTraining:
    return AdversarialTraining(
        net,
        inner=variant_attack(attack, variant),
        channels_last=variant.channels_last,
        clean_accuracy_every_n_batches=variant.clean_accuracy_every_n_batches,
    )


def timer(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(
    model_name: str,
    attacks: list[tuple[str, int, Attack]],
    x: torch.Tensor,
    y: torch.Tensor,
    repeats: int,
    variants: list[str],
) -> list[dict[str, Any]]:
    """Interleaved medians of t_input_grad, t_train_step and t_adv_step for each attack and variant.

    Each variant has its own copy of the same initial network (in its layout) and its own Adam;
    ``t_input_grad`` is one pass of the attack's own ``input_gradient`` (the variant's kernels).
    """
    torch.manual_seed(0)
    initial = build_model(model_name)
    nets = {name: copy.deepcopy(initial) for name in variants}
    optimizers = {name: torch.optim.Adam(nets[name].parameters(), lr=1e-4) for name in variants}

    # The reference passes run on a perturbed batch, as the attack's do: a clean MNIST batch
    # (mostly exact zeros) makes the CPU kernels ~5% faster and would bias the bound low.
    generator = torch.Generator(device=x.device).manual_seed(0)
    noise = torch.rand(x.shape, generator=generator, device=x.device) * 2 * EPS - EPS
    x_perturbed = (x + noise).clamp(0.0, 1.0)

    modules = {
        (name, label): variant_module(nets[name], attack, VARIANTS[name])
        for name in variants
        for label, _, attack in attacks
    }

    def input_grad(name: str, label: str) -> None:
        module = modules[(name, label)]
        module.net.eval()
        module.inner.input_gradient(module.net, x_perturbed, y)

    def train_step(name: str, inputs: torch.Tensor) -> None:
        net, optimizer = nets[name], optimizers[name]
        net.train()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(net(inputs), y).backward()
        optimizer.step()

    crafted: dict[tuple[str, str], float] = {}

    def adversarial_step(name: str, label: str) -> None:
        start = time.perf_counter()
        x_adv = modules[(name, label)].craft(x, y)  # the library's inner maximisation, eval mode
        crafted[(name, label)] = time.perf_counter() - start
        train_step(name, x_adv)

    keys = list(modules)
    for _ in range(2):  # warm-up: allocator, kernels
        for name, label in keys:
            input_grad(name, label)
            train_step(name, x)
            adversarial_step(name, label)
    samples: dict[tuple[str, str], list[tuple[float, float, float, float]]] = {key: [] for key in keys}
    k_of = {label: k for label, k, _ in attacks}
    for repeat in range(repeats):
        shift = repeat % len(keys)
        for name, label in keys[shift:] + keys[:shift]:  # the three times of one repeat back to back
            k = k_of[label]
            # k passes in a row, like the attack: a short isolated pass is rarely preempted on a
            # shared CPU while a long attack is, which would bias the ratio
            t_in = timer(lambda k=k, n=name, lb=label: [input_grad(n, lb) for _ in range(k)]) / k
            t_train = timer(lambda n=name: train_step(n, x_perturbed))
            t_adv = timer(lambda n=name, lb=label: adversarial_step(n, lb))
            samples[(name, label)].append((t_in, t_train, t_adv, crafted[(name, label)]))
    rows = []
    for name, label in keys:
        k = k_of[label]
        t_in, t_train, t_adv, _ = (
            statistics.median(col) for col in zip(*samples[(name, label)], strict=True)
        )
        # the ratio per repeat, then its median: robust to load drifting between repeats
        efficiency = statistics.median((k * a + b) / c for a, b, c, _ in samples[(name, label)])
        row = {
            "model": model_name,
            "inner": label,
            "variant": name,
            "k": k,
            "t_input_grad_ms": 1e3 * t_in,
            "t_train_step_ms": 1e3 * t_train,
            "t_adv_step_ms": 1e3 * t_adv,
            "bound_ms": 1e3 * (k * t_in + t_train),
            "efficiency": efficiency,
            "attack_share": statistics.median(d / c for _, _, c, d in samples[(name, label)]),
            "img_per_s": x.shape[0] / t_adv,
        }
        if name != variants[0]:  # paired per repeat against the first variant ("before")
            pairs = zip(samples[(name, label)], samples[(variants[0], label)], strict=True)
            row[f"adv_step_vs_{variants[0]}"] = statistics.median(a[2] / b[2] for a, b in pairs)
        rows.append(row)
    return rows


def lightning_seconds_per_batch(
    model_name: str,
    attacks: list[tuple[str, int, Attack]],
    x: torch.Tensor,
    y: torch.Tensor,
    batches: int,
    variants: list[str],
    repeats: int,
) -> dict[tuple[str, str], list[float]]:
    """Seconds per batch of the module's whole training step under ``Trainer.fit`` (its perf meter:
    clean-accuracy forward, metrics and logging included), variants alternating, ``repeats`` times."""
    out: dict[tuple[str, str], list[float]] = {}
    for _ in range(repeats):
        for label, _, attack in attacks:
            for name in variants:
                torch.manual_seed(0)
                module = variant_module(build_model(model_name), attack, VARIANTS[name])
                out.setdefault((name, label), []).append(
                    x.shape[0] / fit_images_per_sec(module, x, y, batches)
                )
    return out


def fit_images_per_sec(module: AdversarialTraining, x: torch.Tensor, y: torch.Tensor, batches: int) -> float:
    """Images per second of ``module``'s training steps under ``Trainer.fit`` (its own perf meter)."""
    n = x.shape[0]
    data = TensorDataset(x.repeat(batches, 1, 1, 1), y.repeat(batches))
    trainer = quiet_trainer(
        accelerator="cpu" if not torch.cuda.is_available() else "auto", max_epochs=1, limit_val_batches=0
    )
    trainer.fit(module, train_dataloaders=DataLoader(data, batch_size=n, shuffle=False))
    # the module's own per-batch meter (on_train_batch_start -> end): steady state, setup excluded
    return float(trainer.callback_metrics["perf/images_per_sec"])


def profile(model_name: str, attack: Attack, x: torch.Tensor, y: torch.Tensor) -> str:
    """Op-level profile of crafting with ``attack`` (sorted by self CPU time)."""
    net = build_model(model_name).eval()
    attack(net, x, y)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            attack(net, x, y)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["tiny_cnn", "madry_mnist"])
    parser.add_argument(
        "--attacks", nargs="+", default=["fgsm_rs", "pgd", "pqgd"], help="fgsm_rs pgd pqgd blob_qg"
    )
    parser.add_argument("--steps-list", nargs="+", type=int, default=[2, 5, 10], help="k values")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats per measurement (median)")
    parser.add_argument(
        "--lightning-batches", type=int, default=10, help="batches per Trainer.fit throughput run (0: skip)"
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANTS),
        default=list(VARIANTS),
        help="speed options compared side by side (ratios are against the first)",
    )
    parser.add_argument(
        "--lightning-repeats", type=int, default=2, help="alternating Trainer.fit runs per variant (median)"
    )
    parser.add_argument("--profile", default=None, help="print an op-level profile of this attack and exit")
    parser.add_argument(
        "--full", action="store_true", help="GPU budget: more repeats and Trainer.fit batches"
    )
    add_common_args(parser)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    setup_threads(args.threads)
    if args.batch_size < 1 or args.repeats < 1 or any(k < 1 for k in args.steps_list):
        fail("--batch-size, --repeats and every --steps-list value must be >= 1")
    unknown = [a for a in args.attacks if a not in ("fgsm_rs", "pgd", "pqgd", "blob_qg")]
    if unknown:
        fail(f"unknown inner attack(s) {', '.join(unknown)}; choose from fgsm_rs pgd pqgd blob_qg")
    if args.full:
        args.repeats = max(args.repeats, 20)
        args.lightning_batches = max(args.lightning_batches, 50)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dm = mnist_datamodule(args.data_dir, args.batch_size, 0, args.batch_size, args.seed)
    x, y = dataset_tensors(dm.train_set, args.batch_size)
    x, y = x.to(device), y.to(device)
    attacks = inner_attacks(args.steps_list, args.attacks)
    if args.profile is not None:
        chosen = [a for label, _, a in attacks if a.name == args.profile]
        if not chosen:
            fail(f"--profile {args.profile} is not among --attacks {' '.join(args.attacks)}")
        print(profile(args.models[0], chosen[-1], x.cpu(), y.cpu()))
        return
    rows: list[dict[str, Any]] = []
    first = args.variants[0]
    for model_name in args.models:
        start = time.perf_counter()
        model_rows = measure(model_name, attacks, x, y, args.repeats, args.variants)
        if args.lightning_batches > 0:
            seconds = lightning_seconds_per_batch(
                model_name,
                attacks,
                x.cpu(),
                y.cpu(),
                args.lightning_batches,
                args.variants,
                args.lightning_repeats,
            )
            for row in model_rows:
                mine = seconds[(row["variant"], row["inner"])]
                row["lightning_s_per_batch"] = statistics.median(mine)
                row["lightning_img_per_s"] = x.shape[0] / row["lightning_s_per_batch"]
                row["lightning_vs_bound"] = row["lightning_s_per_batch"] / (row["bound_ms"] / 1e3)
                if row["variant"] != first:
                    before = seconds[(first, row["inner"])]
                    row[f"lightning_vs_{first}"] = statistics.median(
                        a / b for a, b in zip(mine, before, strict=True)
                    )
        rows.extend(model_rows)
        print(f"{model_name}: measured in {time.perf_counter() - start:.0f}s", flush=True)
    columns = [
        "model",
        "inner",
        "variant",
        "k",
        "t_input_grad_ms",
        "t_train_step_ms",
        "t_adv_step_ms",
        "bound_ms",
        "efficiency",
        "attack_share",
        "img_per_s",
        f"adv_step_vs_{first}",
        "lightning_s_per_batch",
        "lightning_vs_bound",
        f"lightning_vs_{first}",
    ]
    env = environment(args.threads)
    title = (
        f"throughput: batch {args.batch_size}, {env['device']}, {args.threads} thread(s), median of "
        f"{args.repeats} interleaved repeats; efficiency = (k t_input_grad + t_train_step) / t_adv_step; "
        f"variants: " + "; ".join(f"{name} = {VARIANTS[name]}" for name in args.variants)
    )
    table = format_table(rows, columns, title)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "throughput.json"
    write_json(
        path, {"env": env, "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows, "table": table}
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
