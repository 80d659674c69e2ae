"""N:M sparse layers in ONNX Runtime: the ``nm_linear`` / ``nm_quant_linear`` lowerings and the two
export modes.

Op level: ``NMLinear`` / ``NMQuantLinear`` layers of odd shapes and patterns (1:2 .. 7:200, every
index width, K not a multiple of the block, 2-, 3-, 4- and 8-bit codes, symmetric or not, a
re-blocked 2-bit per-channel weight) through ``torch.onnx.export``, against their torch reference.
Model level, a 1-layer tiny llama through ``modelfold.export`` in both modes: float 2:4 and 4:8, and
2:4 + int4 asymmetric and symmetric (hidden 256: a wider layer, so that the int4 codes saved
outweigh the decompression nodes in the graph file). Each artifact must match the eager model,
and the compressed one must be smaller than the dense one, keep its packed initializers in the
file, and be decompressed (constant-folded) by ONNX Runtime when a session loads it.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import modelfold
from modelfold.backends.onnxruntime import translations
from modelfold.backends.onnxruntime.export import export_onnx, lowered_graph
from modelfold.backends.onnxruntime.options import SPARSE_MODES, ExportOptions
from modelfold.backends.onnxruntime.runtime import OPTIMIZATION_LEVELS, OnnxCausalLM
from modelfold.backends.onnxruntime.sparse_lowering import (
    SparseLowering,
    nm_linear_onnx,
    nm_quant_linear_onnx,
    register_sparse_translations,
    sparse_layers,
)
from modelfold.cli import build_parser
from modelfold.ir.quant import PackedWeight, QuantFormat, quantize_rtn
from modelfold.ir.sparse import NMLinear, NMQuantLinear, compress, nm_mask
from tests.helpers import QUIET
from tests.tiny_models import tiny_model

TOL = 1e-5  # float32 logits of a tiny model; the exports measure ~1e-7 (int4, hidden 256: ~1e-6)
WIDE = {"hidden_size": 256, "intermediate_size": 512}
MODEL_CASES = {
    "2:4": ("nm-sparsify{method=magnitude}", {}),
    "4:8": ("nm-sparsify{method=magnitude,n=4,m=8}", {}),
    "2:4+int4": ("nm-sparsify{method=magnitude},quantize{bits=4,group_size=16}", WIDE),
    "2:4+int4-sym": (
        "nm-sparsify{method=magnitude},quantize{bits=4,group_size=16,symmetric=true}",
        WIDE,
    ),
}
DECOMPRESSION_OPS = {"ScatterElements", "BitwiseAnd", "Mod"}


# -- helpers ------------------------------------------------------------------------------------
def sparse_llama(pipeline: str, **overrides) -> modelfold.TransformResult:
    """A 1-layer tiny llama (``overrides``: config attributes) through ``pipeline``."""
    model = tiny_model("llama", num_hidden_layers=1, **overrides)
    return modelfold.transform(model, pipeline, context=QUIET)


def op_counts(model_path: Path) -> Counter:
    graph = onnx.load(str(model_path), load_external_data=False).graph
    return Counter(node.op_type for node in graph.node)


def initializer_names(model_path: Path) -> set[str]:
    return {init.name for init in onnx.load(str(model_path), load_external_data=False).graph.initializer}


def onnx_bytes(out: Path) -> int:
    return sum(p.stat().st_size for p in out.iterdir() if p.name.startswith("model.onnx"))


def ops_after_load(model_path: Path, tmp_path: Path) -> Counter:
    """The ops of the graph a session runs after its load-time optimizations (as ``create_session``)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = OPTIMIZATION_LEVELS["all"]
    options.optimized_model_filepath = str(tmp_path / "loaded.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    return op_counts(tmp_path / "loaded.onnx")


@torch.no_grad()
def eager_logits(model: nn.Module, ids: np.ndarray) -> np.ndarray:
    return model(input_ids=torch.as_tensor(ids), use_cache=False).logits.numpy()  # [B, S, V]


def nm_linear(out_features: int, k: int, n: int, m: int, bias: bool) -> NMLinear:
    weight = torch.randn(out_features, k)
    return NMLinear.from_dense(
        weight, nm_mask(weight.abs(), n, m), n, m, torch.randn(out_features) if bias else None
    )


def nm_quant_linear(out_features: int, k: int, n: int, m: int, fmt: QuantFormat, bias: bool) -> NMQuantLinear:
    """Pruned N:M, then round-to-nearest codes (a pruned 0 rounds to the zero point)."""
    weight = torch.randn(out_features, k)
    mask = nm_mask(weight.abs(), n, m)
    weight = weight * mask
    codes, scales, zeros = quantize_rtn(weight, fmt)
    packed = PackedWeight.from_codes(codes, scales, zeros, fmt)
    _, indices = compress(weight, mask, n, m)
    return NMQuantLinear.from_codes(
        codes,
        packed.scales,
        packed.zero_points,
        packed.fmt,
        indices,
        n,
        m,
        torch.randn(out_features) if bias else None,
    )


# -- op level -----------------------------------------------------------------------------------
# (N, K, n, m, bias): index widths 1 (m = 2), 2, 4 and 8 bits (m = 20, 200), a last index byte
# with padding (C = 5 at 2 bits, C = 21 at 8 bits is whole bytes but 6 at 4 bits is not).
FLOAT_CASES = [
    (7, 12, 2, 4, True),
    (5, 20, 1, 4, False),
    (3, 16, 3, 8, True),
    (6, 34, 1, 2, False),
    (4, 40, 5, 20, True),
    (3, 600, 7, 200, False),
]
# (N, K, n, m, bits, block_size, symmetric, bias): 4-bit asym / sym, 2-bit, 8-bit, 3-bit (in 4),
# K not a multiple of the block (40 in blocks of 16, 32), a non-power-of-2 group (3:5), and a
# 2-bit per-channel block over 256 (re-blocked by the quant_linear lowering).
QUANT_CASES = [
    (7, 40, 2, 4, 4, 16, False, True),
    (5, 40, 2, 4, 4, 16, True, False),
    (6, 48, 1, 8, 2, 16, False, False),
    (6, 40, 4, 8, 8, 32, False, True),
    (3, 24, 2, 4, 3, 16, False, False),
    (5, 40, 3, 5, 4, 32, True, False),
    (5, 300, 2, 4, 2, 512, False, False),
]
MAX_K = 600


class AllSparseLayers(nn.Module):
    """Every case side by side: forward(x [B, S, MAX_K]) -> one output per layer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.floats = nn.ModuleList(nm_linear(*case) for case in FLOAT_CASES)
        self.quants = nn.ModuleList(
            nm_quant_linear(n_out, k, n, m, QuantFormat(bits, block, sym), bias)
            for n_out, k, n, m, bits, block, sym, bias in QUANT_CASES
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(layer(x[..., : layer.in_features]) for layer in (*self.floats, *self.quants))


@pytest.fixture(scope="module")
def op_export(tmp_path_factory):
    module = AllSparseLayers().eval()
    path = tmp_path_factory.mktemp("ops") / "sparse.onnx"
    dims = {0: "batch", 1: "sequence"}
    with torch.no_grad():
        program = torch.onnx.export(
            module,
            (torch.randn(2, 3, MAX_K),),
            dynamo=True,
            custom_translation_table=translations.translation_table(),
            dynamic_shapes=(dims,),
            opset_version=23,
        )
    program.save(str(path))
    return module, path


def test_sparse_ops_match_torch_on_odd_shapes(op_export):
    module, path = op_export
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 4, MAX_K)  # other batch and sequence than exported
    actual = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = module(x)
    assert len(actual) == len(FLOAT_CASES) + len(QUANT_CASES)
    for index, (a, e) in enumerate(zip(actual, expected)):
        np.testing.assert_allclose(a, e.numpy(), atol=1e-4, err_msg=f"output {index}")


def test_exporter_keeps_the_packed_tensors(op_export):
    """torch.onnx's optimizer folds small constant subgraphs; it must not unpack these."""
    _, path = op_export
    names = initializer_names(path)
    for i in range(len(FLOAT_CASES)):
        assert {f"floats.{i}.values", f"floats.{i}.indices"} <= names
    for i, case in enumerate(QUANT_CASES):
        assert {f"quants.{i}.codes", f"quants.{i}.indices"} <= names  # (scales may be re-blocked)
        assert (f"quants.{i}.zero_points" in names) == (not case[6])
    counts = op_counts(path)
    assert counts["ScatterElements"] == len(FLOAT_CASES) + len(QUANT_CASES)
    assert counts["MatMulNBits"] == len(QUANT_CASES)


def test_translations_are_registered_once():
    table = translations.translation_table()
    assert table[torch.ops.modelfold.nm_linear.default] is nm_linear_onnx
    assert table[torch.ops.modelfold.nm_quant_linear.default] is nm_quant_linear_onnx
    register_sparse_translations()  # idempotent
    translations.unregister_translation(torch.ops.modelfold.nm_linear)
    register_sparse_translations()  # restores what a test removed
    assert translations.registered_translation(torch.ops.modelfold.nm_linear) is nm_linear_onnx


# -- model level: both modes --------------------------------------------------------------------
@pytest.fixture(scope="module", params=list(MODEL_CASES))
def artifacts(request, tmp_path_factory):
    """``(result, {mode: (artifact dir, manifest)})`` of one case, exported in both modes."""
    pipeline, overrides = MODEL_CASES[request.param]
    result = sparse_llama(pipeline, **overrides)
    root = tmp_path_factory.mktemp(request.param.replace(":", "-").replace("+", "-"))
    exported = {}
    for mode in SPARSE_MODES:
        manifest = modelfold.export(result, root / mode, sparse=mode)
        exported[mode] = (root / mode, manifest)
    return result, exported


def test_both_modes_match_the_eager_model(artifacts):
    result, exported = artifacts
    ids = np.random.default_rng(0).integers(0, 128, size=(2, 6))  # [B, S]
    expected = eager_logits(result.module, ids)
    for mode, (out, manifest) in exported.items():
        parity = manifest["parity"]
        assert parity["prefill_max_abs_diff"] < TOL and parity["decode_max_abs_diff"] < TOL, mode
        assert parity["top1_agreement"] == 1.0, mode
        actual = OnnxCausalLM(out).logits(ids)
        assert float(np.abs(actual - expected).max()) < TOL, mode


def test_compressed_artifact_is_smaller_and_keeps_the_packed_tensors(artifacts):
    result, exported = artifacts
    layers = sparse_layers(result.module)
    quantized = isinstance(next(iter(layers.values())), NMQuantLinear)
    (compressed, c_manifest), (dense, d_manifest) = exported["compressed"], exported["dense"]
    assert onnx_bytes(compressed) < onnx_bytes(dense)
    assert c_manifest["onnx_bytes"] < d_manifest["onnx_bytes"]

    for mode, manifest in (("compressed", c_manifest), ("dense", d_manifest)):
        facts = manifest["sparse"]
        assert facts["mode"] == mode and facts["layers"] == len(layers) == 7
        assert facts["compressed_bytes"] < facts["dense_bytes"]

    # compressed: the packed tensors of every layer are in the file (those of q/k/v and of
    # gate/up concatenated by fuse-projections), each decompressed by a subgraph
    names = initializer_names(compressed / "model.onnx")
    packed = "codes" if quantized else "values"
    fused = {path: group["as"] for group in c_manifest["onnx"]["graph_passes"]["fuse-projections"]
             ["fused"] for path in group["layers"]}
    stored = {fused.get(path, path) for path in layers}
    assert len(stored) < len(layers)  # the sparse layers were fused too
    for path in stored:
        assert {f"model.{path}.{packed}", f"model.{path}.indices"} <= names, path
    counts = op_counts(compressed / "model.onnx")
    assert counts["ScatterElements"] == len(stored)
    assert counts["MatMulNBits" if quantized else "FusedMatMul"] >= len(stored)

    # dense: plain MatMul / MatMulNBits initializers, nothing to decompress
    names = initializer_names(dense / "model.onnx")
    assert not [name for name in names if name.endswith((".indices", ".codes", ".values"))]
    counts = op_counts(dense / "model.onnx")
    assert not DECOMPRESSION_OPS & set(counts)
    assert counts["MatMulNBits" if quantized else "MatMul"] >= len(stored)


def test_compressed_artifact_is_decompressed_when_loaded(artifacts, tmp_path):
    _, exported = artifacts
    out = exported["compressed"][0]
    assert DECOMPRESSION_OPS <= set(op_counts(out / "model.onnx"))  # stored compressed
    loaded = ops_after_load(out / "model.onnx", tmp_path)
    assert not DECOMPRESSION_OPS & set(loaded)  # constant-folded at session load: dense speed


def test_dense_export_is_a_graph_step_that_leaves_the_model_sparse(artifacts):
    """Dense mode rewrites the lowered copy of the graph (nm ops -> linear / quant_linear with the
    decompressed weights); the model and the Program's own graph keep their sparse layers, and
    the lowered graph computes what the sparse layers compute."""
    from modelfold.ir.graph import runnable
    from modelfold.ir.signature import graph_inputs

    result, _ = artifacts
    program = result.program
    before = dict(sparse_layers(program.module))
    sparse_ops = sum(v for k, v in program.dialect_ops().items() if k.startswith("modelfold::nm"))
    lowered, _ = lowered_graph(program, ExportOptions(sparse="dense"))
    assert not [n for n in lowered.graph.nodes if "nm_" in str(n.target)]
    assert sparse_ops == len(before) and sparse_layers(program.module) == before
    ids = torch.randint(0, 128, (1, 5))
    dense_logits = runnable(lowered)(*graph_inputs(program.signature, ids))[0]
    with torch.no_grad():
        torch.testing.assert_close(program.module(input_ids=ids).logits, dense_logits, atol=1e-5,
                                   rtol=0)


# -- options ------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["sparse", "Dense", "", None, 1])
def test_bad_sparse_mode_is_refused(tmp_path, mode):
    model = tiny_model("llama", num_hidden_layers=1)
    message = "'sparse' must be one of compressed, dense"
    with pytest.raises(ValueError, match=message):
        export_onnx(model, tmp_path, sparse=mode)
    with pytest.raises(ValueError, match=message):
        modelfold.export(model, tmp_path / "artifact", sparse=mode)
    with pytest.raises(ValueError, match=message):
        ExportOptions(sparse=mode)
    assert list(tmp_path.iterdir()) == []


def test_model_without_sparse_layers_has_no_sparse_facts():
    program = modelfold.ir.Program(tiny_model("llama", num_hidden_layers=1))
    for mode in SPARSE_MODES:
        step = SparseLowering(program, ExportOptions(sparse=mode))
        assert step.facts == {} and step.disabled_optimizers() == []
        assert step.rewrite(program.exported) is program.exported


def test_convert_accepts_sparse_export():
    parser = build_parser()
    args = parser.parse_args(["convert", "-p", "nm-sparsify", "-o", "out", "--sparse-export", "dense"])
    assert args.sparse_export == "dense"
    assert parser.parse_args(["convert", "-p", "nm-sparsify", "-o", "out"]).sparse_export == "compressed"
    with pytest.raises(SystemExit):
        parser.parse_args(["convert", "-p", "nm-sparsify", "-o", "out", "--sparse-export", "sparse"])
