"""share-attention on the real SmolLM2-135M (its first layers): the command line from the
similarity analysis to uptraining, the saved checkpoint, the ONNX artifact and its perplexity."""

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


def test_cli_uptrain_save_convert_eval(short_dir, tmp_path, capsys):
    """finetune -p 'attention-similarity,share-attention{...}' --teacher --save-model CKPT, then
    convert CKPT: the artifact has cache inputs only for the layers that own one, and its
    perplexity equals the uptrained eager model's within 0.1 %."""
    out, ckpt, art = tmp_path / "ft", tmp_path / "ckpt", tmp_path / "art"
    pipeline = ("attention-similarity{n_samples=2,seq_len=64,kl_tokens=32},"
                "share-attention{mode=kv,count=1}")
    assert main(["finetune", short_dir, "-p", pipeline, "--teacher", "--steps", "2",
                 "--batch-size", "1", "--seq-len", "64", "--eval-chars", "2000", "--no-verify",
                 "-o", str(out), "--save-model", str(ckpt), "--json"]) == 0
    trained = json.loads(capsys.readouterr().out)
    report = (out / "report.md").read_text()
    assert "share-attention" in report and "attention-similarity" in report
    assert trained["trainable_parameters"] > 0
    assert main(["eval", str(ckpt), "--chars", "2000", "--json"]) == 0
    eager = json.loads(capsys.readouterr().out)["perplexity"]
    assert eager == pytest.approx(trained["perplexity_after"], rel=1e-4)
    assert main(["convert", str(ckpt), "-o", str(art), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    layers = modelfold.load(str(ckpt)).arch.num_layers
    past = [i.name for i in onnx.load(art / "model.onnx", load_external_data=False).graph.input
            if i.name.startswith("past_key_values.")]
    assert len(past) == 2 * (layers - 1)
    per_token = facts["kv_cache_bytes_per_token"]
    assert per_token["artifact"] * layers == per_token["without_sharing"] * (layers - 1)
    assert main(["eval", str(art), "--chars", "2000", "--json"]) == 0
    onnx_ppl = json.loads(capsys.readouterr().out)["perplexity"]
    assert onnx_ppl == pytest.approx(eager, rel=1e-3)
