"""moefy (dense-to-MoE) on tiny models: exactness at top_k = experts, the splits and routers,
the captured graph and its ONNX lowering (com.microsoft.MoE or the decomposed subgraph), standard
Mixtral / Qwen2-MoE checkpoints loaded by plain transformers, composition with quantize / LoRA,
recovery training, and the errors."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import onnx
import pytest
import torch

import modelfold
from modelfold.backends.onnxruntime.export import check_parity, export_onnx
from modelfold.checkpoint import CheckpointError, save_checkpoint
from modelfold.errors import OptionError
from modelfold.ir.moe import MoEFFN, balance_loss, moe_layers
from modelfold.ir.program import Program
from modelfold.passes.base import PreconditionError
from modelfold.passes.manager import PassContext
from modelfold.passes.moefy import balanced_kmeans
from modelfold.passes.registry import get_pass
from modelfold.passes.report import write_report
from tests.helpers import QUIET
from tests.tiny_models import tiny_model

RANDOM = dict(corpus="random", seq_len=32, n_samples=8)


def moefied(family: str, depth: int = 2, seed: int = 0, **options) -> Program:
    program = Program(tiny_model(family, layers=depth, seed=seed))
    get_pass("moefy")(**{**RANDOM, "experts": 4, **options}).run(program)
    return program


def ids(batch=2, length=9, seed=0):
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["llama", "gemma", "gpt2", "phi"])
@pytest.mark.parametrize("split", ["random", "cluster", "coactivation"])
def test_all_experts_reproduce_the_dense_model(family, split):
    """top_k = experts with unit weights is the dense FFN (biases of GPT-2 / Phi's fc_in split
    between the experts, fc_out's added once), eager and as the captured graph."""
    dense = tiny_model(family, layers=2)
    x = ids()
    with torch.no_grad():
        ref = dense(x).logits
    program = moefied(family, top_k=4, split=split)
    assert len(moe_layers(program.module)) == 2
    with torch.no_grad():
        out = program.module(x).logits
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(program.graph_logits(x), out, atol=1e-5, rtol=1e-5)
    targets = [n.target for n in program.exported.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.modelfold.moe.default) == 2


def test_experts_partition_the_neurons_evenly():
    program = moefied("llama", top_k=2, split="cluster", shared=16)
    dense = tiny_model("llama", layers=2)
    mlp = program.module.model.layers[0].mlp
    rows = torch.cat([e.gate_proj.weight for e in [*mlp.experts, mlp.shared]])
    original = dense.model.layers[0].mlp.gate_proj.weight
    assert rows.shape == original.shape
    # every neuron once: the rows are a permutation of the original's
    assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, original.tolist()))
    assert {e.gate_proj.weight.shape[0] for e in mlp.experts} == {12}
    assert mlp.shared.gate_proj.weight.shape[0] == 16


def test_balanced_kmeans_gives_equal_clusters_and_separates_groups():
    gen = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(4, 16, generator=gen), dim=1)
    points = torch.cat([c + 0.05 * torch.randn(10, 16, generator=gen) for c in centres])
    labels = balanced_kmeans(torch.nn.functional.normalize(points, dim=1), 4, 20, gen)
    assert sorted(Counter(labels.tolist()).values()) == [10, 10, 10, 10]
    for g in range(4):  # each true group lands in one cluster
        assert len(set(labels[g * 10:(g + 1) * 10].tolist())) == 1


