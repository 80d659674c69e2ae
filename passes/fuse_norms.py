"""``fuse-norms``: residual add + RMSNorm / LayerNorm -> one op (graph pass, exact).

In a pre-norm decoder every sublayer's output is added to the residual stream and the sum is
normalized for the next sublayer (or the LM head). This pass replaces each such add and the norm
that reads it by ``modelfold::skip_rms_norm`` / ``modelfold::skip_layer_norm``
(``modelfold.ir.norms``), which return the normalized sum and the sum (the residual stream);
ONNX Runtime runs them as ``SkipSimplifiedLayerNormalization`` / ``SkipLayerNormalization``. The
layers' norms and the final norm are found in the architecture description; a norm whose input is
not a residual add (the first layer's, which reads the embedding) stays as it is.

A norm is fused when its module is an RMSNorm (``*RMSNorm`` with ``variance_epsilon`` / ``eps``;
Gemma's scale by ``1 + weight``, which becomes the weight) or an ``nn.LayerNorm``; the pass
manager (and the exporter, for the ONNX lowering's default run) checks that the logits do not
change.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.export import ExportedProgram

import modelfold.ir.norms  # noqa: F401  (defines the skip norm ops)
from modelfold.ir.graph import GraphEditor, GraphRewriteError, owned, region_inputs
from modelfold.ir.program import Program
from modelfold.passes.base import GraphPass, PassConfig
from modelfold.passes.registry import register_pass

_ADD = torch.ops.aten.add.Tensor
# Casts that return their input unchanged when the dtype already matches (the norms' x.float()).
_IDENTITIES = (torch.ops.aten.to.dtype, torch.ops.aten.type_as.default, torch.ops.aten.to.dtype_layout)


@dataclass(frozen=True)
class FuseNormsConfig(PassConfig):
    """No options."""


@register_pass
class FuseNorms(GraphPass):
    """Residual add + RMSNorm / LayerNorm -> skip_rms_norm / skip_layer_norm (exact)."""

    name = "fuse-norms"
    config_class = FuseNormsConfig
    kind = "exact"
    summary = ("each residual add and the norm that reads it become one op (ONNX: "
               "SkipSimplifiedLayerNormalization / SkipLayerNormalization)")
    default_for: ClassVar[tuple[str, ...]] = ("onnxruntime",)
    order: ClassVar[int] = 30
    exact_rtol: ClassVar[float] = 1e-6  # rsqrt(mean) vs ONNX's own norm: rounding only

    def rewrite(self, program: Program, ep: ExportedProgram) -> tuple[ExportedProgram,
                                                                        dict[str, Any]]:
        editor = GraphEditor(ep)
        arch = program.arch
        paths = [f"{arch.layer_path(i)}.{n}" for i in range(arch.num_layers)
                 for n in arch.layer.norms]
        if arch.final_norm:
            paths.append(arch.final_norm)
        fused, kept = [], []
        for path in paths:
            try:
                fused.append({"norm": path, "op": _fuse(editor, program.module, path)})
            except GraphRewriteError as err:
                kept.append({"target": path, "reason": str(err)})
        return editor.finish(), {"fused": fused, "not_fused": kept}


def _norm_kind(module: nn.Module) -> tuple[str, float, float]:
    """``(op, eps, weight offset)`` of a norm module (GraphRewriteError for other kinds)."""
    name = type(module).__name__
    if isinstance(module, nn.LayerNorm):
        if not module.elementwise_affine or len(module.normalized_shape) != 1:
            raise GraphRewriteError(f"{name} without a per-feature weight")
        return "layer", float(module.eps), 0.0
    if name.endswith("RMSNorm"):
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        if not isinstance(eps, float) or getattr(module, "weight", None) is None:
            raise GraphRewriteError(f"{name} has no float eps or no weight")
        return "rms", eps, 1.0 if name.startswith("Gemma") else 0.0
    raise GraphRewriteError(f"{name} is not an RMSNorm or LayerNorm")


def _lifted(editor: GraphEditor, name: str) -> torch.fx.Node:
    for node in editor.graph.nodes:
        if node.op == "placeholder" and editor.is_lifted(node) and editor.target_name(node) == name:
            return node
    raise GraphRewriteError(f"{name} is not a tensor of the graph")


def _fuse(editor: GraphEditor, model: nn.Module, path: str) -> str:
    module = model.get_submodule(path)
    kind, eps, offset = _norm_kind(module)
    region = owned(editor, path)
    if not region:
        raise GraphRewriteError(f"no graph node belongs to {path}")
    inputs = [n for n in region_inputs(region)
              if isinstance(n.meta.get("val"), torch.Tensor) and not editor.is_lifted(n)]
    if len(inputs) != 1:
        raise GraphRewriteError(f"the norm reads {len(inputs)} activations")
    add = inputs[0]
    if add.target is not _ADD or len(add.args) != 2 or add.kwargs or not all(
            isinstance(a, torch.fx.Node) and a.meta["val"].shape == add.meta["val"].shape
            for a in add.args):
        raise GraphRewriteError("its input is not a residual add")
    output = region[-1]
    inside = set(region)
    aliases = []  # region nodes read outside it other than the output: casts of the input
    for node in region[:-1]:
        outside = [u for u in node.users if u not in inside]
        if outside:
            if node.target not in _IDENTITIES or node.args[0] is not add or \
                    node.meta["val"].dtype != add.meta["val"].dtype:
                raise GraphRewriteError(f"{node.name} of the norm is read outside it")
            aliases.append(node)
    weight = _lifted(editor, f"{path}.weight")
    if offset:
        stored = editor.tensor(weight).detach()
        weight = editor.add_tensor(f"{path}.weight_plus_{offset:g}",
                                   (stored.float() + offset).to(stored.dtype))
    if kind == "rms":
        target, args = torch.ops.modelfold.skip_rms_norm.default, (*add.args, weight, eps)
    else:
        bias = _lifted(editor, f"{path}.bias") if module.bias is not None else None
        target, args = torch.ops.modelfold.skip_layer_norm.default, (*add.args, weight, bias, eps)
    fused = editor.call(target, args, near=add, after=True)
    normed = editor.call(operator.getitem, (fused, 0), near=fused, after=True)
    total = editor.call(operator.getitem, (fused, 1), near=normed, after=True)
    output.replace_all_uses_with(normed)
    for node in [add, *aliases]:
        for user in [u for u in node.users if u not in inside and u is not fused]:
            user.replace_input_with(node, total)
    editor.remove_unused(region)
    editor.remove_unused([add])
    return str(target)


__all__ = ["FuseNorms", "FuseNormsConfig"]
