"""Architecture description: where a model keeps its layers, attention, MLP, norms and embeddings.

Structural passes (drop layers, tie layers, share attention, MoE conversion) read this
description instead of hard-coding one model family. It is detected from a Hugging Face model's
``config.model_type`` and then checked against the real module tree, so a renamed attribute fails
here with a message naming what was not found, not later inside a pass.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from torch import nn

from modelfold.errors import ModelfoldError


class UnsupportedArchitectureError(ModelfoldError, ValueError):
    """The model's structure is not one modelfold understands."""


@dataclass(frozen=True)
class LayerLayout:
    """Paths of the parts of one decoder/encoder layer, relative to the layer module.

    ``attention_proj`` maps role (q, k, v, o, or qkv for fused projections) to a path; ``mlp_proj``
    maps role (gate, up, down, fc_in, fc_out, experts, router) to a path.
    """

    attention: str
    mlp: str
    norms: tuple[str, ...]
    attention_proj: dict[str, str] = field(default_factory=dict)
    mlp_proj: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Architecture:
    """Where the parts of a transformer live, and its shape facts.

    Attributes:
        family: ``config.model_type`` (``llama``, ``gpt2``, ``bert`` ...).
        kind: ``causal-lm`` (decoder with a KV cache) or ``encoder``.
        layers: path of the ``ModuleList`` of transformer layers (``model.layers``).
        layer: layout of one layer (relative paths).
        embeddings: paths of the input embedding modules.
        final_norm: path of the norm after the last layer ("" if none).
        lm_head: path of the output projection ("" for encoders).
        tied_embeddings: the LM head shares its weight with the token embedding.
    """

    family: str
    kind: str
    layers: str
    num_layers: int
    layer: LayerLayout
    embeddings: tuple[str, ...]
    final_norm: str
    lm_head: str
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    activation: str
    tied_embeddings: bool
    mlp_type: str  # "gated" (SwiGLU/GeGLU), "dense" (fc_in -> act -> fc_out) or "moe"

    def layer_path(self, index: int) -> str:
        """Module path of layer ``index`` (``model.layers.3``)."""
        return f"{self.layers}.{index}"

    def to_dict(self) -> dict:
        return asdict(self)


