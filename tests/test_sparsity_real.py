"""N:M sparsity on the real SmolLM2-135M and real text (slow): the invariant on every pruned layer,
the method ordering, sparse + int4, sparsity-aware training and the ONNX artifact.

Perplexities use the first 20,000 characters of the evaluation split and a small calibration set
to keep the suite fast; ``tools/bench_sparsity.py`` measures the full protocol.
"""

from __future__ import annotations

import copy

import pytest
import torch

import modelfold
from modelfold.corpus import corpus_text
from modelfold.evaluate import evaluate
from modelfold.ir.sparse import NMLinear, NMQuantLinear, group_nonzeros
from modelfold.passes.manager import PassContext
from modelfold.passes.sparsify import sparse_layers

pytestmark = pytest.mark.slow

CHARS = 20_000
QUIET = PassContext(log=None, verify=False, measure=False)
CALIB = "n_samples=16,seq_len=256"


@pytest.fixture(scope="module")
def text():
    return corpus_text("wikipedia", "evaluation")


@pytest.fixture(scope="module")
def base():
    return modelfold.load("smollm2-135m")


@pytest.fixture(scope="module")
def sparsegpt(base):
    return modelfold.transform(copy.deepcopy(base), f"nm-sparsify{{method=sparsegpt,{CALIB}}}",
                               context=QUIET)


def _ppl(module, tokenizer, text) -> float:
    return evaluate(module, tokenizer, text, chars=CHARS, progress=False)["perplexity"]


def test_every_pruned_layer_of_the_real_model_is_exactly_2_4(sparsegpt):
    layers = sparse_layers(sparsegpt.module)
    assert len(layers) == 30 * 7 and all(isinstance(m, NMLinear) for m in layers.values())
    for path, layer in layers.items():
        counts = group_nonzeros(layer.weight, 4)
        assert int(counts.max()) <= 2, path
    assert sparsegpt.program.log[-1].skipped == []
    # the embedding / LM head (tied) stay dense
    assert isinstance(sparsegpt.module.lm_head, torch.nn.Linear)


def test_sparsegpt_beats_magnitude_on_real_text(base, sparsegpt, text):
    magnitude = modelfold.transform(copy.deepcopy(base), "nm-sparsify{method=magnitude}",
                                    context=QUIET)
    dense = _ppl(base.module, base.tokenizer, text)
    ppl_sparsegpt = _ppl(sparsegpt.module, base.tokenizer, text)
    ppl_magnitude = _ppl(magnitude.module, base.tokenizer, text)
    assert dense < ppl_sparsegpt < ppl_magnitude
    assert ppl_sparsegpt < 5 * dense < ppl_magnitude  # calibrated 2:4 stays usable; magnitude not


def test_sparse_then_int4_keeps_the_pattern_on_the_real_model(sparsegpt, text):
    result = modelfold.transform(copy.deepcopy(sparsegpt.program),
                                 "quantize{bits=4,group_size=128}", context=QUIET)
    layers = sparse_layers(result.module)
    assert len(layers) == 210 and all(isinstance(m, NMQuantLinear) for m in layers.values())
    assert all(int(group_nonzeros(m.weight, 4).max()) <= 2 for m in layers.values())
    ppl = _ppl(result.module, result.program.tokenizer, text)
    assert ppl < 2 * _ppl(sparsegpt.module, result.program.tokenizer, text)


def test_sparse_training_runs_on_the_real_model_and_stays_2_4(base, sparsegpt):
    from modelfold.sparse_training import sparse_train

    program = copy.deepcopy(sparsegpt.program)
    report = sparse_train(program, teacher=base.module, steps=2, batch_size=1, seq_len=64,
                          eval_chars=2_000, progress=False, log=None)
    assert report["sparse"]["layers"] == 210
    assert all(int(group_nonzeros(m.weight, 4).max()) <= 2
               for m in sparse_layers(program.module).values())
    assert report["perplexity_after"] < 3 * report["perplexity_before"]


def test_the_compressed_onnx_artifact_is_smaller_and_matches_the_sparse_model(sparsegpt, tmp_path):
    from modelfold.backends.onnxruntime.runtime import OnnxCausalLM

    manifest = modelfold.export(sparsegpt.program, tmp_path / "onnx")
    dense_fp32_bytes = 4 * sum(p.numel() for p in modelfold.load("smollm2-135m").module.parameters())
    assert manifest["sparse"]["mode"] == "compressed" and manifest["sparse"]["layers"] == 210
    assert manifest["onnx_bytes"] < 0.7 * dense_fp32_bytes
    parity = manifest["parity"]
    assert parity["prefill_max_abs_diff"] < 1e-3 and parity["decode_max_abs_diff"] < 1e-3
    ids = sparsegpt.program.tokenizer("The history of the Roman Empire", return_tensors="pt")
    lm = OnnxCausalLM(tmp_path / "onnx")
    expected = sparsegpt.module.generate(**ids, max_new_tokens=8, do_sample=False)[0].tolist()
    prompt = ids["input_ids"][0].tolist()
    assert lm.generate(prompt, 8)["tokens"] == expected
