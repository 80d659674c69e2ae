"""KV-cache decoder export: parity per architecture, generation, runtime, dropped layers."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from transformers import DynamicCache

from modelfold.backends.onnxruntime.export import check_parity, export_onnx
from modelfold.backends.onnxruntime.runtime import OnnxCausalLM
from modelfold.generation import Sampling
from modelfold.passes.drop_layers import remove_layers
from tests.tiny_models import DECODER_FAMILIES, tiny_model

TOLERANCE = 1e-4


FUSIONS = ("fuse-attention", "fuse-projections", "fuse-norms")


@pytest.fixture(scope="module", params=["fused", "unfused"])
def llama(request, tmp_path_factory):
    """A tiny llama and its artifact (exported once for the runtime tests): with the default
    fusions (GroupQueryAttention, right padding, shared KV buffers) and without them (the
    captured attention, left padding, the cache grown by Concat)."""
    fused = request.param == "fused"
    model = tiny_model("llama", layers=2, fusable=True)
    out_dir = tmp_path_factory.mktemp("llama")
    facts = export_onnx(model, out_dir, disable=() if fused else FUSIONS)
    return model, out_dir, facts


@pytest.mark.parametrize("fusions", ["default", "none"])
@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_decoder_parity(family, fusions, tmp_path):
    """Prefill (empty past, a batch with one row padded) and 6 decode steps: 7 + 6 tokens run
    well past the sliding window (4) of Mistral / Gemma2 / Gemma3. With the default fusions every
    family's attention is one GroupQueryAttention per layer (the artifact takes right padding);
    without them the captured attention is lowered as it is."""
    model = tiny_model(family, layers=2, fusable=True)
    if family == "mixtral":  # transformers' default, which captures to an op ONNX lacks
        model.set_experts_implementation("grouped_mm")
    facts = export_onnx(model, tmp_path, parity=False,
                        disable=FUSIONS if fusions == "none" else ())

    parity = check_parity(model, tmp_path, decode_steps=6)
    assert parity["prefill_max_abs_diff"] <= TOLERANCE, parity
    assert parity["decode_max_abs_diff"] <= TOLERANCE, parity
    assert parity["top1_agreement"] == 1.0
    num_layers = model.config.num_hidden_layers
    gqa = facts["onnx_nodes"].get("com.microsoft.GroupQueryAttention", 0)
    assert gqa == (num_layers if fusions == "default" else 0)
    assert OnnxCausalLM(tmp_path).padding == ("right" if gqa else "left")
    assert facts["num_layers"] == num_layers
    assert list(facts["inputs"])[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert list(facts["inputs"])[-1] == f"past_key_values.{num_layers - 1}.value"
    assert list(facts["outputs"])[-1] == f"present.{num_layers - 1}.value"
    assert facts["inputs"]["past_key_values.0.key"][::2] == ["batch", "past_sequence"]
    assert facts["outputs"]["present.0.key"][0] == "batch"
    assert set(facts["files"]) == {"model.onnx", "model.onnx.data"}
    if family == "mixtral":
        assert facts["experts_implementation"] == "batched_mm"
        assert model.config._experts_implementation == "grouped_mm"  # restored after capture
    if fusions == "default":  # the skip norms' unread statistics are not even allocated
        graph = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False).graph
        skips = [n for n in graph.node if n.op_type.startswith("Skip")]
        assert skips and all(list(n.output[1:3]) == ["", ""] for n in skips)
    # logits_to_keep: the LM head (a bias, Gemma 2's soft-cap after it) on the last k positions
    assert facts["logits"]["input"] == "logits_to_keep", facts["logits"]
    assert facts["outputs"]["logits"][1] == "logits_sequence"
    lm = OnnxCausalLM(tmp_path)
    ids = np.array([[3, 1, 4, 1, 5, 9]])
    full = lm.logits(ids)
    kept, _ = lm.bound_step(ids, np.ones_like(ids), np.arange(6)[None], lm.new_cache(1, 6), 2)
    assert kept.shape == (1, 2, full.shape[-1])
    np.testing.assert_allclose(kept, full[:, -2:], atol=1e-5)


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


def test_padded_batch_then_decode(llama):
    """A ragged batch: real positions match torch, decode continues both rows; the artifact
    takes the padding on its side (right with GroupQueryAttention) and refuses the other."""
    model, out_dir, _ = llama
    input_ids = torch.randint(0, model.config.vocab_size, (2, 6))
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]])
    parity = check_parity(model, out_dir, input_ids=input_ids, attention_mask=attention_mask, decode_steps=3)
    assert parity["prefill_max_abs_diff"] <= TOLERANCE
    assert parity["decode_max_abs_diff"] <= TOLERANCE

    # Row 1 alone (no padding) gives the same last-token logits as inside the padded batch.
    onnx_model = OnnxCausalLM(out_dir)
    mask, ids, last = attention_mask.numpy(), input_ids.numpy().copy(), -1
    if onnx_model.padding == "right":
        mask, last = mask[:, ::-1].copy(), 2
        ids[1] = np.concatenate([ids[1, 3:], ids[1, :3]])
    batch = onnx_model.logits(ids, mask)
    alone = onnx_model.logits(input_ids[1:, 3:].numpy())
    assert np.abs(batch[1, last] - alone[0, -1]).max() <= TOLERANCE
    with pytest.raises(ValueError, match="padded"):
        onnx_model.logits(ids, mask[:, ::-1].copy())


def test_step_with_past_matches_torch_cache(llama):
    """Feed a torch-made past of length 4 and 2 new tokens; compare logits and presents (one row
    with GroupQueryAttention, which refuses several new tokens per row in a batch with a past)."""
    model, out_dir, _ = llama
    onnx_model = OnnxCausalLM(out_dir)
    batch = 1 if onnx_model.padding == "right" else 2
    if batch == 1:
        with pytest.raises(ValueError, match="one row at a time"):
            onnx_model.step(np.ones((2, 2), np.int64), np.ones((2, 6)), np.ones((2, 2)),
                            [np.zeros((2, onnx_model.num_kv_heads, 4, onnx_model.head_dim),
                                      np.float32)] * len(onnx_model.past_names))
    tokens = torch.randint(0, model.config.vocab_size, (batch, 6))
    cache = DynamicCache()
    with torch.no_grad():
        model(tokens[:, :4], past_key_values=cache, use_cache=True)
        past = [t.numpy().copy() for layer in cache.layers for t in (layer.keys, layer.values)]
        expected = model(tokens[:, 4:], past_key_values=cache, use_cache=True).logits.numpy()
    positions = np.array([[4, 5]] * batch)
    logits, present = onnx_model.step(tokens[:, 4:].numpy(), np.ones((batch, 6)), positions, past)
    assert np.abs(logits - expected).max() <= TOLERANCE
    assert present[0].shape == (batch, onnx_model.num_kv_heads, 6, onnx_model.head_dim)
    assert np.abs(present[0] - cache.layers[0].keys.numpy()).max() <= TOLERANCE


def test_batch_generation_equals_one_prompt_at_a_time(llama):
    """Prompts of different lengths in one batch give each prompt's own greedy tokens."""
    model, out_dir, _ = llama
    lm = OnnxCausalLM(out_dir)
    prompts = [[5, 9, 17, 3, 8], [4, 8], [1, 2, 3, 4, 5, 6, 7]]
    batch = lm.generate(prompts, max_new_tokens=8)
    for prompt, tokens, sequence in zip(prompts, batch["new_tokens"], batch["sequences"]):
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)[0].tolist()
        assert sequence == expected
        assert tokens == expected[len(prompt):]


