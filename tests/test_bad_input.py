"""Bad input, tried as a new user would: every case ends with exactly one ``modelfold: error:``
line and exit status 2 (a bug would show a traceback and exit 1), writes nothing, and fails
before a model is loaded wherever the mistake is visible without one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import transformers as tf

from modelfold import assets
from modelfold.cli import main

NOWHERE = "/nonexistent/model"  # a model argument that would fail if it were ever loaded


def one_error(capsys, argv: list[str], message: str) -> str:
    """Run the CLI; assert exit 2 and one error line containing ``message``."""
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("modelfold: error:")]
    assert code == 2, err
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err
    return lines[0]


# -- mistakes seen before any model is loaded ---------------------------------------------------
@pytest.mark.parametrize("pipeline, message", [
    ("drop-layer{count=1}", "unknown pass 'drop-layer'"),
    ("drop-layers{cnt=1}", "has no option 'cnt'"),
    ("drop-layers{count=x}", "must be an integer"),
    ("drop-layers{count=1,count=2}", "given twice"),
    ("quantize{targets=[re:(]}", "is not a valid regex"),
    ("nm-sparsify{exclude=[re:*x]}", "is not a valid regex"),
    ("drop-layers{layers=[1,2}", "unclosed '['"),
    ("drop-layers{layers=[1,2]]}", "unbalanced ']'"),
    ("layer-importance,,drop-layers{count=1}", "empty pipeline element"),
    ("drop-layers{count=1},", "ends with ','"),
    ("drop-layers{count=1}x", "expected ','"),
    ("quantize{bits=5}", "must be one of 2, 3, 4, 8"),
    ("quantize{targets=[]}", "targets' is empty"),
    ("lora{rank=0}", "option 'rank' must be >= 1"),
    ("nm-sparsify{n=4,m=4}", "n must satisfy"),
    ("layer-importance{corpus=books}", "must be 'random' or a known corpus"),
    ("layer-importance{n_samples=0}", "'n_samples' must be >= 1"),
])
def test_bad_pipelines_fail_before_the_model_loads(capsys, tmp_path, pipeline, message):
    one_error(capsys, ["convert", NOWHERE, "-p", pipeline, "-o", str(tmp_path / "out")], message)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("recipe, message", [
    ("passes:\n  - drop-layers: {count: 1}\npasess: []\n", "unknown top-level key(s) 'pasess'"),
    ("passes: []\n", "empty 'passes' list"),
    ("passes: [drop-layers: {count: 1}\n", "not valid YAML"),
    ("- drop-layers\n", "must be a mapping with a 'passes' list"),
    ("passes:\n  - drop-layers: {layers: '[1,2'}\n", "unbalanced brackets"),
])
def test_bad_recipes_fail_before_the_model_loads(capsys, tmp_path, recipe, message):
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe)
    one_error(capsys, ["convert", NOWHERE, "-p", str(path), "-o", str(tmp_path / "out")], message)


@pytest.mark.parametrize("argv, message", [
    (["convert", NOWHERE, "-p", "drop-layers{count=1}"], "nothing to write"),
    (["convert", NOWHERE, "-p", "drop-layers{count=1}", "-o", "{out}", "--save-model", "{out}"],
     "must name different folders"),
    (["convert", NOWHERE, "-p", "drop-layers{count=1}", "-o", "{out}", "--disable", "tied-lin"],
     "unknown pass 'tied-lin'"),
    (["convert", NOWHERE, "-p", "{tmp}/missing.yaml", "-o", "{out}"], "does not exist"),
    (["eval", NOWHERE, "--interpret"], "--interpret only apply with --backend triton"),
    (["eval", NOWHERE, "--chars", "10", "--text", "{tmp}/nope.txt"], "does not exist"),
    (["inspect", NOWHERE, "--graph", "{tmp}/graph.pdf"], "give a file ending in .svg"),
    (["assets", "pull", "gpt-5"], "unknown asset 'gpt-5'"),
    (["finetune", NOWHERE, "-p", "lora", "-o", "{out}", "--train-option", "steps"],
     "expects KEY=VALUE"),
    (["finetune", NOWHERE, "-p", "lora", "-o", "{out}", "--sparse-option", "decay=1"],
     "needs --sparse-aware"),
    (["finetune", NOWHERE, "-p", "lora", "-o", "{out}", "--steps", "0"], "'steps' must be >= 1"),
])
def test_bad_arguments_fail_before_the_model_loads(capsys, tmp_path, argv, message):
    fill = {"{out}": str(tmp_path / "out")}
    argv = [fill.get(a, a.replace("{tmp}", str(tmp_path))) for a in argv]
    one_error(capsys, argv, message)
    assert not (tmp_path / "out").exists()


# -- models and folders ---------------------------------------------------------------------------
def test_a_model_folder_with_its_own_code_is_refused_without_a_prompt(tmp_path):
    """transformers would ask "trust remote code? [y/N]" and run the folder's Python file on a
    yes; modelfold refuses the folder with one line, reads no answer, runs nothing."""
    model = tmp_path / "remote"
    tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                       num_hidden_layers=1, num_attention_heads=2)
                        ).save_pretrained(model)
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig",
                          "AutoModelForCausalLM": "evil.EvilModel"}
    (model / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "ran"
    (model / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('code ran')\n")
    for command in (["inspect", str(model)], ["convert", str(model), "-o", str(tmp_path / "o")],
                    ["eval", str(model), "--chars", "100"]):
        proc = subprocess.run([sys.executable, "-m", "modelfold", *command], input="y\ny\n",
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr
        assert "modelfold never executes model code" in proc.stderr
        assert "trust" not in proc.stdout.lower() + proc.stderr.lower().replace(
            "transformers itself", "")  # no prompt was shown
        assert not marker.exists()
    with pytest.raises(assets.AssetError, match="auto_map"):
        assets.load_model(model)


def test_overwrite_never_replaces_a_plain_file_or_a_foreign_folder(capsys, tmp_path):
    plain = tmp_path / "notes.txt"
    plain.write_text("keep me")
    line = one_error(capsys, ["convert", NOWHERE, "-p", "drop-layers{count=1}", "-o", str(plain),
                              "--overwrite"], "is a file")
    assert "--overwrite" not in line and plain.read_text() == "keep me"
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_text("meow")
    one_error(capsys, ["convert", NOWHERE, "-p", "drop-layers{count=1}", "-o", str(foreign),
                       "--overwrite"], "is not a modelfold artifact")
    one_error(capsys, ["convert", NOWHERE, "--save-model", str(foreign), "--overwrite"],
              "is not a modelfold checkpoint")
    one_error(capsys, ["finetune", NOWHERE, "-p", "lora", "-o", str(foreign), "--overwrite"],
              "is not a modelfold fine-tuning output")
    assert (foreign / "cat.jpg").read_text() == "meow"


def test_unwritable_output_locations_fail_before_loading(capsys, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    one_error(capsys, ["convert", NOWHERE, "-p", "drop-layers{count=1}", "-o",
                       str(blocker / "out")], "is a file, not a folder")
    locked = tmp_path / "readonly"
    locked.mkdir()
    real_access = os.access
    # (the tests may run as root, for whom chmod does not make a folder unwritable)
    monkeypatch.setattr(assets.os, "access",
                        lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    one_error(capsys, ["convert", NOWHERE, "-p", "drop-layers{count=1}", "-o",
                       str(locked / "out")], "is not writable")


def test_a_second_writer_of_the_same_output_fails_at_once(capsys, tmp_path):
    out = tmp_path / "shared"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from modelfold.assets import output_lock
        with output_lock({str(out)!r}):
            print("held", flush=True)
            time.sleep(120)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        start = time.perf_counter()
        one_error(capsys, ["convert", NOWHERE, "-p", "drop-layers{count=1}", "-o", str(out)],
                  "another modelfold process")
        assert time.perf_counter() - start < 30  # refused before any work
    finally:
        holder.kill()
        holder.wait()
    assert not out.exists()


def test_stale_partials_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    stale = tmp_path / f".out.partial-{int(dead.stdout)}-abcd1234"
    stale.mkdir()
    (stale / "model.onnx").write_text("half")
    mine = tmp_path / f".out.partial-{os.getpid()}-live0001"  # a live writer's: kept
    mine.mkdir()
    with assets.atomic_output(tmp_path / "out") as tmp:
        tmp.mkdir()
    assert not stale.exists() and mine.exists() and (tmp_path / "out").is_dir()


# -- artifacts -----------------------------------------------------------------------------------
@pytest.fixture
def corrupt_artifact(artifact, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(artifact, broken)
    (broken / "model.onnx").write_bytes(b"\x08\x07garbage, not a protobuf" * 10)
    return broken


@pytest.mark.parametrize("command", [["eval", "--chars", "100"], ["generate", "Hello"],
                                     ["inspect"]])
def test_corrupt_model_onnx_is_one_line(capsys, corrupt_artifact, command):
    argv = [command[0], str(corrupt_artifact), *command[1:]]
    one_error(capsys, argv, "model.onnx")


def test_generate_and_eval_arguments(capsys, artifact, small_model_dir, tmp_path, minilm_dir):
    one_error(capsys, ["generate", str(artifact), "Hello", "--max-new-tokens", "5000"],
              "more than the model's context length of 1024 tokens")
    one_error(capsys, ["generate", str(artifact), "Hello", "--max-new-tokens", "0"],
              "--max-new-tokens must be >= 1")
    one_error(capsys, ["generate", str(artifact), ""], "the prompt is empty")
    one_error(capsys, ["generate", str(small_model_dir), "Hi"], "is not a modelfold artifact")
    one_error(capsys, ["generate", str(artifact), "Hi", "--backend", "triton", "--interpret"],
              "is an ONNX artifact")
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)) * 64)
    one_error(capsys, ["eval", str(artifact), "--text", str(binary)], "is binary")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 au lait ".encode("latin-1") * 50)
    one_error(capsys, ["eval", str(artifact), "--text", str(latin)], "is not UTF-8 text")
    one_error(capsys, ["eval", str(artifact), "--chars", "0"], "--chars must be >= 1")
    one_error(capsys, ["eval", str(artifact), "--window", "1"], "window must be >= 2")
    one_error(capsys, ["eval", str(minilm_dir)], "perplexity needs a causal LM")
    one_error(capsys, ["inspect", str(artifact), "--graph", str(tmp_path / "g.svg")],
              "give a model, not an artifact")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_convert_leaves_no_partial_output(small_model_dir, tmp_path, signum):
    """Ctrl-C (SIGINT) or `kill` / a CI timeout (SIGTERM) while the export is writing: exit 130,
    the temporary folder removed, nothing in place."""
    out = tmp_path / "terminated"
    proc = subprocess.Popen(
        [sys.executable, "-m", "modelfold", "convert", str(small_model_dir), "-p",
         "drop-layers{count=1,strategy=last}", "-o", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not any(p.name.startswith(".terminated.partial-")
                                             for p in tmp_path.iterdir()):
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert [p.name for p in tmp_path.iterdir()] == []


def test_a_bug_is_a_traceback_not_a_user_error():
    """Anything that is not a ModelfoldError propagates (exit status 1 with a traceback), so a
    bug is never disguised as bad input."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import sys
        import modelfold.cli as cli
        def broken(args):
            raise ValueError("an internal invariant broke")
        parser = cli.build_parser()
        parser._subparsers._group_actions[0].choices["passes"].set_defaults(func=broken)
        cli.build_parser = lambda: parser
        sys.exit(cli.main(["passes"]))
        """)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" in proc.stderr
    assert "internal invariant" in proc.stderr and "modelfold: error" not in proc.stderr
