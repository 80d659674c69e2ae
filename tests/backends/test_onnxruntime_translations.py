"""The custom-translation registry: a dialect-style custom op exports to ONNX and runs in ORT."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnxscript import opset18 as op
from torch import nn

from modelfold.backends.onnxruntime import translations
from modelfold.backends.onnxruntime.export import export_onnx
from modelfold.backends.onnxruntime.runtime import create_session
from tests.tiny_models import tiny_model


@torch.library.custom_op("modelfold_test::scaled_add", mutates_args=())
def scaled_add(x: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    """Reference semantics: x + alpha * y."""
    return x + alpha * y


@scaled_add.register_fake
def _(x: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    return torch.empty_like(x)


def scaled_add_onnx(x, y, alpha: float = 1.0):
    """ONNX translation of modelfold_test::scaled_add (traced by the exporter)."""
    return op.Add(x, op.Mul(y, op.CastLike(alpha, y)))


class ScaledAddMLP(nn.Module):
    """Wraps an MLP's activation: act(x) + 0.5 * x through the custom op."""

    def __init__(self, act: nn.Module):
        super().__init__()
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.modelfold_test.scaled_add(self.act(x), x, 0.5)


@pytest.fixture
def registered():
    translations.register_translation(torch.ops.modelfold_test.scaled_add, scaled_add_onnx)
    yield
    translations.unregister_translation(torch.ops.modelfold_test.scaled_add)


def _count_custom_nodes(model: nn.Module) -> int:
    input_ids = torch.zeros(2, 3, dtype=torch.long)
    program = torch.export.export(model, (input_ids,), kwargs={"use_cache": False})
    target = torch.ops.modelfold_test.scaled_add.default
    return sum(node.target == target for node in program.graph.nodes)


def test_register_normalizes_packet_and_rejects_duplicates(registered):
    table = translations.translation_table()
    assert table[torch.ops.modelfold_test.scaled_add.default] is scaled_add_onnx
    with pytest.raises(ValueError, match="already registered"):
        translations.register_translation(torch.ops.modelfold_test.scaled_add.default, scaled_add_onnx)
    translations.register_translation(torch.ops.modelfold_test.scaled_add, scaled_add_onnx, replace=True)


def test_register_rejects_non_ops():
    with pytest.raises(TypeError, match="torch op"):
        translations.register_translation("modelfold::quant_linear", scaled_add_onnx)


def test_plain_module_with_custom_op_matches_torch(registered, tmp_path):
    module = ScaledAddMLP(nn.SiLU()).eval()
    x = torch.randn(2, 5, 8)
    program = torch.onnx.export(
        module,
        (x,),
        dynamo=True,
        custom_translation_table=translations.translation_table(),
        dynamic_shapes=({0: "batch", 1: "sequence"},),
    )
    program.save(str(tmp_path / "m.onnx"))
    ops = [n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node]
    assert "scaled_add" not in ops and "Add" in ops

    session = create_session(tmp_path / "m.onnx")
    x = torch.randn(3, 4, 8)  # a different shape than the export example
    actual = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(actual, module(x).numpy(), atol=1e-6)


def test_export_onnx_passes_the_registered_translations(registered, tmp_path):
    model = tiny_model("llama", layers=2)
    for layer in model.model.layers:
        layer.mlp.act_fn = ScaledAddMLP(layer.mlp.act_fn)
    assert _count_custom_nodes(model) == 2  # one custom node per layer survives capture

    facts = export_onnx(model, tmp_path)
    assert facts["parity"]["prefill_max_abs_diff"] <= 1e-4
    assert facts["parity"]["decode_max_abs_diff"] <= 1e-4


def test_missing_translation_names_the_fix(tmp_path):
    model = tiny_model("llama", layers=2)
    model.model.layers[0].mlp.act_fn = ScaledAddMLP(model.model.layers[0].mlp.act_fn)
    with pytest.raises(RuntimeError, match="register_translation"):
        export_onnx(model, tmp_path, parity=False)
