"""Mixed precision and channels_last: every attack's invariants under 16-mixed / bf16-mixed autocast,
and training under AMP, on the CPU and (tests marked ``cuda``, skipped without one) on a GPU.

``benchmarks/gpu_check.py`` runs the ``cuda`` ones on a GPU machine (``pytest -m cuda``).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from qgtrain.attacks import (
    PGD,
    attack_class,
    attack_for_budget,
    available_attacks,
)
from qgtrain.models import MadryMNIST, TinyCNN
from qgtrain.training import AdversarialTraining, quiet_trainer
from tests.helpers import assert_valid_adversarial, load_mnist_tensors, module_modes

CUDA = pytest.param(
    "cuda",
    marks=[
        pytest.mark.cuda,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    ],
)
DEVICES = ["cpu", CUDA]
AUTOCAST_DTYPES = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}
EPS = 0.3


def _batch(device: str, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_mnist_tensors(n, train=False)
    return x.to(device), y.to(device)


def _net(device: str, channels_last: bool = True) -> TinyCNN:
    torch.manual_seed(0)
    net = TinyCNN(width=4).to(device)
    return net.to(memory_format=torch.channels_last) if channels_last else net


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", list(AUTOCAST_DTYPES))
@pytest.mark.parametrize("name", [n for n in available_attacks() if attack_class(n).stays_in_ball])
def test_attack_under_autocast_keeps_every_invariant(device: str, precision: str, name: str) -> None:
    model = _net(device).train()  # the caller's mode, whatever it is, comes back
    modes = module_modes(model)
    x, y = _batch(device)
    extra = {"queries": 20} if name == "square" else {}
    attack = attack_for_budget(name, EPS, 3, alpha=0.1, **extra)
    steps: list[tuple[torch.Tensor, torch.Tensor]] = []
    torch.manual_seed(0)
    with torch.autocast(device_type=device, dtype=AUTOCAST_DTYPES[precision]):
        result = attack.perturb(model, x, y, observer=lambda s, loss, g, d: steps.append((g, d)))
    assert_valid_adversarial(result.x_adv, x, EPS)
    assert result.x_adv.dtype == torch.float32 and result.x_adv.device == x.device
    assert result.x_adv.is_contiguous()  # the input's layout, whatever the network's
    assert module_modes(model) == modes
    assert all(p.grad is None for p in model.parameters())
    assert bool(steps) == attack.uses_gradients, "a gradient attack's observer sees every step"
    for grad, direction in steps:  # the direction in float32
        assert grad.dtype == torch.float32 and direction.dtype == torch.float32
        if attack.batch_coupled:  # BLOB's mix of quantized gradients: integer levels in [-b, b]
            assert torch.equal(direction, direction.round()) and direction.abs().max() <= attack.b
        else:  # the class's direction of the float32 gradient (the quantized gradient; RGD's raw one)
            assert torch.equal(direction, attack.direction(grad, x))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", list(AUTOCAST_DTYPES))
def test_attack_under_autocast_inside_inference_mode_matches_outside(device: str, precision: str) -> None:
    model = _net(device).eval()
    x, y = _batch(device)
    outputs = []
    for inference in (False, True):
        torch.manual_seed(0)
        with (
            torch.inference_mode(inference),
            torch.autocast(device_type=device, dtype=AUTOCAST_DTYPES[precision]),
        ):
            outputs.append(PGD(eps=EPS, alpha=0.1, steps=3)(model, x.clone(), y.clone()))
    assert torch.equal(outputs[0], outputs[1])


@pytest.mark.parametrize("device", DEVICES)
def test_channels_last_network_gives_the_same_attack(device: str) -> None:
    torch.manual_seed(0)
    contiguous = MadryMNIST().to(device).eval()
    channels_last = MadryMNIST().to(device).eval()
    channels_last.load_state_dict(contiguous.state_dict())
    channels_last.to(memory_format=torch.channels_last)
    x, y = _batch(device, 64)
    x_adv = {}
    for label, model in (("contiguous", contiguous), ("channels_last", channels_last)):
        torch.manual_seed(0)
        x_adv[label] = PGD(eps=EPS, alpha=0.1, steps=3)(model, x, y)
    with torch.no_grad():
        same = contiguous(x_adv["contiguous"]).argmax(1) == contiguous(x_adv["channels_last"]).argmax(1)
    assert same.float().mean() >= 0.95  # float rounding may flip a sign; outcomes agree


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", list(AUTOCAST_DTYPES))
def test_training_under_amp_with_channels_last(device: str, precision: str) -> None:
    if device == "cpu" and precision == "16-mixed":
        pytest.skip("Lightning supports only bf16-mixed on CPU")
    x, y = load_mnist_tensors(64)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    module = AdversarialTraining(
        _net("cpu", channels_last=False), PGD(eps=EPS, alpha=0.1, steps=2), channels_last=True
    )
    before = [p.detach().clone() for p in module.net.parameters()]
    trainer = quiet_trainer(accelerator=device, precision=precision, max_epochs=1, limit_val_batches=1)
    trainer.fit(module, loader, DataLoader(TensorDataset(x[:16], y[:16]), batch_size=16))
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"])
    assert 0 <= metrics["val/adv_acc"] <= metrics["val/clean_acc"] + 1e-6
    after = list(module.net.parameters())
    assert any(not torch.equal(a.cpu(), b.detach().cpu()) for a, b in zip(before, after, strict=True))
    assert all(p.dtype == torch.float32 for p in after)  # AMP keeps float32 master weights
    conv = module.net.features[3].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()


def test_compile_net_compiles_in_place_and_keeps_the_checkpoint_keys() -> None:
    net = TinyCNN(width=4)
    keys = list(net.state_dict())
    module = AdversarialTraining(net, PGD(eps=EPS, alpha=0.1, steps=1), compile_net=True)
    assert getattr(module.net, "_compiled_call_impl", None) is None  # lazily, at setup
    module.setup("fit")
    module.setup("validate")  # twice: compiled once
    assert module.net is net and net._compiled_call_impl is not None
    assert list(net.state_dict()) == keys  # no "_orig_mod." prefix: evaluate.py loads it as before


@pytest.mark.parametrize("device", [CUDA])
def test_compiled_network_trains_under_amp(device: str) -> None:
    x, y = load_mnist_tensors(64)
    module = AdversarialTraining(
        _net("cpu", channels_last=False),
        PGD(eps=EPS, alpha=0.1, steps=2),
        channels_last=True,
        compile_net=True,
    )
    trainer = quiet_trainer(accelerator=device, precision="bf16-mixed", max_epochs=1, limit_val_batches=0)
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=16))
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
