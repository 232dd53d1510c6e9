"""The torchattacks adapter: any torchattacks class by name inside the protocol, kept in the threat model."""

from __future__ import annotations

import pytest
import torch

from qgtrain.attacks import attack_class, build_attack
from qgtrain.attacks.external import TorchattacksAttack
from qgtrain.evaluation.protocol import attack_batch


def test_names_resolve_to_the_adapter_and_errors_are_one_line() -> None:
    assert attack_class("torchattacks.FAB") is TorchattacksAttack
    try:
        import torchattacks  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match=r"needs the torchattacks package: pip install -e '\.\[bench\]'"):
            build_attack("torchattacks.PGD", eps=0.1)
        return
    with pytest.raises(ValueError, match="torchattacks has no attack class 'NoSuch'"):
        build_attack("torchattacks.NoSuch", eps=0.1)


def test_a_wrapped_attack_runs_through_the_engine_inside_the_ball(trained_tiny_model, mnist_small) -> None:
    pytest.importorskip("torchattacks")
    x, y = mnist_small[0][:40], mnist_small[1][:40]
    attack = build_attack("torchattacks.PGD", eps=0.1, attack_kwargs={"alpha": 0.02, "steps": 5})
    torch.manual_seed(0)
    result = attack.perturb(trained_tiny_model, x, y)
    assert (
        (result.x_adv - x).abs().max() <= 0.1 + 1e-6 and result.x_adv.min() >= 0 and result.x_adv.max() <= 1
    )
    assert result.forwards >= 5 * len(y)  # every model evaluation counted
    outcome = attack_batch(trained_tiny_model, [attack], x, y, stream_seed=0)
    assert int(outcome.robust.sum()) < int(outcome.clean.sum())  # it attacks
    assert outcome.labels == ["torchattacks.PGD"] and outcome.costs[0].to_dict()["gradients"] is None


def test_restarts_rerun_the_wrapped_attack_only_on_examples_still_robust(
    trained_tiny_model, mnist_small
) -> None:
    """Restarts come from Attack's loop: a second run costs the first run's price per example still
    robust, and keeps every example the first run fooled."""
    pytest.importorskip("torchattacks")
    x, y = mnist_small[0][:40], mnist_small[1][:40]
    runs = {}
    for restarts in (1, 2):
        attack = build_attack("torchattacks.PGD", eps=0.05, restarts=restarts, attack_kwargs={"steps": 3})
        torch.manual_seed(0)
        runs[restarts] = attack.perturb(trained_tiny_model, x, y)
    one, two = runs[1], runs[2]
    robust_after_one = int((~one.fooled).sum())
    assert 0 < robust_after_one < len(y)  # control: the first run fools some, not all
    assert two.forwards - one.forwards == one.forwards // len(y) * robust_after_one
    assert bool((two.fooled | ~one.fooled).all())
