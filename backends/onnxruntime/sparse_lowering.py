"""ONNX lowerings of the N:M sparsity dialect ops (``modelfold.ir.sparse``) and their export modes.

``export_onnx(..., sparse=MODE)`` chooses how ``NMLinear`` / ``NMQuantLinear`` layers are stored:

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
- ``"dense"``: ``sparse_export`` swaps each ``NMLinear`` for an ``nn.Linear`` with its dense weight
  and each ``NMQuantLinear`` for a ``QuantLinear`` of its decompressed codes for the duration of
  the export (the originals are put back afterwards): plain ``MatMul`` / ``MatMulNBits``, no
  decompression at load time, a bigger file.

Shape legend: N = output features, K = input features, C = kept values per row (K * n / m),
B = packed index bytes per row, kb = K blocks (ceil(K / block_size)), P = packed zero-point bytes
per row.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import onnx
import onnx_ir
import torch
from onnxscript import opset18 as op
from torch import nn

from modelfold.backends.onnxruntime.quant_lowering import quant_linear_onnx
from modelfold.backends.onnxruntime.translations import ensure_registered
from modelfold.ir.quant import PackedWeight, QuantLinear
from modelfold.ir.sparse import NMLinear, NMQuantLinear, index_bits, sparse_bytes, sparse_layers

__all__ = [
    "SPARSE_MODES",
    "SparseExport",
    "check_sparse_mode",
    "nm_linear_onnx",
    "nm_quant_linear_onnx",
    "register_sparse_translations",
    "sparse_export",
    "sparse_layers",
]

SPARSE_MODES = ("compressed", "dense")

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
def check_sparse_mode(mode: str) -> str:
    """Returns ``mode`` if it is one of ``SPARSE_MODES``; raises ValueError naming the option if not."""
    if not isinstance(mode, str) or mode not in SPARSE_MODES:
        raise ValueError(
            f"sparse must be one of {', '.join(repr(m) for m in SPARSE_MODES)} (how N:M sparse "
            f"layers are exported: compressed values + indices decompressed when ONNX Runtime "
            f"loads the model, or dense weights), got {mode!r}"
        )
    return mode


@dataclass
class SparseExport:
    """What one export does with the N:M sparse layers of a model; its ``facts`` go to the manifest.

    Built by ``sparse_export``. ``compressed`` tells ``export_onnx`` to keep ONNX Runtime's offline
    optimizer from constant-folding the decompression subgraphs into the saved file.
    """

    mode: str
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def has_layers(self) -> bool:
        return bool(self.facts)

    @property
    def compressed(self) -> bool:
        return self.has_layers and self.mode == "compressed"


@contextlib.contextmanager
def sparse_export(model: nn.Module, mode: str) -> Iterator[SparseExport]:
    """Prepares the N:M sparse layers of ``model`` for an export in ``mode``, and puts them back.

    "compressed": changes nothing (the translations decompress). "dense": replaces each
    ``NMLinear`` by an ``nn.Linear`` and each ``NMQuantLinear`` by a ``QuantLinear`` with the same
    (decompressed) weight; the original modules are restored on exit, also after an error.

    Raises:
        ValueError: Bad ``mode``.
    """
    check_sparse_mode(mode)
    layers = sparse_layers(model)
    export = SparseExport(mode)
    if not layers:
        yield export
        return
    export.facts = _describe(layers, mode)
    if mode == "compressed":
        yield export
        return
    saved: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        with torch.no_grad():
            for path, layer in layers.items():
                parent_path, _, attr = path.rpartition(".")
                parent = model.get_submodule(parent_path)
                saved.append((parent, attr, layer))
                setattr(parent, attr, _dense_layer(layer).train(layer.training))
        yield export
    finally:
        for parent, attr, layer in reversed(saved):
            setattr(parent, attr, layer)


def _dense_layer(layer: nn.Module) -> nn.Module:
    """The dense equivalent of a sparse layer (same outputs): ``nn.Linear`` or ``QuantLinear``."""
    if isinstance(layer, NMLinear):
        dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        dense.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=False)  # [N, K]
        if layer.bias is not None:
            dense.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        return dense
    if isinstance(layer, NMQuantLinear):
        zero_points = None if layer.zero_points is None else layer.zero_points.clone()
        packed = PackedWeight(
            layer.dense_qweight(),  # [N, kb, blob]
            layer.scales.clone(),  # [N, kb]
            zero_points,  # [N, P] or None
            layer.in_features,
            layer.fmt,
        )
        return QuantLinear(packed, layer.bias)
    raise TypeError(f"not an N:M sparse layer: {type(layer).__name__}")


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
