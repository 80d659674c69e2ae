"""The signature a Program is captured with: the one the backends run.

A decoder is captured as

    (input_ids [B, S], attention_mask [B, T], position_ids [B, S],
     past_key_values.{i}.key / .value [B, H, P, D] for every layer i)
      -> (logits [B, S, V], present.{i}.key / .value [B, H, T, D])

with dynamic B (batch), S (new tokens), P (past tokens; 0 for a prefill) and T = P + S, and an
encoder as ``(input_ids, attention_mask[, token_type_ids]) -> last_hidden_state [B, S, E]``. The
ONNX artifact's inputs and outputs carry exactly these names, so the graph that is verified is
the graph that is lowered.

A ``transformers.DynamicCache`` cannot cross the ``torch.export`` boundary, so a decoder is
wrapped in a module whose forward takes the past keys/values as flat tensors, builds the cache
inside, and returns the present keys/values flat again (DESIGN.md, "Facts established by
experiment").

Shape legend: B = batch, S = new tokens, P = past tokens, T = P + S, H = KV heads,
D = head dim, V = vocabulary, E = hidden size.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import DynamicCache

from modelfold.errors import UsageError

# Input / output names (the same scheme as Optimum / onnxruntime-genai decoders).
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
TOKEN_TYPE_IDS = "token_type_ids"
LOGITS = "logits"
LAST_HIDDEN_STATE = "last_hidden_state"

# Names of the dynamic dims.
BATCH, SEQUENCE, PAST, TOTAL = "batch", "sequence", "past_sequence", "total_sequence"

# Example sizes for capture: all >= 2 (a 1 specializes) and pairwise different, so that
# torch.export does not unify two dims that merely happen to be equal in the example.
_EXAMPLE_BATCH, _EXAMPLE_SEQUENCE, _EXAMPLE_PAST = 2, 3, 5


def past_name(layer: int, kind: str) -> str:
    """Name of a past key (``kind="key"``) or value (``kind="value"``) input."""
    return f"past_key_values.{layer}.{kind}"


def present_name(layer: int, kind: str) -> str:
    """Name of a present key or value output."""
    return f"present.{layer}.{kind}"


@dataclass(frozen=True)
class CacheLayout:
    """Shape of the KV cache of a decoder: ``[B, num_kv_heads, P, head_dim]`` tensors, a key and a
    value per layer unless layers share attention (``kinds``: per layer, the entries it keeps;
    empty means both for every layer)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    kinds: tuple[tuple[str, ...], ...] = ()

    def layer_kinds(self, layer: int) -> tuple[str, ...]:
        return self.kinds[layer] if self.kinds else ("key", "value")

    @property
    def entries(self) -> list[tuple[int, str]]:
        """``(layer, "key" | "value")`` of every cache tensor, in signature order."""
        return [(i, k) for i in range(self.num_layers) for k in self.layer_kinds(i)]

    @property
    def bytes_per_token(self) -> int:
        """Bytes the cache grows by per token of one sequence."""
        size = torch.empty((), dtype=self.dtype).element_size()
        return len(self.entries) * self.num_kv_heads * self.head_dim * size


@dataclass(frozen=True)
class Signature:
    """Inputs and outputs a Program is captured with (and its backends run).

    Attributes:
        kind: ``causal-lm`` or ``encoder``.
        inputs: input names in order.
        outputs: output names in order.
        dims: per input, ``{axis: dim name}`` of its dynamic axes.
        cache: the KV-cache layout (decoders).
    """

    kind: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    dims: dict[str, dict[int, str]] = field(default_factory=dict)
    cache: CacheLayout | None = None

    @property
    def past_names(self) -> tuple[str, ...]:
        return tuple(n for n in self.inputs if n.startswith("past_key_values."))


def is_decoder(model: nn.Module) -> bool:
    """True for a generative decoder (a ``*ForCausalLM`` / ``*LMHeadModel``), False for an encoder."""
    can_generate = getattr(model, "can_generate", None)
    if callable(can_generate):
        return bool(can_generate())
    return type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))


def num_decoder_layers(model: nn.Module) -> int:
    """Number of decoder layers, from ``config.num_hidden_layers`` (kept current by layer dropping)."""
    num_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if not isinstance(num_layers, int) or num_layers < 1:
        raise UsageError(
            f"{type(model).__name__}: config.num_hidden_layers is {num_layers!r}; the KV-cache "
            "signature needs a positive layer count in the model's config")
    return num_layers


