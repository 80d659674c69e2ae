"""Residual add + normalization, one op each: ``modelfold::skip_rms_norm`` and
``modelfold::skip_layer_norm``.

A pre-norm transformer adds each sublayer's output to the residual stream and normalizes the sum
for the next sublayer. The ``fuse-norms`` graph pass (``modelfold.passes.fuse_norms``) puts these
ops there; the ONNX lowering emits ONNX Runtime's ``SkipSimplifiedLayerNormalization`` /
``SkipLayerNormalization``, which read the two tensors once and return the normalized sum and the
sum itself (the residual stream the next add reads).

Both compute in float32 like the models' own norms: ``s = x + skip``;
RMS: ``s * rsqrt(mean(s^2) + eps) * weight``; Layer: ``(s - mean) * rsqrt(var + eps) * weight
+ bias``. A model whose norm scales by ``1 + weight`` (Gemma) gets ``1 + weight`` as the weight.

Shape legend: N = leading dims (batch, sequence), E = hidden size.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


@torch.library.custom_op("modelfold::skip_rms_norm", mutates_args=())
def skip_rms_norm(x: torch.Tensor, skip: torch.Tensor, weight: torch.Tensor, eps: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(x + skip) * weight, x + skip)``: x, skip ``[..., E]``, weight ``[E]``."""
    total = x + skip
    s = total.float()
    normed = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * normed).to(x.dtype), total


@skip_rms_norm.register_fake
def _(x, skip, weight, eps):
    return torch.empty_like(x), torch.empty_like(x)


@torch.library.custom_op("modelfold::skip_layer_norm", mutates_args=())
def skip_layer_norm(x: torch.Tensor, skip: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(layer_norm(x + skip) * weight + bias, x + skip)``."""
    total = x + skip
    return F.layer_norm(total, (total.shape[-1],), weight, bias, eps), total


@skip_layer_norm.register_fake
def _(x, skip, weight, bias, eps):
    return torch.empty_like(x), torch.empty_like(x)


__all__ = ["skip_layer_norm", "skip_rms_norm"]
