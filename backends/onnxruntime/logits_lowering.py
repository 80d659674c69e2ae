"""``logits_to_keep``: a decoder artifact computes the LM head for the last positions only.

A prompt of 1,024 tokens needs the logits of its last position to choose the first new token,
but the graph computes all 1,024 x V of them: for SmolLM2 (V = 49,152) that is 58 GFLOP, about a
fifth of the prefill, and a 200 MB output. ``LogitsLowering`` adds one optional graph input,

    logits_to_keep: int64 scalar, default 0 (an overridable initializer)

and slices the LM head's input to its last ``logits_to_keep`` positions (``Slice(h, -k, end,
axis=1)``; 0 keeps them all, so a caller that does not feed it gets every position, as before).
``OnnxCausalLM.generate`` feeds it during the prefill; ``eval`` and parity do not.

The step edits the unoptimized ONNX file (``Lowering.edit_onnx``): from the ``logits`` output it
walks back through elementwise ops with a constant operand (a bias ``Add``, a soft-cap's ``Div``
/ ``Tanh`` / ``Mul``, a ``Cast``) to the LM head's projection (``MatMul``, ``FusedMatMul``,
``MatMulNBits``); a graph whose head it does not recognise is left as it is, and the manifest's
``logits`` facts say why. Encoders (no ``logits`` output) are not touched.

Shape legend: B = batch, S = new tokens of the step, k = logits_to_keep, V = vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from modelfold.backends.onnxruntime.lowering import Lowering, register_lowering
from modelfold.backends.onnxruntime.runtime import LOGITS_TO_KEEP, MODEL_FILE
from modelfold.ir import signature as sig

__all__ = ["LOGITS_TO_KEEP", "LogitsLowering"]

_KEPT_DIM = "logits_sequence"  # the logits' sequence dim once it may be shorter than S
_HEADS = {"MatMul", "FusedMatMul", "MatMulNBits"}
_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Tanh", "Cast", "Identity"}


@register_lowering
class LogitsLowering(Lowering):
    """Adds the ``logits_to_keep`` input to decoder artifacts (see the module docstring); facts
    under ``logits``: ``{"input": "logits_to_keep", "head": op type}`` or ``{"input": None,
    "reason": ...}``."""

    name = "logits"
    order = 90

    def edit_onnx(self, model: onnx.ModelProto) -> None:
        if self.program.signature.kind != "causal-lm":
            return
        found = _head(model.graph)
        if isinstance(found, str):
            self.facts = {"input": None, "reason": found}
            return
        head, downstream = found
        _slice_head_input(model.graph, head, downstream)
        self.facts = {"input": LOGITS_TO_KEEP, "head": head.op_type,
                      "default": 0, "meaning": "compute the logits of the last k positions "
                                               "only (0: all)"}

    def finish(self, out_dir: Path) -> None:
        if not self.facts.get("input"):
            return
        graph = onnx.load(str(Path(out_dir) / MODEL_FILE), load_external_data=False).graph
        if LOGITS_TO_KEEP not in {i.name for i in graph.input} or \
                LOGITS_TO_KEEP not in {i.name for i in graph.initializer}:
            raise RuntimeError(f"ONNX Runtime's optimizer did not keep {LOGITS_TO_KEEP} an "
                               "overridable initializer")


def _head(graph: onnx.GraphProto) -> tuple[onnx.NodeProto, list[onnx.NodeProto]] | str:
    """The LM head's projection node and the elementwise nodes between it and the logits, or
    why there is none to slice."""
    producers = {out: node for node in graph.node for out in node.output}
    constants = {init.name for init in graph.initializer}
    constants |= {node.output[0] for node in graph.node if node.op_type == "Constant"}
    if sig.LOGITS not in {o.name for o in graph.output}:
        return "the graph has no logits output"
    name, downstream = sig.LOGITS, []
    while True:
        node = producers.get(name)
        if node is None:
            return f"the logits come from {name!r}, which no node produces"
        if node.op_type in _HEADS:
            return node, downstream
        if node.op_type not in _ELEMENTWISE:
            return f"the logits come from a {node.op_type} node, not a recognised LM head"
        variable = [i for i in node.input if i and i not in constants]
        if len(variable) != 1:
            return f"a {node.op_type} node between the LM head and the logits has " \
                   f"{len(variable)} non-constant inputs"
        downstream.append(node)
        name = variable[0]


def _slice_head_input(graph: onnx.GraphProto, head: onnx.NodeProto,
                      downstream: list[onnx.NodeProto]) -> None:
    hidden = head.input[0]  # [B, S, E]
    keep = numpy_helper.from_array(np.array(0, dtype=np.int64), LOGITS_TO_KEEP)
    graph.initializer.append(keep)
    graph.input.append(helper.make_tensor_value_info(LOGITS_TO_KEEP, TensorProto.INT64, []))
    names = {k: f"{LOGITS_TO_KEEP}/{k}" for k in ("shape", "neg", "start", "end", "axis", "out")}
    graph.initializer.extend([
        numpy_helper.from_array(np.array([1], dtype=np.int64), names["shape"]),
        numpy_helper.from_array(np.array([np.iinfo(np.int64).max], dtype=np.int64), names["end"]),
        numpy_helper.from_array(np.array([1], dtype=np.int64), names["axis"]),
    ])
    nodes = [
        helper.make_node("Neg", [LOGITS_TO_KEEP], [names["neg"]], name=f"{LOGITS_TO_KEEP}/Neg"),
        helper.make_node("Reshape", [names["neg"], names["shape"]], [names["start"]],
                         name=f"{LOGITS_TO_KEEP}/Reshape"),
        helper.make_node("Slice", [hidden, names["start"], names["end"], names["axis"]],
                         [names["out"]], name=f"{LOGITS_TO_KEEP}/Slice"),
    ]
    index = list(graph.node).index(head)
    for offset, node in enumerate(nodes):
        graph.node.insert(index + offset, node)
    head.input[0] = names["out"]
    # the tensors from the head to the logits no longer have S positions
    changed = {o for node in [head, *downstream] for o in node.output}
    kept = [v for v in graph.value_info if v.name not in changed]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    for output in graph.output:
        if output.name == sig.LOGITS:
            output.type.tensor_type.shape.dim[1].dim_param = _KEPT_DIM
