"""Madry-style min-max training: ``min_theta E[max_{x' in B(x, eps)} L(theta, x', y)]`` (paper Eq. 1).

The network and the inner maximiser are injected; the inner attack is any :class:`qgtrain.attacks.Attack`
(PGD, PQGD with few steps, FGSM-RS, BLOB, BLOB_QG) or ``None`` for standard training. The cheap
methods: free adversarial training (an inner attack with the ``reuses_training_backward`` trait,
:class:`qgtrain.attacks.Free`), ATTA (``atta``: a per-example perturbation buffer,
:mod:`qgtrain.training.atta`) and the TRADES objective (``objective="trades"``); the MART objective
(``objective="mart"``) and adversarial weight perturbation (``awp_gamma``, :mod:`qgtrain.training.awp`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from qgtrain import __version__
from qgtrain.attacks import PGD, Attack, kl_loss, started_at
from qgtrain.attacks.base import DEFAULT_EPS
from qgtrain.compat import attached_trainer
from qgtrain.evaluation.protocol import attack_batch
from qgtrain.models import DATASET_SPECS, Network, model_spec
from qgtrain.training.atta import PerturbationBuffer, request_example_indices
from qgtrain.training.awp import Forward, perturbed_forward, weight_perturbation

log = logging.getLogger(__name__)

OptimizerFactory = Callable[[Iterable[Any]], torch.optim.Optimizer]

VAL_ADV_ACC = "val/adv_acc"
""":class:`AdversarialTraining`'s validation robust accuracy (under its ``val_attack``): ``train.py``'s
``best.ckpt`` monitor when robustness evaluation is off."""


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or inf; training stops instead of learning from garbage."""


