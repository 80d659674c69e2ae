"""``modelfold::moe``: a mixture-of-experts FFN (router + top-k + routed experts) as one op, and
``MoEFFN``, the module the ``moefy`` pass swaps in for a dense FFN.

An FFN ``down(act(gate x) * up x)`` (gated: SwiGLU / GeGLU) or ``fc_out(act(fc_in x))`` (dense)
is a sum over its neurons. ``MoEFFN`` holds the neurons in ``E`` experts (each the same rows of
gate / up and columns of down as the dense layer had), an optional always-active shared expert,
and the output bias once, outside the experts. Per token:

- ``logits = router(x)`` ``[T, E]`` (a linear map without bias, as Mixtral's);
- ``probs = softmax(logits)`` in float32; the experts with the ``k`` largest probabilities are
  chosen (Mixtral's order: top-k of the probabilities);
- ``weighting="unit"``: every chosen expert contributes with weight 1, so ``k = E`` is the dense
  FFN (MoEfication: the router only selects). The weight's gradient is the probability's
  (``1 + p - p.detach()``: value exactly 1), so recovery training reaches the router;
- ``weighting="softmax"``: Mixtral's weights, the chosen probabilities renormalised to sum 1
  (``moefy`` multiplies the experts' down projections by ``k`` so that equal probabilities give
  weight 1). This is what Mixtral / Qwen2-MoE checkpoints compute; it is exact at ``k = E`` only
  when the router is uniform.

Eager forward computes each chosen expert on the tokens routed to it (the expert modules are
called, so quantized / LoRA experts and calibration hooks work as for any linear). Under
``torch.export`` / ``torch.compile`` a module whose experts are plain linears becomes one
``modelfold::moe`` node over stacked weights (``[E, I, H]`` gate / up, ``[E, H, I]`` down); its
ONNX lowering is ONNX Runtime's ``com.microsoft.MoE`` (only the chosen experts are computed and
read). SwiGLU experts quantized to int4 in one format whose blocks divide H and I become
``modelfold::quant_moe`` (their MatMulNBits storage stacked; ONNX: ``com.microsoft.QMoE``).
Experts of any other kind (LoRA, N:M, int8 / other quantized formats) are captured as every expert times
its routing weight (zero when not chosen): correct, but all expert weights are read.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from modelfold.ir.module_types import (
    StandardFormatError,
    register_module_type,
    register_standard_format,
)

WEIGHTINGS = ("unit", "softmax")


def _activation(name: str):
    from transformers.activations import ACT2FN

    return ACT2FN[name]


def route(logits: torch.Tensor, top_k: int, weighting: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights [T, k], experts [T, k])`` of router ``logits`` ``[T, E]``."""
    probs = torch.softmax(logits.float(), dim=-1)
    top, index = torch.topk(probs, top_k, dim=-1)
    if weighting == "softmax":
        weights = top / top.sum(dim=-1, keepdim=True)
    elif weighting == "unit":
        weights = 1.0 + (top - top.detach())
    else:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}; got {weighting!r}")
    return weights.to(logits.dtype), index


def dispatch(x: torch.Tensor, weights: torch.Tensor, index: torch.Tensor, num_experts: int,
             expert) -> torch.Tensor:
    """``sum_k weights[t, k] * expert(index[t, k], x[t])``, computing each expert once on the
    tokens routed to it (``expert(e, rows)`` -> ``[n, H]``)."""
    out = torch.zeros_like(x)
    hit = torch.bincount(index.flatten(), minlength=num_experts)
    for e in torch.nonzero(hit).flatten().tolist():
        token, slot = torch.where(index == e)
        y = expert(e, x[token]) * weights[token, slot, None]
        out = out.index_add(0, token, y.to(out.dtype))
    return out


def expert_ffn(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor | None, w2: torch.Tensor,
               b1: torch.Tensor | None, activation: str) -> torch.Tensor:
    """One expert: ``w2 act(w1 x + b1) * (w3 x)`` (gated when ``w3`` is given)."""
    act = _activation(activation)
    h = F.linear(x, w1, b1)
    h = act(h) * F.linear(x, w3) if w3 is not None else act(h)
    return F.linear(h, w2)


