"""ONNX lowerings of the N:M sparsity dialect ops (``modelfold.ir.sparse``) and their export modes.

``ExportOptions(sparse=MODE)`` chooses how ``NMLinear`` / ``NMQuantLinear`` layers are stored:

- ``"compressed"`` (default): the artifact stores the compressed tensors (kept values or codes,
  packed indices) and a small decompression subgraph in front of a dense kernel:

  - ``modelfold::nm_linear`` -> unpack the indices (Cast, Div, Mod: integer ops every ONNX Runtime
    CPU build has), add each group's first column, ``ScatterElements`` the kept values into a
    zero ``[N, K]`` matrix, then ``MatMul(x, Transpose(dense))`` (+ ``Add`` bias);
  - ``modelfold::nm_quant_linear`` -> the dense code matrix (each block's zero point, or
    ``2^(bits-1)`` when symmetric, with the kept codes scattered over it), packed back to
    ``MatMulNBits``' layout and fed to the ``quant_linear`` lowering (``quant_linear_onnx``).

  The subgraph reads initializers only, so ONNX Runtime constant-folds it into a dense
  initializer when it loads the artifact: the file stays small, the session runs at dense speed
  (the folded weight lives in memory only). ``export_onnx`` therefore saves the offline-optimized
  graph with ONNX Runtime's ``ConstantFolding`` disabled when the model has sparse layers (with it,
  the offline optimizer would write the folded dense weights into the file).
- ``"dense"``: a graph step of ``SparseLowering`` replaces each ``nm_linear`` by a linear with
  the dense weight and each ``nm_quant_linear`` by a ``quant_linear`` of its decompressed codes
  in the lowered graph: plain ``MatMul`` / ``MatMulNBits``, no decompression at load time, a
  bigger file.

Shape legend: N = output features, K = input features, C = kept values per row (K * n / m),
B = packed index bytes per row, kb = K blocks (ceil(K / block_size)), P = packed zero-point bytes
per row.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import onnx
import onnx_ir
import torch
from onnxscript import opset18 as op
from torch import nn
from torch.export import ExportedProgram

from modelfold.backends.onnxruntime.lowering import Lowering, register_lowering
from modelfold.backends.onnxruntime.quant_lowering import quant_linear_onnx
from modelfold.backends.onnxruntime.translations import ensure_registered
from modelfold.ir.graph import GraphEditor
from modelfold.ir.sparse import NMLinear, index_bits, sparse_bytes, sparse_layers

if TYPE_CHECKING:
    from modelfold.backends.onnxruntime.options import ExportOptions
    from modelfold.ir.program import Program

__all__ = [
    "SparseLowering",
    "nm_linear_onnx",
    "nm_quant_linear_onnx",
    "register_sparse_translations",
    "sparse_layers",
]

_INT32 = onnx.TensorProto.INT32
_INT64 = onnx.TensorProto.INT64


# -- translations (traced by torch.onnx's exporter; tensors are onnxscript values) ---------------
def nm_linear_onnx(x, values, indices, bias=None, in_features: int = 0, n: int = 2, m: int = 4):
    """``modelfold::nm_linear`` -> decompression (folded at load) + ``MatMul``: x ``[..., K]`` ->
    ``[..., N]``."""
    rows = values.shape[0]
    zeros = op.ConstantOfShape(
        op.Constant(value_ints=[rows, in_features]),
        value=onnx.helper.make_tensor("zero", onnx.TensorProto.FLOAT, [1], [0.0]),
    )  # [N, K]
    cols = _kept_columns(indices, in_features, n, m)  # [N, C]
    dense = op.ScatterElements(zeros, cols, values, axis=1)  # [N, K]
    y = op.MatMul(x, op.Transpose(dense, perm=[1, 0]))  # [..., N]
    if bias is not None:
        y = op.Add(y, bias)
    return y


def nm_quant_linear_onnx(
    x,
    codes,
    indices,
    scales,
    zero_points=None,
    bias=None,
    in_features: int = 0,
    bits: int = 4,
    block_size: int = 32,
    n: int = 2,
    m: int = 4,
):
    """``modelfold::nm_quant_linear`` -> dense codes (folded at load) + ``MatMulNBits``: x
    ``[..., K]`` -> ``[..., N]``. ``bits`` is the storage width (2, 4 or 8)."""
    rows, k_blocks = codes.shape[0], scales.shape[1]
    padded = k_blocks * block_size  # K rounded up to whole blocks
    if zero_points is None:
        base = op.ConstantOfShape(
            op.Constant(value_ints=[rows, padded]),
            value=onnx.helper.make_tensor("zero_point", _INT32, [1], [1 << (bits - 1)]),
        )  # [N, kb * block_size]
    else:
        zeros = _unpacked(zero_points, bits, k_blocks, _INT32, column=True)  # [N, kb, 1]
        zeros = op.Expand(zeros, op.Constant(value_ints=[1, 1, block_size]))  # [N, kb, block_size]
        base = op.Reshape(zeros, op.Constant(value_ints=[0, -1]))  # [N, kb * block_size]
    kept = _unpacked(codes, bits, in_features // m * n, _INT32)  # [N, C]
    # The columns past K (padding to whole blocks) keep the zero point: MatMulNBits ignores them.
    dense = op.ScatterElements(base, _kept_columns(indices, in_features, n, m), kept, axis=1)
    qweight = _packed(dense, bits, k_blocks, block_size)  # [N, kb, blob]
    # The tracer infers no shape for a computed value; the quant_linear lowering reads N from it.
    qweight.shape = onnx_ir.Shape([rows, k_blocks, block_size * bits // 8])
    return quant_linear_onnx(x, qweight, scales, zero_points, bias, in_features, bits, block_size)


def _kept_columns(indices, in_features: int, n: int, m: int):
    """Packed indices uint8 ``[N, B]`` -> the column of every kept value, int64 ``[N, C]``
    (``modelfold.ir.sparse.column_indices``): its position in its group + the group's first
    column ``(i // n) * m``."""
    count = in_features // m * n
    positions = _unpacked(indices, index_bits(m), count, _INT64)  # [N, C] in 0 .. m-1
    base = op.Mul(op.Div(op.Range(_int64(0), _int64(count), _int64(1)), _int64(n)), _int64(m))  # [C]
    return op.Add(positions, base)


def _unpacked(packed, bits: int, count: int, dtype: int, *, column: bool = False):
    """uint8 ``[R, B]`` -> the first ``count`` values of each row, ``bits`` each, low bits first:
    ``[R, count]`` (``column``: ``[R, count, 1]``) of ``dtype`` (INT32 or INT64).

    Integer Div and Mod by powers of two (the values are non-negative, so Div is a right shift).
    """
    per = 8 // bits
    stored = packed.shape[1] * per  # values per row, with the padding of the last byte
    values = op.Cast(_unfolded(packed), to=dtype)  # [R, B]
    if bits != 8:
        divisors = onnx.helper.make_tensor("divisors", dtype, [per], [1 << (bits * j) for j in range(per)])
        modulus = onnx.helper.make_tensor("modulus", dtype, [], [1 << bits])
        values = op.Div(op.Unsqueeze(values, op.Constant(value_ints=[2])), op.Constant(value=divisors))
        values = op.Mod(values, op.Constant(value=modulus))  # [R, B, per]
    if bits != 8 or column:
        values = op.Reshape(values, op.Constant(value_ints=[0, -1, 1] if column else [0, -1]))
    if count != stored:
        values = op.Slice(
            values,
            op.Constant(value_ints=[0]),  # starts
            op.Constant(value_ints=[count]),  # ends
            op.Constant(value_ints=[1]),  # axes
        )
    return values


def _unfolded(packed):
    """``packed`` (uint8), through an op that torch.onnx's optimizer cannot constant-fold.

    The exporter's optimizer (onnxscript's constant folder) folds every node whose inputs are all
    constants of up to 8,192 elements, which would store a small layer's unpacked indices (int64,
    32x the packed bytes), codes or zero-point matrix (int32) instead of the packed initializers.
    It does not fold ``ConstantOfShape`` (to keep files small), so an ``AND`` with all ones from a
    ``ConstantOfShape`` stops it at the first node; ONNX Runtime folds the whole chain at load.
    """
    ones = op.ConstantOfShape(
        op.Constant(value_ints=[1]),
        value=onnx.helper.make_tensor("ones", onnx.TensorProto.UINT8, [1], [0xFF]),
    )  # [1]
    return op.BitwiseAnd(packed, ones)


def _packed(codes, bits: int, k_blocks: int, block_size: int):
    """int32 codes ``[N, kb * block_size]`` -> ``MatMulNBits``' ``qweight`` uint8
    ``[N, kb, block_size * bits / 8]``, low bits first (``modelfold.ir.quant.pack_weight``)."""
    if bits == 8:
        codes = op.Reshape(codes, op.Constant(value_ints=[0, k_blocks, block_size]))
        return op.Cast(codes, to=onnx.TensorProto.UINT8)
    per = 8 // bits
    weights = onnx.helper.make_tensor("weights", _INT32, [per], [1 << (bits * j) for j in range(per)])
    codes = op.Reshape(codes, op.Constant(value_ints=[0, k_blocks, block_size // per, per]))
    packed = op.ReduceSum(
        op.Mul(codes, op.Constant(value=weights)), op.Constant(value_ints=[-1]), keepdims=0
    )  # [N, kb, blob]: value j of a byte shifted left by j * bits
    return op.Cast(packed, to=onnx.TensorProto.UINT8)


def _int64(value: int):
    """An int64 scalar constant."""
    return op.Constant(value=onnx.helper.make_tensor("value", _INT64, [], [value]))


_TRANSLATIONS = {
    "nm_linear": nm_linear_onnx,
    "nm_quant_linear": nm_quant_linear_onnx,
}


def register_sparse_translations() -> None:
    """Registers the two translations (done on import; again after an `unregister_translation`).

    Raises:
        ValueError: Another translation is already registered for one of the ops.
    """
    ensure_registered(_TRANSLATIONS)


# -- export modes --------------------------------------------------------------------------------
@register_lowering
class SparseLowering(Lowering):
    """The N:M sparse layers in an export (``ExportOptions.sparse``); facts under ``sparse``.

    "compressed" keeps the translations' decompression subgraphs and keeps ONNX Runtime's offline
    optimizer from constant-folding them into the saved file. "dense" is a graph step on the
    lowered copy of the Program's graph: each ``nm_linear`` becomes ``aten.linear`` with the dense
    weight and each ``nm_quant_linear`` a ``quant_linear`` of its decompressed codes (the torch
    model is not touched).
    """

    name = "sparse"
    order = 20

    def __init__(self, program: Program, options: ExportOptions):
        super().__init__(program, options)
        self.mode = options.sparse
        self.layers = sparse_layers(program.module)
        if self.layers:
            self.facts = _describe(self.layers, self.mode)

    def rewrite(self, ep: ExportedProgram) -> ExportedProgram:
        if not self.layers or self.mode != "dense":
            return ep
        editor = GraphEditor(ep)
        for node in editor.calls(torch.ops.modelfold.nm_linear.default):
            layer = self.layers[editor.owner(node)]
            x, _values, _indices, bias = node.args[:4]
            weight = editor.add_tensor(f"{editor.owner(node)}.weight", layer.weight.detach())
            editor.replace(node, editor.call(torch.ops.aten.linear.default, (x, weight, bias),
                                             near=node))
        for node in editor.calls(torch.ops.modelfold.nm_quant_linear.default):
            path = editor.owner(node)
            layer = self.layers[path]
            x, _codes, _indices, scales, zero_points, bias = node.args[:6]
            qweight = editor.add_tensor(f"{path}.qweight", layer.dense_qweight())  # [N, kb, blob]
            args = (x, qweight, scales, zero_points, bias, layer.in_features, layer.storage_bits,
                    layer.block_size)
            editor.replace(node, editor.call(torch.ops.modelfold.quant_linear.default, args,
                                             near=node))
        return editor.finish()

    def disabled_optimizers(self) -> list[str]:
        # Folding would write the decompressed (dense) weights into the file; at load it runs.
        return ["ConstantFolding"] if self.layers and self.mode == "compressed" else []


def _describe(layers: dict[str, nn.Module], mode: str) -> dict[str, Any]:
    """Mode, layer count, patterns, and the bytes of the sparse layers' tensors stored compressed
    and dense (float32 weight, or packed ``qweight``, + grid + bias)."""
    patterns: dict[str, int] = {}
    compressed = dense = 0
    for layer in layers.values():
        pattern = f"{layer.n}:{layer.m}"
        patterns[pattern] = patterns.get(pattern, 0) + 1
        compressed += sparse_bytes(layer)
        dense += _dense_bytes(layer)
    return {
        "mode": mode,
        "layers": len(layers),
        "patterns": patterns,
        "compressed_bytes": compressed,
        "dense_bytes": dense,
    }


def _dense_bytes(layer: nn.Module) -> int:
    bias = 0 if layer.bias is None else layer.bias.numel() * layer.bias.element_size()
    if isinstance(layer, NMLinear):
        return layer.out_features * layer.in_features * 4 + bias
    blob = layer.block_size * layer.storage_bits // 8
    qweight = layer.out_features * layer.k_blocks * blob
    grid = layer.scales.numel() * layer.scales.element_size()
    if layer.zero_points is not None:
        grid += layer.zero_points.numel()
    return qweight + grid + bias


register_sparse_translations()
