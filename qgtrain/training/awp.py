"""Adversarial weight perturbation, AWP (Wu, Xia, Wang, "Adversarial Weight Perturbation Helps Robust
Generalization", NeurIPS 2020, Alg. 1 with one ascent step).

After the inner maximiser has crafted ``x'``, each weight ``w_l`` (a parameter of dimension > 1: the
convolution and linear weights) is moved by ``v_l = gamma * ||w_l|| * g_l / ||g_l||``, ``g_l`` the gradient
of the training loss on ``x'`` with respect to ``w_l``; the training loss is then taken at ``w + v`` and its
gradient (at ``w + v``) updates ``w``. The reference code gets ``g`` from one SGD step of a proxy copy of
the model on the negated loss (the step's length cancels in the normalisation) and adds ``v`` in place,
subtracting it after the optimizer step (so its weight decay acts on ``w + v``; here on ``w``). Here ``g`` comes from ``torch.autograd.grad`` through
:func:`torch.func.functional_call` with copies of the buffers (BatchNorm statistics untouched, as by the
proxy), and the loss is taken through ``functional_call`` at ``w + v``: the gradient reaches ``w``
through the sum, the stored weights are never changed, so there is nothing to remove before the
optimizer step, no state across steps and nothing a checkpoint could miss.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call

Forward = Callable[[torch.Tensor], torch.Tensor]
"""A network's forward: inputs in [0, 1] to logits."""

NORM_GUARD = 1e-20
"""Added to ``||g_l||`` as in the reference code (a layer whose gradient is 0 is not moved)."""


def perturbed_weights(net: nn.Module) -> dict[str, nn.Parameter]:
    """The weights AWP moves: trainable parameters of dimension > 1 (biases and norm scales stay)."""
    return {name: p for name, p in net.named_parameters() if p.requires_grad and p.dim() > 1}


def weight_perturbation(
    net: nn.Module, loss_of: Callable[[Forward], torch.Tensor], gamma: float
) -> dict[str, torch.Tensor]:
    """``v_l = gamma * ||w_l|| / (||g_l|| + 1e-20) * g_l`` per weight (detached), ``g_l`` the gradient of
    ``loss_of(forward)`` at the current weights; ``forward`` runs ``net`` in its current mode on copies of
    its buffers, so the network and its BatchNorm statistics are left as they were."""
    weights = perturbed_weights(net)
    buffers = {name: b.clone() for name, b in net.named_buffers()}
    loss = loss_of(lambda inputs: functional_call(net, buffers, (inputs,)))
    grads = torch.autograd.grad(loss, list(weights.values()), allow_unused=True)
    return {
        name: (gamma * w.detach().norm() / (g.norm() + NORM_GUARD)) * g
        for (name, w), g in zip(weights.items(), grads, strict=True)
        if g is not None
    }


def perturbed_forward(net: nn.Module, perturbation: dict[str, torch.Tensor]) -> Forward:
    """``net``'s forward at the weights ``w + v`` (``v``: ``perturbation``), differentiable in ``w``; the
    network's own buffers are used and updated as by a plain forward."""
    params = dict(net.named_parameters())
    moved = {name: params[name] + v for name, v in perturbation.items()}
    return lambda inputs: functional_call(net, moved, (inputs,))
