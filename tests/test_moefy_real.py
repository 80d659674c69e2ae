"""moefy on the real SmolLM2-135M (its first layers) through the command line: top_k = experts
reproduces the dense model's perplexity (eager and ONNX, the MoE kernel in the artifact), and a
softmax conversion saved as a Mixtral checkpoint that modelfold reads back."""

from __future__ import annotations

import json

import onnx
import pytest

import modelfold
from modelfold.cli import main


@pytest.fixture(scope="module")
def short_dir(smollm2_short_base, tmp_path_factory):
    out = tmp_path_factory.mktemp("short") / "smollm2-short"
    modelfold.save(smollm2_short_base, out)
    return str(out)


def test_all_experts_keep_the_perplexity_eager_and_onnx(short_dir, tmp_path, capsys):
    art = tmp_path / "art"
    assert main(["eval", short_dir, "--chars", "3000", "--json"]) == 0
    dense = json.loads(capsys.readouterr().out)["perplexity"]
    pipeline = "moefy{experts=8,top_k=8,split=cluster,router=centroid,n_samples=2,seq_len=64}"
    assert main(["convert", short_dir, "-p", pipeline, "-o", str(art), "--json"]) == 0
    json.loads(capsys.readouterr().out)
    graph = onnx.load(art / "model.onnx", load_external_data=False).graph
    assert sum(n.op_type == "MoE" for n in graph.node) == modelfold.load(short_dir).arch.num_layers
    assert main(["eval", str(art), "--chars", "3000", "--json"]) == 0
    onnx_ppl = json.loads(capsys.readouterr().out)["perplexity"]
    assert onnx_ppl == pytest.approx(dense, rel=1e-3)


def test_softmax_conversion_saves_as_mixtral(short_dir, tmp_path, capsys):
    ckpt = tmp_path / "moe"
    pipeline = "moefy{experts=8,top_k=2,weights=softmax,n_samples=2,seq_len=64,router_epochs=2}"
    assert main(["convert", short_dir, "-p", pipeline, "--save-model", str(ckpt), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["checkpoint_format"] == "mixtral"
    config = json.loads((ckpt / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["num_local_experts"] == 8
    assert config["intermediate_size"] == 1536 // 8
    back = modelfold.load(str(ckpt))
    assert back.arch.mlp_type == "moe"
