"""tie-layers on the real SmolLM2-135M: exactness at K = N and at full rank, N/K fewer unique
block parameters, an ONNX artifact that stores the shared weights once and generates.

The relaxation and the artifact run on the real model's first layers (``smollm2_short``; full
depth only multiplies the work); the parameter bookkeeping runs on all 30 layers."""

from __future__ import annotations

import pytest
import torch

import modelfold
from modelfold.artifact import open_artifact
from modelfold.passes.base import PreconditionError
from tests.conftest import SHORT_LAYERS
from tests.helpers import QUIET, VERIFIED

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def probe(smollm2_tokenizer, eval_text):
    return smollm2_tokenizer(eval_text[:600], return_tensors="pt").input_ids[:, :96]


def test_full_rank_relaxation_reproduces_smollm2(smollm2_short, probe):
    want = smollm2_short.logits(probe)
    result = modelfold.transform(smollm2_short, f"tie-layers{{unique={SHORT_LAYERS // 2},"
                                 "init=average,relax_rank=full}", context=VERIFIED)
    record = result.program.log[-1]
    assert record.kind == "exact"  # checked by the pass manager on its probe batch too
    got = result.program.logits(probe)
    assert (got - want).abs().max().item() < 1e-3  # |logits| reach ~30: float rounding
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_k_equal_n_is_exact_and_k15_halves_the_block(smollm2_base, smollm2, probe):
    from tests.conftest import copy_of

    same = modelfold.transform(copy_of(smollm2_base), "tie-layers{unique=30,init=stepwise}",
                               context=QUIET)
    assert torch.equal(same.program.logits(probe), smollm2_base.logits(probe))
    half = modelfold.transform(smollm2, "tie-layers{unique=15}", context=QUIET)
    d = half.program.log[-1].details
    assert d["block_parameters_before"] == 2 * d["block_parameters_after"]
    assert half.program.parameter_count() == smollm2_base.parameter_count() - \
        d["block_parameters_before"] // 2
    with pytest.raises(PreconditionError, match="K=7 does not divide the 30 layers"):
        modelfold.transform(copy_of(smollm2_base), "tie-layers{unique=7}", context=QUIET)


def test_tied_artifact_stores_shared_weights_once_and_generates(smollm2_short, probe, tmp_path):
    full_bytes = 4 * smollm2_short.parameter_count()
    result = modelfold.transform(smollm2_short, "tie-layers{unique=1}", context=QUIET)
    manifest = modelfold.export(result, tmp_path / "tied")
    assert manifest["parity"]["prefill_max_abs_diff"] < 1e-3
    weight_bytes = 4 * result.program.parameter_count()
    data = (tmp_path / "tied" / "model.onnx.data").stat().st_size
    # every unique tensor once: one layer's weights for the 4 depths (and the embedding)
    assert data < 1.02 * weight_bytes < full_bytes
    prompt = probe[0, :32].tolist()
    ours = open_artifact(tmp_path / "tied").generate(prompt, max_new_tokens=12)["new_tokens"]
    with torch.no_grad():
        eager = result.module.generate(probe[:, :32], max_new_tokens=12, do_sample=False,
                                       min_new_tokens=12)[0, 32:].tolist()
    assert list(ours) == eager
