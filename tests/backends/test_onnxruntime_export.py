"""Encoder export, export options, the tied-weight rewrite and input validation."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from modelfold.backends.onnxruntime.export import copy_tokenizer_files, export_onnx
from modelfold.backends.onnxruntime.runtime import OnnxEncoder
from tests.tiny_models import tiny_model


def test_bert_encoder_parity(tmp_path):
    model = tiny_model("bert", layers=2)
    facts = export_onnx(model, tmp_path)
    assert facts["kind"] == "encoder"
    assert list(facts["inputs"]) == ["input_ids", "attention_mask", "token_type_ids"]
    assert facts["outputs"] == {"last_hidden_state": ["batch", "sequence", 32]}
    assert facts["parity"]["max_abs_diff"] <= 1e-4

    input_ids = torch.randint(0, model.config.vocab_size, (3, 11))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 8:] = 0  # right padding, as BERT tokenizers pad
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    actual = OnnxEncoder(tmp_path)(input_ids.numpy(), attention_mask.numpy())
    real = attention_mask.bool().numpy()
    assert np.abs(actual[real] - expected.numpy()[real]).max() <= 1e-4


def test_unoptimized_model_kept_on_request(tmp_path):
    facts = export_onnx(tiny_model("qwen2", layers=2), tmp_path, keep_unoptimized=True, parity=False)
    assert set(facts["files"]) == {
        "model.onnx",
        "model.onnx.data",
        "model.unoptimized.onnx",
        "model.unoptimized.onnx.data",
    }
    json.dumps(facts)  # the facts go into a JSON manifest


def test_optimize_false_writes_a_plain_model(tmp_path):
    facts = export_onnx(tiny_model("opt", layers=2), tmp_path, optimize=False)
    assert facts["optimization_level"] == "disabled"
    assert set(facts["files"]) == {"model.onnx", "model.onnx.data"}
    assert facts["parity"]["prefill_max_abs_diff"] <= 1e-4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"optimization_level": "max"}, "optimization_level"),
        ({"external_data_threshold_bytes": -1}, "external_data_threshold_bytes"),
        ({"opset": 17}, "opset"),
    ],
)
def test_bad_options_are_rejected(kwargs, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        export_onnx(tiny_model("llama", layers=2), tmp_path, **kwargs)


def test_missing_out_dir_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        export_onnx(tiny_model("llama", layers=2), tmp_path / "missing")


def test_half_precision_model_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="float32"):
        export_onnx(tiny_model("llama", layers=2).half(), tmp_path)


def _tied_llama():
    model = tiny_model("llama", layers=2, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def test_tied_lm_head_keeps_one_copy_of_the_weight(tmp_path):
    """The ONNX lowering applies the tied-linear graph pass by default: the head reads the
    embedding table through FusedMatMul(transB=1), the file holds the table once. Disabling the
    pass stores a second, transposed copy (ONNX Runtime folds Transpose(W) into one)."""
    (tmp_path / "tied").mkdir()
    (tmp_path / "plain").mkdir()
    facts = export_onnx(_tied_llama(), tmp_path / "tied", disable=("fuse-projections",))
    assert facts["tied_weight_matmuls"] == 1 and facts["onnx_nodes"]["com.microsoft.FusedMatMul"] >= 1
    assert facts["graph_passes"]["tied-linear"]["rewritten"] == [
        {"layer": "lm_head", "weight": "lm_head.weight"}]
    assert facts["parity"]["prefill_max_abs_diff"] < 1e-5

    def tables(path):  # (the fused gate/up weight of this model is [128, 32] too: not fused)
        graph = onnx.load(str(path / "model.onnx"), load_external_data=False).graph
        return sorted(tuple(i.dims) for i in graph.initializer if 128 in i.dims and 32 in i.dims)

    assert tables(tmp_path / "tied") == [(128, 32)]
    untied = export_onnx(_tied_llama(), tmp_path / "plain",
                         disable=("tied-linear", "fuse-projections"))
    assert untied["tied_weight_matmuls"] == 0 and "tied-linear" not in untied["graph_passes"]
    assert tables(tmp_path / "plain") == [(32, 128), (128, 32)]


def test_the_artifact_is_lowered_from_the_verified_graph(tmp_path, monkeypatch):
    """The ExportedProgram torch.onnx.export receives is the object the last verification ran
    on; the export captures nothing (the manager captured and verified after the last pass)."""
    import torch

    import modelfold
    from tests.helpers import VERIFIED

    result = modelfold.transform(tiny_model("qwen2", layers=2), "quantize{group_size=16}",
                                 context=VERIFIED)
    program = result.program
    captured = program.exported
    assert program.verified_graph is captured
    captures = program.captures
    translated = []
    real_export = torch.onnx.export

    def spy(model, *args, **kwargs):
        translated.append(model)
        return real_export(model, *args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", spy)
    manifest = modelfold.export(result, tmp_path / "art")
    assert len(translated) == 1 and translated[0] is program.verified_graph
    assert program.captures == captures  # no second capture
    assert manifest["onnx"]["lowered_graph"] == {"verified": True, "captures_during_export": 0}
    assert translated[0] is not captured  # the default fusions rewrote (a copy of) it
    # without the lowering's default graph passes the lowered graph is the captured one itself
    modelfold.export(result, tmp_path / "plain", disable=(
        "fuse-attention", "fuse-projections", "fuse-norms", "tied-linear"))
    assert translated[1] is captured and program.captures == captures


def test_copy_tokenizer_files(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    for name in ("tokenizer.json", "config.json", "model.safetensors"):
        (src / name).write_text("{}")
    assert copy_tokenizer_files(src, dst) == ["tokenizer.json", "config.json"]
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "tokenizer.json"]
    with pytest.raises(ValueError, match="not a directory"):
        copy_tokenizer_files(tmp_path / "nope", dst)
