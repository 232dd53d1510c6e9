"""GPU check: CUDA tests, attacks under AMP, one epoch of the main job, attack throughput
against torchattacks with AMP and channels_last, and the DDP strategy; at most ~8 minutes on one GPU.

Sections, each reported ok / FAILED / skipped (table on stdout, JSON in ``--out``):

* ``tests``: ``pytest -m cuda`` (tests/test_amp.py's CUDA cases: every attack's invariants under
  16-mixed and bf16-mixed autocast, quantization in float32, inference mode, channels_last, AMP
  training). CPU half: the same file's CPU cases (skipped with ``--quick``: the suite runs them).
* ``main_job``: one epoch of the main job (``--inner pqgd --steps 10`` on configs/mnist.yaml:
  MadryMNIST, PQGD-10, batch 100, with its validation and robustness callbacks) through the training CLI, in process: wall time and the
  module's ``perf/images_per_sec`` / ``perf/attack_time_share``; on a GPU at 32-true and bf16-mixed.
  CPU half: a few batches of TinyCNN (``--quick``) or 20 MadryMNIST batches.
* ``attacks``: our PGD against torchattacks.PGD on the same network copy, 10 steps, batch 256
  (``--quick``: 2 steps, batch 32), per setting (fp32 / bf16 / fp16 autocast x contiguous /
  channels_last, compiled on a GPU): ms per step (median of interleaved repeats), the paired
  ratio ours / torchattacks, and per-example agreement and accuracy under each on test images
  (a MadryMNIST trained here for one short clean epoch).
* ``ddp``: ``train.py --strategy ddp`` on every GPU for one epoch of a 10k-image subset; CPU half:
  two CPU processes (gloo), skipped with ``--quick``.

CPU half (CI runs it through tests/test_gpu_check.py)::

    python -m benchmarks.gpu_check --cpu-only --quick

On a GPU machine lent by the device tool (``../shared`` does not travel, and the device image has
torch, lightning, torchmetrics and tensorboard but not jsonargparse or torchattacks), prepare here::

    mkdir -p .mnist_gz && for f in "$QGTRAIN_DATA"/MNIST/raw/*-ubyte; do gzip -c "$f" > .mnist_gz/$(basename "$f").gz; done
    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux2014_x86_64 -d .whl jsonargparse==4.53.0 docstring_parser==0.18.0 \\
        typeshed_client==2.15.0 torchattacks==3.5.1   # checked: their other needs are in the image

then ``run(carry=[".mnist_gz", ".whl"], timeout_s=540, command=...)`` with the command::

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD;
    mkdir -p .data/MNIST/raw && for f in .mnist_gz/*.gz; do gunzip -c $f > .data/MNIST/raw/$(basename $f .gz); done;
    QGTRAIN_DATA=$PWD/.data PYTHONUNBUFFERED=1 python3 -m benchmarks.gpu_check --out $OUT 2>&1 | tee $OUT/gpu_check.log

(``.mnist_gz/`` and ``.data/`` are git-ignored.) Record the figures in docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import (
    EPS,
    REPO_ROOT,
    add_common_args,
    batches,
    dataset_tensors,
    environment,
    fail,
    format_table,
    setup_threads,
    write_json,
)
from qgtrain.attacks import PGD
from qgtrain.data import MNISTDataModule, resolve_data_dir
from qgtrain.evaluation import adversarial_correct
from qgtrain.models import MadryMNIST, TinyCNN

AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
SECTIONS = ("tests", "main_job", "attacks", "ddp")


@dataclass
class Section:
    name: str
    status: str = "ok"
    seconds: float = 0.0
    summary: str = ""
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Plan:
    """What to run where: the GPU plan, or the CPU half (``--cpu-only``), full or ``--quick``."""

    device: torch.device
    quick: bool
    compile: bool
    data_dir: Path | None
    workdir: Path

    @property
    def gpu(self) -> bool:
        return self.device.type == "cuda"


# ---------------------------------------------------------------- sections


def section_tests(plan: Plan) -> Section:
    """pytest on the CUDA-marked tests (GPU) or tests/test_amp.py's CPU cases (CPU half)."""
    if plan.quick and not plan.gpu:
        return Section("tests", "skipped", summary="--quick (the test suite runs tests/test_amp.py itself)")
    selection = ["-m", "cuda"] if plan.gpu else ["tests/test_amp.py", "-m", "not cuda"]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *selection]
    done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=_env(plan))
    last = (done.stdout.strip().splitlines() or [""])[-1]
    section = Section("tests", summary=f"{' '.join(selection)}: {last}")
    section.details = {"command": " ".join(cmd), "returncode": done.returncode, "tail": done.stdout[-3000:]}
    if done.returncode != 0:
        section.status = "FAILED"
        section.details["stderr"] = done.stderr[-3000:]
    return section