@torch.no_grad()
def probe_cache_layout(model: nn.Module) -> CacheLayout:
    """Runs a 2-token prefill in torch and reads the KV-cache shapes it produces.

    Reading the real cache (rather than ``num_key_value_heads`` / ``head_dim`` from the config)
    works for every family: GPT-2 has no ``num_key_value_heads``, Gemma's head_dim is not
    hidden / heads.
    """
    from modelfold.ir.shared_attention import cache_kinds, sharing_of

    num_layers = num_decoder_layers(model)
    kinds = cache_kinds(model, num_layers)
    was_training = model.training
    model.eval()
    try:
        out = model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=_device(model)),
                    past_key_values=DynamicCache(), use_cache=True)
    finally:
        model.train(was_training)
    layers = out.past_key_values.layers
    filled = max((i for i, k in enumerate(kinds) if k), default=-1) + 1
    if len(layers) < filled or (len(layers) != num_layers and sharing_of(model) is None):
        raise UsageError(
            f"the model filled {len(layers)} cache layers but config.num_hidden_layers is "
            f"{num_layers}; after removing layers, set config.num_hidden_layers and re-index each "
            "attention module's layer_idx (0..n-1)")
    tensors = [getattr(layers[i], "keys" if kind == "key" else "values")
               for i in range(num_layers) for kind in kinds[i]]
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1:
        raise UsageError(
            f"{model.config.model_type}: KV-cache layers have different shapes {sorted(shapes)}; "
            "the KV-cache signature supports one [B, kv_heads, P, head_dim] shape for all layers")
    _, num_kv_heads, _, head_dim = shapes.pop()  # [B, H, S, D]
    shared = kinds if sharing_of(model) is not None else ()
    return CacheLayout(num_layers, num_kv_heads, head_dim, tensors[0].dtype, shared)


def signature_for(model: nn.Module) -> Signature:
    """The signature of ``model``: the KV-cache one for decoders, the plain one for encoders."""
    if is_decoder(model):
        layout = probe_cache_layout(model)
        past = tuple(past_name(i, k) for i, k in layout.entries)
        present = tuple(present_name(i, k) for i, k in layout.entries)
        dims = {INPUT_IDS: {0: BATCH, 1: SEQUENCE}, ATTENTION_MASK: {0: BATCH, 1: TOTAL},
                POSITION_IDS: {0: BATCH, 1: SEQUENCE}, **{n: {0: BATCH, 2: PAST} for n in past}}
        return Signature("causal-lm", (INPUT_IDS, ATTENTION_MASK, POSITION_IDS, *past),
                         (LOGITS, *present), dims, layout)
    inputs = (INPUT_IDS, ATTENTION_MASK) + \
        ((TOKEN_TYPE_IDS,) if encoder_uses_token_type_ids(model) else ())
    return Signature("encoder", inputs, (LAST_HIDDEN_STATE,),
                     {n: {0: BATCH, 1: SEQUENCE} for n in inputs})


def example_inputs(model: nn.Module, signature: Signature) -> tuple[torch.Tensor, ...]:
    """Example inputs for capture, in ``signature.inputs`` order (contiguous tensors)."""
    vocab = getattr(model.config, "vocab_size", None)
    if not isinstance(vocab, int) or vocab < 2:
        raise UsageError(f"model.config.vocab_size is {vocab!r}; capture needs the vocabulary size")
    device = _device(model)
    gen = torch.Generator().manual_seed(0)
    batch, seq, past_len = _EXAMPLE_BATCH, _EXAMPLE_SEQUENCE, _EXAMPLE_PAST
    if signature.kind == "encoder":
        seq += 2
        ids = torch.randint(0, vocab, (batch, seq), generator=gen)  # [B, S]
        args = [ids, torch.ones(batch, seq, dtype=torch.long)]
        if TOKEN_TYPE_IDS in signature.inputs:
            args.append(torch.zeros(batch, seq, dtype=torch.long))
        return tuple(a.to(device) for a in args)
    layout = signature.cache
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)  # [B, S]
    mask = torch.ones(batch, past_len + seq, dtype=torch.long)  # [B, T]
    positions = decoder_positions(mask, seq).contiguous()  # [B, S]
    shape = (batch, layout.num_kv_heads, past_len, layout.head_dim)  # [B, H, P, D]
    past = [torch.randn(shape, generator=gen).to(layout.dtype) for _ in signature.past_names]
    return tuple(t.to(device) for t in (ids, mask, positions, *past))


