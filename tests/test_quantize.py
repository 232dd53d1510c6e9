"""quantize_gradient (Liu & Tsang, Eq. 4) against an element-wise reading of the formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qgtrain.attacks import check_quantization_level, quantize_gradient

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SHAPES = [(5,), (4, 7), (3, 1, 5, 5), (2, 3, 4, 4)]


def reference_quantize(grad: torch.Tensor, b: int) -> torch.Tensor:
    """Element by element: M = max|g| per example, v = b g / M, zeta(v) = sign(v) if |v| < 1 else round(v).

    Arithmetic in float32 (the specified precision for every input dtype); NumPy rounds half to even.
    """
    rows = grad.detach().float().reshape(grad.shape[0], -1).numpy()
    out = np.zeros_like(rows)
    for i, row in enumerate(rows):
        m = np.float32(max(abs(float(value)) for value in row))
        if m == 0:
            continue  # all-zero example: all-zero output
        for j, g in enumerate(row):
            v = np.float32(b) * g / m
            out[i, j] = np.sign(v) if abs(v) < 1 else np.round(v)
    return torch.from_numpy(out).reshape(grad.shape).to(grad.dtype)


def random_gradient(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random values spanning several magnitudes, with exact zeros and one all-zero example."""
    generator = torch.Generator().manual_seed(seed)
    g = torch.randn(shape, generator=generator) * torch.rand(shape, generator=generator) ** 3
    g[torch.rand(shape, generator=generator) < 0.15] = 0.0
    if shape[0] > 1:
        g[1] = 0.0
    return g.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("b", [1, 2, 7, 100, 1000])
def test_matches_elementwise_formula(shape: tuple[int, ...], dtype: torch.dtype, b: int) -> None:
    g = random_gradient(shape, dtype, seed=len(shape) * 1000 + b)
    q = quantize_gradient(g, b)
    assert q.shape == g.shape and q.dtype == g.dtype
    assert torch.equal(q, reference_quantize(g, b))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_boundary_values_around_one(dtype: torch.dtype) -> None:
    """|v| just below 1 -> sign (never 0), just above 1 -> round; max entry -> +-b; zeros stay 0."""
    b = 4
    # M = 1, so v = 4 g.  v = 4, .996, 1.004, -.996, -1.004, .25, 1.25, 1.75, 2.5, -3.5, 0
    row = [1.0, 0.249, 0.251, -0.249, -0.251, 0.0625, 0.3125, 0.4375, 0.625, -0.875, 0.0]
    expected = [4.0, 1.0, 1.0, -1.0, -1.0, 1.0, 1.0, 2.0, 2.0, -4.0, 0.0]
    g = torch.tensor([row, [-2.0 * r for r in row]], dtype=dtype)
    q = quantize_gradient(g, b)
    assert torch.equal(q, torch.tensor([expected, [-e for e in expected]], dtype=dtype))
    assert torch.equal(q, reference_quantize(g, b))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b", [1, 3, 100])
def test_values_are_nonzero_integers_within_b(dtype: torch.dtype, b: int) -> None:
    g = random_gradient((6, 3, 8, 8), dtype, seed=b)
    q = quantize_gradient(g, b).float()
    nonzero = g != 0
    assert torch.equal(q != 0, nonzero), "zero exactly where the gradient is zero"
    assert torch.equal(q, q.round())
    assert q.abs().max() <= b
    # the largest component of every non-zero example reaches +-b, with the gradient's sign
    rows = g.float().reshape(6, -1)
    q_rows = q.reshape(6, -1)
    for i in range(6):
        if rows[i].abs().max() > 0:
            j = rows[i].abs().argmax()
            assert q_rows[i, j] == b * torch.sign(rows[i, j])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_b_one_is_exactly_sign(dtype: torch.dtype) -> None:
    g = random_gradient((5, 2, 6, 6), dtype, seed=7)
    assert torch.equal(quantize_gradient(g, 1), torch.sign(g))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b", [1, 100])
def test_all_zero_rows_give_zeros_without_nan(dtype: torch.dtype, b: int) -> None:
    g = torch.zeros(3, 4, 5, dtype=dtype)
    g[2, 1, 3] = -0.5
    q = quantize_gradient(g, b)
    assert torch.isfinite(q.float()).all()
    assert torch.equal(q[:2], torch.zeros_like(q[:2]))
    assert q[2, 1, 3] == -b and q[2].count_nonzero() == 1


def test_per_example_scaling_is_independent_of_the_batch() -> None:
    """M is per example: quantizing a batch equals quantizing each example alone."""
    g = random_gradient((5, 3, 4), torch.float32, seed=3)
    g[0] *= 1e4  # one example with a much larger scale must not flatten the others
    batched = quantize_gradient(g, 50)
    for i in range(5):
        assert torch.equal(batched[i : i + 1], quantize_gradient(g[i : i + 1], 50))
    assert batched[2].abs().max() == 50


def test_non_contiguous_input_and_tiny_half_values() -> None:
    g = random_gradient((4, 6, 5), torch.float32, seed=11).transpose(1, 2)
    assert not g.is_contiguous()
    assert torch.equal(quantize_gradient(g, 9), reference_quantize(g, 9))
    tiny = torch.tensor([[6e-8, -6e-8, 0.0]], dtype=torch.float16)  # fp16 subnormals
    assert torch.equal(
        quantize_gradient(tiny, 100), torch.tensor([[100.0, -100.0, 0.0]], dtype=torch.float16)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_nonzero_even_when_b_g_over_m_underflows(dtype: torch.dtype) -> None:
    """v = b g / M below float32's smallest subnormal is still v > 0, so zeta(v) = sign(v) = 1."""
    g = torch.tensor([[1e30, 1e-20, -1e-20, 0.0]], dtype=dtype)
    assert torch.equal(quantize_gradient(g, 100), torch.tensor([[100.0, 1.0, -1.0, 0.0]], dtype=dtype))


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, False, float("nan")])
def test_invalid_b_raises(bad: object) -> None:
    g = torch.randn(2, 3)
    with pytest.raises(ValueError, match="b must be an integer >= 1"):
        quantize_gradient(g, bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="b must be an integer >= 1"):
        check_quantization_level(bad)  # type: ignore[arg-type]


def test_integral_float_b_is_accepted() -> None:
    g = torch.randn(3, 8)
    assert check_quantization_level(100.0) == 100
    assert torch.equal(quantize_gradient(g, 100.0), quantize_gradient(g, 100))  # type: ignore[arg-type]


def test_scalar_input_raises() -> None:
    with pytest.raises(ValueError, match="batch"):
        quantize_gradient(torch.tensor(1.0), 10)
