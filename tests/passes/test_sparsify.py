"""N:M sparsity: masks and compression (property tests), the dialect ops, nm-sparsify on tiny
models of every family, composition with quantize, checkpoints, and the error messages."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import modelfold
from modelfold.ir.program import Program
from modelfold.ir.quant import PackedWeight, QuantFormat, pack_zero_points, quantize_rtn
from modelfold.ir.sparse import (
    NMLinear,
    NMQuantLinear,
    SparsityFormatError,
    compress,
    decompress,
    group_nonzeros,
    index_bits,
    nm_mask,
    pack_indices,
    satisfies_nm,
    unpack_indices,
)
from modelfold.ir.targets import TargetError
from modelfold.passes.base import PassError, PreconditionError
from modelfold.passes.gptq import HessianAccumulator
from modelfold.passes.pipeline import build_pipeline
from modelfold.passes.sparsegpt import prune
from modelfold.passes.sparsify import check_nm_invariant, sparse_layers
from tests.helpers import QUIET, VERIFIED
from tests.tiny_models import tiny_model

CALIB = "corpus=random,n_samples=4,seq_len=16,batch_size=2"
PATTERNS = st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 4), (2, 8), (4, 8), (5, 16), (8, 32)])


# -- masks and compression (property tests) ------------------------------------------------------
@settings(max_examples=80, deadline=None)
@given(pattern=PATTERNS, rows=st.integers(1, 6), groups=st.integers(1, 5),
       seed=st.integers(0, 2**16), ties=st.booleans())
def test_mask_keeps_exactly_the_n_highest_of_every_group(pattern, rows, groups, seed, ties):
    n, m = pattern
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(rows, groups * m, generator=gen)
    if ties:
        scores = scores.round()  # many equal scores: the tie rule must still keep exactly n
    keep = nm_mask(scores, n, m)
    grouped_keep = keep.reshape(rows, groups, m)
    assert bool((grouped_keep.sum(-1) == n).all())
    grouped = scores.reshape(rows, groups, m)
    kept_min = torch.where(grouped_keep, grouped, torch.inf).amin(-1)
    dropped_max = torch.where(grouped_keep, -torch.inf, grouped).amax(-1)
    assert bool((kept_min >= dropped_max).all())
    assert torch.equal(keep, nm_mask(scores, n, m))  # deterministic


@settings(max_examples=80, deadline=None)
@given(pattern=PATTERNS, rows=st.integers(1, 6), groups=st.integers(1, 5),
       seed=st.integers(0, 2**16))
def test_compress_decompress_round_trip_and_invariant(pattern, rows, groups, seed):
    n, m = pattern
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, groups * m, generator=gen)
    keep = nm_mask(w.abs(), n, m)
    values, indices = compress(w, keep, n, m)
    assert values.shape == (rows, groups * n)
    per = 8 // index_bits(m)
    assert indices.dtype == torch.uint8 and indices.shape == (rows, -(-groups * n // per))
    dense = decompress(values, indices, groups * m, n, m)
    assert torch.equal(dense, w * keep)
    assert satisfies_nm(dense, n, m)
    assert int(group_nonzeros(dense, m).max()) <= n


@settings(max_examples=50, deadline=None)
@given(m=st.sampled_from([2, 3, 4, 5, 8, 16, 17, 64, 256]), rows=st.integers(1, 4),
       cols=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_index_packing_round_trip(m, rows, cols, seed):
    gen = torch.Generator().manual_seed(seed)
    positions = torch.randint(0, m, (rows, cols), generator=gen)
    assert torch.equal(unpack_indices(pack_indices(positions, m), m, cols), positions)


def test_satisfies_nm_detects_a_violation():
    w = torch.tensor([[1.0, 2.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0]])
    assert satisfies_nm(w, 3, 4)
    assert not satisfies_nm(w, 2, 4)
    assert not satisfies_nm(w, 2, 3)  # 8 columns do not split into groups of 3


@pytest.mark.parametrize("n,m", [(4, 4), (5, 4), (0, 4), (1, 1), (2, 300)])
def test_bad_patterns_are_refused(n, m):
    with pytest.raises(SparsityFormatError):
        nm_mask(torch.randn(2, 8), n, m)
    with pytest.raises(ValueError, match="nm-sparsify options 'n', 'm'"):
        build_pipeline(f"nm-sparsify{{n={n},m={m}}}")


def test_compress_refuses_a_mask_that_is_not_n_of_m():
    w = torch.randn(2, 8)
    with pytest.raises(SparsityFormatError, match="exactly 2 of every 4"):
        compress(w, torch.ones(2, 8, dtype=torch.bool), 2, 4)
    with pytest.raises(SparsityFormatError, match="not a multiple of m=4"):
        compress(torch.randn(2, 6), torch.ones(2, 6, dtype=torch.bool), 2, 4)


# -- the dialect ops -------------------------------------------------------------------------------
def test_nm_linear_matches_the_masked_dense_layer_and_trains_its_values():
    torch.manual_seed(0)
    w, bias = torch.randn(12, 32), torch.randn(12)
    keep = nm_mask(w.abs(), 2, 4)
    layer = NMLinear.from_dense(w, keep, 2, 4, bias)
    x = torch.randn(3, 5, 32, requires_grad=True)
    y = layer(x)
    ref_w = (w * keep).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    ref = torch.nn.functional.linear(x_ref, ref_w, bias)
    assert torch.allclose(y, ref, atol=1e-6)
    layer.values.requires_grad_(True)
    layer(x).square().sum().backward()
    ref.square().sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-5)
    # the values' gradient is the dense gradient at the kept positions; the pattern is fixed
    assert torch.allclose(layer.values.grad, compress(ref_w.grad, keep, 2, 4)[0], atol=1e-5)
    assert torch.equal(layer.mask(), keep)


@pytest.mark.parametrize("symmetric", [False, True])
def test_nm_quant_linear_is_the_masked_dequantized_weight(symmetric):
    torch.manual_seed(1)
    w = torch.randn(8, 64)
    keep = nm_mask(w.abs(), 2, 4)
    fmt = QuantFormat(4, 32, symmetric)
    codes, scales, zeros = quantize_rtn(w * keep, fmt)
    zp = None if symmetric else pack_zero_points(zeros, 4)
    _, indices = compress(w, keep, 2, 4)
    layer = NMQuantLinear.from_codes(codes, scales, zp, fmt, indices, 2, 4)
    packed = PackedWeight.from_codes(codes, scales, zeros, fmt)  # the same grid, dense
    assert torch.equal(layer.weight, packed.dequantize() * keep)  # pruned -> exactly 0
    assert satisfies_nm(layer.weight, 2, 4)
    x = torch.randn(4, 64)
    assert torch.allclose(layer(x), x @ layer.weight.T, atol=1e-5)
    # the compressed codes take 2 bits + 4 bits per kept value; dense int4 takes 4 per weight
    assert layer.codes.numel() + layer.indices.numel() < packed.qweight.numel()


def test_sparse_ops_stay_one_node_under_export():
    w = torch.randn(6, 16)
    layer = NMLinear.from_dense(w, nm_mask(w.abs(), 2, 4), 2, 4)
    ep = torch.export.export(layer, (torch.randn(2, 16),))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert targets == ["modelfold.nm_linear.default"]


# -- one weight matrix: the three methods ----------------------------------------------------------
def test_sparsegpt_beats_wanda_beats_magnitude_on_outlier_inputs():
    torch.manual_seed(0)
    k = 64
    # a few input channels carry most of the energy (as in LLM activations) and inputs correlate
    scale = torch.ones(k)
    scale[torch.randperm(k)[:6]] = 8.0
    mix = torch.eye(k) + 0.3 * torch.randn(k, k) / k ** 0.5
    x = (torch.randn(2048, k) @ mix) * scale
    acc = HessianAccumulator(k)
    acc.add(x)
    h = acc.value()
    w = torch.randn(48, k)
    errors = {method: prune(w, method, 2, 4, h).output_error for method in
              ("magnitude", "wanda", "sparsegpt")}
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"]
    result = prune(w, "sparsegpt", 2, 4, h)
    assert satisfies_nm(result.weight, 2, 4)
    assert torch.equal(result.weight != 0, result.keep & (result.weight != 0))


# -- the pass on tiny models --------------------------------------------------------------------------
def sparsify(family: str, options: str = "", context=QUIET, **overrides):
    """nm-sparsify on a tiny model (magnitude unless ``options`` names a method)."""
    if "method=" not in options:
        options = ",".join(filter(None, [options, "method=magnitude"]))
    return modelfold.transform(tiny_model(family, **overrides), f"nm-sparsify{{{options}}}",
                               context=context)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_every_linear_of_the_stack_becomes_exactly_2_4(method):
    options = f"method={method}" + ("" if method == "magnitude" else f",{CALIB}")
    result = sparsify("llama", options)
    module = result.module
    layers = sparse_layers(module)
    assert len(layers) == 4 * 7 and all(isinstance(m, NMLinear) for m in layers.values())
    assert check_nm_invariant(module) == []
    for layer in layers.values():
        assert float((layer.weight == 0).float().mean()) >= 0.5
    # embeddings and the LM head stay dense
    assert isinstance(module.lm_head, torch.nn.Linear)
    assert isinstance(module.model.embed_tokens, torch.nn.Embedding)
    details = result.program.log[-1].details
    assert details["pattern"] == "2:4" and details["pruned_layers"] == 28
    assert details["sparsity_of_pruned_layers"] == 0.5
    assert all(e["nm_invariant"] and e["max_nonzeros_per_group"] <= 2 for e in details["layers"])
    if method != "magnitude":
        assert details["calibration"]["sequences"] == 4
        assert all("output_error" in e for e in details["layers"])
    assert result.program.log[-1].fidelity  # the manager measured the lossy pass's effect
    assert result.program.log[-1].bytes_after < 0.8 * result.program.log[-1].bytes_before


@pytest.mark.parametrize("family", ["qwen2", "mistral", "gemma", "gemma2", "phi", "gpt2", "opt",
                                    "mixtral"])
def test_sparsegpt_4_8_across_families(family):
    result = sparsify(family, f"n=4,m=8,method=sparsegpt,{CALIB}", context=VERIFIED)
    layers = sparse_layers(result.module)
    assert layers and check_nm_invariant(result.module) == []
    logits = result.module(torch.randint(0, 128, (2, 9))).logits
    assert torch.isfinite(logits).all()
    skipped = result.program.log[-1].skipped
    if family == "mixtral":  # expert tensors are not linear layers: reported, not pruned silently
        assert any("experts" in s["target"] for s in skipped)


def test_layers_whose_input_is_not_a_multiple_of_m_are_reported_and_left_dense():
    result = sparsify("llama", "n=32,m=64")  # hidden 32 (q/k/v/o, gate/up) vs 64 (down_proj)
    module = result.module
    assert set(sparse_layers(module)) == {f"model.layers.{i}.mlp.down_proj" for i in range(4)}
    skipped = result.program.log[-1].skipped
    assert len(skipped) == 4 * 6
    assert all("not a multiple of m=64" in s["reason"] for s in skipped)
    assert isinstance(module.model.layers[0].self_attn.q_proj, torch.nn.Linear)


def test_an_m_that_divides_no_input_size_is_an_error():
    with pytest.raises(PassError, match=r"m=24 divides the input size of none.*\[32, 64\]"):
        sparsify("llama", "n=2,m=24")


def test_targets_exclude_and_their_errors():
    result = sparsify("llama", "targets=[*mlp*],exclude=[*down_proj]")
    assert set(sparse_layers(result.module)) == {
        f"model.layers.{i}.mlp.{p}" for i in range(4) for p in ("gate_proj", "up_proj")}
    with pytest.raises(TargetError, match="matches no layer"):
        sparsify("llama", "targets=[*nonexistent*]")
    with pytest.raises(TargetError, match="'exclude'.*matches no layer"):
        sparsify("llama", "exclude=[*nothing*]")


def test_bad_options_name_the_option():
    with pytest.raises(ValueError, match="method"):
        build_pipeline("nm-sparsify{method=random}")
    with pytest.raises(ValueError, match="damp"):
        build_pipeline("nm-sparsify{damp=2}")
    with pytest.raises(ValueError, match="has no option 'sparsity'"):
        build_pipeline("nm-sparsify{sparsity=0.5}")


def test_calibrated_methods_need_a_tokenizer_or_random_text():
    with pytest.raises(PreconditionError, match="needs a tokenizer"):
        sparsify("llama", "method=wanda")


def test_sparsify_after_quantize_is_refused_with_the_order_to_use():
    first = modelfold.transform(tiny_model("llama"), "quantize{bits=4,group_size=16}",
                                context=QUIET)
    with pytest.raises(PreconditionError, match="put nm-sparsify before quantize"):
        modelfold.transform(first.program, "nm-sparsify{method=magnitude}", context=QUIET)


def test_sparsifying_twice_skips_the_sparse_layers_with_a_reason():
    first = sparsify("llama", "targets=[*mlp*]")
    second = modelfold.transform(first.program, "nm-sparsify{n=1,m=4,method=magnitude}",
                                 context=QUIET)
    details = second.program.log[-1].details
    assert details["pruned_layers"] == 4 * 4  # the attention projections
    assert sum("already N:M sparse" in s["reason"] for s in second.program.log[-1].skipped) == 4 * 3


def test_report_plot(tmp_path):
    from modelfold.passes.sparsify import NMSparsify

    result = sparsify("llama", f"method=sparsegpt,{CALIB}")
    assert NMSparsify.plot(result.program.log[-1].details, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


# -- composition with quantization -------------------------------------------------------------------
@pytest.mark.parametrize("quant", ["bits=4,group_size=16", "bits=4,group_size=16,symmetric=true",
                                   "bits=8,group_size=-1", "bits=3,group_size=16",
                                   f"bits=4,group_size=16,method=gptq,{CALIB}"])
def test_quantize_after_sparsify_keeps_the_pattern(quant):
    result = modelfold.transform(tiny_model("llama"),
                                 f"nm-sparsify{{method=magnitude}},quantize{{{quant}}}",
                                 context=QUIET)
    layers = sparse_layers(result.module)
    assert len(layers) == 28 and all(isinstance(m, NMQuantLinear) for m in layers.values())
    assert check_nm_invariant(result.module) == []
    details = result.program.log[-1].details
    assert all(e["nm_invariant"] and e["pattern"] == "2:4" for e in details["layers"])


def test_gptq_on_a_sparse_layer_compensates_with_the_kept_weights():
    result = modelfold.transform(
        tiny_model("llama"),
        f"nm-sparsify{{method=magnitude}},quantize{{bits=4,group_size=16,method=gptq,{CALIB}}}",
        context=QUIET)
    layers = result.program.log[-1].details["layers"]
    assert sum(e["output_error"] < e["rtn_output_error"] for e in layers) > 0.8 * len(layers)


def test_awq_and_smoothquant_on_a_sparse_model():
    first = sparsify("llama")
    with pytest.raises(PreconditionError, match="use method=rtn or method=gptq"):
        modelfold.transform(first.program, f"quantize{{method=awq,{CALIB}}}", context=QUIET)
    second = modelfold.transform(first.program, f"smooth-quant{{{CALIB}}}", context=QUIET)
    skipped = second.program.log[-1].skipped
    assert len(skipped) == 28 and all("W8A8 has no sparse form" in s["reason"] for s in skipped)


# -- checkpoints ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("pipeline", ["nm-sparsify{n=1,m=4,method=magnitude}",
                                      "nm-sparsify{method=magnitude},"
                                      "quantize{bits=4,group_size=16}"])
def test_checkpoint_round_trip_is_bit_identical(tmp_path, pipeline):
    result = modelfold.transform(tiny_model("llama"), pipeline, context=QUIET)
    modelfold.save(result, tmp_path / "ckpt")
    loaded = modelfold.load(str(tmp_path / "ckpt"))
    assert check_nm_invariant(loaded.module) == []
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        assert torch.equal(result.module(ids).logits, loaded.module(ids).logits)
    dense_bytes = sum(p.numel() * 4 for p in tiny_model("llama").model.layers.parameters())
    stack_bytes = sum(t.numel() * t.element_size() for t in
                      [*loaded.module.model.layers.parameters(),
                       *loaded.module.model.layers.buffers()])
    assert stack_bytes < 0.6 * dense_bytes


def test_program_capture_keeps_sparse_layers_as_dialect_nodes():
    result = sparsify("llama", "n=2,m=4")
    program = result.program
    assert isinstance(program, Program)
    ops = [str(n.target) for n in program.exported.graph.nodes if n.op == "call_function"]
    assert ops.count("modelfold.nm_linear.default") == 28


def test_lora_on_a_sparse_model_reports_the_sparse_layers():
    first = sparsify("llama", "targets=[*mlp*]")
    second = modelfold.transform(first.program, "lora{rank=2}", context=QUIET)
    skipped = second.program.log[-1].skipped
    assert len(skipped) == 4 * 3 and all("N:M sparse layer" in s["reason"] for s in skipped)
