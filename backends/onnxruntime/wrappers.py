"""Functional wrappers that give a Hugging Face model an ONNX-exportable signature.

A `transformers.DynamicCache` cannot cross the `torch.export` boundary, so a decoder is wrapped in
a module whose forward takes the past keys/values as flat tensors, builds the cache inside, and
returns the present keys/values flat again (DESIGN.md, "Facts established by experiment").

Shape legend: B = batch, S = new tokens, P = past tokens, T = P + S, H = KV heads,
D = head dim, V = vocabulary, E = hidden size.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

# ONNX names (the same scheme as Optimum / onnxruntime-genai decoders).
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
TOKEN_TYPE_IDS = "token_type_ids"
LOGITS = "logits"
LAST_HIDDEN_STATE = "last_hidden_state"


def past_name(layer: int, kind: str) -> str:
    """ONNX input name of a past key (`kind="key"`) or value (`kind="value"`)."""
    return f"past_key_values.{layer}.{kind}"


def present_name(layer: int, kind: str) -> str:
    """ONNX output name of a present key or value."""
    return f"present.{layer}.{kind}"


@dataclass(frozen=True)
class CacheLayout:
    """Shape of the KV cache of a decoder: one `[B, num_kv_heads, P, head_dim]` pair per layer."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype


def is_decoder(model: nn.Module) -> bool:
    """True for a generative decoder (a `*ForCausalLM` / `*LMHeadModel`), False for an encoder."""
    can_generate = getattr(model, "can_generate", None)
    if callable(can_generate):
        return bool(can_generate())
    return type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))


def num_decoder_layers(model: nn.Module) -> int:
    """Number of decoder layers, from `config.num_hidden_layers` (kept current by layer dropping)."""
    config = getattr(model, "config", None)
    num_layers = getattr(config, "num_hidden_layers", None)
    if not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(
            f"{type(model).__name__}: config.num_hidden_layers is {num_layers!r}; the ONNX export "
            "needs a positive layer count in the model's config"
        )
    return num_layers


@torch.no_grad()
def probe_cache_layout(model: nn.Module) -> CacheLayout:
    """Runs a 2-token prefill in torch and reads the KV-cache shapes it produces.

    Reading the real cache (rather than `num_key_value_heads` / `head_dim` from the config) works
    for every family: GPT-2 has no `num_key_value_heads`, Gemma's head_dim is not hidden/heads.
    """
    num_layers = num_decoder_layers(model)
    config = model.config
    input_ids = torch.zeros(1, 2, dtype=torch.long)
    cache = DynamicCache()
    out = model(input_ids=input_ids, past_key_values=cache, use_cache=True)
    layers = out.past_key_values.layers
    if len(layers) != num_layers:
        raise RuntimeError(
            f"the model filled {len(layers)} cache layers but config.num_hidden_layers is "
            f"{num_layers}; after removing layers, set config.num_hidden_layers and re-index each "
            "attention module's layer_idx (0..n-1)"
        )
    shapes = {tuple(layer.keys.shape) for layer in layers} | {tuple(layer.values.shape) for layer in layers}
    if len(shapes) != 1:
        raise NotImplementedError(
            f"{config.model_type}: KV-cache layers have different shapes {sorted(shapes)}; the ONNX "
            "export supports one [B, kv_heads, P, head_dim] shape for all layers"
        )
    _, num_kv_heads, _, head_dim = shapes.pop()  # [B, H, S, D]
    return CacheLayout(num_layers, num_kv_heads, head_dim, layers[0].keys.dtype)


class KVCacheDecoder(nn.Module):
    """Decoder with a flat KV-cache signature.

    forward(input_ids [B, S], attention_mask [B, T], position_ids [B, S],
            *past: k_0, v_0, k_1, v_1, ... each [B, H, P, D])
      -> (logits [B, S, V], k_0', v_0', ... each [B, H, T, D])
    """

    def __init__(self, model: nn.Module, num_layers: int):
        super().__init__()
        self.model = model
        self.num_layers = num_layers

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, S]
        attention_mask: torch.Tensor,  # [B, T]
        position_ids: torch.Tensor,  # [B, S]
        *past: torch.Tensor,  # 2 * num_layers x [B, H, P, D]
    ) -> tuple[torch.Tensor, ...]:
        # No config: every layer is a full DynamicLayer. Sliding-window layers (Gemma2/3, Mistral)
        # still attend only inside their window through the mask built from config.layer_types;
        # a DynamicSlidingWindowLayer would instead crop the cache to a length that varies per layer.
        cache = DynamicCache()
        for layer in range(self.num_layers):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
        present = []
        for layer in cache.layers[: self.num_layers]:
            present += [layer.keys, layer.values]  # [B, H, T, D] each
        return (out.logits, *present)  # logits: [B, S, V]


class Encoder(nn.Module):
    """Encoder with a plain signature: (input_ids, attention_mask[, token_type_ids]) -> [B, S, E]."""

    def __init__(self, model: nn.Module):
        super().__init__()
        # A task model (BertForMaskedLM ...) wraps the encoder; the artifact is the encoder.
        self.model = getattr(model, "base_model", model)

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, S]
        attention_mask: torch.Tensor,  # [B, S]
        token_type_ids: torch.Tensor | None = None,  # [B, S]
    ) -> torch.Tensor:
        kwargs = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return out.last_hidden_state  # [B, S, E]


def encoder_uses_token_type_ids(model: nn.Module) -> bool:
    """True when the encoder takes `token_type_ids` (BERT with type_vocab_size > 0)."""
    base = getattr(model, "base_model", model)
    accepts = "token_type_ids" in inspect.signature(base.forward).parameters
    return accepts and getattr(model.config, "type_vocab_size", 0) > 0


def decoder_positions(attention_mask: torch.Tensor, num_new: int) -> torch.Tensor:
    """Position ids of the last `num_new` tokens from a left-padded mask [B, T] -> [B, S].

    Same rule as `generate()`: count the real tokens before each one; pads get position 1.
    """
    positions = attention_mask.long().cumsum(-1) - 1  # [B, T]
    positions = positions.masked_fill(attention_mask == 0, 1)
    return positions[:, positions.shape[1] - num_new :]  # [B, S]


@contextlib.contextmanager
def exportable_experts(model: nn.Module) -> Iterator[str | None]:
    """Switches mixture-of-experts blocks to an implementation that lowers to ONNX, then restores.

    transformers 5 fuses the experts into 3-D parameters; its default `grouped_mm` implementation
    exports to a custom op that ONNX has no translation for, `batched_mm` exports to plain
    MatMuls. Yields the implementation used (None for dense models).
    """
    config = getattr(model, "config", None)
    current = getattr(config, "_experts_implementation", None)
    can_set = getattr(type(model), "_can_set_experts_implementation", None)
    if current is None or not callable(can_set) or not can_set():
        yield None
        return
    if current == "batched_mm":
        yield current
        return
    snapshot = model.get_experts_implementation()
    try:
        model.set_experts_implementation("batched_mm")
    except (ValueError, KeyError, RuntimeError) as err:
        raise RuntimeError(
            f"{type(model).__name__} uses the '{current}' experts implementation, which exports to "
            "a custom op with no ONNX translation, and switching it to 'batched_mm' failed: "
            f"{err}. Load the model with experts_implementation='batched_mm'."
        ) from err
    try:
        yield "batched_mm"
    finally:
        model.set_experts_implementation(snapshot)