def section_main_job(plan: Plan) -> Section:
    """One epoch of the main job through the training CLI, in process; the module's perf meters."""
    from qgtrain.cli.train import build_cli

    if plan.data_dir is None:
        return Section("main_job", "skipped", summary="MNIST not found (set QGTRAIN_DATA)")
    precisions = ["32-true", "bf16-mixed"] if plan.gpu else ["32-true"]
    runs = {}
    for precision in precisions:
        argv = ["--config", str(REPO_ROOT / "configs" / ("mnist_fast.yaml" if plan.quick else "mnist.yaml"))]
        argv += [
            "--inner",  # the main job: python train.py --inner pqgd --steps 10
            "pqgd",
            "--steps",
            "10",
            "--epochs",
            "1",
            "--precision",
            precision,
            "--trainer.accelerator",
            "gpu" if plan.gpu else "cpu",
            "--trainer.devices",
            "1",
            "--trainer.enable_progress_bar",
            "false",
            "--checkpoint_root",
            str(plan.workdir / "checkpoints"),
            "--log_root",
            str(plan.workdir / "logs"),
            "--run_name",
            f"gpu-check-{precision}",
        ]
        if not plan.gpu:  # the CPU half: a few batches only
            argv += [
                "--trainer.limit_train_batches",
                "3" if plan.quick else "20",
                "--trainer.limit_val_batches",
                "1",
            ]
            argv += ["--robustness.every_n_epochs", "0", "--visualization.every_n_epochs", "0"]
            if plan.quick:
                argv += [
                    "--steps",
                    "2",
                    "--model.net.init_args.width",
                    "4",
                    "--data.init_args.train_subset",
                    "300",
                ]
        cli = build_cli(argv)
        start = time.perf_counter()
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        wall = time.perf_counter() - start
        metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if v.numel() == 1}
        batches_run = cli.trainer.num_training_batches
        img_per_s = metrics.get("perf/images_per_sec", float("nan"))
        batch_size = cli.datamodule.batch_size
        runs[precision] = {
            "fit_wall_s": wall,
            "train_batches": batches_run,
            "s_per_batch": batch_size / img_per_s,
            "attack_time_share": metrics.get("perf/attack_time_share"),
            "val_adv_acc": metrics.get("val/adv_acc"),
            "val_clean_acc": metrics.get("val/clean_acc"),
            "robust_worst_acc": metrics.get("robust/worst_acc"),
        }
    summary = "; ".join(
        f"{p}: {r['train_batches']} batches, fit {r['fit_wall_s']:.0f}s, {1e3 * r['s_per_batch']:.0f} ms/batch"
        for p, r in runs.items()
    )
    return Section("main_job", summary=summary, details=runs)


@dataclass(frozen=True)
class Setting:
    label: str
    memory_format: torch.memory_format
    autocast: torch.dtype | None
    compiled: bool = False


