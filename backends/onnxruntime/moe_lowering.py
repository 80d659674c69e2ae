"""ONNX lowering of ``modelfold::moe`` (``modelfold.ir.moe``).

Where ONNX Runtime's CPU ``com.microsoft.MoE`` kernel computes the FFN (SwiGLU experts, or dense
experts with relu / gelu / silu) the op becomes one ``MoE`` node: only the chosen experts are
computed, so a decode step reads ``top_k`` experts' weights. The gate and up weights are
interleaved row by row into its ``fc1`` (``swiglu_fusion=1``, the only SwiGLU layout the CPU
kernel takes; a constant expression ONNX Runtime folds when the session loads):

- ``weighting=softmax``: the router logits go in as they are, ``normalize_routing_weights=1``
  (Mixtral's weights);
- ``weighting=unit``: our own top-k of the softmax picks the experts, and the kernel gets logits
  of 0 for them and -1e4 for the rest, so each chosen expert gets weight ``1 / k``; the output is
  multiplied by ``k``.

SwiGLU experts quantized to int4 (``modelfold::quant_moe``) become ``com.microsoft.QMoE``
over their MatMulNBits bytes as stored (``weights_prepacked=0``, the export's ``accuracy_level``);
unit weights go in as its ``router_weights`` (ones).

Other activations (GeGLU with tanh GELU: Gemma; GPT-2's gelu_new) take a decomposed subgraph:
every expert computed on every token and weighted by its routing weight (zero when not chosen),
which is exact but reads all expert weights.
"""

from __future__ import annotations

import math

from onnx.defs import OpSchema
from onnxscript import opset18 as op
from onnxscript.values import Op, Opset

import modelfold.ir.moe  # noqa: F401  (defines torch.ops.modelfold.moe)
from modelfold.backends.onnxruntime.translations import ensure_registered

_MS_DOMAIN = "com.microsoft"
_OPTIONAL = OpSchema.FormalParameterOption.Optional
_FLOAT_TYPES = ["tensor(float)", "tensor(float16)"]
_ATTR = OpSchema.AttrType
_MOE_SCHEMA = OpSchema(
    "MoE", _MS_DOMAIN, 1, "Mixture of experts (ONNX Runtime contrib op).",
    inputs=[OpSchema.FormalParameter("input", "T"),
            OpSchema.FormalParameter("router_probs", "T"),
            OpSchema.FormalParameter("fc1_experts_weights", "T"),
            OpSchema.FormalParameter("fc1_experts_bias", "T", param_option=_OPTIONAL),
            OpSchema.FormalParameter("fc2_experts_weights", "T"),
            OpSchema.FormalParameter("fc2_experts_bias", "T", param_option=_OPTIONAL),
            OpSchema.FormalParameter("fc3_experts_weights", "T", param_option=_OPTIONAL),
            OpSchema.FormalParameter("fc3_experts_bias", "T", param_option=_OPTIONAL)],
    outputs=[OpSchema.FormalParameter("output", "T")],
    type_constraints=[("T", _FLOAT_TYPES, "float tensors")],
    attributes=[OpSchema.Attribute("activation_type", _ATTR.STRING, "", required=False),
                OpSchema.Attribute("k", _ATTR.INT, "", required=False),
                OpSchema.Attribute("normalize_routing_weights", _ATTR.INT, "", required=False),
                OpSchema.Attribute("swiglu_fusion", _ATTR.INT, "", required=False),
                OpSchema.Attribute("activation_alpha", _ATTR.FLOAT, "", required=False),
                OpSchema.Attribute("activation_beta", _ATTR.FLOAT, "", required=False),
                OpSchema.Attribute("use_sparse_mixer", _ATTR.INT, "", required=False)],
)
_MOE = Op(Opset(_MS_DOMAIN, 1), "MoE", _MOE_SCHEMA)

