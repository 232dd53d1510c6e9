"""Robust accuracy against BLOB_QG (and further attacks) during training, with an overfitting guard.

A cheap inner attack (FGSM-RS, few-step PGD) can make a model robust to that attack only, or collapse
its robustness within an epoch ("catastrophic overfitting", Wong et al. 2020). This callback measures
robustness with a stronger attack than the one trained on: by default BLOB_QG (Liu & Tsang, Eq.
10-11), then APGD-T over 2 targets on the examples BLOB_QG left robust; an example counts as robust
only when it survives every attack run (per-example worst case, :data:`WORST_ACC`). Epochs are
Lightning's, numbered from 0 as in the progress bar. Tags are documented in docs/MONITORING.md.
With weight averaging (``train.py --ema``) the averaged weights are evaluated, as validation does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, WeightAveraging
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torchmetrics import SumMetric

from qgtrain.attacks import Attack, attack_class, attack_for_budget
from qgtrain.callbacks.validation_data import (
    limited_validation_size,
    shard_batches,
    subset_indices,
    validation_dataset,
)
from qgtrain.evaluation.protocol import evaluate_suite

log = logging.getLogger(__name__)

PREFIX = "robust"
WORST_ACC = f"{PREFIX}/worst_acc"
"""The monitor's robust accuracy (per-example worst case over its attacks): ``best.ckpt``'s monitor."""
DEFAULT_EXTRA_ATTACKS = ["apgd_t"]
DEFAULT_ATTACK_KWARGS: dict[str, dict[str, Any]] = {"apgd_t": {"targets": 2}}
"""The monitor's default after BLOB_QG-20: APGD-T-20 over the 2 most likely wrong classes, chosen
against the original AutoAttack at <= 10 % of an epoch's gradients (docs/RESULTS.md, "Evaluation strength")."""


