"""Triton-backend lowering of ``modelfold::attention`` (``fuse-attention``) and of
``modelfold::attend`` (attention shared across layers): the ops on
``scaled_dot_product_attention`` (``modelfold_triton::attention`` / ``attend``), whose CUDA
kernels read the grouped K/V without expanding them. ``modelfold::cache_write`` (a score-sharing
layer's values) stays the dialect op: one scatter, which Inductor runs as it is."""

from __future__ import annotations

import torch

from modelfold.backends.triton.lowering import TritonLowering, register_node_lowering


@register_node_lowering("modelfold::attention")
def _attention(ctx: TritonLowering, node: torch.fx.Node) -> None:
    ctx.replace(node, ctx.ops.attention.default, tuple(node.args), "sdpa")


@register_node_lowering("modelfold::attend")
def _attend(ctx: TritonLowering, node: torch.fx.Node) -> None:
    ctx.replace(node, ctx.ops.attend.default, tuple(node.args), "sdpa")
