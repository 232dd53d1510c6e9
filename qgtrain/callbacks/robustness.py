"""Robust accuracy against BLOB_QG (and further attacks) during training, with an overfitting guard.

A cheap inner attack (FGSM-RS, few-step PGD) can make a model robust to that attack only, or collapse
its robustness within an epoch ("catastrophic overfitting", Wong et al. 2020). This callback measures
robustness with a stronger attack than the one trained on: BLOB_QG (Liu & Tsang, Eq. 10-11) and, by
default, PGD; an example counts as robust only when it survives every attack run (per-example worst
case). Tags are documented in docs/MONITORING.md.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import Dataset
from torchmetrics import SumMetric

from qgtrain.attacks import Attack, attack_class, build_attack
from qgtrain.evaluation import adversarial_correct, clean_correct, worst_case_correct

log = logging.getLogger(__name__)

PREFIX = "robust"


def default_alpha(eps: float, steps: int) -> float:
    """Step size ``2.5 * eps / steps`` (Madry et al.'s rule: enough travel to cross the ball)."""
    return 2.5 * eps / steps


def subset_indices(dataset_size: int, subset_size: int, seed: int) -> torch.Tensor:
    """A fixed seeded choice of ``min(subset_size, dataset_size)`` example indices."""
    order = torch.randperm(dataset_size, generator=torch.Generator().manual_seed(seed))
    return order[: min(subset_size, dataset_size)]


def shard_batches(num_examples: int, batch_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous block of whole batches: ``(first_batch, end_batch)``.

    Sharding whole batches (not examples) keeps every batch, and the RNG stream of its batch
    number, identical for any number of processes; so even batch-coupled attacks (BLOB's
    particles) and random starts give the same per-example results on 1 and N processes.
    """
    num_batches = math.ceil(num_examples / batch_size)
    per_rank, extra = divmod(num_batches, world_size)
    first = rank * per_rank + min(rank, extra)
    return first, first + per_rank + (1 if rank < extra else 0)


def validation_dataset(trainer: L.Trainer) -> Dataset:
    """The datamodule's ``val_set``, else the dataset of the (first) validation dataloader."""
    datamodule = getattr(trainer, "datamodule", None)
    dataset = getattr(datamodule, "val_set", None)
    if dataset is None:
        loaders = trainer.val_dataloaders
        if isinstance(loaders, list | tuple):
            loaders = loaders[0] if loaders else None
        dataset = getattr(loaders, "dataset", None)
    if dataset is None:
        raise ValueError(
            "RobustnessEvaluation needs validation data (a datamodule with val_set or a val dataloader); "
            "set robustness.every_n_epochs: 0 to turn it off"
        )
    return dataset


def limited_validation_size(trainer: L.Trainer, dataset_size: int) -> int:
    """How many validation examples the run's ``limit_val_batches`` lets validation see.

    A quick run (``limit_val_batches=2``, ``fast_dev_run``) also gets a quick robustness evaluation;
    ``limit_val_batches`` of 0 or 1.0 leaves the validation split whole.
    """
    limit = trainer.limit_val_batches
    if isinstance(limit, float) and 0.0 < limit < 1.0:
        return max(1, int(limit * dataset_size))
    if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
        batch_size = getattr(getattr(trainer, "datamodule", None), "eval_batch_size", None)
        loaders = trainer.val_dataloaders
        if batch_size is None and loaders is not None:
            loader = loaders[0] if isinstance(loaders, list | tuple) else loaders
            batch_size = getattr(loader, "batch_size", None)
        if batch_size:
            return min(dataset_size, limit * int(batch_size))
    return dataset_size


class RobustnessEvaluation(Callback):
    """Every ``every_n_epochs`` epochs (the first, then every N-th, and at the end of training)
    evaluate the model on a fixed seeded subset of the validation split against ``attack``
    (BLOB_QG by default) and each of ``extra_attacks``.

    Logs ``robust/clean_acc``, ``robust/<attack>_acc`` per attack, ``robust/worst_acc`` (per-example
    worst case over all attacks), ``robust/best_worst_acc``, ``robust/eval_seconds`` and
    ``robust/eval_time_share``. ``eps=None`` takes the radius of the module's ``val_attack`` (else
    its ``inner``); ``alpha=None`` is ``2.5 * eps / steps``. Attacks run with the model in eval mode
    under a forked RNG (seeded from ``seed`` and the batch number), so training state and the
    training RNG are untouched. The subset is capped by what ``limit_val_batches`` lets validation
    see, so a quick run gets a quick evaluation. Under DDP whole batches are sharded across ranks
    and the counts are summed with torchmetrics, so 1 and N processes report the same accuracy for
    the same model. ``extra_attacks=None`` means ``["pgd"]``; ``[]`` runs the main attack only.

    The overfitting guard warns when ``robust/worst_acc`` falls more than ``overfit_margin``
    (absolute) below its best so far, and stops training when ``stop_on_overfit``.
    ``every_n_epochs=0`` turns the callback off.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        subset_size: int = 1000,
        batch_size: int = 200,
        attack: str = "blob_qg",
        extra_attacks: list[str] | None = None,
        eps: float | None = None,
        alpha: float | None = None,
        steps: int = 20,
        b: int = 100,
        restarts: int = 1,
        random_start: bool = True,
        seed: int = 0,
        overfit_margin: float = 0.1,
        stop_on_overfit: bool = False,
        evaluate_at_end: bool = True,
        log_hparams: bool = True,
    ) -> None:
        """Configure the evaluation; attack arguments are checked here, before training starts.

        Args:
            every_n_epochs: Evaluate every N epochs (and the first and last); 0 turns it off.
            subset_size: Validation examples evaluated (a fixed seeded subset).
            batch_size: Examples per attack batch (batch-coupled attacks such as BLOB see these together).
            attack: Main attack (a registered name; BLOB_QG by default).
            extra_attacks: Further attacks in the per-example worst case (null: [pgd]; []: none).
            eps: L-inf radius (null: the module's val_attack radius, else its inner attack's).
            alpha: Step size of the iterative attacks (null: 2.5 * eps / steps).
            steps: Steps of the iterative attacks (single-step ones keep 1).
            b: Quantization level of the main attack (1 = sign gradient).
            restarts: Random starts per attack; an example counts as robust only if none fools it.
            random_start: Start the iterative attacks from a uniform point in the eps-ball.
            seed: Seed of the subset choice and of the attacks' forked per-batch RNG.
            overfit_margin: Warn when robust/worst_acc falls this much (absolute) below its best.
            stop_on_overfit: Also stop training when that happens.
            evaluate_at_end: Evaluate the final weights when training stops inside an epoch.
            log_hparams: Write the run's hyperparameters with the robust accuracies to TensorBoard HParams.
        """
        super().__init__()
        if isinstance(every_n_epochs, bool) or every_n_epochs < 0:
            raise ValueError(f"robustness.every_n_epochs must be >= 0 (0 turns it off), got {every_n_epochs}")
        checked = (
            ("subset_size", subset_size),
            ("batch_size", batch_size),
            ("steps", steps),
            ("restarts", restarts),
        )
        for name, value in checked:
            if isinstance(value, bool) or value < 1:
                raise ValueError(f"robustness.{name} must be an integer >= 1, got {value}")
        if not overfit_margin >= 0:
            raise ValueError(f"robustness.overfit_margin must be >= 0, got {overfit_margin}")
        self.every_n_epochs = int(every_n_epochs)
        self.subset_size = int(subset_size)
        self.batch_size = int(batch_size)
        self.attack_names = [attack, *(["pgd"] if extra_attacks is None else extra_attacks)]
        if len(set(self.attack_names)) != len(self.attack_names):
            raise ValueError(f"robustness attacks repeat a name: {self.attack_names}; list each attack once")
        for name in self.attack_names:
            attack_class(name)  # a one-line error for an unknown name, before training starts
        self.eps = eps
        self.alpha = alpha
        self.steps = steps
        self.b = b
        self.restarts = restarts
        self.random_start = random_start
        self.seed = int(seed)
        self.overfit_margin = float(overfit_margin)
        self.stop_on_overfit = bool(stop_on_overfit)
        self.evaluate_at_end = bool(evaluate_at_end)
        self.log_hparams = bool(log_hparams)
        if eps is not None:
            self.build_attacks(eps)  # validate the attack arguments now
        self.attacks: dict[str, Attack] = {}
        self.best_worst_acc: float | None = None
        self.best_epoch: int | None = None
        self.last_results: dict[str, float] = {}
        self.overfit_detected = False
        self._evaluated_step: int | None = None
        self._time_since_eval = 0.0
        self._epoch_start = 0.0

    # ---------------------------------------------------------------- configuration
    @property
    def enabled(self) -> bool:
        return self.every_n_epochs > 0

    def build_attacks(self, eps: float) -> dict[str, Attack]:
        """``{name: attack}``; iterative attacks share eps, steps, alpha, restarts and random start,
        single-step ones (FGSM, FGSM-RS) keep their own step count and step size; ``b`` goes to the
        main attack only (extra attacks keep their class default, e.g. sign for PGD)."""
        attacks = {}
        for position, name in enumerate(self.attack_names):
            kwargs: dict[str, Any] = {"eps": eps, "restarts": self.restarts}
            if attack_class(name)().steps > 1:
                alpha = self.alpha if self.alpha is not None else default_alpha(eps, self.steps)
                kwargs.update(steps=self.steps, alpha=alpha, random_start=self.random_start)
            if position == 0:
                kwargs["b"] = self.b
            attacks[name] = build_attack(name, **kwargs)
        return attacks

    def resolve_eps(self, pl_module: L.LightningModule) -> float:
        if self.eps is not None:
            return float(self.eps)
        for attr in ("val_attack", "inner"):
            attack = getattr(pl_module, attr, None)
            if isinstance(attack, Attack):
                return attack.eps
        raise ValueError("robustness.eps is not set and the module has no val_attack/inner to take it from")

    def is_due(self, trainer: L.Trainer) -> bool:
        """First epoch, every N-th epoch, the last epoch, or when training is about to stop."""
        epoch = trainer.current_epoch
        last = trainer.max_epochs is not None and trainer.max_epochs > 0 and epoch + 1 >= trainer.max_epochs
        return epoch == 0 or (epoch + 1) % self.every_n_epochs == 0 or last or trainer.should_stop

    # ---------------------------------------------------------------- hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.enabled and stage == "fit":
            self.attacks = self.build_attacks(self.resolve_eps(pl_module))

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._time_since_eval += time.perf_counter() - self._epoch_start
        if not self.enabled or trainer.sanity_checking or not self.is_due(trainer):
            return
        results = self.evaluate(trainer, pl_module)
        for key, value in results.items():
            # Already summed over ranks, so every rank holds the same value; sync_dist only keeps
            # Lightning's distributed-logging check quiet (the mean of equal values is that value).
            pl_module.log(key, value, on_step=False, on_epoch=True, sync_dist=True)
        self.check_overfitting(trainer.current_epoch, results[f"{PREFIX}/worst_acc"], trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled:
            return
        if self.evaluate_at_end and self._evaluated_step != trainer.global_step:
            # Stopped inside an epoch (max_steps, max_time): evaluate the final weights. `self.log`
            # is not allowed here, so write to the loggers directly.
            results = self.evaluate(trainer, pl_module)
            for logger in trainer.loggers:
                logger.log_metrics(results, step=trainer.global_step)
            self.check_overfitting(trainer.current_epoch, results[f"{PREFIX}/worst_acc"], trainer)
        if self.log_hparams and self.last_results:
            self.write_hparams(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"best_worst_acc": self.best_worst_acc, "best_epoch": self.best_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_worst_acc = state_dict.get("best_worst_acc")
        self.best_epoch = state_dict.get("best_epoch")

    # ---------------------------------------------------------------- evaluation
    def subset(self, trainer: L.Trainer) -> tuple[torch.Tensor, torch.Tensor]:
        """The fixed evaluation subset as ``(x, y)`` tensors (same on every rank)."""
        dataset = validation_dataset(trainer)
        pool = limited_validation_size(trainer, len(dataset))
        indices = subset_indices(len(dataset), min(self.subset_size, pool), self.seed)
        examples = [dataset[int(i)] for i in indices]
        x = torch.stack([torch.as_tensor(e[0]) for e in examples])
        y = torch.as_tensor([int(e[1]) for e in examples], dtype=torch.long)
        return x, y

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Evaluate this rank's shard, sum the counts over ranks, return the logged values."""
        start = time.perf_counter()
        if not self.attacks:
            self.attacks = self.build_attacks(self.resolve_eps(pl_module))
        model: nn.Module = getattr(pl_module, "net", pl_module)
        x, y = self.subset(trainer)
        first, end = shard_batches(y.shape[0], self.batch_size, trainer.global_rank, trainer.world_size)
        x = x[first * self.batch_size : end * self.batch_size]
        y = y[first * self.batch_size : end * self.batch_size]
        # A rank may hold no batch (fewer batches than ranks); it still joins the sums below.
        batches = list(zip(x.split(self.batch_size), y.split(self.batch_size), strict=True)) if len(y) else []
        device = pl_module.device

        correct = {"clean": clean_correct(model, batches, device)}
        for name, attack in self.attacks.items():
            correct[name] = adversarial_correct(
                model, attack, batches, device, seed=self.seed, first_batch_index=first
            )
        correct["worst"] = worst_case_correct(correct[name] for name in self.attacks)

        counts = {key: SumMetric().to(device) for key in [*correct, "total"]}
        for key, vector in correct.items():
            counts[key].update(vector.sum().to(device, torch.float64))
        counts["total"].update(torch.tensor(float(y.shape[0]), dtype=torch.float64, device=device))
        totals = {key: float(metric.compute()) for key, metric in counts.items()}  # sums over ranks
        total = max(totals.pop("total"), 1.0)

        results = {f"{PREFIX}/{key}_acc": value / total for key, value in totals.items()}
        seconds = time.perf_counter() - start
        results[f"{PREFIX}/eval_seconds"] = seconds
        results[f"{PREFIX}/eval_time_share"] = seconds / max(seconds + self._time_since_eval, 1e-9)
        worst = results[f"{PREFIX}/worst_acc"]
        if self.best_worst_acc is None or worst > self.best_worst_acc:
            self.best_worst_acc, self.best_epoch = worst, trainer.current_epoch
        results[f"{PREFIX}/best_worst_acc"] = self.best_worst_acc
        self._time_since_eval = 0.0
        self._evaluated_step = trainer.global_step
        self.last_results = results
        if trainer.is_global_zero:
            log.info(
                "epoch %d robustness on %d validation examples: %s (%.1f s)",
                trainer.current_epoch,
                int(total),
                ", ".join(f"{key}={100 * value / total:.1f}%" for key, value in totals.items()),
                seconds,
            )
        return results

    # ---------------------------------------------------------------- overfitting guard
    def check_overfitting(self, epoch: int, worst_acc: float, trainer: L.Trainer | None = None) -> bool:
        """Warn (and stop training when ``stop_on_overfit``) if ``worst_acc`` fell more than
        ``overfit_margin`` below the best robust accuracy so far; return whether it did."""
        if self.best_worst_acc is None or worst_acc > self.best_worst_acc:
            self.best_worst_acc, self.best_epoch = worst_acc, epoch
        drop = self.best_worst_acc - worst_acc
        if drop <= self.overfit_margin:
            return False
        self.overfit_detected = True
        if trainer is None or trainer.is_global_zero:
            log.warning(
                "robust accuracy fell from %.1f%% (epoch %d) to %.1f%% (epoch %d), more than the margin "
                "of %.1f points: likely catastrophic overfitting (Wong et al.); the best robust model is "
                "in the best checkpoint%s",
                100 * self.best_worst_acc,
                self.best_epoch,
                100 * worst_acc,
                epoch,
                100 * self.overfit_margin,
                "; stopping training (robustness.stop_on_overfit)" if self.stop_on_overfit else "",
            )
        if self.stop_on_overfit and trainer is not None:
            trainer.should_stop = True
        return True

    # ---------------------------------------------------------------- HParams tab
    def write_hparams(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Hyperparameters with final clean and robust accuracy, for TensorBoard's HParams tab."""
        metrics = {
            "hparams/clean_acc": self.last_results[f"{PREFIX}/clean_acc"],
            "hparams/robust_acc": self.last_results[f"{PREFIX}/worst_acc"],
            "hparams/best_robust_acc": self.best_worst_acc,
        }
        params = run_hyperparameters(trainer, pl_module, self)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.log_hyperparams(params, metrics)


def _scalar(value: Any) -> Any:
    return value if isinstance(value, bool | int | float | str) else str(value)


def run_hyperparameters(
    trainer: L.Trainer, pl_module: L.LightningModule, robustness: RobustnessEvaluation
) -> dict[str, Any]:
    """A flat dict of the run's hyperparameters (scalars only): module, inner attack, data, eval."""
    params: dict[str, Any] = {f"model/{k}": _scalar(v) for k, v in dict(pl_module.hparams).items()}
    net = getattr(pl_module, "net", None)
    if net is not None:
        params["model/net"] = type(net).__name__
    inner = getattr(pl_module, "inner", None)
    if isinstance(inner, Attack):
        params.update({f"inner/{k}": _scalar(v) for k, v in inner.config().items()})
    else:
        params["inner/name"] = "none"
    datamodule = getattr(trainer, "datamodule", None)
    for key in ("batch_size", "train_subset", "val_size"):
        if hasattr(datamodule, key):
            params[f"data/{key}"] = _scalar(getattr(datamodule, key))
    params["trainer/max_epochs"] = _scalar(trainer.max_epochs)
    params["trainer/world_size"] = trainer.world_size
    optimizer = trainer.optimizers[0] if trainer.optimizers else None
    if optimizer is not None:
        params["optimizer/name"] = type(optimizer).__name__
        params["optimizer/lr"] = float(optimizer.param_groups[0].get("initial_lr", optimizer.defaults["lr"]))
    main = next(iter(robustness.attacks.values()), None)
    params["robust/attacks"] = ",".join(robustness.attack_names)
    if main is not None:
        params.update({f"robust/{k}": _scalar(main.config()[k]) for k in ("eps", "steps", "alpha", "b")})
    params["robust/subset_size"] = robustness.subset_size
    return params
