"""Real checkpoints through the ONNX Runtime backend: SmolLM2-135M (decoder) and MiniLM (encoder).

Run with `-s` to see the measured numbers (parity, tokens/s).
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, DynamicCache

from modelfold.backends.onnxruntime.export import copy_tokenizer_files, export_onnx
from modelfold.backends.onnxruntime.runtime import OnnxCausalLM, OnnxEncoder

pytestmark = pytest.mark.slow

TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "developed a system of movable metal type in Mainz. His invention spread quickly across "
    "Europe, and within fifty years printers were at work in more than two hundred cities. Books "
    "became cheaper, literacy rose, and new ideas travelled faster than ever before. Scholars"
)
THREADS = 2


@pytest.fixture(scope="module")
def smollm2(smollm2_dir, tmp_path_factory):
    """SmolLM2 in torch, its tokenizer, and its exported artifact."""
    torch.set_num_threads(THREADS)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    out_dir = tmp_path_factory.mktemp("smollm2_onnx")
    facts = export_onnx(model, out_dir)
    copy_tokenizer_files(smollm2_dir, out_dir)
    print(f"\nSmolLM2 export: {facts['export_seconds']} s, files {facts['files']}")
    print(f"SmolLM2 parity probe: {facts['parity']}")
    return model, tokenizer, out_dir, facts


def test_smollm2_artifact_facts(smollm2):
    model, _, out_dir, facts = smollm2
    assert facts["num_layers"] == 30 and facts["num_kv_heads"] == 3 and facts["head_dim"] == 64
    # The tied embedding / LM head is stored once: the data file is not larger than the weights.
    weight_bytes = sum(p.numel() * 4 for p in model.parameters())  # parameters() dedups ties
    assert facts["tied_weight_matmuls"] == 1
    assert facts["files"]["model.onnx.data"] < weight_bytes * 1.01
    assert facts["parity"]["top1_agreement"] == 1.0
    assert (out_dir / "tokenizer.json").is_file()


def test_smollm2_logits_match_torch(smollm2):
    model, tokenizer, out_dir, _ = smollm2
    input_ids = tokenizer(TEXT, return_tensors="np").input_ids[:, :64]  # [1, 64]
    with torch.no_grad():
        expected = model(torch.from_numpy(input_ids), use_cache=False).logits.numpy()
    actual = OnnxCausalLM(out_dir, threads=THREADS).logits(input_ids)
    diff = float(np.abs(actual - expected).max())
    scale = float(np.abs(expected).max())
    top1 = float((actual.argmax(-1) == expected.argmax(-1)).mean())
    print(f"\nSmolLM2 logits [1, 64, V]: max abs diff {diff:.2e} (max |logit| {scale:.1f}), top-1 {top1}")
    assert diff <= 1e-3
    assert top1 == 1.0


def test_smollm2_greedy_tokens_match_transformers(smollm2):
    model, tokenizer, out_dir, _ = smollm2
    prompt = tokenizer(TEXT, return_tensors="pt").input_ids[:, :64]
    eos = model.generation_config.eos_token_id
    with torch.no_grad():
        expected = model.generate(prompt, max_new_tokens=32, do_sample=False, eos_token_id=eos)
    result = OnnxCausalLM(out_dir, threads=THREADS).generate(
        prompt[0].tolist(), max_new_tokens=32, eos_token_id=eos
    )
    print(f"\nSmolLM2 greedy continuation: {tokenizer.decode(result['new_tokens'])!r}")
    assert result["tokens"] == expected[0].tolist()


def _torch_decode(model, prompt: list[int], max_new_tokens: int) -> tuple[list[int], float]:
    """Greedy decoding in eager torch with a DynamicCache; returns tokens and decode tokens/s."""
    with torch.no_grad():
        cache = DynamicCache()
        out = model(torch.tensor([prompt]), past_key_values=cache, use_cache=True, logits_to_keep=1)
        tokens = [int(out.logits[0, -1].argmax())]
        start = time.perf_counter()
        while len(tokens) < max_new_tokens:
            out = model(torch.tensor([[tokens[-1]]]), past_key_values=cache, use_cache=True)
            tokens.append(int(out.logits[0, -1].argmax()))
        return tokens, (max_new_tokens - 1) / (time.perf_counter() - start)


def test_smollm2_onnx_decodes_faster_than_torch(smollm2):
    """64-token prompt, 64 new tokens, 2 threads, median of 3 (interleaved runs)."""
    model, tokenizer, out_dir, _ = smollm2
    prompt = tokenizer(TEXT).input_ids[:64]
    onnx_model = OnnxCausalLM(out_dir, threads=THREADS)
    onnx_model.generate(prompt, max_new_tokens=4)  # warm-up
    _torch_decode(model, prompt, 4)

    torch_rates, onnx_rates = [], []
    for _ in range(3):
        tokens, rate = _torch_decode(model, prompt, 64)
        torch_rates.append(rate)
        result = onnx_model.generate(prompt, max_new_tokens=64)
        onnx_rates.append(result["decode_tokens_per_s"])
        assert result["new_tokens"] == tokens
    torch_rate, onnx_rate = statistics.median(torch_rates), statistics.median(onnx_rates)
    print(f"\nSmolLM2 decode tokens/s: torch eager {torch_rate:.1f}, ONNX Runtime {onnx_rate:.1f}")
    assert onnx_rate > torch_rate


def test_minilm_encoder_matches_torch(minilm_dir, tmp_path):
    model = AutoModel.from_pretrained(minilm_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    facts = export_onnx(model, tmp_path)
    batch = tokenizer(
        [TEXT, "A short sentence.", "Printing spread across Europe."],
        padding=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        expected = model(**batch).last_hidden_state.numpy()
    actual = OnnxEncoder(tmp_path)(**{k: v.numpy() for k, v in batch.items()})
    real = batch["attention_mask"].bool().numpy()
    diff = float(np.abs(actual[real] - expected[real]).max())
    print(f"\nMiniLM last_hidden_state max abs diff {diff:.2e}; probe {facts['parity']}")
    assert diff <= 1e-4