_QMOE_SCHEMA = OpSchema(
    "QMoE", _MS_DOMAIN, 1, "Quantized mixture of experts (ONNX Runtime contrib op).",
    inputs=[OpSchema.FormalParameter(name, t, param_option=_OPTIONAL if i > 2 and name not in (
        "fc2_experts_weights",) else OpSchema.FormalParameterOption.Single)
            for i, (name, t) in enumerate([
                ("input", "T"), ("router_probs", "T"), ("fc1_experts_weights", "Q"),
                ("fc1_scales", "S"), ("fc1_experts_bias", "T"), ("fc2_experts_weights", "Q"),
                ("fc2_scales", "S"), ("fc2_experts_bias", "T"), ("fc3_experts_weights", "Q"),
                ("fc3_scales", "S"), ("fc3_experts_bias", "T"), ("fc1_zero_points", "Q"),
                ("fc2_zero_points", "Q"), ("fc3_zero_points", "Q"), ("router_weights", "T")])],
    outputs=[OpSchema.FormalParameter("output", "T")],
    type_constraints=[("T", _FLOAT_TYPES, "float tensors"), ("S", _FLOAT_TYPES, "scales"),
                      ("Q", ["tensor(uint8)"], "packed weights")],
    attributes=[OpSchema.Attribute("activation_type", _ATTR.STRING, "", required=False),
                OpSchema.Attribute("k", _ATTR.INT, "", required=False),
                OpSchema.Attribute("normalize_routing_weights", _ATTR.INT, "", required=False),
                OpSchema.Attribute("swiglu_fusion", _ATTR.INT, "", required=False),
                OpSchema.Attribute("activation_alpha", _ATTR.FLOAT, "", required=False),
                OpSchema.Attribute("activation_beta", _ATTR.FLOAT, "", required=False),
                OpSchema.Attribute("expert_weight_bits", _ATTR.INT, "", required=False),
                OpSchema.Attribute("block_size", _ATTR.INT, "", required=False),
                OpSchema.Attribute("weights_prepacked", _ATTR.INT, "", required=False),
                OpSchema.Attribute("accuracy_level", _ATTR.INT, "", required=False)],
)
_QMOE = Op(Opset(_MS_DOMAIN, 1), "QMoE", _QMOE_SCHEMA)

# transformers activation name -> what the CPU MoE kernel calls it (dense experts)
_KERNEL_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "silu": "silu", "swish": "silu"}
_MASKED = -1.0e4  # router input of an expert that was not chosen (exp underflows to 0)


def kernel_activation(activation: str, gated: bool) -> str | None:
    """The ``activation_type`` ONNX Runtime's CPU MoE kernel computes for these experts, or None
    (the decomposed subgraph)."""
    if gated:
        return "swiglu" if activation in ("silu", "swish") else None
    return _KERNEL_ACTIVATIONS.get(activation)


def _act(h, activation: str):
    if activation in ("silu", "swish"):
        return op.Mul(h, op.Sigmoid(h))
    if activation == "relu":
        return op.Relu(h)
    if activation == "gelu":
        half = op.CastLike(op.Constant(value_float=0.5), h)
        root = op.CastLike(op.Constant(value_float=1 / math.sqrt(2.0)), h)
        return op.Mul(op.Mul(half, h), op.Add(op.CastLike(op.Constant(value_float=1.0), h),
                                              op.Erf(op.Mul(h, root))))
    if activation in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu_python_tanh"):
        c = op.CastLike(op.Constant(value_float=math.sqrt(2.0 / math.pi)), h)
        cube = op.Mul(op.CastLike(op.Constant(value_float=0.044715), h), op.Mul(h, op.Mul(h, h)))
        inner = op.Tanh(op.Mul(c, op.Add(h, cube)))
        half = op.CastLike(op.Constant(value_float=0.5), h)
        return op.Mul(op.Mul(half, h), op.Add(op.CastLike(op.Constant(value_float=1.0), h),
                                              inner))
    raise NotImplementedError(f"modelfold::moe: no ONNX lowering for activation {activation!r}")


def _routing(logits, top_k: int, weighting: str):
    """``(weights [T, k], experts [T, k])`` as ``modelfold.ir.moe.route`` computes them."""
    probs = op.Softmax(logits, axis=-1)
    top, index = op.TopK(probs, op.Constant(value_ints=[top_k]), axis=-1, largest=1, sorted=1)
    if weighting == "softmax":
        return op.Div(top, op.ReduceSum(top, op.Constant(value_ints=[-1]), keepdims=1)), index
    return op.Add(op.Mul(top, op.CastLike(op.Constant(value_float=0.0), top)),
                  op.CastLike(op.Constant(value_float=1.0), top)), index


