"""The attack library: registry, the shared loop's invariants and hygiene, losses, BLOB's direction, strength."""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qgtrain.attacks import (
    Attack,
    attack_class,
    attack_for_budget,
    available_attacks,
    blob_direction,
    build_attack,
    cross_entropy_loss,
    margin_loss,
)
from qgtrain.attacks.cpu_kernels import model_memory_format
from tests.helpers import assert_valid_adversarial, module_modes

# Evaluation attacks keep the eps-ball; N-FGSM (training only, by design outside it) has its own file.
ALL_ATTACKS = [name for name in available_attacks() if attack_class(name).stays_in_ball]
GRADIENT_ATTACKS = [name for name in ALL_ATTACKS if attack_class(name).uses_gradients]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny convolutions run ~100x slower with 2 OpenMP threads on a busy 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class SmallNet(nn.Module):
    """8x8 single-channel inputs; BatchNorm and Dropout so that train/eval mode matters."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten()
        )
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(4 * 8 * 8, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def small_net(seed: int = 0) -> SmallNet:
    torch.manual_seed(seed)
    return SmallNet()


def small_batch(n: int = 6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=generator), torch.randint(0, 10, (n,), generator=generator)


def accepts(name: str, key: str) -> bool:
    return key in inspect.signature(attack_class(name).__init__).parameters


def quick(name: str, eps: float = 0.1, **kwargs: object) -> Attack:
    """A short configuration of the named attack (few steps, a step size that reaches the boundary;
    Square: few queries)."""
    if accepts(name, "queries"):
        kwargs.setdefault("queries", 30)
    return attack_for_budget(name, eps, 3, alpha=0.05, **kwargs)


# ---------------------------------------------------------------- registry and configuration


def test_registry_names_and_config_round_trip() -> None:
    assert sorted(available_attacks()) == sorted(
        [
            "fgsm",
            "fgsm_rs",
            "free",
            "nfgsm",
            "pgd",
            "pqgd",
            "rgd",
            "blob",
            "blob_qg",
            "apgd_ce",
            "apgd_dlr",
            "apgd_t",
            "fab_t",
            "square",
        ]
    )
    for name in available_attacks():
        attack = build_attack(name, eps=0.2)
        config = attack.config()
        assert config["name"] == name and config["eps"] == 0.2
        rebuilt = build_attack(**config)
        assert type(rebuilt) is type(attack) and rebuilt.config() == config


def test_paper_defaults() -> None:
    assert build_attack("pqgd").b == 100 and build_attack("blob_qg").b == 100
    assert build_attack("pgd").b == 1 and build_attack("blob").b == 1
    assert build_attack("fgsm", eps=0.2).alpha == 0.2
    assert build_attack("fgsm_rs", eps=0.2).alpha == pytest.approx(0.25)
    blob = build_attack("blob")
    assert blob.c == 1.1 and blob.kernel_sign == -1 and blob.batch_coupled


@pytest.mark.parametrize("name", ["pgd", "pqgd", "blob", "blob_qg", "fgsm", "fgsm_rs", "nfgsm"])
def test_alpha_none_is_the_classs_step_size_rule(name: str) -> None:
    """``alpha=None`` (``alpha: null`` in a config) takes :meth:`Attack.default_alpha` of the attack's
    own eps and steps: 2.5 * eps / steps for iterative attacks (eps / steps for PQGD), the single-step
    classes' own rule; a given alpha is kept (the control)."""
    cls = attack_class(name)
    steps = 1 if cls.single_step else 10
    attack = build_attack(name, eps=0.3, steps=steps, alpha=None)
    assert attack.alpha == pytest.approx(cls.default_alpha(0.3, steps))
    assert build_attack(name, eps=0.3, steps=steps, alpha=0.05).alpha == 0.05
    if not cls.single_step:
        assert attack.alpha == pytest.approx(0.03 if name == "pqgd" else 0.075)


def test_unknown_name_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match="unknown attack 'cw'") as info:
        build_attack("cw")
    for name in ALL_ATTACKS:
        assert name in str(info.value)


BAD_KWARGS = [
    {"eps": 0.0},
    {"eps": -0.1},
    {"eps": 1.5},
    {"alpha": 0.0},
    {"alpha": -0.01},
    {"steps": 0},
    {"steps": 2.5},
    {"restarts": 0},
    {"loss": "hinge"},
    {"b": 0},
    {"b": 2.5},
    {"clip": (1.0, 0.0)},
]


