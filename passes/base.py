"""The pass contract: a frozen config dataclass, a kebab-case name, ``requires`` and ``run``.

A pass's ``kind_for(program)`` tells the pass manager how to judge it on that program (the
class's ``kind`` is the default):

- ``analysis``: reads the program, writes results into ``program.analyses``, changes nothing
  (the manager checks that the logits are bit-identical);
- ``exact``: changes the program without changing its function (logits within float tolerance,
  or the run fails);
- ``lossy``: changes the function on purpose (the manager records logit SQNR, KL, top-1).

Its ``level`` says what it rewrites: ``module`` passes change the ``nn.Module`` (swap in dialect
layers, share parameters) and the program re-captures; ``graph`` passes (``GraphPass``) rewrite
the captured ``ExportedProgram`` with ``modelfold.ir.graph.GraphEditor`` and are replayed on every
later re-capture.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from modelfold.errors import ModelfoldError
from modelfold.ir.program import Program
from modelfold.options import Options, format_value, option

__all__ = ["GraphPass", "Pass", "PassConfig", "PassError", "PostconditionError",
           "PreconditionError", "option"]

if TYPE_CHECKING:
    from torch.export import ExportedProgram


class PassError(ModelfoldError, RuntimeError):
    """A pass could not run."""


class PreconditionError(PassError):
    """A pass's ``requires`` check failed (wrong model, missing analysis, bad ordering)."""


class PostconditionError(PassError):
    """A pass broke its contract (an exact pass changed the logits, an analysis changed weights)."""


@dataclass(frozen=True)
class PassConfig(Options):
    """Base class of pass options. Subclasses are frozen dataclasses with documented defaults.

    Validation goes in ``validate()`` and raises ``OptionError`` naming the option.
    """

    @classmethod
    def from_options(cls, options: dict[str, Any], *, pass_name: str = "",
                     where: str = "") -> PassConfig:
        """Build from raw options; errors name ``pass '<pass_name>'``."""
        return super().from_options(options,
                                    where=where or (f"pass '{pass_name}'" if pass_name else ""))


class Pass:
    """Base class of passes. Subclasses set ``name``, ``config_class``, ``kind`` and ``run``."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type[PassConfig]] = PassConfig
    kind: ClassVar[str] = "exact"  # "analysis" | "exact" | "lossy": the default of kind_for
    level: ClassVar[str] = "module"  # "module" | "graph"
    summary: ClassVar[str] = ""
    # An exact pass that evaluates the same function in another order (a sum of factors instead
    # of one product) may move the logits by float rounding that grows with their size: the
    # allowed change is ``exact_atol + exact_rtol * max|logits|``.
    exact_rtol: ClassVar[float] = 0.0
    # Whether the pass can run on a streamed model (``modelfold.streaming``): it changes one
    # decoder layer at a time through ``LayerwiseRunner.layers`` / ``each_layer`` and touches
    # nothing else of a layer once it moved on. ``stream_refusal`` vetoes particular options.
    streams: ClassVar[bool] = False

    def __init__(self, config: PassConfig | None = None, **options: Any):
        if config is not None and options:
            raise TypeError(f"{self.name}: pass either a config or keyword options, not both")
        if config is None:
            config = self.config_class.from_options(options, pass_name=self.name)
        elif not isinstance(config, self.config_class):
            raise TypeError(f"{self.name} expects a {self.config_class.__name__}, "
                            f"got {type(config).__name__}")
        self.config = config

    def kind_for(self, program: Program) -> str:
        """How the manager judges this pass on ``program`` (after ``requires`` passed): some
        passes are exact for some programs and options and lossy for others."""
        return self.kind

    def stream_refusal(self) -> str | None:
        """Why this configuration cannot stream (None: it can, where ``streams`` is set)."""
        return None

    def distribute_refusal(self) -> str | None:
        """Why this configuration cannot run over several ``torch.distributed`` ranks (None: it
        can). A pass that calibrates must split its samples and reduce its statistics
        (``modelfold.distributed``); one that does not say it does is refused."""
        from modelfold.passes.calibration import CalibrationConfig

        if isinstance(self.config, CalibrationConfig):
            return ("it calibrates, and its statistics are not reduced across ranks; run it in "
                    "one process (without --nproc / torchrun)")
        return None

    def requires(self, program: Program) -> None:
        """Raise ``PreconditionError`` if the pass cannot run on ``program``."""

    def run(self, program: Program) -> dict[str, Any]:
        """Transform or analyse ``program`` in place; return details for the report.

        A pass that skips part of the model returns them under ``"skipped"`` as
        ``[{"target": path, "reason": why}]``; the report lists every one.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        opts = ",".join(f"{k}={format_value(v)}" for k, v in self.config.to_dict().items())
        return f"{self.name}{{{opts}}}" if opts else self.name


class GraphPass(Pass):
    """A pass that rewrites the captured graph (``program.exported``), not the module.

    Subclasses implement ``rewrite``: a deterministic function of the program and a graph that
    returns the rewritten graph (built with ``modelfold.ir.graph.GraphEditor``) and details for
    the report. The program keeps the pass and replays it on every later re-capture, so a module
    pass after it does not undo it.
    """

    level: ClassVar[str] = "graph"
    # Backends whose lowering applies this pass by default (``("onnxruntime",)``), in ``order``.
    default_for: ClassVar[tuple[str, ...]] = ()
    order: ClassVar[int] = 0

    def rewrite(self, program: Program, ep: ExportedProgram) -> tuple[ExportedProgram,
                                                                        dict[str, Any]]:
        """Return ``(rewritten graph, details)``; ``ep`` itself is left unchanged."""
        raise NotImplementedError

    def run(self, program: Program) -> dict[str, Any]:
        return program.apply_graph_pass(self)
