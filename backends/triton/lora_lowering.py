"""Triton lowering of ``LoraLinear`` (``modelfold.ir.lora``): the base op and the active adapter
branches become one kernel call.

``base(x) + sum_a s_a B_a A_a x`` is computed by the base format's kernel with a LoRA pair: one
adapter keeps its ``(A, B, scaling)``; several are concatenated along the rank with the scalings
folded into ``B``. A float base uses ``lora_linear`` (a GPT-2 ``Conv1D`` weight is transposed to
``[out, in]`` once); a ``W8A8Linear`` base keeps a separate ``lora_delta`` kernel. A layer with no
active unmerged adapter is left to the node lowerings (packed base) or to Inductor (float base).
A standalone ``lora_delta`` node becomes the ``lora_delta`` kernel.
"""

from __future__ import annotations

import torch

from modelfold.backends.triton.lowering import (
    TritonLowering,
    register_layer_lowering,
    register_node_lowering,
)
from modelfold.ir.graph import GraphRewriteError, layer_io
from modelfold.ir.lora import LoraLinear
from modelfold.ir.modules import is_conv1d, is_linear
from modelfold.ir.quant import QuantLinear, W8A8Linear
from modelfold.ir.sparse import NMLinear, NMQuantLinear


@torch.no_grad()
def lora_pair(layer: LoraLinear) -> tuple[torch.Tensor, torch.Tensor, float, int] | None:
    """One ``(A [r, in], B [out, r], scaling, adapters)`` for the active unmerged adapters of
    ``layer`` (several concatenated along the rank, scalings folded into B), or None."""
    names = [n for n in layer.active if n not in layer.merged]
    if not names:
        return None
    pairs = []
    for name in names:
        adapter = layer.adapters[name]
        a, b = adapter.effective()
        pairs.append((a.detach(), b.detach(), float(adapter.scaling)))
    if len(pairs) == 1:
        a, b, s = pairs[0]
        return a, b, s, 1
    return (torch.cat([a for a, _, _ in pairs], 0), torch.cat([b * s for _, b, s in pairs], 1),
            1.0, len(names))


# Packed base -> (the op it and its Triton kernel are called, kernel name, tensor arguments after x)
_PACKED_BASES = {QuantLinear: ("quant_linear", "quant", 4),
                 NMQuantLinear: ("nm_quant_linear", "nm_quant", 5),
                 NMLinear: ("nm_linear", "nm", 3)}


@register_layer_lowering(LoraLinear)
def _fuse(ctx: TritonLowering, path: str, layer: LoraLinear) -> None:
    pair = lora_pair(layer)
    base = layer.base_layer
    if pair is None:
        if is_linear(base):
            ctx.kernels[path] = "inductor (LoRA adapters inactive or merged)"
        return
    a_value, b_value, scaling, count = pair
    x, _base_out, out = layer_io(ctx.owned, path)
    base_nodes = [n for owner, items in ctx.owned.items()
                  if owner == f"{path}.base_layer" for _, n in items]
    a = ctx.tensor(f"{path}.lora_A_fused", a_value)
    b = ctx.tensor(f"{path}.lora_B_fused", b_value)
    ops, editor = ctx.ops, ctx.editor

    def base_call(target) -> torch.fx.Node:
        found = [n for n in base_nodes if n.target == target]
        if len(found) != 1:
            raise GraphRewriteError(f"{path}: expected one {target} node for its base layer, "
                                    f"found {len(found)}")
        return found[0]

    packed = next((entry for cls, entry in _PACKED_BASES.items() if type(base) is cls), None)
    if packed is not None:
        # the base's tensors, then the LoRA pair, then its integer attributes
        op_name, kind, tensors = packed
        q = base_call(getattr(torch.ops.modelfold, op_name).default).args
        new = editor.call(getattr(ops, op_name).default,
                          (x, *q[1:1 + tensors], a, b, scaling, *q[1 + tensors:]), near=out)
    elif isinstance(base, W8A8Linear):
        q = base_call(torch.ops.modelfold.w8a8_linear.default).args
        y = editor.call(ops.w8a8_linear.default, (x, *q[1:4]), near=out)
        delta = editor.call(ops.lora_delta.default, (x, a, b, scaling), near=out)
        new = editor.call(torch.ops.aten.add.Tensor, (y, delta), near=out)
        kind = "w8a8"
    elif is_conv1d(base):  # GPT-2 Conv1D stores [in, out]
        weight = ctx.tensor(f"{path}.base_layer.weight_t", base.weight.t())
        bias = None if base.bias is None else ctx.tensor(f"{path}.base_layer.bias_t", base.bias)
        new = editor.call(ops.lora_linear.default, (x, weight, bias, a, b, scaling), near=out)
        kind = "dense"
    elif isinstance(base, torch.nn.Linear):
        q = base_call(torch.ops.aten.linear.default).args
        bias = q[2] if len(q) > 2 else None
        new = editor.call(ops.lora_linear.default, (x, q[1], bias, a, b, scaling), near=out)
        kind = "dense"
    else:
        raise GraphRewriteError(f"{path}: no Triton kernel for a LoRA layer over a "
                                f"{type(base).__name__}")
    out.replace_all_uses_with(new)
    ctx.kernels[path] = (f"{kind}+lora(r={a_value.shape[0]}, {count} adapter"
                         f"{'s' if count > 1 else ''})")


@register_node_lowering("modelfold::lora_delta")
def _lora_delta(ctx: TritonLowering, node: torch.fx.Node) -> None:
    ctx.replace(node, ctx.ops.lora_delta.default, tuple(node.args), "lora_delta")