_LLAMA_LIKE = LayerLayout(
    attention="self_attn",
    mlp="mlp",
    norms=("input_layernorm", "post_attention_layernorm"),
    attention_proj={"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                    "o": "self_attn.o_proj"},
    mlp_proj={"gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"},
)
_GEMMA2_LIKE = LayerLayout(
    attention="self_attn",
    mlp="mlp",
    norms=("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
           "post_feedforward_layernorm"),
    attention_proj=_LLAMA_LIKE.attention_proj,
    mlp_proj=_LLAMA_LIKE.mlp_proj,
)

# family -> (kind, layers path, layer layout, embeddings, final norm, lm head, mlp type)
_FAMILIES: dict[str, tuple] = {
    "llama": ("causal-lm", "model.layers", _LLAMA_LIKE, ("model.embed_tokens",), "model.norm",
              "lm_head", "gated"),
    "qwen2": ("causal-lm", "model.layers", _LLAMA_LIKE, ("model.embed_tokens",), "model.norm",
              "lm_head", "gated"),
    "mistral": ("causal-lm", "model.layers", _LLAMA_LIKE, ("model.embed_tokens",), "model.norm",
                "lm_head", "gated"),
    "gemma": ("causal-lm", "model.layers", _LLAMA_LIKE, ("model.embed_tokens",), "model.norm",
              "lm_head", "gated"),
    "gemma2": ("causal-lm", "model.layers", _GEMMA2_LIKE, ("model.embed_tokens",), "model.norm",
               "lm_head", "gated"),
    "gemma3_text": ("causal-lm", "model.layers", _GEMMA2_LIKE, ("model.embed_tokens",),
                    "model.norm", "lm_head", "gated"),
    "phi": ("causal-lm", "model.layers", LayerLayout(
        attention="self_attn", mlp="mlp", norms=("input_layernorm",),
        attention_proj={"q": "self_attn.q_proj", "k": "self_attn.k_proj",
                        "v": "self_attn.v_proj", "o": "self_attn.dense"},
        mlp_proj={"fc_in": "mlp.fc1", "fc_out": "mlp.fc2"}),
        ("model.embed_tokens",), "model.final_layernorm", "lm_head", "dense"),
    "mixtral": ("causal-lm", "model.layers", LayerLayout(
        attention="self_attn", mlp="mlp", norms=("input_layernorm", "post_attention_layernorm"),
        attention_proj=_LLAMA_LIKE.attention_proj,
        mlp_proj={"router": "mlp.gate", "experts": "mlp.experts"}),
        ("model.embed_tokens",), "model.norm", "lm_head", "moe"),
    "qwen2_moe": ("causal-lm", "model.layers", LayerLayout(
        attention="self_attn", mlp="mlp", norms=("input_layernorm", "post_attention_layernorm"),
        attention_proj=_LLAMA_LIKE.attention_proj,
        mlp_proj={"router": "mlp.gate", "experts": "mlp.experts"}),
        ("model.embed_tokens",), "model.norm", "lm_head", "moe"),
    "gpt2": ("causal-lm", "transformer.h", LayerLayout(
        attention="attn", mlp="mlp", norms=("ln_1", "ln_2"),
        attention_proj={"qkv": "attn.c_attn", "o": "attn.c_proj"},
        mlp_proj={"fc_in": "mlp.c_fc", "fc_out": "mlp.c_proj"}),
        ("transformer.wte", "transformer.wpe"), "transformer.ln_f", "lm_head", "dense"),
    "opt": ("causal-lm", "model.decoder.layers", LayerLayout(
        attention="self_attn", mlp="", norms=("self_attn_layer_norm", "final_layer_norm"),
        attention_proj={"q": "self_attn.q_proj", "k": "self_attn.k_proj",
                        "v": "self_attn.v_proj", "o": "self_attn.out_proj"},
        mlp_proj={"fc_in": "fc1", "fc_out": "fc2"}),
        ("model.decoder.embed_tokens", "model.decoder.embed_positions"),
        "model.decoder.final_layer_norm", "lm_head", "dense"),
    "bert": ("encoder", "encoder.layer", LayerLayout(
        attention="attention", mlp="intermediate",
        norms=("attention.output.LayerNorm", "output.LayerNorm"),
        attention_proj={"q": "attention.self.query", "k": "attention.self.key",
                        "v": "attention.self.value", "o": "attention.output.dense"},
        mlp_proj={"fc_in": "intermediate.dense", "fc_out": "output.dense"}),
        ("embeddings.word_embeddings", "embeddings.position_embeddings",
         "embeddings.token_type_embeddings"), "", "", "dense"),
}

SUPPORTED_FAMILIES = tuple(sorted(_FAMILIES))


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def _locate(model: nn.Module, layers: str) -> tuple[str, str]:
    """``(old, new)`` prefixes that make paths written for the full LM resolve on ``model``.

    ``BertForMaskedLM`` keeps the encoder under ``bert.``; a bare ``LlamaModel`` or ``GPT2Model``
    lacks the ``model.`` / ``transformer.`` prefix that the LM class has.
    """
    if _has(model, layers):
        return "", ""
    for name, _ in model.named_children():
        if _has(model, f"{name}.{layers}"):
            return "", f"{name}."
    head, _, tail = layers.partition(".")
    if tail and _has(model, tail):
        return f"{head}.", ""
    return "", ""


def _rebase(path: str, old: str, new: str) -> str:
    return new + path[len(old):] if path and path.startswith(old) else path


def _converted_to_moe(stack: nn.ModuleList, mlp: str) -> list[nn.Module]:
    """The layers whose FFN is a modelfold mixture of experts (``moefy``)."""
    from modelfold.ir.moe import MoEFFN

    return [layer for layer in stack
            if _has(layer, mlp) and isinstance(layer.get_submodule(mlp), MoEFFN)]


def describe(model: nn.Module) -> Architecture:
    """Detect the architecture of a Hugging Face transformer.

    Raises:
        UnsupportedArchitectureError: the model type is unknown or an expected part is missing.
    """
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} has no `config`: modelfold reads the architecture from a "
            "Hugging Face transformers model (a PreTrainedModel)")
    family = getattr(config, "model_type", None)
    if family not in _FAMILIES:
        raise UnsupportedArchitectureError(
            f"unsupported architecture model_type={family!r} ({type(model).__name__}); "
            f"supported: {', '.join(SUPPORTED_FAMILIES)}")
    kind, layers, layout, embeddings, final_norm, lm_head, mlp_type = _FAMILIES[family]
    old, new = _locate(model, layers)
    layers = _rebase(layers, old, new)
    embeddings = tuple(e for e in (_rebase(e, old, new) for e in embeddings) if _has(model, e))
    final_norm = _rebase(final_norm, old, new)
    if lm_head and not _has(model, lm_head):
        lm_head = ""  # a bare backbone (LlamaModel) has no head

    missing = []
    if not _has(model, layers) or not isinstance(model.get_submodule(layers), nn.ModuleList):
        missing.append(f"layer stack `{layers}` (an nn.ModuleList)")
    else:
        stack = model.get_submodule(layers)
        if len(stack) == 0:
            missing.append(f"layers in `{layers}` (it is empty)")
        else:
            first = stack[0]
            converted = _converted_to_moe(stack, layout.mlp) if layout.mlp else []
            if converted:
                # FFNs converted by moefy (modelfold.ir.moe): experts are ordinary linears
                layout = replace(layout, mlp_proj={"router": f"{layout.mlp}.router"})
                mlp_type = "moe"
                first = converted[0]
            parts = [layout.attention, *layout.norms, *layout.attention_proj.values(),
                     *layout.mlp_proj.values()] + ([layout.mlp] if layout.mlp else [])
            missing += [f"`{layers}.0.{p}`" for p in parts if not _has(first, p)]
    if final_norm and not _has(model, final_norm):
        missing.append(f"final norm `{final_norm}`")
    if not embeddings:
        missing.append("token embeddings")
    if missing:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} (model_type={family!r}) does not have the expected structure; "
            f"not found: {', '.join(missing)}")

    num_heads = config.num_attention_heads
    hidden = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // num_heads
    num_kv = getattr(config, "num_key_value_heads", None) or num_heads
    activation = (getattr(config, "hidden_act", None) or getattr(config, "activation_function", None)
                  or "unknown")
    tied = bool(getattr(config, "tie_word_embeddings", False)) and bool(lm_head)
    return Architecture(
        family=family, kind=kind, layers=layers, num_layers=len(model.get_submodule(layers)),
        layer=layout, embeddings=embeddings, final_norm=final_norm, lm_head=lm_head,
        hidden_size=hidden, num_heads=num_heads, num_kv_heads=num_kv, head_dim=head_dim,
        activation=str(activation), tied_embeddings=tied, mlp_type=mlp_type)
