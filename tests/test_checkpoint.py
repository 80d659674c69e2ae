"""Checkpoints of transformed models: save, reload without re-running passes, fail clearly."""

from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file
from torch import nn

import modelfold
from modelfold.assets import load_model
from modelfold.checkpoint import (
    MANIFEST,
    WEIGHTS,
    CheckpointError,
    load_checkpoint,
    register_module_type,
    save_checkpoint,
)
from modelfold.cli import main
from modelfold.ir.program import Program
from modelfold.ir.quant import PackedWeight, QuantEmbedding, QuantFormat, QuantLinear, W8A8Linear
from tests.helpers import QUIET
from tests.tiny_models import ALL_FAMILIES, tiny_config, tiny_model

INT4_G32 = QuantFormat(4, 32, False)


def quantize(model: nn.Module, fmt: QuantFormat = INT4_G32, *,
             layer_formats: dict[int, QuantFormat | str] | None = None) -> nn.Module:
    """RTN-quantize ``model`` in place by swapping modules (what a quantize pass does).

    Every ``nn.Linear`` becomes a ``QuantLinear`` in ``fmt`` (or the format of its layer in
    ``layer_formats``; ``"w8a8"`` gives ``W8A8Linear``). A tied embedding + LM head become one
    packed table shared by a ``QuantEmbedding`` and a ``QuantLinear`` (the same buffer objects).
    """
    layer_formats = layer_formats or {}
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is not None and head.weight is emb.weight:
        packed = PackedWeight.from_float(emb.weight, fmt)
        model.set_input_embeddings(QuantEmbedding(packed, emb.padding_idx))
        model.set_output_embeddings(QuantLinear(packed))
    for name, sub in list(model.named_modules()):
        if not isinstance(sub, nn.Linear):
            continue
        layer = next((i for i in layer_formats if f".layers.{i}." in name), None)
        choice = layer_formats[layer] if layer is not None else fmt
        if choice == "w8a8":
            model.set_submodule(name, W8A8Linear(sub.weight, sub.bias))
        else:
            model.set_submodule(name, QuantLinear(PackedWeight.from_float(sub.weight, choice),
                                                  sub.bias))
    return model


# layer 0: int4 g32 asymmetric; 1: W8A8; 2: int4 g16 symmetric (no zero points); 3: int3 sym
MIXED = {1: "w8a8", 2: QuantFormat(4, 16, True), 3: QuantFormat(3, 32, True)}


def tiny_quantized(family: str = "llama", seed: int = 0) -> nn.Module:
    """A tiny decoder with tied embeddings, quantized with every module type and layout."""
    torch.manual_seed(seed)
    config = tiny_config(family)
    config.tie_word_embeddings = True
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    return quantize(model, layer_formats=MIXED)


def probe_ids(vocab: int = 128) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 11), generator=torch.Generator().manual_seed(3))


# -- round trips -------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: q/k/v projections with biases
def test_quantized_round_trip_is_bit_identical(tmp_path, family):
    program = Program(tiny_quantized(family))
    ids = probe_ids()
    before = program.logits(ids)
    manifest = save_checkpoint(program, tmp_path / "ckpt")

    loaded = load_checkpoint(tmp_path / "ckpt")
    assert torch.equal(loaded.logits(ids), before)
    m = loaded.module
    emb, head = m.model.embed_tokens, m.lm_head
    assert isinstance(emb, QuantEmbedding) and isinstance(head, QuantLinear)
    for name in ("qweight", "scales", "zero_points"):  # re-tied: one object, not equal copies
        assert getattr(emb, name) is getattr(head, name)
    types = {p: type(s) for p, s in program.module.named_modules()}
    assert {p: type(s) for p, s in m.named_modules()} == types
    assert m.model.layers[2].self_attn.q_proj.zero_points is None  # symmetric int4
    assert m.model.layers[3].mlp.up_proj.bits == 3
    if family == "qwen2":
        assert torch.equal(m.model.layers[0].self_attn.q_proj.bias,
                           program.module.model.layers[0].self_attn.q_proj.bias)
    entries = {e["path"]: e for e in manifest["modules"]}
    assert entries["model.layers.1.mlp.down_proj"]["type"] == "W8A8Linear"
    assert entries["model.layers.0.self_attn.q_proj"]["facts"] == {
        "in_features": 32, "out_features": 32, "bits": 4, "block_size": 32, "symmetric": False,
        "has_bias": family == "qwen2", "has_zero_points": True}
    assert manifest["aliases"] == {f"model.embed_tokens.{n}": [f"lm_head.{n}"]
                                   for n in ("qweight", "scales", "zero_points")}
    assert manifest["architecture"]["model_type"] == family


