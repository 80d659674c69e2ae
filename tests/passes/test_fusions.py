"""The fusion graph passes (fuse-attention, fuse-projections, fuse-norms): structure (dialect op
counts), exactness through prefill and decode steps of the graph, every decoder family, quantized
/ N:M / LoRA-wrapped layers, the reasons a layer is left alone, and the exporter's check."""

from __future__ import annotations

import pytest
import torch

import modelfold
import modelfold.ir.attention as attention_op
from modelfold.ir.graph import calls, runnable
from modelfold.ir.program import Program
from modelfold.ir.signature import graph_inputs
from modelfold.passes.base import PostconditionError
from tests.helpers import QUIET, VERIFIED
from tests.tiny_models import DECODER_FAMILIES, tiny_model

ALL = "fuse-attention,fuse-projections,fuse-norms"
ATTENTION = attention_op.attention._opoverload


def _ops(ep, name: str) -> int:
    return sum(1 for n in calls(ep) if str(n.target) == f"modelfold.{name}.default")


def _run(ep, program, ids, steps: int = 2):
    """Logits of a prefill of ``ids`` and of ``steps`` decode steps (each feeding the graph's
    own present keys/values), through the graph ``ep``."""
    gm = runnable(ep)
    out = gm(*graph_inputs(program.signature, ids))
    logits, past = [out[0]], list(out[1:])
    batch, seq = ids.shape
    for step in range(steps):
        token = logits[-1][:, -1:].argmax(-1)  # [B, 1]
        total = seq + step + 1
        out = gm(token, torch.ones(batch, total, dtype=torch.long),
                 torch.full((batch, 1), total - 1), *past)
        logits.append(out[0])
        past = list(out[1:])
    return logits


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_every_decoder_family_fuses_exactly(family):
    """One attention op per layer, the q/k/v and gate/up groups fused, residual norms fused; the
    logits of a prefill and of two decode steps equal the captured graph's."""
    model = tiny_model(family, layers=2, fusable=True)
    program = Program(model)
    before = program.exported
    result = modelfold.transform(program, ALL, context=VERIFIED)
    after = result.program.exported
    layers = model.config.num_hidden_layers
    assert _ops(after, "attention") == layers
    assert _ops(after, "skip_rms_norm") + _ops(after, "skip_layer_norm") >= 1
    details = {r.name: r.details for r in result.program.log}
    assert len(details["fuse-attention"]["fused"]) == layers
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    for want, got in zip(_run(before, program, ids), _run(after, program, ids)):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_llama_fusions_leave_one_node_per_fused_op():
    program = Program(tiny_model("llama", layers=3, fusable=True))
    result = modelfold.transform(program, ALL, context=QUIET)
    ep = result.program.exported
    linears = [n for n in calls(ep, torch.ops.aten.linear.default)]
    assert len(linears) == 3 * 4 + 1  # qkv (packed into the attention op), o, gate/up, down; head
    assert _ops(ep, "attention") == 3
    assert _ops(ep, "skip_rms_norm") == 2 * 3  # the first layer's input norm reads the embedding
    assert not calls(ep, torch.ops.aten.scaled_dot_product_attention.default)
    attention = calls(ep, ATTENTION)[0]
    assert attention.args[1] is None and attention.args[2] is None  # packed q/k/v
    details = result.program.log[-1].details
    assert [k["target"] for k in details["not_fused"]] == ["model.layers.0.input_layernorm"]
    assert "residual add" in details["not_fused"][0]["reason"]


def test_a_model_the_kernel_cannot_take_keeps_its_attention_and_says_why():
    program = Program(tiny_model("llama", layers=2))  # head_dim 8
    ep = program.exported
    result = modelfold.transform(program, "fuse-attention", context=QUIET)
    details = result.program.log[-1].details
    assert details["fused"] == [] and details["not_fused"] == "some layers cannot be fused, so none is"
    assert "head_dim % 16" in result.program.log[-1].skipped[0]["reason"]
    assert _ops(result.program.exported, "attention") == 0
    assert len(result.program.exported.graph.nodes) == len(ep.graph.nodes)


