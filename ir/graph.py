"""Rewriting the captured graph: one helper that owns the bookkeeping.

A graph pass (a fusion, a lowering step) matches ``call_function`` nodes of a
``torch.export.ExportedProgram``, replaces them, and may add or drop lifted tensors (parameters,
buffers, constants). ``GraphEditor`` does that on a copy of the graph and returns a new
``ExportedProgram`` whose placeholders, graph signature, state dict and constants agree; the
source program is never modified, so the Program's verified graph stays what it was.

    editor = GraphEditor(ep)
    for node in editor.calls(torch.ops.aten.linear.default):
        weight = editor.tensor(node.args[1])            # the lifted tensor behind a placeholder
        new_w = editor.add_tensor("fused_weight", w2)   # a new lifted tensor (a placeholder)
        new = editor.call(torch.ops.aten.linear.default, (node.args[0], new_w), near=node)
        editor.replace(node, new)
    ep2 = editor.finish()                               # dead nodes and unused tensors removed

New nodes get the owning module (``nn_module_stack``) of the node they replace and a
``meta["val"]`` computed on fake tensors, as torch.export would have written it (the ONNX exporter
reads both).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.export import ExportedProgram
from torch.export.graph_signature import (
    ExportGraphSignature,
    InputKind,
    InputSpec,
    OutputSpec,
    TensorArgument,
)

from modelfold.errors import ModelfoldError
from modelfold.ir.signature import WRAPPED_PREFIX

_LIFTED = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)
_COPIED_META = ("nn_module_stack", "stack_trace", "source_fn_stack", "from_node", "torch_fn")


class GraphRewriteError(ModelfoldError, RuntimeError):
    """A graph rewrite could not be applied (a pattern's assumption did not hold)."""


def runnable(ep: ExportedProgram) -> torch.fx.GraphModule:
    """A callable ``GraphModule`` of ``ep`` without its input range checks.

    torch.export records the example-derived ranges (past_sequence >= 0 but total_sequence >= 4,
    sizes >= 2 elsewhere); the captured graph is correct at the sizes a prefill (P = 0) and a
    decode step (S = 1) use, so the check that would refuse them is removed.
    """
    gm = ep.module(check_guards=False)
    for key, hook in list(gm._forward_pre_hooks.items()):
        if getattr(hook, "__name__", "") == "_check_input_constraints_pre_hook":
            del gm._forward_pre_hooks[key]
    return gm


def module_path(target: str) -> str:
    """Module-level name of a lifted tensor (``model.model.embed_tokens.weight`` ->
    ``model.embed_tokens.weight``): state-dict names of the signature wrapper carry its prefix."""
    return target.removeprefix(WRAPPED_PREFIX)


def calls(ep_or_graph: ExportedProgram | torch.fx.Graph, target: Any = None
          ) -> list[torch.fx.Node]:
    """The ``call_function`` nodes of a graph (those calling ``target`` if given)."""
    graph = ep_or_graph.graph if isinstance(ep_or_graph, ExportedProgram) else ep_or_graph
    return [n for n in graph.nodes if n.op == "call_function"
            and (target is None or n.target == target or _packet(n.target) == target)]


def _packet(target: Any) -> Any:
    return getattr(target, "overloadpacket", None)


class GraphEditor:
    """Edits a copy of an ``ExportedProgram``'s graph; ``finish()`` returns the new program.

    Args:
        ep: the program to start from (left unchanged).
    """

    def __init__(self, ep: ExportedProgram):
        self.source = ep
        self.graph = torch.fx.Graph()
        env: dict[torch.fx.Node, torch.fx.Node] = {}
        out = self.graph.graph_copy(ep.graph, env)
        output = self.graph.output(out)
        old_output = next(n for n in ep.graph.nodes if n.op == "output")
        output.meta = copy.copy(old_output.meta)
        renamed = [(old.name, new.name) for old, new in env.items() if old.name != new.name]
        if renamed:  # the specs name nodes; graph_copy keeps names in a fresh graph
            raise GraphRewriteError(f"copying the graph renamed nodes: {renamed[:3]}")
        self.input_specs = [copy.copy(s) for s in ep.graph_signature.input_specs]
        self.output_specs = list(ep.graph_signature.output_specs)
        self.state_dict: dict[str, torch.Tensor] = dict(ep.state_dict)
        self.constants: dict[str, Any] = dict(ep.constants)
        # lifted tensors nothing read before the edit stay (only what the edit orphans goes)
        self._unused = {n.name for n in self.graph.nodes if n.op == "placeholder" and not n.users}
        self._fake_mode = torch._guards.detect_fake_mode(
            [n.meta["val"] for n in self.graph.nodes if n.op == "placeholder" and "val" in n.meta])
        self.changed = False

    # -- reading ---------------------------------------------------------------------------
    def calls(self, target: Any = None) -> list[torch.fx.Node]:
        """``call_function`` nodes (calling ``target`` if given), in graph order."""
        return calls(self.graph, target)

    def spec(self, node: torch.fx.Node) -> InputSpec | None:
        """The input spec of a placeholder node (None for other nodes)."""
        if not isinstance(node, torch.fx.Node) or node.op != "placeholder":
            return None
        return next((s for s in self.input_specs
                     if isinstance(s.arg, TensorArgument) and s.arg.name == node.name), None)

    def is_lifted(self, node: Any) -> bool:
        """Whether ``node`` is a parameter, buffer or constant placeholder."""
        spec = self.spec(node)
        return spec is not None and spec.kind in _LIFTED

    def tensor(self, node: torch.fx.Node) -> torch.Tensor:
        """The value of a lifted placeholder (parameter, buffer or constant tensor)."""
        spec = self.spec(node)
        if spec is None or spec.kind not in _LIFTED:
            raise GraphRewriteError(f"node {getattr(node, 'name', node)!r} is not a lifted tensor")
        if spec.kind == InputKind.CONSTANT_TENSOR or spec.target not in self.state_dict:
            return self.constants[spec.target]  # (non-persistent buffers live there too)
        return self.state_dict[spec.target]

    def target_name(self, node: torch.fx.Node) -> str:
        """Module-level name of a lifted placeholder's tensor (``lm_head.weight``)."""
        spec = self.spec(node)
        if spec is None or spec.target is None:
            raise GraphRewriteError(f"node {getattr(node, 'name', node)!r} is not a lifted tensor")
        return module_path(spec.target)

    @staticmethod
    def owner(node: torch.fx.Node) -> str:
        """Module path that produced ``node`` (see ``modelfold.ir.capture.owning_module``)."""
        from modelfold.ir.capture import owning_module

        return owning_module(node)

    # -- writing ---------------------------------------------------------------------------
    def add_tensor(self, name: str, tensor: torch.Tensor) -> torch.fx.Node:
        """A new lifted tensor: a placeholder named after ``name`` (made unique), a parameter
        (float) or persistent buffer (integer) in the state dict."""
        target = WRAPPED_PREFIX + name
        base, i = target, 1
        while target in self.state_dict or target in self.constants:
            target, i = f"{base}_{i}", i + 1
        user_inputs = [n for n in self.graph.nodes if n.op == "placeholder"
                       and not self.is_lifted(n)]
        lifted = [n for n in self.graph.nodes if n.op == "placeholder" and self.is_lifted(n)]
        anchor = user_inputs[0] if user_inputs else None
        with (self.graph.inserting_before(anchor) if anchor is not None
              else self.graph.inserting_after(lifted[-1])):
            node = self.graph.placeholder("p_" + target.replace(".", "_"))
        tensor = tensor.detach()
        if tensor.is_floating_point():
            kind, value, persistent = InputKind.PARAMETER, nn.Parameter(tensor, False), None
        else:
            kind, value, persistent = InputKind.BUFFER, tensor, True
        node.meta["val"] = self._fake(tensor)
        spec = InputSpec(kind=kind, arg=TensorArgument(name=node.name), target=target,
                         persistent=persistent)
        position = len([s for s in self.input_specs if s.kind in _LIFTED])
        self.input_specs.insert(position, spec)
        self.state_dict[target] = value
        self.changed = True
        return node

    def retype(self, placeholder: torch.fx.Node, dtype: torch.dtype) -> None:
        """Give a user input another dtype (same shape): the graph now takes it so (a past cache
        stored as int8)."""
        if placeholder.op != "placeholder" or self.is_lifted(placeholder):
            raise GraphRewriteError(f"{placeholder.name} is not a user input")
        val = placeholder.meta["val"]
        if self._fake_mode is not None:
            with self._fake_mode:
                placeholder.meta["val"] = val.to(dtype)
        else:
            placeholder.meta["val"] = val.to(dtype)
        self.changed = True

    def call(self, target: Callable, args: tuple, kwargs: dict | None = None, *,
             near: torch.fx.Node, after: bool = False) -> torch.fx.Node:
        """A new ``call_function`` node next to ``near`` (before it unless ``after``), owned by
        the same module, with ``meta["val"]`` from running ``target`` on fake tensors."""
        kwargs = kwargs or {}
        where = self.graph.inserting_after(near) if after else self.graph.inserting_before(near)
        with where:
            node = self.graph.call_function(target, args, kwargs)
        for key in _COPIED_META:
            if key in near.meta:
                node.meta[key] = near.meta[key]
        node.meta["val"] = self._fake_value(target, args, kwargs)
        self.changed = True
        return node

    def replace(self, old: torch.fx.Node, new: torch.fx.Node) -> None:
        """Point every user of ``old`` at ``new`` and remove ``old``."""
        old.replace_all_uses_with(new)
        self.graph.erase_node(old)
        self.changed = True

    def remove_unused(self, nodes: list[torch.fx.Node]) -> None:
        """Erase the nodes of ``nodes`` that nothing reads any more, latest first (what a rewrite
        replaced; ``finish``'s dead-code pass keeps ops torch marks impure, such as
        ``scaled_dot_product_attention`` with its dropout)."""
        for node in reversed(nodes):
            if node.graph is self.graph and not node.users and node.op == "call_function":
                self.graph.erase_node(node)
                self.changed = True

    def prune(self) -> None:
        """Remove nodes whose results nothing uses (after a rewrite made them dead)."""
        self.graph.eliminate_dead_code()

    def finish(self) -> ExportedProgram:
        """The edited program: dead nodes removed, lifted tensors the edit left unused dropped from
        the graph, the signature, the state dict and the constants; lint-checked."""
        if not self.changed:
            return self.source
        self.graph.eliminate_dead_code()
        for node in [n for n in self.graph.nodes if n.op == "placeholder"]:
            if not node.users and self.is_lifted(node) and node.name not in self._unused:
                spec = self.spec(node)
                self.input_specs.remove(spec)
                self.graph.erase_node(node)
        used = {s.target for s in self.input_specs if s.kind in _LIFTED}
        self.state_dict = {k: v for k, v in self.state_dict.items() if k in used}
        self.constants = {k: v for k, v in self.constants.items() if k in used}
        self.graph.lint()
        gm = torch.fx.GraphModule(self.source.graph_module, self.graph)
        src = self.source
        output = next(n for n in self.graph.nodes if n.op == "output")
        outputs = [OutputSpec(kind=s.kind, target=s.target,
                              arg=TensorArgument(name=a.name) if isinstance(s.arg, TensorArgument)
                              else s.arg)
                   for s, a in zip(self.output_specs, output.args[0])]
        with warnings.catch_warnings():  # deepcopy of pytree specs warns about LeafSpec
            warnings.simplefilter("ignore", FutureWarning)
            call_graph = copy.deepcopy(src.module_call_graph)
        return ExportedProgram(
            root=gm, graph=gm.graph,
            graph_signature=ExportGraphSignature(self.input_specs, outputs),
            state_dict=self.state_dict, range_constraints=copy.deepcopy(src.range_constraints),
            module_call_graph=call_graph,
            example_inputs=src.example_inputs, constants=self.constants,
            verifiers=src.verifiers)

    # -- fake values -----------------------------------------------------------------------
    def _fake(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._fake_mode is None:
            return tensor
        return self._fake_mode.from_tensor(tensor, static_shapes=True)

    def _fake_value(self, target: Callable, args: tuple, kwargs: dict) -> Any:
        def val(a: Any) -> Any:
            return a.meta["val"] if isinstance(a, torch.fx.Node) else a

        fargs = torch.fx.node.map_aggregate(args, val)
        fkwargs = torch.fx.node.map_aggregate(kwargs, val)
        if self._fake_mode is None:
            return target(*fargs, **fkwargs)
        with self._fake_mode:
            return target(*fargs, **fkwargs)


def user_inputs(graph_or_editor: GraphEditor | ExportedProgram, names: tuple[str, ...]
                ) -> dict[str, torch.fx.Node]:
    """The user-input placeholders of a graph by signature name (``names``: the signature's
    inputs, in order; torch.export names the flat past tensors ``past_0``, ``past_1`` ...)."""
    if isinstance(graph_or_editor, GraphEditor):
        specs, graph = graph_or_editor.input_specs, graph_or_editor.graph
    else:
        specs, graph = graph_or_editor.graph_signature.input_specs, graph_or_editor.graph
    by_name = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    users = [by_name[s.arg.name] for s in specs if s.kind == InputKind.USER_INPUT]
    if len(users) != len(names):
        raise GraphRewriteError(f"the graph takes {len(users)} inputs, the signature "
                                f"{len(names)}")
    return dict(zip(names, users))


def past_dtype(ep: ExportedProgram, signature: Any) -> torch.dtype | None:
    """The dtype of a decoder graph's past keys/values (None for an encoder)."""
    if not signature.past_names:
        return None
    past = user_inputs(ep, signature.inputs)[signature.past_names[0]]
    return past.meta["val"].dtype


def owned(editor: GraphEditor, path: str, *, subtree: bool = True) -> list[torch.fx.Node]:
    """The ``call_function`` nodes module ``path`` produced (with its submodules' if
    ``subtree``), in graph order."""
    return [n for n in editor.calls()
            if (o := editor.owner(n)) == path or (subtree and o.startswith(path + "."))]


def region_inputs(nodes: list[torch.fx.Node]) -> list[torch.fx.Node]:
    """Nodes outside ``nodes`` that nodes in it read, in order of first use."""
    inside = set(nodes)
    seen: dict[torch.fx.Node, None] = {}
    for node in nodes:
        for arg in node.all_input_nodes:
            if arg not in inside:
                seen.setdefault(arg, None)
    return list(seen)


def ancestors(node: torch.fx.Node) -> set[torch.fx.Node]:
    """Every node ``node`` depends on (itself included)."""
    found, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n not in found:
            found.add(n)
            todo.extend(n.all_input_nodes)
    return found


def evaluate(editor: GraphEditor, node: torch.fx.Node, feeds: dict[torch.fx.Node, Any]) -> Any:
    """The value of ``node`` computed from ``feeds`` (placeholder -> value) and the lifted
    tensors: runs the part of the graph ``node`` depends on, eagerly.

    Raises:
        GraphRewriteError: ``node`` depends on a user input not in ``feeds``.
    """
    needed = ancestors(node)
    env: dict[torch.fx.Node, Any] = {}
    for n in editor.graph.nodes:
        if n not in needed:
            continue
        if n.op == "placeholder":
            if n in feeds:
                env[n] = feeds[n]
            elif editor.is_lifted(n):
                env[n] = editor.tensor(n)
            else:
                raise GraphRewriteError(f"{node.name} depends on the input {n.name}")
        elif n.op == "call_function":
            args = torch.fx.node.map_arg(n.args, lambda a: env[a])
            kwargs = torch.fx.node.map_arg(n.kwargs, lambda a: env[a])
            env[n] = n.target(*args, **kwargs)
    return env[node]


def nodes_by_owner(editor: GraphEditor) -> dict[str, list[tuple[int, torch.fx.Node]]]:
    """Owning module path -> its ``(graph position, node)`` pairs, in graph order."""
    owned: dict[str, list[tuple[int, torch.fx.Node]]] = {}
    for position, node in enumerate(editor.calls()):
        owned.setdefault(editor.owner(node), []).append((position, node))
    return owned


def layer_io(owned: dict[str, list[tuple[int, torch.fx.Node]]], path: str
              ) -> tuple[torch.fx.Node, torch.fx.Node, torch.fx.Node]:
    """``(input, base output, layer output)`` of a wrapper layer at ``path`` in the graph (a
    ``LoraLinear``): the wrapped layer's nodes are owned by ``path.base_layer`` (one linear or
    dialect op, or GPT-2 Conv1D's view-addmm-view), what the wrapper adds by ``path`` itself."""
    prefix = f"{path}.base_layer"
    base = sorted((item for owner, items in owned.items()
                   if owner == prefix or owner.startswith(prefix + ".") for item in items),
                  key=lambda item: item[0])
    if not base:
        raise GraphRewriteError(f"no graph node belongs to {prefix}; the LoRA layer did not "
                                "capture as expected")
    x = next((a for _, n in base for a in n.args[:1] if isinstance(a, torch.fx.Node)), None)
    if x is None:
        raise GraphRewriteError(f"cannot find the input of {prefix} in the graph")
    own = owned.get(path, [])
    base_out = base[-1][1]
    return x, base_out, own[-1][1] if own else base_out


__all__ = ["GraphEditor", "GraphRewriteError", "ancestors", "calls", "evaluate", "layer_io",
           "module_path", "nodes_by_owner", "owned", "region_inputs", "runnable", "user_inputs"]
