"""Capture, architecture description, dataflow view and verification on every family."""

import networkx as nx
import pytest
import torch
import transformers as tf
from transformers import DynamicCache

from modelfold.ir import Program, UnsupportedArchitectureError, VerificationError, describe, verify
from modelfold.ir.dataflow import to_html, to_svg
from modelfold.ir.signature import graph_inputs
from tests.tiny_models import ALL_FAMILIES, tiny_model


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_capture_has_the_backend_signature_and_matches_eager(family):
    """One capture (and its dataflow view) with the signature the backends run (flat KV cache in
    and out for decoders),
    dynamic in batch, sequence and past length: a prefill (P = 0) and a decode step (S = 1) at
    sizes other than the example's give the eager model's outputs and cache."""
    model = tiny_model(family)
    program = Program(model)
    assert program.arch.family == family
    assert program.arch.num_layers == 4
    verify(program)
    assert program.verified_graph is program.exported and program.captures == 1
    _check_dataflow(program, family)
    sig = program.signature
    graph = program.graph_module()
    ids = torch.randint(0, 128, (3, 11), generator=torch.Generator().manual_seed(1))
    if sig.kind == "encoder":
        assert sig.inputs[:2] == ("input_ids", "attention_mask")
        assert sig.outputs == ("last_hidden_state",)
        out = graph(*program.encoder_inputs(ids))
        torch.testing.assert_close(out[0] if isinstance(out, tuple) else out,
                                   program.module_logits(ids), atol=1e-5, rtol=1e-5)
        return
    assert sig.inputs[:3] == ("input_ids", "attention_mask", "position_ids")
    assert sig.inputs[3:5] == ("past_key_values.0.key", "past_key_values.0.value")
    assert len(sig.outputs) == 1 + 2 * 4 and sig.outputs[1] == "present.0.key"
    assert sig.dims["attention_mask"] == {0: "batch", 1: "total_sequence"}
    prefill = graph(*graph_inputs(sig, ids))  # P = 0
    cache = DynamicCache()
    with torch.no_grad():
        eager = model(input_ids=ids, past_key_values=cache, use_cache=True)
    torch.testing.assert_close(prefill[0], eager.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(prefill[1], cache.layers[0].keys, atol=1e-5, rtol=1e-5)
    step = torch.randint(0, 128, (3, 1), generator=torch.Generator().manual_seed(2))  # S = 1
    mask = torch.ones(3, 12, dtype=torch.long)
    positions = torch.full((3, 1), 11)
    decoded = graph(step, mask, positions, *prefill[1:])
    with torch.no_grad():
        eager = model(input_ids=step, attention_mask=mask, position_ids=positions,
                      past_key_values=cache, use_cache=True)
    torch.testing.assert_close(decoded[0], eager.logits, atol=1e-5, rtol=1e-5)
    assert decoded[-1].shape[2] == 12  # present = past + new


def _check_dataflow(program, family):
    """The module-level dataflow view of the captured graph chains every layer."""
    graph = program.dataflow()
    assert nx.is_directed_acyclic_graph(graph)
    layers = [program.arch.layer_path(i) for i in range(4)]
    attention = [f"{layer}.{program.arch.layer.attention}" for layer in layers]
    for node in attention:
        assert graph.nodes[node]["kind"] == "attention"
        assert graph.nodes[node]["params"] > 0
    # data reaches layer i+1's attention only through layer i's attention
    for a, b in zip(attention, attention[1:]):
        assert nx.has_path(graph, a, b)
    assert nx.has_path(graph, "input", "output")
    svg = to_svg(graph, title=family)
    assert svg.count("<rect") == graph.number_of_nodes()
    assert "<svg" in to_html(graph, title=family)


def test_node_module_index_and_aliases():
    model = tiny_model("llama")
    model.lm_head.weight = model.model.embed_tokens.weight  # tie
    program = Program(model)
    owners = program.module_nodes()
    assert "model.layers.2.self_attn.q_proj" in owners
    linear_targets = {program.exported.graph.find_nodes(op="call_function", target=t)
                      and str(t) for t in [torch.ops.aten.linear.default]}
    assert linear_targets == {"aten.linear.default"}
    aliases = program.parameter_aliases()
    assert aliases["model.embed_tokens.weight"] == ["model.embed_tokens.weight", "lm_head.weight"]
    untied = Program(tiny_model("llama"))
    # tying removes one vocab x hidden matrix from the unique count
    assert untied.parameter_count() - program.parameter_count() == 128 * 32
    assert program.parameter_breakdown()["embeddings"]["parameters"] == 128 * 32
    assert "lm_head" not in program.parameter_breakdown()


def test_unsupported_architecture_names_the_model_type():
    config = tf.T5Config(vocab_size=64, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8)
    with pytest.raises(UnsupportedArchitectureError, match="model_type='t5'"):
        describe(tf.T5ForConditionalGeneration(config))
    with pytest.raises(UnsupportedArchitectureError, match="has no `config`"):
        describe(torch.nn.Linear(2, 2))


def test_missing_part_is_named():
    model = tiny_model("llama")
    del model.model.layers[0].post_attention_layernorm
    with pytest.raises(UnsupportedArchitectureError, match="post_attention_layernorm"):
        describe(model)


def test_bare_backbone_and_task_head_are_described():
    arch = describe(tf.LlamaModel(tiny_model("llama").config))
    assert arch.layers == "layers" and arch.lm_head == "" and arch.final_norm == "norm"
    bert_mlm = tf.BertForMaskedLM(tiny_model("bert").config)
    assert describe(bert_mlm).layers == "bert.encoder.layer"


def test_verify_reports_inconsistent_layer_bookkeeping():
    program = Program(tiny_model("llama"))
    program.module.model.layers[2].self_attn.layer_idx = 3
    with pytest.raises(VerificationError, match="layer_idx=3"):
        verify(program, capture=False)
    program.module.model.layers[2].self_attn.layer_idx = 2
    program.module.config.num_hidden_layers = 5
    with pytest.raises(VerificationError, match="num_hidden_layers=5"):
        verify(program, capture=False)


def test_verify_rejects_nan_weights():
    program = Program(tiny_model("qwen2"))
    with torch.no_grad():
        program.module.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(VerificationError, match="up_proj.weight` holds NaN"):
        verify(program, capture=False)
