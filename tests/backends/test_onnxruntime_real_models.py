"""Real checkpoints through the ONNX Runtime backend: SmolLM2-135M (decoder, the session's one
full-depth artifact) and MiniLM (encoder). Speed is measured by tools/bench_spine.py, not here.

Run with `-s` to see the measured numbers (parity).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from modelfold.backends.onnxruntime.export import export_onnx
from modelfold.backends.onnxruntime.runtime import OnnxCausalLM, OnnxEncoder

pytestmark = pytest.mark.slow

TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "developed a system of movable metal type in Mainz. His invention spread quickly across "
    "Europe, and within fifty years printers were at work in more than two hundred cities. Books "
    "became cheaper, literacy rose, and new ideas travelled faster than ever before. Scholars"
)
THREADS = 2


def test_smollm2_artifact_facts(smollm2_base, smollm2_artifact):
    out_dir, manifest = smollm2_artifact
    facts = manifest["onnx"]
    print(f"\nSmolLM2 export: {facts['seconds']} s, files {facts['files']}")
    print(f"SmolLM2 parity probe: {manifest['parity']}")
    assert facts["num_layers"] == 30 and facts["num_kv_heads"] == 3 and facts["head_dim"] == 64
    # The tied embedding / LM head is stored once: the data file is not larger than the weights.
    weight_bytes = sum(p.numel() * 4 for p in smollm2_base.module.parameters())  # dedups ties
    assert facts["tied_weight_matmuls"] == 1 and "tied-linear" in facts["graph_passes"]
    assert facts["files"]["model.onnx.data"] < weight_bytes * 1.01
    assert manifest["parity"]["top1_agreement"] == 1.0
    assert facts["lowered_graph"] == {"verified": True, "captures_during_export": 1}
    assert (out_dir / "tokenizer.json").is_file()
    assert facts["inputs"]["past_key_values.0.key"] == ["batch", 3, "past_sequence", 64]
    assert facts["outputs"]["present.29.value"] == ["batch", 3, "total_sequence", 64]


def test_smollm2_logits_match_torch(smollm2_base, smollm2_artifact):
    tokenizer = smollm2_base.tokenizer
    input_ids = tokenizer(TEXT, return_tensors="np").input_ids[:, :64]  # [1, 64]
    with torch.no_grad():
        expected = smollm2_base.module(torch.from_numpy(input_ids), use_cache=False).logits.numpy()
    actual = OnnxCausalLM(smollm2_artifact[0], threads=THREADS).logits(input_ids)
    diff = float(np.abs(actual - expected).max())
    scale = float(np.abs(expected).max())
    top1 = float((actual.argmax(-1) == expected.argmax(-1)).mean())
    print(f"\nSmolLM2 logits [1, 64, V]: max abs diff {diff:.2e} (max |logit| {scale:.1f}), top-1 {top1}")
    assert diff <= 1e-3
    assert top1 == 1.0


def test_smollm2_greedy_tokens_match_transformers(smollm2_base, smollm2_artifact):
    """32 greedy tokens after a 64-token prompt: the artifact's KV-cache decode loop gives
    transformers' generate() tokens (the prefill, then one token per step)."""
    model, tokenizer = smollm2_base.module, smollm2_base.tokenizer
    prompt = tokenizer(TEXT, return_tensors="pt").input_ids[:, :64]
    eos = model.generation_config.eos_token_id
    with torch.no_grad():
        expected = model.generate(prompt, max_new_tokens=32, do_sample=False, eos_token_id=eos)
    result = OnnxCausalLM(smollm2_artifact[0], threads=THREADS).generate(
        prompt[0].tolist(), max_new_tokens=32, eos_token_id=eos
    )
    print(f"\nSmolLM2 greedy continuation: {tokenizer.decode(result['new_tokens'])!r}")
    assert result["tokens"] == expected[0].tolist()


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
    assert facts["inputs"]["input_ids"] == ["batch", "sequence"]
