"""RGD (Yang et al., arXiv 2312.01260): its iterates against the authors' update written out by hand,
its hidden unclipped perturbation under early exit, its output kept in the threat model, its step-size
rule, and ``--inner rgd``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qgtrain.attacks import PGD, RGD, attack_for_budget, build_attack, started_at
from qgtrain.cli.train import build_cli
from qgtrain.models import TinyCNN
from qgtrain.training import AdversarialTraining
from tests.helpers import fit_killed_and_resumed, fit_uninterrupted, output_roots, same_weights

EPS = 0.1
STEPS = 4
TOLERANCE = {"atol": 1e-5, "rtol": 0.0}  # the reference works on the perturbation, we on the point


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 10)).eval()


def batch(model: nn.Module, n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Random 6x6 images labelled with the model's own prediction (so every example starts robust)."""
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(n, 1, 6, 6, generator=generator)
    with torch.no_grad():
        return x, model(x).argmax(1)


def reference_iterates(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    start: torch.Tensor,
    eps: float,
    alpha: float,
    steps: int,
    step_from_clipped: bool = False,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The authors' ``noclip_raw`` loop (JunjieYang97/RGD, ``Linf_attack.perturb_iterative``): the
    cross-entropy averaged over the batch, a step of ``alpha * N`` (our ``alpha`` is per example),
    ``delta_real += step * grad``, ``delta = clip(x + clip(delta_real, -eps, eps), 0, 1) - x``.
    Returns the points the model sees after each step and the hidden perturbations.
    ``step_from_clipped``: the reference's ``raw_grad`` instead, PGD without the sign (a control)."""
    delta = start - x
    hidden = delta.clone()
    seen, hiddens = [], []
    for _ in range(steps):
        d = delta.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x + d), y, reduction="mean"), d)
        hidden = (delta if step_from_clipped else hidden) + alpha * x.shape[0] * grad
        delta = (x + hidden.clamp(-eps, eps)).clamp(0, 1) - x
        seen.append((x + delta).clamp(0, 1))
        hiddens.append(hidden)
    return seen, hiddens


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, **TOLERANCE)


@pytest.mark.parametrize("start", ["zero", "injected"])
@pytest.mark.parametrize("alpha", [1.0, 10.0])
def test_iterates_follow_the_reference_update(start: str, alpha: float) -> None:
    """After every step k, RGD-k's output is the reference's k-th point, from the authors' zero start
    and from an injected one. Controls: PGD's sign step from the same start, and the update that
    steps from the clipped point (no hidden state), both miss the reference."""
    model = tiny_net()
    x, y = batch(model)
    generator = torch.Generator().manual_seed(2)
    origin = x if start == "zero" else (x + EPS * (2 * torch.rand(x.shape, generator=generator) - 1)).clamp(0, 1)
    expected, _ = reference_iterates(model, x, y, origin, EPS, alpha, STEPS)
    clipped, _ = reference_iterates(model, x, y, origin, EPS, alpha, STEPS, step_from_clipped=True)

    def run(attack: PGD | RGD) -> torch.Tensor:
        return (attack if start == "zero" else started_at(attack, origin))(model, x, y)

    ours = [run(RGD(eps=EPS, alpha=alpha, steps=k)) for k in range(1, STEPS + 1)]
    for k, (got, want) in enumerate(zip(ours, expected, strict=True), start=1):
        torch.testing.assert_close(got, want, **TOLERANCE, msg=f"step {k}")
    assert not close(ours[-1], clipped[-1]), "the control: a step from the clipped point lands elsewhere"
    sign = run(PGD(eps=EPS, alpha=alpha, steps=STEPS, random_start=False))
    assert not close(sign, expected[-1]), "the control: PGD's sign step lands elsewhere"


