"""Triton kernels of the routed experts of ``modelfold::moe`` / ``quant_moe`` (``modelfold.ir.moe``).

Tokens are grouped by expert: the router's top-k choices (computed as the dialect op computes
them, ``modelfold.ir.moe.route``) give ``T * k`` (token, expert) slots; sorted by expert they form
one contiguous run per expert, cut into row blocks of ``BLOCK_M`` that never straddle two experts.
Two grouped GEMM kernels then run over all blocks of all experts in one launch each, each program
reading its block's expert id from a table and that expert's weights only:

1. ``_up_kernel``: ``h = act(x W1_e^T + b1_e) * (x W3_e^T)`` for gated experts (both products in
   one pass over K), ``act(x W1_e^T + b1_e)`` for dense ones; x rows gathered by token index;
2. ``_down_kernel``: ``y = weight * (h W2_e^T)`` per slot;

then the slots are added into their tokens (``index_add``). Expert weights are float ``[E, N, K]``
(``DENSE``) or the MatMulNBits layout stacked per expert (``QUANT``: ``[E, N, K * bits / 8]``
codes, ``[E, N, K / block]`` scales, packed zero points), decoded tile by tile in registers by the
linear kernels' ``_weight_tile``. Activations: ``silu``, ``gelu`` (erf), the tanh GELUs, ``relu``.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from modelfold.kernels._runtime import (
    INTERPRET,
    KernelError,
    as_rows,
    check,
    check_device,
    next_pow2,
)
from modelfold.kernels.linear import DENSE, QUANT, _weight_tile

ACTIVATIONS = {"silu": 0, "swish": 0, "gelu": 1, "gelu_pytorch_tanh": 2, "gelu_new": 2,
               "gelu_fast": 2, "gelu_python_tanh": 2, "relu": 3}


@triton.jit
def _act(h, ACT: tl.constexpr):
    if ACT == 0:
        out = h / (1.0 + tl.exp(-h))
    elif ACT == 1:
        out = 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))
    elif ACT == 2:
        inner = 0.7978845608028654 * (h + 0.044715 * h * h * h)
        out = 0.5 * h * (1.0 + (2.0 / (1.0 + tl.exp(-2.0 * inner)) - 1.0))
    else:
        out = tl.maximum(h, 0.0)
    return out


@triton.jit
def _up_kernel(x_ptr, tok_ptr, blk_e_ptr, blk_lo_ptr, blk_hi_ptr, h_ptr,
               w1_ptr, s1_ptr, z1_ptr, w3_ptr, s3_ptr, z3_ptr, b1_ptr,
               N, K, x_row, w_row, s_row, z_row, w_exp, s_exp, z_exp,
               FORMAT: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr,
               HAS_ZP: tl.constexpr, GATED: tl.constexpr, HAS_B1: tl.constexpr,
               ACT: tl.constexpr, DOT_PRECISION: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    blk = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(blk_e_ptr + blk)
    lo = tl.load(blk_lo_ptr + blk)
    hi = tl.load(blk_hi_ptr + blk)
    slots = lo + tl.arange(0, BLOCK_M)
    live = slots < hi
    tok = tl.load(tok_ptr + slots, mask=live, other=0)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dt = x_ptr.dtype.element_ty
    g = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    u = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + tok[:, None] * x_row + rk[None, :],
                    mask=live[:, None] & (rk[None, :] < K), other=0.0)
        w = _weight_tile(w1_ptr + e * w_exp, s1_ptr + e * s_exp, z1_ptr + e * z_exp, w1_ptr,
                         rn[:, None], rk[None, :], N, K, w_row, s_row, z_row, 0, FORMAT, BITS,
                         GROUP, HAS_ZP, 1, 1, 8)
        g += tl.dot(x, tl.trans(w.to(dt)), input_precision=DOT_PRECISION)
        if GATED:
            w = _weight_tile(w3_ptr + e * w_exp, s3_ptr + e * s_exp, z3_ptr + e * z_exp, w3_ptr,
                             rn[:, None], rk[None, :], N, K, w_row, s_row, z_row, 0, FORMAT,
                             BITS, GROUP, HAS_ZP, 1, 1, 8)
            u += tl.dot(x, tl.trans(w.to(dt)), input_precision=DOT_PRECISION)
    if HAS_B1:
        g += tl.load(b1_ptr + e * N + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    # round each product to x's dtype first, as the eager expert's linears do
    h = _act(g.to(dt).to(tl.float32), ACT)
    if GATED:
        h = h.to(dt).to(tl.float32) * u.to(dt).to(tl.float32)
    tl.store(h_ptr + slots[:, None] * N + rn[None, :], h.to(h_ptr.dtype.element_ty),
             mask=live[:, None] & (rn[None, :] < N))


@triton.jit
def _down_kernel(h_ptr, wt_ptr, blk_e_ptr, blk_lo_ptr, blk_hi_ptr, y_ptr,
                 w2_ptr, s2_ptr, z2_ptr, N, K, w_row, s_row, z_row, w_exp, s_exp, z_exp,
                 FORMAT: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr,
                 HAS_ZP: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    blk = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(blk_e_ptr + blk)
    lo = tl.load(blk_lo_ptr + blk)
    hi = tl.load(blk_hi_ptr + blk)
    slots = lo + tl.arange(0, BLOCK_M)
    live = slots < hi
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dt = h_ptr.dtype.element_ty
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        h = tl.load(h_ptr + slots[:, None] * K + rk[None, :],
                    mask=live[:, None] & (rk[None, :] < K), other=0.0)
        w = _weight_tile(w2_ptr + e * w_exp, s2_ptr + e * s_exp, z2_ptr + e * z_exp, w2_ptr,
                         rn[:, None], rk[None, :], N, K, w_row, s_row, z_row, 0, FORMAT, BITS,
                         GROUP, HAS_ZP, 1, 1, 8)
        acc += tl.dot(h, tl.trans(w.to(dt)), input_precision=DOT_PRECISION)
    weight = tl.load(wt_ptr + slots, mask=live, other=0.0).to(tl.float32)
    acc = acc.to(dt).to(tl.float32) * weight[:, None]
    tl.store(y_ptr + slots[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=live[:, None] & (rn[None, :] < N))


def _blocks(index: torch.Tensor, num_experts: int, block_m: int):
    """Slots sorted by expert: ``(order, block expert, block start, block end)``."""
    flat = index.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    experts, starts, ends = [], [], []
    start = 0
    for e, n in enumerate(counts):
        for lo in range(start, start + n, block_m):
            experts.append(e)
            starts.append(lo)
            ends.append(min(lo + block_m, start + n))
        start += n
    dev = index.device
    as_t = lambda v: torch.tensor(v, dtype=torch.int32, device=dev)  # noqa: E731
    return order, as_t(experts), as_t(starts), as_t(ends)


def _tiles(n: int, k: int, config: dict[str, Any] | None) -> dict[str, int]:
    if config is not None:
        return dict(config)
    cap = 512 if INTERPRET else 64
    return {"BLOCK_M": 16, "BLOCK_N": min(cap, max(16, next_pow2(n))),
            "BLOCK_K": min(cap, max(16, next_pow2(k)))}


def routed_experts(x: torch.Tensor, weights: torch.Tensor, index: torch.Tensor,
                   w1: torch.Tensor, w3: torch.Tensor | None, w2: torch.Tensor,
                   b1: torch.Tensor | None, activation: str, *, s1=None, z1=None, s3=None,
                   z3=None, s2=None, z2=None, bits: int = 4, block_size: int = 32,
                   config: dict[str, Any] | None = None) -> torch.Tensor:
    """``sum_k weights[t, k] * expert_{index[t, k]}(x[t])`` for ``x [T, H]``, experts stacked:
    float ``w1`` / ``w3`` ``[E, I, H]``, ``w2`` ``[E, H, I]`` (``s*`` None), or quantized
    (``w*`` uint8 codes ``[E, N, K * bits / 8]``, ``s*`` scales ``[E, N, K / block_size]``,
    ``z*`` packed zero points or None)."""
    op = "moe"
    check_device(op, x, weights, index, w1, w3, w2, b1, s1, s2, s3)
    if activation not in ACTIVATIONS:
        raise KernelError(f"{op}: no kernel for activation {activation!r} (one of "
                          f"{', '.join(ACTIVATIONS)})")
    quant = s1 is not None
    e_count = w1.shape[0]
    hidden = x.shape[-1]
    inter = w1.shape[1]
    x2 = as_rows(op, x, hidden)
    if quant:
        if bits not in (2, 4, 8):
            raise KernelError(f"{op}: storage bits must be 2, 4 or 8; got {bits}")
        for name, w, n, k in (("w1", w1, inter, hidden), ("w2", w2, hidden, inter)):
            check(op, name, w, dtypes=(torch.uint8,), shape=(e_count, n, k * bits // 8))
    else:
        check(op, "w1", w1, dtypes=(x.dtype,), shape=(None, inter, hidden))
        check(op, "w2", w2, dtypes=(x.dtype,), shape=(e_count, hidden, inter))
    check(op, "w3", w3, shape=tuple(w1.shape))
    check(op, "index", index, shape=(x2.shape[0], None))
    t, k = index.shape
    if t == 0:
        return torch.zeros_like(x2)
    up_cfg, down_cfg = _tiles(inter, hidden, config), _tiles(hidden, inter, config)
    block_m = up_cfg["BLOCK_M"]
    order, blk_e, blk_lo, blk_hi = _blocks(index, e_count, block_m)
    tok = (order // k).to(torch.int32)
    slot_w = weights.flatten()[order].contiguous()
    h = torch.empty((t * k, inter), dtype=x.dtype, device=x.device)
    y = torch.empty((t * k, hidden), dtype=x.dtype, device=x.device)
    fmt = QUANT if quant else DENSE
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    group = block_size if quant else 1

    def strides(w, s, z, k_in):
        kb = -(-k_in // block_size) if quant else 1
        return dict(w_row=w.shape[2], s_row=kb if quant else 0,
                    z_row=z.shape[2] if z is not None else 0, w_exp=w.shape[1] * w.shape[2],
                    s_exp=(w.shape[1] * kb) if quant else 0,
                    z_exp=(z.shape[1] * z.shape[2]) if z is not None else 0)

    dummy = x2
    nb = len(blk_e)
    up_grid = (nb, triton.cdiv(inter, up_cfg["BLOCK_N"]))
    _up_kernel[up_grid](
        x2, tok, blk_e, blk_lo, blk_hi, h, w1, s1 if quant else dummy,
        z1 if z1 is not None else dummy, w3 if w3 is not None else dummy,
        s3 if s3 is not None else dummy, z3 if z3 is not None else dummy,
        b1 if b1 is not None else dummy, inter, hidden, x2.stride(0),
        **strides(w1, s1, z1, hidden), FORMAT=fmt, BITS=bits, GROUP=group,
        HAS_ZP=z1 is not None, GATED=w3 is not None, HAS_B1=b1 is not None,
        ACT=ACTIVATIONS[activation], DOT_PRECISION=precision, **up_cfg)
    down_grid = (nb, triton.cdiv(hidden, down_cfg["BLOCK_N"]))
    _down_kernel[down_grid](
        h, slot_w, blk_e, blk_lo, blk_hi, y, w2, s2 if quant else dummy,
        z2 if z2 is not None else dummy, hidden, inter, **strides(w2, s2, z2, inter),
        FORMAT=fmt, BITS=bits, GROUP=group, HAS_ZP=z2 is not None, DOT_PRECISION=precision,
        **{**down_cfg, "BLOCK_M": block_m})
    out = torch.zeros_like(x2)
    return out.index_add(0, tok.long(), y)



__all__ = ["ACTIVATIONS", "routed_experts"]
