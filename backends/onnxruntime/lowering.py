"""Export steps that the dialects' lowering modules add to the ONNX Runtime backend.

``export_onnx`` lowers the Program's verified ``ExportedProgram``. A dialect whose export needs
more than an op translation (LoRA adapter modes, N:M storage modes, MatMulNBits options)
subclasses ``Lowering`` in its own ``*_lowering.py`` module and registers it with
``@register_lowering``; the exporter instantiates every registered lowering for each export, in
``order``, and calls its hooks:

- ``rewrite(ep)``: a graph step before ``torch.onnx.export`` (built with
  ``modelfold.ir.graph.GraphEditor``; the result is verified and becomes the graph that is
  lowered);
- ``context()``: a context manager around ``torch.onnx.export`` (options the translations read);
- ``edit_onnx(model)``: the unoptimized ONNX graph (an ``onnx.ModelProto`` loaded without its
  external data, edited in place; the exporter loads and saves it once for all lowerings),
  before ONNX Runtime's optimizer;
- ``disabled_optimizers()``: ONNX Runtime graph transformers to skip offline;
- ``finish(out_dir)``: the optimized artifact (write side files, check what the optimizer kept);
- ``parity(out_dir)``: a parity check that replaces the default one (None: the default runs).

``facts`` (if not empty) go to the manifest under the lowering's ``name``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import onnx
    from torch.export import ExportedProgram

    from modelfold.backends.onnxruntime.options import ExportOptions
    from modelfold.ir.program import Program

_LOWERINGS: dict[str, type[Lowering]] = {}


class Lowering:
    """One dialect's part of an ONNX Runtime export (see the module docstring)."""

    name: ClassVar[str] = ""
    order: ClassVar[int] = 0

    def __init__(self, program: Program, options: ExportOptions):
        self.program = program
        self.options = options
        self.facts: dict[str, Any] = {}

    def rewrite(self, ep: ExportedProgram) -> ExportedProgram:
        return ep

    def context(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def edit_onnx(self, model: onnx.ModelProto) -> None:
        pass

    def disabled_optimizers(self) -> list[str]:
        return []

    def finish(self, out_dir: Path) -> None:
        pass

    def parity(self, out_dir: Path) -> dict[str, Any] | None:
        return None


def register_lowering(cls: type[Lowering]) -> type[Lowering]:
    """Class decorator: run ``cls`` in every ONNX Runtime export."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a name")
    _LOWERINGS[cls.name] = cls
    return cls


def lowerings() -> list[type[Lowering]]:
    """Every registered lowering, in ``order`` (the backend's ``*_lowering`` modules first)."""
    from modelfold.backends.onnxruntime.translations import load_lowerings

    load_lowerings()
    return sorted(_LOWERINGS.values(), key=lambda c: (c.order, c.name))


__all__ = ["Lowering", "lowerings", "register_lowering"]