@torch.library.custom_op("modelfold::moe", mutates_args=())
def moe(x: torch.Tensor, router: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor | None,
        w2: torch.Tensor, b1: torch.Tensor | None, top_k: int, activation: str,
        weighting: str) -> torch.Tensor:
    """Routed experts of tokens ``x`` ``[T, H]``: router ``[E, H]``, ``w1`` (gate, or fc_in of a
    dense FFN) and ``w3`` (up; None for a dense FFN) ``[E, I, H]``, ``w2`` (down) ``[E, H, I]``,
    ``b1`` ``[E, I]`` or None. Returns ``[T, H]`` (no shared expert, no output bias)."""
    weights, index = route(F.linear(x, router), top_k, weighting)
    return dispatch(x, weights, index, router.shape[0], lambda e, rows: expert_ffn(
        rows, w1[e], None if w3 is None else w3[e], w2[e], None if b1 is None else b1[e],
        activation))


@moe.register_fake
def _(x, router, w1, w3, w2, b1, top_k, activation, weighting):
    return torch.empty_like(x)


@torch.library.custom_op("modelfold::quant_moe", mutates_args=())
def quant_moe(x: torch.Tensor, router: torch.Tensor, q1: torch.Tensor, s1: torch.Tensor,
              z1: torch.Tensor | None, q3: torch.Tensor, s3: torch.Tensor,
              z3: torch.Tensor | None, q2: torch.Tensor, s2: torch.Tensor,
              z2: torch.Tensor | None, top_k: int, activation: str, weighting: str, bits: int,
              block_size: int) -> torch.Tensor:
    """``modelfold::moe`` over gated experts quantized in the MatMulNBits layout, per expert:
    ``q*`` uint8 ``[E, N, K * bits / 8]`` (each row's blocks side by side), scales ``[E, N, K /
    block]``, packed zero points ``[E, N, ceil(K / block * bits / 8)]`` or None (the default
    2^(bits-1)); 1 = gate, 3 = up, 2 = down. H and I are multiples of ``block_size``."""
    from modelfold.ir.quant import dequantize

    def weight(q, s, z, e):
        return dequantize(q[e], s[e], None if z is None else z[e], q.shape[2] * 8 // bits, bits,
                          block_size).to(x.dtype)

    weights, index = route(F.linear(x, router), top_k, weighting)
    return dispatch(x, weights, index, router.shape[0], lambda e, rows: expert_ffn(
        rows, weight(q1, s1, z1, e), weight(q3, s3, z3, e), weight(q2, s2, z2, e), None,
        activation))


@quant_moe.register_fake
def _(x, router, q1, s1, z1, q3, s3, z3, q2, s2, z2, top_k, activation, weighting, bits,
      block_size):
    return torch.empty_like(x)


def _in_moe_ffn(node: torch.fx.Node) -> bool:
    """Whether ``node`` was traced inside an ``MoEFFN`` (its every-expert path; the routing of
    other MoE implementations, e.g. transformers' Mixtral, has k baked into later shapes)."""
    stack = node.meta.get("nn_module_stack") or {}
    return bool(stack) and "MoEFFN" in str(list(stack.values())[-1][1])


def routing_nodes(graph: torch.fx.Graph) -> list[tuple[torch.fx.Node, int, int]]:
    """The top-k routing choices of ``graph``'s MoE layers, as ``(node, index of its top_k
    argument, number of experts)``: the ``moe`` / ``quant_moe`` nodes and the ``topk`` that an
    ``MoEFFN``'s every-expert path traced (other MoE graphs are left out)."""
    ops = {torch.ops.modelfold.moe.default: 6, torch.ops.modelfold.quant_moe.default: 11}
    found = []
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in ops:
            at, source, dim = ops[node.target], node.args[1], 0  # the router [E, H]
        elif node.target == torch.ops.aten.topk.default and _in_moe_ffn(node):
            at, source, dim = 1, node.args[0], -1  # the routing probabilities [T, E]
        else:
            continue
        value = source.meta.get("val") if isinstance(source, torch.fx.Node) else None
        if value is None:
            raise ValueError(f"{node.name}: the router's shape is not recorded in the graph")
        found.append((node, at, int(value.shape[dim])))
    return found


