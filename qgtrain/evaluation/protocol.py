"""Per-example robustness: the one evaluation engine of qgtrain.

An example counts as robust when it is classified correctly both clean and on every attack's
output (the AutoAttack convention), so robust accuracy never exceeds clean accuracy. Every caller
(the validation metric, the robustness callback, ``evaluate.py``, the benchmarks) goes through
:func:`attack_batch`, which decides it. With early exit (the default, as in AutoAttack) an example
misclassified clean is never attacked, each attack of a sequence sees only the examples still
robust, and inside an attack an example keeps the first point that fools it and costs no more
gradients. Restarts are merged per example inside the attack; independent runs and ensembles are
merged by AND-ing boolean vectors (:func:`worst_case_correct`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from qgtrain.attacks import Attack

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
NOT_FOOLED = -1
"""``fooled_by`` of an example no attack fooled (robust, or misclassified clean)."""


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode, restoring each one's flag afterwards."""
    modes = [m.training for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, mode in zip(model.modules(), modes, strict=True):
            module.training = mode


def iterate_batches(
    batches: Batches, device: torch.device | str | None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, y)`` moved to ``device`` (unchanged when ``device`` is None)."""
    for x, y in batches:
        if device is not None:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        yield x, y


def batch_stream_seed(seed: int, batch_index: int) -> int:
    """The RNG stream of batch ``batch_index`` of an evaluation with ``seed``."""
    return seed * 1_000_003 + batch_index


@dataclass
class AttackCost:
    """What one attack spent, in example-gradient evaluations and forward-only example passes,
    against the naive count (every example, every step and restart, no early exit)."""

    gradients: int = 0
    naive_gradients: int = 0
    forwards: int = 0
    naive_forwards: int = 0
    seconds: float = 0.0
    known: bool = True

    def __iadd__(self, other: AttackCost) -> AttackCost:
        self.gradients += other.gradients
        self.naive_gradients += other.naive_gradients
        self.forwards += other.forwards
        self.naive_forwards += other.naive_forwards
        self.seconds += other.seconds
        self.known = self.known and other.known
        return self

    def to_dict(self) -> dict[str, float | int | bool]:
        return {
            "gradients": self.gradients if self.known else None,
            "naive_gradients": self.naive_gradients,
            "forwards": self.forwards,
            "naive_forwards": self.naive_forwards,
            "seconds": self.seconds,
        }


@dataclass
class SuiteOutcome:
    """Per-example results of a sequence of attacks on a set of examples.

    ``clean``: correct clean; ``after[k]``: correct clean and on attacks ``0..k`` (robust so far);
    ``fooled_by``: index of the first attack that fooled each example, else :data:`NOT_FOOLED`.
    """

    labels: list[str]
    clean: torch.Tensor
    after: list[torch.Tensor]
    fooled_by: torch.Tensor
    costs: list[AttackCost] = field(default_factory=list)
    partial: bool = False
    """True when interrupted: the vectors cover the batches finished before Ctrl-C."""

    @property
    def robust(self) -> torch.Tensor:
        """Correct clean and on every attack: the per-example worst case of the sequence."""
        return self.after[-1] if self.after else self.clean

    def fooled_counts(self) -> list[int]:
        """How many examples each attack fooled first (AutoAttack's breakdown)."""
        return [int((self.fooled_by == k).sum()) for k in range(len(self.labels))]

    @staticmethod
    def concatenate(parts: Sequence[SuiteOutcome], labels: list[str]) -> SuiteOutcome:
        """Join the outcomes of consecutive batches (or shards)."""
        if not parts:
            empty = torch.zeros(0, dtype=torch.bool)
            return SuiteOutcome(
                labels, empty, [empty] * len(labels), empty.long(), [AttackCost() for _ in labels]
            )
        costs = [AttackCost() for _ in labels]
        for part in parts:
            for total, cost in zip(costs, part.costs, strict=True):
                total += cost
        return SuiteOutcome(
            labels,
            torch.cat([p.clean for p in parts]),
            [torch.cat([p.after[k] for p in parts]) for k in range(len(labels))],
            torch.cat([p.fooled_by for p in parts]),
            costs,
        )


def check_evaluation_attack(attack: Attack | type[Attack]) -> None:
    """Refuse attacks (or attack classes) whose output leaves the threat model (N-FGSM's training
    perturbation)."""
    if not attack.stays_in_ball:
        raise ValueError(
            f"{attack.name} is a training attack whose output leaves the eps-ball; "
            "evaluate with an attack that stays in the threat model (e.g. apgd_ce, pgd)"
        )


def _predicts(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Correct predictions, by the attacks' own check (inputs in the network's memory format)."""
    return ~Attack._is_fooled(model, x, y)


def attack_batch(
    model: nn.Module,
    attacks: Sequence[Attack],
    x: torch.Tensor,
    y: torch.Tensor,
    stream_seed: int,
    early_exit: bool = True,
) -> SuiteOutcome:
    """Clean correctness, then each attack in turn on one batch: the rule "robust = correct clean and
    on every adversarial input", decided by a forward pass on the returned points.

    Every attack runs under the RNG stream ``stream_seed`` (forked: the caller's RNG is untouched),
    so an attack draws the same random starts alone or in a sequence. With ``early_exit`` each attack
    attacks only the examples still robust (batch-coupled attacks keep their whole batch as particles).
    The model's mode is the caller's choice (evaluation: eval mode).
    """
    devices = [x.device.index or 0] if x.device.type == "cuda" else []
    clean = _predicts(model, x, y)
    robust = clean.clone()
    fooled_by = torch.full_like(y, NOT_FOOLED, dtype=torch.long)
    after, costs = [], []
    n = y.shape[0]
    for k, attack in enumerate(attacks):
        check_evaluation_attack(attack)
        cost = AttackCost(
            naive_gradients=n * attack.gradients_per_example,
            naive_forwards=n * attack.forwards_per_example,
            known=attack.cost_known,
        )
        targets = robust if early_exit else torch.ones_like(robust)
        if bool(targets.any()):
            start = time.perf_counter()
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(stream_seed)
                result = attack.perturb(
                    model, x, y, early_exit=early_exit, active=targets if early_exit else None
                )
            index = targets.nonzero().squeeze(1)
            survived = _predicts(model, result.x_adv[index], y[index])
            newly = robust[index] & ~survived
            fooled_by[index[newly]] = k
            robust[index[~survived]] = False
            cost.gradients, cost.forwards = result.gradients, result.forwards + index.numel()
            cost.seconds = time.perf_counter() - start
        after.append(robust.clone())
        costs.append(cost)
    labels = [attack.label for attack in attacks]
    return SuiteOutcome(labels, clean.cpu(), [a.cpu() for a in after], fooled_by.cpu(), costs)


def evaluate_suite(
    model: nn.Module,
    attacks: Sequence[Attack],
    batches: Batches,
    device: torch.device | str | None = None,
    seed: int = 0,
    early_exit: bool = True,
    first_batch_index: int = 0,
    on_batch: Callable[[int], None] | None = None,
    interruptible: bool = False,
) -> SuiteOutcome:
    """:func:`attack_batch` over every batch, the model in eval mode; batch ``i`` uses the stream
    :func:`batch_stream_seed` ``(seed, i)``, so results do not depend on what ran before and the same
    seed gives the same numbers. ``first_batch_index`` numbers the batches from there, so a shard
    holding batches ``k, k+1, ...`` of a longer sequence (one rank under DDP) draws exactly what the
    whole sequence draws for them. ``interruptible``: Ctrl-C ends the evaluation at the batch under
    way and returns the finished batches, marked ``partial``."""
    parts = []
    partial = False
    try:
        with eval_mode(model):
            for index, (x, y) in enumerate(iterate_batches(batches, device), start=first_batch_index):
                parts.append(attack_batch(model, attacks, x, y, batch_stream_seed(seed, index), early_exit))
                if on_batch is not None:
                    on_batch(index)
    except KeyboardInterrupt:
        if not interruptible:
            raise
        partial = True
    outcome = SuiteOutcome.concatenate(parts, [attack.label for attack in attacks])
    outcome.partial = partial
    return outcome


@torch.no_grad()
def clean_correct(
    model: nn.Module, batches: Batches, device: torch.device | str | None = None
) -> torch.Tensor:
    """Boolean vector: is each example classified correctly (model in eval mode)?"""
    return evaluate_suite(model, [], batches, device).clean


def adversarial_correct(
    model: nn.Module,
    attack: Attack,
    batches: Batches,
    device: torch.device | str | None = None,
    seed: int = 0,
    on_batch: Callable[[int], None] | None = None,
    first_batch_index: int = 0,
    early_exit: bool = True,
) -> torch.Tensor:
    """Boolean vector: is each example correct clean *and* on ``attack``'s output?"""
    return evaluate_suite(
        model, [attack], batches, device, seed, early_exit, first_batch_index, on_batch
    ).robust


def worst_case_correct(correct: Iterable[torch.Tensor]) -> torch.Tensor:
    """Per-example worst case over several attacks or runs: the AND of their boolean vectors."""
    vectors = list(correct)
    if not vectors:
        raise ValueError("worst_case_correct needs at least one correctness vector")
    worst = vectors[0].clone()
    for vector in vectors[1:]:
        if vector.shape != worst.shape:
            raise ValueError(
                f"correctness vectors disagree in shape: {tuple(vector.shape)} vs {tuple(worst.shape)}"
            )
        worst &= vector
    return worst
