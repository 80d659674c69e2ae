"""ONNX lowering of ``modelfold::skip_rms_norm`` / ``modelfold::skip_layer_norm``
(``modelfold.ir.norms``): ``com.microsoft.SkipSimplifiedLayerNormalization`` /
``SkipLayerNormalization``, taking outputs 0 (the normalized sum) and 3 (the sum).

The translation names all four outputs; ``SkipNormOutputs`` blanks the unused statistics
(outputs 1 and 2, ``mean`` / ``inv_std_var``) in the ONNX file, so that ONNX Runtime neither
allocates nor writes them (as onnxruntime-genai's graphs do; 0.1 ms of a 5 ms SmolLM2 int4 decode
step in ONNX Runtime's profile).
"""

from __future__ import annotations

import onnx
from onnx.defs import OpSchema
from onnxscript.values import Op, Opset

import modelfold.ir.norms  # noqa: F401  (defines the ops)
from modelfold.backends.onnxruntime.lowering import Lowering, register_lowering
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



@register_lowering
class SkipNormOutputs(Lowering):
    """Blanks the unread ``mean`` / ``inv_std_var`` outputs of the skip norms (module docstring);
    facts under ``skip_norms``: how many nodes."""

    name = "skip_norms"
    order = 80

    def edit_onnx(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        read = {name for node in graph.node for name in node.input}
        read |= {o.name for o in graph.output}
        nodes = [n for n in graph.node if n.domain == "com.microsoft" and
                 n.op_type in ("SkipSimplifiedLayerNormalization", "SkipLayerNormalization")]
        for node in nodes:
            for i in (1, 2):
                if i < len(node.output) and node.output[i] and node.output[i] not in read:
                    node.output[i] = ""
        if nodes:
            self.facts = {"nodes": len(nodes)}


__all__ = ["SkipNormOutputs", "skip_layer_norm_onnx", "skip_rms_norm_onnx"]
