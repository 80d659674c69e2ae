"""The spine on the real pretrained models: SmolLM2-135M and the MiniLM encoder."""

from __future__ import annotations

import pytest
import torch

import modelfold
from modelfold.evaluate import evaluate
from modelfold.ir.signature import graph_inputs
from modelfold.ir.verify import verify
from tests.helpers import QUIET

pytestmark = pytest.mark.slow


def test_smollm2_program(smollm2_base):
    program = smollm2_base
    arch = program.arch
    assert (arch.family, arch.num_layers, arch.hidden_size) == ("llama", 30, 576)
    assert (arch.num_heads, arch.num_kv_heads, arch.tied_embeddings) == (9, 3, True)
    breakdown = program.parameter_breakdown()
    assert "lm_head" not in breakdown and breakdown["embeddings"]["parameters"] == 49152 * 576
    assert program.parameter_count() == sum(e["parameters"] for e in breakdown.values())
    graph = program.dataflow()
    assert sum(1 for _, a in graph.nodes(data=True) if a["kind"] == "attention") == 30
    # the captured graph (KV-cache signature) runs at a new batch / sequence length and equals eager
    ids = torch.randint(0, 49152, (1, 37), generator=torch.Generator().manual_seed(0))
    ids = torch.cat([ids, ids])  # batch 2
    out = program.graph_module()(*graph_inputs(program.signature, ids))
    torch.testing.assert_close(out[0], program.module_logits(ids), atol=1e-4, rtol=1e-4)
    assert out[1].shape == (2, 3, 37, 64)  # present key of layer 0: [B, KV heads, T, head dim]


def test_smollm2_perplexity_is_sane(smollm2_base, eval_text):
    result = evaluate(smollm2_base.module, smollm2_base.tokenizer, eval_text, chars=20_000,
                      progress=False)
    # a 135M model on Wikipedia prose: well below 100, far above 1
    assert 5 < result["perplexity"] < 60, result
    assert result["tokens"] > 3000


def test_drop_least_important_layers_on_smollm2(smollm2):
    result = modelfold.transform(smollm2, "layer-importance{n_samples=8,seq_len=128},"
                                 "drop-layers{count=4}", context=QUIET)
    program = result.program
    scores = program.log[0].details["scores"]
    assert len(scores) == 30 and all(0 < s < 1 for s in scores)
    dropped = program.log[1].details["dropped"]
    assert len(dropped) == 4 and 0 not in dropped  # the first layer is never unimportant
    assert program.arch.num_layers == 26 == program.module.config.num_hidden_layers
    assert program.log[1].fidelity["top1_agreement"] > 0.5
    verify(program)  # the 26-layer graph captures with 26 cache layers and verifies
    assert program.verified_graph is program.exported
    assert len(program.signature.past_names) == 2 * 26


def test_minilm_encoder_program(minilm_dir):
    program = modelfold.load(str(minilm_dir))
    assert (program.arch.family, program.arch.kind, program.arch.num_layers) == ("bert", "encoder", 6)
    ids = torch.tensor([[101, 7592, 2088, 102], [101, 2088, 7592, 102]])
    out = program.graph_module()(*program.encoder_inputs(ids))
    torch.testing.assert_close(out[0] if isinstance(out, tuple) else out,
                               program.module_logits(ids), atol=1e-5, rtol=1e-5)