def attack_settings(plan: Plan) -> list[Setting]:
    cl, contiguous = torch.channels_last, torch.contiguous_format
    settings = [Setting("fp32 contiguous", contiguous, None), Setting("fp32 channels_last", cl, None)]
    if plan.gpu:
        settings += [
            Setting("bf16 contiguous", contiguous, torch.bfloat16),
            Setting("bf16 channels_last", cl, torch.bfloat16),
            Setting("fp16 channels_last", cl, torch.float16),
        ]
        if plan.compile:
            settings += [
                Setting("fp32 channels_last compiled", cl, None, True),
                Setting("bf16 channels_last compiled", cl, torch.bfloat16, True),
            ]
    elif not plan.quick:
        settings.append(Setting("bf16 channels_last", cl, torch.bfloat16))
    return settings


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def section_attacks(plan: Plan) -> Section:
    """Our PGD vs torchattacks.PGD per setting: ms/step, paired ratio, agreement, accuracy."""
    if importlib.util.find_spec("torchattacks") is None:
        return Section("attacks", "skipped", summary="torchattacks not installed (pip install -e '.[bench]')")
    from benchmarks.attack_speed import TorchattacksPGD

    device = plan.device
    steps, batch_size, repeats = (2, 32, 2) if plan.quick else (10, 256, 5 if plan.gpu else 3)
    model, x_eval, y_eval, trained = _accuracy_model(plan)
    x, y = x_eval[:batch_size], y_eval[:batch_size]
    if x.shape[0] < batch_size:  # no data: noise (timing only)
        generator = torch.Generator().manual_seed(0)
        x = torch.rand(batch_size, 1, 28, 28, generator=generator).to(device)
        y = torch.randint(0, 10, (batch_size,), generator=generator).to(device)
    rows = []
    for setting in attack_settings(plan):
        net = copy.deepcopy(model).to(memory_format=setting.memory_format).eval()
        if setting.compiled:
            net.compile()
        ours = PGD(eps=EPS, alpha=0.01, steps=steps)
        theirs = TorchattacksPGD(eps=EPS, alpha=0.01, steps=steps)
        attacks: dict[str, Callable[..., torch.Tensor]] = {"qgtrain": ours, "torchattacks": theirs}
        times: dict[str, list[float]] = {name: [] for name in attacks}
        with _autocast(device, setting.autocast):
            for round_index in range(repeats + 1):  # round 0 warms up (and compiles)
                order = list(attacks) if round_index % 2 == 0 else list(reversed(attacks))
                for name in order:
                    torch.manual_seed(round_index)
                    _sync(device)
                    start = time.perf_counter()
                    attacks[name](net, x, y)
                    _sync(device)
                    if round_index > 0:
                        times[name].append((time.perf_counter() - start) / steps)
            row: dict[str, Any] = {
                "setting": setting.label,
                "qgtrain ms/step": 1e3 * statistics.median(times["qgtrain"]),
                "torchattacks ms/step": 1e3 * statistics.median(times["torchattacks"]),
                "ratio": statistics.median(
                    a / b for a, b in zip(times["qgtrain"], times["torchattacks"], strict=True)
                ),
            }
            if trained:
                data = batches(x_eval, y_eval, batch_size)
                correct = {
                    name: adversarial_correct(net, attack, data, seed=0, early_exit=False)
                    for name, attack in attacks.items()
                }
                row["qgtrain acc %"] = 100.0 * correct["qgtrain"].float().mean().item()
                row["torchattacks acc %"] = 100.0 * correct["torchattacks"].float().mean().item()
                row["agreement %"] = (
                    100.0 * (correct["qgtrain"] == correct["torchattacks"]).float().mean().item()
                )
        rows.append(row)
        print(f"[{time.strftime('%H:%M:%S')}] attacks: {row}", flush=True)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    title = (
        f"PGD-{steps}, batch {batch_size}, {device}, median of {repeats} interleaved repeats; "
        f"accuracy model: {trained or 'none (noise inputs)'}"
    )
    table = format_table(rows, columns, title)
    print(table, flush=True)
    worst = min((r.get("agreement %", 100.0) for r in rows), default=100.0)
    section = Section("attacks", details={"rows": rows, "table": table})
    section.summary = ", ".join(f"{r['setting']} {r['ratio']:.2f}" for r in rows) + " (ours / torchattacks)"
    if trained and worst < 99.0:
        section.status = "FAILED"
        section.summary += f"; per-example agreement {worst:.1f}% < 99%"
    return section


def _accuracy_model(plan: Plan) -> tuple[nn.Module, torch.Tensor, torch.Tensor, str]:
    """A network trained here for a short clean run, and test images (empty without MNIST)."""
    torch.manual_seed(0)
    model: nn.Module = (TinyCNN(width=4) if plan.quick else MadryMNIST()).to(plan.device)
    empty = (
        torch.zeros(0, 1, 28, 28, device=plan.device),
        torch.zeros(0, dtype=torch.long, device=plan.device),
    )
    if plan.data_dir is None:
        return model.eval(), *empty, ""
    dm = MNISTDataModule(
        data_dir=str(plan.data_dir),
        batch_size=128,
        val_size=0,
        download=False,
        seed=0,
        train_subset=2000 if plan.quick else (None if plan.gpu else 10000),
    )
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    seen = 0
    for x, y in dm.train_dataloader():
        x, y = x.to(plan.device), y.to(plan.device)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += x.shape[0]
    for p in model.parameters():
        p.grad = None
    x_eval, y_eval = dataset_tensors(dm.test_set, 128 if plan.quick else 1024)
    name = f"{type(model).__name__}, one clean epoch on {seen} images"
    return model.eval(), x_eval.to(plan.device), y_eval.to(plan.device), name


