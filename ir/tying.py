"""Which tensors a module holds under several names (tied embeddings, layer tying)."""

from __future__ import annotations

from collections import Counter

from torch import nn


def parameter_names(module: nn.Module) -> dict[int, list[str]]:
    """``id(parameter)`` -> every name it appears under, in registration order."""
    names: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return names


def parameter_uses(module: nn.Module) -> Counter:
    """``id(parameter)`` -> how many names share it (1 for an untied tensor)."""
    return Counter({key: len(names) for key, names in parameter_names(module).items()})


def tied_groups(module: nn.Module) -> list[list[str]]:
    """Names that share one tensor, for every tensor that appears under several names."""
    return [names for names in parameter_names(module).values() if len(names) > 1]


__all__ = ["parameter_names", "parameter_uses", "tied_groups"]
