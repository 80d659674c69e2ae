"""Quantization: packing, the dialect ops, RTN / GPTQ / AWQ / SmoothQuant on tiny models."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import modelfold
from modelfold.ir.program import Program
from modelfold.ir.quant import (
    PackedWeight,
    QuantEmbedding,
    QuantFormat,
    QuantFormatError,
    QuantLinear,
    W8A8Linear,
    block_size_for,
    dequantize,
    pack_rows,
    pack_zero_points,
    pseudo_quantize,
    quantize_rtn,
    unpack_rows,
    unpack_weight,
    unpack_zero_points,
)
from modelfold.ir.targets import TargetError
from modelfold.passes.base import PreconditionError
from modelfold.passes.gptq import HessianAccumulator, gptq_quantize
from modelfold.passes.layerwise import LayerwiseRunner
from modelfold.passes.pipeline import build_pipeline
from tests.helpers import QUIET, VERIFIED
from tests.tiny_models import ALL_FAMILIES, tiny_model

CALIB = "corpus=random,n_samples=4,seq_len=16,batch_size=2"


# -- packing (property tests) ------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([2, 4, 8]), rows=st.integers(1, 5), groups=st.integers(1, 6),
       seed=st.integers(0, 2**16))
def test_pack_unpack_round_trip(bits, rows, groups, seed):
    cols = groups * (8 // bits) * 2
    gen = torch.Generator().manual_seed(seed)
    values = torch.randint(0, 1 << bits, (rows, cols), generator=gen)
    packed = pack_rows(values, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, cols * bits // 8)
    assert torch.equal(unpack_rows(packed, bits).long(), values)


def test_packing_is_low_nibble_first():
    # MatMulNBits: element 2j in the low nibble, 2j+1 in the high nibble
    assert pack_rows(torch.tensor([[1, 2]]), 4).item() == 0x21
    assert pack_rows(torch.tensor([[1, 2, 3, 0]]), 2).item() == 0b00111001


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), group=st.sampled_from([16, 32, 64, -1]),
       symmetric=st.booleans(), n=st.integers(1, 9), k=st.integers(1, 150),
       seed=st.integers(0, 2**16))
def test_packed_weight_round_trip(bits, group, symmetric, n, k, seed):
    """Any K (also not a multiple of the group): packed storage dequantizes to the RTN grid."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    fmt = QuantFormat(bits, block_size_for(group, k), symmetric)
    codes, scales, zeros = quantize_rtn(w, fmt)
    packed = PackedWeight.from_codes(codes, scales, zeros, fmt)
    kb = fmt.k_blocks(k)
    assert packed.qweight.shape == (n, kb, fmt.block_size * fmt.storage_bits // 8)
    assert torch.equal(unpack_weight(packed.qweight, fmt.storage_bits, k).long(), codes.long())
    if packed.zero_points is not None:
        got = unpack_zero_points(packed.zero_points, fmt.storage_bits, kb)
        assert torch.equal(got.long(), zeros.long())
    expected = pseudo_quantize(w, fmt)
    torch.testing.assert_close(packed.dequantize(), expected, rtol=0, atol=1e-6)
    step = scales.abs().repeat_interleave(fmt.block_size, 1)[:, :k]
    error = (packed.dequantize() - w).abs()
    if symmetric:
        # the group's largest magnitude is exact; the other side reaches (2^(bits-1) - 1) steps,
        # so values beyond it are clipped by less than one step (ONNX Runtime's rule)
        assert (error <= step + 1e-6).all()
        extreme = w.abs().argmax(1)
        exact = error.gather(1, extreme[:, None])
        assert (exact <= 1e-6).all() or fmt.block_size < k  # one block: its extreme is the row's
    else:  # at most half a step: the range covers the group, no clipping
        assert (error <= step / 2 + 1e-6).all()
    assert codes.max() <= fmt.maxq


def test_symmetric_4bit_stores_no_zero_points_and_3bit_does():
    w = torch.randn(4, 64)
    assert PackedWeight.from_float(w, QuantFormat(4, 32, True)).zero_points is None
    three = PackedWeight.from_float(w, QuantFormat(3, 32, True))
    assert three.zero_points is not None  # zero point 4 differs from the container's default 8
    assert three.qweight.shape == (4, 2, 16)  # 3-bit values live in 4-bit containers


@pytest.mark.parametrize("group", [0, 8, 48, 100])
def test_bad_group_size_is_refused(group):
    with pytest.raises(QuantFormatError, match="power of 2"):
        block_size_for(group, 64)


def test_zero_points_pack_two_per_byte():
    zeros = torch.tensor([[3, 12, 5]])
    packed = pack_zero_points(zeros, 4)
    assert packed.shape == (1, 2) and packed[0, 0].item() == 0xC3 and packed[0, 1].item() == 5


# -- ops and modules ---------------------------------------------------------------------------
def test_quant_linear_matches_dequantized_linear_and_has_gradients():
    torch.manual_seed(0)
    lin = torch.nn.Linear(100, 7)
    q = QuantLinear(PackedWeight.from_float(lin.weight, QuantFormat(4, 32, False)), lin.bias)
    x = torch.randn(2, 3, 100, requires_grad=True)
    y = q(x)
    w = dequantize(q.qweight, q.scales, q.zero_points, 100, 4, 32)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w, lin.bias))
    y.sum().backward()  # QLoRA-style training needs d/dx through the frozen quantized weight
    torch.testing.assert_close(x.grad, torch.ones(2, 3, 7) @ w)
    # the bias is frozen by default; made trainable, it gets its gradient (not silently None)
    assert not q.bias.requires_grad
    q.bias.requires_grad_(True)
    q(x).sum().backward()
    torch.testing.assert_close(q.bias.grad, torch.full((7,), 6.0))


