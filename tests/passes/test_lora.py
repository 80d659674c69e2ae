"""The lora pass, the LoraLinear layer and the lora_delta op (tiny models, every family)."""

from __future__ import annotations

import copy

import pytest
import torch

import modelfold
from modelfold.checkpoint import load_checkpoint
from modelfold.ir.lora import (
    LoraError,
    LoraLinear,
    adapter_names,
    lora_layers,
    merge_adapters,
    set_active_adapters,
    unmerge_adapters,
    unwrap,
)
from modelfold.ir.targets import TargetError
from modelfold.passes.base import PassError, PreconditionError
from modelfold.passes.lora import mark_trainable
from tests.helpers import QUIET, VERIFIED
from tests.tiny_models import DECODER_FAMILIES, tiny_model

IDS = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))


def _logits(module: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return module(input_ids=IDS, use_cache=False).logits


def _perturb(module: torch.nn.Module, scale: float = 0.05, seed: int = 1) -> None:
    """Stand-in for training: move every trainable adapter tensor away from its init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_standard_init_is_exact_on_every_family(family):
    model = tiny_model(family)
    before = _logits(model)
    result = modelfold.transform(model, "lora{rank=4,alpha=8}", context=VERIFIED)
    layers = lora_layers(result.module)
    assert layers, "no layer was adapted"
    assert torch.equal(_logits(result.module), before)
    ops = result.program.dialect_ops()
    assert ops["modelfold::lora_delta"] == len(layers)
    if family == "mixtral":  # experts are 3-D tensors: reported, never silently skipped
        assert any("experts" in s["target"] for s in result.program.log[-1].skipped)


@pytest.mark.parametrize("init", ["lora", "pissa", "xs", "nola"])
def test_b_zero_inits_keep_outputs_and_train_only_adapters(init):
    model = tiny_model("llama")
    before = _logits(model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = modelfold.transform(model, f"lora{{rank=4,init={init}}}", context=QUIET)
    assert torch.allclose(_logits(result.module), before, atol=1e-5)
    trainable = [n for n, p in result.module.named_parameters() if p.requires_grad]
    assert trainable and all(".adapters.default." in n for n in trainable)
    expected = {"lora": ("lora_A", "lora_B"), "pissa": ("lora_A", "lora_B"),
                "xs": ("lora_R",), "nola": ("nola_alpha", "nola_beta")}[init]
    assert {n.rsplit(".", 1)[1] for n in trainable} == set(expected)
    if init != "pissa":  # pissa moves the principal part of W into the adapter
        for n, p in result.module.named_parameters():
            if "base_layer" in n:
                original = n.replace(".base_layer", "")
                assert torch.equal(p, frozen[original])


def test_pissa_adapter_holds_principal_components():
    model = tiny_model("llama")
    w = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    result = modelfold.transform(model, "lora{rank=4,alpha=4,init=pissa}", context=QUIET)
    layer = result.module.model.layers[0].self_attn.q_proj
    ad = layer.adapters["default"]
    principal = ad.lora_B @ ad.lora_A  # scaling 1
    u, s, vh = torch.linalg.svd(w)
    assert torch.allclose(principal, (u[:, :4] * s[:4]) @ vh[:4], atol=1e-5)
    assert torch.allclose(layer.base_layer.weight + principal, w, atol=1e-5)


def test_lora_sb_starts_from_the_estimated_first_step():
    model = tiny_model("llama")
    result = modelfold.transform(
        model, "lora{rank=4,init=sb,corpus=random,n_samples=4,seq_len=16,sb_lr=1e-3}",
        context=QUIET)
    record = result.program.log[-1]
    assert record.kind == "lossy"
    ad = result.module.model.layers[0].self_attn.q_proj.adapters["default"]
    # B and A orthonormal (frozen), R diagonal and trainable; the delta is a truncated sign step
    assert torch.allclose(ad.lora_B.t() @ ad.lora_B, torch.eye(4), atol=1e-5)
    assert torch.allclose(ad.lora_A @ ad.lora_A.t(), torch.eye(4), atol=1e-5)
    assert ad.lora_R.requires_grad and not ad.lora_A.requires_grad
    delta = ad.delta_weight()
    assert 0 < delta.abs().max() <= 1e-3 * 4  # magnitude of a -lr*sign(grad) step, truncated


def test_targets_bare_names_globs_regex_and_exclude():
    model = tiny_model("llama")
    result = modelfold.transform(
        model, "lora{targets=[q_proj,re:layers\\.1\\.mlp\\.down_proj],exclude=[model.layers.0.*]}",
        context=QUIET)
    paths = sorted(lora_layers(result.module))
    assert paths == sorted([f"model.layers.{i}.self_attn.q_proj" for i in (1, 2, 3)]
                           + ["model.layers.1.mlp.down_proj"])


def test_bad_input_errors():
    with pytest.raises(TargetError, match="matches no layer"):
        modelfold.transform(tiny_model("llama"), "lora{targets=[qproj]}", context=QUIET)
    with pytest.raises(PassError, match=r"above min\(in, out\) = 16"):  # k_proj is 32 -> 16
        modelfold.transform(tiny_model("llama"), "lora{rank=20}", context=QUIET)
    capped = modelfold.transform(tiny_model("llama"), "lora{rank=20,rank_cap=true}", context=QUIET)
    assert capped.module.model.layers[0].self_attn.k_proj.adapters["default"].rank == 16
    with pytest.raises(ValueError, match="option 'rank'"):
        modelfold.transform(tiny_model("llama"), "lora{rank=0}", context=QUIET)
    with pytest.raises(ValueError, match="init"):
        modelfold.transform(tiny_model("llama"), "lora{init=dora}", context=QUIET)
    with pytest.raises(PassError, match="before quantize"):
        modelfold.transform(tiny_model("llama"), "quantize{group_size=16},lora{init=pissa}",
                            context=QUIET)
    twice = modelfold.transform(tiny_model("llama"), "lora", context=QUIET)
    with pytest.raises(PreconditionError, match="already has an adapter named 'default'"):
        modelfold.transform(twice.program, "lora", context=QUIET)


def test_merge_unmerge_and_several_named_adapters():
    model = tiny_model("llama")
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = modelfold.transform(model, "lora{rank=4,targets=[q_proj,v_proj]},"
                                        "lora{rank=2,name=style,init=xs}", context=QUIET)
    module = result.module
    assert adapter_names(module) == ["default", "style"]
    # the second pass trains only its own adapter
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.style." in n for n in trainable)
    mark_trainable(module, ["default", "style"])
    _perturb(module)
    both = _logits(module)
    set_active_adapters(module, "default")
    only_default = _logits(module)
    assert not torch.allclose(both, only_default)
    set_active_adapters(module, ["default", "style"])
    assert torch.equal(_logits(module), both)

    layers = merge_adapters(module)
    assert layers == len(lora_layers(module))
    merged = _logits(module)
    assert torch.allclose(merged, both, atol=1e-5)
    unmerge_adapters(module)
    assert torch.allclose(_logits(module), both, atol=1e-5)
    for n, p in module.named_parameters():
        if ".base_layer." in n:
            assert torch.allclose(p, w0[n.replace(".base_layer", "")], atol=1e-6)
    with pytest.raises(LoraError, match="no adapter named 'nope'"):
        set_active_adapters(module, "nope")
    n = unwrap(module)  # merge + remove the wrappers: a plain model again
    assert n and not lora_layers(module)
    assert torch.allclose(_logits(module), both, atol=1e-5)


def test_qlora_on_quantized_base_trains_and_refuses_merge():
    from modelfold.ir.quant import QuantLinear

    model = tiny_model("llama")
    result = modelfold.transform(model, "quantize{bits=4,group_size=16},lora{rank=4}",
                                 context=QUIET)
    layer = result.module.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoraLinear) and isinstance(layer.base_layer, QuantLinear)
    before = _logits(result.module)
    _perturb(result.module)
    assert not torch.allclose(_logits(result.module), before)
    with pytest.raises(LoraError, match="cannot merge"):
        merge_adapters(result.module)
    # gradients reach the adapters through the packed base
    result.module.train()
    loss = result.module(input_ids=IDS, labels=IDS).loss
    loss.backward()
    assert layer.adapters["default"].lora_B.grad is not None
    assert layer.adapters["default"].lora_B.grad.abs().sum() > 0


def test_lora_delta_op_gradients_match_autograd():
    x = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    a = torch.randn(2, 7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x, a, b: torch.ops.modelfold.lora_delta(x, a, b, 0.7),
                             (x, a, b))


@pytest.mark.parametrize("pipeline", ["lora{rank=4,init=nola,nola_k=8}",
                                      "quantize{bits=4,group_size=16},lora{rank=4}",
                                      "lora{rank=4,init=pissa},quantize{bits=4,group_size=16}"])
def test_checkpoint_round_trip(tmp_path, pipeline):
    result = modelfold.transform(tiny_model("llama", tie_word_embeddings=False), pipeline,
                                 context=QUIET)
    _perturb(result.module)
    expected = _logits(result.module)
    modelfold.save(result, tmp_path / "ckpt")
    program = load_checkpoint(tmp_path / "ckpt")
    assert torch.equal(_logits(program.module), expected)
    trainable = [n for n, p in program.module.named_parameters() if p.requires_grad]
    assert trainable and all(".adapters." in n for n in trainable)


def test_adapter_added_to_a_copy_leaves_the_original_alone():
    base = tiny_model("llama")
    snapshot = copy.deepcopy(base.state_dict())
    modelfold.transform(copy.deepcopy(base), "lora", context=QUIET)
    assert all(torch.equal(v, snapshot[k]) for k, v in base.state_dict().items())
