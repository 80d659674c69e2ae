"""modelfold's own ONNX Runtime kernels (``backends/onnxruntime/native``): ``ai.modelfold::MatMulInt4``
and ``MatMulInt8`` against ONNX Runtime's ``MatMulNBits`` (the real ONNX Runtime, both), the
in-memory rewrite of an artifact's graph (SwiGLU and the residual norm fused into the
projections), the attention kernel, the LM head's GEMV, the fallbacks, and real SmolLM2 int4 and
int8 artifacts run both ways."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import modelfold
from modelfold.backends.onnxruntime import native
from modelfold.backends.onnxruntime.runtime import OnnxCausalLM, create_session
from modelfold.errors import UsageError
from modelfold.evaluate import evaluate
from tests.conftest import copy_of
from tests.helpers import QUIET

# on a machine whose CPU or tools cannot build the kernels the module says why (this project's
# machines and CI can: x86-64 with AVX-512 VNNI and gcc)
UNAVAILABLE = native.unavailable()
pytestmark = pytest.mark.skipif(UNAVAILABLE is not None,
                                reason=f"modelfold's kernels cannot run here: {UNAVAILABLE}")
OPSETS = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]


def _weights(K: int, N: int, zero_points: bool, bias: bool, seed: int = 0, bits: int = 4) -> dict:
    """MatMulNBits' inputs: 4-bit weights in blocks of 128 (two per byte, zero points two per
    byte) or 8-bit in blocks of 32 (a byte each)."""
    rng = np.random.default_rng(seed)
    block = native.FORMATS[bits][1]
    blocks = -(-K // block)
    packed = rng.integers(0, 256, (N, blocks, block * bits // 8), dtype=np.uint8)
    if K % block:  # the exporter pads the last block with zeros
        tail = (K % block) * bits // 8
        packed[:, -1, tail:] = 0
    out = {"B": packed, "S": (rng.random(N * blocks, dtype=np.float32) * 0.02 + 1e-3)}
    if zero_points:
        count = blocks if bits == 8 else (blocks + 1) // 2
        out["Z"] = rng.integers(0, 256, N * count, dtype=np.uint8)
    if bias:
        out["bias"] = rng.standard_normal(N).astype(np.float32)
    return out


def _matmulnbits(x: str, y: str, K: int, N: int, weights: dict, level: int = 4,
                 block: int = 128, suffix: str = "", bits: int = 4) -> tuple:
    """The node and its initializers (named B, S, Z, bias + ``suffix``)."""
    names = [x, "B", "S", "Z" if "Z" in weights else ""]
    if "bias" in weights:
        names += ["", "bias"]
    names[1:] = [n + suffix if n else n for n in names[1:]]
    node = helper.make_node("MatMulNBits", names, [y], domain="com.microsoft", K=K, N=N, bits=bits,
                            block_size=block, accuracy_level=level)
    return node, [numpy_helper.from_array(v, k + suffix) for k, v in weights.items()]


def _model(nodes, inits, inputs, outputs, extra=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, [*inits, *extra])
    return helper.make_model(graph, opset_imports=OPSETS)


def _save(model, tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def _copy(proto):
    clone = type(proto)()
    clone.CopyFrom(proto)
    return clone


def _sessions(model, tmp_path):
    """The same file opened with ONNX Runtime's kernels and with modelfold's."""
    path = _save(model, tmp_path)
    return (create_session(path, threads=2, kernels="onnxruntime"),
            create_session(path, threads=2, kernels="modelfold"))


@pytest.mark.parametrize("K,N,zero_points,bias,rows,bits", [
    (576, 960, False, False, 1, 4),    # SmolLM2's q/k/v, symmetric, decode
    (576, 960, True, False, 1, 4),     # with zero points
    (1536, 576, True, True, 3, 4),     # bias, several rows
    (100, 33, True, False, 17, 4),     # K not a multiple of 128, N not of 16
    (136, 40, True, False, 2, 4),      # a last block of 8 weights (its words packed without padding)
    (576, 49152, False, False, 1, 4),  # an LM head
    (576, 3072, True, False, 128, 4),  # a prompt
    (576, 960, True, False, 1, 8),     # MatMulInt8: blocks of 32, a zero point per block
    (576, 960, False, False, 1, 8),    # symmetric (zero point 128)
    (1536, 576, True, True, 3, 8),     # bias, several rows
    (100, 33, True, False, 17, 8),     # K not a multiple of 32, N not of 16
    (576, 3072, True, False, 128, 8),  # a prompt
])
def test_matmul_int4_equals_matmulnbits(tmp_path, K, N, zero_points, bias, rows, bits):
    weights = _weights(K, N, zero_points, bias, bits=bits)
    node, inits = _matmulnbits("A", "Y", K, N, weights, block=native.FORMATS[bits][1], bits=bits)
    model = _model([node], inits, [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, rows, K])],
                   [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)])
    theirs, ours = _sessions(model, tmp_path)
    assert ours.kernels["kernels"] == "modelfold" and ours.kernels["replaced"] == 1
    a = np.random.default_rng(1).standard_normal((1, rows, K)).astype(np.float32)
    a[0, :, 3] *= 40  # an outlier channel, as LLM activations have
    expected, got = theirs.run(None, {"A": a})[0], ours.run(None, {"A": a})[0]
    assert got.shape == expected.shape == (1, rows, N)
    # the same arithmetic (int8 activations per block of 128, ONNX Runtime's rounding): float
    # rounding apart (ONNX Runtime's own one-row and many-row paths differ by as much)
    assert np.abs(got - expected).max() <= 5e-5 * np.abs(expected).max()


def _swiglu_model(K: int, hidden: int, tail_reader: bool = False, bits: int = 4):
    """x -> MatMulNBits(gate|up) -> Split -> QuickGelu(gate) * up -> MatMulNBits(down), as the
    fused ONNX lowering writes a SwiGLU MLP."""
    block = native.FORMATS[bits][1]
    up = _weights(hidden, 2 * K, True, False, seed=2, bits=bits)
    down = _weights(K, hidden, True, False, seed=3, bits=bits)
    n1, i1 = _matmulnbits("x", "gu", hidden, 2 * K, up, suffix="_up", block=block, bits=bits)
    n2, i2 = _matmulnbits("act", "y", K, hidden, down, block=block, bits=bits)
    sizes = numpy_helper.from_array(np.array([K, K], dtype=np.int64), "sizes")
    nodes = [n1, helper.make_node("Split", ["gu", "sizes"], ["g", "u"], axis=2),
             helper.make_node("QuickGelu", ["g"], ["sg"], domain="com.microsoft", alpha=1.0),
             helper.make_node("Mul", ["sg", "u"], ["act"]), n2]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if tail_reader:  # something else reads the activation: the MLP cannot be fused
        outputs.append(helper.make_tensor_value_info("act", TensorProto.FLOAT, None))
    return _model(nodes, [*i1, *i2], [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                     [1, None, hidden])],
                  outputs, [sizes])


@pytest.mark.parametrize("bits", [4, 8])
def test_swiglu_is_fused_into_the_down_projection(tmp_path, bits):
    model = _swiglu_model(K=200, hidden=96, bits=bits)
    facts = native.rewrite(_copy(model))
    assert facts == {"replaced": 2, "of": 2, "swiglu": 1, "skip_norms": 0, "kept": {},
                     "swiglu_ops": 0, "lm_head": 0, "matmul_f32": 0}
    theirs, ours = _sessions(model, tmp_path)
    assert ours.kernels["swiglu"] == 1
    x = np.random.default_rng(4).standard_normal((1, 5, 96)).astype(np.float32)
    expected, got = theirs.run(["y"], {"x": x})[0], ours.run(["y"], {"x": x})[0]
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()

    kept = _swiglu_model(K=200, hidden=96, tail_reader=True)
    assert native.rewrite(_copy(kept))["swiglu"] == 0  # a graph output reads the activation


def _float_mlp(K: int, hidden: int, axis: int = 2, down_constant: bool = True):
    """x -> MatMul(gate|up) -> Split -> QuickGelu(gate) * up -> MatMul(down), float32; with
    ``down_constant`` False the down projection's weight is a graph input (not ours)."""
    rng = np.random.default_rng(8)
    gate_up = numpy_helper.from_array(rng.standard_normal((hidden, 2 * K)).astype(np.float32), "Wgu")
    down = rng.standard_normal((K, hidden)).astype(np.float32)
    sizes = numpy_helper.from_array(np.array([K, K], dtype=np.int64), "sizes")
    nodes = [helper.make_node("MatMul", ["x", "Wgu"], ["gu"]),
             helper.make_node("Split", ["gu", "sizes"], ["g", "u"], axis=axis),
             helper.make_node("QuickGelu", ["g"], ["sg"], domain="com.microsoft", alpha=1.0),
             helper.make_node("Mul", ["sg", "u"], ["act"]),
             helper.make_node("MatMul", ["act", "Wd"], ["y"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, None, hidden])]
    if not down_constant:
        inputs.append(helper.make_tensor_value_info("Wd", TensorProto.FLOAT, [K, hidden]))
    model = _model(nodes, [gate_up] + ([numpy_helper.from_array(down, "Wd")] if down_constant else []),
                   inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [sizes])
    return model, down


