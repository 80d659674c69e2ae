"""Quantization on the real SmolLM2-135M and real text (slow): quality, export, parity, size.

Perplexities here use the first 10,000 characters of the evaluation split (about 2,200 tokens)
and a small calibration set, to keep the suite fast; ``tools/bench_quantize.py`` measures the
full protocol. Where depth is not what is tested (per-layer errors, the artifact's lowering and
size), the model is SmolLM2 cut to its first layers (``smollm2_short``).
"""

from __future__ import annotations

import pytest
import torch

import modelfold
from modelfold.artifact import open_artifact
from modelfold.evaluate import evaluate
from modelfold.ir.quant import QuantEmbedding, QuantLinear
from tests.helpers import QUIET

pytestmark = pytest.mark.slow

CHARS = 10_000


@pytest.fixture(scope="module")
def fp32_ppl(smollm2_base, eval_text):
    return evaluate(smollm2_base.module, smollm2_base.tokenizer, eval_text, chars=CHARS,
                    progress=False)["perplexity"]


def _ppl(result, text) -> float:
    return evaluate(result.module, result.program.tokenizer, text, chars=CHARS,
                    progress=False)["perplexity"]


def test_int8_per_channel_is_within_one_percent(smollm2, eval_text, fp32_ppl):
    result = modelfold.transform(smollm2, "quantize{bits=8,group_size=-1}", context=QUIET)
    assert sum(isinstance(m, QuantLinear) for m in result.module.modules()) == 30 * 7
    assert _ppl(result, eval_text) < fp32_ppl * 1.01


def test_gptq_beats_rtn_at_int4_g128(smollm2_base, eval_text, fp32_ppl):
    """Full depth, 8 x 256 calibration tokens: GPTQ removes a real share of RTN's damage."""
    from tests.conftest import copy_of

    rtn = _ppl(modelfold.transform(copy_of(smollm2_base), "quantize{bits=4,group_size=128}",
                                   context=QUIET), eval_text)
    gptq = _ppl(modelfold.transform(
        copy_of(smollm2_base),
        "quantize{bits=4,group_size=128,method=gptq,n_samples=8,seq_len=256,mse=false}",
        context=QUIET), eval_text)
    print(f"\nSmolLM2 int4 g128, {CHARS:,} chars: fp32 {fp32_ppl:.3f}, RTN {rtn:.3f}, "
          f"GPTQ {gptq:.3f}")
    assert fp32_ppl < gptq < rtn
    assert gptq - fp32_ppl < 0.75 * (rtn - fp32_ppl)


@pytest.mark.parametrize("method", ["gptq", "awq-gptq"])
def test_calibrated_layers_beat_rtn_layer_by_layer(smollm2_short, method):
    """On real weights and real calibration text, every layer's output error after GPTQ (and
    after AWQ's scales + GPTQ) is below what RTN would give the same layer on the same inputs."""
    result = modelfold.transform(
        smollm2_short, f"quantize{{bits=4,group_size=128,method={method},n_samples=8,"
                       "seq_len=256,awq_samples=2}", context=QUIET)
    layers = result.program.log[0].details["layers"]
    assert len(layers) == 4 * 7
    worse = [e["path"] for e in layers if not e["output_error"] < e["rtn_output_error"]]
    assert not worse, worse


def test_int4_artifact_with_quantized_table_is_small_and_matches_eager(smollm2_short, eval_text,
                                                                       tmp_path):
    """int4 g128 everywhere (tied embedding + LM head too): <= 25 % of the float32 bytes, the
    ONNX artifact scores the same perplexity as eager PyTorch (accuracy_level 0), generates the
    eager model's next token."""
    fp32_bytes = 4 * smollm2_short.parameter_count()
    result = modelfold.transform(
        smollm2_short, "quantize{bits=4,group_size=128,embeddings=true,lm_head=true}",
        context=QUIET)
    module = result.module
    assert isinstance(module.model.embed_tokens, QuantEmbedding)
    assert isinstance(module.lm_head, QuantLinear)
    assert module.lm_head.qweight is module.model.embed_tokens.qweight  # one packed table
    manifest = modelfold.export(result, tmp_path / "int4")
    weights = sum(f.stat().st_size for f in (tmp_path / "int4").iterdir()
                  if f.name.startswith("model.onnx"))
    assert weights <= 0.25 * fp32_bytes, (weights, fp32_bytes)
    assert manifest["parity"]["top1_agreement"] >= 0.99

    lm = open_artifact(tmp_path / "int4", threads=2)
    onnx_ppl = evaluate(lm, result.program.tokenizer, eval_text, chars=CHARS,
                        progress=False)["perplexity"]
    eager_ppl = _ppl(result, eval_text)
    assert abs(onnx_ppl / eager_ppl - 1) < 1e-3, (onnx_ppl, eager_ppl)

    prompt = result.program.tokenizer("The capital of France is").input_ids
    out = lm.generate(prompt, 8)
    assert len(out["new_tokens"]) == 8
    with torch.no_grad():
        eager_next = int(module(input_ids=torch.tensor([prompt])).logits[0, -1].argmax())
    assert out["new_tokens"][0] == eager_next
