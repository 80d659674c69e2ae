"""ONNX lowering of ``modelfold::skip_rms_norm`` / ``modelfold::skip_layer_norm``
(``modelfold.ir.norms``): ``com.microsoft.SkipSimplifiedLayerNormalization`` /
``SkipLayerNormalization``, taking outputs 0 (the normalized sum) and 3 (the sum).
"""

from __future__ import annotations

from onnx.defs import OpSchema
from onnxscript.values import Op, Opset

import modelfold.ir.norms  # noqa: F401  (defines the ops)
from modelfold.backends.onnxruntime.translations import ensure_registered

_MS = Opset("com.microsoft", 1)
_OPTIONAL = OpSchema.FormalParameterOption.Optional
_FLOAT_TYPES = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]


def _schema(name: str, extra_inputs: list[str]) -> OpSchema:
    return OpSchema(
        name, "com.microsoft", 1, "residual add + normalization",
        inputs=[OpSchema.FormalParameter("input", "T"), OpSchema.FormalParameter("skip", "T"),
                OpSchema.FormalParameter("gamma", "T"),
                *[OpSchema.FormalParameter(n, "T", param_option=_OPTIONAL) for n in extra_inputs]],
        outputs=[OpSchema.FormalParameter("output", "T"),
                 OpSchema.FormalParameter("mean", "U", param_option=_OPTIONAL),
                 OpSchema.FormalParameter("inv_std_var", "U", param_option=_OPTIONAL),
                 OpSchema.FormalParameter("input_skip_bias_sum", "T", param_option=_OPTIONAL)],
        type_constraints=[("T", _FLOAT_TYPES, "activations"), ("U", ["tensor(float)"], "stats")],
        attributes=[OpSchema.Attribute("epsilon", OpSchema.AttrType.FLOAT, "epsilon",
                                       required=False)])


_SKIP_RMS = Op(_MS, "SkipSimplifiedLayerNormalization",
               _schema("SkipSimplifiedLayerNormalization", ["bias"]))
_SKIP_LN = Op(_MS, "SkipLayerNormalization", _schema("SkipLayerNormalization", ["beta", "bias"]))


def skip_rms_norm_onnx(x, skip, weight, eps: float = 1e-6):
    """-> ``SkipSimplifiedLayerNormalization``: ``(normalized sum, sum)``."""
    out, _, _, total = _SKIP_RMS(x, skip, weight, None, epsilon=float(eps), _num_outputs=4)
    return out, total


def skip_layer_norm_onnx(x, skip, weight, bias=None, eps: float = 1e-5):
    """-> ``SkipLayerNormalization``: ``(normalized sum, sum)``."""
    out, _, _, total = _SKIP_LN(x, skip, weight, bias, None, epsilon=float(eps), _num_outputs=4)
    return out, total


ensure_registered({"skip_rms_norm": skip_rms_norm_onnx, "skip_layer_norm": skip_layer_norm_onnx})

__all__ = ["skip_layer_norm_onnx", "skip_rms_norm_onnx"]
