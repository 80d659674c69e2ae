"""KV-cache decoder export: parity per architecture, generation, runtime, dropped layers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from modelfold.backends.onnxruntime.export import check_parity, export_onnx
from modelfold.backends.onnxruntime.runtime import OnnxCausalLM
from modelfold.passes.drop_layers import remove_layers
from tests.tiny_models import DECODER_FAMILIES, tiny_model

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny llama and its artifact (exported once for the runtime tests)."""
    model = tiny_model("llama", layers=2)
    out_dir = tmp_path_factory.mktemp("llama")
    facts = export_onnx(model, out_dir)
    return model, out_dir, facts


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_decoder_parity(family, tmp_path):
    """Prefill (empty past, left-padded batch) and 6 decode steps: 7 + 6 tokens run well past the
    sliding window (4) of Mistral / Gemma2 / Gemma3."""
    model = tiny_model(family, layers=2)
    if family == "mixtral":  # transformers' default, which captures to an op ONNX lacks
        model.set_experts_implementation("grouped_mm")
    facts = export_onnx(model, tmp_path, parity=False)

    parity = check_parity(model, tmp_path, decode_steps=6)
    assert parity["prefill_max_abs_diff"] <= TOLERANCE, parity
    assert parity["decode_max_abs_diff"] <= TOLERANCE, parity
    assert parity["top1_agreement"] == 1.0
    num_layers = model.config.num_hidden_layers
    assert facts["num_layers"] == num_layers
    assert list(facts["inputs"])[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert list(facts["inputs"])[-1] == f"past_key_values.{num_layers - 1}.value"
    assert list(facts["outputs"])[-1] == f"present.{num_layers - 1}.value"
    assert facts["inputs"]["past_key_values.0.key"][::2] == ["batch", "past_sequence"]
    assert facts["outputs"]["present.0.key"][::2] == ["batch", "total_sequence"]
    assert set(facts["files"]) == {"model.onnx", "model.onnx.data"}
    if family == "mixtral":
        assert facts["experts_implementation"] == "batched_mm"
        assert model.config._experts_implementation == "grouped_mm"  # restored after capture


def test_greedy_generation_matches_transformers(llama):
    model, out_dir, _ = llama
    prompt = torch.tensor([[5, 17, 42, 99, 3, 64, 7]])
    expected = model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)[
        0
    ].tolist()

    result = OnnxCausalLM(out_dir, threads=2).generate(prompt[0].tolist(), max_new_tokens=12)
    assert result["tokens"] == expected
    assert result["new_tokens"] == expected[prompt.shape[1] :]
    assert result["decode_tokens_per_s"] > 0


def test_generation_stops_at_eos(llama):
    _, out_dir, _ = llama
    onnx_model = OnnxCausalLM(out_dir)
    first = onnx_model.generate([1, 2, 3], max_new_tokens=5)["new_tokens"]
    stopped = onnx_model.generate([1, 2, 3], max_new_tokens=5, eos_token_id=first[1])
    assert stopped["new_tokens"] == first[:2]


def test_logits_with_empty_past_match_torch(llama):
    """The perplexity path: the whole sequence with a past of length 0, [B, kv, 0, D]."""
    model, out_dir, _ = llama
    input_ids = torch.randint(0, model.config.vocab_size, (3, 9))
    with torch.no_grad():
        expected = model(input_ids, use_cache=False).logits.numpy()  # [B, S, V]
    actual = OnnxCausalLM(out_dir).logits(input_ids.numpy())
    assert actual.shape == expected.shape and actual.dtype == np.float32
    assert np.abs(actual - expected).max() <= TOLERANCE