def test_tied_table_is_stored_once(tmp_path):
    program = Program(tiny_quantized())
    save_checkpoint(program, tmp_path / "ckpt")
    path = tmp_path / "ckpt" / WEIGHTS
    stored = load_file(path)
    assert "model.embed_tokens.qweight" in stored and "lm_head.qweight" not in stored
    unique = {id(t): t for t in program.module.state_dict(keep_vars=True).values()}
    data_bytes = sum(t.numel() * t.element_size() for t in unique.values())
    header = struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert path.stat().st_size == 8 + header + data_bytes  # tensor data exactly once
    table = sum(getattr(program.module.lm_head, n).nbytes for n in ("qweight", "scales",
                                                                     "zero_points"))
    assert table > 0 and sum(t.nbytes for t in stored.values()) == data_bytes


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_plain_model_round_trip(tmp_path, family):
    program = Program(tiny_model(family))
    ids = probe_ids()
    save_checkpoint(program, tmp_path / "ckpt")
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert type(loaded.module) is type(program.module)
    assert torch.equal(loaded.logits(ids), program.logits(ids))
    for (name, a), (_, b) in zip(program.module.named_buffers(), loaded.module.named_buffers()):
        assert torch.equal(a, b), name  # non-persistent buffers (rotary inv_freq) recomputed
    tied = program.arch.tied_embeddings
    assert (loaded.module.get_output_embeddings() is not None and
            loaded.module.get_output_embeddings().weight is
            loaded.module.get_input_embeddings().weight) == tied


def test_transform_save_load_keeps_the_pass_log(tmp_path):
    result = modelfold.transform(tiny_model("llama"), "drop-layers{count=1,strategy=last}",
                                 context=QUIET)
    manifest = modelfold.save(result, tmp_path / "ckpt")
    assert manifest["pipeline"] == result.pipeline
    assert [p["name"] for p in manifest["passes"]] == ["drop-layers"]

    program = modelfold.load(str(tmp_path / "ckpt"))  # dispatches on modelfold_checkpoint.json
    assert program.arch.num_layers == 3 and program.source == str(tmp_path / "ckpt")
    assert [r.name for r in program.log] == ["drop-layers"]
    assert program.log[0].details == result.program.log[0].details
    ids = probe_ids()
    assert torch.equal(program.logits(ids), result.program.logits(ids))
    module, tokenizer = load_model(tmp_path / "ckpt")  # every CLI path goes through here
    assert tokenizer is None and torch.equal(Program(module).logits(ids), program.logits(ids))

    # transformed again and re-saved: the manifest's pipeline is the whole history
    again = modelfold.transform(program, "drop-layers{count=1,strategy=last}", context=QUIET)
    manifest = modelfold.save(again, tmp_path / "ckpt2")
    assert manifest["pipeline"].count("drop-layers") == 2
    assert load_checkpoint(tmp_path / "ckpt2").arch.num_layers == 2


# -- refusals and damaged checkpoints ----------------------------------------------------------
def test_existing_output_is_refused_unless_overwrite(tmp_path):
    program = Program(tiny_quantized())
    out = tmp_path / "ckpt"
    save_checkpoint(program, out)
    with pytest.raises(CheckpointError, match="already exists"):
        save_checkpoint(program, out)
    program.module.model.norm.weight.data.add_(1.0)
    save_checkpoint(program, out, overwrite=True)
    assert torch.equal(load_checkpoint(out).logits(probe_ids()), program.logits(probe_ids()))
    other = tmp_path / "not-a-checkpoint"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not a modelfold checkpoint"):
        save_checkpoint(program, other, overwrite=True)
    assert (other / "notes.txt").read_text() == "keep me"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporaries left


@pytest.fixture
def saved(tmp_path) -> Path:
    save_checkpoint(Program(tiny_quantized()), tmp_path / "ckpt")
    return tmp_path / "ckpt"


