"""``fuse-attention``: each decoder layer's attention becomes one ``modelfold::attention`` op
(graph pass, exact).

What a decoder layer's attention module computes between its q/k/v projections (or q/k norms)
and its output projection -- head reshapes, rotary embedding, the KV-cache update, K/V expanded
to the query heads, the causal / sliding-window mask, scaling, soft-capping, softmax -- is
replaced by one ``modelfold::attention`` node (``modelfold.ir.attention``: grouped-query
attention over the cache, K/V never expanded, rotary inside from cos/sin tables), which the ONNX
lowering emits as ``com.microsoft.GroupQueryAttention``. The layers' present keys/values become
the op's outputs; the rotary tables are computed once, by running the captured graph's own
position-embedding computation at every position (so scaled RoPE variants come out right).

The rewrite is structural (nodes are found by the module that produced them) and its numbers
come from the model (``scaling``, the sliding window of each layer, Gemma 2's soft-cap); the pass
manager, and the exporter for the ONNX lowering's default run, check that the logits do not
change. A model is fused whole or not at all: the op expects right-padded masks (see
``modelfold.ir.attention``), which a runtime can only feed if every layer takes them; when one
layer cannot be fused (an unknown input to its attention, a head size ONNX Runtime's kernel does
not take), no layer is, and the details say why.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch.export import ExportedProgram

import modelfold.ir.attention  # noqa: F401  (defines torch.ops.modelfold.attention)
from modelfold.ir.graph import (
    GraphEditor,
    GraphRewriteError,
    ancestors,
    evaluate,
    owned,
    region_inputs,
    user_inputs,
)
from modelfold.ir.program import Program
from modelfold.ir.shared_attention import DROPPED, sharing_of
from modelfold.ir.signature import ATTENTION_MASK, POSITION_IDS, past_name, present_name
from modelfold.passes.base import GraphPass, PassConfig, option
from modelfold.passes.registry import register_pass

_ATTENTION = torch.ops.modelfold.attention.default
_ATTEND = torch.ops.modelfold.attend.default
_CACHE_WRITE = torch.ops.modelfold.cache_write.default
# Families whose attention modules this pass knows (their scaling / window / soft-cap attributes
# and rotate_half rotary embedding); others keep their attention as captured.
FAMILIES = ("llama", "qwen2", "mistral", "mixtral", "gemma", "gemma2", "gemma3_text", "phi",
            "gpt2", "opt")


@dataclass(frozen=True)
class FuseAttentionConfig(PassConfig):
    """Options of ``fuse-attention``."""

    max_positions: int | None = option(
        None, "rows of the rotary cos/sin tables, i.e. the longest sequence the fused model "
              "takes (default: the model's max_position_embeddings)")

    def validate(self) -> None:
        from modelfold.errors import OptionError

        if self.max_positions is not None and self.max_positions < 1:
            raise OptionError(f"pass 'fuse-attention' option 'max_positions' must be >= 1; got "
                              f"{self.max_positions}")


@dataclass
class _Layer:
    """What one layer's attention reads and produces in the graph."""

    path: str
    query: torch.fx.Node  # q [B, S, H*D] or packed q/k/v
    key: torch.fx.Node | None
    value: torch.fx.Node | None
    flatten: tuple[bool, bool]  # q / k come from a per-head norm [B, S, H, D]
    output: torch.fx.Node  # the node the output projection reads
    presents: tuple[torch.fx.Node, torch.fx.Node]
    rotary: tuple[torch.fx.Node, torch.fx.Node] | None  # (cos, sin) nodes [B, S, R]
    scale: float
    softcap: float
    window: int
    region: list[torch.fx.Node]  # the nodes the op replaces
    owner: int | None = None  # attention shared with this earlier layer (a borrower)


