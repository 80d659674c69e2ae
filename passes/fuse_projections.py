"""``fuse-projections``: q/k/v into one linear, gate/up into one linear (graph pass, exact).

Linears of one layer that read the same input -- the attention's q, k and v projections, a gated
MLP's gate and up projections -- become one linear whose weights are theirs concatenated along
the output features, followed by a split: one matrix multiply (one ``MatMulNBits`` for quantized
layers) instead of three or two, which is what a decode step of a small model spends its time
launching. It works for every op that stores its weights by output feature (``modelfold.ir.rows``:
float ``aten.linear``, ``quant_linear``, ``nm_linear``, ``nm_quant_linear``, ``w8a8_linear``)
when the layers agree on everything else (bits, group size, N:M pattern). When the q/k/v outputs
feed one ``modelfold::attention`` op (``fuse-attention``), the op takes the packed q/k/v tensor
itself (GroupQueryAttention's packed-QKV input) and no split is left.

A group is left as it is, with the reason in the details, when a member is wrapped (a LoRA
adapter branch: export with ``lora=merge`` on a float base, which merges it first), its weight is
shared with another layer (layer tying), the members' formats differ, or they read different
inputs.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch.export import ExportedProgram

import modelfold.ir.attention  # noqa: F401  (defines torch.ops.modelfold.attention)
from modelfold.ir.graph import GraphEditor, GraphRewriteError, owned
from modelfold.ir.program import Program
from modelfold.ir.rows import row_wise
from modelfold.passes.base import GraphPass, PassConfig
from modelfold.passes.registry import register_pass

_ATTENTION = torch.ops.modelfold.attention.default
# role groups of one layer (architecture roles) and the name of the fused layer
GROUPS = ((("q", "k", "v"), "qkv_proj"), (("gate", "up"), "gate_up_proj"))


@dataclass(frozen=True)
class FuseProjectionsConfig(PassConfig):
    """No options."""


@register_pass
class FuseProjections(GraphPass):
    """q/k/v and gate/up linears of a layer -> one linear each (exact)."""

    name = "fuse-projections"
    config_class = FuseProjectionsConfig
    kind = "exact"
    summary = ("the q/k/v projections and the gate/up projections of each layer become one "
               "linear each (float, quantized, N:M); packed q/k/v feeds a fused attention")
    default_for: ClassVar[tuple[str, ...]] = ("onnxruntime",)
    order: ClassVar[int] = 20  # after fuse-attention

    def rewrite(self, program: Program, ep: ExportedProgram) -> tuple[ExportedProgram,
                                                                        dict[str, Any]]:
        editor = GraphEditor(ep)
        arch = program.arch
        fused, skipped = [], []
        for i in range(arch.num_layers):
            layer = arch.layer_path(i)
            for roles, name in GROUPS:
                paths = [arch.layer.attention_proj.get(r) or arch.layer.mlp_proj.get(r)
                         for r in roles]
                if not all(paths):
                    continue
                paths = [f"{layer}.{p}" for p in paths]
                try:
                    packed = _fuse(editor, paths, name)
                except GraphRewriteError as err:
                    skipped.append({"target": f"{layer} {'/'.join(roles)}", "reason": str(err)})
                    continue
                fused.append({"layers": paths, "as": f"{layer}.{_stem(paths)}.{name}",
                              "op": str(packed["op"]),
                              "packed_attention": packed["packed_attention"]})
        return editor.finish(), {"fused": fused, "skipped": skipped}


def _stem(paths: list[str]) -> str:
    """The module the fused layers sit in, relative to their layer (``self_attn``, ``mlp``)."""
    parent = paths[0].rsplit(".", 1)[0]
    return parent.rsplit(".", 1)[1]


def _single_node(editor: GraphEditor, path: str) -> torch.fx.Node:
    """The one linear node layer ``path`` captured to (GraphRewriteError otherwise)."""
    nodes = owned(editor, path)
    if not nodes:
        raise GraphRewriteError(f"no graph node belongs to {path}")
    if len(nodes) != 1:
        kinds = sorted({str(n.target) for n in nodes})
        wrapped = any(editor.owner(n).startswith(path + ".") for n in nodes)
        why = "it is wrapped (an adapter branch)" if wrapped else f"it computes {', '.join(kinds)}"
        raise GraphRewriteError(f"{path} is not one linear node: {why}")
    node = nodes[0]
    if row_wise(node.target) is None:
        raise GraphRewriteError(f"{path} computes {node.target}, which is not a linear with "
                                "weights stored by output feature")
    return node


def _fuse(editor: GraphEditor, paths: list[str], name: str) -> dict[str, Any]:
    nodes = [_single_node(editor, p) for p in paths]
    op = nodes[0].target
    if any(n.target != op for n in nodes):
        raise GraphRewriteError(f"the layers compute different ops "
                                f"({', '.join(sorted({str(n.target) for n in nodes}))})")
    x = nodes[0].args[0]
    if any(n.args[0] is not x for n in nodes):
        raise GraphRewriteError("the layers read different inputs")
    spec = row_wise(op)
    args = [list(n.args) for n in nodes]
    width = max(len(a) for a in args)
    args = [a + [None] * (width - len(a)) for a in args]
    sizes = [int(n.meta["val"].shape[-1]) for n in nodes]
    new_args: list[Any] = [x]
    for index in range(1, width):
        values = [a[index] for a in args]
        if index in spec.tensors or index == spec.bias:
            if all(v is None for v in values):
                new_args.append(None)
                continue
            tensors = []
            for v, size in zip(values, sizes):
                if v is None and index == spec.bias:  # a missing bias is a zero bias
                    tensors.append(torch.zeros(size))
                elif v is None or not editor.is_lifted(v):
                    raise GraphRewriteError(f"argument {index} is not a stored tensor in all "
                                            "layers")
                else:
                    if len(v.users) != 1:
                        raise GraphRewriteError(f"{editor.target_name(v)} is shared with "
                                                "another layer (tied)")
                    tensors.append(editor.tensor(v))
            axis = spec.tensors.get(index, 0)
            if len({tuple(t.shape[:axis] + t.shape[axis + 1:]) for t in tensors}) != 1 or \
                    len({t.dtype for t in tensors}) != 1:
                raise GraphRewriteError(f"argument {index} has different shapes or dtypes")
            joined = torch.cat([t.detach() for t in tensors], dim=axis).contiguous()
            arg_name = op._schema.arguments[index].name  # weight, qweight, scales ...
            stem = paths[0].rsplit(".", 1)[0]
            new_args.append(editor.add_tensor(f"{stem}.{name}.{arg_name}", joined))
        else:
            if any(v != values[0] for v in values[1:]):
                raise GraphRewriteError(f"the layers differ in argument {index} "
                                        f"({', '.join(map(str, values))})")
            new_args.append(values[0])
    while new_args and new_args[-1] is None and len(new_args) > len(nodes[0].args):
        new_args.pop()
    first = min(nodes, key=lambda n: list(editor.graph.nodes).index(n))
    fused = editor.call(op, tuple(new_args), near=first)
    attention = _attention_reading(nodes)
    if attention is not None:  # one GroupQueryAttention reads packed q/k/v
        new = editor.call(_ATTENTION, (fused, None, None, *attention.args[3:]), near=attention)
        editor.replace(attention, new)
        for node in nodes:
            editor.graph.erase_node(node)
        return {"op": op, "packed_attention": True}
    split = editor.call(torch.ops.aten.split_with_sizes.default, (fused, sizes, -1), near=first)
    parts = [editor.call(operator.getitem, (split, j), near=first) for j in range(len(nodes))]
    for node, part in zip(nodes, parts):  # after: replacing erases ``first``
        editor.replace(node, part)
    return {"op": op, "packed_attention": False}


def _attention_reading(nodes: list[torch.fx.Node]) -> torch.fx.Node | None:
    """The attention op that reads these three nodes as its q, k, v and nothing else does."""
    if len(nodes) != 3:
        return None
    users = {u for n in nodes for u in n.users}
    if len(users) != 1:
        return None
    user = users.pop()
    if user.target is not _ATTENTION or list(user.args[:3]) != nodes:
        return None
    return user


__all__ = ["FuseProjections", "FuseProjectionsConfig"]