def _edit_manifest(path: Path, edit) -> None:
    manifest = json.loads((path / MANIFEST).read_text())
    edit(manifest)
    (path / MANIFEST).write_text(json.dumps(manifest))


def test_truncated_weights_are_a_clear_error(saved):
    weights = saved / WEIGHTS
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(saved)
    # without the manifest's size record, safetensors' own check still names the file
    _edit_manifest(saved, lambda m: m.pop("weights"))
    with pytest.raises(CheckpointError, match=f"{WEIGHTS}' is corrupt or truncated"):
        load_checkpoint(saved)


def test_corrupted_bytes_fail_the_checksum(saved):
    weights = saved / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(saved)
    load_checkpoint(saved, verify=False)  # a flipped weight bit still parses


def test_unknown_module_type_is_a_clear_error(saved):
    def rename(m):
        m["modules"][1]["type"] = "FancyLinear"
        m["modules"][1]["python_module"] = "somewhere.else"  # never imported

    _edit_manifest(saved, rename)
    with pytest.raises(CheckpointError, match="type 'FancyLinear'.*cannot rebuild"):
        load_checkpoint(saved)


def test_mismatched_tensors_are_named(saved):
    def regroup(m):
        entry = next(e for e in m["modules"] if e["path"] == "model.layers.0.mlp.up_proj")
        entry["facts"]["block_size"] = 16

    _edit_manifest(saved, regroup)
    with pytest.raises(CheckpointError, match="'model.layers.0.mlp.up_proj.qweight' has shape"):
        load_checkpoint(saved)


def test_missing_and_unexpected_tensors_are_named(saved):
    weights = saved / WEIGHTS
    tensors = load_file(weights)
    tensors["model.extra"] = tensors.pop("model.norm.weight")
    save_file(tensors, weights)
    _edit_manifest(saved, lambda m: m.pop("weights"))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) model.norm.weight; "
                                              r"unexpected tensor\(s\) model.extra"):
        load_checkpoint(saved)


def test_a_newer_format_is_refused(saved):
    _edit_manifest(saved, lambda m: m.update(version=99))
    with pytest.raises(CheckpointError, match="format version 99"):
        load_checkpoint(saved)


class _Doubler(nn.Module):
    def forward(self, x):
        return 2 * x


def test_unregistered_module_is_refused_at_save(tmp_path):
    model = tiny_model("llama")
    model.model.layers[0].mlp.act_fn = _Doubler()
    with pytest.raises(CheckpointError, match="act_fn' is a _Doubler.*register_module_type"):
        save_checkpoint(model, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


# -- the registry: how later passes extend the format ------------------------------------------
class ScaledAdapter(nn.Module):
    """A wrapper like a LoRA layer: a base layer plus its own parameter."""

    def __init__(self, base: nn.Module, out_features: int):
        super().__init__()
        self.base_layer = base
        self.scale = nn.Parameter(torch.ones(out_features))

    def forward(self, x):
        return self.base_layer(x) * self.scale


@pytest.fixture
def scaled_adapter_registered():
    register_module_type(
        ScaledAdapter, lambda m: {"out_features": m.scale.numel()},
        lambda f: ScaledAdapter(nn.Identity(), f["out_features"]))  # base: its own entry
    yield
    from modelfold.ir import module_types

    module_types._MODULE_TYPES.pop("ScaledAdapter")


def test_registered_wrapper_round_trips(tmp_path, scaled_adapter_registered):
    model = tiny_quantized()
    attn = model.model.layers[0].self_attn
    attn.o_proj = ScaledAdapter(attn.o_proj, 32)  # wraps a QuantLinear
    with torch.no_grad():
        attn.o_proj.scale.uniform_(0.5, 1.5)
    program = Program(model)
    manifest = save_checkpoint(program, tmp_path / "ckpt")
    paths = [e["path"] for e in manifest["modules"]]
    wrapper = paths.index("model.layers.0.self_attn.o_proj")
    assert paths[wrapper + 1] == "model.layers.0.self_attn.o_proj.base_layer"  # parent first
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert isinstance(loaded.module.model.layers[0].self_attn.o_proj.base_layer, QuantLinear)
    assert torch.equal(loaded.logits(probe_ids()), program.logits(probe_ids()))


def test_a_type_name_cannot_be_registered_twice():
    with pytest.raises(ValueError, match="'QuantLinear' is already registered"):
        register_module_type(ScaledAdapter, lambda m: {}, lambda f: None, name="QuantLinear")


# -- the command line --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory, small_model_dir, smollm2_tokenizer
                     ) -> tuple[Path, Program]:
    """The small random Llama with SmolLM2's tokenizer (conftest), quantized int4 g32, saved."""
    model = tf.LlamaForCausalLM.from_pretrained(small_model_dir).eval()
    program = Program(quantize(model), tokenizer=smollm2_tokenizer)
    path = tmp_path_factory.mktemp("checkpoints") / "small-int4"
    save_checkpoint(program, path)
    return path, program


