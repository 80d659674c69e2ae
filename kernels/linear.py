"""Triton linear kernels for every weight format of the dialect, with an optional fused LoRA update.

One GEMM kernel and one GEMV kernel, specialised at compile time (``FORMAT``) by how the weight
``W [N, K]`` is stored; the weight is decoded tile by tile in registers and never materialised:

- ``NONE``      no base weight: ``y = s (x A^T) B^T`` (``modelfold::lora_delta``);
- ``DENSE``     a float ``W`` (fused LoRA linear over an ``nn.Linear``);
- ``QUANT``     ``MatMulNBits`` layout (``modelfold.ir.quant``): codes packed ``BITS`` (2, 4, 8)
                per value along K, low bits first, one scale (and zero point, packed the same way,
                or the default ``2^(BITS-1)``) per block of ``GROUP`` columns;
- ``NM``        N:M compressed (``modelfold.ir.sparse``): kept values ``[N, K n/m]`` + their
                positions in each group of ``m`` (``IBITS`` bits each);
- ``NM_QUANT``  N:M compressed codes on a ``MatMulNBits`` grid; pruned positions are the block's
                zero point (dequantize to 0).

Every kernel adds ``bias`` and, with ``HAS_LORA``, the low-rank update
``scaling * (x A^T) B^T`` (A ``[R, K]``, B ``[N, R]``) in the same pass: ``x A^T`` accumulates
in the K loop next to ``x W^T`` and is multiplied by ``B`` in the epilogue.

GEMM (``tl.dot``) serves prefill and batches; the GEMV kernel (``M <= GEMV_MAX_M``, batch-1
decode) reduces (sum) over a ``[BLOCK_N, BLOCK_K]`` weight tile per row of x and splits
K across programs (``SPLIT_K``, fp32 atomics) so that a single row still fills the GPU.
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
    launch,
    next_pow2,
)

NONE, DENSE, QUANT, NM, NM_QUANT = 0, 1, 2, 3, 4
GEMV_MAX_M = 4

GEMM_CONFIGS = [
    {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4},
    {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4},
    {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4},
    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
]
GEMV_CONFIGS = [
    {"BLOCK_N": 16, "BLOCK_K": 256, "SPLIT_K": 1, "num_warps": 4, "num_stages": 2},
    {"BLOCK_N": 32, "BLOCK_K": 256, "SPLIT_K": 1, "num_warps": 4, "num_stages": 3},
    {"BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": 2, "num_warps": 4, "num_stages": 3},
    {"BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 4, "num_warps": 4, "num_stages": 3},
    {"BLOCK_N": 64, "BLOCK_K": 256, "SPLIT_K": 2, "num_warps": 8, "num_stages": 3},
    {"BLOCK_N": 128, "BLOCK_K": 128, "SPLIT_K": 8, "num_warps": 8, "num_stages": 2},
]
# Under the interpreter every program is a Python loop iteration: few, large tiles, no larger
# than the problem (interpret_tiles).
INTERPRET_MAX_TILE = 512


def interpret_tiles(m: int, n: int, k: int, gemv: bool) -> dict[str, int]:
    """The tile configuration used under the interpreter for an ``[m, k] x [k, n]`` product."""
    bn = min(INTERPRET_MAX_TILE, max(16, next_pow2(n)))
    bk = min(INTERPRET_MAX_TILE, max(16, next_pow2(k)))
    if gemv:
        return {"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": 1}
    return {"BLOCK_M": min(64, max(16, next_pow2(m))), "BLOCK_N": bn, "BLOCK_K": bk}


# The kernels call no @jit helper of triton.language (tl.zeros, tl.sum, tl.cdiv): those are
# fixed to GPU or interpreter mode when triton is first imported (often by transformers), ours
# when modelfold.kernels is. Sums are tl.reduce with triton's own _sum_combine, which the
# interpreter recognises (numpy sum) without calling it, so both modes work whenever triton was
# imported.
@triton.jit
def _zero_point(z_ptr, rows, grp, mask, z_row, HAS_ZP: tl.constexpr, BITS: tl.constexpr):
    if HAS_ZP:
        per: tl.constexpr = 8 // BITS
        zb = tl.load(z_ptr + rows * z_row + grp // per, mask=mask, other=0).to(tl.int32)
        z = (zb >> ((grp % per) * BITS)) & ((1 << BITS) - 1)
    else:
        z = tl.full(mask.shape, 1 << (BITS - 1), tl.int32)  # full tile shape (a loop carry)
    return z


@triton.jit
def _packed(ptr, rows, idx, mask, row_stride, BITS: tl.constexpr):
    """Value ``idx`` of each row of a uint8 array packing ``BITS``-bit values low bits first."""
    per: tl.constexpr = 8 // BITS
    byte = tl.load(ptr + rows * row_stride + idx // per, mask=mask, other=0).to(tl.int32)
    return (byte >> ((idx % per) * BITS)) & ((1 << BITS) - 1)


@triton.jit
def _weight_tile(w_ptr, s_ptr, z_ptr, i_ptr, rows, cols, N, K, w_row, s_row, z_row, i_row,
                 FORMAT: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr,
                 HAS_ZP: tl.constexpr, NKEEP: tl.constexpr, MGROUP: tl.constexpr,
                 IBITS: tl.constexpr):
    """The float32 tile ``W[rows, cols]`` (rows ``[BN, 1]``, cols ``[1, BK]``), zero outside."""
    mask = (rows < N) & (cols < K)
    if FORMAT == 1:  # DENSE
        w = tl.load(w_ptr + rows * w_row + cols, mask=mask, other=0.0).to(tl.float32)
    elif FORMAT == 2:  # QUANT
        code = _packed(w_ptr, rows, cols, mask, w_row, BITS)
        grp = cols // GROUP
        z = _zero_point(z_ptr, rows, grp, mask, z_row, HAS_ZP, BITS)
        s = tl.load(s_ptr + rows * s_row + grp, mask=mask, other=0.0).to(tl.float32)
        w = (code - z).to(tl.float32) * s
    elif FORMAT == 3:  # NM: gather the kept value whose stored position matches the column
        first = cols // MGROUP * NKEEP
        pos = cols % MGROUP
        w = tl.full(mask.shape, 0.0, tl.float32)
        for j in range(NKEEP):
            p = _packed(i_ptr, rows, first + j, mask, i_row, IBITS)
            v = tl.load(w_ptr + rows * w_row + first + j, mask=mask, other=0.0).to(tl.float32)
            w = tl.where(p == pos, v, w)
    else:  # NM_QUANT: kept codes; pruned positions sit at the zero point
        grp = cols // GROUP
        z = _zero_point(z_ptr, rows, grp, mask, z_row, HAS_ZP, BITS)
        first = cols // MGROUP * NKEEP
        pos = cols % MGROUP
        code = z
        for j in range(NKEEP):
            p = _packed(i_ptr, rows, first + j, mask, i_row, IBITS)
            c = _packed(w_ptr, rows, first + j, mask, w_row, BITS)
            code = tl.where(p == pos, c, code)
        s = tl.load(s_ptr + rows * s_row + grp, mask=mask, other=0.0).to(tl.float32)
        w = (code - z).to(tl.float32) * s
    return tl.where(mask, w, 0.0)


@triton.jit
def _gemm_kernel(x_ptr, out_ptr, w_ptr, s_ptr, z_ptr, i_ptr, bias_ptr, a_ptr, b_ptr,
                 M, N, K, R, x_row, out_row, w_row, s_row, z_row, i_row, scaling, M_BUCKET,
                 FORMAT: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr,
                 HAS_ZP: tl.constexpr, NKEEP: tl.constexpr, MGROUP: tl.constexpr,
                 IBITS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr,
                 BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dt = x_ptr.dtype.element_ty
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    rr = tl.arange(0, BLOCK_R)
    h = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None] * x_row + rk[None, :],
                    mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        if FORMAT != 0:
            w = _weight_tile(w_ptr, s_ptr, z_ptr, i_ptr, rn[:, None], rk[None, :], N, K, w_row,
                             s_row, z_row, i_row, FORMAT, BITS, GROUP, HAS_ZP, NKEEP, MGROUP,
                             IBITS)
            acc += tl.dot(x, tl.trans(w.to(dt)), input_precision=DOT_PRECISION)
        if HAS_LORA:
            a = tl.load(a_ptr + rr[None, :] * K + rk[:, None],
                        mask=(rr[None, :] < R) & (rk[:, None] < K), other=0.0)  # [BK, BR]
            h += tl.dot(x, a, input_precision=DOT_PRECISION)
    if HAS_LORA:
        b = tl.load(b_ptr + rn[None, :] * R + rr[:, None],
                    mask=(rr[:, None] < R) & (rn[None, :] < N), other=0.0)  # [BR, BN]
        # fp32 (IEEE) for the small [BM, R] x [R, BN] update: h is not rounded to fp16
        acc += tl.dot(h, b.to(tl.float32), input_precision="ieee") * scaling
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm[:, None] * out_row + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _gemv_kernel(x_ptr, out_ptr, w_ptr, s_ptr, z_ptr, i_ptr, bias_ptr, a_ptr, b_ptr,
                 M, N, K, R, x_row, out_row, w_row, s_row, z_row, i_row, scaling,
                 FORMAT: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr,
                 HAS_ZP: tl.constexpr, NKEEP: tl.constexpr, MGROUP: tl.constexpr,
                 IBITS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr,
                 BLOCK_R: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """One row of x per program (axis 2); ``out`` is a zeroed float32 buffer (atomic adds)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    row = tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)
    acc = tl.full((BLOCK_N,), 0.0, tl.float32)
    h = tl.full((BLOCK_R,), 0.0, tl.float32)
    k_span = ((K + SPLIT_K - 1) // SPLIT_K + BLOCK_K - 1) // BLOCK_K * BLOCK_K
    k_start = pid_k * k_span
    k_stop = tl.minimum(k_start + k_span, K)
    for k0 in range(k_start, k_stop, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + row * x_row + rk, mask=rk < K, other=0.0).to(tl.float32)
        if FORMAT != 0:
            w = _weight_tile(w_ptr, s_ptr, z_ptr, i_ptr, rn[:, None], rk[None, :], N, K, w_row,
                             s_row, z_row, i_row, FORMAT, BITS, GROUP, HAS_ZP, NKEEP, MGROUP,
                             IBITS)
            w = w.to(x_ptr.dtype.element_ty).to(tl.float32)  # the weight in x's dtype, as GEMM
            acc += tl.reduce(w * x[None, :], 1, tl.standard._sum_combine)
        if HAS_LORA:
            a = tl.load(a_ptr + rr[:, None] * K + rk[None, :],
                        mask=(rr[:, None] < R) & (rk[None, :] < K), other=0.0).to(tl.float32)
            h += tl.reduce(a * x[None, :], 1, tl.standard._sum_combine)
    if HAS_LORA:  # B (sum over splits of h_s) = sum over splits of B h_s
        b = tl.load(b_ptr + rn[:, None] * R + rr[None, :],
                    mask=(rn[:, None] < N) & (rr[None, :] < R), other=0.0).to(tl.float32)
        acc += tl.reduce(b * h[None, :], 1, tl.standard._sum_combine) * scaling
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    if SPLIT_K == 1:
        tl.store(out_ptr + row * out_row + rn, acc, mask=rn < N)
    else:
        tl.atomic_add(out_ptr + row * out_row + rn, acc, mask=rn < N)


_gemm_tuned = autotune(GEMM_CONFIGS, key=["M_BUCKET", "N", "K", "R"])(_gemm_kernel)
_gemv_tuned = autotune(GEMV_CONFIGS, key=["M", "N", "K", "R"], reset_to_zero=["out_ptr"])(
    _gemv_kernel)


def _gemm_grid(m: int, n: int):
    return lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))


