"""Tiny random-weight configs of every supported family (breadth tests; seconds, not minutes)."""

from __future__ import annotations

import torch
import transformers as tf

_COMMON = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def tiny_config(family: str):
    """A tiny config of ``family`` (4 layers, hidden 32, vocab 128)."""
    c = dict(_COMMON)
    if family == "llama":
        return tf.LlamaConfig(**c)
    if family == "qwen2":
        return tf.Qwen2Config(**c)
    if family == "mistral":
        return tf.MistralConfig(**c, sliding_window=None)
    if family == "gemma":
        return tf.GemmaConfig(**c, head_dim=8)
    if family == "gemma2":
        return tf.Gemma2Config(**c, head_dim=8, sliding_window=16)
    if family == "gemma3_text":
        return tf.Gemma3TextConfig(**c, head_dim=8, sliding_window=16)
    if family == "phi":
        c.pop("num_key_value_heads")
        return tf.PhiConfig(**c)
    if family == "mixtral":
        return tf.MixtralConfig(**c, num_local_experts=4, num_experts_per_tok=2)
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=128, n_embd=32, n_layer=4, n_head=4, n_positions=128,
                             bos_token_id=0, eos_token_id=0)
    if family == "opt":
        return tf.OPTConfig(vocab_size=128, hidden_size=32, ffn_dim=64, num_hidden_layers=4,
                            num_attention_heads=4, max_position_embeddings=128,
                            word_embed_proj_dim=32)
    if family == "bert":
        return tf.BertConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=4, num_attention_heads=4,
                             max_position_embeddings=128)
    raise KeyError(family)


DECODER_FAMILIES = ["llama", "qwen2", "mistral", "gemma", "gemma2", "gemma3_text", "phi",
                    "mixtral", "gpt2", "opt"]
ALL_FAMILIES = [*DECODER_FAMILIES, "bert"]


def tiny_model(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny model of ``family`` in eval mode (``BertModel`` for bert, *ForCausalLM otherwise).

    ``overrides`` set config attributes (e.g. ``tie_word_embeddings=True``).
    """
    torch.manual_seed(seed)
    config = tiny_config(family)
    for key, value in overrides.items():
        setattr(config, key, value)
    if family == "bert":
        model = tf.BertModel(config)
    else:
        model = tf.AutoModelForCausalLM.from_config(config)
    if family == "mixtral":
        _use_exportable_experts(model)
    return model.eval()


def _use_exportable_experts(model: torch.nn.Module) -> None:
    setter = getattr(model, "set_experts_implementation", None)
    if setter is not None:
        setter("batched_mm")
    else:
        model.config._experts_implementation = "batched_mm"