def test_left_padded_batch_then_decode(llama):
    """A ragged batch with left padding: real positions match torch, decode continues both rows."""
    model, out_dir, _ = llama
    input_ids = torch.randint(0, model.config.vocab_size, (2, 6))
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]])
    parity = check_parity(model, out_dir, input_ids=input_ids, attention_mask=attention_mask, decode_steps=3)
    assert parity["prefill_max_abs_diff"] <= TOLERANCE
    assert parity["decode_max_abs_diff"] <= TOLERANCE

    # Row 1 alone (no padding) gives the same last-token logits as inside the padded batch.
    onnx_model = OnnxCausalLM(out_dir)
    batch = onnx_model.logits(input_ids.numpy(), attention_mask.numpy())
    alone = onnx_model.logits(input_ids[1:, 3:].numpy())
    assert np.abs(batch[1, -1] - alone[0, -1]).max() <= TOLERANCE


def test_step_with_past_matches_torch_cache(llama):
    """Feed a torch-made past of length 4 and 2 new tokens; compare logits and presents."""
    model, out_dir, _ = llama
    onnx_model = OnnxCausalLM(out_dir)
    tokens = torch.randint(0, model.config.vocab_size, (2, 6))
    cache = DynamicCache()
    with torch.no_grad():
        model(tokens[:, :4], past_key_values=cache, use_cache=True)
        past = [t.numpy().copy() for layer in cache.layers for t in (layer.keys, layer.values)]
        expected = model(tokens[:, 4:], past_key_values=cache, use_cache=True).logits.numpy()
    positions = np.array([[4, 5], [4, 5]])
    logits, present = onnx_model.step(tokens[:, 4:].numpy(), np.ones((2, 6)), positions, past)
    assert np.abs(logits - expected).max() <= TOLERANCE
    assert present[0].shape == (2, onnx_model.num_kv_heads, 6, onnx_model.head_dim)
    assert np.abs(present[0] - cache.layers[0].keys.numpy()).max() <= TOLERANCE


def test_ort_values_cache_gives_the_same_tokens(llama):
    _, out_dir, _ = llama
    plain = OnnxCausalLM(out_dir).generate([4, 8, 15, 16], max_new_tokens=6)
    bound = OnnxCausalLM(out_dir, use_ort_values=True).generate([4, 8, 15, 16], max_new_tokens=6)
    assert plain["tokens"] == bound["tokens"]


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_dropped_layers(family, tmp_path):
    """After removing layers 1 and 3 of 4, the artifact has 2 cache layers and still matches."""
    model = tiny_model(family, layers=4)
    remove_layers(model, "model.layers", [1, 3])
    assert model.config.num_hidden_layers == 2
    facts = export_onnx(model, tmp_path)
    assert facts["num_layers"] == 2
    assert "past_key_values.1.value" in facts["inputs"]
    assert "past_key_values.2.key" not in facts["inputs"]
    assert facts["parity"]["prefill_max_abs_diff"] <= TOLERANCE
    assert facts["parity"]["decode_max_abs_diff"] <= TOLERANCE

    prompt = torch.tensor([[9, 8, 7, 6, 5]])
    expected = model.generate(prompt, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)[
        0
    ].tolist()
    assert OnnxCausalLM(tmp_path).generate(prompt[0], max_new_tokens=6)["tokens"] == expected


def test_stale_layer_count_is_a_clear_error(tmp_path):
    model = tiny_model("llama", layers=3)
    model.model.layers = model.model.layers[:2]  # forgot config.num_hidden_layers
    with pytest.raises(RuntimeError, match="num_hidden_layers"):
        export_onnx(model, tmp_path)


def test_runtime_rejects_an_encoder_artifact(tmp_path):
    export_onnx(tiny_model("bert", layers=2), tmp_path, parity=False)
    with pytest.raises(ValueError, match="not a KV-cache decoder"):
        OnnxCausalLM(tmp_path)


def test_generate_validates_arguments(llama):
    _, out_dir, _ = llama
    onnx_model = OnnxCausalLM(out_dir)
    with pytest.raises(ValueError, match="non-empty prompt"):
        onnx_model.generate([], max_new_tokens=3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        onnx_model.generate([1, 2], max_new_tokens=0)