def graph_inputs(signature: Signature, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor | None = None, *,
                 cache_dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """Decoder inputs for a forward over ``input_ids`` ``[B, S]`` with an empty cache (P = 0):
    the mask (default all ones), its position ids and ``[B, H, 0, D]`` past tensors (of
    ``cache_dtype``, default the captured cache's: a graph pass may store it otherwise)."""
    layout = signature.cache
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    positions = decoder_positions(attention_mask, input_ids.shape[1]).contiguous()
    empty = torch.zeros(input_ids.shape[0], layout.num_kv_heads, 0, layout.head_dim,
                        dtype=cache_dtype or layout.dtype, device=input_ids.device)
    return [input_ids, attention_mask, positions, *[empty] * len(signature.past_names)]


def signature_module(model: nn.Module, signature: Signature) -> nn.Module:
    """``model`` behind the signature's flat forward (``KVCacheDecoder`` / ``Encoder``)."""
    if signature.kind == "causal-lm":
        return KVCacheDecoder(model, signature.cache)
    return Encoder(model)


# Module paths inside a signature module start with this prefix (its attribute name).
WRAPPED_PREFIX = "model."


class KVCacheDecoder(nn.Module):
    """Decoder with a flat KV-cache signature.

    forward(input_ids [B, S], attention_mask [B, T], position_ids [B, S],
            *past: k_0, v_0, k_1, v_1, ... each [B, H, P, D])
      -> (logits [B, S, V], k_0', v_0', ... each [B, H, T, D])

    With attention shared across layers (``layout.kinds``) only the entries a layer keeps are
    passed and returned: a score-sharing borrower's value, nothing of a KV-sharing borrower.
    """

    def __init__(self, model: nn.Module, layout: CacheLayout):
        super().__init__()
        self.model = model
        self.layout = layout
        self.num_layers = layout.num_layers

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
        given = dict(zip(self.layout.entries, past))
        for layer in range(self.num_layers):
            kinds = self.layout.layer_kinds(layer)
            if kinds == ("key", "value"):
                cache.update(given[layer, "key"], given[layer, "value"], layer)
            elif kinds == ("value",):  # keys of width 0: the layer reuses its owner's scores
                value = given[layer, "value"]
                cache.update(value[..., :0], value, layer)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, past_key_values=cache, use_cache=True)
        present = [cache.layers[i].keys if kind == "key" else cache.layers[i].values
                   for i, kind in self.layout.entries]  # [B, H, T, D] each
        return (out.logits, *present)  # logits: [B, S, V]


class Encoder(nn.Module):
    """Encoder with a plain signature: (input_ids, attention_mask[, token_type_ids]) -> [B, S, E].

    A task model (``BertForMaskedLM`` ...) wraps the encoder; the signature is the encoder's
    (``base_model``), called through the task model so module paths stay the model's own.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, S]
        attention_mask: torch.Tensor,  # [B, S]
        token_type_ids: torch.Tensor | None = None,  # [B, S]
    ) -> torch.Tensor:
        kwargs = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        base = getattr(self.model, "base_model", self.model)
        out = base(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return out.last_hidden_state  # [B, S, E]


def encoder_uses_token_type_ids(model: nn.Module) -> bool:
    """True when the encoder takes ``token_type_ids`` (BERT with type_vocab_size > 0)."""
    base = getattr(model, "base_model", model)
    accepts = "token_type_ids" in inspect.signature(base.forward).parameters
    return accepts and getattr(model.config, "type_vocab_size", 0) > 0


def decoder_positions(attention_mask: torch.Tensor, num_new: int) -> torch.Tensor:
    """Position ids of the last ``num_new`` tokens from a left-padded mask [B, T] -> [B, S].

    Same rule as ``generate()``: count the real tokens before each one; pads get position 1.
    """
    positions = attention_mask.long().cumsum(-1) - 1  # [B, T]
    positions = positions.masked_fill(attention_mask == 0, 1)
    return positions[:, positions.shape[1] - num_new :]  # [B, S]


@contextlib.contextmanager
def exportable_experts(model: nn.Module) -> Iterator[str | None]:
    """Switches mixture-of-experts blocks to an implementation that captures to plain ops, then
    restores the previous one.

    transformers 5 fuses the experts into 3-D parameters; its default ``grouped_mm``
    implementation captures to a custom op that ONNX has no translation for, ``batched_mm`` to
    plain MatMuls. Yields the implementation used (None for dense models).
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
        raise UsageError(
            f"{type(model).__name__} uses the '{current}' experts implementation, which captures "
            "to a custom op with no ONNX translation, and switching it to 'batched_mm' failed: "
            f"{err}. Load the model with experts_implementation='batched_mm'.") from err
    try:
        yield "batched_mm"
    finally:
        model.set_experts_implementation(snapshot)


def _device(model: nn.Module) -> torch.device:
    tensor = next(iter(model.parameters()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


__all__ = ["ATTENTION_MASK", "INPUT_IDS", "LAST_HIDDEN_STATE", "LOGITS", "POSITION_IDS",
           "TOKEN_TYPE_IDS", "CacheLayout", "Encoder", "KVCacheDecoder", "Signature",
           "decoder_positions", "example_inputs", "exportable_experts", "is_decoder",
           "past_name", "present_name", "probe_cache_layout", "signature_for",
           "signature_module"]