def test_an_encoder_is_not_fused():
    result = modelfold.transform(Program(tiny_model("bert", layers=2)), ALL, context=QUIET)
    assert "encoder" in result.program.log[0].details["not_fused"]


@pytest.mark.parametrize("pipeline, op", [
    ("quantize{bits=4,group_size=16}", "quant_linear"),
    ("nm-sparsify{n=2,m=4,method=magnitude},quantize{bits=4,group_size=16}", "nm_quant_linear"),
    ("nm-sparsify{n=2,m=4,method=wanda,corpus=random,n_samples=4,seq_len=16}", "nm_linear"),
    ("smooth-quant{corpus=random,n_samples=4,seq_len=16}", "w8a8_linear"),
])
def test_quantized_and_sparse_projections_fuse_exactly(pipeline, op):
    """Weights stored by output feature concatenate: one dialect op per group, same logits (the
    pass manager checks the exact passes)."""
    program = Program(tiny_model("llama", layers=2, fusable=True))
    transformed = modelfold.transform(program, pipeline, context=QUIET).program
    before = _ops(transformed.exported, op)
    result = modelfold.transform(transformed, "fuse-projections", context=VERIFIED)
    record = result.program.log[-1]
    assert len(record.details["fused"]) == 4 and not record.skipped
    assert _ops(result.program.exported, op) == before - 2 * 3  # q/k/v -> 1, gate/up -> 1


def test_lora_wrapped_projections_are_left_with_the_reason():
    program = Program(tiny_model("llama", layers=2, fusable=True))
    result = modelfold.transform(program, "lora{rank=2,targets=[q_proj]},fuse-projections",
                                 context=QUIET)
    record = result.program.log[-1]
    assert len(record.details["fused"]) == 2  # gate/up of both layers
    assert len(record.skipped) == 2 and "wrapped" in record.skipped[0]["reason"]


def test_fusions_are_replayed_after_a_module_pass():
    program = Program(tiny_model("qwen2", layers=2, fusable=True))
    result = modelfold.transform(program, "fuse-attention,quantize{bits=8,group_size=-1}",
                                 context=VERIFIED)
    ep = result.program.exported
    assert _ops(ep, "attention") == 2 and _ops(ep, "quant_linear") == 2 * 7


def test_the_exporter_refuses_a_fusion_that_changes_the_logits(tmp_path):
    """A wrong number (here a sliding window) is caught by the exporter's check of the default
    passes, before anything is written."""
    model = tiny_model("llama", layers=2, fusable=True)
    model.model.layers[1].self_attn.sliding_window = 2  # Llama's forward ignores it ...
    with pytest.raises(PostconditionError, match="fuse-attention changed the logits"):
        modelfold.export(model, tmp_path / "out", parity=False)  # ... the fused op does not
    assert not (tmp_path / "out").exists()


def test_no_fuse_names_the_fusions():
    from modelfold.cli import fusions_named

    assert fusions_named(["attention", "fuse-norms"]) == ("fuse-attention", "fuse-norms")
    assert set(fusions_named(["all"])) == {"fuse-attention", "fuse-projections", "fuse-norms"}
    with pytest.raises(ValueError, match="not a fusion; one of attention"):
        fusions_named(["tied-linear"])


def test_a_pass_context_can_disable_a_default_fusion(tmp_path):
    from modelfold.passes.manager import PassContext

    context = PassContext(log=None, verify=False, disabled=("fuse-norms",))
    result = modelfold.transform(tiny_model("llama", layers=2, fusable=True),
                                 "quantize{bits=8,group_size=-1}", context=context)
    manifest = modelfold.export(result, tmp_path / "out", parity=False)
    nodes = manifest["onnx"]["onnx_nodes"]
    assert "fuse-norms" not in manifest["onnx"]["graph_passes"]
    assert "com.microsoft.SkipSimplifiedLayerNormalization" not in nodes
    assert nodes["com.microsoft.GroupQueryAttention"] == 2
