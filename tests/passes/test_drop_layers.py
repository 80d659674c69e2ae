"""layer-importance + drop-layers through the pass manager, on tiny models of every family."""

from dataclasses import dataclass

import pytest
import torch

import modelfold
from modelfold.ir import Program
from modelfold.passes.base import Pass, PassConfig, PostconditionError, PreconditionError
from modelfold.passes.manager import PassContext, PassManager
from tests.helpers import QUIET, VERIFIED
from tests.tiny_models import ALL_FAMILIES, DECODER_FAMILIES, tiny_model

IMPORTANCE = "layer-importance{corpus=random,n_samples=4,seq_len=16}"


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_drop_by_importance_on_every_family(family):
    model = tiny_model(family)
    result = modelfold.transform(model, f"{IMPORTANCE},drop-layers{{count=2}}", context=VERIFIED)
    program = result.program
    scores = program.log[0].details["scores"]
    expected = sorted(sorted(range(4), key=scores.__getitem__)[:2])
    assert program.log[1].details["dropped"] == expected
    assert program.arch.num_layers == 2 == model.config.num_hidden_layers
    assert program.log[1].params_after < program.log[1].params_before
    fid = program.log[1].fidelity
    assert fid["sqnr_db"] < 100  # dropping layers is lossy ...
    if program.arch.kind == "causal-lm":
        assert 0 <= fid["top1_agreement"] <= 1 and fid["kl"] > 0
    else:  # ... and encoders are compared on hidden states, which have no top-1 / KL
        assert "kl" not in fid
    assert program.log[0].fidelity["max_abs_diff"] == 0.0  # analysis changed nothing


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_kv_cache_follows_the_new_depth(family):
    model = tiny_model(family)
    modelfold.transform(model, "drop-layers{layers=[0,2]}", context=QUIET)
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
        first = model(input_ids=ids[:, :5], use_cache=True)
        step = model(input_ids=ids[:, 5:], past_key_values=first.past_key_values, use_cache=True)
    assert len(first.past_key_values.layers) == 2
    torch.testing.assert_close(step.logits[:, -1], full[:, -1], atol=1e-4, rtol=1e-4)


def test_layer_types_follow_dropped_layers():
    model = tiny_model("gemma2")
    before = list(model.config.layer_types)
    modelfold.transform(model, "drop-layers{layers=[1]}", context=QUIET)
    assert model.config.layer_types == [before[0], before[2], before[3]]
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2]


@pytest.mark.parametrize("strategy, expected", [("last", [2, 3]), ("random", None)])
def test_strategies(strategy, expected):
    result = modelfold.transform(tiny_model("llama"), f"drop-layers{{count=2,strategy={strategy}}}",
                                 context=QUIET)
    dropped = result.program.log[0].details["dropped"]
    assert len(dropped) == 2 and dropped == sorted(dropped)
    if expected:
        assert dropped == expected


@pytest.mark.parametrize("pipeline, message", [
    ("drop-layers{count=2}", "put 'layer-importance' before it"),
    ("drop-layers{count=4}", "would remove 4 of 4 layers"),
    ("drop-layers{layers=[9]}", "out of range for a 4-layer model"),
    (f"{IMPORTANCE},drop-layers{{count=1}},drop-layers{{count=1}}", "needs layer scores"),
])
def test_preconditions(pipeline, message):
    with pytest.raises(PreconditionError, match=message):
        modelfold.transform(tiny_model("llama"), pipeline, context=QUIET)


@dataclass(frozen=True)
class _NoOptions(PassConfig):
    pass


class _ScaleNorm(Pass):
    """Claims to be exact but changes a norm weight: the manager must catch it."""

    name = "test-scale-norm"
    config_class = _NoOptions
    kind = "exact"

    def run(self, program):
        with torch.no_grad():
            program.module.model.norm.weight.mul_(1.5)
        return {}


class _SneakyAnalysis(_ScaleNorm):
    name = "test-sneaky-analysis"
    kind = "analysis"


@pytest.mark.parametrize("cls, message", [(_ScaleNorm, "exact pass test-scale-norm changed"),
                                          (_SneakyAnalysis, "analysis pass test-sneaky-analysis")])
def test_manager_enforces_pass_kinds(cls, message):
    with pytest.raises(PostconditionError, match=message):
        PassManager([cls()], VERIFIED).run(Program(tiny_model("llama")))


def test_disabled_pass_is_reported_not_run():
    model = tiny_model("llama")
    ctx = PassContext(log=None, disabled=("drop-layers",))
    result = modelfold.transform(model, "drop-layers{count=1,strategy=last}", context=ctx)
    assert model.config.num_hidden_layers == 4
    assert result.program.log[0].skipped[0]["reason"] == "disabled by the context"


def test_report_files(tmp_path):
    result = modelfold.transform(tiny_model("llama"), f"{IMPORTANCE},drop-layers{{count=1}}",
                                 context=QUIET)
    report = result.write_report(tmp_path)
    assert (tmp_path / "pass1-layer-importance.png").stat().st_size > 1000
    text = (tmp_path / "report.md").read_text()
    assert "| 2 | `drop-layers` | lossy |" in text and "pass1-layer-importance.png" in text
    assert report["passes"][1]["details"]["layers_after"] == 3
    assert report["model"]["layers"] == 3