@pytest.mark.parametrize(
    ("name", "bad"),
    [(name, bad) for name in ALL_ATTACKS for bad in BAD_KWARGS if accepts(name, next(iter(bad)))],
    ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={x}" for k, x in v.items()),
)
def test_bad_kwargs_raise_value_error(name: str, bad: dict[str, object]) -> None:
    key = next(iter(bad))
    with pytest.raises(ValueError, match=key):
        build_attack(name, **bad)


@pytest.mark.parametrize("name", ["blob", "blob_qg"])
def test_blob_bad_kernel_sign_and_c(name: str) -> None:
    with pytest.raises(ValueError, match="kernel_sign"):
        build_attack(name, kernel_sign=0)
    with pytest.raises(ValueError, match="c must be"):
        build_attack(name, c=-1.0)


# ---------------------------------------------------------------- invariants of every attack


@pytest.mark.parametrize("name", ALL_ATTACKS)
@pytest.mark.parametrize("loss", ["ce", "margin"])
def test_eps_ball_clip_shape_dtype_detached(name: str, loss: str) -> None:
    model = small_net().eval()
    x, y = small_batch()
    torch.manual_seed(0)
    x_adv = (quick(name, loss=loss) if accepts(name, "loss") else quick(name))(model, x, y)
    assert_valid_adversarial(x_adv, x, 0.1)


@pytest.mark.parametrize("name", ALL_ATTACKS)
def test_custom_clip_range_and_float64(name: str) -> None:
    model = small_net().double().eval()
    x, y = small_batch()
    x = (x * 0.6 + 0.2).double()  # inside clip (0.2, 0.8), many pixels near its edges
    torch.manual_seed(0)
    x_adv = quick(name, eps=0.15, clip=(0.2, 0.8))(model, x, y)
    assert_valid_adversarial(x_adv, x, 0.15, clip=(0.2, 0.8))
    assert x_adv.dtype == torch.float64


def _mixed_mode_model(parent_train: bool) -> SmallNet:
    model = small_net()
    model.train(parent_train)
    model.features[1].train(not parent_train)  # BatchNorm in the other mode than its parent
    model.head[0].train(not parent_train)  # Dropout too
    return model


MODE_CASES = {
    "train": lambda: small_net().train(),
    "eval": lambda: small_net().eval(),
    "eval-parent-train-children": lambda: _mixed_mode_model(False),
    "train-parent-eval-children": lambda: _mixed_mode_model(True),
}


@pytest.mark.parametrize("name", ALL_ATTACKS)
@pytest.mark.parametrize("case", list(MODE_CASES))
def test_model_mode_and_parameter_state_restored(name: str, case: str) -> None:
    model = MODE_CASES[case]()
    model.features[0].bias.requires_grad_(False)  # a frozen parameter
    modes = module_modes(model)
    flags = [p.requires_grad for p in model.parameters()]
    x, y = small_batch()
    torch.manual_seed(0)
    result = quick(name, restarts=2).perturb(model, x, y)
    assert module_modes(model) == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters()), "a parameter .grad was created"
    assert_valid_adversarial(result.x_adv, x, 0.1)


@pytest.mark.parametrize("name", ALL_ATTACKS)
def test_existing_parameter_grads_left_unchanged(name: str) -> None:
    model = small_net().eval()
    model.head[1].weight.requires_grad_(False)
    for i, p in enumerate(model.parameters()):
        if p.requires_grad:
            p.grad = torch.full_like(p, 0.5 + i)
    before = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    x, y = small_batch()
    quick(name)(model, x, y)
    for n, p in model.named_parameters():
        if before[n] is None:
            assert p.grad is None
        else:
            assert torch.equal(p.grad, before[n]), n


@pytest.mark.parametrize("name", ALL_ATTACKS)
def test_batch_of_one(name: str) -> None:
    model = small_net().eval()
    x, y = small_batch(n=1)
    torch.manual_seed(0)
    result = quick(name, restarts=2).perturb(model, x, y)
    assert_valid_adversarial(result.x_adv, x, 0.1)
    assert result.fooled.shape == (1,) and result.fooled.dtype == torch.bool


@pytest.mark.parametrize("name", ALL_ATTACKS)
def test_inside_inference_mode_matches_outside(name: str) -> None:
    model = small_net().eval()
    x, y = small_batch()
    torch.manual_seed(0)
    expected = quick(name)(model, x, y)
    with torch.inference_mode():
        x_inf, y_inf = x.clone(), y.clone()  # inference tensors
        torch.manual_seed(0)
        x_adv = quick(name)(model, x_inf, y_inf)
    assert torch.equal(x_adv, expected)
    assert_valid_adversarial(x_adv, x, 0.1)


