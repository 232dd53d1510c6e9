"""TensorBoard views of the inner attack: example grid, gradient histograms, loss per inner step.

The histograms reproduce the paper's Fig. 2 during training: sign gradients (PGD, ``b=1``) pile on
+-1, quantized gradients ``zeta(b g / M)`` (PQGD, BLOB_QG) spread over ``[-b, b]``. The loss curve
shows how fast the inner attack ascends compared with sign-gradient PGD from the same random start.
Tags are documented in docs/MONITORING.md. The views are of the trained weights, the ones the inner
attack ascends against, also under ``--ema`` (the monitor and checkpoints judge the average).
"""

from __future__ import annotations

import logging

import lightning as L
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402
from torch import nn  # noqa: E402

from qgtrain.attacks import Attack, attack_class, build_attack  # noqa: E402
from qgtrain.callbacks.validation_data import subset_indices, validation_dataset  # noqa: E402
from qgtrain.evaluation import eval_mode  # noqa: E402

log = logging.getLogger(__name__)

TAG_GRID = "images/adversarial_grid"
TAG_GRAD_QUANTIZED = "attack/grad_quantized"
TAG_GRAD_ABS = "attack/grad_abs"
TAG_STEP_LOSS_CURVE = "attack/step_loss_curve"
TAG_STEP_LOSS_FIRST = "attack/step_loss_first"
TAG_STEP_LOSS_LAST = "attack/step_loss_last"
TAG_REFERENCE_LOSS_LAST = "attack/reference_step_loss_last"


class AttackRecorder:
    """An ``observer`` for :meth:`Attack.perturb`: mean loss, directions and |grad| at each inner step
    (the loss is the one the step's gradient is taken of, i.e. before the step's update)."""

    def __init__(self, keep_gradients: bool = True) -> None:
        self.keep_gradients = keep_gradients
        self.mean_loss: list[float] = []
        self.directions: list[torch.Tensor] = []
        self.grad_abs: list[torch.Tensor] = []

    def __call__(
        self, step: int, per_example_loss: torch.Tensor, grad: torch.Tensor, direction: torch.Tensor
    ) -> None:
        self.mean_loss.append(float(per_example_loss.float().mean()))
        if self.keep_gradients:
            self.directions.append(direction.detach().float().flatten().cpu())
            self.grad_abs.append(grad.detach().float().abs().flatten().cpu())


