"""IR verification, run by the pass manager after every pass.

A pass must leave the program in a state that (1) still matches its architecture description,
(2) keeps the KV-cache bookkeeping consistent with the layer order, (3) holds only finite
parameters, and (4) still captures with ``torch.export`` into a well-formed graph.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from modelfold.ir.program import Program


class VerificationError(RuntimeError):
    """The program is not in a valid state after a pass."""


def problems(program: Program, *, capture: bool = True) -> list[str]:
    """Every problem found, as a sentence; an empty list means the program verifies."""
    found: list[str] = []
    arch, config = program.arch, program.module.config
    layers = program.module.get_submodule(arch.layers)
    if len(layers) != config.num_hidden_layers:
        found.append(f"config.num_hidden_layers={config.num_hidden_layers} but `{arch.layers}` "
                     f"holds {len(layers)} layers")
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and len(layer_types) != len(layers):
        found.append(f"config.layer_types has {len(layer_types)} entries for {len(layers)} layers")
    if arch.kind == "causal-lm":
        for i, layer in enumerate(layers):
            for name, sub in layer.named_modules():
                idx = getattr(sub, "layer_idx", None)
                if isinstance(idx, int) and idx != i:
                    found.append(f"`{arch.layers}.{i}.{name}`.layer_idx={idx}: the KV cache "
                                 f"would read layer {idx}'s entry")
                    break
    for name, p in program.module.named_parameters():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            found.append(f"parameter `{name}` holds NaN or inf")
    if capture:
        try:
            ep = program.exported
            ep.graph.lint()
        except Exception as exc:  # a capture failure is a verification failure
            found.append(f"the program no longer captures: {exc}")
    return found


def verify(program: Program, *, capture: bool = True) -> None:
    """Raise ``VerificationError`` listing every problem, if any."""
    found = problems(program, capture=capture)
    if found:
        raise VerificationError("IR verification failed: " + "; ".join(found))
