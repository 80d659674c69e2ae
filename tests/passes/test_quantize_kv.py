"""``quantize-kv``: an int8 KV cache with calibrated per-channel scales, through the graph and
ONNX Runtime."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import modelfold
import modelfold.ir.attention as attention_op
from modelfold.backends.onnxruntime.runtime import OnnxCausalLM
from modelfold.errors import ModelfoldError
from modelfold.ir.graph import calls, past_dtype
from modelfold.ir.program import Program
from tests.helpers import QUIET, VERIFIED
from tests.tiny_models import tiny_model

PASS = "quantize-kv{corpus=random,n_samples=4,seq_len=16}"
ATTENTION = attention_op.attention._opoverload


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """A tiny llama with an int8 cache and its artifact."""
    result = modelfold.transform(Program(tiny_model("llama", layers=2, fusable=True)), PASS,
                                 context=VERIFIED)
    out = tmp_path_factory.mktemp("kv8") / "artifact"
    manifest = modelfold.export(result, out)
    return result, out, manifest


def test_the_cache_becomes_int8_with_scales_per_channel(quantized):
    result, _, _ = quantized
    program, record = result.program, result.program.log[-1]
    ep = program.exported
    assert past_dtype(ep, program.signature) == torch.int8
    nodes = calls(ep, ATTENTION)
    assert len(nodes) == 2 and all(n.args[13] is not None and n.args[14] is not None
                                   for n in nodes)
    assert record.kind == "lossy" and record.fidelity["sqnr_db"] > 30
    assert record.details["kv_cache_bytes_per_token"] == {"before": 2 * 2 * 2 * 16 * 4,
                                                          "after": 2 * 2 * 2 * 16}
    for layer in record.details["layers"]:
        assert layer["key_relative_error"] < 0.02 and layer["value_relative_error"] < 0.02
    assert "fuse-attention" in record.details  # fused first, inside the pass


def test_onnx_runtime_reads_the_same_int8_cache(quantized):
    """The graph's reference of the quantized cache and ONNX Runtime agree (the artifact is not
    compared with the float model only)."""
    result, out, manifest = quantized
    lm = OnnxCausalLM(out)
    assert lm.cache_dtype == np.int8 and lm.padding == "right"
    assert manifest["onnx"]["inputs"]["past_key_values.0.key"] is not None
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(lm.logits(ids.numpy()), result.program.graph_logits(ids).numpy(),
                               atol=1e-5)
    assert manifest["parity"]["top1_agreement"] == 1.0  # lossy, but a small loss
    prompts = [[5, 9, 17, 3], [4, 8]]
    batch = lm.generate(prompts, 6)["new_tokens"]
    assert batch == [lm.generate(p, 6)["new_tokens"] for p in prompts]


def test_projections_still_pack_into_the_quantized_attention():
    result = modelfold.transform(Program(tiny_model("qwen2", layers=2, fusable=True)),
                                 PASS + ",fuse-projections", context=QUIET)
    for node in calls(result.program.exported, ATTENTION):
        assert node.args[1] is None and node.args[13] is not None  # packed q/k/v, scales kept


def test_a_model_whose_attention_cannot_be_fused_is_refused():
    with pytest.raises(ModelfoldError, match="cannot be fused.*head_dim % 16"):
        modelfold.transform(Program(tiny_model("llama", layers=2)), PASS, context=QUIET)
    with pytest.raises(ModelfoldError, match="needs a decoder"):
        modelfold.transform(Program(tiny_model("bert", layers=2)), PASS, context=QUIET)
    with pytest.raises(ModelfoldError, match="'bits' must be 8"):
        modelfold.transform(Program(tiny_model("llama", layers=2)), "quantize-kv{bits=4}",
                            context=QUIET)
