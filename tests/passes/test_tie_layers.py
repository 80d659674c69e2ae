"""tie-layers: shared Parameters, inits, sharing maps, SVD relaxation (exact at full rank), KV
cache per depth, uptraining, checkpoints, PEFT adapters, ONNX artifacts, errors (tiny models)."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch

import modelfold
from modelfold.ir.architecture import UnsupportedArchitectureError
from modelfold.ir.lora import LoraError, lora_layers, merge_adapters
from modelfold.ir.targets import TargetError
from modelfold.passes.base import PreconditionError
from modelfold.passes.tie_layers import depth_map, stepwise_sources, tied_groups
from modelfold.recursive import RecursiveError, recursive_base
from tests.helpers import QUIET, VERIFIED
from tests.tiny_models import DECODER_FAMILIES, tiny_model

IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))


def _logits(module: torch.nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return module(input_ids=ids, use_cache=False).logits


def _tie(model, options: str, context=QUIET):
    return modelfold.transform(model, f"tie-layers{{{options}}}", context=context)


def test_depth_maps_and_stepwise_sources():
    assert depth_map(6, 3, "cycle") == [0, 1, 2, 0, 1, 2]
    assert depth_map(6, 3, "sequence") == [0, 0, 1, 1, 2, 2]
    assert depth_map(5, 2, "sequence") == [0, 0, 0, 1, 1]
    # round(linspace(0, N - 1, K)) as numpy rounds it (half to even: 14.5 -> 14)
    assert stepwise_sources(30, 15) == [0, 2, 4, 6, 8, 10, 12, 14, 17, 19, 21, 23, 25, 27, 29]
    assert stepwise_sources(30, 10)[0] == 0 and stepwise_sources(30, 10)[-1] == 29
    assert stepwise_sources(4, 4) == [0, 1, 2, 3]


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_every_family_ties_relaxes_exactly_and_keeps_a_cache_per_depth(family):
    model = tiny_model(family)
    before = _logits(model)
    n = model.config.num_hidden_layers
    result = _tie(copy.deepcopy(model), "unique=2,relax_rank=full", context=VERIFIED)
    module = result.module
    stack = module.get_submodule(result.program.arch.layers)
    # depth d and d + 2 run the same shared Parameters (cycle), norms stay per depth when relaxed
    shared = [n_ for n_, p in stack[0].named_parameters()
              if p is dict(stack[2].named_parameters())[n_]]
    assert any(name.endswith("base_layer.weight") for name in shared)
    assert not any(name.endswith("layernorm.weight") for name in shared)
    details = result.program.log[-1].details
    assert details["block_parameters_shared"] * 2 == details["block_parameters_before"] - \
        details["per_depth_vector_parameters"] * 1  # the 1-D tensors are the depths' own
    after = _logits(module)
    if family == "mixtral":  # expert tensors are shared without relaxation: reported, lossy
        assert any("experts" in s["target"] for s in result.program.log[-1].skipped)
        assert result.program.log[-1].kind == "lossy"
    else:
        torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
        assert result.program.log[-1].kind == "exact"
    # KV cache: one entry per effective depth; cached decoding matches the full forward
    with torch.no_grad():
        out = module(input_ids=IDS[:, :6], use_cache=True)
        cache = out.past_key_values
        assert len(cache.layers if hasattr(cache, "layers") else cache) == n
        step = module(input_ids=IDS[:, 6:7], past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(step[:, -1], after[:, 6], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("init", ["stepwise", "average", "lower"])
@pytest.mark.parametrize("sharing", ["cycle", "sequence"])
def test_k_equal_n_is_exact_for_every_init(init, sharing):
    model = tiny_model("llama")
    before = _logits(model)
    result = _tie(model, f"unique=4,init={init},sharing={sharing}")
    assert torch.equal(_logits(result.module), before)
    assert result.program.log[-1].kind == "exact"
    assert result.program.log[-1].details["block_reduction"] == 1.0


@pytest.mark.parametrize("init", ["stepwise", "average", "lower"])
def test_inits_build_the_shared_layers_from_the_right_originals(init):
    model = tiny_model("llama", num_hidden_layers=6)
    orig = [copy.deepcopy(layer.self_attn.q_proj.weight.detach()) for layer in model.model.layers]
    result = _tie(model, f"unique=3,init={init}")
    layers = result.module.model.layers
    for k in range(3):
        got = layers[k].self_attn.q_proj.weight
        assert got is layers[k + 3].self_attn.q_proj.weight  # cycle: k and k + 3 share
        want = {"stepwise": orig[[0, 2, 5][k]], "lower": orig[k],
                "average": (orig[k] + orig[k + 3]) / 2}[init]
        torch.testing.assert_close(got.detach(), want)
    assert len({id(layer.self_attn.q_proj.weight) for layer in layers}) == 3


def test_unique_parameters_fall_by_n_over_k_and_the_rest_is_untouched():
    model = tiny_model("llama", num_hidden_layers=6)
    emb = model.model.embed_tokens.weight.detach().clone()
    total = sum(p.numel() for p in model.parameters())
    block = sum(p.numel() for p in model.model.layers.parameters())
    result = _tie(model, "unique=2")
    d = result.program.log[-1].details
    assert d["block_parameters_before"] == block
    assert d["block_parameters_after"] * 3 == block and d["block_reduction"] == 3.0
    assert result.program.parameter_count() == total - block + block // 3
    assert torch.equal(result.module.model.embed_tokens.weight, emb)
    trainable = {n for n, p in result.module.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("model.layers.") for n in trainable)


def test_relaxation_rank_is_capped_and_reduces_the_residual_in_order():
    model = tiny_model("llama", num_hidden_layers=6)
    before = _logits(model)
    errors = {}
    for rank in (0, 2, 8, "full"):
        result = _tie(copy.deepcopy(model), f"unique=2,init=average,relax_rank={rank}")
        errors[rank] = (_logits(result.module) - before).abs().max().item()
        d = result.program.log[-1].details
        if rank:
            ranks = d["relax_ranks"]
            assert ranks["self_attn.k_proj"] == min(8 if rank == 8 else 2 if rank == 2 else 16, 16)
            assert all(r <= 32 for r in ranks.values())
            adapters = lora_layers(result.module)
            assert len(adapters) == 6 * 7  # every linear of every depth
            ad = next(iter(adapters.values())).adapters["relax"]
            assert ad.scaling == 1.0  # lora_alpha = r, as in the paper
            rows = d["residual_by_depth"]
            assert all(r["after_relaxation"] <= r["residual"] + 1e-12 for r in rows)
    assert errors["full"] < 1e-5 < errors[8] <= errors[2] * 1.5 and errors[2] < errors[0] * 1.5
    assert errors[0] > 1e-3


def test_stepwise_leaves_zero_residual_at_source_depths():
    model = tiny_model("llama", num_hidden_layers=6)
    result = _tie(model, "unique=3,relax_rank=2")  # sources 0, 2, 5; cycle: depths 0 and 5 keep
    rows = {r["depth"]: r for r in result.program.log[-1].details["residual_by_depth"]}
    assert rows[0]["residual"] == 0 and rows[5]["residual"] == 0 and rows[1]["residual"] > 0


def test_report_plot_and_markdown(tmp_path):
    result = _tie(tiny_model("llama"), "unique=2,relax_rank=2")
    result.write_report(tmp_path)
    assert (tmp_path / "pass1-tie-layers.png").stat().st_size > 5000
    text = (tmp_path / "report.md").read_text()
    assert "block_reduction" in text and "per effective depth" in text


def test_uptraining_distils_and_keeps_the_weights_shared():
    torch.manual_seed(0)
    teacher = tiny_model("llama", num_hidden_layers=6)
    result = _tie(copy.deepcopy(teacher), "unique=2,relax_rank=2,init=average")
    layers = result.module.model.layers

    def kl_to_teacher() -> float:
        student = _logits(result.module).log_softmax(-1)
        return torch.nn.functional.kl_div(student, _logits(teacher).log_softmax(-1),
                                          log_target=True, reduction="batchmean").item()

    before = kl_to_teacher()
    out = modelfold.uptrain(result, teacher=teacher, corpus="random", steps=60, lr=1e-3,
                            warmup_steps=2, batch_size=2, seq_len=16, log_every=0,
                            progress=False, log=None)
    assert out["trainable_parameters"] > 0
    assert kl_to_teacher() < 0.75 * before  # 30 steps: 0.0160 -> 0.0113 on these tokens
    assert layers[0].mlp.up_proj.base_layer.weight is layers[2].mlp.up_proj.base_layer.weight
    assert layers[0].mlp.up_proj.base_layer.weight.requires_grad
    with pytest.raises(RecursiveError, match="no tie-layers pass"):
        modelfold.uptrain(modelfold.transform(tiny_model("llama"), "lora{rank=2}", context=QUIET),
                          teacher=teacher, corpus="random", steps=1)


def test_checkpoint_round_trip_keeps_the_sharing(tmp_path):
    result = _tie(tiny_model("llama", num_hidden_layers=6), "unique=3,relax_rank=2,init=average")
    want = _logits(result.module)
    manifest = modelfold.save(result, tmp_path / "ck")
    loaded = modelfold.load(str(tmp_path / "ck"))
    assert torch.equal(_logits(loaded.module), want)
    assert sorted(map(sorted, tied_groups(loaded.module))) == \
        sorted(map(sorted, tied_groups(result.module)))
    assert manifest["aliases"]


def test_relaxation_saved_as_peft_adapter_over_the_shared_base(tmp_path):
    model = tiny_model("llama", num_hidden_layers=6)
    result = _tie(model, "unique=3,relax_rank=4,init=average")
    with torch.no_grad():  # stand-in for uptraining: move adapters and shared weights
        for p in result.module.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    want = _logits(result.module)
    facts = modelfold.save_recursive(result, tmp_path / "rec")
    assert facts["adapter"]["layers"] == 6 * 7
    base = modelfold.load(str(tmp_path / "rec" / "base"))
    assert not lora_layers(base.module) and tied_groups(base.module)
    theirs = peft.PeftModel.from_pretrained(base.module, str(tmp_path / "rec" / "adapter")).eval()
    torch.testing.assert_close(_logits(theirs), want, atol=1e-5, rtol=1e-5)
    config = json.loads((tmp_path / "rec" / "adapter" / "adapter_config.json").read_text())
    assert config["lora_alpha"] == config["r"] == 4
    # and back into modelfold
    again = modelfold.load(str(tmp_path / "rec" / "base"))
    modelfold.load_adapter(again, tmp_path / "rec" / "adapter", name="relax")
    torch.testing.assert_close(_logits(again.module), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(RecursiveError, match="relax_rank=0"):
        recursive_base(_tie(tiny_model("llama"), "unique=2"))


def test_onnx_artifact_stores_shared_weights_once_and_generates(tmp_path):
    from modelfold.backends.onnxruntime.runtime import OnnxCausalLM

    model = tiny_model("llama")
    sizes = {}
    for k in (4, 1):
        result = _tie(copy.deepcopy(model), f"unique={k}")
        facts = modelfold.export(result, tmp_path / f"k{k}", backend="onnxruntime")
        assert facts["parity"]["prefill_max_abs_diff"] < 1e-4
        past = [name for name in facts["onnx"]["inputs"] if name.startswith("past_key_values")]
        assert len(past) == 2 * 4  # a key and a value per effective depth
        sizes[k] = (tmp_path / f"k{k}" / "model.onnx.data").stat().st_size
    assert facts["onnx"]["shared_initializers"]["removed"] > 0  # per-depth copies stored once
    block = sum(p.numel() for p in model.model.layers.parameters()) * 4
    # 3 of 4 layers' weights are gone from the file (small constants may move between files)
    assert sizes[4] - sizes[1] >= 0.9 * block * 3 / 4
    relaxed = _tie(copy.deepcopy(model), "unique=2,relax_rank=2")
    facts = modelfold.export(relaxed, tmp_path / "relaxed", backend="onnxruntime")
    assert facts["parity"]["prefill_max_abs_diff"] < 1e-4
    assert facts["lora"]["kept_unmerged"]  # shared bases: adapters stay Gemm branches
    runner = OnnxCausalLM(tmp_path / "relaxed")
    prompt = IDS[:1, :5]
    ours = runner.generate(prompt[0].tolist(), max_new_tokens=6)["tokens"]
    with torch.no_grad():
        eager = relaxed.module.generate(prompt, max_new_tokens=6, do_sample=False,
                                        min_new_tokens=6)
    assert list(ours) == eager[0].tolist()


def test_tied_weights_cannot_be_merged_or_quantized():
    result = _tie(tiny_model("llama"), "unique=2,relax_rank=2")
    with pytest.raises(LoraError, match="shared with other layers"):
        merge_adapters(result.module)
    pure = _tie(tiny_model("llama"), "unique=2")
    with pytest.raises(TargetError, match="shares its weight"):
        modelfold.transform(pure.program, "quantize{method=rtn}", context=QUIET)
    with pytest.raises(TargetError, match="shares its weight"):
        modelfold.transform(_tie(tiny_model("llama"), "unique=2").program,
                            "nm-sparsify{method=magnitude}", context=QUIET)


@pytest.mark.parametrize("options, error, match", [
    ("unique=3", PreconditionError, r"K=3 does not divide the 4 layers.*\[1, 2, 4\]"),
    ("unique=5", PreconditionError, "more than the model's 4 layers"),
    ("unique=0", ValueError, "must be >= 1"),
    ("unique=2,init=middle", ValueError, "stepwise, average, lower"),
    ("unique=2,sharing=zigzag", ValueError, "cycle, sequence"),
    ("unique=2,relax_rank=-1", ValueError, "relax_rank"),
    ("unique=2,relax_rank=half", ValueError, "relax_rank"),
])
def test_bad_options_are_clear_errors(options, error, match):
    with pytest.raises(error, match=match):
        _tie(tiny_model("llama"), options)


def test_sequence_sharing_takes_k_that_does_not_divide_n():
    result = _tie(tiny_model("llama"), "unique=3,sharing=sequence")
    assert result.program.log[-1].details["depth_to_shared"] == [0, 0, 1, 2]


def test_rewritten_or_already_tied_stacks_are_refused():
    with pytest.raises(PreconditionError, match="tie layers first"):
        modelfold.transform(tiny_model("llama"), "lora{rank=2},tie-layers{unique=2}",
                            context=QUIET)
    with pytest.raises(PreconditionError, match="already shares parameters"):
        modelfold.transform(tiny_model("llama"), "tie-layers{unique=2},tie-layers{unique=2}",
                            context=QUIET)


def test_model_without_a_layer_stack_is_a_clear_error():
    with pytest.raises(UnsupportedArchitectureError, match="config"):
        modelfold.transform(torch.nn.Sequential(torch.nn.Linear(4, 4)), "tie-layers{unique=1}")
    model = tiny_model("llama")
    model.model.layers = torch.nn.Sequential(*model.model.layers)  # not a ModuleList
    with pytest.raises(UnsupportedArchitectureError, match="layer stack"):
        modelfold.transform(model, "tie-layers{unique=2}")


def test_finetune_cli_uptrains_and_writes_base_and_peft_adapter(tmp_path, capsys):
    from modelfold.cli import main as cli_main

    src = tmp_path / "tiny"
    tiny_model("llama", num_hidden_layers=6).save_pretrained(src)
    out = tmp_path / "run"
    code = cli_main(["finetune", str(src), "-p", "tie-layers{unique=3,init=average,relax_rank=2}",
                     "-o", str(out), "--steps", "3", "--batch-size", "2", "--seq-len", "16",
                     "--teacher", "--train-option", "corpus=random",
                     "--save-model", str(tmp_path / "saved"), "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["adapters"]["relax"]["path"] == str(out / "adapter")
    report = json.loads((out / "training.json").read_text())
    assert report["training"]["config"]["lr"] == 1e-4 and report["training"]["config"]["kl_weight"] == 1.0
    whole = modelfold.load(str(tmp_path / "saved"))
    base = modelfold.load(summary["recursive_base"])
    theirs = peft.PeftModel.from_pretrained(base.module, str(out / "adapter")).eval()
    torch.testing.assert_close(_logits(theirs), _logits(whole.module), atol=1e-5, rtol=1e-5)
