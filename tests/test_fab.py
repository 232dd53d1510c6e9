"""FAB-T: its L-inf projection against the paper's definition, the step, early exit and cost, and
agreement with the original AutoAttack's FAB-T (when it is installed)."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
from torch import nn

from qgtrain.attacks import FABT, attack_for_budget, build_attack
from qgtrain.attacks.fab import project_linf_hyperplane_box


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---------------------------------------------------------------- the projection step (p = inf)


def linf_projection_by_vertices(
    t: np.ndarray, w: np.ndarray, b: float, clip: tuple[float, float]
) -> float | None:
    """``min |delta|_inf`` s.t. ``<w, t + delta> = b``, ``t + delta`` in the box, by brute force: the
    linear programme in ``(delta, lam)`` has its minimum at a vertex, where the equality and ``d`` of
    the ``4 d`` inequalities ``+-delta_i <= lam``, ``lo <= t_i + delta_i <= hi`` hold with equality.
    None when the hyperplane misses the box."""
    d = t.shape[0]
    rows, rhs = [], []  # A [delta, lam] <= c
    for i in range(d):
        e = np.zeros(d + 1)
        e[i] = 1.0
        rows += [e - np.eye(d + 1)[d], -e - np.eye(d + 1)[d], e, -e]
        rhs += [0.0, 0.0, clip[1] - t[i], t[i] - clip[0]]
    A, c = np.array(rows), np.array(rhs)
    equality = np.append(w, 0.0)
    best = None
    for active in itertools.combinations(range(4 * d), d):
        M = np.vstack([equality, A[list(active)]])
        if abs(np.linalg.det(M)) < 1e-12:
            continue
        v = np.linalg.solve(M, np.concatenate([[b - w @ t], c[list(active)]]))
        if (A @ v <= c + 1e-9).all() and (best is None or v[d] < best):
            best = v[d]
    return best


def random_cases(d: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Points in the box, hyperplanes some of which need the box edges (clipped coordinates), some
    of which miss the box, some with zero weights."""
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n, d, generator=g, dtype=torch.float64)
    t[::3, 0] = 0.98  # near an edge: the box clips these coordinates
    w = torch.randn(n, d, generator=g, dtype=torch.float64)
    w[1::4, -1] = 0.0
    reach = torch.rand(n, generator=g, dtype=torch.float64) * 1.5  # > 1 often leaves the box
    b = (w * t).sum(1) + reach * w.abs().sum(1) * torch.sign(torch.randn(n, generator=g))
    return t, w, b


@pytest.mark.parametrize("d", [2, 3, 4])
def test_projection_is_the_smallest_linf_step_onto_hyperplane_and_box(d: int) -> None:
    t, w, b = random_cases(d, 40, seed=d)
    delta = project_linf_hyperplane_box(t, w, b)
    z = t + delta
    infeasible = 0
    for i in range(t.shape[0]):
        exact = linf_projection_by_vertices(t[i].numpy(), w[i].numpy(), float(b[i]), (0.0, 1.0))
        assert (z[i] >= -1e-12).all() and (z[i] <= 1 + 1e-12).all()
        if exact is None:  # the hyperplane misses the box: the corner closest to it
            infeasible += 1
            corners = torch.tensor(list(itertools.product([0.0, 1.0], repeat=d)), dtype=torch.float64)
            closest = (corners @ w[i] - b[i]).abs().min()
            assert (z[i] @ w[i] - b[i]).abs() == pytest.approx(float(closest), abs=1e-9)
        else:
            assert float(z[i] @ w[i]) == pytest.approx(float(b[i]), abs=1e-9)
            assert float(delta[i].abs().max()) == pytest.approx(exact, abs=1e-9)
    assert 0 < infeasible < t.shape[0]  # both kinds of case were met


def test_projection_clipped_by_the_box_by_hand() -> None:
    # t = (0.9, 0.5), w = (1, 1), needed change 0.4: unclipped both would move 0.2, but the first
    # coordinate can move only 0.1, so the second moves 0.3 (|delta|_inf = 0.3, not 0.2).
    t = torch.tensor([[0.9, 0.5]], dtype=torch.float64)
    w = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    delta = project_linf_hyperplane_box(t, w, torch.tensor([1.8], dtype=torch.float64))
    assert torch.allclose(delta, torch.tensor([[0.1, 0.3]], dtype=torch.float64))
    # control: without the edge the step is symmetric
    delta = project_linf_hyperplane_box(t - 0.4, w, torch.tensor([1.0], dtype=torch.float64))
    assert torch.allclose(delta, torch.tensor([[0.2, 0.2]], dtype=torch.float64))