@register_pass
class FuseAttention(GraphPass):
    """Decoder attention -> modelfold::attention (GQA with rotary and the KV cache; exact)."""

    name = "fuse-attention"
    config_class = FuseAttentionConfig
    kind = "exact"
    summary = ("each decoder layer's attention (rotary, KV cache, grouped-query attention) "
               "becomes one modelfold::attention op (ONNX: GroupQueryAttention)")
    default_for: ClassVar[tuple[str, ...]] = ("onnxruntime",)
    order: ClassVar[int] = 10  # before fuse-projections, which packs q/k/v into the op
    # The op sums scores in another order than the captured SDPA (and scales q.k instead of q
    # for OPT): float rounding that grows with the logits.
    exact_rtol: ClassVar[float] = 2e-6

    def rewrite(self, program: Program, ep: ExportedProgram) -> tuple[ExportedProgram,
                                                                        dict[str, Any]]:
        reason = _model_reason(program)
        if reason:
            return ep, {"fused": [], "not_fused": reason}
        editor = GraphEditor(ep)
        if any(True for _ in editor.calls(_ATTENTION)):
            return ep, {"fused": [], "not_fused": "the attention is already fused"}
        sig = program.signature
        inputs = user_inputs(editor, sig.inputs)
        sharing = sharing_of(program.module)
        layers, skipped = [], []
        found: dict[int, _Layer] = {}
        for i in range(program.arch.num_layers):
            owner = found.get(sharing.owners[i]) if sharing and sharing.is_borrower(i) else None
            try:
                if sharing and sharing.is_borrower(i) and owner is None:
                    raise GraphRewriteError(f"layer {i} borrows from layer {sharing.owners[i]}, "
                                            "which cannot be fused")
                found[i] = _find_layer(program, editor, inputs, i, owner,
                                       sharing.mode if sharing else "")
                layers.append(found[i])
            except GraphRewriteError as err:
                skipped.append({"target": program.arch.layer_path(i), "reason": str(err)})
        if skipped:
            return ep, {"fused": [], "not_fused": "some layers cannot be fused, so none is",
                        "skipped": skipped}
        max_positions = self.config.max_positions or \
            int(getattr(program.module.config, "max_position_embeddings", 0) or 0)
        tables: dict[tuple[torch.fx.Node, torch.fx.Node], tuple] = {}
        try:
            for layer in layers:
                if layer.rotary is not None and layer.rotary not in tables:
                    tables[layer.rotary] = _rotary_tables(editor, inputs, layer, max_positions,
                                                          len(tables))
        except GraphRewriteError as err:
            return ep, {"fused": [], "not_fused": str(err)}
        cache = sig.cache
        graph_output = next(n for n in editor.graph.nodes if n.op == "output")
        presents: dict[int, list[torch.fx.Node]] = {}  # owner -> its fused present key / value
        for i, layer in enumerate(layers):  # every layer is found: layers[i] is layer i
            cos, sin = tables[layer.rotary] if layer.rotary is not None else (None, None)
            q, k = layer.query, layer.key
            if layer.flatten[0]:
                q = _heads_last(editor, q, layer.output)
            if layer.flatten[1]:
                k = _heads_last(editor, k, layer.output)
            shape = (program.arch.num_heads, cache.num_kv_heads, layer.scale, layer.softcap,
                     layer.window)
            news: list[torch.fx.Node] = []
            if layer.owner is None:
                args = (q, k, layer.value, inputs[past_name(i, "key")],
                        inputs[past_name(i, "value")], inputs[ATTENTION_MASK], cos, sin, *shape)
                fused = editor.call(_ATTENTION, args, near=layer.output)
                out = editor.call(operator.getitem, (fused, 0), near=layer.output)
                news = [editor.call(operator.getitem, (fused, j), near=layer.output)
                        for j in (1, 2)]
                presents[i] = news
            elif sharing.mode == "kv":  # the owner's keys and values, nothing written
                keys, values = presents[layer.owner]
                out = editor.call(_ATTEND, (q, keys, values, inputs[ATTENTION_MASK], cos, sin,
                                            *shape), near=layer.output)
            else:  # scores: the owner's query and keys, this layer's values
                values = editor.call(_CACHE_WRITE, (inputs[past_name(i, "value")], layer.value,
                                                    inputs[ATTENTION_MASK], cache.num_kv_heads),
                                     near=layer.output)
                news = [values]
                out = editor.call(_ATTEND, (q, presents[layer.owner][0], values,
                                            inputs[ATTENTION_MASK], cos, sin, *shape),
                                  near=layer.output)
            for user in list(layer.output.users):
                if editor.owner(user) != layer.path:  # the output projection's nodes
                    user.replace_input_with(layer.output, out)
            for present, new in zip(layer.presents, news):
                graph_output.replace_input_with(present, new)
        for layer in layers:
            editor.remove_unused(layer.region)
        rotary = {"tables": len(tables), "positions": max_positions} if tables else None
        shared = {"mode": sharing.mode, "borrowers": sharing.borrowers,
                  "op": "modelfold::attend"} if sharing else None
        return editor.finish(), {
            "fused": [layer.path for layer in layers], "op": "modelfold::attention",
            **({"shared": shared} if shared else {}),
            "padding": "right", "rotary": rotary,
            "windows": sorted({layer.window for layer in layers if layer.window > 0}),
            "softcap": max((layer.softcap for layer in layers), default=0.0)}


