"""ONNX lowering of ``modelfold::attention`` (``modelfold.ir.attention``):
``com.microsoft.GroupQueryAttention``.

The op's semantics are GroupQueryAttention's (checked against ONNX Runtime in the tests): q/k/v
(or one packed q/k/v tensor), the past cache, ``seqlens_k = sum(mask) - 1`` and
``total_sequence_length = mask length`` (computed from the attention mask; ONNX Runtime's
common-subexpression pass keeps one copy for all layers), the rotary tables as initializers
(``do_rotary``), ``scale``, ``softcap`` and ``local_window_size``. Present and past may be the
same buffer (``past_present_share_buffer``): ``OnnxCausalLM`` binds one buffer per layer as both,
so a decode step writes only the new token's keys and values. With the op's ``k_scale`` /
``v_scale`` (``quantize-kv``) the cache is int8 with per-channel scales (``k_quant_type`` /
``v_quant_type`` PER_CHANNEL, ``kv_cache_bit_width`` 8).

ONNX Runtime's CPU kernel needs ``head_size % 16 == 0`` with rotary embedding and a rotary table
width that is a multiple of 8; the ``fuse-attention`` pass leaves models that do not meet that
unfused.
"""

from __future__ import annotations

from onnx import TensorProto
from onnx.defs import OpSchema
from onnxscript import opset18 as op
from onnxscript.values import Op, Opset

import modelfold.ir.attention  # noqa: F401  (defines torch.ops.modelfold.attention)
from modelfold.backends.onnxruntime.translations import ensure_registered

_MS_DOMAIN = "com.microsoft"
_OPTIONAL = OpSchema.FormalParameterOption.Optional
_INT, _FLOAT = OpSchema.AttrType.INT, OpSchema.AttrType.FLOAT
_FLOAT_TYPES = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]

_GQA_SCHEMA = OpSchema(
    "GroupQueryAttention",
    _MS_DOMAIN,
    1,
    "Grouped-query attention with a KV cache (past and present may share one buffer).",
    inputs=[
        OpSchema.FormalParameter("query", "T"),
        OpSchema.FormalParameter("key", "T", param_option=_OPTIONAL),
        OpSchema.FormalParameter("value", "T", param_option=_OPTIONAL),
        OpSchema.FormalParameter("past_key", "C", param_option=_OPTIONAL),
        OpSchema.FormalParameter("past_value", "C", param_option=_OPTIONAL),
        OpSchema.FormalParameter("seqlens_k", "M"),
        OpSchema.FormalParameter("total_sequence_length", "M"),
        OpSchema.FormalParameter("cos_cache", "T", param_option=_OPTIONAL),
        OpSchema.FormalParameter("sin_cache", "T", param_option=_OPTIONAL),
        *[OpSchema.FormalParameter(name, "T", param_option=_OPTIONAL)  # not used here
          for name in ("position_ids", "attention_bias", "head_sink")],
        OpSchema.FormalParameter("k_scale", "S", param_option=_OPTIONAL),
        OpSchema.FormalParameter("v_scale", "S", param_option=_OPTIONAL),
        *[OpSchema.FormalParameter(name, "T", param_option=_OPTIONAL)  # not used here
          for name in ("q_norm_weight", "k_norm_weight")],
        OpSchema.FormalParameter("query_seqlens", "M", param_option=_OPTIONAL),
    ],
    outputs=[
        OpSchema.FormalParameter("output", "T"),
        OpSchema.FormalParameter("present_key", "C"),
        OpSchema.FormalParameter("present_value", "C"),
    ],
    type_constraints=[("T", _FLOAT_TYPES, "activations"),
                      ("C", [*_FLOAT_TYPES, "tensor(int8)"], "cache"),
                      ("S", ["tensor(float)"], "cache scales"),
                      ("M", ["tensor(int32)"], "sequence lengths")],
    attributes=[
        OpSchema.Attribute("num_heads", _INT, "query heads"),
        OpSchema.Attribute("kv_num_heads", _INT, "key / value heads"),
        OpSchema.Attribute("scale", _FLOAT, "score scale", required=False),
        OpSchema.Attribute("softcap", _FLOAT, "score soft-cap (0: none)", required=False),
        OpSchema.Attribute("local_window_size", _INT, "left window (-1: none)", required=False),
        OpSchema.Attribute("do_rotary", _INT, "apply rotary embedding", required=False),
        OpSchema.Attribute("rotary_interleaved", _INT, "interleaved rotary", required=False),
        OpSchema.Attribute("k_quant_type", OpSchema.AttrType.STRING, "NONE / PER_CHANNEL",
                           required=False),
        OpSchema.Attribute("v_quant_type", OpSchema.AttrType.STRING, "NONE / PER_CHANNEL",
                           required=False),
        OpSchema.Attribute("kv_cache_bit_width", _INT, "bits of a quantized cache", required=False),
    ],
)
_GQA = Op(Opset(_MS_DOMAIN, 1), "GroupQueryAttention", _GQA_SCHEMA)