def test_float_swiglu_mlp_runs_on_packed_matmuls(tmp_path):
    """A float32 SwiGLU MLP: both projections become ``MatMulF32`` (packed weights), the
    ``Split -> QuickGelu -> Mul`` fused into the down projection (``activation=1``)."""
    K, hidden = 200, 96
    model, _ = _float_mlp(K, hidden)
    rewritten = _copy(model)
    facts = native.rewrite(rewritten)
    # (the down projection's output is the graph's: counted as a head)
    assert (facts["matmul_f32"], facts["lm_head"], facts["swiglu"], facts["swiglu_ops"]) == (1, 1, 1, 0)
    assert [n.op_type for n in rewritten.graph.node] == ["MatMulF32", "MatMulF32"]
    theirs, ours = _sessions(model, tmp_path)
    rng = np.random.default_rng(9)
    for rows in (1, 5, 300):  # decode rows, a prompt (row blocks and panels across threads)
        x = rng.standard_normal((1, rows, hidden)).astype(np.float32)
        expected, got = theirs.run(None, {"x": x})[0], ours.run(None, {"x": x})[0]
        assert got.shape == expected.shape == (1, rows, hidden)
        assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


@pytest.mark.parametrize("axis", [-1, 2])
def test_swiglu_of_a_float_mlp_is_one_op(tmp_path, axis):
    """A float32 SwiGLU MLP whose down projection is not ours (its weight is not a constant):
    ``Split -> QuickGelu -> Mul`` becomes one ``ai.modelfold::SwiGLU`` where the graph's value
    infos say its input is float32 (and, for a Split on axis 2, of rank 3)."""
    K, hidden = 200, 96
    model, down = _float_mlp(K, hidden, axis, down_constant=False)
    assert native.rewrite(_copy(model))["swiglu_ops"] == 0  # the split's type and rank unknown
    model = onnx.shape_inference.infer_shapes(model)
    facts = native.rewrite(_copy(model))
    assert facts["swiglu_ops"] == 1 and facts["replaced"] == 0 and facts["matmul_f32"] == 1
    assert facts["swiglu"] == 0
    half = _copy(model)  # the op is float32: a float16 MLP keeps ONNX Runtime's nodes
    next(v for v in half.graph.value_info if v.name == "gu").type.tensor_type.elem_type = \
        TensorProto.FLOAT16
    assert native.rewrite(half)["swiglu_ops"] == 0
    theirs, ours = _sessions(model, tmp_path)
    assert ours.kernels["kernels"] == "modelfold" and ours.kernels["swiglu_ops"] == 1
    rng = np.random.default_rng(8)
    for rows in (1, 300):  # one decode row (inline), a prompt (split across threads)
        x = rng.standard_normal((1, rows, hidden)).astype(np.float32)
        expected = theirs.run(None, {"x": x, "Wd": down})[0]
        got = ours.run(None, {"x": x, "Wd": down})[0]
        assert got.shape == expected.shape == (1, rows, hidden)
        assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