def _heads_last(editor: GraphEditor, node: torch.fx.Node, near: torch.fx.Node) -> torch.fx.Node:
    """A per-head norm's output ``[B, S, H, D]`` or ``[B, H, S, D]`` as ``[B, S, H * D]``."""
    if isinstance(node.meta["val"].shape[1], int):  # [B, H, S, D]: heads are a fixed size
        node = editor.call(torch.ops.aten.transpose.int, (node, 1, 2), near=near)
    return editor.call(torch.ops.aten.flatten.using_ints, (node, 2, 3), near=near)


def fused_attention(ep: ExportedProgram) -> int:
    """How many ``modelfold::attention`` ops a graph has."""
    return sum(1 for n in ep.graph.nodes if n.target is _ATTENTION)


def _model_reason(program: Program) -> str:
    """Why the model as a whole cannot be fused ("" when it can)."""
    arch = program.arch
    if arch.kind != "causal-lm":
        return f"{arch.family} is an encoder (only decoder attention with a KV cache is fused)"
    if arch.family not in FAMILIES:
        return f"the attention of {arch.family} models is not known to fuse-attention"
    cache = program.signature.cache
    if arch.num_heads % cache.num_kv_heads:
        return (f"{arch.num_heads} query heads are not a multiple of {cache.num_kv_heads} KV "
                "heads")
    return ""


def _last(editor: GraphEditor, path: str) -> torch.fx.Node:
    nodes = owned(editor, path)
    if not nodes:
        raise GraphRewriteError(f"no graph node belongs to {path}")
    return nodes[-1]


