"""Triton lowerings of the quantization dialect ops (``modelfold.ir.quant``): each op becomes the
``modelfold_triton`` op of the same name, reading the same MatMulNBits-layout tensors."""

from __future__ import annotations

import torch

from modelfold.backends.triton.lowering import TritonLowering, register_node_lowering


@register_node_lowering("modelfold::quant_linear")
def _quant_linear(ctx: TritonLowering, node: torch.fx.Node) -> None:
    x, qweight, scales, zero_points, bias, in_features, bits, block_size = node.args
    ctx.replace(node, ctx.ops.quant_linear.default,
                (x, qweight, scales, zero_points, bias, None, None, 1.0, in_features, bits,
                 block_size), "quant")


@register_node_lowering("modelfold::w8a8_linear")
def _w8a8_linear(ctx: TritonLowering, node: torch.fx.Node) -> None:
    ctx.replace(node, ctx.ops.w8a8_linear.default, tuple(node.args), "w8a8")


@register_node_lowering("modelfold::quant_embedding")
def _quant_embedding(ctx: TritonLowering, node: torch.fx.Node) -> None:
    ctx.replace(node, ctx.ops.quant_embedding.default, tuple(node.args), "quant_embedding")