@pytest.mark.parametrize("K,N", [(576, 960), (1536, 576), (70, 45), (33, 100)])
def test_packed_float_matmul_equals_onnx_runtime(tmp_path, K, N):
    """``MatMulF32`` over a packed [K, N] weight, against ONNX Runtime's ``MatMul``: every row
    count of the 12-row tile (1-13), a prompt and several blocks of rows, N not a multiple of the
    32-column panel, K of anything; each output one running sum in k order, as MLAS's."""
    rng = np.random.default_rng(K + N)
    w = numpy_helper.from_array(rng.standard_normal((K, N)).astype(np.float32), "W")
    model = _model([helper.make_node("MatMul", ["x", "W"], ["y"])], [w],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None, K])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    theirs, ours = _sessions(model, tmp_path)
    assert ours.kernels["kernels"] == "modelfold" and ours.kernels["lm_head"] == 1
    for batch, rows in [(1, 1), (1, 2), (2, 3), (1, 7), (1, 11), (1, 12), (1, 13), (1, 128),
                        (3, 400)]:
        x = rng.standard_normal((batch, rows, K)).astype(np.float32)
        expected, got = theirs.run(None, {"x": x})[0], ours.run(None, {"x": x})[0]
        assert got.shape == expected.shape == (batch, rows, N)
        assert np.abs(got - expected).max() <= 2e-6 * np.abs(expected).max(), (batch, rows)


@pytest.mark.parametrize("bits", [4, 8, 32])
def test_residual_add_and_rms_norm_are_fused_into_the_projection(tmp_path, bits):
    """``SkipSimplifiedLayerNormalization`` -> ``MatMulNBits`` (or a float32 ``MatMul``, bits 32):
    one ``MatMulInt4`` / ``MatMulInt8`` / ``MatMulF32`` that writes the residual sum (read by the
    next layer) and projects the normalized sum."""
    K, N = 200, 96
    gamma = numpy_helper.from_array(
        np.random.default_rng(6).standard_normal(K).astype(np.float32), "gamma")
    norm = helper.make_node("SkipSimplifiedLayerNormalization", ["x", "skip", "gamma"],
                            ["normed", "", "", "sum"], domain="com.microsoft", epsilon=1e-6)
    if bits == 32:
        proj = helper.make_node("MatMul", ["normed", "W"], ["y"])
        inits = [numpy_helper.from_array(
            np.random.default_rng(5).standard_normal((K, N)).astype(np.float32), "W")]
    else:
        proj, inits = _matmulnbits("normed", "y", K, N, _weights(K, N, True, False, seed=5, bits=bits),
                                   block=native.FORMATS[bits][1], bits=bits)
    after = helper.make_node("Add", ["sum", "sum"], ["twice"])  # another reader of the sum
    shape = [1, None, K]
    model = _model([norm, proj, after], [*inits, gamma],
                   [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("x", "skip")],
                   [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "twice")])
    facts = native.rewrite(_copy(model))
    ours_count = facts["replaced"] if bits < 32 else facts["matmul_f32"] + facts["lm_head"]
    assert ours_count == 1 and facts["skip_norms"] == 1
    theirs, ours = _sessions(model, tmp_path)
    rng = np.random.default_rng(7)
    for rows in (1, 6, 300):
        feeds = {n: rng.standard_normal((1, rows, K)).astype(np.float32) for n in ("x", "skip")}
        (y0, t0), (y1, t1) = theirs.run(None, feeds), ours.run(None, feeds)
        assert np.abs(t1 - t0).max() <= 1e-6 * np.abs(t0).max()  # the sum, exactly
        assert np.abs(y1 - y0).max() <= (1e-4 if bits < 32 else 1e-5) * np.abs(y0).max()


