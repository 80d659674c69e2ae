"""How dialect layers are described in a checkpoint and rebuilt empty when it loads.

A module that declares a layer class (``QuantLinear``, ``NMLinear``, ``LoraLinear`` ...) registers
it here, next to its definition::

    register_module_type(QuantLinear, describe_fn, build_fn)

``describe_fn(module)`` returns JSON-serialisable constructor facts; ``build_fn(facts)`` returns
an empty module with the same parameters and persistent buffers (names, shapes, dtypes). Its
values are overwritten by the checkpoint, and its children may be replaced by their own manifest
entries. ``modelfold.checkpoint`` reads this registry; a manifest entry names the Python module
that defines its type, which is imported (modelfold modules only) when the type is not known yet.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn


@dataclass(frozen=True)
class ModuleType:
    """How one module class is described in the manifest and rebuilt empty on load."""

    name: str
    cls: type[nn.Module]
    describe: Callable[[nn.Module], dict[str, Any]]
    build: Callable[[dict[str, Any]], nn.Module]


_MODULE_TYPES: dict[str, ModuleType] = {}


def register_module_type(cls: type[nn.Module], describe_fn: Callable[[nn.Module], dict[str, Any]],
                         build_fn: Callable[[dict[str, Any]], nn.Module], *,
                         name: str | None = None) -> None:
    """Teach checkpoints a module class that passes swap into models.

    Args:
        cls: the module class (matched exactly, not by subclass).
        describe_fn: ``module -> facts`` (JSON-serialisable constructor facts).
        build_fn: ``facts -> module`` with the same parameters and persistent buffers.
        name: the type name written into manifests (default ``cls.__name__``); keep it stable.

    Raises:
        ValueError: ``name`` is already registered for a different class.
    """
    name = name or cls.__name__
    existing = _MODULE_TYPES.get(name)
    if existing is not None and _qualified(existing.cls) != _qualified(cls):
        raise ValueError(f"checkpoint module type '{name}' is already registered for "
                         f"{_qualified(existing.cls)}; register {_qualified(cls)} with another "
                         "name=")
    _MODULE_TYPES[name] = ModuleType(name, cls, describe_fn, build_fn)


_REBUILD_HOOKS: list[Callable[[nn.Module], None]] = []


def register_rebuild_hook(fn: Callable[[nn.Module], None]) -> None:
    """Run ``fn(model)`` on every model a checkpoint rebuilds, after its modules are swapped in
    and before its tensors load: for structure that lives in the config and in module wiring
    rather than in module types (attention sharing)."""
    if fn not in _REBUILD_HOOKS:
        _REBUILD_HOOKS.append(fn)


def rebuild_hooks() -> list[Callable[[nn.Module], None]]:
    """The registered rebuild hooks (every dialect module imported first)."""
    load_dialects()
    return list(_REBUILD_HOOKS)


class StandardFormatError(ValueError):
    """A transformed model has no standard transformers format (the message says why)."""


@dataclass(frozen=True)
class StandardFormat:
    """A standard transformers checkpoint format that a dialect's modules can be written in.

    ``convert(model)`` returns ``(config, tensors, format name)``, None when the model has none of
    the dialect's modules, or raises ``StandardFormatError``; ``restore(model)`` swaps the
    dialect's modules back into a model loaded from such a checkpoint (found by ``marker``, a
    file written next to it) and returns how many it swapped.
    """

    name: str
    marker: str
    convert: Callable[[nn.Module], Any]
    restore: Callable[[nn.Module], int]


_STANDARD_FORMATS: dict[str, StandardFormat] = {}


def register_standard_format(name: str, marker: str, convert: Callable[[nn.Module], Any],
                             restore: Callable[[nn.Module], int]) -> None:
    """Teach ``save_checkpoint`` a standard format for a dialect's modules (see
    ``StandardFormat``)."""
    _STANDARD_FORMATS[name] = StandardFormat(name, marker, convert, restore)


def standard_formats() -> list[StandardFormat]:
    """Every registered standard format (every dialect module imported first)."""
    load_dialects()
    return list(_STANDARD_FORMATS.values())


def registered_module_types() -> dict[str, type[nn.Module]]:
    """Type name -> class of every module type checkpoints can describe and rebuild."""
    load_dialects()
    return {name: t.cls for name, t in sorted(_MODULE_TYPES.items())}


def type_for_class(cls: type) -> ModuleType | None:
    """The registered type of a class (exact match), or None."""
    return next((t for t in _MODULE_TYPES.values() if cls is t.cls), None)


def type_named(name: str, python_module: str = "") -> ModuleType | None:
    """The type registered as ``name``, importing ``python_module`` first if needed (only
    modules inside modelfold: a checkpoint never makes modelfold import other code)."""
    if name not in _MODULE_TYPES and python_module.split(".")[0] == "modelfold":
        with contextlib.suppress(ImportError):
            importlib.import_module(python_module)
    return _MODULE_TYPES.get(name)


def load_dialects() -> None:
    """Import every dialect module of ``modelfold.ir`` (each registers its layer types)."""
    from modelfold.discovery import import_all

    import_all("modelfold.ir")


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


__all__ = ["ModuleType", "StandardFormat", "StandardFormatError", "load_dialects",
           "rebuild_hooks", "register_module_type", "register_rebuild_hook",
           "register_standard_format", "registered_module_types", "standard_formats",
           "type_for_class", "type_named"]