def moe_onnx(x, router, w1, w3, w2, b1, top_k: int = 1, activation: str = "silu",
             weighting: str = "unit"):
    """``modelfold::moe`` -> ``com.microsoft.MoE`` (or the decomposed subgraph)."""
    logits = op.MatMul(x, op.Transpose(router, perm=[1, 0]))  # [T, E]
    gated = w3 is not None
    kind = kernel_activation(activation, gated)
    if kind is None:
        return _decomposed(x, logits, w1, w3, w2, b1, top_k, activation, weighting)
    if gated:  # rows g0, u0, g1, u1, ...: [E, 2I, H]
        fc1 = _interleave(w1, w3)
        attrs = {"swiglu_fusion": 1, "activation_alpha": 1.0, "activation_beta": 0.0}
    else:
        fc1, attrs = w1, {}
    if weighting == "softmax":
        return _MOE(x, logits, fc1, b1, w2, None, None, None, k=top_k, activation_type=kind,
                    normalize_routing_weights=1, **attrs)
    _, index = _routing(logits, top_k, weighting)
    chosen = op.ScatterElements(op.Mul(logits, op.CastLike(op.Constant(value_float=0.0), logits)),
                                index,
                                op.Expand(op.CastLike(op.Constant(value_float=1.0), logits),
                                          op.Shape(index)), axis=1)  # 1 chosen, 0 not
    masked = op.Mul(op.Sub(chosen, op.CastLike(op.Constant(value_float=1.0), logits)),
                    op.CastLike(op.Constant(value_float=-_MASKED), logits))
    y = _MOE(x, masked, fc1, b1, w2, None, None, None, k=top_k, activation_type=kind,
             normalize_routing_weights=1, **attrs)
    return op.Mul(y, op.CastLike(op.Constant(value_float=float(top_k)), y))


def _interleave(a, b):
    """Rows of ``a`` and ``b`` ``[E, I, ...]`` alternated: ``[E, 2I, ...]`` (gate, up, gate ...)."""
    pair = op.Concat(op.Unsqueeze(a, op.Constant(value_ints=[2])),
                     op.Unsqueeze(b, op.Constant(value_ints=[2])), axis=2)
    return op.Reshape(pair, op.Concat(op.Shape(a, start=0, end=1), op.Constant(value_ints=[-1]),
                                      op.Shape(a, start=2, end=3), axis=0))


def quant_moe_onnx(x, router, q1, s1, z1, q3, s3, z3, q2, s2, z2, top_k: int = 1,
                   activation: str = "silu", weighting: str = "unit", bits: int = 4,
                   block_size: int = 32):
    """``modelfold::quant_moe`` -> ``com.microsoft.QMoE`` over the experts' MatMulNBits bytes
    (``weights_prepacked=0``: the raw layout); unit weights through its ``router_weights`` (ones:
    the probabilities only select)."""
    from modelfold.backends.onnxruntime.quant_lowering import accuracy_level

    logits = op.MatMul(x, op.Transpose(router, perm=[1, 0]))
    fc1, sc1 = _interleave(q1, q3), _interleave(s1, s3)
    zp1 = None if z1 is None else _interleave(z1, z3)
    ones = None
    if weighting == "unit":
        ones = op.Expand(op.CastLike(op.Constant(value_float=1.0), logits), op.Shape(logits))
    return _QMOE(x, logits, fc1, sc1, None, q2, s2, None, None, None, None, zp1, z2, None, ones,
                 k=top_k, activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0,
                 activation_beta=0.0, normalize_routing_weights=int(weighting == "softmax"),
                 expert_weight_bits=bits, block_size=block_size, weights_prepacked=0,
                 accuracy_level=accuracy_level())


def _decomposed(x, logits, w1, w3, w2, b1, top_k, activation, weighting):
    """Every expert on every token, times its routing weight (0 when not chosen)."""
    weights, index = _routing(logits, top_k, weighting)
    full = op.ScatterElements(op.Mul(logits, op.CastLike(op.Constant(value_float=0.0), logits)),
                              index, weights, axis=1)  # [T, E]
    h = op.MatMul(x, op.Transpose(w1, perm=[0, 2, 1]))  # [E, T, I]
    if b1 is not None:
        h = op.Add(h, op.Unsqueeze(b1, op.Constant(value_ints=[1])))
    h = _act(h, activation)
    if w3 is not None:
        h = op.Mul(h, op.MatMul(x, op.Transpose(w3, perm=[0, 2, 1])))
    out = op.MatMul(h, op.Transpose(w2, perm=[0, 2, 1]))  # [E, T, H]
    out = op.Mul(out, op.Unsqueeze(op.Transpose(full, perm=[1, 0]),
                                   op.Constant(value_ints=[2])))
    return op.ReduceSum(out, op.Constant(value_ints=[0]), keepdims=0)


ensure_registered({"moe": moe_onnx, "quant_moe": quant_moe_onnx})

__all__ = ["kernel_activation", "moe_onnx", "quant_moe_onnx"]
