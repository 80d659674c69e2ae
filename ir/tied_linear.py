"""``modelfold::tied_linear``: a linear layer whose weight another node reads too.

A tied LM head reads the token-embedding table ``W [V, E]`` as ``x @ W.T``. Lowered as a plain
linear, that is ``MatMul(x, Transpose(W))``, and ONNX Runtime constant-folds the Transpose into a
second, transposed copy of the table (SmolLM2-135M's artifact grew from 538 MB to 651 MB). This op
says "multiply by the transpose without materialising it"; the ``tied-linear`` graph pass
(``modelfold.passes.tied_linear``) puts it where a linear's weight is shared with an embedding,
and the ONNX lowering is ``com.microsoft.FusedMatMul(x, W, transB=1)``.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


@torch.library.custom_op("modelfold::tied_linear", mutates_args=())
def tied_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T + bias``: x ``[..., K]``, weight ``[N, K]`` (shared), bias ``[N]``."""
    return F.linear(x, weight, bias)


@tied_linear.register_fake
def _(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _setup(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    grad_w = grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
    grad_b = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
    return grad @ weight, grad_w, grad_b


tied_linear.register_autograd(_backward, setup_context=_setup)

__all__ = ["tied_linear"]