class RobustnessEvaluation(Callback):
    """Every ``every_n_epochs`` epochs (the first, then every N-th, and at the end of training)
    evaluate the model on a fixed seeded subset of the validation split against ``attack``
    (BLOB_QG by default) and each of ``extra_attacks``.

    Logs ``robust/clean_acc``, ``robust/<attack>_acc`` per attack, ``robust/worst_acc`` (per-example
    worst case over all attacks), ``robust/best_worst_acc``, ``robust/eval_seconds``,
    ``robust/eval_time_share`` and ``robust/gradient_share`` (gradients spent / the naive count).
    With ``early_exit`` (the default, as AutoAttack) the attacks run in order and each attacks only
    the examples still robust, so ``robust/<attack>_acc`` is the accuracy left after that attack and
    the ones before it; without, each attack's own accuracy. ``eps=None`` takes the radius of the
    module's ``val_attack`` (else its ``inner``); ``alpha=None`` is the attack class's default step
    size (``2.5 * eps / steps`` for iterative attacks); ``attack_kwargs`` gives further arguments per
    attack name (e.g. ``{"apgd_t": {"targets": 9}}``). Attacks run with the model in eval mode
    under a forked RNG (seeded from ``seed`` and the batch number), so training state and the
    training RNG are untouched. The subset is capped by what ``limit_val_batches`` lets validation
    see, so a quick run gets a quick evaluation. Under DDP whole batches are sharded across ranks
    and the counts are summed with torchmetrics, so 1 and N processes report the same accuracy for
    the same model. ``extra_attacks=None`` means ``["apgd_t"]`` and ``attack_kwargs=None`` means
    ``{"apgd_t": {"targets": 2}}``: APGD-T over the 2 most likely wrong classes after BLOB_QG, the
    monitor chosen by ``benchmarks/evaluation_strength.py`` (its distance to AutoAttack is in
    docs/RESULTS.md, "Evaluation strength"); ``[]`` runs the main attack only.

    The overfitting guard warns when ``robust/worst_acc`` falls more than ``overfit_margin``
    (absolute) below its best so far, or, for a single-step inner attack after the eps warm-up,
    when the training attack's accuracy ``train/adv_acc`` exceeds ``robust/worst_acc`` by more
    than ``overfit_gap`` (the model resists its own attack only: catastrophic overfitting that
    was there from the start, which a fall from the best cannot show); it stops training when
    ``stop_on_overfit``.
    ``every_n_epochs=0`` turns the callback off.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        subset_size: int = 1000,
        batch_size: int = 200,
        attack: str = "blob_qg",
        extra_attacks: list[str] | None = None,
        attack_kwargs: dict[str, dict[str, Any]] | None = None,
        early_exit: bool = True,
        eps: float | None = None,
        alpha: float | None = None,
        steps: int = 20,
        b: int = 100,
        restarts: int = 1,
        random_start: bool = True,
        seed: int = 0,
        overfit_margin: float = 0.1,
        overfit_gap: float = 0.3,
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
            extra_attacks: Further attacks, run after the main one (null: [apgd_t]; []: none).
            attack_kwargs: Further arguments per attack name (null: {apgd_t: {targets: 2}}).
            early_exit: Attack only the examples still robust, in order, as AutoAttack does.
            eps: L-inf radius (null: the module's val_attack radius, else its inner attack's).
            alpha: Step size of the iterative attacks (null: the class's default, 2.5 * eps / steps).
            steps: Steps of the iterative attacks (single-step ones keep 1).
            b: Quantization level of the main attack (1 = sign gradient).
            restarts: Random starts per attack; an example counts as robust only if none fools it.
            random_start: Start the iterative attacks from a uniform point in the eps-ball.
            seed: Seed of the subset choice and of the attacks' forked per-batch RNG.
            overfit_margin: Warn when robust/worst_acc falls this much (absolute) below its best.
            overfit_gap: Warn when a single-step inner attack's train/adv_acc exceeds robust/worst_acc
                by this much (absolute), after the eps warm-up.
            stop_on_overfit: Also stop training when either happens.
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
        for name, value in (("overfit_margin", overfit_margin), ("overfit_gap", overfit_gap)):
            if not value >= 0:
                raise ValueError(f"robustness.{name} must be >= 0, got {value}")
        self.every_n_epochs = int(every_n_epochs)
        self.subset_size = int(subset_size)
        self.batch_size = int(batch_size)
        self.attack_names = [attack, *(DEFAULT_EXTRA_ATTACKS if extra_attacks is None else extra_attacks)]
        if len(set(self.attack_names)) != len(self.attack_names):
            raise ValueError(f"robustness attacks repeat a name: {self.attack_names}; list each attack once")
        for name in self.attack_names:
            attack_class(name)  # a one-line error for an unknown name, before training starts
        if attack_kwargs is None:
            attack_kwargs = {k: v for k, v in DEFAULT_ATTACK_KWARGS.items() if k in self.attack_names}
        self.attack_kwargs = {name: dict(kwargs) for name, kwargs in attack_kwargs.items()}
        unused = set(self.attack_kwargs) - set(self.attack_names)
        if unused:
            raise ValueError(
                f"robustness.attack_kwargs names {sorted(unused)}, which are not among {self.attack_names}"
            )
        self.early_exit = bool(early_exit)
        self.eps = eps
        self.alpha = alpha
        self.steps = steps
        self.b = b
        self.restarts = restarts
        self.random_start = random_start
        self.seed = int(seed)
        self.overfit_margin = float(overfit_margin)
        self.overfit_gap = float(overfit_gap)
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
        """``{name: attack}``, each built by its class for the budget (``eps``, ``steps``, ``alpha``;
        single-step attacks keep their own step, Square its queries); ``b`` goes to the main attack
        only (extra attacks keep their class default, e.g. sign for PGD); ``attack_kwargs`` last."""
        attacks = {}
        for position, name in enumerate(self.attack_names):
            kwargs: dict[str, Any] = {"restarts": self.restarts}
            if not self.random_start:
                kwargs["random_start"] = False
            kwargs.update(self.attack_kwargs.get(name, {}))
            b = self.b if position == 0 else None
            attacks[name] = attack_for_budget(name, eps, self.steps, alpha=self.alpha, b=b, **kwargs)
        return attacks

    def resolve_eps(self, pl_module: L.LightningModule) -> float:
        if self.eps is not None:
            return float(self.eps)
        for attr in ("val_attack", "inner"):
            attack = getattr(pl_module, attr, None)
            if isinstance(attack, Attack):
                return attack.eps
        raise ValueError("robustness.eps is not set and the module has no val_attack/inner to take it from")

    def is_due(self, trainer: L.Trainer, epoch: int | None = None) -> bool:
        """First epoch, every N-th epoch, the last epoch, or when training is about to stop (``epoch``:
        the current one, else a later one of the plan)."""
        stopping = trainer.should_stop and epoch in (None, trainer.current_epoch)
        epoch = trainer.current_epoch if epoch is None else epoch
        last = trainer.max_epochs is not None and trainer.max_epochs > 0 and epoch + 1 >= trainer.max_epochs
        return epoch == 0 or (epoch + 1) % self.every_n_epochs == 0 or last or stopping

    def planned_gradients(self, trainer: L.Trainer, epochs: range) -> int:
        """Input gradients the evaluations after ``epochs`` spend at most (each attack on every example
        of the subset, no early exit): the monitor's share of the run's estimate (``RunEstimate``)."""
        if not self.enabled or not self.attacks:
            return 0
        examples = min(self.subset_size, limited_validation_size(trainer, len(validation_dataset(trainer))))
        per_evaluation = examples * sum(attack.gradients_per_example for attack in self.attacks.values())
        return per_evaluation * sum(self.is_due(trainer, epoch) for epoch in epochs)

    def describe(self, trainer: L.Trainer) -> str:
        """What ``robust/worst_acc`` measures, for the run's summary: its attacks and images."""
        examples = min(self.subset_size, limited_validation_size(trainer, len(validation_dataset(trainer))))
        attacks = ", ".join(f"{name}-{attack.steps}" for name, attack in self.attacks.items())
        return f"the per-example worst case of {attacks} on {examples} validation images"

    # ---------------------------------------------------------------- hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.enabled and stage == "fit":
            self.attacks = self.build_attacks(self.resolve_eps(pl_module))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start = time.perf_counter()  # an epoch resumed inside gets no epoch-start hook

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
        self.check_overfitting(trainer.current_epoch, results[WORST_ACC], trainer)
        train_adv_acc = single_step_training_accuracy(pl_module)
        if train_adv_acc is not None:
            self.check_training_gap(trainer.current_epoch, train_adv_acc, results[WORST_ACC], trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled:
            return
        if self.evaluate_at_end and self._evaluated_step != trainer.global_step:
            # Stopped inside an epoch (max_steps, max_time): evaluate the final weights. `self.log`
            # is not allowed here, so write to the loggers directly.
            results = self.evaluate(trainer, pl_module)
            for logger in trainer.loggers:
                logger.log_metrics(results, step=trainer.global_step)
            self.check_overfitting(trainer.current_epoch, results[WORST_ACC], trainer)
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

        with averaged_weights(trainer, pl_module) as averaged:
            outcome = evaluate_suite(
                model, list(self.attacks.values()), batches, device, self.seed, self.early_exit, first
            )
        correct = {"clean": outcome.clean, **dict(zip(self.attacks, outcome.after, strict=True))}
        correct["worst"] = outcome.robust

        keys = [*correct, "total", "gradients", "naive_gradients"]
        counts = {key: SumMetric().to(device) for key in keys}
        for key, vector in correct.items():
            counts[key].update(vector.sum().to(device, torch.float64))
        spent = {
            "total": float(y.shape[0]),
            "gradients": float(sum(c.gradients for c in outcome.costs)),
            "naive_gradients": float(sum(c.naive_gradients for c in outcome.costs)),
        }
        for key, value in spent.items():
            counts[key].update(torch.tensor(value, dtype=torch.float64, device=device))
        totals = {key: float(metric.compute()) for key, metric in counts.items()}  # sums over ranks
        total = max(totals.pop("total"), 1.0)
        gradient_share = totals.pop("gradients") / max(totals.pop("naive_gradients"), 1.0)

        results = {f"{PREFIX}/{key}_acc": value / total for key, value in totals.items()}
        seconds = time.perf_counter() - start
        results[f"{PREFIX}/eval_seconds"] = seconds
        results[f"{PREFIX}/eval_time_share"] = seconds / max(seconds + self._time_since_eval, 1e-9)
        results[f"{PREFIX}/gradient_share"] = gradient_share
        worst = results[WORST_ACC]
        if self.best_worst_acc is None or worst > self.best_worst_acc:
            self.best_worst_acc, self.best_epoch = worst, trainer.current_epoch
        results[f"{PREFIX}/best_worst_acc"] = self.best_worst_acc
        self._time_since_eval = 0.0
        self._evaluated_step = trainer.global_step
        self.last_results = results
        if trainer.is_global_zero:
            log.info(
                "epoch %d robustness%s on %d validation examples: %s (%.1f s)",
                trainer.current_epoch,
                " of the averaged weights" if averaged else "",
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
        self._flag_overfitting(
            trainer,
            f"robust accuracy fell from {100 * self.best_worst_acc:.1f}% (epoch {self.best_epoch}) to "
            f"{100 * worst_acc:.1f}% (epoch {epoch}), more than the margin of "
            f"{100 * self.overfit_margin:.1f} points: likely catastrophic overfitting (Wong et al.); the "
            "best robust model is in the best checkpoint",
        )
        return True

    def check_training_gap(
        self, epoch: int, train_adv_acc: float, worst_acc: float, trainer: L.Trainer | None = None
    ) -> bool:
        """Warn (and stop when ``stop_on_overfit``) if the single-step training attack's accuracy
        exceeds the monitor's robust accuracy by more than ``overfit_gap``; return whether it did."""
        if not overfit_gap_exceeded(train_adv_acc, worst_acc, self.overfit_gap):
            return False
        self._flag_overfitting(
            trainer,
            f"epoch {epoch}: the single-step training attack leaves {100 * train_adv_acc:.1f}% of training "
            f"examples correct, the robustness evaluation {100 * worst_acc:.1f}% of validation examples, "
            f"a gap above {100 * self.overfit_gap:.1f} points: the model resists its training attack "
            "only, likely catastrophic overfitting (Wong et al.)",
        )
        return True

    def _flag_overfitting(self, trainer: L.Trainer | None, message: str) -> None:
        """Record a guard's finding, warn once (rank zero), and stop when ``stop_on_overfit``."""
        self.overfit_detected = True
        if trainer is None or trainer.is_global_zero:
            stopping = "; stopping training (robustness.stop_on_overfit)" if self.stop_on_overfit else ""
            log.warning("%s%s", message, stopping)
        if self.stop_on_overfit and trainer is not None:
            trainer.should_stop = True

    # ---------------------------------------------------------------- HParams tab
    def write_hparams(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Hyperparameters with final clean and robust accuracy, for TensorBoard's HParams tab."""
        metrics = {
            "hparams/clean_acc": self.last_results[f"{PREFIX}/clean_acc"],
            "hparams/robust_acc": self.last_results[WORST_ACC],
            "hparams/best_robust_acc": self.best_worst_acc,
        }
        params = run_hyperparameters(trainer, pl_module, self)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.log_hyperparams(params, metrics)


@contextmanager
def averaged_weights(trainer: L.Trainer, pl_module: L.LightningModule) -> Iterator[bool]:
    """The weights validation sees, in ``pl_module`` for the block; yields whether they are averaged.

    Lightning's ``WeightAveraging`` callbacks (EMA, SWA) swap their averaged weights into the module
    in ``on_validation_epoch_start`` and the trained ones back in ``on_validation_epoch_end``. The
    monitor runs at the training epoch's end, outside that window, so it calls the same two hooks."""
    averaging = [callback for callback in trainer.callbacks if isinstance(callback, WeightAveraging)]
    for callback in averaging:
        callback.on_validation_epoch_start(trainer, pl_module)
    try:
        yield bool(averaging)
    finally:
        for callback in reversed(averaging):
            callback.on_validation_epoch_end(trainer, pl_module)


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
        config = main.config()  # an attack without b (RGD, FAB-T, Square) logs none
        params.update({f"robust/{k}": _scalar(config[k]) for k in ("eps", "steps", "alpha", "b") if k in config})
    params["robust/subset_size"] = robustness.subset_size
    return params


def overfit_gap_exceeded(train_adv_acc: float, worst_acc: float, gap: float) -> bool:
    """Catastrophic overfitting's signature: the training attack's accuracy exceeds the monitor's
    robust accuracy by more than ``gap`` (absolute)."""
    return train_adv_acc - worst_acc > gap


def single_step_training_accuracy(pl_module: L.LightningModule) -> float | None:
    """This epoch's ``train/adv_acc`` when the module trains with a single-step attack at full eps
    (after the warm-up), else ``None`` (multi-step attacks and warm-up epochs are not judged)."""
    inner = getattr(pl_module, "inner", None)
    metric = getattr(pl_module, "train_adv_acc", None)
    if not isinstance(inner, Attack) or not inner.single_step or metric is None:
        return None
    current = getattr(pl_module, "current_inner", lambda: inner)()
    if current is None or current.eps < inner.eps or not metric.update_called:
        return None
    return float(metric.compute())