def test_sampling_is_seeded(llama):
    _, out_dir, _ = llama
    lm = OnnxCausalLM(out_dir)
    sampling = Sampling(temperature=0.9, top_k=20, top_p=0.9, seed=3)
    first = lm.generate([4, 8, 15], 12, sampling=sampling)["new_tokens"]
    assert lm.generate([4, 8, 15], 12, sampling=sampling)["new_tokens"] == first
    other = lm.generate([4, 8, 15], 12, sampling=Sampling(temperature=0.9, seed=4))["new_tokens"]
    assert other != first
    assert lm.generate([4, 8, 15], 12)["new_tokens"] != first  # greedy by default


def test_decode_writes_the_shared_cache_in_place(llama):
    """With GroupQueryAttention the same buffer is bound as past and present: a decode step
    leaves every row but the new token's untouched (nothing is copied)."""
    model, out_dir, _ = llama
    lm = OnnxCausalLM(out_dir)
    if lm.padding != "right":
        assert lm.new_cache(1, 8)[0].shape() == [1, lm.num_kv_heads, 0, lm.head_dim]
        return
    cache = lm.new_cache(1, 8)
    ids = np.array([[3, 1, 4, 1]])
    lm.bound_step(ids, np.ones((1, 4), np.int64), np.arange(4)[None], cache)
    before = cache[0].numpy().copy()
    address = cache[0].data_ptr()
    lm.bound_step(np.array([[5]]), np.ones((1, 5), np.int64), np.array([[4]]), cache)
    after = cache[0].numpy()
    assert cache[0].data_ptr() == address and cache[0].shape() == [1, lm.num_kv_heads, 8, lm.head_dim]
    np.testing.assert_array_equal(after[:, :, :4], before[:, :, :4])
    assert not np.array_equal(after[:, :, 4], before[:, :, 4])
    np.testing.assert_array_equal(after[:, :, 5:], before[:, :, 5:])


