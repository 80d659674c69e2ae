"""PEFT interop, checked against the real ``peft`` library: our adapters load in PEFT with the
same outputs, PEFT's load in modelfold with the same outputs (max abs difference <= 1e-5)."""

from __future__ import annotations

import copy
import json
import warnings

import peft
import pytest
import torch

import modelfold
from modelfold.adapters import AdapterError, load_adapter, read_adapter, save_adapter
from modelfold.ir.lora import lora_layers
from tests.helpers import QUIET
from tests.tiny_models import tiny_model

IDS = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
TOL = 1e-5


def _logits(module):
    with torch.no_grad():
        return module(input_ids=IDS, use_cache=False).logits


def _train_stand_in(module, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _peft_model(base, folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(base, str(folder)).eval()


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize("init", ["lora", "pissa", "xs", "sb", "nola"])
def test_ours_loads_in_peft_with_the_same_outputs(tmp_path, family, init):
    base = tiny_model(family)
    result = modelfold.transform(
        copy.deepcopy(base),
        f"lora{{rank=4,alpha=8,init={init},corpus=random,n_samples=4,seq_len=16,nola_k=8}}",
        context=QUIET)
    _train_stand_in(result.module)
    ours = _logits(result.module)
    facts = save_adapter(result, tmp_path / "adapter")
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    theirs = _logits(_peft_model(copy.deepcopy(base), tmp_path / "adapter"))
    assert (ours - theirs).abs().max() <= TOL
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["r"] == (8 if init == "pissa" else 4)  # PiSSA: rank 2r over the original W
    assert facts["kinds"] == {init: len(lora_layers(result.module))}
    # and back into modelfold, onto a fresh base
    fresh = copy.deepcopy(base)
    load_adapter(fresh, tmp_path / "adapter")
    assert (_logits(fresh) - ours).abs().max() <= TOL


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_adapter_loads_in_modelfold_with_the_same_outputs(tmp_path, rslora):
    base = tiny_model("llama")
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                             init_lora_weights=False, use_rslora=rslora,
                             rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 4})
    pm = peft.get_peft_model(copy.deepcopy(base), config).eval()
    pm.save_pretrained(str(tmp_path / "peft"))
    expected = _logits(pm)
    model = copy.deepcopy(base)
    facts = load_adapter(model, tmp_path / "peft")
    assert facts["layers"] == 12
    assert (_logits(model) - expected).abs().max() <= TOL
    # our re-save of a PEFT adapter is again a PEFT adapter with the same function
    save_adapter(model, tmp_path / "again")
    again = _logits(_peft_model(copy.deepcopy(base), tmp_path / "again"))
    assert (again - expected).abs().max() <= TOL


def test_peft_adapter_on_a_quantized_base(tmp_path):
    base = tiny_model("llama")
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, target_modules=["q_proj", "o_proj"], init_lora_weights=False))
    pm.save_pretrained(str(tmp_path / "peft"))
    q = modelfold.transform(copy.deepcopy(base), "quantize{bits=8,group_size=16}", context=QUIET)
    plain = _logits(q.module)
    load_adapter(q, tmp_path / "peft")
    assert not torch.allclose(_logits(q.module), plain)
    assert q.program.dialect_ops()["modelfold::lora_delta"] == 8


def test_adapter_for_another_base_model_is_refused(tmp_path):
    result = modelfold.transform(tiny_model("llama"), "lora{rank=4}", context=QUIET)
    save_adapter(result, tmp_path / "a")
    other = tiny_model("llama", hidden_size=64, intermediate_size=96)
    with pytest.raises(AdapterError, match="another base model: hidden_size 32"):
        load_adapter(other, tmp_path / "a")
    # without our sidecar (a PEFT adapter): layer paths and shapes are checked
    (tmp_path / "a" / "modelfold_adapter.json").unlink()
    with pytest.raises(AdapterError, match="another base model"):
        load_adapter(other, tmp_path / "a")
    with pytest.raises(AdapterError, match="does not have"):
        load_adapter(tiny_model("gpt2"), tmp_path / "a")


def test_bad_adapter_folders(tmp_path):
    with pytest.raises(AdapterError, match="not an adapter folder"):
        read_adapter(tmp_path)
    result = modelfold.transform(tiny_model("llama"), "lora{rank=4}", context=QUIET)
    save_adapter(result, tmp_path / "a")
    with pytest.raises(AdapterError, match="already exists"):
        save_adapter(result, tmp_path / "a")
    with pytest.raises(AdapterError, match="no adapter named 'x'"):
        save_adapter(result, tmp_path / "b", name="x")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(AdapterError, match="corrupt"):
        read_adapter(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    config["use_dora"] = True
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="DoRA"):
        read_adapter(tmp_path / "a")
