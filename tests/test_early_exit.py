"""The evaluation engine: early exit, gradient accounting, suites, and one rule for every caller."""

from __future__ import annotations

import pytest
import torch

from qgtrain.attacks import attack_for_budget
from qgtrain.evaluation import ProtocolRunner, TensorBatches
from qgtrain.evaluation.protocol import NOT_FOOLED, attack_batch, evaluate_suite
from qgtrain.evaluation.runner import AttackSpec

EPS = 0.06  # the tiny normally-trained model keeps part of its accuracy at this radius


@pytest.fixture(scope="module")
def data(trained_tiny_model, mnist_small):
    x, y = mnist_small
    return trained_tiny_model, x[:200], y[:200]


def batches(x: torch.Tensor, y: torch.Tensor, size: int = 100) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(zip(x.split(size), y.split(size), strict=True))


@pytest.mark.parametrize(
    ("name", "steps"), [("pgd", 10), ("pqgd", 10), ("apgd_ce", 10), ("apgd_t", 5), ("blob_qg", 10)]
)
def test_early_exit_is_never_weaker_and_never_costs_more(data, name: str, steps: int) -> None:
    model, x, y = data
    attack = attack_for_budget(name, EPS, steps, **({"targets": 2} if name == "apgd_t" else {}))
    fast = evaluate_suite(model, [attack], batches(x, y), seed=1, early_exit=True)
    full = evaluate_suite(model, [attack], batches(x, y), seed=1, early_exit=False)
    assert torch.equal(fast.clean, full.clean)
    assert int(fast.robust.sum()) <= int(full.robust.sum()), "early exit found fewer adversarial examples"
    assert 0 < int(full.robust.sum()) < int(full.clean.sum()), "the comparison needs a partly robust model"
    spent, naive = fast.costs[0].gradients, fast.costs[0].naive_gradients
    # without early exit every example runs every step (later restarts/targets rerun only the unfooled)
    assert full.costs[0].gradients <= naive == len(y) * attack.gradients_per_example
    if name != "apgd_t":
        assert full.costs[0].gradients == naive
    if attack.batch_coupled:  # BLOB's particles keep their batch: same cost, first fooling points kept
        assert spent == naive
    else:
        assert spent < naive
        # never attacked: examples misclassified clean; survivors at most every step
        assert spent <= int(fast.clean.sum()) * attack.gradients_per_example


def test_examples_misclassified_clean_are_never_attacked(data) -> None:
    model, x, y = data
    y_wrong = (y + 1) % 10  # every example misclassified "clean"
    outcome = attack_batch(model, [attack_for_budget("pgd", EPS, 10)], x, y_wrong, stream_seed=0)
    assert not bool(outcome.clean.any()) and not bool(outcome.robust.any())
    assert outcome.costs[0].gradients == 0 and bool((outcome.fooled_by == NOT_FOOLED).all())


def test_a_suite_attacks_only_survivors_and_reports_the_breakdown(data) -> None:
    model, x, y = data
    attacks = [attack_for_budget("pgd", EPS, 5), attack_for_budget("apgd_t", EPS, 5, targets=2)]
    outcome = evaluate_suite(model, attacks, batches(x, y), seed=0)
    clean, after = outcome.clean, outcome.after
    assert bool((after[0] <= clean).all()) and bool((after[1] <= after[0]).all())
    fooled = outcome.fooled_counts()
    assert fooled == [int(clean.sum() - after[0].sum()), int(after[0].sum() - after[1].sum())]
    assert sum(fooled) == int(clean.sum()) - int(outcome.robust.sum())
    # the second attack spends gradients only on what the first left robust
    assert outcome.costs[1].gradients <= int(after[0].sum()) * attacks[1].gradients_per_example
    # the first attack sees exactly what it sees alone: same per-batch streams, starts drawn for the batch
    alone = evaluate_suite(model, attacks[:1], batches(x, y), seed=0)
    assert torch.equal(alone.robust, after[0])


def test_the_paper_runner_and_the_suite_agree_per_example(data) -> None:
    model, x, y = data
    spec = AttackSpec("pqgd", EPS, 0.02, 8, 100, 2)
    runner = ProtocolRunner(model, TensorBatches(x, y, 100))
    row = runner.row(spec, [5])
    suite = evaluate_suite(model, [spec.build()], batches(x, y), seed=5)
    assert torch.equal(row.run_correct[0], suite.robust)
    assert row.cost.gradients == suite.costs[0].gradients


def test_active_mask_leaves_other_examples_alone(data) -> None:
    model, x, y = data
    x, y = x[:20], y[:20]
    active = torch.zeros(20, dtype=torch.bool)
    active[::3] = True
    torch.manual_seed(0)
    result = attack_for_budget("pgd", EPS, 4).perturb(model, x, y, early_exit=True, active=active)
    assert torch.equal(result.x_adv[~active], x[~active]) and not bool(result.fooled[~active].any())
    assert result.gradients <= int(active.sum()) * 4