def _find_layer(program: Program, editor: GraphEditor, inputs: dict[str, torch.fx.Node],
                i: int, owner: _Layer | None = None, mode: str = "") -> _Layer:
    """The attention of layer ``i`` in the graph, or GraphRewriteError saying why not.

    A layer that shares the attention of ``owner`` (``mode`` scores or kv) reads the owner's
    present keys (and values), and, for scores, the owner's query and key projections; the
    projections it dropped produce nothing it keeps."""
    arch, config = program.arch, program.module.config
    layer_path = arch.layer_path(i)
    path = f"{layer_path}.{arch.layer.attention}"
    module = program.module.get_submodule(path)
    region = owned(editor, path, subtree=False)
    if not region:
        raise GraphRewriteError(f"no graph node belongs to {path}")
    proj = {role: f"{layer_path}.{p}" for role, p in arch.layer.attention_proj.items()}
    dropped = set(DROPPED[mode]) if owner is not None else set()
    if owner is not None and "qkv" in proj:
        raise GraphRewriteError(f"{path} shares attention through a packed q/k/v projection, "
                                "which fuse-attention does not split")
    flatten = (False, False)
    if "qkv" in proj:
        query, key, value = _last(editor, proj["qkv"]), None, None
    elif owner is not None and mode == "scores":  # the owner's query, this layer's values
        query, key, value = owner.query, None, _last(editor, proj["v"])
        flatten = (owner.flatten[0], False)
    else:
        query, key, value = (None if r in dropped else _last(editor, proj[r])
                             for r in ("q", "k", "v"))
        norms = [getattr(module, n, None) for n in ("q_norm", "k_norm")]
        if all(n is not None for n in norms):  # per-head q/k norms (Gemma 3): [B, S, H, D]
            query = _last(editor, f"{path}.q_norm")
            key = None if "k" in dropped else _last(editor, f"{path}.k_norm")
            flatten = (True, key is not None)
        elif any(n is not None for n in norms):
            raise GraphRewriteError(f"{path} has a norm on only one of q and k")
    out_nodes = owned(editor, proj["o"])
    if not out_nodes:
        raise GraphRewriteError(f"no graph node belongs to {proj['o']}")
    inside = set(region)
    output = next((a for n in out_nodes for a in n.all_input_nodes if a in inside), None)
    if output is None:
        raise GraphRewriteError(f"the output projection {proj['o']} does not read {path}")
    graph_out = next(n for n in editor.graph.nodes if n.op == "output").args[0]
    outputs = program.signature.outputs
    presents = tuple(graph_out[outputs.index(present_name(i, k))]
                     for k in program.signature.cache.layer_kinds(i))
    if any(p not in inside for p in presents):
        raise GraphRewriteError(f"the present keys/values of layer {i} are not computed by {path}")
    projections = {_last(editor, p) for role, p in proj.items()
                   if role != "o" and role not in dropped}
    sources = ({query, key, value} | projections) - {None}
    if owner is not None:  # what the owner hands over
        sources |= {*owner.presents, owner.query, owner.key, owner.value} - {None}
    own_cache = {inputs[n] for n in (past_name(i, "key"), past_name(i, "value")) if n in inputs}
    rotary = []
    for node in region_inputs(region):
        if node in sources or not isinstance(node.meta.get("val"), torch.Tensor):
            continue
        if editor.owner(node).startswith(path + ".") or \
                any(editor.owner(node) == proj[r] for r in dropped):
            continue  # a borrower's q/k norms or dropped projections: their values go unused
        if owner is not None and editor.owner(node).startswith(owner.path + "."):
            continue  # the owner's projections, read by the borrower's unused q/k
        reads = {n for n in ancestors(node) if n.op == "placeholder" and not editor.is_lifted(n)}
        if reads <= own_cache and reads:
            continue  # the cache as the model's DynamicCache holds it
        if inputs[ATTENTION_MASK] in reads:
            continue  # the mask (built from the attention mask and the inputs' shapes)
        if reads == {inputs[POSITION_IDS]}:
            rotary.append(node)
            continue
        raise GraphRewriteError(
            f"{path} reads {node.name} (computed from {', '.join(sorted(n.name for n in reads))}),"
            " which fuse-attention does not understand")
    if len(rotary) not in (0, 2):
        raise GraphRewriteError(f"{path} reads {len(rotary)} position-dependent tensors; "
                                "expected none or rotary cos and sin")
    head_dim = program.signature.cache.head_dim
    if rotary:
        rotary_dim = int(rotary[0].meta["val"].shape[-1])
        # ONNX Runtime's GroupQueryAttention (CPU) refuses other sizes with rotary embedding
        if head_dim % 16 or (rotary_dim // 2) % 8:
            raise GraphRewriteError(
                f"head_dim {head_dim} / rotary dims {rotary_dim}: GroupQueryAttention with "
                "rotary embedding needs head_dim % 16 == 0 and rotary_dim / 2 % 8 == 0")
    window = getattr(module, "sliding_window", None) if hasattr(module, "sliding_window") \
        else getattr(config, "sliding_window", None)
    softcap = getattr(module, "attn_logit_softcapping", None)
    scale = getattr(module, "scaling", None)
    if not isinstance(scale, float):
        raise GraphRewriteError(f"{path} has no float `scaling` attribute")
    return _Layer(path, query, key, value, flatten, output, presents,
                  (rotary[0], rotary[1]) if rotary else None, scale, float(softcap or 0.0),
                  int(window or 0), region, None if owner is None else _index(owner.path))


def _index(path: str) -> int:
    """The layer index of an attention module path (``model.layers.3.self_attn`` -> 3)."""
    return int(path.rsplit(".", 2)[-2])


def _rotary_tables(editor: GraphEditor, inputs: dict[str, torch.fx.Node], layer: _Layer,
                   positions: int, index: int) -> tuple[torch.fx.Node, torch.fx.Node]:
    """The cos / sin tables ``[M, R / 2]`` of a layer's rotary inputs, as lifted tensors: the
    graph's own computation run at positions 0..M-1."""
    if positions < 1:
        raise GraphRewriteError("the model's config has no max_position_embeddings; give "
                                "fuse-attention{max_positions=N}")
    ids = torch.arange(positions).unsqueeze(0)  # [1, M]
    values = [evaluate(editor, node, {inputs[POSITION_IDS]: ids}) for node in layer.rotary]
    values = [v.reshape(positions, v.shape[-1]).float() for v in values]  # [M, R]
    at_zero = [bool((v[0] == 0).all()) for v in values]
    if sorted(at_zero) != [False, True]:
        raise GraphRewriteError(f"{layer.path}: the rotary inputs are not a cos / sin pair")
    cos, sin = (values[1], values[0]) if at_zero[0] else (values[0], values[1])
    half = cos.shape[-1] // 2
    for table in (cos, sin):
        if not torch.equal(table[:, :half], table[:, half:]):
            raise GraphRewriteError(f"{layer.path}: the rotary tables are not in rotate_half "
                                    "form (halves differ)")
    name, dtype = f"rotary_cache_{index}", layer.rotary[0].meta["val"].dtype
    return (editor.add_tensor(f"{name}.cos", cos[:, :half].to(dtype).contiguous()),
            editor.add_tensor(f"{name}.sin", sin[:, :half].to(dtype).contiguous()))


__all__ = ["FAMILIES", "FuseAttention", "FuseAttentionConfig", "fused_attention"]