@pytest.mark.parametrize("name", ALL_ATTACKS)
def test_under_cpu_bf16_autocast(name: str) -> None:
    model = small_net().train()
    modes = module_modes(model)
    x, y = small_batch()
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = quick(name).perturb(model, x, y)
    assert_valid_adversarial(result.x_adv, x, 0.1)
    assert result.x_adv.dtype == torch.float32
    assert module_modes(model) == modes
    assert all(p.grad is None for p in model.parameters())


class ColourNet(nn.Module):
    """3-channel 8x8 inputs, two convolutions (layouts of their weights are unambiguous); records
    whether each input it sees is stored channels_last."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Flatten()
        )
        self.head = nn.Linear(4 * 8 * 8, 10)
        self.seen_channels_last: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen_channels_last.append(
            x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        )
        return self.head(self.body(x))


def test_model_memory_format_is_read_from_the_parameters() -> None:
    torch.manual_seed(0)
    assert model_memory_format(ColourNet()) == torch.contiguous_format
    assert model_memory_format(ColourNet().to(memory_format=torch.channels_last)) == torch.channels_last
    one_channel_stem = nn.Conv2d(1, 4, 3).to(memory_format=torch.channels_last)  # both layouts at once
    assert model_memory_format(one_channel_stem) == torch.contiguous_format
    assert model_memory_format(nn.Linear(3, 2)) == torch.contiguous_format


@pytest.mark.parametrize("name", ALL_ATTACKS)
def test_attack_follows_a_channels_last_network_and_returns_the_input_layout(name: str) -> None:
    torch.manual_seed(0)
    contiguous = ColourNet().eval()
    channels_last = ColourNet().eval()
    channels_last.load_state_dict(contiguous.state_dict())
    channels_last.to(memory_format=torch.channels_last)
    generator = torch.Generator().manual_seed(1)
    x, y = torch.rand(6, 3, 8, 8, generator=generator), torch.randint(0, 10, (6,), generator=generator)
    outputs = {}
    for label, model in (("contiguous", contiguous), ("channels_last", channels_last)):
        torch.manual_seed(0)
        outputs[label] = quick(name, restarts=2).perturb(model, x, y).x_adv
        assert_valid_adversarial(outputs[label], x, 0.1)
        assert outputs[label].is_contiguous(), "a contiguous input must give a contiguous x_adv"
    assert channels_last.seen_channels_last and all(channels_last.seen_channels_last)
    assert not any(contiguous.seen_channels_last)  # control: a contiguous network sees contiguous inputs
    # another layout rounds differently: the same adversarial inputs up to rare sign flips (and, for
    # attacks whose steps are not signs, such as FAB's, up to rounding)
    same = torch.isclose(outputs["contiguous"], outputs["channels_last"], rtol=0.0, atol=1e-5)
    assert same.float().mean() >= 0.99


def _backward_kernels(
    attack: Attack, model: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> tuple[list[str], torch.Tensor]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        grad = attack.input_gradient(model, x, y).grad
    kernels = [
        e.name for e in prof.events() if e.name in ("aten::_slow_conv2d_backward", "aten::mkldnn_convolution")
    ]
    return kernels, grad


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN (mkldnn)")
def test_only_the_stem_backward_leaves_onednn_and_the_gradient_is_unchanged() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.Flatten(),
        nn.Linear(8 * 64, 10),
    ).eval()
    x, y = small_batch()
    native, legacy = quick("pgd"), quick("pgd")
    legacy.native_stem_backward = False
    kernels, grad = _backward_kernels(native, model, x, y)
    assert kernels.count("aten::_slow_conv2d_backward") == 1  # the 1-channel stem only
    assert kernels.count("aten::mkldnn_convolution") == 2  # forward passes keep oneDNN
    control, grad_legacy = _backward_kernels(legacy, model, x, y)
    assert "aten::_slow_conv2d_backward" not in control  # the control path stays on oneDNN
    torch.testing.assert_close(grad, grad_legacy)
    assert torch.backends.mkldnn.enabled  # restored


@pytest.mark.skipif(
    not torch.backends.mkldnn.is_available() or torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AMX"),
    reason="needs oneDNN with AVX-512: on an AVX2 CPU bf16 convolutions take ATen's kernel",
)
def test_a_stem_under_bf16_autocast_keeps_onednn() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 5, padding=2), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 10)
    ).eval()
    x, y = small_batch()
    kernels, _ = _backward_kernels(quick("pgd"), model, x, y)
    assert "aten::_slow_conv2d_backward" in kernels  # control: float32 takes ATen's kernel
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kernels, grad = _backward_kernels(quick("pgd"), model, x, y)
    assert "aten::_slow_conv2d_backward" not in kernels and grad.dtype == torch.float32


STEM_CASES = {  # (input channels, kernel, channels_last) -> stem backward on ATen?
    "3ch-3x3-contiguous": (3, 3, False, True),
    "3ch-3x3-channels_last": (3, 3, True, False),
    "1ch-5x5-channels_last": (1, 5, True, True),
    "1ch-3x3-channels_last": (1, 3, True, False),
}


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN (mkldnn)")
@pytest.mark.parametrize("case", list(STEM_CASES))
def test_which_stems_leave_onednn_depends_on_channels_kernel_and_layout(case: str) -> None:
    channels, kernel, channels_last, native = STEM_CASES[case]
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(channels, 8, kernel, padding=kernel // 2),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.Flatten(),
        nn.Linear(8 * 64, 10),
    ).eval()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    generator = torch.Generator().manual_seed(1)
    x, y = torch.rand(6, channels, 8, 8, generator=generator), torch.randint(0, 10, (6,), generator=generator)
    kernels, _ = _backward_kernels(quick("pgd"), model, x, y)
    assert kernels.count("aten::_slow_conv2d_backward") == (1 if native else 0)


@pytest.mark.parametrize("name", GRADIENT_ATTACKS)
def test_observer_sees_every_step_of_the_first_restart(name: str) -> None:
    model = small_net().eval()
    x, y = small_batch()
    attack = quick(name, restarts=3)
    seen: list[int] = []

    def observer(step: int, loss: torch.Tensor, grad: torch.Tensor, direction: torch.Tensor) -> None:
        seen.append(step)
        assert loss.shape == (x.shape[0],) and grad.shape == x.shape and direction.shape == x.shape
        assert not grad.requires_grad
        if not attack.batch_coupled:  # an independent example's direction reads its gradient only
            assert torch.equal(direction, attack.direction(grad, x))

    attack.perturb(model, x, y, observer=observer)
    assert seen == list(range(attack.steps))


# ---------------------------------------------------------------- exact behaviour


def test_fgsm_is_one_signed_step_of_size_eps() -> None:
    model = small_net().eval()
    x, y = small_batch()
    x_req = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x_req), y, reduction="sum"), x_req)
    expected = (x + 0.1 * grad.sign()).clamp(0, 1)
    assert torch.allclose(build_attack("fgsm", eps=0.1)(model, x, y), expected, atol=1e-7)


@pytest.mark.parametrize(("quantized", "plain"), [("pqgd", "pgd"), ("blob_qg", "blob")])
def test_b_one_is_bit_identical_to_the_sign_attack(quantized: str, plain: str) -> None:
    model = small_net().eval()
    x, y = small_batch(n=8)
    kwargs = {"eps": 0.3, "alpha": 0.02, "steps": 6, "restarts": 2}
    torch.manual_seed(5)
    reference = build_attack(plain, **kwargs).perturb(model, x, y)
    torch.manual_seed(5)
    same = build_attack(quantized, b=1, **kwargs).perturb(model, x, y)
    assert torch.equal(same.x_adv, reference.x_adv) and torch.equal(same.fooled, reference.fooled)
    torch.manual_seed(5)
    different = build_attack(quantized, b=100, **kwargs).perturb(model, x, y)
    assert not torch.equal(different.x_adv, reference.x_adv), "b=100 should change the steps"


def test_margin_loss_matches_definition() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0, -4.0], [5.0, 0.0, -1.0, 0.5], [2.0, 2.0, 2.0, 2.0]])
    # max_{j != y} z_j - z_y
    assert torch.equal(margin_loss(logits, torch.tensor([1, 0, 3])), torch.tensor([-1.0, -4.5, 0.0]))
    assert torch.equal(margin_loss(logits, torch.tensor([3, 2, 0])), torch.tensor([7.0, 6.0, 0.0]))
    y = torch.tensor([2, 1, 0])
    assert torch.allclose(cross_entropy_loss(logits, y), F.cross_entropy(logits, y, reduction="none"))
    half = margin_loss(logits.to(torch.bfloat16), torch.tensor([1, 0, 3]))
    assert half.dtype == torch.float32  # losses are computed in float32 under autocast


@pytest.mark.parametrize("loss", ["ce", "margin"])
def test_summed_loss_gradient_does_not_depend_on_batch_size(loss: str) -> None:
    """Per-example gradient of example 0: alone == inside a batch of 8 (eval mode: no batch coupling)."""
    model = small_net().eval()
    x, y = small_batch(n=8)
    grads: dict[int, torch.Tensor] = {}
    losses: dict[int, torch.Tensor] = {}

    def keep(n: int):
        def observer(
            step: int, per_example: torch.Tensor, grad: torch.Tensor, direction: torch.Tensor
        ) -> None:
            grads[n], losses[n] = grad[0], per_example[0]

        return observer

    attack = build_attack("pgd", eps=0.1, steps=1, random_start=False, loss=loss)
    for n in (1, 8):
        attack.perturb(model, x[:n], y[:n], observer=keep(n))
    assert grads[1].abs().max() > 0
    assert torch.allclose(grads[1], grads[8], rtol=1e-5, atol=1e-7)
    assert torch.allclose(losses[1], losses[8], rtol=1e-6)


# ---------------------------------------------------------------- BLOB's direction


def brute_force_blob(grad: torch.Tensor, particles: torch.Tensor, c: float, kernel_sign: int) -> np.ndarray:
    """Eq. 8 / blob_rand.py with explicit loops over pairs, in float64; NumPy's median."""
    n = grad.shape[0]
    g = grad.reshape(n, -1).double().numpy()
    x = particles.reshape(n, -1).double().numpy()
    dist2 = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            dist2[i, j] = float(np.sum((x[i] - x[j]) ** 2))
    h2 = 0.5 * np.median(dist2) / math.log(n)
    out = np.empty_like(g)
    for i in range(n):
        kernel_grad = np.zeros(g.shape[1])
        repulsion = np.zeros(g.shape[1])
        for j in range(n):
            k_ij = math.exp(-dist2[i, j] / (2 * h2))
            kernel_grad += k_ij * g[j]
            repulsion += k_ij * (x[i] - x[j]) / h2
        out[i] = g[i] + (c / n) * (kernel_grad + kernel_sign * repulsion)
    return out.reshape(grad.shape)