def route_all_experts(gm: torch.fx.GraphModule) -> int:
    """Makes every MoE layer of ``gm`` (a runnable copy of a graph) route each token to all its
    experts (``top_k = E`` in its ``routing_nodes``). Top-k routing is discontinuous (a
    rounding-level change of a router logit can swap an expert at a near tie), so a check that
    two graphs compute the same function within a float tolerance compares them with all
    experts routed, where the routing is continuous. Returns the number of nodes changed."""
    found = routing_nodes(gm.graph)
    for node, at, experts in found:
        node.args = (*node.args[:at], experts, *node.args[at + 1:])
    if found:
        gm.recompile()
    return len(found)


# activations whose quantized experts ONNX Runtime's QMoE kernel computes (SwiGLU)
QUANT_KERNEL_ACTIVATIONS = ("silu", "swish")


class Expert(nn.Module):
    """One expert (or the shared expert): ``down(act(gate x) * up x)`` or ``down(act(up x))``.

    A dense FFN's ``fc_in`` is ``up_proj`` here (with its bias, split between the experts).
    """

    def __init__(self, hidden: int, size: int, *, gated: bool, activation: str,
                 bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, size, bias=bias) if gated else None
        self.up_proj = nn.Linear(hidden, size, bias=bias and not gated)
        self.down_proj = nn.Linear(size, hidden, bias=False)
        self.activation = activation
        self.act_fn = _activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_proj is None:
            return self.down_proj(self.act_fn(self.up_proj(x)))
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class MoEFFN(nn.Module):
    """A mixture-of-experts FFN: ``router``, ``experts`` (``Expert`` each), an optional always
    active ``shared`` expert and the dense layer's output bias (``bias``).

    Args:
        hidden: model width H.
        expert_size: neurons per expert I.
        num_experts: E.
        top_k: experts per token.
        activation: transformers activation name (``silu``, ``gelu_pytorch_tanh`` ...).
        gated: gate/up experts (SwiGLU / GeGLU) or fc_in -> act -> fc_out.
        weighting: ``unit`` or ``softmax`` (module docstring).
        expert_bias: the experts' fc_in has a bias (dense FFNs with biases).
        out_bias: a bias added once after the experts.
        shared_size: neurons of the shared expert (0: none).
    """

    def __init__(self, hidden: int, expert_size: int, num_experts: int, top_k: int, *,
                 activation: str, gated: bool, weighting: str = "unit",
                 expert_bias: bool = False, out_bias: bool = False, shared_size: int = 0):
        super().__init__()
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}; got {weighting!r}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in 1..{num_experts}; got {top_k}")
        self.hidden, self.expert_size, self.num_experts = hidden, expert_size, num_experts
        self.top_k, self.activation, self.gated, self.weighting = top_k, activation, gated, \
            weighting
        self.router = nn.Linear(hidden, num_experts, bias=False)
        self.experts = nn.ModuleList(
            Expert(hidden, expert_size, gated=gated, activation=activation, bias=expert_bias)
            for _ in range(num_experts))
        self.shared = Expert(hidden, shared_size, gated=gated, activation=activation,
                             bias=expert_bias) if shared_size else None
        self.bias = nn.Parameter(torch.zeros(hidden)) if out_bias else None
        self.last_router_logits: torch.Tensor | None = None  # kept while training (aux losses)

    @property
    def shared_size(self) -> int:
        return 0 if self.shared is None else self.shared.down_proj.in_features

    def fusable(self) -> bool:
        """Whether the experts are plain linears (one ``modelfold::moe`` node when captured)."""
        return all(type(m) is nn.Linear for e in self.experts
                   for m in (e.gate_proj, e.up_proj, e.down_proj) if m is not None)

    def quant_format(self) -> tuple[int, int] | None:
        """``(bits, block_size)`` when every expert projection is a ``QuantLinear`` of one
        format that the quantized MoE op takes (gated SwiGLU experts, whole blocks), else None."""
        if not self.gated or self.activation not in QUANT_KERNEL_ACTIVATIONS:
            return None
        linears = [m for e in self.experts for m in (e.gate_proj, e.up_proj, e.down_proj)]
        if any(type(m).__name__ != "QuantLinear" or m.bias is not None for m in linears):
            return None
        formats = {(m.storage_bits, m.block_size, m.zero_points is None) for m in linears}
        if len(formats) != 1:
            return None
        bits, block, _ = formats.pop()
        # int8 experts: ONNX Runtime's QMoE has no float kernel for them (int8 activations)
        if bits != 4 or self.hidden % block or self.expert_size % block:
            return None
        return bits, block

    def quant_stacked(self) -> dict[str, torch.Tensor | None]:
        """The quantized experts' storage stacked as ``quant_moe`` takes it."""
        out: dict[str, torch.Tensor | None] = {}
        for key, proj in (("1", "gate_proj"), ("3", "up_proj"), ("2", "down_proj")):
            mods = [getattr(e, proj) for e in self.experts]
            out["q" + key] = torch.stack([m.qweight.reshape(m.qweight.shape[0], -1)
                                          for m in mods])
            out["s" + key] = torch.stack([m.scales for m in mods])
            out["z" + key] = None if mods[0].zero_points is None else \
                torch.stack([m.zero_points for m in mods])
        return out

    def stacked(self) -> dict[str, torch.Tensor | None]:
        """The experts' weights stacked as the op takes them: w1, w3, w2, b1."""
        first = "gate_proj" if self.gated else "up_proj"
        w1 = torch.stack([getattr(e, first).weight for e in self.experts])
        w3 = torch.stack([e.up_proj.weight for e in self.experts]) if self.gated else None
        w2 = torch.stack([e.down_proj.weight for e in self.experts])
        bias = getattr(self.experts[0], first).bias
        b1 = torch.stack([getattr(e, first).bias for e in self.experts]) \
            if bias is not None else None
        return {"w1": w1, "w3": w3, "w2": w2, "b1": b1}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.hidden)
        quant = self.quant_format() if torch.compiler.is_compiling() else None
        if torch.compiler.is_compiling() and self.fusable():
            s = self.stacked()
            out = torch.ops.modelfold.moe(flat, self.router.weight, s["w1"], s["w3"], s["w2"],
                                          s["b1"], self.top_k, self.activation, self.weighting)
        elif quant is not None:
            q = self.quant_stacked()
            out = torch.ops.modelfold.quant_moe(
                flat, self.router.weight, q["q1"], q["s1"], q["z1"], q["q3"], q["s3"], q["z3"],
                q["q2"], q["s2"], q["z2"], self.top_k, self.activation, self.weighting, *quant)
        else:
            logits = self.router(flat)
            if self.training:
                self.last_router_logits = logits
            weights, index = route(logits, self.top_k, self.weighting)
            if torch.compiler.is_compiling():  # experts of other kinds: all of them, weighted
                full = torch.zeros_like(logits).scatter(1, index, weights)
                out = sum(self.experts[e](flat) * full[:, e:e + 1]
                          for e in range(self.num_experts))
            else:
                out = dispatch(flat, weights, index, self.num_experts,
                               lambda e, rows: self.experts[e](rows))
        if self.shared is not None:
            out = out + self.shared(flat)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(x.shape)

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, top_k={self.top_k}, expert_size={self.expert_size}"
                f", shared={self.shared_size}, activation={self.activation}, "
                f"weighting={self.weighting}")