def test_early_exit_keeps_each_examples_first_fooling_iterate() -> None:
    """With early exit, fooled examples leave the loop and the others carry on from their own hidden
    perturbation: each example ends at the reference's first point that fools the model, or at its
    last one. Control: the same expectation from the clipped-point update is not what RGD returns."""
    model = tiny_net()
    x, y = batch(model, n=12)
    eps, alpha, steps = 0.01, 3.0, 5  # two examples leave after one step, ten stay

    def first_fooling(points: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        out, fooled = points[-1].clone(), torch.zeros(len(y), dtype=torch.bool)
        with torch.no_grad():
            for point in points:
                hit = (model(point).argmax(1) != y) & ~fooled
                out[hit], fooled = point[hit], fooled | hit
        return out, fooled

    expected = first_fooling([x, *reference_iterates(model, x, y, x, eps, alpha, steps)[0]])
    clipped = first_fooling([x, *reference_iterates(model, x, y, x, eps, alpha, steps, True)[0]])
    result = RGD(eps=eps, alpha=alpha, steps=steps).perturb(model, x, y, early_exit=True)
    assert 0 < int(expected[1].sum()) < len(y), "the case needs examples that leave and examples that stay"
    assert torch.equal(result.fooled, expected[1])
    torch.testing.assert_close(result.x_adv, expected[0], **TOLERANCE)
    assert not close(result.x_adv, clipped[0]), "the control: without the hidden state the survivors differ"


def test_output_stays_in_the_threat_model_while_the_hidden_perturbation_leaves_it() -> None:
    """A large step drives the hidden perturbation far outside the ball (the control: the unprojected
    point would fail the checks below); what the attack returns is in the ball and in [0, 1],
    detached, with the model's modes and parameter gradients as they were."""
    model = tiny_net().train()
    x, y = batch(model)
    alpha = 100.0
    _, hiddens = reference_iterates(model.eval(), x, y, x, EPS, alpha, STEPS)
    model.train()
    unprojected = x + hiddens[-1]
    assert (hiddens[-1].abs() > EPS).any() and ((unprojected < 0) | (unprojected > 1)).any()
    x_adv = RGD(eps=EPS, alpha=alpha, steps=STEPS)(model, x, y)
    assert (x_adv - x).abs().max() <= EPS * (1 + 1e-6) and x_adv.min() >= 0 and x_adv.max() <= 1
    assert not x_adv.requires_grad and x_adv.grad_fn is None and not torch.equal(x_adv, x)
    assert all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_step_size_rule_start_and_budget() -> None:
    """The step is the reference's 3000 on a 128-example mean at eps 8/255, per example, scaled with
    eps as eps warm-up scales it, whatever the steps; the start is ``x``; ``b`` is not an argument."""
    assert RGD.default_alpha(8 / 255, 10) == pytest.approx(3000 / 128)
    assert RGD.default_alpha(0.3, 10) == RGD.default_alpha(0.3, 100) == pytest.approx(3000 / 128 * 0.3 * 255 / 8)
    attack = attack_for_budget("rgd", 0.3, 20, b=100)  # budgets name a b for quantized rows; RGD has none
    assert attack.alpha == pytest.approx(RGD.default_alpha(0.3, 20)) and attack.steps == 20
    assert attack.with_eps(0.1).alpha == pytest.approx(RGD(eps=0.1).alpha)
    x = torch.rand(2, 1, 6, 6)
    assert torch.equal(attack.starting_point(x), x)
    assert "b" not in attack.config() and build_attack(**attack.config()).config() == attack.config()
    with pytest.raises(TypeError, match="'b'"):
        RGD(b=1)  # type: ignore[call-arg]


def test_inner_rgd_builds_from_train_py(tmp_path: Path) -> None:
    """``train.py --inner rgd`` builds RGD at its own step size, with no ``b`` passed to it, and names
    the run (the run name read ``b``, which RGD's config does not have)."""
    cli = build_cli(["--inner", "rgd", "--steps", "10", *output_roots(tmp_path)])
    inner = cli.model.inner
    assert isinstance(inner, RGD) and inner.steps == 10
    assert inner.alpha == pytest.approx(RGD.default_alpha(0.3, 10))
    assert "-rgd-k10" in cli.run_name


def test_kill_and_resume_of_rgd_training_is_bit_exact(data_root: Path, tmp_path: Path) -> None:
    """``--inner rgd``: 2 epochs of 4 batches, killed after 5 batches and resumed from the step
    checkpoint of step 4: the weights equal the uninterrupted run's bit for bit (RGD keeps its hidden
    perturbation only within one call). Control: resumed with another RGD step, it ends elsewhere."""

    def build(alpha: float = 50.0) -> AdversarialTraining:
        torch.manual_seed(0)
        return AdversarialTraining(TinyCNN(width=4), RGD(eps=0.3, alpha=alpha, steps=2), track_clean_accuracy=False)

    whole = fit_uninterrupted(build, data_root, max_epochs=2)
    resumed = fit_killed_and_resumed(build, data_root, tmp_path / "a", 2, kill_after_batches=5, every_n_steps=2)
    assert same_weights(resumed.net, whole.net)
    builds = iter([build(), build(alpha=5.0)])
    control = fit_killed_and_resumed(
        lambda: next(builds), data_root, tmp_path / "b", 2, kill_after_batches=5, every_n_steps=2
    )
    assert not same_weights(control.net, whole.net)
