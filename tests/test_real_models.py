"""The spine on the real pretrained models: SmolLM2-135M and the MiniLM encoder."""

from __future__ import annotations

import pytest
import torch

import modelfold
from modelfold.corpus import corpus_text
from modelfold.evaluate import evaluate
from modelfold.passes.manager import PassContext

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return modelfold.load("smollm2-135m")


def test_smollm2_program(smollm2):
    arch = smollm2.arch
    assert (arch.family, arch.num_layers, arch.hidden_size) == ("llama", 30, 576)
    assert (arch.num_heads, arch.num_kv_heads, arch.tied_embeddings) == (9, 3, True)
    breakdown = smollm2.parameter_breakdown()
    assert "lm_head" not in breakdown and breakdown["embeddings"]["parameters"] == 49152 * 576
    assert smollm2.parameter_count() == sum(e["parameters"] for e in breakdown.values())
    graph = smollm2.dataflow()
    assert sum(1 for _, a in graph.nodes(data=True) if a["kind"] == "attention") == 30
    # the captured graph runs at a new batch / sequence length and equals eager
    ids = torch.randint(0, 49152, (1, 37), generator=torch.Generator().manual_seed(0))
    ids = torch.cat([ids, ids])  # batch 2
    out = smollm2.exported.module()(input_ids=ids, use_cache=False)
    torch.testing.assert_close(out.logits if hasattr(out, "logits") else out[0],
                               smollm2.logits(ids), atol=1e-4, rtol=1e-4)


def test_smollm2_perplexity_is_sane(smollm2):
    text = corpus_text("wikipedia", "evaluation")
    result = evaluate(smollm2.module, smollm2.tokenizer, text, chars=20_000, progress=False)
    # a 135M model on Wikipedia prose: well below 100, far above 1
    assert 5 < result["perplexity"] < 60, result
    assert result["tokens"] > 3000


def test_drop_least_important_layers_on_smollm2():
    result = modelfold.transform("smollm2-135m", "layer-importance{n_samples=8,seq_len=128},"
                                 "drop-layers{count=4}", context=PassContext(log=None))
    program = result.program
    scores = program.log[0].details["scores"]
    assert len(scores) == 30 and all(0 < s < 1 for s in scores)
    dropped = program.log[1].details["dropped"]
    assert len(dropped) == 4 and 0 not in dropped  # the first layer is never unimportant
    assert program.arch.num_layers == 26 == program.module.config.num_hidden_layers
    assert program.log[1].fidelity["top1_agreement"] > 0.5


def test_minilm_encoder_program():
    program = modelfold.load("minilm-l6")
    assert (program.arch.family, program.arch.kind, program.arch.num_layers) == ("bert", "encoder", 6)
    ids = torch.tensor([[101, 7592, 2088, 102], [101, 2088, 7592, 102]])
    out = program.exported.module()(input_ids=ids, attention_mask=torch.ones_like(ids))
    torch.testing.assert_close(out.last_hidden_state if hasattr(out, "last_hidden_state")
                               else out[0], program.logits(ids), atol=1e-5, rtol=1e-5)
