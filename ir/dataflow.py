"""Module-level dataflow view of a captured program, as a ``networkx.DiGraph``.

Nodes are the parts the architecture description names (embeddings, each layer's attention,
MLP and norms, the final norm, the LM head) plus each layer's own residual arithmetic (one node
per run of consecutive ops, ``model.layers.3.residual_1``, so the graph stays acyclic); an edge
``a -> b`` means some graph node owned by ``b`` reads a value produced under ``a``. So residual
connections show up as skip edges, and a dropped layer disappears from the chain.
"""

from __future__ import annotations

import html
from typing import TYPE_CHECKING

import networkx as nx

from modelfold.ir.capture import owning_module

if TYPE_CHECKING:
    from modelfold.ir.program import Program


def _components(program: Program) -> dict[str, str]:
    """Component path -> kind."""
    arch = program.arch
    comps: dict[str, str] = {e: "embedding" for e in arch.embeddings}
    if arch.final_norm:
        comps[arch.final_norm] = "norm"
    if arch.lm_head:
        comps[arch.lm_head] = "lm_head"
    for i in range(arch.num_layers):
        base = arch.layer_path(i)
        comps[base] = "layer"
        comps[f"{base}.{arch.layer.attention}"] = "attention"
        if arch.layer.mlp:
            comps[f"{base}.{arch.layer.mlp}"] = "mlp"
        else:  # OPT keeps fc1/fc2 directly on the layer
            for path in arch.layer.mlp_proj.values():
                comps[f"{base}.{path}"] = "mlp"
        for norm in arch.layer.norms:
            comps[f"{base}.{norm}"] = "norm"
    return comps


def _component_of(path: str, comps: dict[str, str]) -> str:
    while path:
        if path in comps:
            return path
        path = path.rpartition(".")[0]
    return "model"


def dataflow_graph(program: Program) -> nx.DiGraph:
    """Build the dataflow graph; node attributes: ``kind``, ``layer`` (index or -1), ``params``."""
    comps = _components(program)
    graph = nx.DiGraph()
    graph.add_node("input", kind="io", layer=-1, params=0)
    owner: dict[str, str] = {}
    residual_runs: dict[str, int] = {}
    previous = ""
    ep = program.exported
    user_inputs = set(ep.graph_signature.user_inputs)
    for node in ep.graph.nodes:
        if node.op == "placeholder":
            if node.name in user_inputs:
                owner[node.name] = "input"
            continue
        if node.op == "output":
            for arg in node.all_input_nodes:
                if arg.name in owner:
                    graph.add_edge(owner[arg.name], "output")
            continue
        path = owning_module(node)
        comp = _component_of("" if path.startswith("_") else path, comps)
        if comp == "model" or comps.get(comp) == "layer":
            # glue ops (a layer's residual adds, the model's mask / position / slicing ops) get
            # one node per run of consecutive ops, so the graph stays acyclic
            suffix = "residual" if comp != "model" else "glue"
            if not previous.startswith(f"{comp}.{suffix}_"):
                residual_runs[comp] = residual_runs.get(comp, 0) + 1
            comp = f"{comp}.{suffix}_{residual_runs[comp]}"
        owner[node.name] = previous = comp
        if comp not in graph:
            kind = "residual" if ".residual_" in comp else comps.get(comp, "other")
            kind = "glue" if comp.startswith("model.glue_") else kind
            graph.add_node(comp, kind=kind, layer=_layer_index(comp, program),
                           params=_param_count(program, comp))
        for arg in node.all_input_nodes:
            src = owner.get(arg.name)
            if src is not None and src != comp:
                graph.add_edge(src, comp)
    graph.nodes["output"].update(kind="io", layer=-1, params=0)
    return graph


def _layer_index(comp: str, program: Program) -> int:
    prefix = program.arch.layers + "."
    if comp.startswith(prefix):
        return int(comp[len(prefix):].split(".")[0])
    return -1


def _param_count(program: Program, comp: str) -> int:
    if comp in ("input", "output") or ".residual_" in comp or comp.startswith("model.glue_"):
        return 0
    try:
        module = program.module.get_submodule(comp)
    except AttributeError:
        return 0
    return sum(p.numel() for p in module.parameters())


_COLORS = {"embedding": "#cfe2ff", "attention": "#ffd8a8", "mlp": "#c3fae8", "norm": "#e9ecef",
           "residual": "#fff3bf", "lm_head": "#d0bfff", "io": "#ffffff", "glue": "#ffffff",
           "other": "#f8f9fa"}


def to_svg(graph: nx.DiGraph, *, title: str = "") -> str:
    """Render the graph top-to-bottom in topological order; skip edges are drawn as arcs."""
    order = list(nx.topological_sort(graph)) if nx.is_directed_acyclic_graph(graph) \
        else list(graph.nodes)
    row_h, box_w, box_h, left = 34, 300, 24, 40
    y = {n: 40 + i * row_h for i, n in enumerate(order)}
    width, height = left + box_w + 420, 60 + len(order) * row_h
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="monospace" font-size="11">',
           f'<text x="{left}" y="20" font-size="13">{html.escape(title)}</text>']
    for a, b in graph.edges:
        ya, yb = y[a] + box_h / 2, y[b] + box_h / 2
        if abs(order.index(b) - order.index(a)) == 1:
            out.append(f'<line x1="{left + box_w / 2}" y1="{y[a] + box_h}" x2="{left + box_w / 2}"'
                       f' y2="{y[b]}" stroke="#495057"/>')
        else:
            bulge = left + box_w + min(400, 12 + 8 * abs(order.index(b) - order.index(a)))
            out.append(f'<path d="M{left + box_w},{ya} C{bulge},{ya} {bulge},{yb} {left + box_w},'
                       f'{yb}" fill="none" stroke="#868e96" stroke-width="0.8"/>')
    for n in order:
        attrs = graph.nodes[n]
        label = f"{n}  [{attrs.get('params', 0):,} params]" if attrs.get("params") else n
        out.append(f'<rect x="{left}" y="{y[n]}" width="{box_w}" height="{box_h}" rx="4" '
                   f'fill="{_COLORS.get(attrs.get("kind", "other"), "#f8f9fa")}" stroke="#495057"/>')
        out.append(f'<text x="{left + 6}" y="{y[n] + 16}">{html.escape(label[:46])}</text>')
    out.append("</svg>")
    return "\n".join(out)


def to_html(graph: nx.DiGraph, *, title: str = "") -> str:
    legend = " ".join(f'<span style="background:{c};padding:2px 6px;border:1px solid #999">{k}'
                      f'</span>' for k, c in _COLORS.items())
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"</head><body><h3>{html.escape(title)}</h3><p>{legend}</p>"
            f"<p>{graph.number_of_nodes()} nodes, {graph.number_of_edges()} edges</p>"
            f"{to_svg(graph, title=title)}</body></html>")
