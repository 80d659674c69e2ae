"""ONNX lowerings of the quantization dialect ops, run in real ONNX Runtime.

Op level: one module holding a QuantLinear / QuantEmbedding / W8A8Linear per storage format is
exported once with `torch.onnx.export` and compared output by output with its torch reference.
Model level (prefill and KV-cache decode parity): a llama whose tied embedding table is shared by
the embedding and the LM head, through `export_onnx`; a qwen2 (q/k/v biases, untied head) mixing
formats, through `modelfold.export` with `accuracy_level=4`.

Weights are packed by round-to-nearest (`PackedWeight.from_float`), standing in for the quantize
pass. GPT-2 is not covered: its `Conv1D` layers are not `nn.Linear` (weight `[in, out]`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import modelfold
from modelfold.backends.onnxruntime import translations
from modelfold.backends.onnxruntime.export import export_onnx
from modelfold.backends.onnxruntime.quant_lowering import (
    lowering_options,
    quant_linear_onnx,
    register_quant_translations,
)
from modelfold.cli import build_parser
from modelfold.ir.quant import (
    PackedWeight,
    QuantEmbedding,
    QuantFormat,
    QuantLinear,
    W8A8Linear,
    block_size_for,
)
from tests.tiny_models import tiny_model

W8A8 = "w8a8"

# A linear's target: a QuantFormat, W8A8 (int8 x int8), or None (stays float).
Target = QuantFormat | str | None


# -- helpers ------------------------------------------------------------------------------------
def quant_format(bits: int, group_size: int, symmetric: bool, in_features: int) -> QuantFormat:
    """The format of a `group_size` (-1: per channel) quantization of a K = `in_features` weight."""
    return QuantFormat(bits, block_size_for(group_size, in_features), symmetric)


def quantize_linears(model: nn.Module, target: Callable[[str, nn.Linear], Target]) -> list[str]:
    """Swaps the `nn.Linear`s of the decoder body (`model.model`) for quantized modules.

    Round-to-nearest packing (`PackedWeight.from_float`) stands in for the quantize pass.

    Returns:
        The module paths swapped.
    """
    swapped = []
    for name, module in list(model.model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        fmt = target(name, module)
        if fmt is None:
            continue
        if fmt == W8A8:
            new = W8A8Linear(module.weight, module.bias)
        else:
            new = QuantLinear(PackedWeight.from_float(module.weight, fmt), module.bias)
        parent, _, attr = name.rpartition(".")
        setattr(model.model.get_submodule(parent), attr, new)
        swapped.append(name)
    return swapped


def quantize_tied_embedding(model: nn.Module, fmt: QuantFormat) -> PackedWeight:
    """Quantizes a tied embedding table once; the embedding and the LM head share its buffers."""
    table = model.model.embed_tokens.weight
    if model.lm_head.weight is not table:
        raise ValueError("the model's LM head is not tied to its embedding")
    packed = PackedWeight.from_float(table, fmt)
    model.model.embed_tokens = QuantEmbedding(packed)
    model.lm_head = QuantLinear(packed)
    return packed


def node_counts(path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def matmul_nbits_levels(path) -> set[int]:
    graph = onnx.load(str(path), load_external_data=False).graph
    return {
        next((a.i for a in node.attribute if a.name == "accuracy_level"), 0)
        for node in graph.node
        if node.op_type == "MatMulNBits"
    }


# -- op level -----------------------------------------------------------------------------------
# (bits, group_size, symmetric, K): every storage width, sym/asym, per-channel, K % block != 0, and
# 2-bit per-channel with K > 256 (re-blocked: ORT's 2-bit MatMulNBits takes blocks of <= 256).
LINEAR_CASES = [
    (4, 16, False, 40),
    (4, 32, True, 64),
    (2, 16, False, 48),
    (2, -1, True, 40),
    (8, 16, True, 40),
    (8, -1, False, 64),
    (3, 16, False, 40),
    (2, -1, True, 300),
    (2, -1, False, 300),
]
EMBEDDING_CASES = [
    (4, 16, False, 40),
    (4, -1, True, 24),
    (2, 16, True, 40),
    (8, 32, False, 64),
    (3, 16, True, 40),
    (2, -1, False, 300),
]
TIED_CASE = (2, -1, False, 300)  # re-blocked for the head; the table must still be stored once
VOCAB, OUT_FEATURES, MAX_K = 50, 24, 300


class AllQuantOps(nn.Module):
    """Every case side by side: forward(x [B, S, MAX_K], ids [B, S]) -> one output per module.

    Outputs: LINEAR_CASES, EMBEDDING_CASES, two w8a8 linears (with and without bias), then a
    tied embedding -> head pair (TIED_CASE).
    """

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linears = nn.ModuleList(
            QuantLinear(
                PackedWeight.from_float(torch.randn(OUT_FEATURES, k), quant_format(bits, group, sym, k)),
                torch.randn(OUT_FEATURES) if i % 2 else None,
            )
            for i, (bits, group, sym, k) in enumerate(LINEAR_CASES)
        )
        self.embeddings = nn.ModuleList(
            QuantEmbedding(PackedWeight.from_float(torch.randn(VOCAB, e), quant_format(bits, group, sym, e)))
            for bits, group, sym, e in EMBEDDING_CASES
        )
        self.w8a8 = nn.ModuleList(
            [
                W8A8Linear(torch.randn(OUT_FEATURES, MAX_K), torch.randn(OUT_FEATURES)),
                W8A8Linear(torch.randn(8, 40)),
            ]
        )
        bits, group, sym, e = TIED_CASE
        table = PackedWeight.from_float(torch.randn(VOCAB, e), quant_format(bits, group, sym, e))
        self.tied_embedding, self.tied_head = QuantEmbedding(table), QuantLinear(table)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = [lin(x[..., : lin.in_features]) for lin in self.linears]
        outputs += [emb(ids) for emb in self.embeddings]
        outputs += [lin(x[..., : lin.in_features]) for lin in self.w8a8]
        outputs.append(self.tied_head(self.tied_embedding(ids)))
        return tuple(outputs)


def _export_ops(path, accuracy_level: int = 0) -> nn.Module:
    module = AllQuantOps().eval()
    x = torch.randn(2, 3, MAX_K)
    ids = torch.randint(0, VOCAB, (2, 3))
    dims = {0: "batch", 1: "sequence"}
    with lowering_options(accuracy_level=accuracy_level), torch.no_grad():
        program = torch.onnx.export(
            module,
            (x, ids),
            dynamo=True,
            custom_translation_table=translations.translation_table(),
            dynamic_shapes=(dims, dims),
            opset_version=23,
        )
    program.save(str(path))
    return module


def _run_ops(module: nn.Module, path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Torch and ONNX Runtime outputs on inputs of another shape than the export example.

    ONNX Runtime's optimized graph is saved as `<path>.opt.onnx` for the structure checks.
    """
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, MAX_K, generator=generator) * 2
    x[0, 0] = 0.0  # an all-zero token: w8a8's scale is clamped to 1e-8
    ids = torch.randint(0, VOCAB, (3, 5), generator=generator)
    with torch.no_grad():
        expected = [t.numpy() for t in module(x, ids)]
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # as the runtime
    options.optimized_model_filepath = str(path) + ".opt.onnx"
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    actual = session.run(None, {names[0]: x.numpy(), names[1]: ids.numpy()})
    return expected, actual