def _lm_head_model(K: int, N: int, trans_b: int, alpha: float = 1.0, extra_reader=False):
    """x -> MatMul(x, B [K, N]) or FusedMatMul(x, B [N, K], transB) -> logits (a graph output),
    the tied table also read by an embedding Gather (as an artifact's is)."""
    rng = np.random.default_rng(5)
    table = rng.standard_normal((N, K) if trans_b else (K, N)).astype(np.float32)
    if trans_b:
        head = helper.make_node("FusedMatMul", ["x", "table"], ["logits"], domain="com.microsoft",
                                transB=1, alpha=alpha)
    else:
        head = helper.make_node("MatMul", ["x", "table"], ["logits"])
    nodes = [helper.make_node("Gather", ["table", "ids"], ["rows"]), head]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None),
               helper.make_tensor_value_info("rows", TensorProto.FLOAT, None)]
    if extra_reader:  # the product is not a graph output: not an LM head
        nodes.append(helper.make_node("Relu", ["logits"], ["relu"]))
        outputs[0] = helper.make_tensor_value_info("relu", TensorProto.FLOAT, None)
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None, K]),
              helper.make_tensor_value_info("ids", TensorProto.INT64, [None])]
    return _model(nodes, [numpy_helper.from_array(table, "table")], inputs, outputs)


@pytest.mark.parametrize("K,N,trans_b", [
    (576, 49152, 1),  # SmolLM2's tied LM head
    (72, 37, 1),      # K not a multiple of 16, N not of 4
    (576, 3000, 0),   # an untied head [K, N]: packed, as every float32 MatMul
    (70, 45, 0),      # K not a multiple of 4, N not of 16
])
def test_lm_head_gemv_equals_onnx_runtime(tmp_path, K, N, trans_b):
    """The LM head's GEMV (up to 8 rows) and, for more rows, ONNX Runtime's own kernel invoked
    from ours: both equal ONNX Runtime's MatMul / FusedMatMul to float rounding."""
    theirs, ours = _sessions(_lm_head_model(K, N, trans_b), tmp_path)
    assert ours.kernels["kernels"] == "modelfold" and ours.kernels["lm_head"] == 1
    rng = np.random.default_rng(6)
    for batch, rows in [(1, 1), (2, 1), (1, 8), (3, 3), (2, 40)]:  # 9 and 80 rows: the fallback
        feeds = {"x": rng.standard_normal((batch, rows, K)).astype(np.float32),
                 "ids": np.array([0, (N if trans_b else K) - 1], dtype=np.int64)}
        (expected, rows0), (got, rows1) = theirs.run(None, feeds), ours.run(None, feeds)
        assert got.shape == expected.shape == (batch, rows, N)
        assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max(), (batch, rows)
        assert np.array_equal(rows0, rows1)  # the Gather reads the same table


def test_lm_head_rewrite_takes_only_a_plain_float_head(tmp_path):
    assert native.rewrite(_lm_head_model(64, 40, 1))["lm_head"] == 1
    assert native.rewrite(_lm_head_model(64, 40, 1, alpha=0.5))["lm_head"] == 0  # scaled
    facts = native.rewrite(_lm_head_model(64, 40, 0, extra_reader=True))
    assert facts["lm_head"] == 0 and facts["matmul_f32"] == 1  # packed, not a head
    half = _lm_head_model(64, 40, 0)
    half.graph.initializer[0].CopyFrom(numpy_helper.from_array(
        numpy_helper.to_array(half.graph.initializer[0]).astype(np.float16), "table"))
    assert native.rewrite(half)["lm_head"] == 0  # float16: ONNX Runtime's