def section_ddp(plan: Plan) -> Section:
    """``train.py --strategy ddp`` for one epoch: every GPU (NCCL), or two CPU processes (gloo)."""
    if plan.quick and not plan.gpu:
        return Section("ddp", "skipped", summary="--quick (tests/test_training.py runs 2-process CPU DDP)")
    if plan.data_dir is None:
        return Section("ddp", "skipped", summary="MNIST not found (set QGTRAIN_DATA)")
    devices = torch.cuda.device_count() if plan.gpu else 2
    cmd = [
        sys.executable, str(REPO_ROOT / "train.py"), "--epochs", "1", "--strategy", "ddp",
        "--devices", str(devices), "--trainer.accelerator", "gpu" if plan.gpu else "cpu",
        "--data.init_args.train_subset", "10000" if plan.gpu else "400",
        "--data.init_args.val_size", "1000" if plan.gpu else "200",
        "--trainer.enable_progress_bar", "false",
        "--checkpoint_root", str(plan.workdir / "ddp-ck"), "--log_root", str(plan.workdir / "ddp-lg"),
        "--run_name", "ddp",
    ]  # fmt: skip
    if not plan.gpu:
        cmd += ["--steps", "2", "--trainer.limit_val_batches", "1", "--robustness.every_n_epochs", "0"]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=plan.workdir, capture_output=True, text=True, timeout=300, env=_env(plan))
    wall = time.perf_counter() - start
    last = plan.workdir / "ddp-ck" / "ddp" / "last.ckpt"
    ok = done.returncode == 0 and last.is_file()
    section = Section("ddp", "ok" if ok else "FAILED", seconds=wall)
    section.summary = (
        f"{devices} {'GPU' if plan.gpu else 'CPU'} process(es), exit {done.returncode}, {wall:.0f}s"
    )
    section.details = {"command": " ".join(cmd), "stderr_tail": done.stderr[-3000:]}
    if ok:
        ckpt = torch.load(last, map_location="cpu", weights_only=True)
        section.details["global_step"] = ckpt["global_step"]
        section.summary += f", global_step {ckpt['global_step']}"
    return section


# ---------------------------------------------------------------- driver


def _env(plan: Plan) -> dict[str, str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    if plan.data_dir is not None:
        env["QGTRAIN_DATA"] = str(plan.data_dir)
    env.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    return env


RUNNERS: dict[str, Callable[[Plan], Section]] = {
    "tests": section_tests,
    "main_job": section_main_job,
    "attacks": section_attacks,
    "ddp": section_ddp,
}


def run_sections(plan: Plan, names: list[str], budget_s: float) -> Iterator[Section]:
    start = time.perf_counter()
    for name in names:
        if time.perf_counter() - start > budget_s:
            yield Section(name, "skipped", summary=f"over the {budget_s:.0f}s budget")
            continue
        print(f"[{time.strftime('%H:%M:%S')}] section {name} ...", flush=True)
        begin = time.perf_counter()
        try:
            section = RUNNERS[name](plan)
        except Exception as exc:  # a failing section is reported, the others still run
            section = Section(name, "FAILED", summary=f"{type(exc).__name__}: {exc}".splitlines()[0])
            section.details["traceback"] = traceback.format_exc()[-4000:]
        section.seconds = section.seconds or time.perf_counter() - begin
        print(
            f"[{time.strftime('%H:%M:%S')}] section {name}: {section.status} ({section.seconds:.0f}s) {section.summary}",
            flush=True,
        )
        yield section


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cpu-only", action="store_true", help="the CPU half, even where a GPU is visible")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds): what CI runs")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile settings on a GPU")
    parser.add_argument(
        "--budget-s", type=float, default=420.0, help="start no section after this many seconds"
    )
    add_common_args(parser)
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    setup_threads(args.threads)
    if not args.cpu_only and not torch.cuda.is_available():
        fail("no CUDA GPU is visible: run on a GPU machine, or pass --cpu-only for the CPU half")
    root = resolve_data_dir(args.data_dir)
    data_dir = root if (root / MNISTDataModule.folder).is_dir() else None
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as workdir:
        plan = Plan(
            device=torch.device("cpu" if args.cpu_only else "cuda"),
            quick=args.quick,
            compile=not args.no_compile,
            data_dir=data_dir,
            workdir=Path(workdir),
        )
        sections = list(run_sections(plan, args.sections, args.budget_s))
    rows = [
        {"section": s.name, "status": s.status, "seconds": s.seconds, "summary": s.summary} for s in sections
    ]
    env = environment(args.threads)
    print()
    print(format_table(rows, ["section", "status", "seconds", "summary"], f"gpu_check on {env['device']}"))
    path = out / "gpu_check.json"
    write_json(path, {"environment": env, "plan": str(plan), "sections": [vars(s) for s in sections]})
    print(f"wrote {path}")
    return 1 if any(s.status == "FAILED" for s in sections) else 0


if __name__ == "__main__":
    sys.exit(main())