def run_json(capsys, argv: list[str]) -> dict:
    capsys.readouterr()
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_eval_and_inspect_a_checkpoint(capsys, tmp_path, small_checkpoint):
    from modelfold.evaluate import evaluate

    path, program = small_checkpoint
    assert {"tokenizer.json", "config.json", MANIFEST, WEIGHTS} <= set(os.listdir(path))
    text = tmp_path / "text.txt"
    text.write_text("The Roman Empire was the post-Republican state of ancient Rome. " * 20)
    result = run_json(capsys, ["eval", str(path), "--text", str(text), "--window", "64"])
    ref = evaluate(program.module, program.tokenizer, text.read_text(), window=64, progress=False)
    assert result["runtime"] == "torch" and result["perplexity"] == ref["perplexity"]
    info = run_json(capsys, ["inspect", str(path)])
    assert info["dialect_ops"]["modelfold::quant_linear"] == 3 * 7 + 1
    assert info["dialect_ops"]["modelfold::quant_embedding"] == 1
    capsys.readouterr()
    assert main(["generate", str(path), "Hello"]) == 2
    assert "is a modelfold checkpoint, not an artifact" in capsys.readouterr().err


def test_cli_convert_save_model_without_onnx(capsys, tmp_path, small_checkpoint):
    path, program = small_checkpoint
    out = tmp_path / "dropped"
    summary = run_json(capsys, ["convert", str(path), "-p", "drop-layers{count=1,strategy=last}",
                                "--save-model", str(out), "--no-verify"])
    assert summary["checkpoint"] == str(out) and "onnx_bytes" not in summary
    assert not (out / "model.onnx").exists()
    loaded = modelfold.load(str(out))
    assert loaded.arch.num_layers == 2 and loaded.tokenizer is not None
    assert isinstance(loaded.module.lm_head, QuantLinear)
    assert loaded.module.lm_head.qweight is loaded.module.model.embed_tokens.qweight
    capsys.readouterr()
    assert main(["convert", str(path), "-p", "drop-layers{count=1}"]) == 2
    assert "nothing to write" in capsys.readouterr().err
    assert main(["convert", str(path), "--save-model", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


# -- the real model ----------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_int4_checkpoint(smollm2, tmp_path):
    """SmolLM2-135M, int4 g128 RTN (tied table too): bit-identical reload, ~7x smaller."""
    program = smollm2
    fp32_bytes = (Path(program.source) / "model.safetensors").stat().st_size
    quantize(program.module, QuantFormat(4, 128, False))
    program.invalidate()
    ids = program.tokenizer("The capital of France is", return_tensors="pt").input_ids
    before = program.logits(ids)

    start = time.perf_counter()
    manifest = modelfold.save(program, tmp_path / "smol-int4")
    save_s = time.perf_counter() - start
    start = time.perf_counter()
    loaded = modelfold.load(str(tmp_path / "smol-int4"))
    load_s = time.perf_counter() - start

    assert torch.equal(loaded.logits(ids), before)
    assert loaded.module.lm_head.qweight is loaded.module.model.embed_tokens.qweight
    weights = manifest["weights"]["bytes"]
    print(f"\nSmolLM2 int4 g128: model.safetensors {weights:,} bytes vs fp32 {fp32_bytes:,} "
          f"({fp32_bytes / weights:.2f}x smaller); save {save_s:.1f} s, load {load_s:.1f} s")
    assert weights < fp32_bytes / 6
