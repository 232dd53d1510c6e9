"""Models: shapes per dataset, [0,1] inputs normalised inside, registry round trip, channels_last."""

from __future__ import annotations

import pytest
import torch

from qgtrain.models import DATASET_SPECS, MODELS, WideResNet, available_models, build_model, model_spec

CASES = [
    ("madry_mnist", "mnist"),
    ("madry_mnist", "fashion_mnist"),
    ("tiny_cnn", "mnist"),
    ("tiny_cnn", "cifar10"),
    ("preact_resnet18", "cifar10"),
    ("wide_resnet", "cifar10"),
]


def _build(name: str, dataset: str) -> torch.nn.Module:
    kwargs = {"dataset": dataset}
    if name == "wide_resnet":
        kwargs.update(depth=10, widen_factor=2)  # small enough for a CPU test
    return build_model(name, **kwargs)


@pytest.mark.parametrize(("name", "dataset"), CASES)
def test_output_shape_and_spec_round_trip(name: str, dataset: str) -> None:
    torch.manual_seed(0)
    spec = DATASET_SPECS[dataset]
    net = _build(name, dataset).eval()
    x = torch.rand(2, spec.channels, spec.size, spec.size)
    logits = net(x)
    assert logits.shape == (2, spec.num_classes)
    rebuilt = build_model(**{"name": model_spec(net)["name"]}, **model_spec(net)["kwargs"]).eval()
    rebuilt.load_state_dict(net.state_dict())
    assert torch.equal(rebuilt(x), logits)


@pytest.mark.parametrize(("name", "dataset"), [("madry_mnist", "mnist"), ("preact_resnet18", "cifar10")])
def test_channels_last_gives_same_logits(name: str, dataset: str) -> None:
    torch.manual_seed(0)
    spec = DATASET_SPECS[dataset]
    net = _build(name, dataset).eval()
    x = torch.rand(2, spec.channels, spec.size, spec.size)
    expected = net(x)
    net_cl = net.to(memory_format=torch.channels_last)
    out = net_cl(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_normalisation_is_inside_the_model() -> None:
    net = build_model("madry_mnist", dataset="mnist")
    x = torch.full((1, 1, 28, 28), 0.1307)
    assert torch.allclose(net.normalize(x), torch.zeros_like(x), atol=1e-6)


def test_madry_mnist_architecture() -> None:
    net = build_model("madry_mnist")
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert [(c.out_channels, c.kernel_size) for c in convs] == [(32, (5, 5)), (64, (5, 5))]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(7 * 7 * 64, 1024), (1024, 10)]


def test_wide_resnet_default_widths_are_madrys() -> None:
    net = WideResNet()  # 34-10
    widths = sorted({m.out_channels for m in net.modules() if isinstance(m, torch.nn.Conv2d)})
    assert widths == [16, 160, 320, 640]


def test_registry_errors_name_the_choices() -> None:
    assert set(available_models()) == set(MODELS)
    with pytest.raises(ValueError, match="madry_mnist"):
        build_model("resnet9000")
    with pytest.raises(ValueError, match="cifar10"):
        build_model("madry_mnist", dataset="imagenet")
    with pytest.raises(ValueError, match="6n\\+4"):
        WideResNet(depth=20)