def test_quant_embedding_rows():
    table = torch.randn(20, 48)
    packed = PackedWeight.from_float(table, QuantFormat(4, 16, False))
    emb = QuantEmbedding(packed)
    ids = torch.tensor([[0, 5, 19], [3, 3, 1]])
    torch.testing.assert_close(emb(ids), packed.dequantize()[ids])


def test_w8a8_linear_close_to_float():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 16)
    q = W8A8Linear(lin.weight, lin.bias)
    x = torch.randn(3, 5, 64)
    ref = lin(x)
    err = (q(x) - ref).norm() / ref.norm()
    assert err < 0.02
    assert q.qweight_t.dtype == torch.int8 and q.qweight_t.shape == (64, 16)


# -- GPTQ --------------------------------------------------------------------------------------
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group", [32, -1])
def test_gptq_beats_rtn_on_correlated_inputs(act_order, group):
    torch.manual_seed(0)
    k = 96
    x = torch.randn(2048, k) @ (torch.randn(k, k) * 0.3 + torch.eye(k))
    x[:, :4] *= 10  # a few outlier channels, as in real activations
    w = torch.randn(40, k)
    acc = HessianAccumulator(k)
    acc.add(x)
    fmt = QuantFormat(4, block_size_for(group, k), False)
    result = gptq_quantize(w, acc.value(), fmt, act_order=act_order)
    assert result.relative_error < 0.6 * result.rtn_relative_error
    # the codes live on the stored grid: packing and dequantizing reproduces the output error
    packed = PackedWeight.from_codes(result.codes, result.scales, result.zeros, fmt)
    e = w - packed.dequantize()
    h = acc.value()
    assert abs(float((e @ h * e).sum() / (w @ h * w).sum()) - result.relative_error) < 1e-4


@pytest.mark.parametrize("symmetric", [False, True])
def test_mse_range_search_never_loses_to_min_max(symmetric):
    from modelfold.ir.quant import fake_quantize, fit_params, fit_params_mse

    torch.manual_seed(1)
    w = torch.randn(200, 64) * torch.rand(200, 1)
    w[:, 0] *= 6  # outliers stretch the min/max range
    fmt = QuantFormat(4, 64, symmetric)

    def err(s, z):
        return (fake_quantize(w, s[:, None], z[:, None], fmt) - w).abs().pow(2.4).sum(1)

    plain, searched = err(*fit_params(w, fmt)), err(*fit_params_mse(w, fmt))
    assert bool((searched <= plain + 1e-6).all())
    assert float(searched.sum()) < float(plain.sum())


