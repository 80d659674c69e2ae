"""N:M sparsity on the real SmolLM2-135M and real text (slow): the invariant on every pruned layer,
the method ordering, sparse + int4, sparsity-aware training and the ONNX artifact.

Perplexities use the first 10,000 characters of the evaluation split and a small calibration set
to keep the suite fast; ``tools/bench_sparsity.py`` measures the full protocol.
"""

from __future__ import annotations

import pytest
import torch

import modelfold
from modelfold.artifact import open_artifact
from modelfold.evaluate import evaluate
from modelfold.ir.sparse import NMLinear, NMQuantLinear, group_nonzeros
from modelfold.passes.sparsify import sparse_layers
from tests.conftest import copy_of
from tests.helpers import QUIET

pytestmark = pytest.mark.slow

CHARS = 10_000
CALIB = "n_samples=8,seq_len=256"


@pytest.fixture(scope="module")
def base(smollm2_base):
    return smollm2_base


@pytest.fixture(scope="module")
def text(eval_text):
    return eval_text


@pytest.fixture(scope="module")
def sparsegpt(base):
    return modelfold.transform(copy_of(base), f"nm-sparsify{{method=sparsegpt,{CALIB}}}",
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
    magnitude = modelfold.transform(copy_of(base), "nm-sparsify{method=magnitude}",
                                    context=QUIET)
    dense = _ppl(base.module, base.tokenizer, text)
    ppl_sparsegpt = _ppl(sparsegpt.module, base.tokenizer, text)
    ppl_magnitude = _ppl(magnitude.module, base.tokenizer, text)
    assert dense < ppl_sparsegpt < ppl_magnitude
    assert ppl_sparsegpt < 5 * dense < ppl_magnitude  # calibrated 2:4 stays usable; magnitude not


def test_sparse_then_int4_keeps_the_pattern_on_the_real_model(sparsegpt, text):
    result = modelfold.transform(copy_of(sparsegpt.program),
                                 "quantize{bits=4,group_size=128}", context=QUIET)
    layers = sparse_layers(result.module)
    assert len(layers) == 210 and all(isinstance(m, NMQuantLinear) for m in layers.values())
    assert all(int(group_nonzeros(m.weight, 4).max()) <= 2 for m in layers.values())
    ppl = _ppl(result.module, result.program.tokenizer, text)
    assert ppl < 2 * _ppl(sparsegpt.module, result.program.tokenizer, text)


def test_sparse_training_runs_on_the_real_model_and_stays_2_4(base, sparsegpt):
    from modelfold.sparse_training import sparse_train

    program = copy_of(sparsegpt.program)
    report = sparse_train(program, teacher=base.module, steps=2, batch_size=1, seq_len=64,
                          eval_chars=2_000, progress=False, log=None)
    assert report["sparse"]["layers"] == 210
    assert all(int(group_nonzeros(m.weight, 4).max()) <= 2
               for m in sparse_layers(program.module).values())
    assert report["perplexity_after"] < 3 * report["perplexity_before"]


def test_the_compressed_onnx_artifact_is_smaller_and_matches_the_sparse_model(smollm2_short,
                                                                             tmp_path):
    """The real model's first layers, SparseGPT 2:4, exported compressed: the sparse layers'
    tensors take 53 % of their dense bytes, the artifact shrinks by that, matches the eager model
    and generates its tokens."""
    dense_fp32_bytes = 4 * smollm2_short.parameter_count()
    result = modelfold.transform(smollm2_short, f"nm-sparsify{{method=sparsegpt,{CALIB}}}",
                                 context=QUIET)
    manifest = modelfold.export(result, tmp_path / "onnx")
    sparse = manifest["sparse"]
    assert sparse["mode"] == "compressed" and sparse["layers"] == 4 * 7
    assert sparse["compressed_bytes"] < 0.55 * sparse["dense_bytes"]
    saved = sparse["dense_bytes"] - sparse["compressed_bytes"]
    assert manifest["onnx_bytes"] < dense_fp32_bytes - 0.9 * saved
    parity = manifest["parity"]
    assert parity["prefill_max_abs_diff"] < 1e-3 and parity["decode_max_abs_diff"] < 1e-3
    ids = result.program.tokenizer("The history of the Roman Empire", return_tensors="pt")
    expected = result.module.generate(**ids, max_new_tokens=8, do_sample=False)[0].tolist()
    prompt = ids["input_ids"][0].tolist()
    assert open_artifact(tmp_path / "onnx").generate(prompt, 8)["tokens"] == expected
