"""Graph passes: the GraphEditor bookkeeping and the tied-linear pass on the captured graph."""

from __future__ import annotations

import pytest
import torch

import modelfold
from modelfold.ir import Program
from modelfold.ir.graph import GraphEditor, calls
from modelfold.ir.verify import graph_problems
from modelfold.passes.manager import PassContext
from tests.helpers import VERIFIED
from tests.tiny_models import tiny_model

LINEAR = torch.ops.aten.linear.default


def _tied_llama(layers: int = 2) -> torch.nn.Module:
    model = tiny_model("llama", layers=layers, tie_word_embeddings=True)
    model.lm_head.weight = model.model.embed_tokens.weight
    return model


def test_editor_rewrites_a_copy_and_keeps_signature_and_state_dict_consistent():
    program = Program(tiny_model("llama", layers=2))
    ep = program.exported
    before = len(ep.graph_signature.input_specs)
    editor = GraphEditor(ep)
    head = editor.calls(LINEAR)[-1]
    assert editor.owner(head) == "lm_head" and editor.target_name(head.args[1]) == "lm_head.weight"
    doubled = editor.add_tensor("lm_head.doubled", editor.tensor(head.args[1]) * 2)
    editor.replace(head, editor.call(LINEAR, (head.args[0], doubled), near=head))
    new = editor.finish()
    # the source is untouched: the Program's verified graph stays what it was
    assert len(ep.graph_signature.input_specs) == before and new is not ep
    assert "model.lm_head.weight" in ep.state_dict
    # the old weight had no other user: dropped from graph, signature and state dict
    assert "model.lm_head.weight" not in new.state_dict
    assert "model.lm_head.doubled" in new.state_dict
    assert len(new.graph_signature.input_specs) == before
    assert graph_problems(program, new) == []
    new_head = calls(new, LINEAR)[-1]
    assert new_head.meta["val"].shape[-1] == 128  # meta computed on fake tensors
    assert "lm_head" in str(new_head.meta["nn_module_stack"])
    ids = torch.randint(0, 128, (2, 5))
    from modelfold.ir.graph import runnable
    from modelfold.ir.signature import graph_inputs

    out = runnable(new)(*graph_inputs(program.signature, ids))[0]
    torch.testing.assert_close(out, 2 * program.logits(ids), atol=1e-5, rtol=1e-5)


def test_editor_without_changes_returns_the_same_program():
    ep = Program(tiny_model("qwen2", layers=2)).exported
    assert GraphEditor(ep).finish() is ep


def test_tied_linear_is_an_exact_graph_pass_that_survives_recapture():
    result = modelfold.transform(_tied_llama(layers=3), "tied-linear,drop-layers{layers=[1]}",
                                 context=VERIFIED)
    program = result.program
    record = program.log[0]
    assert (record.level, record.kind) == ("graph", "exact")
    assert [r["layer"] for r in record.details["rewritten"]] == ["lm_head"]
    assert record.fidelity["max_abs_diff"] == 0.0  # the same function, bit for bit
    # drop-layers (a module pass) re-captured the graph; the graph pass was replayed on it
    assert program.captures >= 2 and program.graph_passes[0].name == "tied-linear"
    tied = [n for n in program.exported.graph.nodes
            if str(n.target) == "modelfold.tied_linear.default"]
    assert len(tied) == 1 and program.dialect_ops()["modelfold::tied_linear"] == 1
    assert not [n for n in calls(program.exported, LINEAR)
                if any(u.target == torch.ops.aten.embedding.default for u in n.args[1].users)]
    # with a graph pass applied, the program's logits come from the graph
    ids = torch.randint(0, 128, (2, 6))
    torch.testing.assert_close(program.logits(ids), program.module_logits(ids))


def test_tied_linear_leaves_untied_models_alone():
    result = modelfold.transform(tiny_model("llama", layers=2), "tied-linear", context=VERIFIED)
    assert result.program.log[0].details["rewritten"] == []


def test_graph_pass_kind_comes_from_kind_for_not_the_instance():
    from modelfold.passes.lora import Lora
    from modelfold.passes.tie_layers import TieLayers

    program = Program(tiny_model("llama"))
    sb, plain = Lora(init="sb", corpus="random"), Lora()
    assert (sb.kind_for(program), plain.kind_for(program)) == ("lossy", "exact")
    assert Lora.kind == sb.kind == "exact"  # the class default is not overwritten
    assert TieLayers(unique=4).kind_for(program) == "exact"  # K = N
    assert TieLayers(unique=2).kind_for(program) == "lossy"


def test_disabled_graph_pass_is_reported():
    result = modelfold.transform(_tied_llama(), "tied-linear",
                                 context=PassContext(log=None, disabled=("tied-linear",)))
    assert result.program.graph_passes == []
    assert result.program.log[0].skipped[0]["reason"] == "disabled by the context"


@pytest.mark.parametrize("family", ["gpt2", "gemma"])
def test_tied_linear_on_families_with_tied_heads(family):
    model = tiny_model(family, layers=2)  # both tie the head to the embedding by default
    assert model.lm_head.weight is model.get_input_embeddings().weight
    result = modelfold.transform(model, "tied-linear", context=VERIFIED)
    assert len(result.program.log[0].details["rewritten"]) == 1