@pytest.fixture(scope="module")
def op_outputs(tmp_path_factory):
    path = tmp_path_factory.mktemp("ops") / "ops.onnx"
    module = _export_ops(path)
    return path, *_run_ops(module, path)


def test_ops_lower_to_contrib_and_integer_kernels(op_outputs):
    path, _, _ = op_outputs
    optimized = str(path) + ".opt.onnx"
    counts = node_counts(optimized)
    assert counts["MatMulNBits"] == len(LINEAR_CASES) + 1
    assert counts["GatherBlockQuantized"] == len(EMBEDDING_CASES) + 1
    assert counts["MatMulInteger"] == 2
    assert not {"quant_linear", "quant_embedding", "w8a8_linear", "MatMul", "Gemm"} & set(counts)
    # Re-blocking and the zero-point unpacking were folded into initializers.
    assert not {"BitShift", "BitwiseAnd", "ReduceSum", "Expand", "Pad"} & set(counts)
    assert matmul_nbits_levels(optimized) == {0}


def test_reblocked_tied_table_is_stored_once(op_outputs):
    path, _, _ = op_outputs
    graph = onnx.load(str(path) + ".opt.onnx").graph
    _, _, _, e = TIED_CASE
    reblocked = [VOCAB, -(-e // 256), 256 * 2 // 8]  # 2-bit blocks of 256
    readers = {init.name: set() for init in graph.initializer if list(init.dims) == reblocked}
    for node in graph.node:
        for name in node.input[:1] if node.op_type == "GatherBlockQuantized" else node.input[1:2]:
            if name in readers:
                readers[name].add(node.op_type)
    # One table per QuantEmbedding: EMBEDDING_CASES' own 2-bit per-channel one, and the tied one,
    # which the head's MatMulNBits reads too (no second, re-blocked copy for the head).
    assert sorted(map(sorted, readers.values())) == [
        ["GatherBlockQuantized"],
        ["GatherBlockQuantized", "MatMulNBits"],
    ]


def _output_index(group: str, case: int) -> int:
    offsets = {"linear": 0, "embedding": len(LINEAR_CASES), "w8a8": len(LINEAR_CASES) + len(EMBEDDING_CASES)}
    return offsets[group] + case


@pytest.mark.parametrize("case", range(len(LINEAR_CASES)), ids=[str(c) for c in LINEAR_CASES])
def test_quant_linear_matches_torch(op_outputs, case):
    _, expected, actual = op_outputs
    index = _output_index("linear", case)
    np.testing.assert_allclose(actual[index], expected[index], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", range(len(EMBEDDING_CASES)), ids=[str(c) for c in EMBEDDING_CASES])
def test_quant_embedding_matches_torch(op_outputs, case):
    _, expected, actual = op_outputs
    index = _output_index("embedding", case)
    np.testing.assert_allclose(actual[index], expected[index], rtol=1e-6, atol=1e-6)


def test_tied_embedding_and_head_match_torch(op_outputs):
    _, expected, actual = op_outputs
    np.testing.assert_allclose(actual[-1], expected[-1], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("case", [0, 1], ids=["bias", "no-bias"])
def test_w8a8_linear_is_bit_exact(op_outputs, case):
    _, expected, actual = op_outputs
    index = _output_index("w8a8", case)
    np.testing.assert_array_equal(actual[index], expected[index])


def test_accuracy_level_4_is_close(tmp_path):
    path = tmp_path / "ops4.onnx"
    module = _export_ops(path, accuracy_level=4)
    assert matmul_nbits_levels(path) == {4}
    expected, actual = _run_ops(module, path)
    for case in range(len(LINEAR_CASES)):  # int8 activations per block: about 1% of the output
        error = np.abs(actual[case] - expected[case]).max() / np.abs(expected[case]).max()
        assert error < 0.03, (LINEAR_CASES[case], error)


# -- model level --------------------------------------------------------------------------------
def _llama_target(name: str, linear: nn.Linear) -> Target:
    if name in ("layers.0.self_attn.q_proj", "layers.0.mlp.down_proj"):
        return W8A8
    return quant_format(4, 32, False, linear.in_features)  # K = 48 and 80: partial last blocks


def quantized_llama() -> nn.Module:
    """Tied llama, hidden 48: 4-bit asym g32 linears, two w8a8 ones, a 4-bit asym g16 tied table."""
    model = tiny_model("llama", layers=1, hidden_size=48, intermediate_size=80, tie_word_embeddings=True)
    quantize_linears(model, _llama_target)
    quantize_tied_embedding(model, quant_format(4, 16, False, 48))
    return model


@pytest.fixture(scope="module")
def llama_artifact(tmp_path_factory):
    model = quantized_llama()
    out = tmp_path_factory.mktemp("llama")
    return model, out, export_onnx(model, out)


def test_llama_lowers_every_quantized_layer(llama_artifact):
    _, out, facts = llama_artifact
    nodes = facts["onnx_nodes"]
    # k, v, o, gate+up (fused: fuse-projections; q is W8A8, so q/k/v stay apart), lm_head
    assert nodes["com.microsoft.MatMulNBits"] == 5
    assert nodes["com.microsoft.GatherBlockQuantized"] == 1
    assert nodes["MatMulInteger"] == 2
    assert "MatMul" not in nodes and "Gather" not in nodes  # no float weight left
    assert facts["accuracy_level"] == 0
    assert matmul_nbits_levels(out / "model.onnx") == {0}


def test_llama_prefill_and_decode_match_torch(llama_artifact):
    _, _, facts = llama_artifact
    parity = facts["parity"]
    assert parity["prefill_max_abs_diff"] <= 1e-4
    assert parity["decode_max_abs_diff"] <= 1e-4
    assert parity["top1_agreement"] == 1.0


def test_tied_table_is_stored_once(llama_artifact):
    model, out, _ = llama_artifact
    table = model.lm_head.qweight  # the same tensor as the embedding's
    assert model.model.embed_tokens.qweight is table
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    copies = [
        init.name
        for init in graph.initializer
        if init.data_type == onnx.TensorProto.UINT8 and list(init.dims) == list(table.shape)
    ]
    assert len(copies) == 1
    gather = next(n for n in graph.node if n.op_type == "GatherBlockQuantized")
    head = [n for n in graph.node if n.op_type == "MatMulNBits" and n.input[1] == copies[0]]
    assert gather.input[0] == copies[0] and len(head) == 1
    # Beyond the module's unique tensors the artifact holds GatherBlockQuantized's copies of the
    # scales [V, kb, 1] float32 and zero points [V, kb, 1] uint8 (folded by ONNX Runtime) and a
    # few small constants; nothing the size of the table.
    stored = sum(
        int(np.prod(init.dims)) * onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
        for init in graph.initializer
    )
    unique = {id(t): t for t in model.state_dict(keep_vars=True).values()}.values()
    extra = stored - sum(t.numel() * t.element_size() for t in unique)
    vocab, k_blocks, _ = table.shape
    assert 0 <= extra <= vocab * k_blocks * (4 + 1) + 1024 < table.numel(), (extra, table.numel())


def _qwen2_target(name: str, linear: nn.Linear) -> Target:
    k = linear.in_features
    return {
        "q_proj": quant_format(2, -1, True, k),
        "k_proj": quant_format(8, 16, False, k),
        "v_proj": quant_format(4, 16, True, k),
        "o_proj": W8A8,
        "gate_proj": quant_format(8, -1, True, k),
        "up_proj": quant_format(3, 16, False, k),
        "down_proj": quant_format(2, 16, False, k),
    }[name.rsplit(".", 1)[-1]]


def test_qwen2_mixed_formats_at_accuracy_level_4_through_modelfold_export(tmp_path):
    """A second family (q/k/v biases, untied head) through write_artifact, with int8 activations."""
    model = tiny_model("qwen2", layers=1)
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    quantize_linears(model, _qwen2_target)
    model.lm_head = QuantLinear(PackedWeight.from_float(model.lm_head.weight, quant_format(8, 16, False, 32)))
    model.model.embed_tokens = QuantEmbedding(
        PackedWeight.from_float(model.model.embed_tokens.weight, quant_format(2, 16, False, 32))
    )
    manifest = modelfold.export(model, tmp_path / "art", accuracy_level=4)
    assert manifest["accuracy_level"] == 4 and manifest["onnx"]["accuracy_level"] == 4
    nodes = manifest["onnx"]["onnx_nodes"]
    assert nodes["com.microsoft.MatMulNBits"] == 7  # q, k, v, gate, up, down, lm_head
    assert nodes["com.microsoft.GatherBlockQuantized"] == 1
    assert nodes["MatMulInteger"] == 1
    assert matmul_nbits_levels(tmp_path / "art" / "model.onnx") == {4}
    parity = manifest["parity"]  # int8 activations: close to torch, not exact
    assert 0 < parity["prefill_max_abs_diff"] <= 0.05
    assert parity["decode_max_abs_diff"] <= 0.05
    assert parity["top1_agreement"] >= 0.9


# -- options ------------------------------------------------------------------------------------
@pytest.mark.parametrize("level", [5, -1, True, "five", 4.5])
def test_bad_accuracy_level_is_refused(tmp_path, level):
    model = tiny_model("llama", layers=1)
    message = "option 'accuracy_level' must be"
    with pytest.raises(ValueError, match=message):
        export_onnx(model, tmp_path, accuracy_level=level)
    with pytest.raises(ValueError, match=message):
        with lowering_options(accuracy_level=level):
            pass
    assert list(tmp_path.iterdir()) == []


def test_convert_accepts_accuracy_level():
    parser = build_parser()
    args = parser.parse_args(["convert", "-p", "quantize", "-o", "out", "--accuracy-level", "4"])
    assert args.accuracy_level == 4
    assert parser.parse_args(["convert", "-p", "quantize", "-o", "out"]).accuracy_level == 0
    with pytest.raises(SystemExit):
        parser.parse_args(["convert", "-p", "quantize", "-o", "out", "--accuracy-level", "5"])


def test_translations_are_registered_once(monkeypatch):
    table = translations.translation_table()
    ops = [
        torch.ops.modelfold.quant_linear,
        torch.ops.modelfold.quant_embedding,
        torch.ops.modelfold.w8a8_linear,
    ]
    assert all(op.default in table for op in ops)
    register_quant_translations()  # idempotent
    translations.unregister_translation(ops[0])
    register_quant_translations()  # restores what a test removed
    assert translations.registered_translation(ops[0]) is quant_linear_onnx
    monkeypatch.setattr(translations, "_TRANSLATIONS", dict(table))
    translations.register_translation(ops[1], quant_linear_onnx, replace=True)
    with pytest.raises(ValueError, match="already registered"):
        register_quant_translations()  # another lowering registered for the op: refuse, not replace
