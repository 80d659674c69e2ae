"""Semi-structured N:M sparse weights and the dialect ops that use them.

An N:M sparse weight ``W [N_out, K]`` keeps at most ``n`` non-zeros in every group of ``m``
consecutive input columns of every row (2:4: two of every four). It is stored compressed:

    values   float32 [N_out, K * n / m]          the kept weights, group by group, in column order
    indices  uint8   [N_out, ceil(K * n / m / per)]  each kept value's position inside its group
             (0 .. m-1), ``b = index_bits(m)`` bits each, ``per = 8 / b`` per byte, low bits first

``K`` must be a multiple of ``m``. For 2:4 the indices take 2 bits per kept value, i.e. 4 bits per
group of 4 (the metadata of PyTorch's semi-structured tensors), so float32 storage is
(4 + 0.25) / 8 = 53 % of dense.

Dialect ops (``torch.library.custom_op`` + ``register_fake``; one graph node each under
``torch.export``; the CPU implementations below are the reference semantics):

- ``modelfold::nm_linear(x, values, indices, bias, in_features, n, m)`` =
  ``x @ decompress(values, indices).T (+ bias)``, with gradients for ``x``, ``values`` and
  ``bias`` (the pattern is fixed: training the values keeps the layer N:M);
- ``modelfold::nm_quant_linear(x, codes, indices, scales, zero_points, bias, in_features, bits,
  block_size, n, m)``: sparse *and* quantized (``quantize`` after ``nm-sparsify``). ``codes``
  holds the kept integer codes packed ``storage_bits`` each, low bits first; the pruned positions
  are the block's zero point, which dequantizes to exactly 0. The grid (``scales``,
  ``zero_points``) is MatMulNBits' (``modelfold.ir.quant``), so the decompressed codes pack into a
  ``MatMulNBits`` weight.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from modelfold.errors import ModelfoldError
from modelfold.ir.module_types import register_module_type
from modelfold.ir.quant import (
    QuantFormat,
    container_bits,
    dequantize,
    pack_rows,
    pack_weight,
    unpack_rows,
    unpack_zero_points,
)
from modelfold.ir.rows import register_row_wise

MAX_M = 256


class SparsityFormatError(ModelfoldError, ValueError):
    """An N:M pattern or a weight shape that the compressed layout cannot represent."""


def check_pattern(n: int, m: int) -> None:
    """``1 <= n < m <= 256``."""
    if not (isinstance(n, int) and isinstance(m, int)):
        raise SparsityFormatError(f"n and m must be integers; got n={n!r}, m={m!r}")
    if m < 2 or m > MAX_M:
        raise SparsityFormatError(f"m must be in [2, {MAX_M}]; got m={m}")
    if not 1 <= n < m:
        raise SparsityFormatError(f"n must satisfy 1 <= n < m (keep n of every m weights); "
                                  f"got n={n}, m={m}")


def check_shape(in_features: int, m: int) -> None:
    if in_features % m:
        raise SparsityFormatError(f"the input size {in_features} is not a multiple of m={m}, so "
                                  f"its columns do not split into groups of {m}")


def index_bits(m: int) -> int:
    """Bits per stored index: 1 (m = 2), 2 (m <= 4), 4 (m <= 16) or 8."""
    for bits in (1, 2, 4, 8):
        if m <= 1 << bits:
            return bits
    raise SparsityFormatError(f"m={m} is above {MAX_M}")


# -- masks -------------------------------------------------------------------------------------
def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep mask (bool, ``[R, K]``): the ``n`` highest ``scores`` of every group of ``m`` columns.

    Ties go to the lower column (``topk`` over a stable order), so the mask is deterministic.
    """
    check_pattern(n, m)
    rows, k = scores.shape
    check_shape(k, m)
    groups = scores.detach().float().reshape(rows, k // m, m)
    # sort is stable: among equal scores the earlier column ranks first
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices[..., :n]
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order, True)
    return keep.reshape(rows, k)


