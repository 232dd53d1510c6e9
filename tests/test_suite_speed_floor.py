"""The arithmetic floor beside the suite's timings (benchmarks/suite_speed.py): the FLOPs of one
example's input gradient are the forward's and the input-gradient backward's, weight gradients not
counted, and the model handed in keeps its trainable parameters."""

from __future__ import annotations

import torch
from torch import nn

from benchmarks import suite_speed


def test_a_linear_models_gradient_costs_its_forward_and_its_input_gradient() -> None:
    """Linear(784 -> 10): 2 x 784 x 10 forward and as many for the input gradient, per example (the
    weight gradient, not computed by the attacks, would be a third)."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
    flop = suite_speed.flop_per_gradient(model, x, y)
    assert flop == 2 * (2 * 784 * 10)
    assert all(p.requires_grad for p in model.parameters()) and all(
        p.grad is None for p in model.parameters()
    )


def test_the_floor_states_apgd_ce_seconds_only_for_apgd_ce_alone() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    x, y = torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
    alone = suite_speed.arithmetic_floor(model, x, y, ["apgd_ce"])
    assert alone["matmul_gflops"] > 0 and alone["apgd_ce_seconds_at_matmul_rate"] > 0
    expected = len(x) * 100 * alone["ms_per_gradient_at_matmul_rate"] / 1e3  # the suite's 100 steps
    assert abs(alone["apgd_ce_seconds_at_matmul_rate"] - expected) < 1e-9
    assert (
        suite_speed.arithmetic_floor(model, x, y, ["apgd_ce", "apgd_t"])["apgd_ce_seconds_at_matmul_rate"]
        is None
    )
