"""Encoder export, export options, the tied-weight rewrite and input validation."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from modelfold.backends.onnxruntime import export
from modelfold.backends.onnxruntime.export import copy_tokenizer_files, export_onnx
from modelfold.backends.onnxruntime.runtime import OnnxEncoder, create_session
from tests.backends.ort_tiny_models import tiny_bert, tiny_decoder


def test_bert_encoder_parity(tmp_path):
    model = tiny_bert()
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
    facts = export_onnx(tiny_decoder("qwen2"), tmp_path, keep_unoptimized=True, parity=False)
    assert set(facts["files"]) == {
        "model.onnx",
        "model.onnx.data",
        "model.unoptimized.onnx",
        "model.unoptimized.onnx.data",
    }
    json.dumps(facts)  # the facts go into a JSON manifest


def test_optimize_false_writes_a_plain_model(tmp_path):
    facts = export_onnx(tiny_decoder("opt"), tmp_path, optimize=False)
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
        export_onnx(tiny_decoder("llama"), tmp_path, **kwargs)


def test_missing_out_dir_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        export_onnx(tiny_decoder("llama"), tmp_path / "missing")


def test_half_precision_model_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="float32"):
        export_onnx(tiny_decoder("llama").half(), tmp_path)


def _tied_graph(vocab: int = 64, hidden: int = 8) -> tuple[onnx.ModelProto, np.ndarray]:
    """ids -> Gather(W) -> MatMul(., Transpose(W)): the tied embedding / LM head pattern."""
    weight = np.random.default_rng(0).standard_normal((vocab, hidden)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["W", "ids"], ["emb"]),
        helper.make_node("Transpose", ["W"], ["W_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["emb", "W_t"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tied",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", vocab])],
        [numpy_helper.from_array(weight, "W")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), weight


def test_tied_lm_head_keeps_one_copy_of_the_weight(tmp_path):
    model, weight = _tied_graph()
    onnx.save_model(model, str(tmp_path / "raw.onnx"))
    ids = np.array([[1, 5, 63], [0, 2, 4]], dtype=np.int64)
    expected = weight[ids] @ weight.T  # [B, S, V]

    assert export._rewrite_graph_in_place(tmp_path / "raw.onnx") == 1
    ops = [n.op_type for n in onnx.load(str(tmp_path / "raw.onnx")).graph.node]
    assert ops == ["Gather", "FusedMatMul"]

    export._optimize_with_ort(
        tmp_path / "raw.onnx", tmp_path / "model.onnx", export.OPTIMIZATION_LEVELS["extended"], 0
    )
    optimized = onnx.load(str(tmp_path / "model.onnx"))
    assert len(optimized.graph.initializer) == 1  # no folded transposed copy
    actual = create_session(tmp_path / "model.onnx").run(None, {"ids": ids})[0]
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


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