def satisfies_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """Whether every group of ``m`` consecutive columns of every row has at most ``n`` non-zeros."""
    rows, k = weight.shape
    if k % m:
        return False
    return bool(((weight != 0).reshape(rows, k // m, m).sum(-1) <= n).all())


def group_nonzeros(weight: torch.Tensor, m: int) -> torch.Tensor:
    """Non-zeros per group ``[R, K / m]`` (for the invariant check and reports)."""
    rows, k = weight.shape
    return (weight != 0).reshape(rows, k // m, m).sum(-1)


# -- compression -------------------------------------------------------------------------------
def kept_positions(mask: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Positions inside each group of the kept entries, ascending: ``[R, K * n / m]`` (int64).

    The mask must keep exactly ``n`` of every ``m`` (as ``nm_mask`` does).
    """
    rows, k = mask.shape
    groups = mask.reshape(rows, k // m, m)
    if not bool((groups.sum(-1) == n).all()):
        raise SparsityFormatError(f"the mask does not keep exactly {n} of every {m} weights")
    # argsort of (not kept, position) puts the kept positions first, in ascending order
    key = (~groups).to(torch.int64) * m + torch.arange(m)
    return torch.argsort(key, dim=-1)[..., :n].reshape(rows, -1)


def pack_padded(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Integers ``[R, C]`` -> uint8 ``[R, ceil(C * bits / 8)]``, low bits first, the last byte
    zero-padded."""
    per = 8 // bits
    rows, cols = values.shape
    padded = torch.zeros(rows, -(-cols // per) * per, dtype=torch.int32)
    padded[:, :cols] = values.to(torch.int32)
    return pack_rows(padded, bits)


def pack_indices(positions: torch.Tensor, m: int) -> torch.Tensor:
    """Positions ``[R, C]`` (0 .. m-1) -> uint8 ``[R, ceil(C / per)]``, ``index_bits(m)`` each."""
    return pack_padded(positions, index_bits(m))


def unpack_indices(packed: torch.Tensor, m: int, count: int) -> torch.Tensor:
    """Inverse of ``pack_indices``: ``[R, count]`` int64 positions inside their groups."""
    return unpack_rows(packed, index_bits(m))[:, :count].to(torch.int64)


def column_indices(indices: torch.Tensor, in_features: int, n: int, m: int) -> torch.Tensor:
    """Packed ``indices`` -> the column of every kept value, ``[R, K * n / m]`` (int64)."""
    count = in_features // m * n
    positions = unpack_indices(indices, m, count)
    base = torch.arange(count, device=indices.device) // n * m
    return positions + base


def keep_mask(indices: torch.Tensor, in_features: int, n: int, m: int) -> torch.Tensor:
    """Packed ``indices`` -> the keep mask (bool ``[R, K]``)."""
    cols = column_indices(indices, in_features, n, m)
    return torch.zeros(indices.shape[0], in_features, dtype=torch.bool).scatter_(1, cols, True)


def compress(weight: torch.Tensor, mask: torch.Tensor, n: int, m: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values [R, K*n/m], packed indices)`` of ``weight`` at the kept positions of ``mask``."""
    check_pattern(n, m)
    check_shape(weight.shape[1], m)
    positions = kept_positions(mask, n, m)
    base = torch.arange(positions.shape[1]) // n * m
    values = torch.gather(weight.detach(), 1, positions + base)
    return values.contiguous(), pack_indices(positions, m)


def decompress(values: torch.Tensor, indices: torch.Tensor, in_features: int, n: int, m: int
               ) -> torch.Tensor:
    """The dense weight ``[R, K]`` (zeros at the pruned positions)."""
    cols = column_indices(indices, in_features, n, m)
    dense = values.new_zeros(values.shape[0], in_features)
    return dense.scatter(1, cols, values)


# -- dialect ops -------------------------------------------------------------------------------
@torch.library.custom_op("modelfold::nm_linear", mutates_args=())
def nm_linear(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
              bias: torch.Tensor | None, in_features: int, n: int, m: int) -> torch.Tensor:
    """``x @ decompress(values, indices).T (+ bias)``; x ``[..., K]`` -> ``[..., N]``."""
    w = decompress(values, indices, in_features, n, m).to(x.dtype)
    return nn.functional.linear(x, w, bias)


@nm_linear.register_fake
def _(x, values, indices, bias, in_features, n, m):
    return x.new_empty((*x.shape[:-1], values.shape[0]))


def _nm_linear_setup(ctx, inputs, output):
    x, values, indices, bias, in_features, n, m = inputs
    ctx.save_for_backward(x, values, indices)
    ctx.meta = (in_features, n, m)


def _nm_linear_backward(ctx, grad):
    x, values, indices = ctx.saved_tensors
    in_features, n, m = ctx.meta
    grad_x = grad_values = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = grad @ decompress(values, indices, in_features, n, m).to(grad.dtype)
    if ctx.needs_input_grad[1]:
        g = grad.reshape(-1, grad.shape[-1])
        dense = g.T @ x.reshape(-1, x.shape[-1]).to(g.dtype)  # [N, K]
        grad_values = torch.gather(dense, 1, column_indices(indices, in_features, n, m))
        grad_values = grad_values.to(values.dtype)
    if ctx.needs_input_grad[3]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
    return grad_x, grad_values, None, grad_bias, None, None, None


torch.library.register_autograd("modelfold::nm_linear", _nm_linear_backward,
                                setup_context=_nm_linear_setup)


def nm_dense_codes(codes: torch.Tensor, indices: torch.Tensor, zero_points: torch.Tensor | None,
                   in_features: int, bits: int, block_size: int, n: int, m: int,
                   k_blocks: int) -> torch.Tensor:
    """Kept codes + indices -> the dense code matrix ``[N, K]`` (uint8), the pruned positions at
    their block's zero point (so they dequantize to exactly 0)."""
    count = in_features // m * n
    rows = codes.shape[0]
    kept = unpack_rows(codes, bits)[:, :count]
    if zero_points is None:
        dense = torch.full((rows, in_features), 1 << (bits - 1), dtype=torch.uint8)
    else:
        zeros = unpack_zero_points(zero_points, bits, k_blocks)  # [N, kb]
        dense = zeros.repeat_interleave(block_size, 1)[:, :in_features].contiguous()
    return dense.scatter(1, column_indices(indices, in_features, n, m), kept)


@torch.library.custom_op("modelfold::nm_quant_linear", mutates_args=())
def nm_quant_linear(x: torch.Tensor, codes: torch.Tensor, indices: torch.Tensor,
                    scales: torch.Tensor, zero_points: torch.Tensor | None,
                    bias: torch.Tensor | None, in_features: int, bits: int, block_size: int,
                    n: int, m: int) -> torch.Tensor:
    """``x @ dequant(decompress(codes, indices)).T (+ bias)``; x ``[..., K]`` -> ``[..., N]``."""
    w = nm_quant_weight(codes, indices, scales, zero_points, in_features, bits, block_size, n, m)
    return nn.functional.linear(x, w.to(x.dtype), bias)


@nm_quant_linear.register_fake
def _(x, codes, indices, scales, zero_points, bias, in_features, bits, block_size, n, m):
    return x.new_empty((*x.shape[:-1], codes.shape[0]))


def _nm_quant_linear_setup(ctx, inputs, output):
    x, codes, indices, scales, zero_points, bias, in_features, bits, block_size, n, m = inputs
    ctx.save_for_backward(codes, indices, scales, zero_points)
    ctx.meta = (in_features, bits, block_size, n, m, x.dtype)


def _nm_quant_linear_backward(ctx, grad):
    codes, indices, scales, zero_points = ctx.saved_tensors
    in_features, bits, block_size, n, m, dtype = ctx.meta
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        w = nm_quant_weight(codes, indices, scales, zero_points, in_features, bits, block_size,
                            n, m)
        grad_x = grad @ w.to(dtype)
    if ctx.needs_input_grad[5]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
    return grad_x, None, None, None, None, grad_bias, None, None, None, None, None


torch.library.register_autograd("modelfold::nm_quant_linear", _nm_quant_linear_backward,
                                setup_context=_nm_quant_linear_setup)


def nm_quant_weight(codes: torch.Tensor, indices: torch.Tensor, scales: torch.Tensor,
                    zero_points: torch.Tensor | None, in_features: int, bits: int,
                    block_size: int, n: int, m: int) -> torch.Tensor:
    """The float weight ``[N, K]`` an ``nm_quant_linear`` stands for."""
    kb = scales.shape[1]
    dense = nm_dense_codes(codes, indices, zero_points, in_features, bits, block_size, n, m, kb)
    qweight = pack_weight(dense, QuantFormat(bits, block_size, zero_points is None))
    return dequantize(qweight, scales, zero_points, in_features, bits, block_size)


# -- modules -----------------------------------------------------------------------------------
class NMLinear(nn.Module):
    """An N:M sparse linear layer stored compressed; forward calls ``modelfold::nm_linear``.

    ``values`` is a Parameter (fine-tuning it keeps the pattern), ``indices`` a uint8 buffer.
    """

    def __init__(self, values: torch.Tensor, indices: torch.Tensor, in_features: int, n: int,
                 m: int, bias: torch.Tensor | None = None):
        super().__init__()
        check_pattern(n, m)
        check_shape(in_features, m)
        self.in_features, self.out_features = in_features, values.shape[0]
        self.n, self.m = n, m
        self.values = nn.Parameter(values.detach().float().contiguous(), requires_grad=False)
        self.register_buffer("indices", indices.to(torch.uint8).contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(),
                                                           requires_grad=False)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, mask: torch.Tensor, n: int, m: int,
                   bias: torch.Tensor | None = None) -> NMLinear:
        """Compress ``weight`` ``[N, K]`` keeping the entries of ``mask`` (n of every m)."""
        values, indices = compress(weight, mask, n, m)
        return cls(values, indices, weight.shape[1], n, m, bias)

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight ``[N, K]`` (computed; for analyses and export)."""
        return decompress(self.values, self.indices, self.in_features, self.n, self.m)

    def mask(self) -> torch.Tensor:
        """Kept positions (bool ``[N, K]``)."""
        return keep_mask(self.indices, self.in_features, self.n, self.m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.modelfold.nm_linear(x, self.values, self.indices, self.bias,
                                             self.in_features, self.n, self.m)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"pattern={self.n}:{self.m}")


class NMQuantLinear(nn.Module):
    """N:M sparse and quantized: the kept codes packed, their indices, MatMulNBits' grid.

    Buffers: ``codes`` uint8 ``[N, ceil(K*n/m * storage_bits / 8)]``, ``indices``, ``scales``
    ``[N, k_blocks]``, ``zero_points`` (absent when symmetric), and the ``bias`` Parameter.
    """

    def __init__(self, codes: torch.Tensor, indices: torch.Tensor, scales: torch.Tensor,
                 zero_points: torch.Tensor | None, in_features: int, fmt: QuantFormat, n: int,
                 m: int, bias: torch.Tensor | None = None):
        super().__init__()
        check_pattern(n, m)
        check_shape(in_features, m)
        self.in_features, self.out_features = in_features, codes.shape[0]
        self.bits, self.storage_bits = fmt.bits, fmt.storage_bits
        self.block_size, self.symmetric = fmt.block_size, fmt.symmetric
        self.n, self.m = n, m
        self.register_buffer("codes", codes.to(torch.uint8).contiguous())
        self.register_buffer("indices", indices.to(torch.uint8).contiguous())
        self.register_buffer("scales", scales.float().contiguous())
        self.register_buffer("zero_points", zero_points)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(),
                                                           requires_grad=False)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None,
                   fmt: QuantFormat, indices: torch.Tensor, n: int, m: int,
                   bias: torch.Tensor | None = None) -> NMQuantLinear:
        """From dense integer codes ``[N, K]`` and the packed ``indices`` of the kept positions
        (the codes elsewhere are ignored: those positions are the zero point)."""
        k = codes.shape[1]
        cols = column_indices(indices, k, n, m)
        kept = torch.gather(codes.to(torch.int32), 1, cols)
        return cls(pack_padded(kept, fmt.storage_bits), indices, scales, zero_points, k, fmt, n,
                   m, bias)

    @property
    def fmt(self) -> QuantFormat:
        return QuantFormat(self.bits, self.block_size, self.symmetric)

    @property
    def k_blocks(self) -> int:
        return self.scales.shape[1]

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized dense weight ``[N, K]`` (computed)."""
        return nm_quant_weight(self.codes, self.indices, self.scales, self.zero_points,
                               self.in_features, self.storage_bits, self.block_size, self.n,
                               self.m)

    def dense_qweight(self) -> torch.Tensor:
        """The MatMulNBits ``qweight`` ``[N, k_blocks, blob]`` of the decompressed codes."""
        dense = nm_dense_codes(self.codes, self.indices, self.zero_points, self.in_features,
                               self.storage_bits, self.block_size, self.n, self.m, self.k_blocks)
        return pack_weight(dense, QuantFormat(self.storage_bits, self.block_size, True))

    def mask(self) -> torch.Tensor:
        """Kept positions (bool ``[N, K]``)."""
        return keep_mask(self.indices, self.in_features, self.n, self.m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.modelfold.nm_quant_linear(
            x, self.codes, self.indices, self.scales, self.zero_points, self.bias,
            self.in_features, self.storage_bits, self.block_size, self.n, self.m)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"pattern={self.n}:{self.m}, bits={self.bits}, block_size={self.block_size}, "
                f"symmetric={self.symmetric}")


def is_sparse_layer(module: nn.Module) -> bool:
    return isinstance(module, (NMLinear, NMQuantLinear))


def sparse_layers(module: nn.Module) -> dict[str, nn.Module]:
    """Every N:M layer (``NMLinear``, ``NMQuantLinear``) of ``module`` by path."""
    return {name: mod for name, mod in module.named_modules() if is_sparse_layer(mod)}


def sparse_bytes(module: nn.Module) -> int:
    """Bytes of a sparse layer's stored tensors (values / codes, indices, grid, bias)."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(recurse=False),
                                                       *module.buffers(recurse=False))
               if t is not None)


# -- checkpoints -------------------------------------------------------------------------------
# Shapes follow the layout above: values / codes hold K*n/m kept entries per row, indices are packed
# index_bits(m) per entry; the quantized form has MatMulNBits' scales and zero points.
def _describe_nm_linear(m: NMLinear) -> dict[str, Any]:
    return {"in_features": m.in_features, "out_features": m.out_features, "n": m.n, "m": m.m,
            "values": list(m.values.shape), "indices": list(m.indices.shape),
            "has_bias": m.bias is not None}


def _build_nm_linear(f: dict[str, Any]) -> NMLinear:
    return NMLinear(torch.empty(f["values"]), torch.empty(f["indices"], dtype=torch.uint8),
                    f["in_features"], f["n"], f["m"],
                    torch.empty(f["out_features"]) if f["has_bias"] else None)


def _describe_nm_quant_linear(m: NMQuantLinear) -> dict[str, Any]:
    return {"in_features": m.in_features, "out_features": m.out_features, "n": m.n, "m": m.m,
            "bits": m.bits, "block_size": m.block_size, "symmetric": m.symmetric,
            "codes": list(m.codes.shape), "indices": list(m.indices.shape),
            "scales": list(m.scales.shape),
            "zero_points": None if m.zero_points is None else list(m.zero_points.shape),
            "has_bias": m.bias is not None}


def _build_nm_quant_linear(f: dict[str, Any]) -> NMQuantLinear:
    u8 = torch.uint8
    zp = None if f["zero_points"] is None else torch.empty(f["zero_points"], dtype=u8)
    return NMQuantLinear(torch.empty(f["codes"], dtype=u8), torch.empty(f["indices"], dtype=u8),
                         torch.empty(f["scales"]), zp, f["in_features"],
                         QuantFormat(f["bits"], f["block_size"], f["symmetric"]), f["n"], f["m"],
                         torch.empty(f["out_features"]) if f["has_bias"] else None)


register_module_type(NMLinear, _describe_nm_linear, _build_nm_linear)
register_module_type(NMQuantLinear, _describe_nm_quant_linear, _build_nm_quant_linear)
register_row_wise(torch.ops.modelfold.nm_linear.default, {1: 0, 2: 0}, bias=3)
register_row_wise(torch.ops.modelfold.nm_quant_linear.default, {1: 0, 2: 0, 3: 0, 4: 0}, bias=5)


__all__ = ["NMLinear", "NMQuantLinear", "SparsityFormatError", "check_pattern", "check_shape",
           "compress", "container_bits", "decompress", "group_nonzeros", "index_bits",
           "is_sparse_layer", "keep_mask", "kept_positions", "nm_linear", "nm_mask", "nm_quant_linear",
           "nm_quant_weight", "pack_indices", "satisfies_nm", "sparse_bytes", "sparse_layers",
           "unpack_indices"]