def test_nodes_the_kernel_does_not_take_keep_onnx_runtime(tmp_path):
    weights = _weights(256, 64, False, False)
    nodes, inits = [], []
    for y, level, block, bits in [("y0", 0, 128, 4), ("y1", 4, 32, 4), ("y2", 4, 128, 8)]:
        w = dict(weights)
        if block == 32:
            w = {"B": weights["B"].reshape(64, 8, 16), "S": np.ones(64 * 8, np.float32)}
        if bits == 8:
            w = {"B": np.zeros((64, 2, 128), np.uint8), "S": np.ones(64 * 2, np.float32)}
        node, i = _matmulnbits("A", y, 256, 64, w, level=level, block=block, suffix=y, bits=bits)
        nodes.append(node)
        inits += i
    model = _model(nodes, inits, [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, 256])],
                   [helper.make_tensor_value_info(y, TensorProto.FLOAT, None)
                    for y in ("y0", "y1", "y2")])
    facts = native.rewrite(_copy(model))
    assert facts["replaced"] == 0 and facts["kept"] == {
        "accuracy_level 0 (the kernel computes level 4)": 1,
        "4-bit blocks of 32 (the kernel takes 128)": 1,
        "8-bit blocks of 128 (the kernel takes 32)": 1}
    path = _save(model, tmp_path)
    session = create_session(path, kernels="auto")
    assert session.kernels["kernels"] == "onnxruntime"
    assert "accuracy_level 0" in session.kernels["reason"]
    with pytest.raises(UsageError, match="4-bit MatMulNBits in blocks of 128 or 8-bit in blocks "
                                         "of 32 at accuracy_level 4"):
        create_session(path, kernels="modelfold")
    with pytest.raises(UsageError, match="kernels must be one of auto, modelfold, onnxruntime"):
        create_session(path, kernels="fast")


@pytest.mark.parametrize("cause", ["compiler", "cpu"])
def test_auto_falls_back_where_the_kernels_cannot_run(tmp_path, monkeypatch, cause):
    """No C compiler, or a CPU without AVX-512 VNNI: "auto" keeps ONNX Runtime's kernels and says
    why; "modelfold" is a clear error."""
    weights = _weights(256, 64, False, False)
    node, inits = _matmulnbits("A", "Y", 256, 64, weights)
    model = _model([node], inits, [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, 256])],
                   [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)])
    path = _save(model, tmp_path)
    monkeypatch.setattr(native, "_built", {})
    if cause == "compiler":
        monkeypatch.setattr(native, "_compiler", lambda: None)
        why = "no C compiler found"
    else:
        monkeypatch.setattr(native, "_cpu_flags", lambda: {"avx2", "fma"})
        why = "the CPU lacks avx512f, avx512bw, avx512vl, avx512_vnni"
    session = create_session(path, kernels="auto")
    assert session.kernels["kernels"] == "onnxruntime" and why in session.kernels["reason"]
    a = np.ones((1, 256), np.float32)
    assert session.run(None, {"A": a})[0].shape == (1, 64)
    with pytest.raises(UsageError, match=why):
        create_session(path, kernels="modelfold")


def test_a_failing_compiler_is_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(native, "_built", {})
    monkeypatch.setattr(native, "CFLAGS", (*native.CFLAGS, "-DQ4_BROKEN=1", "-include",
                                           "/nonexistent/header.h"))
    monkeypatch.setenv("MODELFOLD_CACHE", str(tmp_path / "cache"))
    with pytest.raises(native.KernelsUnavailable, match="compiling them failed"):
        native.library()
    assert not list((tmp_path / "cache").rglob(native.LIBRARY))  # nothing half-written


# -- a real model ---------------------------------------------------------------------------
def _quantized_artifact(base, tmp_path_factory, bits: int, group: int):
    """SmolLM2 (the 4-layer cut) quantized to ``bits`` in groups of ``group`` everywhere (the tied
    table too), exported at accuracy level 4: the artifact's folder and the tokenizer."""
    result = modelfold.transform(copy_of(base), f"quantize{{bits={bits},group_size={group},"
                                 "embeddings=true,lm_head=true}", context=QUIET)
    out = tmp_path_factory.mktemp(f"int{bits}") / "artifact"
    modelfold.export(result, out, accuracy_level=4, parity=False)
    return out, result.program.tokenizer


@pytest.fixture(scope="module")
def smollm2_int4(smollm2_short_base, tmp_path_factory):
    """SmolLM2 cut to 4 layers, int4 g128 everywhere (tied table too), accuracy level 4."""
    return _quantized_artifact(smollm2_short_base, tmp_path_factory, 4, 128)


@pytest.fixture(scope="module")
def smollm2_int8(smollm2_short_base, tmp_path_factory):
    """SmolLM2 cut to 4 layers, int8 g32 everywhere (tied table too), accuracy level 4."""
    return _quantized_artifact(smollm2_short_base, tmp_path_factory, 8, 32)