def _gemv_grid(m: int, n: int):
    return lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"], m)


def run_linear(op: str, x: torch.Tensor, n_out: int, k: int, *, fmt: int,
               w: torch.Tensor | None = None, scales: torch.Tensor | None = None,
               zero_points: torch.Tensor | None = None, indices: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, lora_a: torch.Tensor | None = None,
               lora_b: torch.Tensor | None = None, scaling: float = 1.0, bits: int = 4,
               group: int = 128, n_keep: int = 1, m_group: int = 1, index_bits: int = 8,
               config: dict[str, Any] | None = None, gemv: bool | None = None) -> torch.Tensor:
    """Launch the GEMM or GEMV kernel for ``x [..., K] -> [..., N]`` (tensors already checked).

    ``gemv`` forces the path (default: GEMV when at most ``GEMV_MAX_M`` rows); ``config`` forces
    a tile configuration (``BLOCK_M/N/K`` for GEMM, ``BLOCK_N/K`` + ``SPLIT_K`` for GEMV).
    """
    x2 = as_rows(op, x, k)
    m = x2.shape[0]
    lead = x.shape[:-1]
    if m == 0 or n_out == 0:
        return x.new_zeros((*lead, n_out))
    r = 0 if lora_a is None else lora_a.shape[0]
    has_lora = lora_a is not None
    dummy = x2
    args = dict(
        x_ptr=x2, w_ptr=w if w is not None else dummy, s_ptr=scales if scales is not None else dummy,
        z_ptr=zero_points if zero_points is not None else dummy,
        i_ptr=indices if indices is not None else dummy, bias_ptr=bias if bias is not None else dummy,
        a_ptr=lora_a if has_lora else dummy, b_ptr=lora_b if has_lora else dummy,
        M=m, N=n_out, K=k, R=r, x_row=x2.stride(0),
        w_row=_row_stride(w), s_row=_row_stride(scales), z_row=_row_stride(zero_points),
        i_row=_row_stride(indices), scaling=float(scaling),
        FORMAT=fmt, BITS=bits, GROUP=group, HAS_ZP=zero_points is not None, NKEEP=n_keep,
        MGROUP=m_group, IBITS=index_bits, HAS_BIAS=bias is not None, HAS_LORA=has_lora,
        BLOCK_R=max(16, next_pow2(r)))
    use_gemv = m <= GEMV_MAX_M if gemv is None else gemv
    if use_gemv:
        out = torch.zeros((m, n_out), dtype=torch.float32, device=x.device)
        args.update(out_ptr=out, out_row=out.stride(0))
        launch(_gemv_kernel, _gemv_tuned, _gemv_grid(m, n_out), args, config,
               interpret_tiles(m, n_out, k, gemv=True))
        out = out.to(x.dtype)
    else:
        out = torch.empty((m, n_out), dtype=x.dtype, device=x.device)
        args.update(out_ptr=out, out_row=out.stride(0), M_BUCKET=next_pow2(m),
                    DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32")
        launch(_gemm_kernel, _gemm_tuned, _gemm_grid(m, n_out), args, config,
               interpret_tiles(m, n_out, k, gemv=False))
    return out.reshape(*lead, n_out)


def _row_stride(t: torch.Tensor | None) -> int:
    if t is None or t.dim() < 2:
        return 0
    return t.numel() // t.shape[0]


# -- launchers: validate, then run -------------------------------------------------------------
def _check_lora(op: str, x: torch.Tensor, lora_a, lora_b, n_out: int, k: int) -> None:
    if (lora_a is None) != (lora_b is None):
        raise KernelError(f"{op}: give both lora_a and lora_b, or neither")
    if lora_a is None:
        return
    check(op, "lora_a", lora_a, dtypes=(x.dtype,), shape=(None, k))
    check(op, "lora_b", lora_b, dtypes=(x.dtype,), shape=(n_out, lora_a.shape[0]))


def _check_bias(op: str, x: torch.Tensor, bias, n_out: int) -> None:
    check(op, "bias", bias, dtypes=(x.dtype,), shape=(n_out,))


def _check_grid(op: str, scales, zero_points, n_out: int, k: int, bits: int, block_size: int
                ) -> int:
    if bits not in (2, 4, 8):
        raise KernelError(f"{op}: storage bits must be 2, 4 or 8; got {bits}")
    if block_size < 16 or block_size & (block_size - 1):
        raise KernelError(f"{op}: block_size must be a power of 2 >= 16; got {block_size}")
    kb = -(-k // block_size)
    check(op, "scales", scales, dtypes=FLOAT_DTYPES, shape=(n_out, kb))
    check(op, "zero_points", zero_points, dtypes=(torch.uint8,),
          shape=(n_out, -(-kb * bits // 8)))
    return kb


def quant_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                 zero_points: torch.Tensor | None, bias: torch.Tensor | None, in_features: int,
                 bits: int, block_size: int, lora_a: torch.Tensor | None = None,
                 lora_b: torch.Tensor | None = None, scaling: float = 1.0, *,
                 config: dict[str, Any] | None = None, gemv: bool | None = None) -> torch.Tensor:
    """``x @ dequant(qweight).T (+ bias) (+ scaling (x A^T) B^T)`` from the MatMulNBits layout."""
    op = "quant_linear"
    check_device(op, x, qweight, scales, zero_points, bias, lora_a, lora_b)
    n_out = qweight.shape[0]
    kb = _check_grid(op, scales, zero_points, n_out, in_features, bits, block_size)
    check(op, "qweight", qweight, dtypes=(torch.uint8,), shape=(n_out, kb, block_size * bits // 8))
    _check_bias(op, x, bias, n_out)
    _check_lora(op, x, lora_a, lora_b, n_out, in_features)
    return run_linear(op, x, n_out, in_features, fmt=QUANT, w=qweight, scales=scales,
                      zero_points=zero_points, bias=bias, lora_a=lora_a, lora_b=lora_b,
                      scaling=scaling, bits=bits, group=block_size, config=config, gemv=gemv)


def _check_nm(op: str, n: int, m: int, k: int) -> int:
    from modelfold.ir.sparse import SparsityFormatError, check_pattern, check_shape, index_bits

    try:
        check_pattern(n, m)
        check_shape(k, m)
    except SparsityFormatError as e:
        raise KernelError(f"{op}: {e}") from None
    return index_bits(m)


def nm_linear(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
              bias: torch.Tensor | None, in_features: int, n: int, m: int,
              lora_a: torch.Tensor | None = None, lora_b: torch.Tensor | None = None,
              scaling: float = 1.0, *, config: dict[str, Any] | None = None,
              gemv: bool | None = None) -> torch.Tensor:
    """``x @ decompress(values, indices).T (+ bias) (+ LoRA)``, decompressing in registers."""
    op = "nm_linear"
    check_device(op, x, values, indices, bias, lora_a, lora_b)
    ibits = _check_nm(op, n, m, in_features)
    n_out = values.shape[0]
    count = in_features // m * n
    check(op, "values", values, dtypes=(x.dtype,), shape=(n_out, count))
    check(op, "indices", indices, dtypes=(torch.uint8,), shape=(n_out, -(-count * ibits // 8)))
    _check_bias(op, x, bias, n_out)
    _check_lora(op, x, lora_a, lora_b, n_out, in_features)
    return run_linear(op, x, n_out, in_features, fmt=NM, w=values, indices=indices, bias=bias,
                      lora_a=lora_a, lora_b=lora_b, scaling=scaling, n_keep=n, m_group=m,
                      index_bits=ibits, config=config, gemv=gemv)


def nm_quant_linear(x: torch.Tensor, codes: torch.Tensor, indices: torch.Tensor,
                    scales: torch.Tensor, zero_points: torch.Tensor | None,
                    bias: torch.Tensor | None, in_features: int, bits: int, block_size: int,
                    n: int, m: int, lora_a: torch.Tensor | None = None,
                    lora_b: torch.Tensor | None = None, scaling: float = 1.0, *,
                    config: dict[str, Any] | None = None, gemv: bool | None = None
                    ) -> torch.Tensor:
    """N:M sparse and quantized: kept codes + indices on a MatMulNBits grid (+ bias, + LoRA)."""
    op = "nm_quant_linear"
    check_device(op, x, codes, indices, scales, zero_points, bias, lora_a, lora_b)
    ibits = _check_nm(op, n, m, in_features)
    n_out = codes.shape[0]
    count = in_features // m * n
    _check_grid(op, scales, zero_points, n_out, in_features, bits, block_size)
    check(op, "codes", codes, dtypes=(torch.uint8,), shape=(n_out, -(-count * bits // 8)))
    check(op, "indices", indices, dtypes=(torch.uint8,), shape=(n_out, -(-count * ibits // 8)))
    _check_bias(op, x, bias, n_out)
    _check_lora(op, x, lora_a, lora_b, n_out, in_features)
    return run_linear(op, x, n_out, in_features, fmt=NM_QUANT, w=codes, scales=scales,
                      zero_points=zero_points, indices=indices, bias=bias, lora_a=lora_a,
                      lora_b=lora_b, scaling=scaling, bits=bits, group=block_size, n_keep=n,
                      m_group=m, index_bits=ibits, config=config, gemv=gemv)


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 lora_a: torch.Tensor | None = None, lora_b: torch.Tensor | None = None,
                 scaling: float = 1.0, *, config: dict[str, Any] | None = None,
                 gemv: bool | None = None) -> torch.Tensor:
    """Fused LoRA linear: ``x W^T (+ bias) + scaling (x A^T) B^T`` in one pass over ``W``."""
    op = "lora_linear"
    check_device(op, x, weight, bias, lora_a, lora_b)
    check(op, "weight", weight, dtypes=(x.dtype,), shape=(None, x.shape[-1]))
    n_out, k = weight.shape
    _check_bias(op, x, bias, n_out)
    _check_lora(op, x, lora_a, lora_b, n_out, k)
    return run_linear(op, x, n_out, k, fmt=DENSE, w=weight, bias=bias, lora_a=lora_a,
                      lora_b=lora_b, scaling=scaling, config=config, gemv=gemv)


def lora_delta(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, *,
               config: dict[str, Any] | None = None, gemv: bool | None = None) -> torch.Tensor:
    """``scaling * (x A^T) B^T`` alone (the ``modelfold::lora_delta`` dialect op)."""
    op = "lora_delta"
    check_device(op, x, lora_a, lora_b)
    n_out, k = lora_b.shape[0], lora_a.shape[1]
    _check_lora(op, x, lora_a, lora_b, n_out, k)
    return run_linear(op, x, n_out, k, fmt=NONE, lora_a=lora_a, lora_b=lora_b, scaling=scaling,
                      config=config, gemv=gemv)