def test_projection_agrees_with_the_original_in_high_dimension() -> None:
    projections = pytest.importorskip("autoattack.fab_projections", reason="the original AutoAttack")
    g = torch.Generator().manual_seed(0)
    t = torch.rand(64, 784, generator=g)
    w = torch.randn(64, 784, generator=g)
    w[:, :300] *= torch.rand(64, 300, generator=g) < 0.3  # many zero weights, as in an MNIST gradient
    b = (w * torch.rand(64, 784, generator=g)).sum(1)
    ours = project_linf_hyperplane_box(t, w, b)
    theirs = projections.projection_linf(t, w, b)
    assert torch.allclose(ours.abs().amax(1), theirs.abs().amax(1), rtol=1e-4, atol=1e-6)
    assert torch.allclose(((t + ours) * w).sum(1), b, rtol=1e-4, atol=1e-3)


# ---------------------------------------------------------------- the attack on a linear model


WEIGHT = torch.tensor([1.0, 0.5, -0.5, 0.25])  # w_1 - w_0: |.|_1 = 2.25
FAR = 10.0


def linear_model() -> nn.Module:
    """Three classes on 4 inputs: class 1 beats class 0 beyond ``<w, x> = <w, 0.5>``; class 2 never
    comes near (its logit is FAR below), so FAB's linearisation is exact."""
    model = nn.Linear(4, 3)
    with torch.no_grad():
        model.weight.copy_(torch.stack([torch.zeros(4), WEIGHT, 0.1 * torch.ones(4)]))
        model.bias.copy_(torch.tensor([float(WEIGHT.sum() * 0.5), 0.0, -FAR]))
    return model.eval()


def two_examples() -> tuple[torch.Tensor, torch.Tensor]:
    """Example 0 lies 0.04 (L-inf) from the boundary, example 1 lies 0.3 from it; both class 0."""
    x = torch.stack([0.5 - 0.04 * WEIGHT.sign(), 0.5 - 0.3 * WEIGHT.sign()])
    return x, torch.zeros(2, dtype=torch.long)


def test_fools_a_point_near_the_boundary_with_the_overshot_projection_and_leaves_a_robust_one() -> None:
    model = linear_model()
    x, y = two_examples()
    with torch.no_grad():
        assert (model(x).argmax(1) == y).all()
    result = FABT(eps=0.1, steps=5, targets=2).perturb(model, x, y, early_exit=True)
    assert result.fooled.tolist() == [True, False]
    # one iteration from the clean input: both projections are the exact boundary point, so the step
    # is x + eta * delta with delta = 0.04 sign(w), |.|_inf = 0.042 <= eps
    assert torch.allclose(result.x_adv[0], x[0] + 1.05 * 0.04 * WEIGHT.sign(), atol=1e-6)
    assert (result.x_adv - x).abs().max() <= 0.1 + 1e-7
    assert result.x_adv.min() >= 0 and result.x_adv.max() <= 1
    # the robust one really is: within eps, class 1 stays 0.2 * 2.25 below class 0
    with torch.no_grad():
        assert model(result.x_adv[1:]).argmax(1).item() == 0


def test_early_exit_stops_at_the_first_point_within_eps_and_costs_fewer_gradients() -> None:
    model = linear_model()
    x, y = two_examples()
    attack = FABT(eps=0.1, steps=5, targets=2)
    fast = attack.perturb(model, x, y, early_exit=True)
    # example 0: one gradient (first target, first step); example 1: every step of both targets
    assert fast.gradients == 1 + 2 * 5 < 2 * attack.gradients_per_example
    # forwards: the clean logits (2), example 0's check (1), example 1's 2 x (5 checks + the last point)
    assert fast.forwards == 2 + 1 + 2 * 6
    slow = attack.perturb(model, x, y, early_exit=False)  # control: example 0 goes on for 5 steps
    assert slow.gradients == 5 + 2 * 5
    assert torch.equal(slow.x_adv[0], fast.x_adv[0])  # the first point within eps is kept either way
    assert torch.equal(slow.fooled, fast.fooled)


def test_examples_left_out_are_not_attacked() -> None:
    model = linear_model()
    x, y = two_examples()
    result = FABT(eps=0.1, steps=5, targets=2).perturb(
        model, x, y, early_exit=True, active=torch.tensor([False, True])
    )
    assert torch.equal(result.x_adv[0], x[0]) and not result.fooled[0]  # unchanged, at no cost
    assert result.gradients == 2 * 5


def test_an_adversarial_iterate_outside_the_ball_is_not_counted() -> None:
    model = linear_model()
    x, y = two_examples()
    # eps below the boundary's distance 0.04 (times the overshoot): FAB crosses it, but outside the ball
    result = FABT(eps=0.03, steps=5, targets=2).perturb(model, x[:1], y[:1], early_exit=True)
    assert not result.fooled[0]
    assert (result.x_adv - x[:1]).abs().max() <= 0.03 + 1e-7
    control = FABT(eps=0.05, steps=5, targets=2).perturb(model, x[:1], y[:1], early_exit=True)
    assert control.fooled[0]


