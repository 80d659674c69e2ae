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


ensure_registered({"attention": attention_onnx})

__all__ = ["attention_onnx"]
