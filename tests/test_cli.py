"""The command line, end to end on a small real-tokenizer model, and its error behaviour."""

from __future__ import annotations

import json
import os

import pytest
import torch
import transformers as tf

from modelfold.cli import main

PIPELINE = "layer-importance{n_samples=4,seq_len=32},drop-layers{count=1}"


def run_json(capsys, argv: list[str]) -> dict:
    capsys.readouterr()
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_convert_writes_a_self_contained_artifact(artifact):
    names = {p.name for p in artifact.iterdir()}
    assert {"model.onnx", "modelfold.json", "config.json", "tokenizer.json", "report.md",
            "report.json", "pass1-layer-importance.png"} <= names
    manifest = json.loads((artifact / "modelfold.json").read_text())
    assert manifest["pipeline"].startswith("layer-importance{") and manifest["model"]["layers"] == 2
    assert json.loads((artifact / "config.json").read_text())["num_hidden_layers"] == 2
    assert manifest["parity"]["prefill_max_abs_diff"] <= 1e-4
    assert not any(n.startswith(".") for n in os.listdir(artifact.parent))  # no temporaries


def test_eval_artifact_matches_torch(capsys, small_model_dir, artifact, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("The Roman Empire was the post-Republican state of ancient Rome. " * 40)
    ort = run_json(capsys, ["eval", str(artifact), "--text", str(text), "--window", "64"])
    # the torch reference: the same model with the same layer dropped
    import modelfold
    from modelfold.evaluate import evaluate
    from tests.helpers import VERIFIED

    dropped = json.loads((artifact / "modelfold.json").read_text())["pipeline"]
    result = modelfold.transform(str(small_model_dir), dropped, context=VERIFIED)
    ref = evaluate(result.module, result.program.tokenizer, text.read_text(), window=64,
                   progress=False)
    # the attention runs on modelfold's kernel (float32 cache) where it can, else ONNX Runtime's
    assert ort["runtime"] in ("onnxruntime", "onnxruntime + modelfold's kernels")
    assert ort["tokens"] == ref["tokens"]
    assert abs(ort["perplexity"] / ref["perplexity"] - 1) < 1e-3


def test_generate_and_inspect(capsys, artifact, small_model_dir, tmp_path):
    out = run_json(capsys, ["generate", str(artifact), "Hello", "--max-new-tokens", "5"])
    assert len(out["new_tokens"]) == 5 and out["tokens_per_s"] > 0 and isinstance(out["text"], str)
    info = run_json(capsys, ["inspect", str(artifact)])
    assert info["type"] == "artifact" and "MatMul" in info["op_counts"]
    assert "past_key_values.0.key" in info["inputs"] and "past_key_values.2.key" not in info["inputs"]
    graph = tmp_path / "new" / "graph.html"  # a missing folder is created
    info = run_json(capsys, ["inspect", str(small_model_dir), "--graph", str(graph)])
    assert info["architecture"]["num_layers"] == 3 and info["dialect_ops"] == {}
    assert info["breakdown"]["embeddings"]["parameters"] == 49152 * 64
    assert "lm_head" not in info["breakdown"]  # tied: counted once, under embeddings
    assert graph.read_text().count("<rect") == info["dataflow"]["nodes"]


def test_passes_lists_options(capsys):
    listing = run_json(capsys, ["passes"])
    assert listing["drop-layers"]["kind"] == "lossy"
    assert {o["name"] for o in listing["drop-layers"]["options"]} == {"layers", "count",
                                                                       "strategy", "seed"}


@pytest.mark.parametrize("argv, message", [
    (["convert", "-p", "drop-layer{count=1}", "-o", "{out}"], "unknown pass 'drop-layer'"),
    (["convert", "-p", "drop-layers{cnt=1}", "-o", "{out}"], "has no option 'cnt'"),
    (["convert", "-p", "drop-layers{count=x}", "-o", "{out}"], "must be an integer"),
    (["convert", "{missing}", "-p", "drop-layers{count=1}", "-o", "{out}"], "does not exist"),
    (["convert", "{tmp}", "-p", "drop-layers{count=1}", "-o", "{out}"],
     "is not a Hugging Face model directory"),
    (["convert", "{t5}", "-p", "drop-layers{count=1}", "-o", "{out}"],
     "unsupported architecture model_type='t5'"),
    (["eval", "{missing}"], "does not exist"),
    (["generate", "{tmp}", "hi"], "is not a modelfold artifact"),
])
def test_bad_input_gives_one_error_line(capsys, tmp_path, argv, message):
    t5 = tmp_path / "t5"
    tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=64, d_model=16, d_ff=32, num_layers=1,
                                              num_heads=2, d_kv=8)).save_pretrained(t5)
    fill = {"{out}": str(tmp_path / "out"), "{missing}": str(tmp_path / "nope"),
            "{tmp}": str(tmp_path), "{t5}": str(t5)}
    argv = [fill.get(a, a) for a in argv]
    capsys.readouterr()
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and err[0].startswith("modelfold: error: ") and message in err[0]
    assert not (tmp_path / "out").exists()


def test_existing_output_is_refused(capsys, artifact, small_model_dir):
    assert main(["convert", str(small_model_dir), "-p", "drop-layers{count=1,strategy=last}",
                 "-o", str(artifact)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_triton_backend_eval_and_generate(capsys, small_model_dir, tmp_path):
    """eval / generate --backend triton on an int4 + LoRA checkpoint, in the interpreter."""
    ckpt = tmp_path / "ckpt"
    assert main(["convert", str(small_model_dir), "-p",
                 "quantize{bits=4,group_size=32},lora{rank=4,targets=[q_proj]}",
                 "--save-model", str(ckpt)]) == 0
    args = ["--backend", "triton", "--interpret", "--no-inductor"]
    torch_eval = run_json(capsys, ["eval", str(ckpt), "--chars", "400", "--window", "64"])
    triton_eval = run_json(capsys, ["eval", str(ckpt), "--chars", "400", "--window", "64", *args])
    assert triton_eval["runtime"] == "triton-interpreter"
    assert triton_eval["tokens"] == torch_eval["tokens"]
    assert abs(triton_eval["perplexity"] / torch_eval["perplexity"] - 1) < 1e-4
    out = run_json(capsys, ["generate", str(ckpt), "Hello", "--max-new-tokens", "4", *args])
    assert len(out["new_tokens"]) == 4
    # without --interpret on a machine without a GPU: one clear error line, exit 2
    if not torch.cuda.is_available():
        capsys.readouterr()
        assert main(["eval", str(ckpt), "--chars", "100", "--backend", "triton"]) == 2
        assert "needs an NVIDIA GPU" in capsys.readouterr().err
    assert main(["generate", str(ckpt), "Hi", "--interpret"]) == 2
    assert "--interpret only apply with --backend triton" in capsys.readouterr().err
