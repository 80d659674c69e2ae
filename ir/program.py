"""``Program``: the object every pass receives and returns.

The ``nn.Module`` is the source of truth for parameters and structure. The
``torch.export.ExportedProgram`` is derived from it: captured once with the signature the backends
run (``modelfold.ir.signature``: a KV-cache decoder, or an encoder), re-captured lazily after a
module pass changes the module (``invalidate()``), with every graph pass applied so far replayed
on the new capture. The pass manager verifies that graph after every pass, and the backends lower
it (the ONNX exporter takes the very ``ExportedProgram`` object that was verified last).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.export import ExportedProgram

from modelfold.ir.architecture import Architecture, describe
from modelfold.ir.capture import capture, owning_module
from modelfold.ir.signature import Signature, signature_for
from modelfold.ir.tying import parameter_names

if TYPE_CHECKING:
    from modelfold.passes.base import GraphPass

DIALECT_NAMESPACE = "modelfold"


@dataclass
class PassRecord:
    """One applied pass: its name, options and measured effects (filled by the pass manager)."""

    name: str
    options: dict[str, Any]
    kind: str
    seconds: float = 0.0
    params_before: int = 0
    params_after: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    fidelity: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)
    level: str = "module"


class Program:
    """A model under compilation.

    Args:
        module: the model (a Hugging Face ``PreTrainedModel``).
        tokenizer: optional; used for calibration data and copied into exported artifacts.
        source: where the model came from (a directory), recorded in manifests.

    Attributes:
        graph_passes: the graph passes applied so far, in order; replayed on every re-capture.
        verified_graph: the ``ExportedProgram`` the last verification ran on (None before one).
        captures: how many times the module was captured (a backend that lowers the verified
            graph does not add one).
    """

    def __init__(self, module: nn.Module, *, tokenizer: Any = None, source: str | None = None):
        self.module = module.eval()
        self.arch: Architecture = describe(module)
        self.tokenizer = tokenizer
        self.source = source
        self.log: list[PassRecord] = []
        self.analyses: dict[str, dict[str, Any]] = {}
        self.graph_passes: list[GraphPass] = []
        # passes a PassContext disabled: the backends' default graph passes skip them too
        self.disabled: set[str] = set()
        self.verified_graph: ExportedProgram | None = None
        self.captures = 0
        # how the decoder layers are held: None (in memory) or a streaming run's residency
        self.residency: Any = None
        self._signature: Signature | None = None
        self._exported: ExportedProgram | None = None
        self._graph_module: tuple[int, torch.fx.GraphModule] | None = None

    # -- derived state -------------------------------------------------------------------------
    @property
    def signature(self) -> Signature:
        """Inputs and outputs of the captured graph (read from the module: layers, KV heads)."""
        if self._signature is None:
            self._signature = signature_for(self.module)
        return self._signature

    @property
    def exported(self) -> ExportedProgram:
        """The captured graph with the graph passes applied; captured on first use after
        ``invalidate()``."""
        if self._exported is None:
            ep = capture(self.module, self.signature)
            self.captures += 1
            for graph_pass in self.graph_passes:
                ep, _ = graph_pass.rewrite(self, ep)
            self._exported = ep
        return self._exported

    @property
    def is_captured(self) -> bool:
        return self._exported is not None

    def apply_graph_pass(self, graph_pass: GraphPass) -> dict[str, Any]:
        """Rewrite the current graph with ``graph_pass`` and keep it for later re-captures;
        returns the pass's details."""
        ep, details = graph_pass.rewrite(self, self.exported)
        self.graph_passes.append(graph_pass)
        self._exported = ep
        self.verified_graph = None
        return details

    def converted(self, *, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> Program:
        """This program on another device / in another float dtype: a copy of the module moved
        there (integer storage such as packed weights keeps its dtype; tied tensors stay tied),
        with the same graph passes, captured there when its graph is needed."""
        import copy

        module = copy.deepcopy(self.module).to(device=device, dtype=dtype)
        other = Program(module, tokenizer=self.tokenizer, source=self.source)
        other.log = list(self.log)
        other.graph_passes = list(self.graph_passes)
        other.disabled = set(self.disabled)
        return other

    def invalidate(self, *, keep_analyses: bool = False) -> None:
        """Call after changing the module: drops the graph and re-reads the architecture.

        Analyses describe the old module, so they are dropped too unless ``keep_analyses``.
        """
        self._exported = None
        self._signature = None
        self.verified_graph = None
        self.arch = describe(self.module)
        if not keep_analyses:  # "_"-prefixed entries are run bookkeeping, not analyses
            self.analyses = {k: v for k, v in self.analyses.items() if k.startswith("_")}

    def graph_module(self) -> torch.fx.GraphModule:
        """The current graph as a callable module (inputs and outputs in signature order)."""
        from modelfold.ir.graph import runnable

        ep = self.exported
        if self._graph_module is None or self._graph_module[0] != id(ep):
            self._graph_module = (id(ep), runnable(ep))
        return self._graph_module[1]

    def node_modules(self) -> dict[str, str]:
        """Graph node name -> owning module path (``model.layers.3.self_attn.q_proj``)."""
        return {n.name: owning_module(n) for n in self.exported.graph.nodes
                if n.op == "call_function"}

    def module_nodes(self) -> dict[str, list[str]]:
        """Module path -> names of the graph nodes it produced."""
        index: dict[str, list[str]] = defaultdict(list)
        for node, path in self.node_modules().items():
            index[path].append(node)
        return dict(index)

    def parameter_aliases(self) -> dict[str, list[str]]:
        """Canonical parameter name -> every name it appears under (tied weights share one)."""
        return {names[0]: names for names in parameter_names(self.module).values()}

    def unique_tensors(self) -> list[torch.Tensor]:
        seen: dict[int, torch.Tensor] = {}
        for t in [*self.module.parameters(), *self.module.buffers()]:
            seen.setdefault(id(t), t)
        return list(seen.values())

    def parameter_count(self) -> int:
        """Number of unique parameters (tied weights counted once)."""
        return sum(p.numel() for p in {id(p): p for p in self.module.parameters()}.values())

    def parameter_bytes(self) -> int:
        """Bytes of unique parameters and persistent buffers (what a checkpoint stores)."""
        persistent = {id(t) for t in self.module.state_dict(keep_vars=True).values()}
        return sum(t.numel() * t.element_size() for t in self.unique_tensors()
                   if id(t) in persistent)

    def parameter_breakdown(self) -> dict[str, dict[str, int]]:
        """Unique parameters and bytes per part: embeddings, attention, mlp, norms, lm_head, other.

        A tied LM head shares the embedding tensor and is counted once, under embeddings.
        """
        arch = self.arch
        layer_prefix = arch.layers + "."
        attn, mlp = arch.layer.attention + ".", (arch.layer.mlp + ".") if arch.layer.mlp else None
        mlp_paths = tuple(p + "." for p in arch.layer.mlp_proj.values())
        norms = tuple(n + "." for n in arch.layer.norms)

        def part(name: str) -> str:
            if any(name.startswith(e + ".") for e in arch.embeddings):
                return "embeddings"
            if arch.lm_head and name.startswith(arch.lm_head + "."):
                return "lm_head"
            if arch.final_norm and name.startswith(arch.final_norm + "."):
                return "norms"
            if name.startswith(layer_prefix):
                rest = name[len(layer_prefix):].partition(".")[2]
                if rest.startswith(norms):
                    return "norms"
                if rest.startswith(attn):
                    return "attention"
                if (mlp and rest.startswith(mlp)) or rest.startswith(mlp_paths):
                    return "mlp"
                return "layers (other)"
            return "other"

        out: dict[str, dict[str, int]] = {}
        for name, p in {n: p for n, p in self.module.named_parameters()}.items():
            entry = out.setdefault(part(name), {"parameters": 0, "bytes": 0})
            entry["parameters"] += p.numel()
            entry["bytes"] += p.numel() * p.element_size()
        return out

    def dialect_ops(self) -> Counter:
        """Count of ``modelfold::`` dialect ops in the captured graph."""
        counts: Counter = Counter()
        for node in self.exported.graph.nodes:
            if node.op == "call_function" and hasattr(node.target, "namespace") \
                    and node.target.namespace == DIALECT_NAMESPACE:
                counts[str(node.target.name())] += 1
        return counts

    def dataflow(self):
        """Module-level dataflow graph (networkx ``DiGraph``); see ``modelfold.ir.dataflow``."""
        from modelfold.ir.dataflow import dataflow_graph

        return dataflow_graph(self)

    # -- running -------------------------------------------------------------------------------
    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, S, V]`` (last hidden state for encoders) of the program.

        Without graph passes the module runs eagerly (it is what the graph was captured from);
        once a graph pass has rewritten the graph, the graph itself runs.
        """
        if self.graph_passes:
            return self.graph_logits(input_ids)
        return self.module_logits(input_ids)

    @torch.no_grad()
    def module_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits of the eager module (forward hooks on its layers see the call: calibration)."""
        if self.arch.kind == "encoder":
            from modelfold.ir.signature import Encoder

            return Encoder(self.module)(*self.encoder_inputs(input_ids))
        return self.module(input_ids=input_ids, use_cache=False).logits

    @torch.no_grad()
    def graph_logits(self, input_ids: torch.Tensor, ep: ExportedProgram | None = None, *,
                     all_experts: bool = False) -> torch.Tensor:
        """Logits of the captured graph (or of ``ep``, a graph derived from it) for
        ``input_ids`` ``[B, S]`` (no padding, empty cache). ``all_experts``: every MoE layer
        routes each token to all its experts (``ir.moe.route_all_experts``), for comparing two
        graphs where top-k routing would make a rounding difference discontinuous."""
        from modelfold.ir.graph import past_dtype, runnable
        from modelfold.ir.moe import route_all_experts, routing_nodes
        from modelfold.ir.signature import graph_inputs

        sig = self.signature
        ep = self.exported if ep is None else ep
        args = self.encoder_inputs(input_ids) if sig.kind == "encoder" \
            else graph_inputs(sig, input_ids, cache_dtype=past_dtype(ep, sig))
        pin = all_experts and bool(routing_nodes(ep.graph))  # a copy only where it routes
        gm = self.graph_module() if ep is self._exported and not pin else runnable(ep)
        if pin:
            route_all_experts(gm)
        out = gm(*args)
        return out[0] if isinstance(out, (tuple, list)) else out

    def encoder_inputs(self, input_ids: torch.Tensor) -> list[torch.Tensor]:
        from modelfold.ir.signature import TOKEN_TYPE_IDS

        args = [input_ids, torch.ones_like(input_ids)]
        if TOKEN_TYPE_IDS in self.signature.inputs:
            args.append(torch.zeros_like(input_ids))
        return args

    def summary(self) -> dict[str, Any]:
        return {"family": self.arch.family, "kind": self.arch.kind,
                "layers": self.arch.num_layers, "parameters": self.parameter_count(),
                "bytes": self.parameter_bytes(), "passes": [r.name for r in self.log]}
