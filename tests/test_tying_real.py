"""tie-layers on the real SmolLM2-135M (30 layers): exactness at K = N and at full rank, N/K fewer
unique block parameters, an ONNX artifact that stores the shared weights once and generates."""

from __future__ import annotations

import pytest
import torch

import modelfold
from modelfold.backends.onnxruntime.runtime import OnnxCausalLM
from modelfold.corpus import corpus_text
from modelfold.passes.base import PreconditionError
from modelfold.passes.manager import PassContext

pytestmark = pytest.mark.slow
QUIET = PassContext(log=None)


@pytest.fixture(scope="module")
def smol():
    program = modelfold.load()
    ids = program.tokenizer(corpus_text("wikipedia", "evaluation")[:600],
                            return_tensors="pt").input_ids[:, :96]
    return program, ids, program.logits(ids)


def test_full_rank_relaxation_reproduces_smollm2(smol):
    program, ids, want = smol
    result = modelfold.transform("smollm2-135m", "tie-layers{unique=15,init=average,"
                                 "relax_rank=full}", context=QUIET)
    record = result.program.log[-1]
    assert record.kind == "exact"  # checked by the pass manager on its probe batch too
    got = result.program.logits(ids)
    assert (got - want).abs().max().item() < 1e-3  # |logits| reach ~30: float rounding
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_k_equal_n_is_exact_and_k15_halves_the_block(smol):
    program, ids, want = smol
    same = modelfold.transform("smollm2-135m", "tie-layers{unique=30,init=stepwise}",
                               context=QUIET)
    assert torch.equal(same.program.logits(ids), want)
    half = modelfold.transform("smollm2-135m", "tie-layers{unique=15}", context=QUIET)
    d = half.program.log[-1].details
    assert d["block_parameters_before"] == 2 * d["block_parameters_after"]
    assert half.program.parameter_count() == program.parameter_count() - \
        d["block_parameters_before"] // 2
    with pytest.raises(PreconditionError, match="K=7 does not divide the 30 layers"):
        modelfold.transform("smollm2-135m", "tie-layers{unique=7}", context=QUIET)


def test_k10_artifact_stores_shared_weights_once_and_generates(smol, tmp_path):
    program, ids, _ = smol
    result = modelfold.transform("smollm2-135m", "tie-layers{unique=10}", context=QUIET)
    manifest = modelfold.export(result, tmp_path / "k10")
    assert manifest["parity"]["prefill_max_abs_diff"] < 1e-3
    weight_bytes = 4 * result.program.parameter_count()
    data = (tmp_path / "k10" / "model.onnx.data").stat().st_size
    # every unique tensor once (538 MB for the 30 distinct layers; 10 remain)
    assert data < 1.02 * weight_bytes and data < 0.55 * 4 * program.parameter_count()
    runner = OnnxCausalLM(tmp_path / "k10")
    prompt = ids[0, :32].tolist()
    ours = runner.generate(prompt, max_new_tokens=12)["new_tokens"]
    with torch.no_grad():
        eager = result.module.generate(ids[:, :32], max_new_tokens=12, do_sample=False,
                                       min_new_tokens=12)[0, 32:].tolist()
    assert list(ours) == eager
