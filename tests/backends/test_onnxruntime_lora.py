"""LoRA layers in ONNX Runtime: the ``lora_delta`` lowering and the three export modes.

Op level: a ``LoraLinear`` with odd shapes through ``torch.onnx.export``. Model level, a 2-layer
tiny llama whose adapters are perturbed (random, so no two layers share an adapter tensor):
``merge`` (plain MatMuls, merged in the lowered graph; the torch model untouched), ``separate`` (Gemm
branches), QLoRA (a 4-bit base keeps its branch next to MatMulNBits, reported in
``kept_unmerged``), and ``inputs``: one base artifact that four adapters of different kinds and
ranks (lora r4, LoRA-XS r2, NOLA r2, PiSSA r2) each run through, alone or combined.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import modelfold
from modelfold.backends.onnxruntime import translations
from modelfold.backends.onnxruntime.export import export_onnx
from modelfold.backends.onnxruntime.lora_lowering import adapter_parameters, write_ort_adapter
from modelfold.backends.onnxruntime.options import LORA_MODES
from modelfold.backends.onnxruntime.runtime import OnnxCausalLM, available_adapters
from modelfold.ir.lora import LoraAdapter, LoraLinear, lora_layers, merge_adapters, set_active_adapters
from tests.tiny_models import tiny_model

TOL = 1e-4  # float32 logits of a tiny model; the exports measure ~1e-7
INPUTS_ADAPTERS = {"default": "lora", "b": "xs", "c": "nola", "p": "pissa"}


# -- helpers ------------------------------------------------------------------------------------
def lora_llama(pipeline: str) -> modelfold.TransformResult:
    """A 2-layer tiny llama through ``pipeline`` with every adapter tensor perturbed randomly."""
    result = modelfold.transform(tiny_model("llama", num_hidden_layers=2), pipeline)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(result.module).values():
            for adapter in layer.adapters.values():
                for p in adapter.parameters():
                    p.add_(torch.randn(p.shape, generator=generator) * 0.1)
    return result


def probe_ids() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 128, size=(2, 6))  # [B, S]


@torch.no_grad()
def torch_logits(model: nn.Module, ids: np.ndarray) -> np.ndarray:
    return model(input_ids=torch.as_tensor(ids), use_cache=False).logits.numpy()  # [B, S, V]


def max_diff(lm: OnnxCausalLM, model: nn.Module) -> float:
    ids = probe_ids()
    return float(np.abs(lm.logits(ids) - torch_logits(model, ids)).max())


def op_counts(path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in onnx.load(str(path / "model.onnx"), load_external_data=False).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


# -- op level -----------------------------------------------------------------------------------
def test_lora_delta_lowers_to_two_gemms_and_matches_torch(tmp_path):
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(13, 11))
    adapter = LoraAdapter("lora", 13, 11, 3, alpha=5.0)
    with torch.no_grad():
        adapter.lora_A.normal_()
        adapter.lora_B.normal_()
    layer.add_adapter("default", adapter)
    x = torch.randn(2, 5, 13)
    dims = {0: "batch", 1: "sequence"}
    with torch.no_grad():
        program = torch.onnx.export(
            layer.eval(),
            (x,),
            dynamo=True,
            dynamic_shapes=(dims,),
            custom_translation_table=translations.translation_table(),
        )
    program.save(str(tmp_path / "lora.onnx"))
    graph = onnx.load(str(tmp_path / "lora.onnx")).graph
    gemms = [n for n in graph.node if n.op_type == "Gemm"]
    alphas = sorted(next((a.f for a in n.attribute if a.name == "alpha"), 1.0) for n in gemms)
    assert alphas == pytest.approx([1.0, 5.0 / 3])  # the scaling rides on the second Gemm
    session = ort.InferenceSession(str(tmp_path / "lora.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 4, 13)  # other batch and sequence than exported
    actual = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(actual, layer(x).detach().numpy(), atol=1e-5)


# -- merge / separate ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_result() -> modelfold.TransformResult:
    return lora_llama("lora{rank=4}")


@pytest.fixture(scope="module")
def merged_artifact(lora_result, tmp_path_factory):
    model = lora_result.module
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = tmp_path_factory.mktemp("merged")
    facts = export_onnx(lora_result.program, out)  # lora="merge" is the default
    return out, facts, before


def test_merge_exports_plain_matmuls_and_leaves_the_model_untouched(lora_result, merged_artifact):
    out, facts, before = merged_artifact
    model = lora_result.module
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit-identical, not unmerge math
    assert all(layer.merged == [] for layer in lora_layers(model).values())
    lora = facts["lora"]
    assert lora["mode"] == "merge" and lora["layers"] == 14 and len(lora["merged"]) == 14
    assert lora["kept_unmerged"] == []
    assert "Gemm" not in op_counts(out)
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    assert not [i.name for i in graph.initializer if "lora" in i.name]
    assert facts["parity"]["prefill_max_abs_diff"] < TOL
    assert max_diff(OnnxCausalLM(out), model) < TOL


def test_merge_is_a_graph_step_on_a_copy_of_the_verified_graph(lora_result, merged_artifact):
    """The Program's graph keeps its 14 lora_delta branches; the lowered graph (what the export
    translated, verified) has them folded into 14 new base weights (with the default fusions, the
    merged q/k/v and gate/up weights are then concatenated by fuse-projections)."""
    from modelfold.backends.onnxruntime.export import lowered_graph
    from modelfold.backends.onnxruntime.options import ExportOptions

    program = lora_result.program
    assert program.dialect_ops()["modelfold::lora_delta"] == 14
    unfused = ExportOptions(disable=("fuse-attention", "fuse-projections", "fuse-norms"))
    lowered, _ = lowered_graph(program, unfused)
    assert program.verified_graph is lowered and lowered is not program.exported
    assert not [n for n in lowered.graph.nodes if "lora_delta" in str(n.target)]
    merged = [k for k in lowered.state_dict if k.endswith("base_layer.weight_1")]
    assert len(merged) == 14
    fused, applied = lowered_graph(program, ExportOptions())
    assert program.verified_graph is fused
    assert len(applied["fuse-projections"]["fused"]) == 2 * 2  # q/k/v and gate/up of 2 layers
    assert len([k for k in fused.state_dict if k.endswith("base_layer.weight_1")]) == 2 * 2
    assert program.dialect_ops()["modelfold::lora_delta"] == 14


def test_separate_keeps_gemm_branches_and_matches_torch(lora_result, tmp_path):
    facts = export_onnx(lora_result.module, tmp_path, lora="separate")
    assert facts["lora"]["mode"] == "separate"
    assert op_counts(tmp_path)["Gemm"] == 2 * 14
    assert facts["parity"]["prefill_max_abs_diff"] < TOL
    assert facts["parity"]["decode_max_abs_diff"] < TOL


def test_qlora_keeps_the_branch_next_to_matmulnbits(tmp_path):
    result = lora_llama("quantize{bits=4,group_size=16},lora{rank=4}")
    manifest = modelfold.export(result, tmp_path / "qlora")  # default lora="merge"
    kept = manifest["lora"]["kept_unmerged"]
    assert manifest["lora"]["merged"] == [] and len(kept) == 14
    assert all("QuantLinear" in k["reason"] and "re-quantize" in k["reason"] for k in kept)
    counts = op_counts(tmp_path / "qlora")
    assert counts["MatMulNBits"] >= 14 and counts["Gemm"] == 2 * 14
    assert manifest["parity"]["prefill_max_abs_diff"] < TOL
    assert max_diff(OnnxCausalLM(tmp_path / "qlora"), result.module) < TOL


def test_merge_keeps_adapters_on_a_shared_base_weight_unmerged(tmp_path):
    model = tiny_model("llama", num_hidden_layers=2)
    layers = model.model.layers
    layers[1].self_attn.q_proj.weight = layers[0].self_attn.q_proj.weight  # tied, as layer tying does
    result = modelfold.transform(model, "lora{rank=4,targets=[q_proj]}")
    with torch.no_grad():
        for layer in lora_layers(result.module).values():
            for p in layer.adapters.parameters():
                p.add_(torch.randn(p.shape) * 0.1)
    facts = export_onnx(result.module, tmp_path)
    kept = facts["lora"]["kept_unmerged"]
    assert facts["lora"]["merged"] == [] and [k["path"] for k in kept] == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
    ]
    assert all("shared with another layer" in k["reason"] for k in kept)
    assert facts["parity"]["prefill_max_abs_diff"] < TOL


# -- inputs: one base artifact, ONNX Runtime adapter files ---------------------------------------
@pytest.fixture(scope="module")
def inputs_artifact(tmp_path_factory):
    result = lora_llama(
        "lora{rank=4},lora{rank=2,name=b,init=xs},lora{rank=2,name=c,init=nola,nola_k=4},"
        "lora{rank=2,name=p,init=pissa}"
    )
    out = tmp_path_factory.mktemp("inputs") / "artifact"
    manifest = modelfold.export(result, out, lora="inputs")
    return result.module, out, manifest


@pytest.fixture
def model_with(inputs_artifact):
    """Activates adapters on the torch model for one test; restores all four afterwards."""
    model = inputs_artifact[0]
    yield lambda names: set_active_adapters(model, names) or model
    set_active_adapters(model, list(INPUTS_ADAPTERS))


def test_inputs_artifact_has_overridable_empty_slots(inputs_artifact):
    _, out, manifest = inputs_artifact
    lora = manifest["lora"]
    assert lora["mode"] == "inputs" and lora["slots"] == 14
    assert sorted(lora["adapter_files"]) == sorted(INPUTS_ADAPTERS)
    assert available_adapters(out) == sorted(INPUTS_ADAPTERS)
    assert lora["adapter_files"]["default"]["ranks"] == [4]
    assert lora["adapter_files"]["b"]["file"] == "adapters/b.onnx_adapter"
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    slots = {i.name: i.shape for i in session.get_overridable_initializers()
             if i.name != "logits_to_keep"}  # the LM head's optional input (logits_lowering)
    path = "model.layers.0.self_attn.k_proj"
    assert slots[f"{path}.lora_A"] == [f"{path}.lora_rank", 32]
    assert slots[f"{path}.lora_B"] == [16, f"{path}.lora_rank"]  # 2 KV heads x head dim 8
    assert len(slots) == 2 * 14
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    empty = {i.name: list(i.dims) for i in graph.initializer if i.name in slots}
    assert empty[f"{path}.lora_A"] == [0, 32] and empty[f"{path}.lora_B"] == [16, 0]
    assert "model.layers.0.self_attn.k_proj.lora_A" not in manifest["onnx"]["inputs"]
    # all four adapters active in torch: parity ran with a combined (rank 10) file
    assert "combined" in lora["parity_adapter"]
    assert manifest["parity"]["prefill_max_abs_diff"] < TOL
    assert lora["base_parity"]["prefill_max_abs_diff"] < TOL


def test_inputs_base_is_the_model_without_adapters(inputs_artifact, model_with):
    _, out, _ = inputs_artifact
    model = model_with([])
    base = OnnxCausalLM(out)
    assert max_diff(base, model) < TOL
    ids = probe_ids()
    assert np.abs(base.logits(ids) - torch_logits(model_with("default"), ids)).max() > 1e-3


@pytest.mark.parametrize("name", list(INPUTS_ADAPTERS))
def test_each_adapter_file_matches_torch(inputs_artifact, model_with, name):
    _, out, _ = inputs_artifact
    lm = OnnxCausalLM(out, adapter=name)
    assert lm.adapter_path == out / "adapters" / f"{name}.onnx_adapter"
    assert max_diff(lm, model_with(name)) < TOL


def test_adapters_combine_by_concatenating_along_the_rank(inputs_artifact, model_with, tmp_path):
    model, out, _ = inputs_artifact
    facts = write_ort_adapter(model, tmp_path / "both.onnx_adapter", ["default", "b"])
    assert facts["ranks"] == [6]
    params = ort.AdapterFormat.read_adapter(str(tmp_path / "both.onnx_adapter")).get_parameters()
    assert params["model.layers.1.mlp.down_proj.lora_A"].shape() == [6, 64]
    assert (
        max_diff(OnnxCausalLM(out, adapter=tmp_path / "both.onnx_adapter"), model_with(["default", "b"]))
        < TOL
    )


def test_adapter_file_holds_effective_a_and_scaled_b(inputs_artifact):
    model = inputs_artifact[0]
    layer = lora_layers(model)["model.layers.0.mlp.up_proj"]
    params = adapter_parameters(model, ["b"])
    a = params["model.layers.0.mlp.up_proj.lora_A"]
    b = params["model.layers.0.mlp.up_proj.lora_B"]
    assert a.dtype == np.float32 and b.dtype == np.float32
    delta = layer.adapters["b"].delta_weight().numpy()  # scaling * B @ R A
    np.testing.assert_allclose(b @ a, delta, atol=1e-6)


def test_generation_uses_the_adapter(inputs_artifact, model_with):
    _, out, _ = inputs_artifact
    model = model_with("default")
    lm = OnnxCausalLM(out, adapter="default")
    tokens = lm.generate([5, 9, 17], max_new_tokens=5)["tokens"]
    with torch.no_grad():
        expected = model.generate(
            torch.tensor([[5, 9, 17]]), max_new_tokens=5, do_sample=False, min_new_tokens=5
        )
    assert tokens == expected[0].tolist()


# -- errors -------------------------------------------------------------------------------------
def test_unknown_adapter_name_lists_the_available_ones(inputs_artifact):
    with pytest.raises(ValueError, match=r"unknown adapter 'nope'.*available: b, c, default, p"):
        OnnxCausalLM(inputs_artifact[1], adapter="nope")


def test_adapter_on_an_artifact_without_adapter_inputs(inputs_artifact, merged_artifact):
    adapter = inputs_artifact[1] / "adapters" / "default.onnx_adapter"
    with pytest.raises(ValueError, match="no adapter inputs.*lora='inputs'"):
        OnnxCausalLM(merged_artifact[0], adapter=adapter)


@pytest.mark.parametrize("mode", ["merged", "", None])
def test_bad_lora_mode_names_the_option(lora_result, tmp_path, mode):
    with pytest.raises(ValueError, match=r"^export option 'lora' must be one of merge, separate, "
                                         "inputs"):
        export_onnx(lora_result.module, tmp_path, lora=mode)
    with pytest.raises(ValueError, match="'lora' must be one of"):
        modelfold.export(lora_result, tmp_path / "out", lora=mode)
    assert not (tmp_path / "out").exists()
    assert LORA_MODES == ("merge", "separate", "inputs")


def test_inputs_mode_needs_lora_layers(tmp_path):
    with pytest.raises(ValueError, match="no LoRA layers"):
        export_onnx(tiny_model("llama", num_hidden_layers=1), tmp_path, lora="inputs")


def test_inputs_mode_refuses_merged_adapters(tmp_path):
    result = lora_llama("lora{rank=2,targets=[q_proj]}")
    merge_adapters(result.module)
    with pytest.raises(ValueError, match="have merged adapters; unmerge them first"):
        export_onnx(result.module, tmp_path, lora="inputs")
