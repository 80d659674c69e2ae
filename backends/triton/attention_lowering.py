"""Triton-backend lowering of ``modelfold::attention`` (``fuse-attention``): the op on
``scaled_dot_product_attention`` (``modelfold_triton::attention``), whose CUDA kernels read the
grouped K/V without expanding them."""

from __future__ import annotations

import torch

from modelfold.backends.triton.lowering import TritonLowering, register_node_lowering


@register_node_lowering("modelfold::attention")
def _attention(ctx: TritonLowering, node: torch.fx.Node) -> None:
    ctx.replace(node, ctx.ops.attention.default, tuple(node.args), "sdpa")
