"""Pass registry: kebab-case name -> pass class."""

from __future__ import annotations

import difflib

from modelfold.errors import ModelfoldError
from modelfold.passes.base import Pass

_REGISTRY: dict[str, type[Pass]] = {}


class UnknownPassError(ModelfoldError, ValueError):
    """A pipeline names a pass that is not registered."""


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make ``cls`` available to pipeline strings, recipes and the CLI."""
    if not cls.name or cls.name != cls.name.lower() or " " in cls.name:
        raise ValueError(f"pass name must be kebab-case, got {cls.name!r}")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"pass {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def get_pass(name: str) -> type[Pass]:
    _load_builtin_passes()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise UnknownPassError(f"unknown pass '{name}'{hint} (known: {', '.join(sorted(_REGISTRY))};"
                               " `modelfold passes` lists them)")
    return _REGISTRY[name]


def registered_passes() -> dict[str, type[Pass]]:
    _load_builtin_passes()
    return dict(sorted(_REGISTRY.items()))


def default_graph_passes(backend: str) -> list[type[Pass]]:
    """The graph passes ``backend``'s lowering applies by default (``default_for``), in their
    ``order``."""
    return sorted((cls for cls in registered_passes().values()
                   if backend in getattr(cls, "default_for", ())),
                  key=lambda cls: (cls.order, cls.name))


def _load_builtin_passes() -> None:
    # Every module of modelfold.passes is imported on first use (not at package import, so
    # `import modelfold` stays fast); a module defines its passes with @register_pass. Other
    # packages add passes through the "modelfold.passes" entry-point group.
    from modelfold.discovery import import_all

    import_all("modelfold.passes", group="modelfold.passes")