def test_gptq_with_mse_ranges_stays_on_the_stored_grid():
    torch.manual_seed(0)
    k = 64
    x = torch.randn(1024, k)
    w = torch.randn(24, k)
    acc = HessianAccumulator(k)
    acc.add(x)
    fmt = QuantFormat(4, 32, False)
    for act_order in (False, True):
        result = gptq_quantize(w, acc.value(), fmt, act_order=act_order, mse=True)
        assert result.relative_error < result.rtn_relative_error
        assert float(result.codes.min()) >= 0 and float(result.codes.max()) <= fmt.maxq
        packed = PackedWeight.from_codes(result.codes, result.scales, result.zeros, fmt)
        expected = result.scales.repeat_interleave(32, 1) * (
            result.codes - result.zeros.repeat_interleave(32, 1))
        torch.testing.assert_close(packed.dequantize(), expected)


# -- the layer-by-layer runner -------------------------------------------------------------------
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_layerwise_runner_reproduces_the_forward(family):
    model = tiny_model(family)
    program = Program(model)
    ids = torch.randint(0, 128, (5, 12), generator=torch.Generator().manual_seed(0))
    runner = LayerwiseRunner(program, ids, batch_size=2)
    for index, _ in runner.layers():
        runner.advance(index)
    got = torch.cat(runner.inputs())
    if family == "bert":
        expected = model(input_ids=ids).last_hidden_state
    else:
        seen = {}
        norm = model.get_submodule(program.arch.final_norm)
        handle = norm.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
        program.logits(ids)
        handle.remove()
        expected = seen["x"]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


# -- the quantize pass -------------------------------------------------------------------------
def _quantize(family: str, options: str, context=QUIET, **overrides):
    return modelfold.transform(tiny_model(family, **overrides), f"quantize{{{options}}}",
                               context=context)


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq", "awq-gptq"])
def test_quantize_methods_on_tiny_llama(method):
    result = _quantize("llama", f"bits=4,group_size=16,method={method},{CALIB}")
    ops = result.program.dialect_ops()
    assert ops["modelfold::quant_linear"] == 4 * 7
    record = result.program.log[-1]
    assert record.details["method"] == method and record.details["quantized_layers"] == 28
    assert record.fidelity["sqnr_db"] > 10
    assert record.bytes_after < record.bytes_before


@pytest.mark.parametrize("family", ["qwen2", "gemma2", "phi", "gpt2", "opt", "mixtral", "bert"])
def test_gptq_across_families(family):
    result = _quantize(family, f"bits=4,group_size=16,method=gptq,{CALIB}", context=VERIFIED)
    assert result.program.dialect_ops()["modelfold::quant_linear"] > 0
    skipped = result.program.log[-1].skipped
    if family == "mixtral":  # experts are 3-D tensors: reported, not silently left alone
        assert any("experts" in s["target"] for s in skipped)


@pytest.mark.parametrize("family", ["gemma", "opt"])
def test_awq_families(family):
    result = _quantize(family, f"bits=3,group_size=16,method=awq,{CALIB}")
    assert result.program.log[-1].fidelity["sqnr_db"] > 5


def test_awq_refuses_unsupported_family():
    with pytest.raises(PreconditionError, match="method=gptq"):
        _quantize("phi", f"method=awq,{CALIB}")


def test_awq_scale_folding_is_exact():
    """Folding a scale into the norm and the linears' columns leaves the function unchanged."""
    from modelfold.passes.awq import fold_into_prev

    for family in ("llama", "gemma"):  # gemma's norm multiplies by (1 + weight)
        model = tiny_model(family)
        program = Program(model)
        ids = torch.randint(0, 128, (2, 8))
        before = program.logits(ids)
        layer = model.model.layers[0]
        s = torch.rand(32) + 0.5
        fold_into_prev(program, layer.input_layernorm, "norm", s)
        for name in ("q_proj", "k_proj", "v_proj"):
            getattr(layer.self_attn, name).weight.data.mul_(s)
        torch.testing.assert_close(program.logits(ids), before, rtol=1e-4, atol=1e-4)


def test_targets_and_exclude():
    result = _quantize("llama", "targets=*.mlp.*,exclude=*.down_proj")
    quantized = [e["path"] for e in result.program.log[-1].details["layers"]]
    assert len(quantized) == 8 and all("gate_proj" in p or "up_proj" in p for p in quantized)
    regex = _quantize("llama", "targets=re:layers\\.[01]\\.self_attn\\.(q|k)_proj")
    assert regex.program.log[-1].details["quantized_layers"] == 4