@pytest.mark.parametrize("artifact", ["smollm2_int4", "smollm2_int8"])
def test_real_quantized_artifact_runs_on_modelfold_kernels(artifact, eval_text, request):
    path, tokenizer = request.getfixturevalue(artifact)
    ours = OnnxCausalLM(path, threads=2)  # "auto"
    theirs = OnnxCausalLM(path, threads=2, kernels="onnxruntime")
    # 4 layers x (q/k/v, o, gate/up, down) + the LM head; each layer's MLP fused
    assert ours.kernels["kernels"] == "modelfold"
    assert ours.kernels["replaced"] == ours.kernels["of"] == 17 and ours.kernels["swiglu"] == 4
    assert ours.kernels["skip_norms"] == 7  # every residual norm but the final one (a Slice reads it)
    assert theirs.kernels["kernels"] == "onnxruntime"

    assert ours.kernels["attention"] == ours.kernels["attention_of"] == 4
    a = evaluate(ours, tokenizer, eval_text, chars=6000, progress=False)["perplexity"]
    b = evaluate(theirs, tokenizer, eval_text, chars=6000, progress=False)["perplexity"]
    # the same arithmetic up to float rounding, which int8 activations amplify: on full SmolLM2,
    # scaling one norm weight by 1 + 1e-6 moves ONNX Runtime's own perplexity by 0.4 %; the
    # 4-layer cut's perplexity is about 3e7, so compare mean cross-entropies (nats)
    assert abs(np.log(a) - np.log(b)) < 0.01, (a, b)

    ids = np.array([tokenizer(eval_text[:2000]).input_ids[:256]])
    top_ours, top_theirs = ours.logits(ids).argmax(-1), theirs.logits(ids).argmax(-1)
    assert (top_ours == top_theirs).mean() >= 0.97

    prompt = tokenizer("The capital of France is").input_ids
    out = ours.generate(prompt, 12)  # the shared-buffer decode loop over MatMulInt4
    assert len(out["new_tokens"]) == 12
    assert out["new_tokens"][0] == theirs.generate(prompt, 1)["new_tokens"][0]


def test_repacked_weights_leave_the_resident_set(smollm2_int8):
    """``MatMulInt8`` repacks its weights when the session opens; the memory-mapped originals
    ONNX Runtime keeps are dropped from the resident set (clean file pages: nothing is lost), so
    the session holds no more than on ONNX Runtime's kernels (which release their originals
    after packing). Measured in child processes (``tools/session_memory.py``)."""

    from tools.session_memory import CHILD

    path, _ = smollm2_int8
    grown = {}
    for kernels in ("onnxruntime", "modelfold"):
        done = subprocess.run([sys.executable, "-c", CHILD, str(path), kernels, "2"],
                              capture_output=True, text=True, check=True)
        r = json.loads(done.stdout.strip().splitlines()[-1])
        grown[kernels] = r["generated"]["VmRSS"] - r["before"]["VmRSS"]
    weights = sum(f.stat().st_size for f in path.glob("*.onnx.data"))
    # before the release ours held the originals too: about the weights' bytes more
    assert grown["modelfold"] <= grown["onnxruntime"] + 0.1 * weights, (grown, weights)


def test_cli_eval_and_generate_take_kernels(smollm2_int4, capsys, tmp_path):
    from tests.test_cli import run_json

    path, _ = smollm2_int4
    text = tmp_path / "text.txt"
    text.write_text("The Roman Empire was the post-Republican state of ancient Rome. " * 30)
    runs = {k: run_json(capsys, ["eval", str(path), "--text", str(text), "--window", "64",
                                 "--kernels", k, "--json"]) for k in ("modelfold", "onnxruntime")}
    half = run_json(capsys, ["eval", str(path), "--text", str(text), "--window", "64",
                             "--kv-cache", "float16", "--json"])
    assert runs["modelfold"]["kv_cache"] == "float32" and half["kv_cache"] == "float16"
    assert abs(np.log(half["perplexity"] / runs["modelfold"]["perplexity"])) < 0.01
    assert "kv_cache" not in runs["onnxruntime"]
    assert runs["modelfold"]["kernels"] == "modelfold"
    assert runs["modelfold"]["runtime"] == "onnxruntime + modelfold's kernels"
    assert runs["onnxruntime"]["kernels"] == "onnxruntime"
    assert abs(np.log(runs["modelfold"]["perplexity"] / runs["onnxruntime"]["perplexity"])) < 0.01
    out = run_json(capsys, ["generate", str(path), "The capital of France is",
                            "--max-new-tokens", "4", "--kernels", "modelfold", "--json"])
    assert len(out["new_tokens"]) == 4
    out = run_json(capsys, ["generate", str(path), "The capital of France is",
                            "--max-new-tokens", "4", "--kv-cache", "float16", "--json"])
    assert len(out["new_tokens"]) == 4


# -- the attention kernel: ai.modelfold::CachedAttention against GroupQueryAttention -----------