@pytest.mark.parametrize("kernel_sign", [-1, 1])
@pytest.mark.parametrize(("n", "c"), [(2, 1.1), (5, 1.1), (6, 10.0)])
def test_blob_direction_matches_double_loop(n: int, c: float, kernel_sign: int) -> None:
    generator = torch.Generator().manual_seed(n)
    particles = torch.rand(n, 2, 3, 3, generator=generator)
    grad = torch.randn(n, 2, 3, 3, generator=generator) * 0.1
    direction = blob_direction(grad, particles, c, kernel_sign)
    expected = brute_force_blob(grad, particles, c, kernel_sign)
    assert direction.shape == grad.shape and direction.dtype == grad.dtype
    assert np.allclose(direction.numpy(), expected, rtol=1e-4, atol=1e-5)
    assert not np.allclose(expected, grad.numpy(), atol=1e-3), "kernel terms should matter here"


def test_blob_kernel_signs_differ_only_in_the_repulsion() -> None:
    generator = torch.Generator().manual_seed(0)
    particles, grad = torch.rand(4, 10, generator=generator), torch.randn(4, 10, generator=generator)
    plus = blob_direction(grad, particles, 1.1, 1)
    minus = blob_direction(grad, particles, 1.1, -1)
    attraction = 0.5 * (plus + minus)  # g + (c/n) K g
    no_repulsion = brute_force_blob(grad, particles, 1.1, 0)
    assert np.allclose(attraction.numpy(), no_repulsion, rtol=1e-4, atol=1e-5)


