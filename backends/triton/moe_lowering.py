"""Triton lowerings of the mixture-of-experts dialect ops (``modelfold.ir.moe``): the routed
experts on the grouped kernels of ``modelfold.kernels.moe`` (tokens grouped by expert, each
program reading one expert's weights; float or MatMulNBits-layout int4)."""

from __future__ import annotations

import torch

from modelfold.backends.triton.lowering import TritonLowering, register_node_lowering


@register_node_lowering("modelfold::moe")
def _moe(ctx: TritonLowering, node: torch.fx.Node) -> None:
    ctx.replace(node, ctx.ops.moe.default, tuple(node.args), "moe")


@register_node_lowering("modelfold::quant_moe")
def _quant_moe(ctx: TritonLowering, node: torch.fx.Node) -> None:
    ctx.replace(node, ctx.ops.quant_moe.default, tuple(node.args), "quant_moe")