class AttackVisualization(Callback):
    """Every ``every_n_epochs`` epochs (the first, every N-th, the last), on rank zero and only with
    a TensorBoard logger, run the training module's inner attack (its ``val_attack`` when training
    is standard) on a fixed seeded batch of ``batch_size`` validation examples and write:

    * ``images/adversarial_grid``: ``num_images`` clean inputs, adversarial inputs and their
      perturbations amplified to the full gray range (``0.5 + delta / (2 eps)``), with labels;
    * ``attack/grad_quantized`` and ``attack/grad_abs``: histograms of the step directions
      (the quantized gradient) and of the raw input-gradient magnitudes over all inner steps;
    * ``attack/step_loss_curve``: mean loss at the start, after each inner step, beside ``reference_attack``
      (sign-gradient PGD by default) with the same eps, step size, steps and random start;
      ``attack/step_loss_first`` (at the start), ``attack/step_loss_last`` (final adversarial
      input), ``attack/reference_step_loss_last``. The attack runs at its full eps (no warm-up).

    The attack runs in eval mode under a forked, seeded RNG: training state and RNG are untouched.
    ``every_n_epochs=0`` turns the callback off.

    Args:
        every_n_epochs: Write the views every N epochs (and the first and last); 0 turns them off.
        num_images: Validation images shown in the adversarial grid.
        batch_size: Validation examples the attack runs on for the histograms and loss curves.
        reference_attack: Attack drawn beside the training attack in the loss curve (null: none).
        seed: Seed of the fixed validation batch and of the attack's forked RNG.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        num_images: int = 8,
        batch_size: int = 64,
        reference_attack: str | None = "pgd",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if isinstance(every_n_epochs, bool) or every_n_epochs < 0:
            raise ValueError(
                f"visualization.every_n_epochs must be >= 0 (0 turns it off), got {every_n_epochs}"
            )
        if num_images < 1 or batch_size < 1:
            raise ValueError(
                f"visualization.num_images and batch_size must be >= 1, got {num_images}, {batch_size}"
            )
        if reference_attack is not None:
            attack_class(reference_attack)
        self.every_n_epochs = int(every_n_epochs)
        self.num_images = int(num_images)
        self.batch_size = int(batch_size)
        self.reference_attack = reference_attack
        self.seed = int(seed)

    def is_due(self, trainer: L.Trainer) -> bool:
        if self.every_n_epochs == 0:
            return False
        epoch = trainer.current_epoch
        last = trainer.max_epochs is not None and trainer.max_epochs > 0 and epoch + 1 >= trainer.max_epochs
        return epoch == 0 or (epoch + 1) % self.every_n_epochs == 0 or last

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or not self.is_due(trainer):
            return
        writers = [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        attack = getattr(pl_module, "inner", None) or getattr(pl_module, "val_attack", None)
        if not writers or not isinstance(attack, Attack):
            return
        self.visualize(trainer, pl_module, attack, writers[0])

    def visualize(
        self, trainer: L.Trainer, pl_module: L.LightningModule, attack: Attack, writer
    ) -> AttackRecorder:
        """Write every view for the current weights to ``writer`` (a SummaryWriter)."""
        model: nn.Module = getattr(pl_module, "net", pl_module)
        dataset = validation_dataset(trainer)
        indices = subset_indices(len(dataset), self.batch_size, self.seed)
        examples = [dataset[int(i)] for i in indices]
        x = torch.stack([torch.as_tensor(e[0]) for e in examples]).to(pl_module.device)
        y = torch.as_tensor([int(e[1]) for e in examples], dtype=torch.long, device=pl_module.device)
        step = trainer.global_step

        recorder = AttackRecorder()
        reference = None
        if self.reference_attack is not None and self.reference_attack != attack.name:
            reference = build_attack(
                self.reference_attack,
                eps=attack.eps,
                alpha=attack.alpha,
                steps=attack.steps,
                random_start=attack.random_start,
            )
        reference_recorder = AttackRecorder(keep_gradients=False)
        devices = [x.device.index or 0] if x.device.type == "cuda" else []
        with eval_mode(model):
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(self.seed)
                shown, labels = attack, y
                if attack is getattr(pl_module, "inner", None) and hasattr(pl_module, "objective_inputs"):
                    shown, labels = pl_module.objective_inputs(attack, x, y)  # TRADES: softmax(f(x)) labels
                x_adv = shown.perturb(model, x, labels, observer=recorder, need_fooled=False).x_adv
            if reference is not None:
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(self.seed)  # the same random start as the inner attack
                    x_ref = reference.perturb(
                        model, x, y, observer=reference_recorder, need_fooled=False
                    ).x_adv
            with torch.no_grad():
                pred_clean = model(x).argmax(dim=1)
                logits_adv = model(x_adv)
                pred_adv = logits_adv.argmax(dim=1)
                recorder.mean_loss.append(float(shown.loss_fn(logits_adv, labels).float().mean()))
                if reference is not None:
                    reference_recorder.mean_loss.append(
                        float(reference.loss_fn(model(x_ref), y).float().mean())
                    )

        writer.add_histogram(TAG_GRAD_QUANTIZED, torch.cat(recorder.directions), step)
        writer.add_histogram(TAG_GRAD_ABS, torch.cat(recorder.grad_abs), step)
        writer.add_scalar(TAG_STEP_LOSS_FIRST, recorder.mean_loss[0], step)
        writer.add_scalar(TAG_STEP_LOSS_LAST, recorder.mean_loss[-1], step)
        if reference is not None:
            writer.add_scalar(TAG_REFERENCE_LOSS_LAST, reference_recorder.mean_loss[-1], step)
        n = min(self.num_images, x.shape[0])
        grid = adversarial_grid(
            x[:n].cpu(), x_adv[:n].cpu(), y[:n].cpu(), pred_clean[:n].cpu(), pred_adv[:n].cpu(), attack.eps
        )
        writer.add_figure(TAG_GRID, grid, step, close=True)
        curve = step_loss_figure(
            {attack.name: recorder.mean_loss}
            | ({f"{reference.name} (reference)": reference_recorder.mean_loss} if reference else {}),
            trainer.current_epoch,
        )
        writer.add_figure(TAG_STEP_LOSS_CURVE, curve, step, close=True)
        writer.flush()
        return recorder


def _as_image(image: torch.Tensor) -> tuple[torch.Tensor, str | None]:
    """``(C, H, W)`` -> something ``imshow`` takes, and the colour map for one channel."""
    if image.shape[0] == 1:
        return image[0], "gray"
    return image.permute(1, 2, 0), None


def adversarial_grid(
    x: torch.Tensor,
    x_adv: torch.Tensor,
    y: torch.Tensor,
    pred_clean: torch.Tensor,
    pred_adv: torch.Tensor,
    eps: float,
) -> plt.Figure:
    """Rows: clean inputs (label / prediction), adversarial inputs (prediction), amplified perturbation."""
    n = x.shape[0]
    figure, axes = plt.subplots(3, n, figsize=(1.3 * n, 4.4), squeeze=False)
    perturbation = (0.5 + (x_adv - x) / (2 * eps)).clamp(0, 1)
    rows = [
        (x, [f"y={int(t)} p={int(p)}" for t, p in zip(y, pred_clean, strict=True)]),
        (x_adv, [f"adv p={int(p)}" for p in pred_adv]),
        (perturbation, ["0.5+delta/(2eps)"] * n),
    ]
    for row, (images, titles) in enumerate(rows):
        for col in range(n):
            data, cmap = _as_image(images[col].float())
            ax = axes[row][col]
            ax.imshow(data.numpy(), cmap=cmap, vmin=0.0, vmax=1.0)
            wrong = row == 1 and int(pred_adv[col]) != int(y[col])
            ax.set_title(titles[col], fontsize=7, color="red" if wrong else "black")
            ax.axis("off")
    figure.tight_layout()
    return figure


def step_loss_figure(curves: dict[str, list[float]], epoch: int) -> plt.Figure:
    """Mean attack loss at each inner step, one line per attack."""
    figure, ax = plt.subplots(figsize=(4.5, 3.2))
    for label, losses in curves.items():
        ax.plot(range(len(losses)), losses, marker="o", markersize=3, label=label)
    ax.set_xlabel("inner step (0: start, last: final adversarial input)")
    ax.set_ylabel("mean loss")
    ax.set_title(f"attack ascent, epoch {epoch}", fontsize=9)
    ax.legend(fontsize=8)
    figure.tight_layout()
    return figure