def test_fewer_experts_is_lossy_and_reported(tmp_path):
    dense = tiny_model("llama", layers=2)
    result = modelfold.transform(dense, "moefy{experts=4,top_k=2,corpus=random,seq_len=32,"
                                        "n_samples=8}", context=QUIET)
    record = result.program.log[-1]
    assert record.kind == "lossy" and record.fidelity["top1_agreement"] <= 1.0
    details = record.details
    assert details["active_ffn_fraction"] < 0.6
    assert len(details["load"]) == 2 and abs(sum(details["load"][0]) - 1) < 1e-6
    assert set(details["layers"][0]["top_k_recall"]) == {"centroid", "trained"}
    write_report(result.program, tmp_path, pipeline=result.pipeline)
    assert (tmp_path / "01_moefy.png").is_file() or any(tmp_path.glob("*moefy*.png"))
    exact = modelfold.transform(tiny_model("llama", layers=2),
                                "moefy{experts=4,top_k=4,router=centroid,corpus=random,"
                                "seq_len=32,n_samples=8}", context=QUIET)
    assert exact.program.log[-1].kind == "exact"


@pytest.mark.parametrize("family,weights,kernel", [
    ("llama", "unit", True), ("qwen2", "softmax", True), ("gemma", "unit", False),
    ("gpt2", "softmax", False)])
def test_onnx_artifact_matches_eager(family, weights, kernel, tmp_path):
    """SwiGLU experts lower to ONNX Runtime's MoE kernel (only the chosen experts run), other
    activations to the decomposed subgraph; prefill and decode with the cache match eager."""
    program = moefied(family, top_k=2, weights=weights)
    facts = export_onnx(program, tmp_path, parity=False)
    graph = onnx.load(tmp_path / "model.onnx", load_external_data=False).graph
    assert (sum(n.op_type == "MoE" for n in graph.node) == 2) is kernel
    how = set(facts["moe"]["layers"].values())
    assert how == {"com.microsoft.MoE (chosen experts only)" if kernel
                   else "every expert, weighted (all expert weights read)"}
    parity = check_parity(program.module, tmp_path, decode_steps=4)
    assert parity["prefill_max_abs_diff"] < 1e-4 and parity["decode_max_abs_diff"] < 1e-4
    assert parity["top1_agreement"] == 1.0


_PLAIN = """
import sys, torch, transformers
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])
ids = torch.load(sys.argv[2])
torch.save(model(ids).logits, sys.argv[3])
print(type(model).__name__, "modelfold" in sys.modules)
"""


@pytest.mark.parametrize("family,shared,cls", [("llama", 0, "MixtralForCausalLM"),
                                               ("qwen2", 16, "Qwen2MoeForCausalLM")])
