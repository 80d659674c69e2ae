"""One way to select layers: ``TargetSpec`` patterns and ``select_layers``.

Every pass that acts on some layers of the stack (quantize, nm-sparsify, smooth-quant, lora,
sparsity-aware training) takes ``targets`` / ``exclude`` options of type ``TargetSpec`` and
selects with ``select_layers``: it walks the layer stack once, asks the pass's ``classify``
callback about each module (``SELECT``, ``Skip(reason)`` or ``None`` for "not a candidate"),
applies the patterns, refuses tied weights when the pass would untie them, and returns the
selected layers and every skipped one with its reason.

Pattern syntax (validated when the options are parsed, before any model is loaded):

- ``*`` or ``all-linear``: every candidate;
- ``re:<regex>``: module paths the regular expression matches (``re.search``);
- a glob with ``*``, ``?``, ``[`` or a ``.`` (``model.layers.1*.mlp.*``): matched against the
  whole module path (``fnmatch``);
- a bare name (``q_proj``): paths that end in ``.q_proj`` (as PEFT's ``target_modules``).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from modelfold.errors import ModelfoldError, OptionError
from modelfold.ir.architecture import Architecture
from modelfold.ir.tying import parameter_uses

EVERYTHING = ("*", "all-linear")


class TargetError(ModelfoldError, ValueError):
    """The target patterns do not fit the model (a pattern matches nothing, a tied weight)."""


class TargetSpec(tuple):
    """An ordered tuple of module-path patterns (see the module docstring for the syntax).

    Raises:
        OptionError: a pattern is empty or an invalid ``re:`` regular expression.
    """

    type_name = "list of patterns (*, all-linear, bare names, globs, re:<regex>)"

    def __new__(cls, patterns: Iterable[str] = (), *, where: str = "targets") -> TargetSpec:
        if isinstance(patterns, str):
            patterns = (patterns,)
        items = tuple(str(p).strip() for p in patterns)
        for p in items:
            if not p:
                raise OptionError(f"{where}: an empty pattern")
            if p.startswith("re:"):
                try:
                    re.compile(p[3:])
                except re.error as exc:
                    raise OptionError(f"{where}: pattern {p!r} is not a valid regex: "
                                      f"{exc}") from None
        return super().__new__(cls, items)

    @classmethod
    def from_option(cls, raw: Any, where: str) -> TargetSpec:
        """From a pipeline / CLI string (``q_proj`` or ``[q_proj,v_proj]``) or a YAML list."""
        if isinstance(raw, str):
            text = raw.strip()
            if text.startswith("[") != text.endswith("]"):
                raise OptionError(f"{where}: unbalanced brackets in {raw!r}")
            text = text.removeprefix("[").removesuffix("]").strip()
            items: list[Any] = [t.strip() for t in text.split(",")] if text else []
        elif isinstance(raw, (list, tuple)):
            items = list(raw)
        else:
            raise OptionError(f"{where} must be a pattern or a list of patterns; got {raw!r}")
        if any(not isinstance(i, str) for i in items):
            raise OptionError(f"{where} must be a list of strings; got {raw!r}")
        return cls(items, where=where)

    def to_json(self) -> list[str]:
        return list(self)

    def selects_everything(self) -> bool:
        return any(p in EVERYTHING for p in self)

    def matches(self, path: str) -> bool:
        """Whether any pattern matches ``path``."""
        return any(pattern_matches(p, path) for p in self)


def pattern_matches(pattern: str, path: str) -> bool:
    """Whether one pattern matches a module path."""
    if pattern in EVERYTHING:
        return True
    if pattern.startswith("re:"):
        return re.search(pattern[3:], path) is not None
    if any(c in pattern for c in "*?[."):
        return fnmatch.fnmatchcase(path, pattern)
    return path == pattern or path.endswith("." + pattern)


SELECT = "select"


@dataclass(frozen=True)
class Skip:
    """A candidate the pass leaves as it is, and why (reported, never silent)."""

    reason: str


Verdict = Any  # SELECT, a Skip, or None (not a candidate: look inside it)
Classify = Callable[[str, nn.Module], Verdict]


@dataclass
class Selection:
    """The layers a pass acts on, grouped by layer index, and the skipped ones with reasons."""

    layers: dict[int, dict[str, nn.Module]] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)

    def items(self) -> list[tuple[str, nn.Module]]:
        """``(path, module)`` of every selected layer in stack order."""
        return [item for index in sorted(self.layers) for item in self.layers[index].items()]

    def __len__(self) -> int:
        return sum(len(v) for v in self.layers.values())


def select_layers(module: nn.Module, arch: Architecture, targets: TargetSpec,
                  exclude: TargetSpec, classify: Classify, *, what: str,
                  refuse_tied: bool = True, require_any: bool = False) -> Selection:
    """Select the modules of the layer stack that ``classify`` accepts and the patterns name.

    Args:
        module: the model.
        arch: its architecture description (where the layer stack, MoE experts and router are).
        targets, exclude: the pass's patterns.
        classify: ``(path, module) -> SELECT | Skip(reason) | None``; ``None`` means "not a
            candidate" (the walk looks inside it); a decided module's children are not visited.
        what: the pass's name, for messages.
        refuse_tied: raise when a selected layer's weight is shared with another layer
            (tie-layers): changing it would give every depth its own copy.
        require_any: raise when the patterns leave nothing selected.

    Raises:
        TargetError: a pattern matches no candidate, a tied weight is selected
            (``refuse_tied``), or nothing is selected (``require_any``).
    """
    stack = module.get_submodule(arch.layers)
    experts = arch.layer.mlp_proj.get("experts")
    router = arch.layer.mlp_proj.get("router")
    candidates: list[str] = []
    selection = Selection()

    def wanted(path: str) -> bool:
        return targets.matches(path) and not exclude.matches(path)

    for index, layer in enumerate(stack):
        prefix = f"{arch.layers}.{index}."
        decided: list[str] = []
        for rel, sub in layer.named_modules():
            if not rel or any(rel.startswith(d + ".") for d in decided):
                continue
            path = prefix + rel
            if experts and rel == experts:
                decided.append(rel)
                candidates.append(path)
                if wanted(path):
                    selection.skipped.append({"target": path, "reason": (
                        f"MoE experts are batched 3-D tensors, not linear layers; {what} "
                        "leaves them as they are")})
                continue
            verdict = classify(path, sub)
            if verdict is None:
                continue
            decided.append(rel)
            candidates.append(path)
            if not wanted(path):
                continue
            if router and rel == router:
                selection.skipped.append({"target": path, "reason": (
                    f"MoE router: {what} leaves the expert choice as it is")})
            elif isinstance(verdict, Skip):
                selection.skipped.append({"target": path, "reason": verdict.reason})
            else:
                selection.layers.setdefault(index, {})[path] = sub
    example = candidates[0] if candidates else "(none found)"
    for option_name, patterns in (("targets", targets), ("exclude", exclude)):
        for pattern in patterns:
            if pattern not in EVERYTHING and \
                    not any(pattern_matches(pattern, p) for p in candidates):
                raise TargetError(f"{what} option '{option_name}': pattern {pattern!r} matches no "
                                f"layer {what} can act on (they are named like '{example}')")
    if refuse_tied:
        uses = parameter_uses(module)
        for path, sub in selection.items():
            weight = getattr(sub, "weight", None)
            if isinstance(weight, torch.Tensor) and uses[id(weight)] > 1:
                raise TargetError(
                    f"{what}: {path} shares its weight with other layers (tie-layers); {what} "
                    "would give every depth its own copy and undo the sharing. This is not "
                    f"supported yet: run {what} on an untied model")
    if require_any and not len(selection):
        raise TargetError(f"{what}: the targets minus the exclusions leave no layer to act on")
    return selection


__all__ = ["SELECT", "Selection", "Skip", "TargetError", "TargetSpec", "pattern_matches", "select_layers"]