# ---------------------------------------------------------------- configuration


def test_autoattack_standard_settings_and_budget() -> None:
    attack = build_attack("fab_t", eps=0.3)
    assert (attack.steps, attack.targets, attack.restarts) == (100, 9, 1)
    assert (attack.alpha_max, attack.eta, attack.beta, attack.random_start) == (0.1, 1.05, 0.9, False)
    assert attack.gradients_per_example == 900 and attack.label == "fab_t"
    budget = attack_for_budget("fab_t", 0.2, 50, alpha=123.0, b=7)  # FAB has no step size nor b
    assert (budget.eps, budget.steps, budget.b) == (0.2, 50, 1)
    assert build_attack(**budget.config()).config() == budget.config()


@pytest.mark.parametrize(
    ("key", "value"), [("targets", 0), ("alpha_max", 1.5), ("eta", 0.9), ("beta", 1.0), ("beta", 0.0)]
)
def test_bad_settings_name_the_parameter(key: str, value: float) -> None:
    with pytest.raises(ValueError, match=key):
        FABT(**{key: value})


def test_too_many_targets_names_the_attack() -> None:
    with pytest.raises(ValueError, match="fab_t: targets=3 but the model has only 2 wrong classes"):
        FABT(eps=0.1, steps=1, targets=3).perturb(linear_model(), *two_examples())


# ---------------------------------------------------------------- a small CNN, and the original


def test_invariants_on_a_cnn(trained_tiny_model, mnist_small) -> None:
    model = copy.deepcopy(trained_tiny_model).train()
    modes = [m.training for m in model.modules()]
    x, y = mnist_small[0][:16], mnist_small[1][:16]
    torch.manual_seed(0)
    result = FABT(eps=0.1, steps=10, targets=3).perturb(model.eval(), x, y, early_exit=True)
    model.train()
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is None for p in model.parameters())
    assert not result.x_adv.requires_grad and result.x_adv.grad_fn is None
    assert (result.x_adv - x).abs().max() <= 0.1 + 1e-6
    assert result.x_adv.min() >= 0 and result.x_adv.max() <= 1
    with torch.no_grad():
        assert torch.equal(result.fooled, model.eval()(result.x_adv).argmax(1) != y)
    assert 0 < int(result.fooled.sum()) < 16  # neither trivial outcome


def test_agrees_with_the_original_fab_t(trained_tiny_model, mnist_small) -> None:
    fab_pt = pytest.importorskip("autoattack.fab_pt", reason="the original AutoAttack (fra31/auto-attack)")
    model = copy.deepcopy(trained_tiny_model).eval().requires_grad_(False)  # it backpropagates into them
    x, y = mnist_small[0][:48], mnist_small[1][:48]
    with torch.no_grad():
        keep = model(x).argmax(1) == y
    x, y, eps = x[keep], y[keep], 0.1
    ours = FABT(eps=eps, steps=20, targets=3).perturb(model, x, y, early_exit=True)
    with torch.random.fork_rng():
        original = fab_pt.FABAttack_PT(
            model, norm="Linf", n_restarts=1, n_iter=20, eps=eps, alpha_max=0.1, eta=1.05, beta=0.9,
            targeted=True, n_target_classes=3, device="cpu",
        )  # fmt: skip
        adv = original.perturb(x, y)
    with torch.no_grad():
        original_robust = (model(adv).argmax(1) == y) | ((adv - x).flatten(1).abs().amax(1) > eps)
        ours_robust = model(ours.x_adv).argmax(1) == y
    assert 0 < int(original_robust.sum()) < len(y)  # a batch where the decision is not trivial
    assert int((ours_robust != original_robust).sum()) <= 1
    assert int(ours_robust.sum()) <= int(original_robust.sum())
    assert ours.gradients < len(y) * 20 * 3  # fooled examples left early


def test_the_standard_suite_runs_fab_t_in_autoattack_s_order() -> None:
    """The default suite is AutoAttack's four attacks; FAB-T gets the suite's steps and targets."""
    from qgtrain.evaluation.runner import StandardSettings

    suite = StandardSettings(eps=0.3).suite()
    assert [a.name for a in suite] == ["apgd_ce", "apgd_t", "fab_t", "square"]
    assert (suite[2].steps, suite[2].targets, suite[2].eps) == (100, 9, 0.3)
    assert StandardSettings(eps=0.3, num_classes=5).suite()[2].targets == 4
    without = StandardSettings(eps=0.3, suite_attacks=["apgd_ce", "apgd_t", "square"]).suite()
    assert [a.name for a in without] == ["apgd_ce", "apgd_t", "square"]  # control: the choice is honoured
