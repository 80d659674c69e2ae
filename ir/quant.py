"""Quantized weights in ONNX Runtime's ``MatMulNBits`` layout, and the dialect ops that use them.

Storage (one output row per feature, packed along K, as ``com.microsoft.MatMulNBits`` wants):

    qweight      uint8  [N, k_blocks, block_size * bits / 8]   values packed low bits first
    scales       float32 [N, k_blocks]
    zero_points  uint8  [N, ceil(k_blocks * bits / 8)]  packed the same way; None when symmetric
                 (then the zero point is 2^(bits-1), MatMulNBits' default)

``k_blocks = ceil(K / block_size)``; K is padded with zeros to a whole number of blocks.
Per-channel quantization is one block per row (``block_size`` = K rounded up to a power of 2).
A PyTorch ``nn.Linear.weight`` is already ``[N, K]``, so packing needs no transpose and lowering
to ONNX is a relabeling.

Bits: 2, 4 and 8 are stored natively. 3-bit values (0..7) are stored in the 4-bit container
(zero point 4 instead of 8): the grid is 3-bit, the bytes are those of 4-bit.

Dialect ops (``torch.library.custom_op`` + ``register_fake``; one graph node each under
``torch.export``; the CPU implementation below is the reference semantics):

- ``modelfold::quant_linear(x, qweight, scales, zero_points, bias, in_features, bits, block_size)``
  = ``x @ dequant(qweight).T + bias``;
- ``modelfold::quant_embedding(ids, qweight, scales, zero_points, embedding_dim, bits, block_size)``
  = ``dequant(qweight)[ids]`` (may share ``qweight`` with a tied LM head);
- ``modelfold::w8a8_linear(x, qweight_t, weight_scales, bias)``: int8 per-output-channel symmetric
  weights stored ``[K, N]`` (MatMulInteger's layout), activations quantized to int8 per token
  (symmetric, dynamic) inside the op.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from modelfold.errors import ModelfoldError
from modelfold.ir.module_types import register_module_type
from modelfold.ir.rows import register_row_wise

SUPPORTED_BITS = (2, 3, 4, 8)
MIN_BLOCK = 16


class QuantFormatError(ModelfoldError, ValueError):
    """A quantization format or tensor shape that the layout cannot represent."""


def container_bits(bits: int) -> int:
    """Bits per stored value: 3-bit grids live in the 4-bit container."""
    if bits not in SUPPORTED_BITS:
        raise QuantFormatError(f"bits must be one of {SUPPORTED_BITS}; got {bits}")
    return 4 if bits == 3 else bits


def block_size_for(group_size: int, in_features: int) -> int:
    """The MatMulNBits block size for ``group_size`` (-1: per channel) and a K of ``in_features``."""
    if group_size == -1:
        return max(MIN_BLOCK, 1 << (max(in_features, 1) - 1).bit_length())
    if group_size < MIN_BLOCK or group_size & (group_size - 1):
        raise QuantFormatError(
            f"group_size must be a power of 2 >= {MIN_BLOCK} (ONNX Runtime's MatMulNBits block "
            f"sizes) or -1 for per-channel; got {group_size}")
    return group_size


@dataclass(frozen=True)
class QuantFormat:
    """How one weight matrix is quantized: bit width, block size along K, symmetric or not."""

    bits: int
    block_size: int
    symmetric: bool

    def __post_init__(self) -> None:
        container_bits(self.bits)
        block_size_for(self.block_size, 0)

    @property
    def storage_bits(self) -> int:
        return container_bits(self.bits)

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    @property
    def default_zero(self) -> int:
        """The symmetric zero point: 2^(bits-1) for the grid (8 for 4-bit, 4 for 3-bit)."""
        return 1 << (self.bits - 1)

    def k_blocks(self, in_features: int) -> int:
        return -(-in_features // self.block_size)


# -- quantization grid (GPTQ's Quantizer, per row and per block) --------------------------------
def fit_params(w: torch.Tensor, fmt: QuantFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point per row of ``w`` ``[N, G]`` (one group): ``[N], [N]``.

    The range is widened to include 0. Asymmetric: ``s = (max - min) / maxq``,
    ``z = round(-min / s)``. Symmetric: ``z = 2^(bits-1)`` and ``s = -e / 2^(bits-1)`` with ``e``
    the row's value of largest magnitude, signed (ONNX Runtime's and llama.cpp Q4_0's rule): ``e``
    lands exactly on the grid's end (code 0) and the other side reaches ``(2^(bits-1) - 1) |s|``;
    ``s`` is negative when ``e`` is. (GPTQ's ``s = 2 max|w| / maxq`` clips ``e`` when it is
    positive and steps 7 % coarser: SmolLM2 int4 g128 RTN perplexity 47.0; this rule: 39.9)
    """
    w = w.float()
    if fmt.symmetric:
        e = w.gather(1, w.abs().argmax(1, keepdim=True))[:, 0]  # [N], signed
        scale = torch.where(e == 0, torch.ones_like(e), -e / fmt.default_zero)
        return scale, torch.full_like(scale, fmt.default_zero)
    zero = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
    wmin = torch.minimum(w.min(dim=1).values, zero)
    wmax = torch.maximum(w.max(dim=1).values, zero)
    empty = (wmin == 0) & (wmax == 0)
    wmin = torch.where(empty, -1.0, wmin)
    wmax = torch.where(empty, 1.0, wmax)
    scale = (wmax - wmin) / fmt.maxq
    return scale, torch.round(-wmin / scale).clamp(0, fmt.maxq)