def attention_onnx(query, key, value, past_key, past_value, attention_mask, cos_cache=None,
                   sin_cache=None, num_heads: int = 0, kv_num_heads: int = 0, scale: float = 1.0,
                   softcap: float = 0.0, window: int = 0, k_scale=None, v_scale=None):
    """``modelfold::attention`` -> ``GroupQueryAttention`` (+ seqlens / total length from the
    mask): returns ``(output [B, S, H*D], present_key, present_value)``.

    ``query_seqlens`` is not given: with it ONNX Runtime also takes several new tokens per row
    for a batch with a past, but its decode steps were 5 % slower on SmolLM2-135M (212 vs 222
    tokens/s, int4, 16-token context); without it such a step is refused (``OnnxCausalLM``
    says so before ONNX Runtime does).
    """
    lengths = op.ReduceSum(attention_mask, op.Constant(value_ints=[1]), keepdims=0)  # [B] T_b
    seqlens = op.Cast(op.Sub(lengths, op.Constant(value_int=1)), to=TensorProto.INT32)
    total = op.Cast(op.Squeeze(op.Shape(attention_mask, start=1, end=2)), to=TensorProto.INT32)
    rotary = cos_cache is not None
    quantized = {} if k_scale is None else {
        "k_quant_type": "PER_CHANNEL", "v_quant_type": "PER_CHANNEL", "kv_cache_bit_width": 8}
    return _GQA(query, key, value, past_key, past_value, seqlens, total, cos_cache, sin_cache,
                None, None, None, k_scale, v_scale,
                num_heads=num_heads, kv_num_heads=kv_num_heads, scale=float(scale),
                softcap=float(softcap), local_window_size=window if window > 0 else -1,
                do_rotary=int(rotary), rotary_interleaved=0, _num_outputs=3, **quantized)


_ROTARY_SCHEMA = OpSchema(
    "RotaryEmbedding",
    _MS_DOMAIN,
    1,
    "Rotary embedding of [B, S, H*D] at position_ids [B, S] from cos/sin caches [M, R/2].",
    inputs=[OpSchema.FormalParameter("input", "T"),
            OpSchema.FormalParameter("position_ids", "M"),
            OpSchema.FormalParameter("cos_cache", "T"),
            OpSchema.FormalParameter("sin_cache", "T")],
    outputs=[OpSchema.FormalParameter("output", "T")],
    type_constraints=[("T", _FLOAT_TYPES, "activations"),
                      ("M", ["tensor(int64)"], "positions")],
    attributes=[OpSchema.Attribute("interleaved", _INT, "interleaved", required=False),
                OpSchema.Attribute("num_heads", _INT, "heads", required=False),
                OpSchema.Attribute("rotary_embedding_dim", _INT, "rotated dims", required=False)],
)
_ROTARY = Op(Opset(_MS_DOMAIN, 1), "RotaryEmbedding", _ROTARY_SCHEMA)


def _positions(attention_mask, rows):
    """Positions ``[B, S]`` of this step's rows (``rows`` ``[B, S, ...]``) and which are valid
    (``modelfold.ir.attention.query_positions``)."""
    total = op.ReduceSum(attention_mask, op.Constant(value_ints=[1]), keepdims=0)  # [B] T_b
    s = op.Shape(rows, start=1, end=2)  # [1]
    new = op.Min(total, s)  # [B] Q_b
    steps = op.Range(op.Constant(value_int=0), op.Squeeze(s), op.Constant(value_int=1))  # [S]
    positions = op.Add(op.Unsqueeze(op.Sub(total, new), op.Constant(value_ints=[1])),
                       op.Unsqueeze(steps, op.Constant(value_ints=[0])))  # [B, S]
    valid = op.Less(op.Unsqueeze(steps, op.Constant(value_ints=[0])),
                    op.Unsqueeze(new, op.Constant(value_ints=[1])))  # [B, S]
    return positions, valid


def _dequantized(cache, scale, like):
    return op.CastLike(cache, like) if scale is None else \
        op.Mul(op.CastLike(cache, like), op.CastLike(scale, like))


