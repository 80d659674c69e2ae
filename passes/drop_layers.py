"""``drop-layers``: remove whole transformer layers, chosen explicitly or by importance.

The remaining layers are renumbered (``layer_idx`` on attention modules, ``config.layer_types``,
``config.num_hidden_layers``) so the KV cache and every export follow the new depth.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from modelfold.errors import OptionError
from modelfold.ir.program import Program
from modelfold.passes.base import Pass, PassConfig, PreconditionError, option
from modelfold.passes.layer_importance import ANALYSIS_KEY
from modelfold.passes.registry import register_pass


@dataclass(frozen=True)
class DropLayersConfig(PassConfig):
    layers: tuple[int, ...] = option((), "explicit layer indices to remove, e.g. [3,7]")
    count: int = option(0, "how many layers to remove (with a strategy)")
    strategy: Literal["importance", "last", "random"] = option(
        "importance", "importance: the lowest layer-importance scores (run layer-importance "
        "first); last: the last layers; random: a seeded random choice")
    seed: int = option(0, "seed for strategy=random")

    def validate(self) -> None:
        if self.layers and self.count:
            raise OptionError("drop-layers takes either 'layers' or 'count', not both")
        if not self.layers and self.count < 1:
            raise OptionError("drop-layers needs 'layers=[i,...]' or 'count' >= 1; "
                             f"got count={self.count}")
        if any(i < 0 for i in self.layers):
            raise OptionError(f"drop-layers option 'layers' must be >= 0; got {list(self.layers)}")
        if len(set(self.layers)) != len(self.layers):
            raise OptionError(f"drop-layers option 'layers' repeats an index: {list(self.layers)}")


@register_pass
class DropLayers(Pass):
    """Remove transformer layers; the model keeps working with a shallower stack (lossy)."""

    name = "drop-layers"
    config_class = DropLayersConfig
    kind = "lossy"
    summary = "remove whole transformer layers (explicit, least important, last or random)"

    def requires(self, program: Program) -> None:
        n = program.arch.num_layers
        cfg = self.config
        wanted = len(cfg.layers) or cfg.count
        if wanted >= n:
            raise PreconditionError(f"drop-layers would remove {wanted} of {n} layers; "
                                    "at least one must remain")
        bad = [i for i in cfg.layers if i >= n]
        if bad:
            raise PreconditionError(f"drop-layers: layer indices {bad} out of range for a "
                                    f"{n}-layer model (0..{n - 1})")
        if not cfg.layers and cfg.strategy == "importance":
            analysis = program.analyses.get(ANALYSIS_KEY)
            if analysis is None:
                raise PreconditionError(
                    "drop-layers{strategy=importance} needs layer scores: put 'layer-importance' "
                    "before it in the pipeline, e.g. 'layer-importance,drop-layers{count=4}'")
            if len(analysis["scores"]) != n:
                raise PreconditionError("the layer-importance scores are stale (computed for "
                                        f"{len(analysis['scores'])} layers, the model has {n})")

    def choose(self, program: Program) -> list[int]:
        cfg, n = self.config, program.arch.num_layers
        if cfg.layers:
            return sorted(cfg.layers)
        if cfg.strategy == "last":
            return list(range(n - cfg.count, n))
        if cfg.strategy == "random":
            return sorted(random.Random(cfg.seed).sample(range(n), cfg.count))
        return sorted(program.analyses[ANALYSIS_KEY]["least_important_first"][:cfg.count])

    def run(self, program: Program) -> dict[str, Any]:
        drop = self.choose(program)
        before = program.arch.num_layers
        remove_layers(program.module, program.arch.layers, drop)
        return {"dropped": drop, "layers_before": before, "layers_after": before - len(drop)}


def remove_layers(module: nn.Module, layers_path: str, drop: list[int]) -> None:
    """Rebuild the layer ``ModuleList`` without ``drop`` and renumber what remains."""
    stack = module.get_submodule(layers_path)
    keep = [i for i in range(len(stack)) if i not in set(drop)]
    parent_path, _, attr = layers_path.rpartition(".")
    parent = module.get_submodule(parent_path) if parent_path else module
    setattr(parent, attr, nn.ModuleList([stack[i] for i in keep]))
    config = module.config
    config.num_hidden_layers = len(keep)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        config.layer_types = [layer_types[i] for i in keep]
    for new_index, layer in enumerate(module.get_submodule(layers_path)):
        for sub in layer.modules():
            if isinstance(getattr(sub, "layer_idx", None), int):
                sub.layer_idx = new_index
