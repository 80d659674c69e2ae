"""How dialect ops become Triton-kernel ops: a graph rewrite that each dialect's lowering
module extends.

``lower(ep, module)`` rewrites a copy of the captured graph:

1. layer lowerings (``@register_layer_lowering(cls)``) run first, once per module of that class
   (``LoraLinear``: its base op and adapter branches fuse into one kernel call);
2. node lowerings (``@register_node_lowering("modelfold::op")``) then replace every remaining
   dialect node with the matching ``modelfold_triton::*`` op (``modelfold.kernels.ops``).

Everything else (float linears, norms, attention) stays ATen for Inductor. Lowerings live in this
package's ``*_lowering.py`` modules (one per dialect) and are found by name; other packages add
theirs through the "modelfold.triton_lowerings" entry-point group.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.export import ExportedProgram

from modelfold.ir.graph import GraphEditor, nodes_by_owner

NodeLowering = Callable[["TritonLowering", torch.fx.Node], None]
LayerLowering = Callable[["TritonLowering", str, nn.Module], None]

_NODE_LOWERINGS: dict[str, NodeLowering] = {}
_LAYER_LOWERINGS: list[tuple[type[nn.Module], LayerLowering]] = []


def register_node_lowering(op: str) -> Callable[[NodeLowering], NodeLowering]:
    """Decorator: ``fn(ctx, node)`` rewrites every node calling dialect op ``op`` ("ns::name")."""
    def decorate(fn: NodeLowering) -> NodeLowering:
        _NODE_LOWERINGS[op] = fn
        return fn
    return decorate


def register_layer_lowering(cls: type[nn.Module]) -> Callable[[LayerLowering], LayerLowering]:
    """Decorator: ``fn(ctx, path, module)`` runs for every module of class ``cls`` first."""
    def decorate(fn: LayerLowering) -> LayerLowering:
        _LAYER_LOWERINGS.append((cls, fn))
        return fn
    return decorate


class TritonLowering:
    """State of one lowering: the graph editor, the module the graph was captured from (its
    layers give values such as LoRA factors), the nodes by owning module, and the kernel chosen
    for each layer (``kernels``: path -> kernel name)."""

    def __init__(self, ep: ExportedProgram, module: nn.Module):
        self.editor = GraphEditor(ep)
        self.module = module
        self.owned = nodes_by_owner(self.editor)
        self.kernels: dict[str, str] = {}

    @property
    def ops(self) -> Any:
        return torch.ops.modelfold_triton

    def tensor(self, name: str, value: torch.Tensor) -> torch.fx.Node:
        """A new lifted tensor (contiguous, detached) in the lowered graph."""
        return self.editor.add_tensor(name, value.detach().contiguous())

    def replace(self, node: torch.fx.Node, target: Any, args: tuple, kernel: str) -> torch.fx.Node:
        """Replace ``node`` by a call of ``target`` and record ``kernel`` for its layer."""
        new = self.editor.call(target, args, near=node)
        self.editor.replace(node, new)
        self.kernels[self.editor.owner(new)] = kernel
        return new


def lower(ep: ExportedProgram, module: nn.Module) -> tuple[ExportedProgram, dict[str, str]]:
    """The graph with its dialect ops on Triton kernels, and ``{layer path: kernel}``."""
    from modelfold.discovery import import_all

    import_all("modelfold.backends.triton", suffix="_lowering", group="modelfold.triton_lowerings")
    ctx = TritonLowering(ep, module)
    for cls, fn in _LAYER_LOWERINGS:
        for path, sub in module.named_modules():
            if type(sub) is cls:
                fn(ctx, path, sub)
    ctx.editor.prune()
    for node in ctx.editor.calls():
        fn = _NODE_LOWERINGS.get(_op_name(node.target))
        if fn is not None:
            fn(ctx, node)
    return ctx.editor.finish(), dict(sorted(ctx.kernels.items()))


def _op_name(target: Any) -> str:
    name = getattr(target, "name", None)
    return name() if callable(name) else ""


__all__ = ["TritonLowering", "lower", "register_layer_lowering", "register_node_lowering"]
