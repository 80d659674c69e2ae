"""Triton kernels for the two remaining dialect ops: ``w8a8_linear`` (int8 x int8 with dynamic
per-token activation scales) and ``quant_embedding`` (row gather from a MatMulNBits table).

``w8a8_linear`` runs in two kernels: one program per row of x finds ``max|x|``, stores the
scale ``max|x| / 127`` and the int8 row (round half to even, as ``torch.round``); then an int8
``tl.dot`` GEMM accumulates exactly in int32 and scales by the activation and weight scales in
its epilogue, matching the reference semantics of ``modelfold.ir.quant.w8a8_linear``.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from modelfold.kernels._runtime import (
    FLOAT_DTYPES,
    KernelError,
    as_rows,
    autotune,
    check,
    check_device,
    interpreting,
    launch,
    next_pow2,
)
from modelfold.kernels.linear import _packed, _zero_point, interpret_tiles

W8A8_CONFIGS = [
    {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4},
    {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4},
    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 128, "num_warps": 8, "num_stages": 3},
]
ROW_BLOCK = 1024
# Adding and subtracting 1.5 * 2^23 rounds a float32 |v| < 2^22 to the nearest integer, ties to
# even (IEEE round-to-nearest), like torch.round.
_ROUND_MAGIC = tl.constexpr(12582912.0)


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, K, x_row, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    amax = tl.full((BLOCK,), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK):
        rk = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * x_row + rk, mask=rk < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.reduce(amax, 0, tl.standard._elementwise_max), 1e-8) / 127.0
    tl.store(s_ptr + row, scale)
    for k0 in range(0, K, BLOCK):
        rk = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * x_row + rk, mask=rk < K, other=0.0).to(tl.float32)
        q = (x / scale + _ROUND_MAGIC) - _ROUND_MAGIC
        q = tl.minimum(tl.maximum(q, -127.0), 127.0)
        tl.store(q_ptr + row * K + rk, q.to(tl.int8), mask=rk < K)


@triton.jit
def _w8a8_kernel(q_ptr, xs_ptr, w_ptr, ws_ptr, bias_ptr, out_ptr, M, N, K, out_row, M_BUCKET,
                 HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.full((BLOCK_M, BLOCK_N), 0, tl.int32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(q_ptr + rm[:, None] * K + rk[None, :],
                    mask=(rm[:, None] < M) & (rk[None, :] < K), other=0)
        b = tl.load(w_ptr + rk[:, None] * N + rn[None, :],  # weights stored [K, N]
                    mask=(rk[:, None] < K) & (rn[None, :] < N), other=0)
        acc += tl.dot(a, b)
    xs = tl.load(xs_ptr + rm, mask=rm < M, other=0.0)
    ws = tl.load(ws_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    y = acc.to(tl.float32) * xs[:, None] * ws[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm[:, None] * out_row + rn[None, :], y.to(out_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


_w8a8_tuned = autotune(W8A8_CONFIGS, key=["M_BUCKET", "N", "K"])(_w8a8_kernel)


def w8a8_linear(x: torch.Tensor, qweight_t: torch.Tensor, weight_scales: torch.Tensor,
                bias: torch.Tensor | None, *, config: dict[str, Any] | None = None
                ) -> torch.Tensor:
    """int8 weights ``[K, N]`` (per-channel scales ``[N]``) x int8 per-token activations."""
    op = "w8a8_linear"
    check_device(op, x, qweight_t, weight_scales, bias)
    check(op, "qweight_t", qweight_t, dtypes=(torch.int8,), shape=(x.shape[-1], None))
    k, n_out = qweight_t.shape
    check(op, "weight_scales", weight_scales, dtypes=FLOAT_DTYPES, shape=(n_out,))
    check(op, "bias", bias, dtypes=(x.dtype,), shape=(n_out,))
    x2 = as_rows(op, x, k)
    m = x2.shape[0]
    if m == 0 or n_out == 0:
        return x.new_zeros((*x.shape[:-1], n_out))
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    xs = torch.empty((m,), dtype=torch.float32, device=x.device)
    _quantize_rows_kernel[(m,)](x2, q, xs, k, x2.stride(0),
                                BLOCK=min(ROW_BLOCK, max(16, next_pow2(k))))
    out = torch.empty((m, n_out), dtype=x.dtype, device=x.device)
    args = dict(q_ptr=q, xs_ptr=xs, w_ptr=qweight_t, ws_ptr=weight_scales,
                bias_ptr=bias if bias is not None else weight_scales, out_ptr=out, M=m, N=n_out,
                K=k, out_row=out.stride(0), M_BUCKET=next_pow2(m), HAS_BIAS=bias is not None)

    def grid(meta):
        return triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n_out, meta["BLOCK_N"])

    launch(_w8a8_kernel, _w8a8_tuned, grid, args, config, interpret_tiles(m, n_out, k, gemv=False))
    return out.reshape(*x.shape[:-1], n_out)


@triton.jit
def _embedding_kernel(ids_ptr, w_ptr, s_ptr, z_ptr, out_ptr, E, w_row, s_row, z_row,
                      BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZP: tl.constexpr,
                      BLOCK_E: tl.constexpr):
    i = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    row = tl.load(ids_ptr + i).to(tl.int64)
    rows = tl.full((BLOCK_E,), 0, tl.int64) + row
    mask = cols < E
    code = _packed(w_ptr, rows, cols, mask, w_row, BITS)
    grp = cols // GROUP
    z = _zero_point(z_ptr, rows, grp, mask, z_row, HAS_ZP, BITS)
    s = tl.load(s_ptr + rows * s_row + grp, mask=mask, other=0.0).to(tl.float32)
    w = (code - z).to(tl.float32) * s
    tl.store(out_ptr + i * E + cols, w.to(out_ptr.dtype.element_ty), mask=mask)


def quant_embedding(ids: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                    zero_points: torch.Tensor | None, embedding_dim: int, bits: int,
                    block_size: int, *, block_e: int | None = None) -> torch.Tensor:
    """Rows ``ids`` of the dequantized table, in ``scales.dtype``: ``[...] -> [..., E]``."""
    op = "quant_embedding"
    check_device(op, ids, qweight, scales, zero_points)
    if ids.dtype not in (torch.int32, torch.int64):
        raise KernelError(f"{op}: ids must be int32 or int64; got {ids.dtype}")
    if bits not in (2, 4, 8):
        raise KernelError(f"{op}: storage bits must be 2, 4 or 8; got {bits}")
    kb = -(-embedding_dim // block_size)
    v = qweight.shape[0]
    check(op, "qweight", qweight, dtypes=(torch.uint8,), shape=(v, kb, block_size * bits // 8))
    check(op, "scales", scales, dtypes=FLOAT_DTYPES, shape=(v, kb))
    check(op, "zero_points", zero_points, dtypes=(torch.uint8,), shape=(v, -(-kb * bits // 8)))
    flat = ids.reshape(-1).contiguous()
    out = torch.empty((flat.numel(), embedding_dim), dtype=scales.dtype, device=scales.device)
    if flat.numel():
        block = block_e or (max(16, next_pow2(embedding_dim)) if interpreting() else 256)
        _embedding_kernel[(flat.numel(), triton.cdiv(embedding_dim, block))](
            flat, qweight, scales, zero_points if zero_points is not None else qweight, out,
            embedding_dim, qweight.numel() // v, kb,
            zero_points.shape[1] if zero_points is not None else 0,
            BITS=bits, GROUP=block_size, HAS_ZP=zero_points is not None, BLOCK_E=block)
    return out.reshape(*ids.shape, embedding_dim)