def balance_loss(model: nn.Module) -> torch.Tensor | None:
    """Switch Transformer's load-balancing loss, averaged over the MoE layers of the last
    training forward: ``E * sum_e f_e * P_e`` (f_e: the share of top-k slots routed to expert e,
    P_e: its mean router probability); 1 when balanced. None without MoE layers."""
    losses = []
    for m in moe_layers(model).values():
        logits = m.last_router_logits
        if logits is None:
            continue
        probs = torch.softmax(logits.float(), dim=-1)
        index = torch.topk(probs, m.top_k, dim=-1).indices
        load = torch.bincount(index.flatten(), minlength=m.num_experts).float() / index.numel()
        losses.append(m.num_experts * (load * probs.mean(0)).sum())
        m.last_router_logits = None
    return torch.stack(losses).mean() if losses else None


def moe_layers(model: nn.Module) -> dict[str, MoEFFN]:
    """Path -> ``MoEFFN`` of every converted FFN in ``model``."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MoEFFN)}


def _describe(m: MoEFFN) -> dict[str, Any]:
    first = m.experts[0].gate_proj if m.gated else m.experts[0].up_proj
    return {"hidden": m.hidden, "expert_size": m.expert_size, "num_experts": m.num_experts,
            "top_k": m.top_k, "activation": m.activation, "gated": m.gated,
            "weighting": m.weighting, "expert_bias": getattr(first, "bias", None) is not None,
            "out_bias": m.bias is not None, "shared_size": m.shared_size}


def _build(f: dict[str, Any]) -> MoEFFN:
    return MoEFFN(f["hidden"], f["expert_size"], f["num_experts"], f["top_k"],
                  activation=f["activation"], gated=f["gated"], weighting=f["weighting"],
                  expert_bias=f["expert_bias"], out_bias=f["out_bias"],
                  shared_size=f["shared_size"])


register_module_type(MoEFFN, _describe, _build)



# -- standard transformers MoE checkpoints ---------------------------------------------------------
MARKER = "modelfold_moe.json"  # written next to a standard checkpoint that moefy produced


class NotStandardError(StandardFormatError):
    """The converted model has no standard transformers MoE format (the message says why)."""


def _base_config(config: Any) -> dict[str, Any]:
    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings",
            "initializer_range", "rms_norm_eps", "use_cache", "pad_token_id", "bos_token_id",
            "eos_token_id", "tie_word_embeddings", "rope_parameters", "attention_dropout")
    d = config.to_dict()
    return {k: d[k] for k in keys if k in d}


def standard_checkpoint(model: nn.Module) -> tuple[Any, dict[str, torch.Tensor], str] | None:
    """``(config, tensors, format)`` of the standard transformers checkpoint of a model whose FFNs
    ``moefy`` converted: Mixtral (every layer converted, no shared expert) or Qwen2-MoE (a shared
    expert, layers left dense, or a Qwen2 source with q/k/v biases). None when the model has no
    converted FFN.

    Raises:
        NotStandardError: no standard format computes what this model computes.
    """
    import transformers as tf

    from modelfold.ir.architecture import describe

    layers = moe_layers(model)
    if not layers:
        return None
    arch = describe(model)
    config = model.config
    family = arch.family
    if family not in ("llama", "mistral", "qwen2"):
        raise NotStandardError(f"{family} has no transformers MoE counterpart (Mixtral and "
                               "Qwen2-MoE take Llama, Mistral and Qwen2 sources)")
    stack = model.get_submodule(arch.layers)
    moe = {i: layer.mlp for i, layer in enumerate(stack) if isinstance(layer.mlp, MoEFFN)}
    first = next(iter(moe.values()))
    facts = {_describe(m)["num_experts"] for m in moe.values()}, \
        {(m.top_k, m.expert_size, m.shared_size, m.activation, m.weighting, m.gated)
         for m in moe.values()}
    if len(facts[0]) > 1 or len(facts[1]) > 1:
        raise NotStandardError("the converted layers differ in experts / top_k / sizes; the "
                               "standard formats have one setting for every layer")
    if first.weighting != "softmax":
        raise NotStandardError(
            "the experts are weighted 'unit' (each chosen expert as in the dense FFN), and "
            "Mixtral / Qwen2-MoE weight them by renormalised router probabilities; convert with "
            "moefy{weights=softmax} for a standard checkpoint")
    if not first.gated or any(m.bias is not None or _describe(m)["expert_bias"]
                              for m in moe.values()):
        raise NotStandardError("the standard MoE formats have gated experts without biases")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise NotStandardError(f"this {family} model has attention / MLP biases that Mixtral "
                               "and Qwen2-MoE do not have")
    window = getattr(config, "sliding_window", None) if family == "mistral" else None
    dense = [i for i in range(len(stack)) if i not in moe]
    qwen = family == "qwen2" or first.shared is not None or dense
    base = _base_config(config)
    if not qwen:
        fmt = "mixtral"
        out_config = tf.MixtralConfig(**base, intermediate_size=first.expert_size,
                                      num_local_experts=first.num_experts,
                                      num_experts_per_tok=first.top_k, sliding_window=window)
    else:
        if window is not None:
            raise NotStandardError("Qwen2-MoE (the format with a shared expert and dense "
                                   "layers) has no Mistral sliding window here")
        if first.shared is None:
            raise NotStandardError("Qwen2-MoE (the format for dense layers / q-k-v biases) "
                                   "needs a shared expert: convert with moefy{shared=S}")
        fmt = "qwen2_moe"
        dense_size = config.intermediate_size
        out_config = tf.Qwen2MoeConfig(
            **base, intermediate_size=dense_size, moe_intermediate_size=first.expert_size,
            shared_expert_intermediate_size=first.shared_size, num_experts=first.num_experts,
            num_experts_per_tok=first.top_k, norm_topk_prob=True, decoder_sparse_step=1,
            mlp_only_layers=dense, qkv_bias=family == "qwen2", use_sliding_window=False)
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if ".mlp." in name and int(name.split(".")[2]) in moe:
            continue
        if name == "lm_head.weight" and out_config.tie_word_embeddings:
            continue
        tensors[name] = tensor.detach().contiguous()
    for i, m in moe.items():
        p = f"{arch.layers}.{i}.mlp."
        tensors[p + "gate.weight"] = m.router.weight.detach().clone()
        tensors[p + "experts.gate_up_proj"] = torch.stack(
            [torch.cat([e.gate_proj.weight, e.up_proj.weight]) for e in m.experts]).detach()
        tensors[p + "experts.down_proj"] = torch.stack(
            [e.down_proj.weight for e in m.experts]).detach()
        if m.shared is not None:  # sigmoid(0) = 1/2 times a shared expert scaled by 2: exact
            for proj in ("gate_proj", "up_proj", "down_proj"):
                w = getattr(m.shared, proj).weight.detach()
                tensors[f"{p}shared_expert.{proj}.weight"] = w * 2 if proj == "down_proj" \
                    else w.clone()
            tensors[p + "shared_expert_gate.weight"] = torch.zeros(1, m.hidden,
                                                                   dtype=m.router.weight.dtype)
    return out_config, tensors, fmt


def from_standard(model: nn.Module) -> int:
    """Swap the Mixtral / Qwen2-MoE blocks of a checkpoint that ``moefy`` wrote for ``MoEFFN``s
    (the same function: softmax weights, experts as linears, so quantize / LoRA reach each
    expert). Returns how many blocks were swapped."""
    count = 0
    for name, block in list(model.named_modules()):
        experts = getattr(block, "experts", None)
        router = getattr(block, "gate", None)
        if experts is None or not hasattr(experts, "gate_up_proj") or router is None:
            continue
        e, two_i, hidden = experts.gate_up_proj.shape
        size = two_i // 2
        shared = getattr(block, "shared_expert", None)
        shared_gate = getattr(block, "shared_expert_gate", None)
        if shared_gate is not None and torch.count_nonzero(shared_gate.weight):
            raise NotStandardError(f"{name}: a shared expert with a learned sigmoid gate has no "
                                   "modelfold equivalent")
        activation = model.config.hidden_act
        m = MoEFFN(hidden, size, e, router.top_k, activation=activation, gated=True,
                   weighting="softmax",
                   shared_size=shared.down_proj.in_features if shared is not None else 0)
        with torch.no_grad():
            m.router.weight.copy_(router.weight)
            for k, expert in enumerate(m.experts):
                expert.gate_proj.weight.copy_(experts.gate_up_proj[k, :size])
                expert.up_proj.weight.copy_(experts.gate_up_proj[k, size:])
                expert.down_proj.weight.copy_(experts.down_proj[k])
            if shared is not None:
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    w = getattr(shared, proj).weight
                    getattr(m.shared, proj).weight.copy_(w / 2 if proj == "down_proj" else w)
        model.set_submodule(name, m.to(experts.gate_up_proj.dtype))
        count += 1
    return count


register_standard_format("moe", MARKER, standard_checkpoint, from_standard)

__all__ = ["MARKER", "WEIGHTINGS", "Expert", "MoEFFN", "NotStandardError", "balance_loss", "dispatch",
           "expert_ffn", "from_standard", "moe", "moe_layers", "quant_moe", "route",
           "route_all_experts", "routing_nodes",
           "standard_checkpoint"]
