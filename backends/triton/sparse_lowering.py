"""Triton lowerings of the N:M sparsity dialect ops (``modelfold.ir.sparse``): kernels that read
the kept values (or codes) and the packed positions directly."""

from __future__ import annotations

import torch

from modelfold.backends.triton.lowering import TritonLowering, register_node_lowering


@register_node_lowering("modelfold::nm_linear")
def _nm_linear(ctx: TritonLowering, node: torch.fx.Node) -> None:
    x, values, indices, bias, in_features, n, m = node.args
    ctx.replace(node, ctx.ops.nm_linear.default,
                (x, values, indices, bias, None, None, 1.0, in_features, n, m), "nm")


@register_node_lowering("modelfold::nm_quant_linear")
def _nm_quant_linear(ctx: TritonLowering, node: torch.fx.Node) -> None:
    x, codes, indices, scales, zero_points, bias, in_features, bits, block_size, n, m = node.args
    ctx.replace(node, ctx.ops.nm_quant_linear.default,
                (x, codes, indices, scales, zero_points, bias, None, None, 1.0, in_features, bits,
                 block_size, n, m), "nm_quant")
