"""What does one step checkpoint cost, next to a training step? (issue 14: defaults under 2 %)

Trains the main job's module (``--inner pqgd --steps 10``: MadryMNIST, 10-step PQGD b=100, Adam, batch 100)
with ``Trainer.fit`` on MNIST-sized random data, writing ``step.ckpt`` through the same
``StepCheckpoint`` and ``AtomicCheckpointIO`` as ``train.py`` after every ``--every``-th step. Reports
the median training-step time (batches without a write), the median checkpoint write time and the
checkpoint's size, and the overhead of a write every N steps / every T minutes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_common_args, environment, setup_threads, write_json  # noqa: E402

from qgtrain.attacks import PQGD  # noqa: E402
from qgtrain.models import MadryMNIST  # noqa: E402
from qgtrain.training import AdversarialTraining  # noqa: E402
from qgtrain.training.checkpoint_io import AtomicCheckpointIO, StepCheckpoint  # noqa: E402


class Timings(L.Callback):
    """Wall time of each training batch, and of each checkpoint write inside it."""

    def __init__(self, checkpoint: StepCheckpoint) -> None:
        self.steps: list[float] = []
        self.writes: list[float] = []
        save = checkpoint._save_checkpoint

        def timed_save(trainer: L.Trainer, filepath: str) -> None:
            start = time.perf_counter()
            save(trainer, filepath)
            self.writes.append(time.perf_counter() - start)

        checkpoint._save_checkpoint = timed_save  # type: ignore[method-assign]
        self._start = 0.0

    def on_train_batch_start(self, *args: Any) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        # runs before ModelCheckpoint's on_train_batch_end (callbacks in list order): step time only
        self.steps.append(time.perf_counter() - self._start)


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
        checkpoint = StepCheckpoint(tmp, every_n_steps=args.every)
        timings = Timings(checkpoint)
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=args.steps,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            inference_mode=False,
            plugins=[AtomicCheckpointIO()],
            callbacks=[timings, checkpoint],
        )
        trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=100))
        size = (Path(tmp) / "step.ckpt").stat().st_size
    step = statistics.median(timings.steps[1:])  # the first includes one-off warm-up
    write = statistics.median(timings.writes)
    result = {
        "environment": environment(args.threads),
        "command": " ".join(["python", *sys.argv]),
        "steps": len(timings.steps),
        "writes": len(timings.writes),
        "median_step_s": step,
        "median_write_s": write,
        "checkpoint_mb": size / 2**20,
        "write_over_step": write / step,
        "steps_for_2_percent": write / (0.02 * step),
        "overhead_every_10_min": write / 600,
    }
    print(
        f"training step {step:.3f} s (median of {len(timings.steps) - 1}), checkpoint write {write:.3f} s "
        f"(median of {len(timings.writes)}), {size / 2**20:.1f} MiB\n"
        f"one write = {write / step:.2f} training steps; under 2 % needs >= {write / (0.02 * step):.0f} steps "
        f"between writes; every 10 minutes: {100 * write / 600:.3f} %"
    )
    write_json(args.out / "checkpoint_cost.json", result)


if __name__ == "__main__":
    main()
