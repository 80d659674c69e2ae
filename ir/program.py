"""``Program``: the object every pass receives and returns.

The ``nn.Module`` is the source of truth for parameters and structure. The
``torch.export.ExportedProgram`` is derived from it lazily and re-captured after a pass changes
the module (``invalidate()``), together with the node <-> module index.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.export import ExportedProgram

from modelfold.ir.architecture import Architecture, describe
from modelfold.ir.capture import ExportSpec, capture, owning_module
from modelfold.ir.tying import parameter_names

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


class Program:
    """A model under compilation.

    Args:
        module: the model (a Hugging Face ``PreTrainedModel``).
        spec: how to call it for capture; defaults to ``input_ids [2, 8]`` with dynamic dims.
        tokenizer: optional; used for calibration data and copied into exported artifacts.
        source: where the model came from (a directory), recorded in manifests.
    """

    def __init__(self, module: nn.Module, *, spec: ExportSpec | None = None,
                 tokenizer: Any = None, source: str | None = None):
        self.module = module.eval()
        self.arch: Architecture = describe(module)
        self.spec = spec or ExportSpec.for_model(module, self.arch.kind)
        self.tokenizer = tokenizer
        self.source = source
        self.log: list[PassRecord] = []
        self.analyses: dict[str, dict[str, Any]] = {}
        self._exported: ExportedProgram | None = None

    # -- derived state -------------------------------------------------------------------------
    @property
    def exported(self) -> ExportedProgram:
        """The captured graph; re-captured on first use after ``invalidate()``."""
        if self._exported is None:
            self._exported = capture(self.module, self.spec)
        return self._exported

    @property
    def is_captured(self) -> bool:
        return self._exported is not None

    def invalidate(self, *, keep_analyses: bool = False) -> None:
        """Call after changing the module: drops the graph and re-reads the architecture.

        Analyses describe the old module, so they are dropped too unless ``keep_analyses``.
        """
        self._exported = None
        self.arch = describe(self.module)
        if not keep_analyses:  # "_"-prefixed entries are run bookkeeping, not analyses
            self.analyses = {k: v for k, v in self.analyses.items() if k.startswith("_")}

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
        """Eager forward of the module: logits ``[B, S, V]`` (last hidden state for encoders)."""
        if self.arch.kind == "encoder":
            out = self.module(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
            return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return self.module(input_ids=input_ids, use_cache=False).logits

    def summary(self) -> dict[str, Any]:
        return {"family": self.arch.family, "kind": self.arch.kind,
                "layers": self.arch.num_layers, "parameters": self.parameter_count(),
                "bytes": self.parameter_bytes(), "passes": [r.name for r in self.log]}
