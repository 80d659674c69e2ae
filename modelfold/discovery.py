"""Finding the modules that register passes, dialect module types and lowerings.

Passes, ONNX translations and Triton lowerings register themselves where they are defined (a
decorator or a call at import). What is left is importing those modules: ``import_all`` imports
every module of a package whose name ends with ``suffix`` (so adding a file is enough; no list to
keep), plus the modules third-party packages declare under the entry-point ``group``.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import pkgutil

_DONE: set[tuple[str, str]] = set()


def import_all(package: str, *, suffix: str = "", group: str | None = None) -> None:
    """Import every module ``package.<name>`` with ``name.endswith(suffix)`` (not starting with
    ``_``), then every entry point of ``group``; each (package, suffix) only once."""
    key = (package, suffix)
    if key in _DONE:
        return
    pkg = importlib.import_module(package)
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.endswith(suffix) and not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")
    if group:
        for entry in importlib.metadata.entry_points(group=group):
            entry.load()
    _DONE.add(key)


__all__ = ["import_all"]