@pytest.mark.parametrize("options, message", [
    ("targets=*.nothing_here", "matches no layer"),
    ("exclude=*.nope", "matches no layer"),
])
def test_pattern_matching_nothing_is_an_error(options, message):
    with pytest.raises(TargetError, match=message):
        _quantize("llama", options)


@pytest.mark.parametrize("options, message", [
    ("bits=5", "must be one of 2, 3, 4, 8"),
    ("group_size=100", "power of 2"),
    ("method=hqq", "must be one of rtn, gptq, awq"),
    ("damp=2", "damp"),
    ("colour=red", "has no option 'colour'"),
    ("targets=[]", "embeddings=true / lm_head=true"),
])
def test_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        build_pipeline(f"quantize{{{options}}}")


def test_tied_embedding_and_head_share_one_quantized_table():
    result = _quantize("llama", "bits=4,group_size=16,embeddings=true,lm_head=true",
                       tie_word_embeddings=True)
    model = result.module
    emb, head = model.model.embed_tokens, model.lm_head
    assert isinstance(emb, QuantEmbedding) and isinstance(head, QuantLinear)
    assert emb.qweight is head.qweight and emb.scales is head.scales
    assert result.program.dialect_ops()["modelfold::quant_embedding"] == 1
    details = result.program.log[-1].details
    assert details["embeddings"]["tied"] is True


def test_only_the_embedding_table_of_an_already_quantized_model():
    """targets=[] with embeddings/lm_head: quantize the table of a quantized checkpoint later."""
    first = _quantize("llama", f"bits=4,group_size=16,method=gptq,{CALIB}",
                      tie_word_embeddings=True)
    second = modelfold.transform(first.program,
                                 "quantize{targets=[],embeddings=true,lm_head=true,group_size=16}",
                                 context=QUIET)
    ops = second.program.dialect_ops()
    assert ops["modelfold::quant_embedding"] == 1
    assert ops["modelfold::quant_linear"] == 4 * 7 + 1
    assert second.program.log[-1].details["embeddings"]["tied"]


def test_quantizing_only_the_head_unties_and_says_so():
    result = _quantize("llama", "bits=8,group_size=-1,lm_head=true", tie_word_embeddings=True)
    model = result.module
    assert isinstance(model.lm_head, QuantLinear)
    assert isinstance(model.model.embed_tokens, torch.nn.Embedding)
    assert "untied" in result.program.log[-1].details
    assert model.config.tie_word_embeddings is False


def test_int8_per_channel_is_nearly_lossless():
    result = _quantize("llama", "bits=8,group_size=-1,symmetric=true")
    assert result.program.log[-1].fidelity["sqnr_db"] > 35


def test_quantized_model_recaptures_with_one_node_per_layer():
    result = _quantize("qwen2", "bits=2,group_size=32")
    graph_ops = [n.target for n in result.program.exported.graph.nodes
                 if n.op == "call_function"]
    assert sum(op == torch.ops.modelfold.quant_linear.default for op in graph_ops) == 28
    assert not any(op == torch.ops.aten.linear.default for op in graph_ops[:-1])


# -- smooth-quant ----------------------------------------------------------------------------------
def test_smooth_quant_w8a8_on_tiny_llama():
    result = modelfold.transform(tiny_model("llama"), f"smooth-quant{{alpha=0.5,{CALIB}}}",
                                 context=QUIET)
    assert result.program.dialect_ops()["modelfold::w8a8_linear"] == 28
    details = result.program.log[-1].details
    # q/k/v read the input norm, gate/up the post-attention norm: 2 groups per layer
    assert len(details["smoothed_groups"]) == 8
    assert result.program.log[-1].fidelity["sqnr_db"] > 25


def test_smooth_quant_groups_parallel_blocks():
    """Phi runs attention and MLP in parallel from one norm: one group of q, k, v and fc1."""
    result = modelfold.transform(tiny_model("phi"), f"smooth-quant{{{CALIB}}}", context=QUIET)
    groups = result.program.log[-1].details["smoothed_groups"]
    assert len(groups) == 4 and all(len(g["linears"]) == 4 for g in groups)


def test_smooth_quant_bad_alpha():
    with pytest.raises(ValueError, match="alpha"):
        build_pipeline("smooth-quant{alpha=1.5}")