def test_standard_checkpoint_loads_in_plain_transformers(family, shared, cls, tmp_path):
    """A softmax-weighted conversion is written as Mixtral (Qwen2-MoE with a shared expert);
    transformers loads it in a process that never imports modelfold and gives the same logits;
    modelfold loads it back as MoE layers, and quantize (RTN, GPTQ) and LoRA compose."""
    program = moefied(family, top_k=2, weights="softmax", shared=shared)
    facts = save_checkpoint(program, tmp_path / "ck")
    assert facts["class"] == cls and facts["parity_max_abs_diff"] < 1e-5
    assert not (tmp_path / "ck" / "modelfold_checkpoint.json").exists()
    x = ids(1, 10)
    torch.save(x, tmp_path / "ids.pt")
    run = subprocess.run([sys.executable, "-c", _PLAIN, str(tmp_path / "ck"),
                          str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
                         capture_output=True, text=True, check=True)
    assert run.stdout.split() == [cls, "False"]
    with torch.no_grad():
        ref = program.module(x).logits
    assert (torch.load(tmp_path / "out.pt") - ref).abs().max() <= 1e-4
    back = modelfold.load(str(tmp_path / "ck"))
    assert len(moe_layers(back.module)) == 2 and back.arch.mlp_type == "moe"
    with torch.no_grad():
        torch.testing.assert_close(back.module(x).logits, ref, atol=1e-5, rtol=1e-5)
    for pipeline in ("quantize{method=rtn,bits=4,group_size=16}",
                     "quantize{method=gptq,bits=4,group_size=16,corpus=random,n_samples=4,"
                     "seq_len=16}", "lora{rank=4}"):
        again = modelfold.load(str(tmp_path / "ck"))
        result = modelfold.transform(again, pipeline, context=QUIET)
        expert = result.module.model.layers[0].mlp.experts[1].up_proj
        assert type(expert).__name__ in ("QuantLinear", "LoraLinear"), pipeline
        router = result.module.model.layers[0].mlp.router
        assert type(router) is torch.nn.Linear  # the expert choice stays float


def test_unit_weights_have_no_standard_format(tmp_path):
    program = moefied("llama", top_k=2)
    with pytest.raises(CheckpointError, match="weights=softmax"):
        save_checkpoint(program, tmp_path / "std", format="transformers")
    facts = save_checkpoint(program, tmp_path / "mf")  # auto: modelfold's own format
    assert json.loads((tmp_path / "mf" / "modelfold_checkpoint.json").read_text())["modules"]
    back = modelfold.load(str(tmp_path / "mf"))
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(back.module(x).logits, program.module(x).logits)
    assert facts["format"] == "modelfold-checkpoint"


@pytest.mark.parametrize("bits,fused", [(4, True), (8, False)])
def test_quantized_experts_export_and_match(bits, fused, tmp_path):
    """int4 SwiGLU experts are one modelfold::quant_moe node lowered to ONNX Runtime's QMoE over
    their MatMulNBits bytes (only the chosen experts read); int8 ones (QMoE has no float kernel
    for them) are captured as every expert times its routing weight. Both match eager."""
    program = moefied("llama", top_k=2)
    result = modelfold.transform(program, f"quantize{{method=rtn,bits={bits},group_size=16}}",
                                 context=QUIET)
    facts = export_onnx(result.program, tmp_path, parity=False)
    graph = onnx.load(tmp_path / "model.onnx", load_external_data=False).graph
    assert (sum(n.op_type == "QMoE" for n in graph.node) == 2) is fused
    assert all(("QMoE" in how) is fused for how in facts["moe"]["layers"].values())
    parity = check_parity(result.module, tmp_path, decode_steps=3)
    assert parity["prefill_max_abs_diff"] < 1e-4 and parity["top1_agreement"] == 1.0


@pytest.mark.parametrize("pipeline,node,at", [
    ("", "modelfold.moe.default", 6),
    ("quantize{method=rtn,bits=4,group_size=16}", "modelfold.quant_moe.default", 11),
    ("quantize{method=rtn,bits=8,group_size=16}", "aten.topk.default", 1)])  # every-expert path
def test_exact_checks_compare_graphs_with_every_expert_routed(pipeline, node, at):
    """Top-k routing is discontinuous, so the export's check of an exact graph pass runs both
    graphs with every expert routed (top_k = E in the moe / quant_moe nodes and in the traced
    topk of the every-expert path): the graph then computes the model at top_k = E."""
    program = moefied("llama", top_k=1)
    if pipeline:
        program = modelfold.transform(program, pipeline, context=QUIET).program
    ep = program.exported
    assert any(str(n.target) == node for n in ep.graph.nodes)
    x = ids()
    routed = program.graph_logits(x)
    every = program.graph_logits(x, ep, all_experts=True)
    for m in moe_layers(program.module).values():
        m.top_k = m.num_experts
    with torch.no_grad():
        reference = program.module(x).logits
    torch.testing.assert_close(every, reference, atol=1e-4, rtol=1e-4)
    assert (every - routed).abs().max() > 1e-3  # it did change the routing
    tops = [n.args[at] for n in ep.graph.nodes if str(n.target) == node]
    assert tops == [1, 1]  # the program's graph is untouched


def test_pipeline_exact_graph_passes_on_a_routed_model_are_judged_with_every_expert():
    """A pipeline naming the fusions after moefy{top_k=1}: each exact graph pass is judged with
    every expert routed, and its effect on the routed logits is still recorded."""
    result = modelfold.transform(tiny_model("llama", layers=2), "moefy{experts=4,top_k=1,"
                                 "corpus=random,seq_len=32,n_samples=8},fuse-attention,fuse-norms",
                                 context=PassContext(log=None))
    records = result.program.log[1:]
    assert [r.name for r in records] == ["fuse-attention", "fuse-norms"]
    assert all(r.kind == "exact" and "sqnr_db" in r.fidelity for r in records)


def test_a_transform_result_continues_with_another_pipeline():
    """transform(result, ...) continues the converted model (moefy, then per-expert int4)."""
    first = modelfold.transform(tiny_model("llama", layers=2), "moefy{experts=4,top_k=2,"
                                "corpus=random,seq_len=32,n_samples=8}", context=QUIET)
    second = modelfold.transform(first, "quantize{method=rtn,bits=4,group_size=16}",
                                 context=QUIET)
    assert second.program is first.program
    assert [r.name for r in second.program.log] == ["moefy", "quantize"]
    assert any(str(n.target) == "modelfold.quant_moe.default"
               for n in second.program.exported.graph.nodes)


def test_recovery_trains_routers_and_balances(tmp_path):
    teacher = tiny_model("llama", layers=2)
    program = moefied("llama", top_k=1)
    before = {n: p.detach().clone() for n, p in program.module.named_parameters()}
    report = modelfold.uptrain(program, teacher=teacher, steps=3, batch_size=2, seq_len=16,
                               corpus="random", lr=1e-2, balance_weight=0.01, eval_chars=1,
                               log_every=0, progress=False, log=None)
    changed = {n for n, p in program.module.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".router." in n for n in changed)
    assert report["trainable_parameters"] == 2 * 4 * 32
    program.module.train()
    program.module(ids())
    loss = balance_loss(program.module)
    assert loss is not None and loss.item() >= 1.0 - 1e-5  # 1 when perfectly balanced
    program.module.eval()
    modelfold.uptrain(program, teacher=teacher, steps=1, batch_size=2, seq_len=16,
                      corpus="random", train_experts=True, eval_chars=1, log_every=0,
                      progress=False, log=None)
    assert all(p.requires_grad for m in moe_layers(program.module).values()
               for p in m.experts.parameters())


@pytest.mark.parametrize("family,pipeline,error,match", [
    ("mixtral", "moefy", PreconditionError, "already a mixture of experts"),
    ("opt", "moefy", PreconditionError, "not one module"),
    ("llama", "moefy{experts=5}", PreconditionError, "equal experts"),
    ("llama", "moefy{experts=4,shared=10}", PreconditionError, "equal experts"),
    ("llama", "moefy{layers=[7]}", PreconditionError, "do not exist"),
    ("llama", "moefy{top_k=9}", OptionError, "top_k"),
    ("llama", "moefy{split=metis}", OptionError, "split"),
])
def test_bad_requests_are_refused(family, pipeline, error, match):
    with pytest.raises(error, match=match):
        modelfold.transform(tiny_model(family, layers=2), pipeline, context=QUIET)


def test_moefy_after_quantize_is_refused():
    result = modelfold.transform(tiny_model("llama", layers=2),
                                 "quantize{method=rtn,bits=8,group_size=16}", context=QUIET)
    with pytest.raises(PreconditionError, match="convert the dense model first"):
        modelfold.transform(result.program, "moefy{corpus=random}", context=QUIET)


def test_partial_conversion_keeps_other_layers_dense():
    program = moefied("llama", depth=3, top_k=2, layers=(1,))
    kinds = [type(layer.mlp).__name__ for layer in program.module.model.layers]
    assert kinds == ["LlamaMLP", "MoEFFN", "LlamaMLP"]
    assert isinstance(program.module.model.layers[1].mlp, MoEFFN)
    x = ids()
    torch.testing.assert_close(program.graph_logits(x), program.module(x).logits,
                               atol=1e-5, rtol=1e-5)