def lr_lambda(schedule: str, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the base learning rate at optimizer step ``s`` of ``total_steps``.

    ``constant``; ``piecewise``: x0.1 at 50% and x0.01 at 75% of training (Madry/Rice et al.);
    ``onecycle``: linear 0 -> 1 over the first 40%, then 1 -> 0 (Wong et al.'s cyclic rate).
    """
    total = max(int(total_steps), 1)
    if schedule == "constant":
        return lambda step: 1.0
    if schedule == "piecewise":
        return lambda step: 1.0 if step < 0.5 * total else (0.1 if step < 0.75 * total else 0.01)
    if schedule == "onecycle":
        peak = 0.4 * total
        return lambda step: (step + 1) / peak if step < peak else max(0.0, (total - step) / (total - peak))
    raise ValueError(f"lr_schedule must be constant, piecewise or onecycle, got {schedule!r}")


def schedule_change(schedule: str, recorded_steps: int, total_steps: int, at_step: int) -> str | None:
    """What resuming at optimizer step ``at_step`` does to the learning rate when the schedule now
    spans ``total_steps`` where the checkpoint's run spanned ``recorded_steps`` (``--epochs`` changed:
    :func:`lr_lambda` scales with the span, and Lightning restores the step count), else ``None``."""
    if schedule == "constant" or int(recorded_steps) == int(total_steps):
        return None
    was, now = lr_lambda(schedule, recorded_steps)(at_step), lr_lambda(schedule, total_steps)(at_step)
    return (
        f"resuming: the {schedule} learning-rate schedule now spans {int(total_steps)} optimizer steps "
        f"(recorded: {int(recorded_steps)}; --epochs or --trainer.max_steps changed); at step {at_step} "
        f"the rate is {now:.3g}x the base lr ({was:.3g}x as recorded)"
    )


def looks_like_probabilities(outputs: torch.Tensor, atol: float = 1e-3) -> bool:
    """True when every row of ``outputs`` is in [0, 1] and sums to 1 (a softmax, not logits)."""
    outputs = outputs.detach().float()
    if outputs.dim() != 2 or outputs.shape[1] < 2 or not bool(torch.isfinite(outputs).all()):
        return False
    in_range = bool((outputs >= 0).all() and (outputs <= 1).all())
    row_sums = outputs.sum(dim=1)
    return in_range and bool(torch.allclose(row_sums, torch.ones_like(row_sums), atol=atol))


def warn_if_probabilities(outputs: torch.Tensor) -> None:
    """Cross-entropy and the attacks' losses expect logits; a final softmax flattens their gradients."""
    if looks_like_probabilities(outputs):
        rank_zero_warn(
            "the network's outputs look like probabilities (every row is in [0, 1] and sums to 1); "
            "AdversarialTraining and the attacks expect logits: remove the final softmax",
            category=UserWarning,
        )


def warn_if_radius_erases_inputs(inner: Attack | None) -> None:
    """An L-inf ball of radius >= half the input range holds the constant mid-range image around every
    input: the inner maximiser can erase any example, no classifier is robust at that radius, and the
    min-max collapses to chance (MNIST at eps 0.5: docs/RESULTS.md section 3)."""
    eps, clip = getattr(inner, "eps", None), getattr(inner, "clip", None)
    if eps is None or clip is None:
        return
    half_range = (clip[1] - clip[0]) / 2
    if eps >= half_range:
        rank_zero_warn(
            f"the inner attack's eps {eps:g} is at least half the input range {tuple(clip)}: every input "
            f"reaches the constant {clip[0] + half_range:g} image, so no classifier is robust at the "
            "training radius and training collapses to chance; train at a smaller eps",
            category=UserWarning,
        )


def default_val_attack() -> PGD:
    return PGD(eps=DEFAULT_EPS, alpha=0.04, steps=10)


TRADES_START_STD = 0.001
"""TRADES's start ``x + 0.001 N(0, 1)`` (Zhang et al.'s reference code)."""

TRAINING_PASSES = {"madry": 1, "mixed": 2, "trades": 2, "mart": 2}
"""Forward-backward passes through the network per training example and step, by objective: madry
trains on ``f(x')``; mixed, TRADES and MART on ``f(x)`` and ``f(x')`` (TRADES's attack also needs one
forward pass for its target ``softmax(f(x))``, not counted here). AWP repeats them once more on the
steps it perturbs (:func:`awp_data_passes`)."""

OBJECTIVE_ATTACK_LOSS = {"trades": "kl", "mart": "ce"}
"""The loss an objective's inner maximisation needs: TRADES maximises KL(f(x) || f(x')) (Zhang et al.
2019, Eq. 5), MART the cross-entropy (Wang et al. 2020, mart.py). Other objectives keep the attack's own."""

MART_BCE_OFFSET = 1e-4
"""MART's margin term is ``-log(1 + 1e-4 - max_{k != y} p_k(x'))`` in the reference code (YisenWang/MART,
``log(1.0001 - p)``): the offset bounds the term and its gradient where ``p`` nears 1."""


def mart_loss(
    logits_clean: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, beta: float
) -> torch.Tensor:
    """MART's training loss (Wang et al., ICLR 2020, the MART objective), the mean over the batch of
    ``BCE(p(x'), y) + beta * KL(p(x) || p(x')) * (1 - p_y(x))``, with
    ``BCE(p(x'), y) = -log p_y(x') - log(1 + 1e-4 - max_{k != y} p_k(x'))`` (the reference's offset,
    :data:`MART_BCE_OFFSET`); every term is differentiated, the clean probabilities included."""
    logits_adv, logits_clean = logits_adv.float(), logits_clean.float()
    p_adv = F.softmax(logits_adv, dim=1)
    p_clean = F.softmax(logits_clean, dim=1)
    top_wrong = p_adv.scatter(1, y[:, None], -1.0).argmax(dim=1)
    p_top_wrong = p_adv.gather(1, top_wrong[:, None]).squeeze(1)
    bce = F.cross_entropy(logits_adv, y, reduction="none") - torch.log(1 + MART_BCE_OFFSET - p_top_wrong)
    misclassified = 1 - p_clean.gather(1, y[:, None]).squeeze(1)
    return (bce + beta * kl_loss(logits_adv, p_clean) * misclassified).mean()


def awp_data_passes(data_passes: int, awp_gamma: float, awp_warmup_epochs: int, replays: int = 1) -> int:
    """Data passes on which AWP perturbs the weights (each costs the objective's training passes once
    more): those after its warm-up; an epoch of free training is ``replays`` data passes."""
    return max(data_passes - awp_warmup_epochs * replays, 0) if awp_gamma > 0 else 0


def free_training_epochs(max_epochs: int, replays: int) -> int:
    """Epochs of free adversarial training that make ``max_epochs`` data passes: each batch is
    replayed ``replays`` (m) times, so the run has ``max_epochs / m`` epochs (Shafahi et al. 2019, Alg. 1)."""
    if max_epochs % replays:
        below = max_epochs // replays * replays
        choices = " or ".join(f"--epochs {n}" for n in (below, below + replays) if n > 0)
        raise ValueError(
            f"free adversarial training replays each batch {replays} times and runs epochs / {replays} "
            f"epochs, so max_epochs (--epochs) must be a multiple of replays (--replays) {replays}, "
            f"got {max_epochs}; use {choices}"
        )
    return max_epochs // replays


def with_objective_loss(attack: Attack, objective: str) -> Attack:
    """``attack`` rebuilt (same class, same config) with the loss ``objective``'s inner maximisation needs
    (:data:`OBJECTIVE_ATTACK_LOSS`); unchanged for the other objectives."""
    loss = OBJECTIVE_ATTACK_LOSS.get(objective)
    if loss is None:
        return attack
    if attack.fixed_loss is not None:
        raise ValueError(
            f"objective {objective} maximises the {loss} loss, but {attack.name} fixes its loss "
            f"({attack.fixed_loss}); choose an inner attack with a loss argument (pgd, pqgd, apgd_ce, fgsm_rs...)"
        )
    config = {key: value for key, value in attack.config().items() if key != "name"}
    return attack if config.get("loss") == loss else type(attack)(**{**config, "loss": loss})


class AdversarialTraining(L.LightningModule):
    """Adversarial training of ``net`` against the inner maximiser ``inner``.

    ``objective="madry"`` trains on adversarial examples only (Eq. 1); ``"mixed"`` on
    ``clean_weight * L(x) + (1 - clean_weight) * L(x_adv)``; ``"trades"`` on TRADES's
    ``CE(f(x), y) + beta * KL(f(x) || f(x'))`` (Zhang et al. 2019, Eq. 5), ``x'`` maximising the KL
    term: the inner attack runs with the ``kl`` loss from ``x + 0.001 N(0, 1)``; ``"mart"`` on MART's
    boosted cross-entropy on ``x'`` plus ``beta * KL(f(x) || f(x')) * (1 - p_y(x))`` (:func:`mart_loss`),
    the inner attack as configured with the ``ce`` loss. ``awp_gamma > 0`` takes every objective's loss
    at adversarially perturbed weights (AWP, :mod:`qgtrain.training.awp`). An inner attack with
    the ``reuses_training_backward`` trait (``free``) trains by free adversarial training: each batch
    is replayed ``inner.replays`` times, one optimizer step each, and the epochs are divided by the
    replays so ``max_epochs`` counts data passes. ``atta`` starts the inner attack from each
    example's perturbation of its previous visit (ATTA). The attack runs with the network in
    eval mode when ``attack_in_eval_mode`` (so BatchNorm statistics are neither used per batch nor
    updated by the attack's forward passes). Validation reports clean accuracy and accuracy under
    ``val_attack`` (a cheap PGD by default), with a fixed seed so epochs are comparable.

    Speed: ``channels_last`` stores the network's convolution weights in that layout (the attacks
    follow the parameters' layout); ``compile_net`` compiles the network's forward in place
    (``nn.Module.compile``: checkpoint keys unchanged), opt-in, meant for a GPU (what each costs on the CPU:
    docs/RESULTS.md, "Faster than torchattacks; the main job's step"). ``train/clean_acc`` (madry objective) costs one extra forward pass per
    batch it is measured on, so it is measured on every ``clean_accuracy_every_n_batches``-th batch
    only (an unbiased sample of the epoch's batches; 1 measures every batch); the mixed objective
    computes the clean logits anyway and measures every batch.

    Args:
        net: The network to train (a registered qgtrain model: inputs in [0, 1], logits out).
        inner: Inner maximiser that crafts the training inputs; null trains on clean inputs.
        val_attack: Attack behind ``val/adv_acc`` (null: PGD-10 at the attacks' default radius, step 0.04).
        objective: ``madry`` trains on adversarial inputs only (Eq. 1); ``mixed`` also on clean ones;
            ``trades``: clean cross-entropy + beta * KL(clean || adversarial); ``mart``: boosted
            adversarial cross-entropy + beta * KL(clean || adversarial) * (1 - p_y(clean)).
        clean_weight: Weight of the clean loss under ``objective: mixed``, in [0, 1].
        beta: Weight of the KL term under ``objective: trades`` or ``mart`` (>= 0; 6 in both papers).
        awp_gamma: Relative size gamma of the adversarial weight perturbation (AWP, Wu et al. 2020:
            0.005 in their TRADES code, 0.01 in their PGD-AT code); 0: off, the plain step.
        awp_warmup_epochs: Epochs trained without AWP before it starts (the reference's ``--awp-warmup``;
            free training: epochs of ``replays`` data passes).
        atta: Keep each training example's perturbation across epochs and start the inner attack
            there (ATTA, Zheng et al. 2020); the data module yields the examples' indices (and, with crops
            and flips, each image's view, which the stored perturbation follows). Give the
            attack a small step (their code: eps / 2 for ATTA-1 on CIFAR-10, eps / 30 on MNIST over
            60 epochs): at the class rule 2.5 eps / k a 1-step run lands on a corner every visit.
        atta_reset_epochs: Under ``atta``, start every example afresh each N epochs (0: never): the
            perturbations of epochs 0..N-1 accumulate, epoch N starts again (Zheng et al.'s
            ``--epochs-reset``, 10 in their CIFAR-10 code, whose epochs count from 1: their first
            period is N - 1 epochs).
        attack_in_eval_mode: Run the inner attack with the network in eval mode (BatchNorm untouched).
        optimizer: Optimizer class and its arguments (``lr``...), built over the network's parameters (null: Adam).
        lr_schedule: Per-step learning rate: constant, piecewise (x0.1 at 50%, x0.01 at 75%) or onecycle.
        eps_warmup_epochs: Epochs over which the inner radius ramps linearly from 0 to eps (0 = off).
        track_clean_accuracy: Also log training accuracy on the clean inputs (one more forward pass).
        seed: Seed of the per-batch attack RNG streams and of validation's fixed attack RNG.
        clean_accuracy_every_n_batches: Measure train/clean_acc on every N-th batch (1 = every batch).
        channels_last: Store the network's convolution weights channels_last (the attacks follow).
        compile_net: Compile the network's forward in place (torch.compile; for a GPU, slower on CPU).
    """

    def __init__(
        self,
        net: Network,
        inner: Attack | None = None,
        val_attack: Attack | None = None,
        objective: Literal["madry", "mixed", "trades", "mart"] = "madry",
        clean_weight: float = 0.5,
        beta: float = 6.0,
        awp_gamma: float = 0.0,
        awp_warmup_epochs: int = 0,
        atta: bool = False,
        atta_reset_epochs: int = 0,
        attack_in_eval_mode: bool = True,
        optimizer: OptimizerFactory | None = None,
        lr_schedule: Literal["constant", "piecewise", "onecycle"] = "constant",
        eps_warmup_epochs: float = 0.0,
        track_clean_accuracy: bool = True,
        clean_accuracy_every_n_batches: int = 10,
        channels_last: bool = False,
        compile_net: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if objective not in TRAINING_PASSES:
            raise ValueError(f"objective must be 'madry', 'mixed', 'trades' or 'mart', got {objective!r}")
        if not 0.0 <= clean_weight <= 1.0:
            raise ValueError(f"clean_weight must be in [0, 1], got {clean_weight}")
        if not (isinstance(beta, int | float) and math.isfinite(beta) and beta >= 0):
            raise ValueError(f"beta must be a number >= 0, got {beta!r}")
        if isinstance(awp_gamma, bool) or not (
            isinstance(awp_gamma, int | float) and math.isfinite(awp_gamma) and awp_gamma >= 0
        ):
            raise ValueError(f"awp_gamma must be a number >= 0 (0: no AWP), got {awp_gamma!r}")
        if isinstance(awp_warmup_epochs, bool) or not isinstance(awp_warmup_epochs, int) or awp_warmup_epochs < 0:  # fmt: skip
            raise ValueError(f"awp_warmup_epochs must be an integer >= 0, got {awp_warmup_epochs!r}")
        warn_if_radius_erases_inputs(inner)
        free = getattr(inner, "reuses_training_backward", False)
        if objective in OBJECTIVE_ATTACK_LOSS:
            if inner is None:
                raise ValueError(f"objective {objective} needs an inner attack (--inner pgd, pqgd...), not none")  # fmt: skip
            if free:
                raise ValueError(f"objective {objective} needs an attack that crafts x', not free's in-place step")  # fmt: skip
            inner = with_objective_loss(inner, objective)
        if atta and (inner is None or free):
            raise ValueError(
                "atta warm-starts an inner attack (pgd or pqgd, 1 or 2 steps); --inner is none or free"
            )
        if (
            isinstance(atta_reset_epochs, bool)
            or not isinstance(atta_reset_epochs, int)
            or atta_reset_epochs < 0
        ):
            raise ValueError(f"atta_reset_epochs must be an integer >= 0, got {atta_reset_epochs!r}")
        if atta_reset_epochs and not atta:
            raise ValueError("atta_reset_epochs resets ATTA's stored perturbations: add --model.atta true")
        if eps_warmup_epochs < 0:
            raise ValueError(f"eps_warmup_epochs must be >= 0, got {eps_warmup_epochs}")
        if (
            isinstance(clean_accuracy_every_n_batches, bool)
            or int(clean_accuracy_every_n_batches) != clean_accuracy_every_n_batches
            or clean_accuracy_every_n_batches < 1
        ):
            raise ValueError(
                f"clean_accuracy_every_n_batches must be an integer >= 1, got {clean_accuracy_every_n_batches!r}"
            )
        lr_lambda(lr_schedule, 1)  # validates the name
        self.save_hyperparameters(ignore=["net", "inner", "val_attack", "optimizer"])
        self.net = net.to(memory_format=torch.channels_last) if channels_last else net
        self.inner = inner
        self.val_attack = val_attack if val_attack is not None else default_val_attack()
        self.optimizer_factory = optimizer if optimizer is not None else torch.optim.Adam
        self.automatic_optimization = not free  # free: one optimizer step per replay
        self.free_delta: torch.Tensor | None = None  # this process's free-training perturbation
        self.free_deltas: torch.Tensor | None = None  # every process's (the checkpoint's copy)
        self.perturbations = PerturbationBuffer(atta_reset_epochs) if atta else None
        num_classes = self._num_classes()
        self.train_loss = MeanMetric()
        self.train_adv_acc = MulticlassAccuracy(num_classes, average="micro")
        self.train_clean_acc = MulticlassAccuracy(num_classes, average="micro")
        self.images_per_sec = MeanMetric()
        self.attack_time_share = MeanMetric()
        self.val_clean_acc = MeanMetric()
        self.val_adv_acc = MeanMetric()
        self._batch_start = 0.0
        self.schedule_steps: int | None = None  # the optimizer steps lr_lambda spans (configure_optimizers)
        self._resumed_schedule: tuple[int, int] | None = None  # a checkpoint's (span, step)
        self._attack_seconds = 0.0
        self._output_checked = False

    def _num_classes(self) -> int:
        """From the network's dataset (registered models know theirs), else 10."""
        dataset = getattr(self.net, "dataset", None)
        return DATASET_SPECS[dataset].num_classes if dataset in DATASET_SPECS else 10

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def setup(self, stage: str) -> None:
        if self.hparams.compile_net and not getattr(self, "_net_compiled", False):
            self.net.compile()  # in place: the checkpoint's keys and model_spec stay the network's own
            self._net_compiled = True
        if stage != "fit" or attached_trainer(self) is None:
            return
        if self.perturbations is not None:
            request_example_indices(getattr(self.trainer, "datamodule", None))
        replays = self.replays_per_batch
        loop = self.trainer.fit_loop
        if replays > 1 and loop.max_epochs is not None and loop.max_epochs > 0:
            if getattr(self, "_epochs_divided_for", None) is not loop:  # once per fit
                self._epochs_divided_for = loop
                epochs = free_training_epochs(loop.max_epochs, replays)
                log.info("free adversarial training: %d data passes = %d epochs x %d replays",
                         loop.max_epochs, epochs, replays)  # fmt: skip
                loop.max_epochs = epochs

    @property
    def replays_per_batch(self) -> int:
        """Optimizer steps per batch: the free inner attack's replays, else 1."""
        return int(getattr(self.inner, "replays", 1)) if not self.automatic_optimization else 1

    # ---------------------------------------------------------------- the inner maximisation
    def current_inner(self) -> Attack | None:
        """The inner attack at this point of training (eps ramped linearly during warm-up)."""
        warmup = self.hparams.eps_warmup_epochs
        if self.inner is None or warmup <= 0 or attached_trainer(self) is None:
            return self.inner
        batches = (
            max(self.trainer.num_training_batches, 1)
            if math.isfinite(self.trainer.num_training_batches)
            else 1
        )
        progress = (self.global_step + 1) / (warmup * batches * self.replays_per_batch)
        if progress >= 1:
            return self.inner
        return self.inner.with_eps(self.inner.eps * progress)

    def craft(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        index: torch.Tensor | None = None,
        view: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Adversarial examples for training (the network's mode is restored afterwards). TRADES
        attacks the KL term from ``x + 0.001 N(0, 1)``; ATTA starts at the examples' stored
        perturbations (``index``: their positions in the training split; ``view``: the crop and flip
        each augmented image shows) and stores the new ones."""
        attack = self.current_inner()
        if attack is None:
            return x
        was_training = self.net.training
        if self.hparams.attack_in_eval_mode:
            self.net.eval()
        try:
            attack, labels = self.objective_inputs(attack, x, y)
            if self.perturbations is not None:
                if index is None:
                    raise ValueError(
                        "atta needs the examples' indices: the data module must yield (x, y, index)"
                    )
                examples, padding = self._training_split()
                self.perturbations.allocate(examples, x, padding)
                start = self.perturbations.start(index, x, attack.starting_point(x), self.current_epoch, view)
                x_adv = started_at(attack, start)(self.net, x, labels)
                self.perturbations.store(index, x_adv - x, self, self.current_epoch, view)
                return x_adv
            return attack(self.net, x, labels)
        finally:
            self.net.train(was_training)

    def objective_inputs(
        self, attack: Attack, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[Attack, torch.Tensor]:
        """The training attack and the labels it is given for ``(x, y)`` under this objective: TRADES
        maximises KL(f(x) || f(x')) (Zhang et al. 2019, Eq. 5), so its attack takes softmax(f(x)) (in
        the network's current mode) and starts at x + 0.001 N(0, 1); other objectives: unchanged, y."""
        if self.hparams.objective != "trades":
            return attack, y
        with torch.no_grad():
            labels = F.softmax(self.net(x).float(), dim=1)
        return started_at(attack, x + TRADES_START_STD * torch.randn_like(x)), labels

    def _training_split(self) -> tuple[int, int]:
        """Examples in the training split and the padding its random crops are cut from (ATTA's buffer
        shape): the training loader's dataset length and ``padding`` (0 when it does not augment)."""
        loader = self.trainer.train_dataloader if attached_trainer(self) is not None else None
        dataset = getattr(loader, "dataset", None)
        if dataset is None:
            raise ValueError("atta needs a training DataLoader over a dataset with a length")
        return len(dataset), getattr(dataset, "padding", 0)

    # ---------------------------------------------------------------- training
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._batch_start = time.perf_counter()
        # One RNG stream per (seed, epoch, batch, rank): random starts do not depend on what ran
        # before (the DataLoader draws its base seed from the global RNG when an epoch's iterator is
        # created, at a point that differs between a fresh and a resumed run), so a run resumed from
        # a checkpoint draws exactly what the uninterrupted run drew.
        key = (self.hparams.seed, self.current_epoch, batch_idx, self.global_rank)
        torch.manual_seed(hash(key) & 0x7FFF_FFFF_FFFF_FFFF)  # int-tuple hashes are not salted

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor | None:
        """One batch: ``(x, y)``, or ``(x, y, index[, view])`` when the data module yields indices (ATTA)."""
        x, y = batch[0], batch[1]
        if not self.automatic_optimization:
            self._free_training_step(x, y, batch_idx)
            return None
        start = time.perf_counter()
        x_adv = self.craft(x, y, *batch[2:4])
        self._attack_seconds = time.perf_counter() - start
        forward = self.training_forward(lambda f: self.objective_loss(f, x, x_adv, y)[0])
        loss, logits_adv, logits_clean = self.objective_loss(forward, x, x_adv, y)
        if not self._output_checked:
            self._output_checked = True
            warn_if_probabilities(logits_adv)
        if logits_clean is not None:
            self.train_clean_acc(logits_clean.detach(), y)
        elif self._tracks_clean_accuracy() and batch_idx % self.hparams.clean_accuracy_every_n_batches == 0:
            self.train_clean_acc(self._eval_logits(x), y)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(self._non_finite_message(loss))
        self.train_adv_acc(logits_adv.detach(), y)
        self.train_loss(loss.detach())
        self._log_training(attack=self.current_inner())
        return loss

    def objective_loss(
        self, forward: Forward, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The objective's training loss through ``forward`` (the network, or under AWP the network at
        perturbed weights), with the adversarial logits and the clean ones when the objective uses them."""
        logits_adv = forward(x_adv)
        objective = self.hparams.objective
        if objective == "madry":
            return F.cross_entropy(logits_adv, y), logits_adv, None
        logits_clean = forward(x)
        if objective == "trades":
            robust = kl_loss(logits_adv, F.softmax(logits_clean.float(), dim=1)).mean()
            loss = F.cross_entropy(logits_clean, y) + self.hparams.beta * robust
        elif objective == "mart":
            loss = mart_loss(logits_clean, logits_adv, y, self.hparams.beta)
        else:
            w = self.hparams.clean_weight
            loss = w * F.cross_entropy(logits_clean, y) + (1 - w) * F.cross_entropy(logits_adv, y)
        return loss, logits_adv, logits_clean

    def awp_active(self) -> bool:
        """AWP perturbs this step's weights: ``awp_gamma > 0`` and its warm-up epochs are over."""
        return self.hparams.awp_gamma > 0 and self.current_epoch >= self.hparams.awp_warmup_epochs

    def training_forward(self, loss_of: Callable[[Forward], torch.Tensor]) -> Forward:
        """The forward this step trains through: the network, or under AWP the network at ``w + v``, ``v``
        the weight perturbation that raises ``loss_of`` (one more forward-backward pass of the loss)."""
        if not self.awp_active():
            return self.net
        return perturbed_forward(self.net, weight_perturbation(self.net, loss_of, self.hparams.awp_gamma))

    def _log_training(self, attack: Attack | None) -> None:
        self.log("train/loss", self.train_loss, on_step=True, on_epoch=True, prog_bar=True)
        self.log("train/adv_acc", self.train_adv_acc, on_step=False, on_epoch=True, prog_bar=True)
        if self.hparams.objective != "madry" or self._tracks_clean_accuracy():
            self.log("train/clean_acc", self.train_clean_acc, on_step=False, on_epoch=True)
        if attack is not None:
            self.log("train/eps", attack.eps, on_step=True, on_epoch=False)

    def _free_training_step(self, x: torch.Tensor, y: torch.Tensor, batch_idx: int) -> None:
        """Free adversarial training (Shafahi et al. 2019, Alg. 1): ``inner.replays`` replays of the
        batch, each one forward/backward pass on ``clip(x + delta)`` giving the weight step and, from
        the gradient w.r.t. that input, ``delta``'s step; ``delta`` goes on to the next batch (its shape follows the batch's)."""
        attack = self.current_inner()
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        delta = self._free_delta_for(x)
        start = time.perf_counter()
        for _ in range(attack.replays):
            # the gradient w.r.t. the network's input (as the reference code's tf.gradients(loss, x_input)):
            # through the clamp it would vanish wherever x + delta sits on 0 or 1 (most MNIST pixels)
            x_in = (x + delta).clamp_(*attack.clip).requires_grad_(True)
            logits = self.training_forward(lambda f: F.cross_entropy(f(x_in), y))(x_in)  # noqa: B023
            if not self._output_checked:
                self._output_checked = True
                warn_if_probabilities(logits)
            loss = F.cross_entropy(logits, y)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(self._non_finite_message(loss))
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()
            scheduler.step()
            delta = attack.free_step(delta, x_in.grad)
            self.train_adv_acc(logits.detach(), y)
            self.train_loss(loss.detach())
        self._attack_seconds = 0.0  # the input gradients come with the training passes
        self.free_delta = delta
        self.free_deltas = self.all_gather(delta) if self.trainer.world_size > 1 else None
        if self._tracks_clean_accuracy() and batch_idx % self.hparams.clean_accuracy_every_n_batches == 0:
            self.train_clean_acc(self._eval_logits(x), y)
        log.debug("free step: %d replays in %.3fs", attack.replays, time.perf_counter() - start)
        self._log_training(attack=attack)

    def _free_delta_for(self, x: torch.Tensor) -> torch.Tensor:
        """The carried perturbation, shaped like ``x``: zeros at first; a batch of another size keeps
        the overlapping examples' rows (Shafahi et al.'s ``global_noise_data[0:n]``), zeros elsewhere."""
        delta = self.free_delta
        if delta is not None and delta.shape == x.shape:
            return delta.detach().to(x.device, x.dtype)
        fresh = torch.zeros_like(x)
        if delta is not None and delta.shape[1:] == x.shape[1:]:
            n = min(delta.shape[0], x.shape[0])
            fresh[:n] = delta[:n].to(x.device, x.dtype)
        return fresh

    def _tracks_clean_accuracy(self) -> bool:
        """Madry objective: clean accuracy needs its own forward pass (without an attack it is adv_acc)."""
        return self.hparams.track_clean_accuracy and self.inner is not None

    @torch.no_grad()
    def _eval_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits with the network in eval mode, so the metric does not touch BatchNorm statistics."""
        was_training = self.net.training
        self.net.eval()
        try:
            return self.net(x)
        finally:
            self.net.train(was_training)

    def _non_finite_message(self, loss: torch.Tensor) -> str:
        last = None
        for cb in getattr(self.trainer, "checkpoint_callbacks", []):
            last = getattr(cb, "last_model_path", None) or getattr(cb, "best_model_path", None) or last
        return (
            f"training loss is {loss.item()} at epoch {self.current_epoch}, step {self.global_step}; "
            f"stopping (last good checkpoint: {last or 'none written yet'}); lower the learning rate "
            "or check the data"
        )

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        elapsed = time.perf_counter() - self._batch_start
        if elapsed <= 0:
            return
        batch_size = batch[0].shape[0]
        self.images_per_sec(batch_size * self.trainer.world_size / elapsed)
        self.attack_time_share(min(self._attack_seconds / elapsed, 1.0))
        self.log("perf/images_per_sec", self.images_per_sec, on_step=False, on_epoch=True)
        self.log("perf/attack_time_share", self.attack_time_share, on_step=False, on_epoch=True)

    # ---------------------------------------------------------------- validation
    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """Clean accuracy and accuracy under ``val_attack`` by the evaluation engine's rule: an example
        counts when it is correct clean *and* on the attack's output (early exit, fixed seed)."""
        x, y = batch
        stream = self.hparams.seed + 7 * batch_idx + 104729 * self.global_rank
        outcome = attack_batch(self.net, [self.val_attack], x, y, stream_seed=stream)
        self.val_clean_acc.update(outcome.clean.to(self.device, torch.float32))
        self.val_adv_acc.update(outcome.robust.to(self.device, torch.float32))
        self.log("val/clean_acc", self.val_clean_acc, on_epoch=True, prog_bar=True)
        self.log(VAL_ADV_ACC, self.val_adv_acc, on_epoch=True, prog_bar=True)

    # ---------------------------------------------------------------- optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.optimizer_factory(self.parameters())
        total = self.trainer.estimated_stepping_batches if attached_trainer(self) is not None else 1
        total = total * self.replays_per_batch  # free: one optimizer step per replay
        self.schedule_steps = int(total)
        if self._resumed_schedule is not None:
            note = schedule_change(
                self.hparams.lr_schedule, self._resumed_schedule[0], total, self._resumed_schedule[1]
            )
            if note is not None:
                log.warning(note)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(self.hparams.lr_schedule, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record how to rebuild the network (for ``evaluate.py``) and the attacks used."""
        try:
            net = model_spec(self.net)
        except ValueError:
            net = None
        checkpoint["qgtrain"] = {
            "version": __version__,
            "net": net,
            "inner": self.inner.config() if self.inner is not None else None,
            "val_attack": self.val_attack.config(),
            "objective": self.hparams.objective,  # with inner: the training cost (TRAINING_PASSES)
            "atta": bool(self.hparams.atta),
            "awp_gamma": float(self.hparams.awp_gamma),  # with the warm-up: AWP's passes (awp_data_passes)
            "awp_warmup_epochs": int(self.hparams.awp_warmup_epochs),
            "schedule_steps": self.schedule_steps,  # lr_lambda's span: a resume announces another
            # a mid-epoch checkpoint holds each process's data position: resume with as many
            "world_size": self.trainer.world_size if attached_trainer(self) is not None else 1,
            # with net, objective, inner: what --resume checks (checkpoints.compatibility.RUN_RECORD_FLAGS)
            "dataset": getattr(getattr(attached_trainer(self), "datamodule", None), "name", None),
            "optimizer": next(
                (
                    f"{type(o).__module__}.{type(o).__qualname__}"
                    for o in getattr(attached_trainer(self), "optimizers", [])
                ),
                None,
            ),
        }
        state: dict[str, Any] = {}
        if self.free_delta is not None:  # every process's perturbation (index: the rank)
            deltas = self.free_deltas if self.free_deltas is not None else self.free_delta[None]
            state["free_delta"] = deltas.detach().cpu().clone()
        if self.perturbations is not None:
            state["atta"] = self.perturbations.state_dict()
        if state:
            checkpoint["qgtrain_state"] = state

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore free training's perturbation (this process's) and ATTA's buffer: exact resume. Keep
        the schedule's recorded span and position for :meth:`configure_optimizers` (called after)."""
        span = (checkpoint.get("qgtrain") or {}).get("schedule_steps")
        position = (checkpoint.get("lr_schedulers") or [{}])[0].get(
            "last_epoch", checkpoint.get("global_step", 0)
        )
        self._resumed_schedule = (int(span), int(position)) if span else None
        state = checkpoint.get("qgtrain_state") or {}
        if "free_delta" in state and not self.automatic_optimization:
            deltas = state["free_delta"]
            rank = self.global_rank if attached_trainer(self) is not None else 0
            self.free_delta = deltas[rank].to(self.device) if rank < deltas.shape[0] else None
        if self.perturbations is not None and "atta" in state:
            self.perturbations.load_state_dict(state["atta"])
