"""``tied-linear``: a linear that reads a weight tied to an embedding becomes
``modelfold::tied_linear`` (graph pass, exact).

Matches ``aten.linear(x, W[, b])`` nodes of the captured graph whose ``W`` is a lifted tensor that
an ``aten.embedding`` node reads too (a tied LM head), and replaces each with
``modelfold::tied_linear(x, W, b)``: the same function, lowered by ONNX Runtime's backend to
``FusedMatMul(x, W, transB=1)`` so the artifact stores the table once (see
``modelfold.ir.tied_linear``). The ONNX lowering applies it by default
(``ExportOptions.disable`` turns it off); a pipeline may name it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch.export import ExportedProgram

import modelfold.ir.tied_linear  # noqa: F401  (defines torch.ops.modelfold.tied_linear)
from modelfold.ir.graph import GraphEditor
from modelfold.ir.program import Program
from modelfold.passes.base import GraphPass, PassConfig
from modelfold.passes.registry import register_pass

_LINEAR = torch.ops.aten.linear.default
_EMBEDDING = torch.ops.aten.embedding.default


@dataclass(frozen=True)
class TiedLinearConfig(PassConfig):
    """No options."""


@register_pass
class TiedLinear(GraphPass):
    """Linears whose weight an embedding also reads -> modelfold::tied_linear (exact)."""

    name = "tied-linear"
    config_class = TiedLinearConfig
    kind = "exact"
    summary = ("a linear whose weight is tied to an embedding (a tied LM head) multiplies by the "
               "table's transpose without storing a transposed copy")
    default_for: ClassVar[tuple[str, ...]] = ("onnxruntime",)

    def rewrite(self, program: Program, ep: ExportedProgram) -> tuple[ExportedProgram,
                                                                        dict[str, Any]]:
        editor = GraphEditor(ep)
        rewritten = []
        for node in editor.calls(_LINEAR):
            weight = node.args[1]
            if not editor.is_lifted(weight) or \
                    not any(user.target is _EMBEDDING for user in weight.users):
                continue
            bias = node.args[2] if len(node.args) > 2 else None
            new = editor.call(torch.ops.modelfold.tied_linear.default, (node.args[0], weight, bias),
                              near=node)
            editor.replace(node, new)
            rewritten.append({"layer": editor.owner(new), "weight": editor.target_name(weight)})
        return editor.finish(), {"rewritten": rewritten}


__all__ = ["TiedLinear", "TiedLinearConfig"]
