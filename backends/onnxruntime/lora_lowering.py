"""ONNX lowering of ``modelfold::lora_delta`` (``ir/lora.py``) and the export modes of LoRA layers.

``lora_delta(x, A [r, in], B [out, r], scaling)`` lowers to two ``Gemm`` nodes on x flattened to
2-D: ``h = Gemm(x2, A, transB=1)``, ``d = Gemm(h, B, transB=1, alpha=scaling)``, reshaped back to
``[..., out]``.

``ExportOptions(lora=MODE)`` chooses what becomes of the ``LoraLinear`` layers (``LoraLowering``,
graph steps on the exported copy of the graph; the torch model is not touched):

- ``"merge"`` (default): active adapters on float bases are folded into the base weight of the
  lowered graph (a plain MatMul, no overhead). Adapters on packed (quantized) bases, or on a
  weight shared with another layer, cannot be merged: they stay a Gemm branch next to the base's
  MatMul(NBits) and are listed in ``kept_unmerged`` with the reason.
- ``"separate"``: every active adapter stays a Gemm branch.
- ``"inputs"``: ONNX Runtime's multi-adapter mechanism. Each LoRA layer gets one slot whose
  weights ``<module path>.lora_A [r, in]`` / ``<module path>.lora_B [out, r]`` are graph inputs
  that are also initializers (ORT's *overridable initializers*), with a symbolic rank per layer
  and EMPTY defaults (``[0, in]``, ``[out, 0]``): without an adapter the artifact is the base
  model (ORT's Gemm with K = 0 writes zeros; checked up to [2048, 512] x [0, 512] -> [2048, 1024]).
  The slot's Gemm has alpha 1; the scaling is folded into B in the adapter files, one per named
  adapter, ``adapters/<name>.onnx_adapter`` (``onnxruntime.AdapterFormat``), loaded at run time
  with ``onnxruntime.LoraAdapter`` and ``RunOptions.add_active_adapter``. Several adapters
  combine exactly by concatenating along the rank (``adapter_parameters``).

Shape legend: M = tokens (batch x sequence), in / out = the layer's features, r = adapter rank.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import torch
from onnxscript import opset18 as op
from torch import nn
from torch.export import ExportedProgram

from modelfold.backends.onnxruntime.lowering import Lowering, register_lowering
from modelfold.backends.onnxruntime.runtime import ADAPTER_SUFFIX, ADAPTERS_DIR, MODEL_FILE
from modelfold.backends.onnxruntime.translations import ensure_registered
from modelfold.errors import UsageError
from modelfold.ir.graph import GraphEditor, GraphRewriteError, layer_io, nodes_by_owner
from modelfold.ir.lora import LoraLinear, adapter_names, lora_layers
from modelfold.ir.modules import to_storage
from modelfold.ir.signature import WRAPPED_PREFIX
from modelfold.ir.tying import parameter_uses

if TYPE_CHECKING:
    from modelfold.backends.onnxruntime.options import ExportOptions
    from modelfold.ir.program import Program

__all__ = [
    "ADAPTERS_DIR",
    "ADAPTER_SUFFIX",
    "LoraLowering",
    "adapter_parameters",
    "lora_delta_onnx",
    "register_lora_translations",
    "write_ort_adapter",
]


# The rank of the slot branch each layer carries in an "inputs" export. 2, not 1: a [M, 1]
# intermediate invites broadcast rewrites of the second Gemm; nothing special-cases 2. Each slot's
# values are unique (layer index), because torch.onnx's optimizer merges initializers of equal
# content (a test model whose B's were all 0.05 came out with one B per shape).
_SLOT_RANK = 2


# -- the translation (traced by torch.onnx's exporter; tensors are onnxscript values) ------------
def lora_delta_onnx(x, lora_a, lora_b, scaling: float = 1.0):
    """``modelfold::lora_delta`` -> ``Gemm`` -> ``Gemm``: x ``[..., in]`` -> ``[..., out]``."""
    in_features = lora_a.shape[1]
    out_features = lora_b.shape[0]
    x2 = op.Reshape(x, op.Constant(value_ints=[-1, in_features]))  # [M, in]
    h = op.Gemm(x2, lora_a, transB=1)  # [M, r]
    d = op.Gemm(h, lora_b, transB=1, alpha=float(scaling))  # [M, out]
    lead = op.Shape(x, start=0, end=-1)  # the [...] of x
    shape = op.Concat(lead, op.Constant(value_ints=[out_features]), axis=0)
    return op.Reshape(d, shape)  # [..., out]


def register_lora_translations() -> None:
    """Registers the ``lora_delta`` translation (done on import; again after an unregister).

    Raises:
        ValueError: Another translation is already registered for the op.
    """
    ensure_registered({"lora_delta": lora_delta_onnx})


# -- export modes --------------------------------------------------------------------------------
@register_lowering
class LoraLowering(Lowering):
    """The LoRA layers in an export (``ExportOptions.lora``); facts under ``lora``.

    "merge" and "inputs" are graph steps on the lowered copy of the Program's graph (the torch
    model is never changed): "merge" replaces each float base weight by ``W + sum s B A`` and
    drops the branches; "inputs" replaces each layer's branches by one slot branch whose tensors
    ``edit_onnx`` turns into overridable, empty initializers.

    Raises (when built):
        UsageError: mode "inputs" on a model without LoRA layers, with adapters merged into the
            base weights (the base of the artifact must be the bare model), or with an adapter
            name that cannot name a file.
    """

    name = "lora"
    order = 10

    def __init__(self, program: Program, options: ExportOptions):
        super().__init__(program, options)
        self.mode = options.lora
        self.layers = lora_layers(program.module)
        self.slots: dict[str, tuple[int, int]] = {}  # "inputs": path -> (in, out)
        if not self.layers:
            if self.mode == "inputs":
                raise UsageError("lora='inputs' exports LoRA layers as ONNX Runtime adapter "
                                 "inputs, but the model has no LoRA layers (run the lora pass "
                                 "first)")
            return
        self.facts = _describe(self.layers, self.mode)
        if self.mode == "inputs":
            merged = [path for path, layer in self.layers.items() if layer.merged]
            if merged:
                raise UsageError(
                    f"lora='inputs' needs the base weights without adapters, but {len(merged)} "
                    f"layers (e.g. {merged[0]}) have merged adapters; unmerge them first "
                    "(modelfold.ir.lora.unmerge_adapters)")
            for name in adapter_names(program.module):
                if not re.fullmatch(r"[A-Za-z0-9_\-]+", name):  # it becomes a file name
                    raise UsageError(
                        f"lora='inputs' writes adapters/<name>.onnx_adapter, and the adapter name "
                        f"{name!r} cannot name a file; use letters, digits, '_' or '-'")

    # -- graph steps -----------------------------------------------------------------------
    def rewrite(self, ep: ExportedProgram) -> ExportedProgram:
        if not self.layers or self.mode == "separate":
            return ep
        editor = GraphEditor(ep)
        owned = nodes_by_owner(editor)
        if self.mode == "merge":
            self._merge(editor, owned)
        else:
            self._slots(editor, owned)
        return editor.finish()

    def _merge(self, editor: GraphEditor, owned: dict[str, list]) -> None:
        uses = parameter_uses(self.program.module)
        merged: list[str] = []
        kept: list[dict[str, Any]] = []
        for path, layer in self.layers.items():
            pending = [n for n in layer.active if n not in layer.merged]
            if not pending:
                continue
            base = layer.base_layer
            if not layer.can_merge():
                reason = (f"packed {type(base).__name__} base: merging would re-quantize the "
                          "weight; exported as a Gemm branch next to the quantized MatMul")
            elif uses[id(base.weight)] > 1:
                reason = ("base weight shared with another layer (tied): merging would change "
                          "that layer too; exported as a Gemm branch")
            else:
                reason = None
            if reason:
                kept.append({"path": path, "adapters": pending, "reason": reason})
                continue
            weight = _placeholder(editor, f"{path}.base_layer.weight")
            with torch.no_grad():  # the arithmetic of LoraLinear.merge, on a copy
                value = base.weight.detach().clone()
                for name in pending:
                    value += to_storage(base, layer.adapters[name].delta_weight()).to(value.dtype)
            weight.replace_all_uses_with(editor.add_tensor(f"{path}.base_layer.weight", value))
            _, base_out, out = layer_io(owned, path)
            if out is not base_out:
                out.replace_all_uses_with(base_out)
            merged.append(path)
        self.facts["merged"] = merged
        self.facts["kept_unmerged"] = kept

    def _slots(self, editor: GraphEditor, owned: dict[str, list]) -> None:
        for index, (path, layer) in enumerate(self.layers.items()):
            k, n = layer.in_features, layer.out_features
            # Each slot's values are unique (layer index): torch.onnx's optimizer merges
            # initializers of equal content. Their delta is exactly zero (B's column 0 meets A's
            # only non-zero row, 0; column 1 meets A's zero row), so the graph the default passes
            # check on a probe is the base model the artifact is without an adapter.
            a = torch.zeros(_SLOT_RANK, k)
            a[0, 0] = index + 1.0
            b = torch.zeros(n, _SLOT_RANK)
            b[0, 1] = -(index + 1.0)
            a = editor.add_tensor(f"{path}.lora_A", a)
            b = editor.add_tensor(f"{path}.lora_B", b)
            x, base_out, out = layer_io(owned, path)
            delta = editor.call(torch.ops.modelfold.lora_delta.default, (x, a, b, 1.0), near=out,
                                after=True)
            new_out = editor.call(torch.ops.aten.add.Tensor, (base_out, delta), near=delta,
                                  after=True)
            out.replace_all_uses_with(
                new_out, delete_user_cb=lambda u, own=(delta, new_out): u not in own)
            self.slots[path] = (k, n)
        self.facts["slots"] = len(self.slots)
        self.facts["input_names"] = ("<module path>.lora_A [r, in], <module path>.lora_B "
                                     "[out, r]")

    # -- the ONNX file ---------------------------------------------------------------------
    def edit_onnx(self, model: onnx.ModelProto) -> None:
        if self.slots:
            _expose_slots(model, self.slots)

    def finish(self, out_dir: Path) -> None:
        """Mode "inputs": checks that the optimized graph kept the slots overridable and writes
        one adapter file per named adapter under ``out_dir/adapters``."""
        if not self.slots:
            return
        graph = onnx.load(str(Path(out_dir) / MODEL_FILE), load_external_data=False).graph
        initializers = {init.name: list(init.dims) for init in graph.initializer}
        inputs = {i.name for i in graph.input}
        for path, (k, n) in self.slots.items():
            for name, dims in ((f"{path}.lora_A", [0, k]), (f"{path}.lora_B", [n, 0])):
                if name not in inputs or initializers.get(name) != dims:
                    raise RuntimeError(
                        f"ONNX Runtime's optimizer did not keep {name} an overridable initializer "
                        f"{dims} (input: {name in inputs}, initializer: {initializers.get(name)})")
        files = {}
        model = self.program.module
        for name in adapter_names(model):
            target = Path(out_dir) / ADAPTERS_DIR / f"{name}{ADAPTER_SUFFIX}"
            files[name] = write_ort_adapter(model, target, [name])
            files[name]["file"] = f"{ADAPTERS_DIR}/{target.name}"
        self.facts["adapter_files"] = files

    @torch.no_grad()
    def parity(self, out_dir: Path) -> dict[str, Any] | None:
        """Mode "inputs": parity of the artifact with the active adapters applied against the
        torch model (returned), and of the bare artifact against the torch model with every
        adapter deactivated (``facts["base_parity"]``)."""
        if not self.slots:
            return None
        from modelfold.backends.onnxruntime.parity import check_parity

        model = self.program.module
        layers = self.layers
        active = [n for n in adapter_names(model)
                  if any(n in layer.active for layer in layers.values())]
        saved = {path: list(layer.active) for path, layer in layers.items()}
        try:
            for layer in layers.values():
                layer.active = []
            self.facts["base_parity"] = check_parity(model, out_dir)
        finally:
            for path, layer in layers.items():
                layer.active = saved[path]
        if not active:
            self.facts["parity_adapter"] = None
            return dict(self.facts["base_parity"])
        single = f"{ADAPTERS_DIR}/{active[0]}{ADAPTER_SUFFIX}"
        if len(active) == 1 and all(layer.active == [active[0]] for layer in layers.values()
                                    if active[0] in layer.adapters):
            self.facts["parity_adapter"] = single
            return check_parity(model, out_dir, adapter=Path(out_dir) / single)
        # Several adapters active (or one, on only some of its layers): the layers' active sets
        # concatenated along the rank, in a file that is not part of the artifact.
        self.facts["parity_adapter"] = "+".join(active) + " (combined per layer, not shipped)"
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"active{ADAPTER_SUFFIX}"
            write_ort_adapter(model, path, None)
            return check_parity(model, out_dir, adapter=path)


def _describe(layers: dict[str, LoraLinear], mode: str) -> dict[str, Any]:
    adapters: dict[str, dict[str, Any]] = {}
    for layer in layers.values():
        for name, adapter in layer.adapters.items():
            entry = adapters.setdefault(name, {"kinds": [], "layers": 0, "ranks": [],
                                               "active_layers": 0})
            entry["layers"] += 1
            entry["active_layers"] += name in layer.active
            if adapter.kind not in entry["kinds"]:
                entry["kinds"].append(adapter.kind)
            if adapter.rank not in entry["ranks"]:
                entry["ranks"].append(adapter.rank)
    already = [{"path": p, "adapters": list(layer.merged)} for p, layer in layers.items()
               if layer.merged]
    facts: dict[str, Any] = {"mode": mode, "layers": len(layers), "adapters": adapters}
    if already:  # merged in the torch model: part of the base weights in every mode
        facts["merged_before_export"] = already
    return facts


def _placeholder(editor: GraphEditor, name: str) -> torch.fx.Node:
    for node in editor.graph.nodes:
        if node.op == "placeholder" and editor.is_lifted(node) and \
                editor.target_name(node) == name:
            return node
    raise GraphRewriteError(f"the graph has no lifted tensor {name}")


def _expose_slots(model: onnx.ModelProto, slots: dict[str, tuple[int, int]]) -> None:
    """Renames each slot's A / B initializer (the lowered graph's ``model.<path>.lora_A`` /
    ``.lora_B``) to ``<module path>.lora_A`` / ``.lora_B``, empties it, declares it a graph input
    with a symbolic rank, and drops the value_info that pins the rank.

    Only the graph changes; the old slot bytes stay unreferenced in the external data file,
    which ONNX Runtime's optimizer rewrites anyway.
    """
    graph = model.graph
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    by_name = {init.name: init for init in graph.initializer}
    pinned: set[str] = set()  # the [M, r] outputs of the slots' first Gemm
    for layer_path, (k, n) in slots.items():
        rank = f"{layer_path}.lora_rank"
        for part, empty, dims in (("lora_A", (0, k), [rank, k]), ("lora_B", (n, 0), [n, rank])):
            new = f"{layer_path}.{part}"
            old = WRAPPED_PREFIX + new
            if old not in by_name:
                raise RuntimeError(f"the exported graph has no initializer {old} (the adapter "
                                   f"slot of {layer_path})")
            if new in by_name:
                raise RuntimeError(f"the exported graph already has an initializer named {new}")
            users = consumers.get(old, [])
            if not users or any(u.op_type != "Gemm" or list(u.input).index(old) != 1 for u in users):
                raise RuntimeError(
                    f"the adapter slot {old} is not read as Gemm's B by every user "
                    f"({[u.op_type for u in users]}); the lora_delta lowering changed?"
                )
            for user in users:
                user.input[1] = new
                if part == "lora_A":
                    pinned.update(user.output)
            graph.initializer.remove(by_name.pop(old))
            tensor = onnx.numpy_helper.from_array(np.zeros(empty, dtype=np.float32), new)
            graph.initializer.append(tensor)
            by_name[new] = tensor
            graph.input.append(onnx.helper.make_tensor_value_info(new, onnx.TensorProto.FLOAT, dims))
    kept = [v for v in graph.value_info if v.name not in pinned]
    del graph.value_info[:]
    graph.value_info.extend(kept)


# -- adapter files -------------------------------------------------------------------------------
@torch.no_grad()
def adapter_parameters(model: nn.Module, names: list[str] | None = None) -> dict[str, np.ndarray]:
    """The weights an "inputs" artifact takes for ``names``, per layer concatenated along the rank.

    Args:
        model: The model with ``LoraLinear`` layers (as exported).
        names: Adapters to combine; None: each layer's active adapters.

    Returns:
        ``<module path>.lora_A`` -> float32 ``[r, in]`` (the effective A) and ``<module
        path>.lora_B`` -> float32 ``[out, r]`` (scaling x the effective B), for every layer with
        at least one of the adapters.
    """
    params: dict[str, np.ndarray] = {}
    for path, layer in lora_layers(model).items():
        chosen = layer.active if names is None else [n for n in names if n in layer.adapters]
        chosen = [n for n in chosen if n not in layer.merged]
        if not chosen:
            continue
        pairs = []
        for name in chosen:
            adapter = layer.adapters[name]
            a, b = adapter.effective()  # [r, in], [out, r]
            pairs.append((a.detach().float(), b.detach().float() * adapter.scaling))
        params[f"{path}.lora_A"] = torch.cat([a for a, _ in pairs], 0).contiguous().numpy()  # [r, in]
        params[f"{path}.lora_B"] = torch.cat([b for _, b in pairs], 1).contiguous().numpy()  # [out, r]
    return params


def write_ort_adapter(model: nn.Module, path: Path, names: list[str] | None) -> dict[str, Any]:
    """Writes an ONNX Runtime adapter file (``onnxruntime.AdapterFormat``) for ``names``.

    Args:
        model: The model with ``LoraLinear`` layers.
        path: The ``.onnx_adapter`` file to write (its folder is created).
        names: Adapters to combine (see ``adapter_parameters``); None: the active ones.

    Returns:
        ``layers`` (count), ``ranks`` (the distinct ranks), ``parameters`` (numbers), ``bytes``.

    Raises:
        ValueError: No layer has any of the adapters.
    """
    import onnxruntime as ort

    params = adapter_parameters(model, names)
    if not params:
        raise ValueError(f"no LoRA layer has the adapters {names!r}; nothing to write")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(1)
    adapter.set_model_version(1)
    # OrtValues wrap the numpy arrays without copying: ``params`` keeps them alive until written.
    adapter.set_parameters({name: ort.OrtValue.ortvalue_from_numpy(v) for name, v in params.items()})
    adapter.export_adapter(str(path))
    ranks = sorted({v.shape[0] for name, v in params.items() if name.endswith(".lora_A")})
    return {
        "layers": len(params) // 2,
        "ranks": ranks,
        "parameters": int(sum(v.size for v in params.values())),
        "bytes": path.stat().st_size,
    }


register_lora_translations()
