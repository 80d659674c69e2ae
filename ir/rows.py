"""Linear ops whose weights are stored by output feature: outputs can be concatenated.

Two linears that read the same input (q/k/v, gate/up) compute one linear with their weights
concatenated along the output features, if each weight tensor is stored with one slice per
output feature along some axis (``nn.Linear``'s ``[N, K]``; MatMulNBits' ``qweight [N, kb,
blob]`` / ``scales [N, kb]`` / ``zero_points [N, ...]``; N:M's kept values and packed indices
``[N, ...]``; W8A8's ``qweight_t [K, N]`` along axis 1). Each dialect module registers its ops
here (``register_row_wise``); the ``fuse-projections`` pass reads this table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RowWise:
    """How an op's arguments split by output feature.

    Attributes:
        tensors: argument index -> the axis its output features run along (the weights, scales,
            zero points ...); an argument that is None in one call must be None in all.
        bias: index of the optional bias argument ``[N]`` (None: no bias argument).
    """

    tensors: dict[int, int]
    bias: int | None = None


_ROW_WISE: dict[object, RowWise] = {}


def register_row_wise(op: object, tensors: dict[int, int], bias: int | None = None) -> None:
    """Declare that ``op`` (an ``OpOverload``) is a linear whose arguments ``tensors`` hold one
    slice per output feature (``{index: axis}``); the other arguments (besides the input, 0, and
    ``bias``) must be equal for two calls to be concatenated."""
    _ROW_WISE[op] = RowWise(dict(tensors), bias)


def row_wise(op: object) -> RowWise | None:
    """The row-wise description of ``op`` (None when its outputs cannot be concatenated)."""
    return _ROW_WISE.get(op)


register_row_wise(torch.ops.aten.linear.default, {1: 0}, bias=2)

__all__ = ["RowWise", "register_row_wise", "row_wise"]
