"""Pure-PyTorch references for the Triton kernels (same signatures as the launchers).

Each decodes the weight with the dialect's own functions (``modelfold.ir.quant`` /
``modelfold.ir.sparse``), rounds it to the activation dtype as the kernels do before their
tensor-core dot, then computes in float32 and rounds the result once to ``x.dtype``.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from modelfold.ir.quant import dequantize
from modelfold.ir.sparse import decompress, nm_quant_weight


def _finish(x: torch.Tensor, w: torch.Tensor | None, bias, lora_a, lora_b, scaling: float
            ) -> torch.Tensor:
    xf = x.float()
    y = F.linear(xf, w.to(x.dtype).float()) if w is not None else 0.0
    if lora_a is not None:
        y = y + F.linear(F.linear(xf, lora_a.float()), lora_b.float()) * scaling
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def quant_linear(x, qweight, scales, zero_points, bias, in_features, bits, block_size,
                 lora_a=None, lora_b=None, scaling=1.0):
    w = dequantize(qweight, scales.float(), zero_points, in_features, bits, block_size)
    return _finish(x, w, bias, lora_a, lora_b, scaling)


def nm_linear(x, values, indices, bias, in_features, n, m, lora_a=None, lora_b=None,
              scaling=1.0):
    w = decompress(values.float(), indices, in_features, n, m)
    return _finish(x, w, bias, lora_a, lora_b, scaling)


def nm_quant_linear(x, codes, indices, scales, zero_points, bias, in_features, bits, block_size,
                    n, m, lora_a=None, lora_b=None, scaling=1.0):
    w = nm_quant_weight(codes, indices, scales.float(), zero_points, in_features, bits,
                        block_size, n, m)
    return _finish(x, w, bias, lora_a, lora_b, scaling)


def dense_linear(x, weight, bias, lora_a=None, lora_b=None, scaling=1.0):
    return _finish(x, weight, bias, lora_a, lora_b, scaling)


def lora_delta(x, lora_a, lora_b, scaling):
    return _finish(x, None, None, lora_a, lora_b, scaling)


def w8a8_linear(x, qweight_t, weight_scales, bias):
    xf = x.float()
    a_s = xf.abs().amax(dim=-1, keepdim=True).clamp_min(1e-8) / 127.0
    xq = torch.clamp(torch.round(xf / a_s), -127, 127)
    acc = (xq.double() @ qweight_t.double()).float()
    y = acc * a_s * weight_scales.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def quant_embedding(ids, qweight, scales, zero_points, embedding_dim, bits, block_size,
                    dtype=torch.float32):
    rows = ids.reshape(-1)
    zp = zero_points[rows] if zero_points is not None else None
    w = dequantize(qweight[rows], scales[rows].float(), zp, embedding_dim, bits, block_size)
    return w.to(dtype).reshape(*ids.shape, embedding_dim)