def attend_onnx(query, keys, values, attention_mask, cos_cache=None, sin_cache=None,
                num_heads: int = 0, kv_num_heads: int = 0, scale: float = 1.0,
                softcap: float = 0.0, window: int = 0, k_scale=None, v_scale=None):
    """``modelfold::attend`` (attention over another layer's cache, nothing written) as plain ops:
    ``RotaryEmbedding`` on q, ``q K^T`` per KV head (K read in place: ONNX Runtime fuses the
    Transpose into its MatMul), the causal / window mask from the positions, softmax, ``P V``."""
    head_dim = int(keys.shape[3])
    group = num_heads // kv_num_heads
    positions, valid = _positions(attention_mask, query)
    if cos_cache is not None:
        query = _ROTARY(query, positions, cos_cache, sin_cache, interleaved=0,
                        num_heads=num_heads, rotary_embedding_dim=2 * int(cos_cache.shape[1]))
    q = op.Transpose(op.Reshape(query, op.Constant(value_ints=[0, 0, num_heads, head_dim])),
                     perm=[0, 2, 1, 3])  # [B, H, S, D]
    q = op.Reshape(q, op.Constant(value_ints=[0, kv_num_heads, -1, head_dim]))  # [B, Hkv, G*S, D]
    k = _dequantized(keys, k_scale, query)
    scores = op.MatMul(q, op.Transpose(k, perm=[0, 1, 3, 2]))  # [B, Hkv, G*S, L]
    scores = op.Mul(scores, op.CastLike(op.Constant(value_float=float(scale)), query))
    if softcap > 0:
        cap = op.CastLike(op.Constant(value_float=float(softcap)), query)
        scores = op.Mul(op.Tanh(op.Div(scores, cap)), cap)
    length = op.Shape(keys, start=2, end=3)  # [1] L
    key_index = op.Range(op.Constant(value_int=0), op.Squeeze(length),
                         op.Constant(value_int=1))  # [L]
    at = op.Unsqueeze(positions, op.Constant(value_ints=[2]))  # [B, S, 1]
    allowed = op.LessOrEqual(key_index, at)  # [B, S, L]
    if window > 0:
        allowed = op.And(allowed, op.Greater(key_index, op.Sub(at, op.Constant(value_int=window))))
    allowed = op.Unsqueeze(allowed, op.Constant(value_ints=[1, 2]))  # [B, 1, 1, S, L]
    scores = op.Reshape(scores, op.Concat(op.Constant(value_ints=[0, kv_num_heads, group, -1]),
                                          length, axis=0))
    scores = op.Where(allowed, scores, op.CastLike(op.Constant(value_float=float("-inf")),
                                                     query))  # [B, Hkv, G, S, L]
    probs = op.Reshape(op.Softmax(scores, axis=-1),
                       op.Concat(op.Constant(value_ints=[0, kv_num_heads, -1]), length,
                                 axis=0))  # [B, Hkv, G*S, L]
    out = op.MatMul(probs, _dequantized(values, v_scale, query))  # [B, Hkv, G*S, D]
    out = op.Reshape(out, op.Constant(value_ints=[0, num_heads, -1, head_dim]))  # [B, H, S, D]
    out = op.Transpose(out, perm=[0, 2, 1, 3])  # [B, S, H, D]
    out = op.Mul(out, op.CastLike(op.Unsqueeze(valid, op.Constant(value_ints=[2, 3])), query))
    return op.Reshape(out, op.Constant(value_ints=[0, 0, -1]))


def cache_write_onnx(past, rows, attention_mask, kv_num_heads: int = 0, scale=None):
    """``modelfold::cache_write`` -> ``ScatterElements`` along the cache rows: in place when
    past and present are one buffer (``OnnxCausalLM`` binds them so), a copy otherwise. The cache
    grows to the mask's length first when it is shorter (a concatenation-style past)."""
    head_dim = int(past.shape[3])
    positions, _ = _positions(attention_mask, rows)
    new = op.Transpose(op.Reshape(rows, op.Constant(value_ints=[0, 0, kv_num_heads, head_dim])),
                       perm=[0, 2, 1, 3])  # [B, Hkv, S, D]
    if scale is None:
        new = op.CastLike(new, past)
    else:
        new = op.Cast(op.Clip(op.Round(op.Div(new, op.CastLike(scale, new))),
                              op.CastLike(op.Constant(value_float=-128.0), new),
                              op.CastLike(op.Constant(value_float=127.0), new)),
                      to=TensorProto.INT8)
    total = op.Shape(attention_mask, start=1, end=2)  # [1] T
    missing = op.Max(op.Sub(total, op.Shape(past, start=2, end=3)), op.Constant(value_ints=[0]))
    pad = op.Concat(op.Constant(value_ints=[0, 0, 0, 0, 0, 0]), missing,
                    op.Constant(value_ints=[0]), axis=0)
    grown = op.Pad(past, pad)  # [B, Hkv, max(T, C), D]
    index = op.Expand(op.Unsqueeze(positions, op.Constant(value_ints=[1, 3])), op.Shape(new))
    return op.ScatterElements(grown, index, new, axis=2)


ensure_registered({"attention": attention_onnx, "attend": attend_onnx,
                   "cache_write": cache_write_onnx})

__all__ = ["attend_onnx", "attention_onnx", "cache_write_onnx"]