def test_blob_direction_ignores_autocast() -> None:
    """The kernel is built in float32 even under bf16 autocast (a bf16 Gram matrix swamps distances)."""
    generator = torch.Generator().manual_seed(2)
    particles = torch.rand(32, 1, 28, 28, generator=generator)
    grad = torch.randn(32, 1, 28, 28, generator=generator)
    expected = blob_direction(grad, particles, 1.1, -1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        direction = blob_direction(grad, particles, 1.1, -1)
    assert direction.dtype == torch.float32 and torch.equal(direction, expected)


@pytest.mark.parametrize("n", [2, 8, 64])
def test_blob_all_equal_particles_give_the_gradient(n: int) -> None:
    particles = torch.rand(1, 1, 28, 28).expand(n, 1, 28, 28).contiguous()
    grad = torch.randn(n, 1, 28, 28)
    for sign in (-1, 1):
        direction = blob_direction(grad, particles, 1.1, sign)
        assert torch.isfinite(direction).all() and torch.equal(direction, grad)


def test_blob_zero_median_or_single_particle_give_the_gradient() -> None:
    grad = torch.randn(64, 784)
    mostly_equal = torch.rand(1, 784).repeat(64, 1)
    mostly_equal[:8] = torch.rand(8, 784)  # 56 of 64 coincide: the median distance is 0
    assert torch.equal(blob_direction(grad, mostly_equal, 1.1, -1), grad)
    assert torch.equal(blob_direction(grad[:1], mostly_equal[:1], 1.1, -1), grad[:1])


# ---------------------------------------------------------------- strength on a trained model

STRENGTH_N = 200


@pytest.fixture(scope="module")
def strength_data(
    trained_tiny_model: nn.Module, mnist_small: tuple[torch.Tensor, torch.Tensor]
) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    x, y = mnist_small
    return trained_tiny_model, x[:STRENGTH_N], y[:STRENGTH_N]


def adversarial_accuracy(model: nn.Module, attack: Attack, x: torch.Tensor, y: torch.Tensor) -> float:
    torch.manual_seed(0)
    x_adv = attack(model, x, y)
    with torch.no_grad():
        return (model(x_adv).argmax(1) == y).float().mean().item()


def strong(name: str, eps: float, steps: int = 10, **kwargs: object) -> Attack:
    """The attack with ``steps`` iterations and its class's default step size (Square: 300 queries)."""
    if accepts(name, "queries"):
        kwargs.setdefault("queries", 300)
    return attack_for_budget(name, eps, steps, **kwargs)


@pytest.mark.parametrize("name", ALL_ATTACKS)
def test_every_attack_lowers_accuracy(name: str, strength_data: tuple) -> None:
    model, x, y = strength_data
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
    assert clean > 0.8
    adversarial = adversarial_accuracy(model, strong(name, 0.3), x, y)
    assert adversarial < 0.5 * clean, f"{name}: clean {clean:.3f} -> adversarial {adversarial:.3f}"


def test_pgd_at_least_as_strong_as_fgsm(strength_data: tuple) -> None:
    model, x, y = strength_data
    fgsm = adversarial_accuracy(model, strong("fgsm", 0.1), x, y)
    pgd = adversarial_accuracy(model, strong("pgd", 0.1), x, y)
    assert 0.0 < pgd <= fgsm, f"pgd {pgd:.3f} vs fgsm {fgsm:.3f}"


@pytest.mark.parametrize("name", ["pgd", "blob"])  # independent examples / batch-coupled merge
def test_more_restarts_never_lose_a_fooled_example(name: str, strength_data: tuple) -> None:
    model, x, y = strength_data
    torch.manual_seed(3)
    x, y = x[:120], y[:120]
    once = strong(name, 0.1, steps=5).perturb(model, x, y)
    torch.manual_seed(3)
    thrice = strong(name, 0.1, steps=5, restarts=3).perturb(model, x, y)
    assert 0 < int(once.fooled.sum()) < len(y), "the comparison needs some examples left to fool"
    assert bool((thrice.fooled | ~once.fooled).all()), "restarts=3 lost an example fooled by restart 1"
    # the first restart draws the same random start: a fooled example keeps that first input
    assert torch.equal(thrice.x_adv[once.fooled], once.x_adv[once.fooled])
    with torch.no_grad():
        for result in (once, thrice):
            assert torch.equal(result.fooled, model(result.x_adv).argmax(1) != y)
            assert (result.x_adv - x).abs().max() <= 0.1 * (1 + 1e-6)


def test_class_traits_agree_with_the_constructors() -> None:
    """``default_b`` is the constructor's default of ``b``; single-step attacks default to one step."""
    for name in available_attacks():
        cls = attack_class(name)
        defaults = cls.constructor_defaults()
        assert defaults.get("b", 1) == cls.default_b, name
        if cls.single_step:
            assert defaults["steps"] == 1, name
    assert [n for n in available_attacks() if attack_class(n).default_b > 1] == ["pqgd", "blob_qg"]
    assert [n for n in available_attacks() if attack_class(n).single_step] == ["fgsm", "fgsm_rs", "free", "nfgsm"]