def _gqa_model(H: int, KVH: int, D: int, packed: bool, window: int = -1, softcap: float = 0.0,
               rotary: int | None = None, max_pos: int = 2304):
    """One GroupQueryAttention node: query (packed q/k/v or separate), past / present as graph
    inputs / outputs, rotary tables of width ``rotary`` (None: D; 0: no rotary)."""
    rng = np.random.default_rng(1)
    f = TensorProto.FLOAT
    width = (H + 2 * KVH) * D if packed else H * D
    inputs = [helper.make_tensor_value_info("query", f, ["B", "S", width])]
    if not packed:
        inputs += [helper.make_tensor_value_info(n, f, ["B", "S", KVH * D]) for n in ("key", "value")]
    inputs += [helper.make_tensor_value_info(n, f, ["B", KVH, "P", D]) for n in ("past_key", "past_value")]
    inputs += [helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["B"]),
               helper.make_tensor_value_info("total", TensorProto.INT32, [])]
    outputs = [helper.make_tensor_value_info("out", f, ["B", "S", H * D])]
    outputs += [helper.make_tensor_value_info(n, f, ["B", KVH, "T", D])
                for n in ("present_key", "present_value")]
    rotary = D if rotary is None else rotary
    inits, tables = [], ["", ""]
    if rotary:
        angles = np.arange(max_pos)[:, None] / 10000 ** (np.arange(rotary // 2) / (rotary // 2))
        inits = [numpy_helper.from_array(np.cos(angles).astype(np.float32), "cos"),
                 numpy_helper.from_array(np.sin(angles).astype(np.float32), "sin")]
        tables = ["cos", "sin"]
    node = helper.make_node(
        "GroupQueryAttention",
        ["query", "" if packed else "key", "" if packed else "value", "past_key", "past_value",
         "seqlens_k", "total", *tables], ["out", "present_key", "present_value"],
        domain="com.microsoft", num_heads=H, kv_num_heads=KVH, scale=float(rng.uniform(0.1, 0.2)),
        do_rotary=int(bool(rotary)), local_window_size=window, softcap=softcap)
    return _model([node], inits, inputs, outputs)


def _attention_feeds(rng, B, S, H, KVH, D, packed, past, lengths, first):
    width = (H + 2 * KVH) * D if packed else H * D
    feeds = {"query": rng.standard_normal((B, S, width)).astype(np.float32),
             "past_key": past[0], "past_value": past[1],
             "seqlens_k": np.array(lengths, np.int32) - 1,
             "total": np.array(S if first else max(lengths), np.int32)}
    if not packed:
        feeds["key"] = rng.standard_normal((B, S, KVH * D)).astype(np.float32)
        feeds["value"] = rng.standard_normal((B, S, KVH * D)).astype(np.float32)
    return feeds


def _run(session, feeds, tiled):
    """Run with the past in the session's layout; presents come back by position."""
    feeds = dict(feeds)
    if tiled:
        types = {i.name: i.type for i in session.get_inputs()}
        dtype = np.float16 if types["past_key"] == "tensor(float16)" else np.float32
        feeds["past_key"] = native.to_kernel_layout(feeds["past_key"]).astype(dtype)
        feeds["past_value"] = feeds["past_value"].astype(dtype)
    out, key, value = session.run(None, feeds)
    if tiled:
        key = native.from_kernel_layout(key)
    return out, key.astype(np.float32), value.astype(np.float32)


@pytest.mark.parametrize("H,KVH,D,packed,window,softcap,rotary", [
    (9, 3, 64, True, -1, 0.0, None),    # SmolLM2's shape
    (10, 2, 32, False, 24, 0.0, 16),    # 5 query heads per KV head (two row sets), a window,
                                        # partial rotary, separate q / k / v
    (4, 4, 128, True, -1, 30.0, 0),     # no grouping, soft-capping, no rotary
])
@pytest.mark.parametrize("kv_cache", ["float32", "float16"])
def test_cached_attention_equals_group_query_attention(tmp_path, H, KVH, D, packed, window,
                                                       softcap, rotary, kv_cache):
    """A right-padded batch of two: a prompt of 37 (the cache's last positions outside the 16-key
    tiles), three decode steps, then a 600-token prompt and a decode step over it (a decode
    splits the cache into chunks of 256 keys and combines them), then a 2,100-token prompt (a
    prompt's keys in chunks of 2,048); presents compared by position."""
    path = _save(_gqa_model(H, KVH, D, packed, window, softcap, rotary), tmp_path)
    theirs = create_session(path, threads=2, kernels="onnxruntime")
    ours = create_session(path, threads=2, kernels="modelfold", kv_cache=kv_cache)
    assert ours.kernels["attention"] == 1 and ours.tiled_keys == {"past_key", "present_key"}
    tol = 2e-5 if kv_cache == "float32" else 5e-3
    rng = np.random.default_rng(2)
    for prompt, lengths in ((37, [37, 21]), (600, [600, 598]), (2100, [2100, 2090])):
        empty = np.zeros((2, KVH, 0, D), np.float32)
        feeds = _attention_feeds(rng, 2, prompt, H, KVH, D, packed, (empty, empty), lengths, True)
        expected = _run(theirs, feeds, False)
        got = _run(ours, feeds, True)
        valid = [np.s_[b, :n] for b, n in enumerate(lengths)]  # padding rows are not compared
        for v in valid:
            np.testing.assert_allclose(got[0][v], expected[0][v], atol=tol, rtol=tol)
        for g, e in zip(got[1:], expected[1:]):
            np.testing.assert_allclose(g, e, atol=tol, rtol=tol)
        past = expected[1:]
        for _ in range(3 if prompt == 37 else 1):
            lengths = [n + 1 for n in lengths]
            feeds = _attention_feeds(rng, 2, 1, H, KVH, D, packed, past, lengths, False)
            expected = _run(theirs, feeds, False)
            got = _run(ours, feeds, True)
            np.testing.assert_allclose(got[0], expected[0], atol=tol, rtol=tol)
            for b, n in enumerate(lengths):  # rows past a row's length are not defined
                for g, e in zip(got[1:], expected[1:]):
                    np.testing.assert_allclose(g[b, :, :n], e[b, :, :n], atol=tol, rtol=tol)
            past = expected[1:]


def test_kernel_layout_round_trip():
    keys = np.random.default_rng(0).standard_normal((2, 3, 37, 16)).astype(np.float32)
    tiled = native.to_kernel_layout(keys)
    assert tiled.shape == keys.shape and not np.array_equal(tiled, keys)
    # position 1 of tile 0, dimension 0 sits at flat element 1 of its head's block
    assert tiled.reshape(2, 3, -1)[0, 0, 1] == keys[0, 0, 1, 0]
    np.testing.assert_array_equal(tiled.reshape(2, 3, -1)[:, :, 32 * 16:], keys[:, :, 32:].reshape(2, 3, -1))
    np.testing.assert_array_equal(native.from_kernel_layout(tiled), keys)


def test_attention_the_kernel_does_not_take_keeps_onnx_runtime(tmp_path):
    model = _gqa_model(9, 3, 64, True)
    gqa = model.graph.node[0]
    gqa.input.extend(["", "", "", "k_scale", "v_scale"])  # an int8 cache's scales
    facts = native.rewrite_attention(model, "float32")
    assert facts["attention"] == 0 and facts["attention_of"] == 1
    assert facts["attention_kept"] == {"a k_scale (a quantized cache) input": 1}
    with pytest.raises(UsageError, match="kv_cache='float16'.*no GroupQueryAttention"):
        native.prepare(_save(model, tmp_path), "auto", "float16")
    with pytest.raises(UsageError, match="does not run with kernels='onnxruntime'"):
        create_session(_save(_gqa_model(9, 3, 64, True), tmp_path), kernels="onnxruntime",
                       kv_cache="float16")
    with pytest.raises(UsageError, match="kv_cache must be one of"):
        create_session(_save(_gqa_model(9, 3, 64, True), tmp_path), kv_cache="int8")


_SHARED_CHILD = """
import sys, numpy as np
from modelfold.backends.onnxruntime.runtime import create_session
def rss():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1]) * 1024
before = rss()
session = create_session(sys.argv[1], threads=2, kernels='modelfold')
session.run(None, {'x': np.ones((1, 3, int(sys.argv[2])), np.float32)})
print(rss() - before)
"""


def test_a_weight_several_nodes_read_is_packed_once(tmp_path):
    """Tied layers: several ``MatMul`` nodes of one float32 weight share one packed copy (each
    packing its own would hold the weight once per node), and compute what ONNX Runtime does."""
    K = 1024  # a 4 MB weight
    rng = np.random.default_rng(11)
    w = numpy_helper.from_array((rng.standard_normal((K, K)) / np.sqrt(K)).astype(np.float32), "W")
    grown = {}
    for nodes in (1, 5):
        names = ["x"] + [f"h{i}" for i in range(nodes)]
        model = _model([helper.make_node("MatMul", [names[i], "W"], [names[i + 1]])
                        for i in range(nodes)], [_copy(w)],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, None, K])],
                       [helper.make_tensor_value_info(names[-1], TensorProto.FLOAT, None)])
        folder = tmp_path / str(nodes)
        folder.mkdir()
        onnx.save(model, str(folder / "model.onnx"), save_as_external_data=True,
                  location="model.onnx.data", size_threshold=0)
        if nodes == 5:
            theirs = create_session(folder / "model.onnx", threads=2, kernels="onnxruntime")
            ours = create_session(folder / "model.onnx", threads=2, kernels="modelfold")
            assert ours.kernels["matmul_f32"] + ours.kernels["lm_head"] == 5
            for rows in (1, 40):
                x = rng.standard_normal((1, rows, K)).astype(np.float32)
                expected, got = theirs.run(None, {"x": x})[0], ours.run(None, {"x": x})[0]
                assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()
        done = subprocess.run([sys.executable, "-c", _SHARED_CHILD, str(folder / "model.onnx"),
                               str(K)], capture_output=True, text=True, check=True)
        grown[nodes] = int(done.stdout.strip().splitlines()[-1])
    # four more readers of the weight: far less than four more copies (16 MB)
    assert grown[5] - grown[1] < 2 * K * K * 4, grown
