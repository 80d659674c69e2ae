"""The one tiny-model factory: random-weight configs of every supported family (breadth tests;
seconds, not minutes).

Configs are tiny (hidden 32, vocabulary 128, 4 heads) and chosen to exercise what differs between
families: grouped-query attention (2 KV heads; Gemma multi-query with head_dim 16 != hidden /
heads), sliding windows of 4 tokens (shorter than the 7-token parity probe, so the window is
really used) with Gemma 3's alternating layer types, Phi's partial rotary embedding, Mixtral's
experts (in the ``batched_mm`` implementation that captures to plain ops), learned positions
(GPT-2, OPT, BERT). Family keys are ``config.model_type`` values.
"""

from __future__ import annotations

import torch
import transformers as tf

VOCAB = 128
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128)

DECODER_FAMILIES = ["llama", "qwen2", "mistral", "gemma", "gemma2", "gemma3_text", "phi",
                    "mixtral", "gpt2", "opt"]
ALL_FAMILIES = [*DECODER_FAMILIES, "bert"]


def tiny_config(family: str, layers: int = 4, **overrides):
    """A tiny config of ``family`` with ``layers`` layers; ``overrides`` are config arguments
    (``hidden_size=48``, ``tie_word_embeddings=True``), applied when the config is built so that
    derived sizes (head_dim) follow them."""
    c = dict(_COMMON, num_hidden_layers=layers)
    if family in ("llama", "qwen2"):
        cls, kwargs = (tf.LlamaConfig if family == "llama" else tf.Qwen2Config), c
    elif family == "mistral":
        cls, kwargs = tf.MistralConfig, dict(c, sliding_window=4)
    elif family == "gemma":
        cls, kwargs = tf.GemmaConfig, dict(c, num_key_value_heads=1, head_dim=16)
    elif family == "gemma2":
        cls, kwargs = tf.Gemma2Config, dict(c, head_dim=8, sliding_window=4)
    elif family == "gemma3_text":
        n = overrides.get("num_hidden_layers", layers)
        types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
        cls, kwargs = tf.Gemma3TextConfig, dict(c, head_dim=8, sliding_window=4, layer_types=types)
    elif family == "phi":
        c.pop("num_key_value_heads")
        cls, kwargs = tf.PhiConfig, dict(c, partial_rotary_factor=0.5)
    elif family == "mixtral":
        cls, kwargs = tf.MixtralConfig, dict(c, num_local_experts=4, num_experts_per_tok=2)
    elif family == "gpt2":
        cls, kwargs = tf.GPT2Config, dict(vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4,
                                          n_positions=128, bos_token_id=1, eos_token_id=2)
    elif family == "opt":
        cls, kwargs = tf.OPTConfig, dict(vocab_size=VOCAB, hidden_size=32, ffn_dim=64,
                                         num_hidden_layers=layers, num_attention_heads=4,
                                         max_position_embeddings=128, word_embed_proj_dim=32)
    elif family == "bert":
        cls, kwargs = tf.BertConfig, dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=layers, num_attention_heads=4,
                                          max_position_embeddings=128)
    else:
        raise KeyError(f"no tiny config for family {family!r}; one of {', '.join(ALL_FAMILIES)}")
    return cls(**{**kwargs, **overrides})


# Sizes ONNX Runtime's GroupQueryAttention takes with rotary embedding (head_dim % 16 == 0 and a
# rotary table width that is a multiple of 8), so that ``fuse-attention`` fuses the tiny model:
# head_dim 16 (Phi: 32, half of it rotary). GPT-2 and OPT (no rotary) fuse at any size.
_FUSABLE = {"gemma": dict(head_dim=16), "gemma2": dict(head_dim=16),
            "gemma3_text": dict(head_dim=16), "phi": dict(hidden_size=128),
            "gpt2": {}, "opt": {}, "bert": {}}


def tiny_model(family: str, seed: int = 0, *, layers: int = 4, fusable: bool = False,
               **overrides) -> torch.nn.Module:
    """A tiny model of ``family`` in eval mode (``BertModel`` for bert, *ForCausalLM otherwise).

    ``overrides`` are config arguments (e.g. ``tie_word_embeddings=True``). ``fusable`` picks
    head sizes that ``fuse-attention`` (GroupQueryAttention) takes; the default sizes (head_dim
    8) keep the captured attention in the ONNX lowering of every rotary family.
    """
    if fusable:
        overrides = {**_FUSABLE.get(family, dict(hidden_size=64)), **overrides}
    config = tiny_config(family, layers, **overrides)
    torch.manual_seed(seed)
    if family == "bert":
        model = tf.BertModel(config)
    else:
        model = tf.AutoModelForCausalLM.from_config(config)
    if family == "mixtral":
        setter = getattr(model, "set_experts_implementation", None)
        if setter is not None:
            setter("batched_mm")
        else:
            model.config._experts_implementation = "batched_mm"
    return model.eval()
