"""What does one step checkpoint cost, next to a training step? (target: the defaults under 2 %)

Trains the main job's module (``--inner pqgd --steps 10``: MadryMNIST, 10-step PQGD b=100, Adam, batch 100)
with ``Trainer.fit`` on MNIST-sized random data, writing ``step.ckpt`` through the same
``StepCheckpoint`` and ``AtomicCheckpointIO`` as ``train.py`` after every ``--every``-th step. Reports
the median training-step time (batches without a write), the median checkpoint write time and the
checkpoint's size, and the overhead of a write every N steps / every T minutes.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.common import add_common_args, environment, invocation, setup_threads, write_json
from qgtrain.attacks import PQGD
from qgtrain.checkpoints import AtomicCheckpointIO, StepCheckpoint
from qgtrain.models import MadryMNIST
from qgtrain.training import AdversarialTraining


class Timings(L.Callback):
    """Wall time of each training batch, without the checkpoint write that may end it."""

    def __init__(self) -> None:
        self.steps: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, *args: Any) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        # runs before StepCheckpoint's on_train_batch_end (callbacks in list order): step time only
        self.steps.append(time.perf_counter() - self._start)


class TimedWrites(L.Trainer):
    """A ``Trainer`` that times each checkpoint write (``save_checkpoint``: state gathered and written
    through the checkpoint IO), which is what a checkpoint callback's write costs."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.writes: list[float] = []

    def save_checkpoint(
        self, filepath: str | Path, weights_only: bool | None = None, storage_options: Any = None
    ) -> None:
        start = time.perf_counter()
        super().save_checkpoint(filepath, weights_only, storage_options)
        self.writes.append(time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--steps", type=int, default=12, help="training steps (default 12)")
    parser.add_argument("--every", type=int, default=2, help="write step.ckpt every N steps (default 2)")
    args = parser.parse_args()
    setup_threads(args.threads)
    torch.manual_seed(args.seed)
    x = torch.rand(args.steps * 100, 1, 28, 28)
    y = torch.randint(0, 10, (args.steps * 100,))
    module = AdversarialTraining(
        MadryMNIST(dataset="mnist"),
        inner=PQGD(eps=0.3, alpha=0.075, steps=10, b=100),
        optimizer=lambda p: torch.optim.Adam(p, lr=1e-3),
        lr_schedule="piecewise",
    )
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.out) as tmp:  # the disk that holds the outputs
        timings = Timings()
        trainer = TimedWrites(
            accelerator="cpu",
            devices=1,
            max_steps=args.steps,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            inference_mode=False,
            plugins=[AtomicCheckpointIO()],
            callbacks=[timings, StepCheckpoint(tmp, every_n_steps=args.every)],
        )
        trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=100))
        size = (Path(tmp) / "step.ckpt").stat().st_size
    step = statistics.median(timings.steps[1:])  # the first includes one-off warm-up
    write = statistics.median(trainer.writes)
    result = {
        "environment": environment(args.threads),
        "command": invocation(),
        "steps": len(timings.steps),
        "writes": len(trainer.writes),
        "median_step_s": step,
        "median_write_s": write,
        "checkpoint_mb": size / 2**20,
        "write_over_step": write / step,
        "steps_for_2_percent": write / (0.02 * step),
        "overhead_every_10_min": write / 600,
    }
    print(
        f"training step {step:.3f} s (median of {len(timings.steps) - 1}), checkpoint write {write:.3f} s "
        f"(median of {len(trainer.writes)}), {size / 2**20:.1f} MiB\n"
        f"one write = {write / step:.2f} training steps; under 2 % needs >= {write / (0.02 * step):.0f} steps "
        f"between writes; every 10 minutes: {100 * write / 600:.3f} %"
    )
    write_json(args.out / "checkpoint_cost.json", result)


if __name__ == "__main__":
    main()