def fit_params_mse(w: torch.Tensor, fmt: QuantFormat, *, grid: int = 100,
                   max_shrink: float = 0.8, norm: float = 2.4
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Like ``fit_params``, but each row's range is shrunk to the factor in
    ``{1, 1 - 1/grid, ...}`` (down to ``1 - max_shrink``) that minimises ``sum |w - q(w)|^norm``
    (the ``mse`` grid of the GPTQ reference implementation). Never worse than ``fit_params`` by
    that measure: the unshrunk range is the first candidate.
    """
    w = w.float()
    zero = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
    wmin = torch.minimum(w.min(dim=1).values, zero)
    wmax = torch.maximum(w.max(dim=1).values, zero)
    best_s, best_z = fit_params(w, fmt)
    best_err = (fake_quantize(w, best_s[:, None], best_z[:, None], fmt) - w).abs_().pow_(norm).sum(1)
    for i in range(1, int(max_shrink * grid)):
        p = 1 - i / grid
        s, z = fit_params(torch.stack([wmin * p, wmax * p], 1), fmt)
        err = (fake_quantize(w, s[:, None], z[:, None], fmt) - w).abs_().pow_(norm).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
        best_z = torch.where(better, z, best_z)
    return best_s, best_z


def quantize_values(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                    fmt: QuantFormat) -> torch.Tensor:
    """Integer codes ``clamp(round(w / s) + z, 0, maxq)`` (float tensor holding integers)."""
    return torch.clamp(torch.round(w / scale) + zero, 0, fmt.maxq)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                  fmt: QuantFormat) -> torch.Tensor:
    """``s * (q - z)``: the value the quantized weight stands for."""
    return scale * (quantize_values(w, scale, zero, fmt) - zero)


def group_params(w: torch.Tensor, fmt: QuantFormat, *, mse: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """RTN parameters of every block of ``w`` ``[N, K]``: scales and zeros ``[N, k_blocks]``
    (``mse``: ranges from ``fit_params_mse``).

    A last, partial block is padded with zeros, which changes nothing: every range includes 0.
    """
    n, k = w.shape
    kb = fmt.k_blocks(k)
    padded = torch.zeros(n, kb * fmt.block_size, dtype=torch.float32, device=w.device)
    padded[:, :k] = w.float()
    fit = fit_params_mse if mse else fit_params
    s, z = fit(padded.reshape(n * kb, fmt.block_size), fmt)
    return s.reshape(n, kb), z.reshape(n, kb)


def pseudo_quantize(w: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """``dequant(quant_rtn(w))`` for ``w`` ``[N, K]``, vectorized (AWQ's search calls it often)."""
    n, k = w.shape
    kb = fmt.k_blocks(k)
    padded = torch.zeros(n, kb * fmt.block_size, dtype=torch.float32, device=w.device)
    padded[:, :k] = w.float()
    rows = padded.reshape(n * kb, fmt.block_size)
    s, z = fit_params(rows, fmt)
    q = fake_quantize(rows, s[:, None], z[:, None], fmt)
    return q.reshape(n, kb * fmt.block_size)[:, :k].to(w.dtype)


def quantize_rtn(w: torch.Tensor, fmt: QuantFormat) -> tuple[torch.Tensor, torch.Tensor,
                                                               torch.Tensor]:
    """Round-to-nearest: integer codes ``[N, K]`` and their scales / zeros ``[N, k_blocks]``."""
    scales, zeros = group_params(w, fmt)
    return codes_for(w, scales, zeros, fmt), scales, zeros


def codes_for(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
              fmt: QuantFormat) -> torch.Tensor:
    """Integer codes ``[N, K]`` of ``w`` on a given grid (scales / zeros ``[N, k_blocks]``)."""
    k = w.shape[1]
    s = scales.repeat_interleave(fmt.block_size, 1)[:, :k]
    z = zeros.repeat_interleave(fmt.block_size, 1)[:, :k]
    return quantize_values(w.float(), s, z, fmt)


# -- bit packing (MatMulNBits layout) ----------------------------------------------------------
def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integers ``[R, C]`` (0 <= v < 2^bits, C a multiple of 8/bits) to uint8, low bits first."""
    if bits == 8:
        return values.to(torch.uint8)
    per = 8 // bits
    rows, cols = values.shape
    if cols % per:
        raise QuantFormatError(f"cannot pack {cols} {bits}-bit values per row: not a multiple "
                               f"of {per}")
    v = values.to(torch.int32).reshape(rows, cols // per, per)
    shifts = torch.arange(per, dtype=torch.int32) * bits
    return (v << shifts).sum(-1).to(torch.uint8)


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of ``pack_rows``: uint8 ``[R, B]`` -> integers ``[R, B * 8 / bits]`` (uint8)."""
    if bits == 8:
        return packed
    per = 8 // bits
    mask = (1 << bits) - 1
    # uint8 shifts and masks: 4x less memory traffic than widening to int32 first
    parts = [(packed >> (bits * j)) & mask for j in range(per)]
    return torch.stack(parts, dim=-1).reshape(packed.shape[0], -1)


def pack_weight(codes: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """Codes ``[N, K]`` -> ``qweight`` uint8 ``[N, k_blocks, block_size * bits / 8]``."""
    n, k = codes.shape
    kb = fmt.k_blocks(k)
    padded = torch.zeros(n, kb * fmt.block_size, dtype=torch.int32)
    padded[:, :k] = codes.to(torch.int32)
    return pack_rows(padded, fmt.storage_bits).reshape(n, kb, -1)


def unpack_weight(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """``qweight`` ``[N, k_blocks, blob]`` -> codes ``[N, K]`` (uint8)."""
    n = qweight.shape[0]
    return unpack_rows(qweight.reshape(n, -1), bits)[:, :in_features]


def pack_zero_points(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """Zero points ``[N, k_blocks]`` -> uint8 ``[N, ceil(k_blocks * bits / 8)]``."""
    n, kb = zeros.shape
    per = 8 // bits
    padded = torch.zeros(n, -(-kb // per) * per, dtype=torch.int32)
    padded[:, :kb] = zeros.to(torch.int32)
    return pack_rows(padded, bits)


def unpack_zero_points(packed: torch.Tensor, bits: int, k_blocks: int) -> torch.Tensor:
    return unpack_rows(packed, bits)[:, :k_blocks]


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None,
               in_features: int, bits: int, block_size: int) -> torch.Tensor:
    """The float weight ``[N, K]`` that packed storage stands for (MatMulNBits' dequantization)."""
    n, kb = scales.shape
    codes = unpack_rows(qweight.reshape(n, -1), bits).reshape(n, kb, block_size)
    if zero_points is None:
        w = codes.to(scales.dtype).sub_(float(1 << (bits - 1)))
    else:
        zeros = unpack_zero_points(zero_points, bits, kb).to(scales.dtype)
        w = codes.to(scales.dtype).sub_(zeros.unsqueeze(-1))
    w = w.mul_(scales.unsqueeze(-1)).reshape(n, kb * block_size)
    return w if w.shape[1] == in_features else w[:, :in_features].contiguous()


@dataclass
class PackedWeight:
    """One quantized matrix in the MatMulNBits layout (what ``QuantLinear`` stores)."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zero_points: torch.Tensor | None
    in_features: int
    fmt: QuantFormat

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   fmt: QuantFormat) -> PackedWeight:
        """Pack integer codes ``[N, K]`` with their grid (scales / zeros ``[N, k_blocks]``).

        For a symmetric format the zero points equal the storage default and are not stored
        (a 3-bit grid's zero point 4 differs from the 4-bit container's default 8, so 3-bit
        always stores them).
        """
        n, k = codes.shape
        if scales.shape != (n, fmt.k_blocks(k)) or zeros.shape != scales.shape:
            raise QuantFormatError(f"scales/zeros must be [{n}, {fmt.k_blocks(k)}]; got "
                                   f"{tuple(scales.shape)} / {tuple(zeros.shape)}")
        bits = fmt.storage_bits
        zp = None
        if not (fmt.symmetric and fmt.default_zero == 1 << (bits - 1)):
            zp = pack_zero_points(zeros, bits)
        return cls(pack_weight(codes, fmt), scales.float().contiguous(), zp, k, fmt)

    @classmethod
    def from_float(cls, w: torch.Tensor, fmt: QuantFormat) -> PackedWeight:
        """Round-to-nearest quantization of ``w`` ``[N, K]``."""
        codes, scales, zeros = quantize_rtn(w.detach(), fmt)
        return cls.from_codes(codes, scales, zeros, fmt)

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.qweight, self.scales, self.zero_points, self.in_features,
                          self.fmt.storage_bits, self.fmt.block_size)


# -- dialect ops -------------------------------------------------------------------------------
@torch.library.custom_op("modelfold::quant_linear", mutates_args=())
def quant_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                 zero_points: torch.Tensor | None, bias: torch.Tensor | None, in_features: int,
                 bits: int, block_size: int) -> torch.Tensor:
    """``x @ dequant(qweight).T (+ bias)``; x ``[..., K]`` -> ``[..., N]``."""
    w = dequantize(qweight, scales, zero_points, in_features, bits, block_size).to(x.dtype)
    return nn.functional.linear(x, w, bias)


@quant_linear.register_fake
def _(x, qweight, scales, zero_points, bias, in_features, bits, block_size):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def _quant_linear_setup(ctx, inputs, output):
    x, qweight, scales, zero_points, bias, in_features, bits, block_size = inputs
    ctx.save_for_backward(qweight, scales, zero_points)
    ctx.meta = (in_features, bits, block_size, x.dtype)


def _quant_linear_backward(ctx, grad):
    qweight, scales, zero_points = ctx.saved_tensors
    in_features, bits, block_size, dtype = ctx.meta
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        w = dequantize(qweight, scales, zero_points, in_features, bits, block_size).to(dtype)
        grad_x = grad @ w
    if ctx.needs_input_grad[4]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
    return grad_x, None, None, None, grad_bias, None, None, None


torch.library.register_autograd("modelfold::quant_linear", _quant_linear_backward,
                                setup_context=_quant_linear_setup)


@torch.library.custom_op("modelfold::quant_embedding", mutates_args=())
def quant_embedding(ids: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                    zero_points: torch.Tensor | None, embedding_dim: int, bits: int,
                    block_size: int) -> torch.Tensor:
    """Rows ``ids`` of the dequantized table ``[V, E]``: ids ``[...]`` -> ``[..., E]``."""
    rows = ids.reshape(-1)
    zp = zero_points[rows] if zero_points is not None else None
    w = dequantize(qweight[rows], scales[rows], zp, embedding_dim, bits, block_size)
    return w.reshape(*ids.shape, embedding_dim)


@quant_embedding.register_fake
def _(ids, qweight, scales, zero_points, embedding_dim, bits, block_size):
    return scales.new_empty((*ids.shape, embedding_dim))


@torch.library.custom_op("modelfold::w8a8_linear", mutates_args=())
def w8a8_linear(x: torch.Tensor, qweight_t: torch.Tensor, weight_scales: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    """int8 x int8 linear with dynamic per-token activation scales.

    ``a_s = max|x_row| / 127``, ``x_q = clamp(round(x / a_s), -127, 127)``;
    ``y = (x_q @ qweight_t) * a_s * weight_scales (+ bias)``. qweight_t is int8 ``[K, N]``.
    """
    a_s = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-8) / 127.0
    xq = torch.clamp(torch.round(x / a_s), -127, 127)
    # The integer dot products are exact in float64 (as in ONNX Runtime's int32 accumulator),
    # then rounded once to float32 and scaled, in the order the ONNX lowering uses.
    acc = (xq.double() @ qweight_t.double()).to(x.dtype)
    y = acc * a_s * weight_scales
    return y if bias is None else y + bias


@w8a8_linear.register_fake
def _(x, qweight_t, weight_scales, bias):
    return x.new_empty((*x.shape[:-1], qweight_t.shape[1]))


# -- modules -----------------------------------------------------------------------------------
class QuantLinear(nn.Module):
    """A linear layer with weights in the MatMulNBits layout; forward calls ``quant_linear``.

    Buffers: ``qweight``, ``scales``, ``zero_points`` (absent when symmetric), ``bias``.
    """

    def __init__(self, packed: PackedWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features = packed.in_features
        self.out_features = packed.qweight.shape[0]
        self.bits = packed.fmt.bits
        self.storage_bits = packed.fmt.storage_bits
        self.block_size = packed.fmt.block_size
        self.symmetric = packed.fmt.symmetric
        self.register_buffer("qweight", packed.qweight)
        self.register_buffer("scales", packed.scales)
        self.register_buffer("zero_points", packed.zero_points)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(),
                                                           requires_grad=False)

    @property
    def fmt(self) -> QuantFormat:
        return QuantFormat(self.bits, self.block_size, self.symmetric)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight ``[N, K]`` (computed; for analyses and LoRA initialisation)."""
        return dequantize(self.qweight, self.scales, self.zero_points, self.in_features,
                          self.storage_bits, self.block_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.modelfold.quant_linear(x, self.qweight, self.scales, self.zero_points,
                                                self.bias, self.in_features, self.storage_bits,
                                                self.block_size)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}, block_size={self.block_size}, symmetric={self.symmetric}")


class QuantEmbedding(nn.Module):
    """An embedding table in the MatMulNBits layout (``[V, k_blocks, blob]``).

    With a tied LM head, the embedding and the head's ``QuantLinear`` hold the same buffers, so
    the table is stored once, in the checkpoint and in the ONNX artifact.
    """

    def __init__(self, packed: PackedWeight, padding_idx: int | None = None):
        super().__init__()
        self.num_embeddings = packed.qweight.shape[0]
        self.embedding_dim = packed.in_features
        self.bits = packed.fmt.bits
        self.storage_bits = packed.fmt.storage_bits
        self.block_size = packed.fmt.block_size
        self.symmetric = packed.fmt.symmetric
        self.padding_idx = padding_idx
        self.register_buffer("qweight", packed.qweight)
        self.register_buffer("scales", packed.scales)
        self.register_buffer("zero_points", packed.zero_points)

    @property
    def weight(self) -> torch.Tensor:
        return dequantize(self.qweight, self.scales, self.zero_points, self.embedding_dim,
                          self.storage_bits, self.block_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.ops.modelfold.quant_embedding(ids, self.qweight, self.scales,
                                                   self.zero_points, self.embedding_dim,
                                                   self.storage_bits, self.block_size)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, "
                f"block_size={self.block_size}")


class W8A8Linear(nn.Module):
    """int8 weights (per output channel, symmetric) x int8 activations (per token, dynamic)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        w = weight.detach().float()  # [N, K]
        scales = w.abs().amax(dim=1).clamp_min(1e-8) / 127.0  # [N]
        q = torch.clamp(torch.round(w / scales[:, None]), -127, 127).to(torch.int8)
        self.in_features, self.out_features = w.shape[1], w.shape[0]
        self.register_buffer("qweight_t", q.t().contiguous())  # [K, N]
        self.register_buffer("weight_scales", scales)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(),
                                                           requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.qweight_t.t().float() * self.weight_scales[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.modelfold.w8a8_linear(x, self.qweight_t, self.weight_scales, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, w8a8"


def quantized_bytes(module: nn.Module) -> int:
    """Bytes of a quantized module's stored tensors (packed weights, scales, zero points, bias)."""
    return sum(t.numel() * t.element_size() for t in module.buffers()) + \
        sum(p.numel() * p.element_size() for p in module.parameters())


def describe_format(bits: int, group_size: int, symmetric: bool) -> str:
    g = "per-channel" if group_size == -1 else f"g{group_size}"
    return f"int{bits} {g} {'sym' if symmetric else 'asym'}"


# -- checkpoints -------------------------------------------------------------------------------
# Shapes follow the MatMulNBits layout above: qweight [N, k_blocks, block * storage_bits / 8],
# scales [N, k_blocks], zero_points [N, ceil(k_blocks * storage_bits / 8)].
def _empty_packed(rows: int, in_features: int, fmt: QuantFormat, has_zero_points: bool
                  ) -> PackedWeight:
    kb, bits = fmt.k_blocks(in_features), fmt.storage_bits
    qweight = torch.empty(rows, kb, fmt.block_size * bits // 8, dtype=torch.uint8)
    zero_points = torch.empty(rows, -(-kb * bits // 8), dtype=torch.uint8) \
        if has_zero_points else None
    return PackedWeight(qweight, torch.empty(rows, kb), zero_points, in_features, fmt)


def _describe_quant_linear(m: QuantLinear) -> dict[str, Any]:
    return {"in_features": m.in_features, "out_features": m.out_features, "bits": m.bits,
            "block_size": m.block_size, "symmetric": m.symmetric,
            "has_bias": m.bias is not None, "has_zero_points": m.zero_points is not None}


def _build_quant_linear(f: dict[str, Any]) -> QuantLinear:
    fmt = QuantFormat(f["bits"], f["block_size"], f["symmetric"])
    packed = _empty_packed(f["out_features"], f["in_features"], fmt, f["has_zero_points"])
    return QuantLinear(packed, torch.empty(f["out_features"]) if f["has_bias"] else None)


def _describe_quant_embedding(m: QuantEmbedding) -> dict[str, Any]:
    return {"num_embeddings": m.num_embeddings, "embedding_dim": m.embedding_dim, "bits": m.bits,
            "block_size": m.block_size, "symmetric": m.symmetric, "padding_idx": m.padding_idx,
            "has_zero_points": m.zero_points is not None}


def _build_quant_embedding(f: dict[str, Any]) -> QuantEmbedding:
    fmt = QuantFormat(f["bits"], f["block_size"], f["symmetric"])
    packed = _empty_packed(f["num_embeddings"], f["embedding_dim"], fmt, f["has_zero_points"])
    return QuantEmbedding(packed, padding_idx=f["padding_idx"])


def _describe_w8a8_linear(m: W8A8Linear) -> dict[str, Any]:
    return {"in_features": m.in_features, "out_features": m.out_features,
            "has_bias": m.bias is not None}


def _build_w8a8_linear(f: dict[str, Any]) -> W8A8Linear:
    # The constructor quantizes a float weight; quantizing zeros is cheap (O(N*K)) and keeps
    # this independent of the class's private attribute layout.
    n, k = f["out_features"], f["in_features"]
    return W8A8Linear(torch.zeros(n, k), torch.empty(n) if f["has_bias"] else None)


register_module_type(QuantLinear, _describe_quant_linear, _build_quant_linear)
register_row_wise(torch.ops.modelfold.quant_linear.default, {1: 0, 2: 0, 3: 0}, bias=4)
register_row_wise(torch.ops.modelfold.w8a8_linear.default, {1: 1, 2: 0}, bias=3)
register_module_type(QuantEmbedding, _describe_quant_embedding, _build_quant_embedding)
register_module_type(W8A8Linear, _describe_w8a8_linear, _build_w8a8_linear)


__all__ = [
    "MIN_BLOCK", "SUPPORTED_BITS", "PackedWeight", "QuantEmbedding", "QuantFormat",
    "QuantFormatError", "QuantLinear", "W8A8Linear", "block_size_for", "codes_for",
    "container_bits", "dequantize", "describe_format", "fake_quantize", "fit_params", "fit_params_mse",
    "group_params", "pack_rows", "pseudo_quantize", "pack_weight", "pack_zero_points", "quantize_rtn",
    "quantized_bytes", "unpack_rows", "unpack_weight", "unpack_zero_points",
]
