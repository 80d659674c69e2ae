"""Module surgery and the Conv1D-aware linear view: the helpers every pass uses to find, read,
write and replace layers.

GPT-2's ``Conv1D`` is a linear layer that stores its weight ``[in, out]`` (``nn.Linear``: ``[out,
in]``). Everything in modelfold reads and writes weights as ``[out, in]`` through
``linear_weight`` / ``set_linear_weight`` / ``add_to_linear_weight``, so the transpose lives here
only.
"""

from __future__ import annotations

import torch
from torch import nn


def is_conv1d(module: nn.Module) -> bool:
    """A transformers ``Conv1D`` (GPT-2): a linear layer with its weight stored ``[in, out]``."""
    return type(module).__name__ == "Conv1D"


def is_linear(module: nn.Module) -> bool:
    """A float linear layer: ``nn.Linear`` or GPT-2's ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a linear-like layer (float, packed or wrapped)."""
    if is_conv1d(module):
        k, n = module.weight.shape
        return int(k), int(n)
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features)
    raise TypeError(f"{type(module).__name__} is not a linear layer")


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as ``[out, in]`` (a view: a ``Conv1D``'s ``[in, out]`` transposed)."""
    return from_storage(module, module.weight)


def to_storage(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """An ``[out, in]`` tensor in the layout ``module`` stores its weight in."""
    return weight.t() if is_conv1d(module) else weight


def from_storage(module: nn.Module, stored: torch.Tensor) -> torch.Tensor:
    """A tensor in ``module``'s weight layout as ``[out, in]``."""
    return stored.t() if is_conv1d(module) else stored


def set_linear_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Write an ``[out, in]`` weight into ``module``'s weight tensor (in place)."""
    module.weight.data.copy_(to_storage(module, weight))


def add_to_linear_weight(module: nn.Module, delta: torch.Tensor) -> None:
    """``W += delta`` for an ``[out, in]`` ``delta`` (in place, in the weight's dtype)."""
    w = module.weight
    w.data += to_storage(module, delta).to(w.dtype)


def scale_input_channels(module: nn.Module, scale: torch.Tensor) -> None:
    """Multiply input channel ``j`` of the weight by ``scale[j]`` (in place)."""
    if is_conv1d(module):
        module.weight.data.mul_(scale[:, None])
    else:
        module.weight.data.mul_(scale)


def new_linear(kind: str, in_features: int, out_features: int, *, bias: bool) -> nn.Module:
    """An empty float linear layer of ``kind`` (``Linear`` or ``Conv1D``)."""
    if kind == "Conv1D":
        from transformers.pytorch_utils import Conv1D

        layer = Conv1D(out_features, in_features)
        if not bias:
            layer.bias = None
        return layer
    return nn.Linear(in_features, out_features, bias=bias)


def replace_module(root: nn.Module, path: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at ``path`` inside ``root``; returns the module that was there."""
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    old = getattr(parent, name)
    setattr(parent, name, new)
    return old


__all__ = ["add_to_linear_weight", "from_storage", "is_conv1d", "is_linear", "linear_shape", "linear_weight",
           "new_linear", "replace_module", "scale_input_channels", "set_linear_weight",
           "to_storage"]
