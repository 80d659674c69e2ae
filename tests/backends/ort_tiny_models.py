"""Tiny random models for the ONNX Runtime backend tests, and the layer-dropping helper.

Configs are kept tiny (hidden 32, 2-4 layers, vocabulary 128) so that exporting one takes a few
seconds on 2 cores. Sliding-window families get a window (4) shorter than the parity probe
(7 tokens + decode steps) so the window is actually exercised.
"""

from __future__ import annotations

import torch
import transformers
from torch import nn

from modelfold.passes.drop_layers import remove_layers

VOCAB = 128
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4)

# family -> (model class name, config class name, config kwargs)
TINY_DECODERS: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", dict(_COMMON, num_key_value_heads=2)),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", dict(_COMMON, num_key_value_heads=2)),
    "mistral": (
        "MistralForCausalLM",
        "MistralConfig",
        dict(_COMMON, num_key_value_heads=2, sliding_window=4),
    ),
    "gemma": ("GemmaForCausalLM", "GemmaConfig", dict(_COMMON, num_key_value_heads=1, head_dim=16)),
    "gemma2": (
        "Gemma2ForCausalLM",
        "Gemma2Config",
        dict(_COMMON, num_key_value_heads=2, head_dim=8, sliding_window=4, num_hidden_layers=3),
    ),
    "gemma3": (
        "Gemma3ForCausalLM",
        "Gemma3TextConfig",
        dict(
            _COMMON,
            num_key_value_heads=2,
            head_dim=8,
            sliding_window=4,
            num_hidden_layers=3,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        ),
    ),
    "gpt2": (
        "GPT2LMHeadModel",
        "GPT2Config",
        dict(vocab_size=VOCAB, n_embd=32, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2),
    ),
    "opt": (
        "OPTForCausalLM",
        "OPTConfig",
        dict(
            vocab_size=VOCAB,
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            word_embed_proj_dim=32,
        ),
    ),
    "phi": ("PhiForCausalLM", "PhiConfig", dict(_COMMON, partial_rotary_factor=0.5)),
    "mixtral": (
        "MixtralForCausalLM",
        "MixtralConfig",
        dict(_COMMON, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
    ),
}


def tiny_decoder(family: str, seed: int = 0, **overrides) -> nn.Module:
    """A randomly initialized tiny decoder of `family` (a key of TINY_DECODERS), in eval mode."""
    model_cls, config_cls, kwargs = TINY_DECODERS[family]
    kwargs = {"num_hidden_layers": 2, **kwargs, **overrides}
    config = getattr(transformers, config_cls)(**kwargs)
    torch.manual_seed(seed)
    return getattr(transformers, model_cls)(config).eval()


def tiny_bert(seed: int = 0) -> nn.Module:
    """A randomly initialized tiny BertModel, in eval mode."""
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    return transformers.BertModel(config).eval()


def drop_layers(model: nn.Module, drop: set[int]) -> nn.Module:
    """Removes decoder layers in place with the drop-layers pass's own helper."""
    remove_layers(model, "model.layers", sorted(drop))
    return model
