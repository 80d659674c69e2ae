"""ONNX lowerings of the quantization dialect ops (``modelfold.ir.quant``).

- ``modelfold::quant_linear`` -> ``com.microsoft.MatMulNBits``: the packed storage already has its
  layout, so the lowering relabels the tensors and sets the attributes. One exception: ORT 1.32
  refuses 2-bit blocks over 256 values (per-channel 2-bit with K > 256), and such weights are
  re-blocked by ops that ONNX Runtime constant-folds (``_reblocked``).
- ``modelfold::quant_embedding`` -> ``com.microsoft.GatherBlockQuantized`` on the same 3-D
  ``qweight`` initializer, so a table tied to the LM head's ``MatMulNBits`` is stored once. That
  op wants scales ``[V, k_blocks, 1]`` and one zero point per byte ``[V, k_blocks, 1]``; they are
  built from the shared ``[V, k_blocks]`` / packed tensors with Unsqueeze, BitShift and BitwiseAnd,
  which ONNX Runtime constant-folds into new initializers when it optimizes the artifact. For a
  SmolLM2-shaped table (49,152 x 576, int4 asym g32) the table is stored once (14.2 MB; 113 MB
  in float32), and the folded copies add 3.5 MB of scales and 0.9 MB of zero points.
- ``modelfold::w8a8_linear`` -> per-token dynamic int8 quantization (ReduceMax(Abs), Max, Div,
  Round, Clip) + ``MatMulInteger`` + Cast + Mul + Mul (+ Add), in the reference's order of
  operations, so the result is bit-identical to the torch reference. Both operands enter
  ``MatMulInteger`` as uint8 ``value + 128`` with zero point 128 (the weight's shift is folded
  into a uint8 initializer at optimization time). Measured with ORT 1.32 on an AVX2 CPU without
  VNNI, 2 threads, [M, 1024] x [1024, 1024] (a shared, noisy machine): int8 x int8 is exact but
  slow (4-17 ms at M = 1, 11-27 ms at M = 128); uint8 x int8 is fast but wrong, its VPMADDUBSW
  kernel saturates int16 pair sums (max error 2.5e5 on +-127 inputs; ORT's docs recommend 7-bit
  weights for it); uint8 x uint8 is exact and fast (0.10 ms at M = 1, 4-11 ms at M = 128;
  float32 MatMul 0.4-1.3 / 9-15 ms). Activations must be float32 (``export_onnx`` requires it).

``MatMulNBits`` and ``GatherBlockQuantized`` are not in onnxscript's opset tables, so their
schemas are declared here (``onnx.defs.OpSchema``) and wrapped in ``onnxscript.values.Op``.

The ``accuracy_level`` attribute of ``MatMulNBits`` (the compute type ONNX Runtime may use inside
the kernel) is an export option (``ExportOptions.accuracy_level``): ``QuantLowering`` sets it
around ``torch.onnx.export`` with ``lowering_options``, and the translation reads it when it is
traced.

Shape legend: N = output features, K = input features, V = vocabulary, E = embedding dim,
kb = K blocks (ceil(K / block_size)), P = packed zero-point bytes per row.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import onnx
import torch
from onnx.defs import OpSchema
from onnxscript import opset18 as op
from onnxscript.values import Op, Opset

import modelfold.ir.quant  # noqa: F401  (defines the torch.ops.modelfold.* quantization ops)
from modelfold.backends.onnxruntime.lowering import Lowering, register_lowering
from modelfold.backends.onnxruntime.options import ACCURACY_LEVELS, ExportOptions
from modelfold.backends.onnxruntime.translations import ensure_registered

__all__ = [
    "ACCURACY_LEVELS",
    "QuantLowering",
    "accuracy_level",
    "lowering_options",
    "register_quant_translations",
]

_ACCURACY_LEVEL: contextvars.ContextVar[int] = contextvars.ContextVar(
    "modelfold_matmulnbits_accuracy_level", default=0
)
# Within one export (``lowering_options``): weights already re-blocked (``_reblocked``), so that a
# table read by an embedding and its tied head is re-blocked, and stored, once.
_REBLOCKED: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "modelfold_reblocked_weights", default=None
)

# w8a8 operands enter MatMulInteger as uint8 (value + 128) with this zero point (module docstring).
_ZERO_POINT = 128

# The largest MatMulNBits block ONNX Runtime 1.32's CPU kernel accepts, per bit width (see
# _reblocked); GatherBlockQuantized and 4- and 8-bit MatMulNBits took blocks of 2048 in a test.
_MAX_BLOCK_SIZE = {2: 256}

_MS_DOMAIN = "com.microsoft"
_MSFT = Opset(_MS_DOMAIN, 1)
_OPTIONAL = OpSchema.FormalParameterOption.Optional
_INT = OpSchema.AttrType.INT
_FLOAT_TYPES = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]

_MATMUL_NBITS_SCHEMA = OpSchema(
    "MatMulNBits",
    _MS_DOMAIN,
    1,
    "Y = A @ dequant(B).T (+ bias); B packed uint8 [N, k_blocks, block_size * bits / 8].",
    inputs=[
        OpSchema.FormalParameter("A", "T1"),
        OpSchema.FormalParameter("B", "T2"),
        OpSchema.FormalParameter("scales", "T1"),
        OpSchema.FormalParameter("zero_points", "T3", param_option=_OPTIONAL),
        OpSchema.FormalParameter("g_idx", "T4", param_option=_OPTIONAL),
        OpSchema.FormalParameter("bias", "T1", param_option=_OPTIONAL),
    ],
    outputs=[OpSchema.FormalParameter("Y", "T1")],
    type_constraints=[
        ("T1", _FLOAT_TYPES, "activations, scales, bias"),
        ("T2", ["tensor(uint8)", "tensor(int32)"], "packed weights"),
        ("T3", ["tensor(uint8)", "tensor(int32)", *_FLOAT_TYPES], "zero points"),
        ("T4", ["tensor(int32)"], "group index (deprecated)"),
    ],
    attributes=[
        OpSchema.Attribute("K", _INT, "input features"),
        OpSchema.Attribute("N", _INT, "output features"),
        OpSchema.Attribute("bits", _INT, "bits per stored value (2, 4, 8)"),
        OpSchema.Attribute("block_size", _INT, "values per quantization block along K"),
        OpSchema.Attribute("accuracy_level", _INT, "compute type", required=False),
    ],
)

_GATHER_BLOCK_QUANTIZED_SCHEMA = OpSchema(
    "GatherBlockQuantized",
    _MS_DOMAIN,
    1,
    "Gather of a block-quantized tensor, dequantized: (data[idx] - zero_points) * scales.",
    inputs=[
        OpSchema.FormalParameter("data", "T1"),
        OpSchema.FormalParameter("indices", "Tind"),
        OpSchema.FormalParameter("scales", "T2"),
        OpSchema.FormalParameter("zero_points", "T1", param_option=_OPTIONAL),
    ],
    outputs=[OpSchema.FormalParameter("output", "T2")],
    type_constraints=[
        ("T1", ["tensor(uint8)", "tensor(int4)", "tensor(uint4)"], "quantized data"),
        ("T2", _FLOAT_TYPES, "scales and output"),
        ("Tind", ["tensor(int32)", "tensor(int64)"], "indices"),
    ],
    attributes=[
        OpSchema.Attribute("gather_axis", _INT, "axis of data the indices select", required=False),
        OpSchema.Attribute("quantize_axis", _INT, "axis of data the blocks run along", required=False),
        OpSchema.Attribute("block_size", _INT, "values per quantization block", required=False),
        OpSchema.Attribute("bits", _INT, "bits per value in a uint8 container", required=False),
    ],
)

_MATMUL_NBITS = Op(_MSFT, "MatMulNBits", _MATMUL_NBITS_SCHEMA)
_GATHER_BLOCK_QUANTIZED = Op(_MSFT, "GatherBlockQuantized", _GATHER_BLOCK_QUANTIZED_SCHEMA)


def accuracy_level() -> int:
    """The ``accuracy_level`` that ``quant_linear`` lowerings traced now write into MatMulNBits."""
    return _ACCURACY_LEVEL.get()


@contextlib.contextmanager
def lowering_options(*, accuracy_level: int = 0) -> Iterator[None]:
    """Sets the export options of the quantization lowerings for the duration of a block.

    Args:
        accuracy_level: ``MatMulNBits``' ``accuracy_level`` (one of ``ACCURACY_LEVELS``). 4 lets
            ONNX Runtime quantize the activations to int8 per block inside the kernel: much
            faster on a CPU, no longer bit-comparable with the float reference.

    Raises:
        OptionError: ``accuracy_level`` is not one of ``ACCURACY_LEVELS``.
    """
    ExportOptions(accuracy_level=accuracy_level)  # validates it
    token = _ACCURACY_LEVEL.set(accuracy_level)
    reblocked = _REBLOCKED.set({})
    try:
        yield
    finally:
        _REBLOCKED.reset(reblocked)
        _ACCURACY_LEVEL.reset(token)


@register_lowering
class QuantLowering(Lowering):
    """Sets ``ExportOptions.accuracy_level`` for the ``quant_linear`` translations of an export."""

    name = "quant"

    def context(self) -> contextlib.AbstractContextManager:
        return lowering_options(accuracy_level=self.options.accuracy_level)


# -- translations (traced by torch.onnx's exporter; tensors are onnxscript values) ---------------
def quant_linear_onnx(
    x,
    qweight,
    scales,
    zero_points=None,
    bias=None,
    in_features: int = 0,
    bits: int = 4,
    block_size: int = 32,
):
    """``modelfold::quant_linear`` -> ``MatMulNBits``: x ``[..., K]`` -> ``[..., N]``."""
    n = qweight.shape[0]
    qweight, scales, zero_points, block_size = _reblocked(
        qweight, scales, zero_points, in_features, bits, block_size
    )
    return _MATMUL_NBITS(
        x,
        qweight,  # [N, kb, blob]
        scales,  # [N, kb]
        zero_points,  # [N, P] or None (default 2^(bits-1))
        None,
        bias,  # [N] or None
        K=in_features,
        N=n,
        bits=bits,
        block_size=block_size,
        accuracy_level=_ACCURACY_LEVEL.get(),
    )


def quant_embedding_onnx(
    ids,
    qweight,
    scales,
    zero_points=None,
    embedding_dim: int = 0,
    bits: int = 4,
    block_size: int = 32,
):
    """``modelfold::quant_embedding`` -> ``GatherBlockQuantized``: ids ``[...]`` -> ``[..., E]``."""
    # GatherBlockQuantized takes any block size; re-blocking as a tied head does keeps one table.
    qweight, scales, zero_points, block_size = _reblocked(
        qweight, scales, zero_points, embedding_dim, bits, block_size
    )
    k_blocks = -(-embedding_dim // block_size)
    scales_3d = op.Unsqueeze(scales, op.Constant(value_ints=[2]))  # [V, kb, 1]
    zeros_3d = None if zero_points is None else _unpacked_zero_points(zero_points, bits, k_blocks)
    rows = _GATHER_BLOCK_QUANTIZED(
        qweight,  # [V, kb, blob]: the initializer a tied MatMulNBits reads too
        ids,
        scales_3d,
        zeros_3d,
        gather_axis=0,
        quantize_axis=2,
        block_size=block_size,
        bits=bits,
    )  # [..., kb, block_size]
    # Reshape's 0 copies a dim: keep the ids' dims, merge the blocks.
    rank = len(ids.shape)
    rows = op.Reshape(rows, op.Constant(value_ints=[0] * rank + [k_blocks * block_size]))
    if k_blocks * block_size != embedding_dim:  # K was padded to a whole number of blocks
        rows = op.Slice(
            rows,
            op.Constant(value_ints=[0]),
            op.Constant(value_ints=[embedding_dim]),
            op.Constant(value_ints=[-1]),
        )
    return rows  # [..., E]


def _unpacked_zero_points(zero_points, bits: int, k_blocks: int):
    """Packed zero points uint8 ``[V, P]`` -> one per byte ``[V, kb, 1]`` (constant-folded)."""
    if bits == 8:
        return op.Unsqueeze(zero_points, op.Constant(value_ints=[2]))
    shifts = onnx.numpy_helper.from_array(torch.arange(0, 8, bits, dtype=torch.uint8).numpy(), "shifts")
    mask = onnx.helper.make_tensor("mask", onnx.TensorProto.UINT8, [], [(1 << bits) - 1])
    values = op.BitShift(
        op.Unsqueeze(zero_points, op.Constant(value_ints=[2])),  # [V, P, 1]
        op.Constant(value=shifts),  # [per_byte]
        direction="RIGHT",
    )  # [V, P, per_byte], low bits first
    values = op.BitwiseAnd(values, op.Constant(value=mask))
    values = op.Reshape(values, op.Constant(value_ints=[0, -1, 1]))  # [V, P * per_byte, 1]
    return _first_blocks(values, k_blocks)  # [V, kb, 1]: the last byte may hold padding


def _packed_zero_points(values, bits: int, k_blocks: int):
    """One zero point per byte ``[N, kb]`` -> packed uint8 ``[N, ceil(kb * bits / 8)]``."""
    per_byte = 8 // bits
    padding = -k_blocks % per_byte
    values = op.Cast(values, to=onnx.TensorProto.INT32)
    if padding:
        values = op.Pad(values, op.Constant(value_ints=[0, 0, 0, padding]))
    weights = onnx.numpy_helper.from_array(
        (1 << torch.arange(0, 8, bits, dtype=torch.int32)).numpy(), "weights"
    )
    values = op.Reshape(values, op.Constant(value_ints=[0, -1, per_byte]))  # [N, P, per_byte]
    values = op.ReduceSum(
        op.Mul(values, op.Constant(value=weights)), op.Constant(value_ints=[-1]), keepdims=0
    )  # [N, P]: value j of a byte shifted left by j * bits
    return op.Cast(values, to=onnx.TensorProto.UINT8)


def _first_blocks(values, k_blocks: int):
    """``values[:, :k_blocks]`` (constant-folded when ``values`` is)."""
    return op.Slice(
        values,
        op.Constant(value_ints=[0]),
        op.Constant(value_ints=[k_blocks]),
        op.Constant(value_ints=[1]),
    )


def _reblocked(qweight, scales, zero_points, in_features: int, bits: int, block_size: int):
    """The same weight in blocks ONNX Runtime's MatMulNBits accepts for ``bits``.

    ORT 1.32 refuses 2-bit blocks over 256 values ("2-bit MatMulNBits block_size must not exceed
    256"), which every per-channel 2-bit weight with K > 256 has (its block is K rounded up to a
    power of 2). The packed bytes of one row are the same in blocks of 256; each big block's
    scale and zero point are repeated for its 256-value blocks, and the blocks that hold only
    padding are dropped. All of it is computed from initializers, so ONNX Runtime folds it into
    new initializers that replace the old ones. Within ``lowering_options`` a weight used twice
    (a tied embedding and head) is re-blocked once, so it is still stored once.

    Returns:
        ``(qweight [N, kb', blob'], scales [N, kb'], zero_points [N, P'] or None, block_size')``.
    """
    max_block = _MAX_BLOCK_SIZE.get(bits, block_size)
    if block_size <= max_block:
        return qweight, scales, zero_points, block_size
    memo = _REBLOCKED.get()
    key = (id(qweight), id(scales), id(zero_points), in_features, bits, block_size)
    if memo is not None and key in memo:
        return memo[key][1]
    key_values = (qweight, scales, zero_points)
    repeat = block_size // max_block
    k_blocks = -(-in_features // max_block)
    blob = max_block * bits // 8
    qweight = op.Reshape(qweight, op.Constant(value_ints=[0, -1, blob]))  # [N, kb * repeat, blob']
    qweight = _first_blocks(qweight, k_blocks)  # [N, kb', blob']
    scales = op.Expand(
        op.Unsqueeze(scales, op.Constant(value_ints=[2])), op.Constant(value_ints=[1, 1, repeat])
    )
    scales = _first_blocks(op.Reshape(scales, op.Constant(value_ints=[0, -1])), k_blocks)  # [N, kb']
    if zero_points is not None:
        zeros = _unpacked_zero_points(zero_points, bits, -(-in_features // block_size))  # [N, kb, 1]
        zeros = op.Expand(zeros, op.Constant(value_ints=[1, 1, repeat]))  # [N, kb, repeat]
        zeros = _first_blocks(op.Reshape(zeros, op.Constant(value_ints=[0, -1])), k_blocks)
        zero_points = _packed_zero_points(zeros, bits, k_blocks)  # [N, P']
    result = (qweight, scales, zero_points, max_block)
    if memo is not None:  # the key's values are kept alive, so their ids stay theirs
        memo[key] = (key_values, result)
    return result


def w8a8_linear_onnx(x, qweight_t, weight_scales, bias=None):
    """``modelfold::w8a8_linear`` -> dynamic per-token int8 quantization + ``MatMulInteger``.

    The same operations in the same order as the torch reference: ``a_s = max(max|x|, 1e-8) /
    127`` per token, ``x_q = clip(round_half_even(x / a_s), -127, 127)``, the exact int32 product,
    then ``float(acc) * a_s * weight_scales (+ bias)``.
    """
    a_scale = op.Div(
        op.Max(
            op.ReduceMax(op.Abs(x), op.Constant(value_ints=[-1]), keepdims=1),
            op.Constant(value_float=1e-8),
        ),
        op.Constant(value_float=127.0),
    )  # [..., 1]
    x_q = op.Clip(
        op.Round(op.Div(x, a_scale)),
        op.Constant(value_float=-127.0),
        op.Constant(value_float=127.0),
    )  # [..., K] integers in [-127, 127]
    zero_point = op.Constant(
        value=onnx.helper.make_tensor("zero_point", onnx.TensorProto.UINT8, [], [_ZERO_POINT])
    )
    shifted = op.Cast(
        op.Add(x_q, op.Constant(value_float=float(_ZERO_POINT))), to=onnx.TensorProto.UINT8
    )  # [..., K] in [1, 255]
    # int8 -> uint8 + 128 on a constant: ONNX Runtime folds it into a uint8 initializer.
    weight_u8 = op.Cast(
        op.Add(
            op.Cast(qweight_t, to=onnx.TensorProto.INT32),
            op.Constant(value=onnx.helper.make_tensor("offset", onnx.TensorProto.INT32, [], [_ZERO_POINT])),
        ),
        to=onnx.TensorProto.UINT8,
    )  # [K, N] in [1, 255]
    acc = op.MatMulInteger(shifted, weight_u8, zero_point, zero_point)  # [..., N] int32, exact
    y = op.Mul(op.Mul(op.Cast(acc, to=onnx.TensorProto.FLOAT), a_scale), weight_scales)
    if bias is not None:
        y = op.Add(y, bias)
    return y  # [..., N]


_TRANSLATIONS = {
    "quant_linear": quant_linear_onnx,
    "quant_embedding": quant_embedding_onnx,
    "w8a8_linear": w8a8_linear_onnx,
}


def register_quant_translations() -> None:
    """Registers the three translations (done on import; again after an `unregister_translation`).

    Raises:
        ValueError: Another translation is already registered for one of the ops.
    """
    ensure_registered(_TRANSLATIONS)


register_quant_translations()
