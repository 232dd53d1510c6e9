"""CPU-kernel tuning of the attack loop's forward and backward passes: the input fed in the network's
memory format, and the stem convolution's backward kept off oneDNN where that is faster. Only kernels
change, never the arithmetic (the timings: docs/RESULTS.md, "Faster than torchattacks")."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


def model_memory_format(model: nn.Module) -> torch.memory_format:
    """``torch.channels_last`` when the model's 4-D parameters are stored so, else contiguous.

    Decided by the first convolution weight whose two layouts differ (a weight with one input
    channel, such as an MNIST stem's, is both); ``net.to(memory_format=torch.channels_last)`` sets it.
    """
    for p in model.parameters():
        if p.dim() == 4:
            channels_last = p.is_contiguous(memory_format=torch.channels_last)
            if channels_last != p.is_contiguous():
                return torch.channels_last if channels_last else torch.contiguous_format
    return torch.contiguous_format


def as_model_input(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` in the memory format of ``model``'s convolutions (a no-op when it already is, e.g. one
    channel); inside the graph, so a gradient w.r.t. ``x`` keeps ``x``'s own layout."""
    if x.dim() != 4:
        return x
    return x.contiguous(memory_format=model_memory_format(model))


STEM_MAX_IN_CHANNELS = 4
"""A contiguous network's convolutions with at most this many input channels (its stem) get ATen's
CPU backward; in a channels_last network only one-channel convolutions of 5x5 or larger do."""


@contextlib.contextmanager
def native_stem_backward(model: nn.Module, x: torch.Tensor) -> Iterator[None]:
    """On CPU, run the backward of a network's stem convolution without oneDNN where that is faster.

    oneDNN's data-gradient kernel is slow for convolutions with few input channels, while every
    other convolution is faster with it (docs/RESULTS.md, "Faster than torchattacks", has the timings
    and which stems it pays for: the 5x5 one-channel stem of MadryMNIST in a channels_last network; a 3x3 or a
    3-channel stem stays on oneDNN). oneDNN is switched off just before the stem's backward node
    runs and back on just after it (graph-node hooks, so an in-place ReLU after the convolution does
    not matter); only the kernel changes, not the arithmetic. Not used off CPU, with oneDNN
    disabled, for a stem computed in bf16/fp16 (slower there, docs/RESULTS.md, "GPU: prepared, unmeasured"), or on a
    compiled network (hooks would force recompiles).
    """
    if (
        x.device.type != "cpu"
        or not torch.backends.mkldnn.enabled
        or getattr(model, "_compiled_call_impl", None) is not None
    ):
        yield
        return

    def disable(*_: Any) -> None:
        torch.backends.mkldnn.enabled = False

    def enable(*_: Any) -> None:
        torch.backends.mkldnn.enabled = True

    def attach(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        node = output.grad_fn
        if node is not None and output.dtype == torch.float32:  # ATen's bf16 kernel is the slow one
            node.register_prehook(disable)
            node.register_hook(enable)

    contiguous = model_memory_format(model) == torch.contiguous_format
    stems = [
        m
        for m in model.modules()
        if isinstance(m, nn.Conv2d)
        and (
            m.in_channels <= STEM_MAX_IN_CHANNELS
            if contiguous
            else m.in_channels == 1 and m.kernel_size[0] * m.kernel_size[1] >= 25
        )
    ]
    handles = [m.register_forward_hook(attach) for m in stems]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        torch.backends.mkldnn.enabled = True