def test_a_missing_execution_provider_is_a_clear_error(llama):
    with pytest.raises(ValueError, match="onnxruntime-gpu"):
        OnnxCausalLM(llama[1], provider="cuda")
    with pytest.raises(ValueError, match="unknown execution provider"):
        OnnxCausalLM(llama[1], provider="tpu")


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
    with pytest.raises(ValueError, match="non-empty prompts"):
        onnx_model.generate([], max_new_tokens=3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        onnx_model.generate([1, 2], max_new_tokens=0)


def test_a_float16_artifact_matches_the_float16_model(tmp_path):
    """ExportOptions.dtype="float16" (what a CUDA artifact is): the program is cast, captured and
    fused in float16; ONNX Runtime runs it (here on the CPU) like the float16 torch model."""
    model = tiny_model("llama", layers=2, fusable=True)
    facts = export_onnx(model, tmp_path, dtype="float16")
    assert facts["dtype"] == "float16" and facts["onnx_nodes"]["com.microsoft.GroupQueryAttention"] == 2
    assert facts["parity"]["top1_agreement"] == 1.0
    assert facts["parity"]["prefill_max_abs_diff"] < 2e-3
    lm = OnnxCausalLM(tmp_path)
    assert lm.cache_dtype == np.float16
    prompt = torch.tensor([[5, 17, 42, 99]])
    expected = model.half().generate(prompt, max_new_tokens=6, do_sample=False, eos_token_id=None,
                                     pad_token_id=0)[0].tolist()
    assert lm.generate(prompt[0].tolist(), 6)["tokens"] == expected


def test_a_cuda_export_needs_the_cuda_provider_and_float16(tmp_path):
    model = tiny_model("llama", layers=2, fusable=True)
    with pytest.raises(ValueError, match="provider' cuda needs dtype float16"):
        export_onnx(model, tmp_path, provider="cuda")
    with pytest.raises(ValueError, match="onnxruntime-gpu"):  # no CUDA on this machine
        export_onnx(model, tmp_path, provider="cuda", dtype="float16")
