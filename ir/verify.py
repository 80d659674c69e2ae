"""IR verification, run by the pass manager after every pass and by the backends before lowering.

A pass must leave the program in a state that (1) still matches its architecture description,
(2) keeps the KV-cache bookkeeping consistent with the layer order, (3) holds only finite
parameters, and (4) captures with ``torch.export`` into a well-formed graph with the program's
signature: the placeholders and outputs the backends expect, a graph signature that agrees with
the placeholders and the state dict, and only ATen or registered dialect ops.

``verify_graph`` checks (4) on a given ``ExportedProgram`` (the backends call it on a graph
a lowering step produced) and records it as the program's ``verified_graph``: the object a
backend then lowers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind

from modelfold.errors import ModelfoldError

if TYPE_CHECKING:
    from modelfold.ir.program import Program


class VerificationError(ModelfoldError, RuntimeError):
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
    if capture and not found:
        try:
            ep = program.exported
        except ModelfoldError as exc:  # a capture failure is a verification failure
            found.append(f"the program no longer captures: {exc}")
        else:
            found += graph_problems(program, ep)
    return found


def graph_problems(program: Program, ep: ExportedProgram) -> list[str]:
    """Problems of a captured (or rewritten) graph against the program's signature."""
    found: list[str] = []
    try:
        ep.graph.lint()
    except Exception as exc:  # fx raises RuntimeError / AssertionError for a malformed graph
        found.append(f"the graph is malformed: {exc}")
        return found
    signature = program.signature
    specs = ep.graph_signature.input_specs
    placeholders = [n.name for n in ep.graph.nodes if n.op == "placeholder"]
    if [s.arg.name for s in specs] != placeholders:
        found.append("the graph signature's inputs do not match the graph's placeholders")
    user_inputs = [s for s in specs if s.kind == InputKind.USER_INPUT]
    if len(user_inputs) != len(signature.inputs):
        found.append(f"the graph takes {len(user_inputs)} inputs; the signature has "
                     f"{len(signature.inputs)} ({', '.join(signature.inputs[:4])}, ...)")
    outputs = ep.graph_signature.output_specs
    if len(outputs) != len(signature.outputs):
        found.append(f"the graph returns {len(outputs)} outputs; the signature has "
                     f"{len(signature.outputs)}")
    for spec in specs:
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER) and \
                spec.target not in ep.state_dict and spec.persistent is not False:
            found.append(f"lifted tensor {spec.target} is not in the state dict")
        elif spec.kind == InputKind.CONSTANT_TENSOR and spec.target not in ep.constants:
            found.append(f"constant {spec.target} is missing")
    for node in ep.graph.nodes:
        if node.op == "call_function" and "val" not in node.meta:
            found.append(f"node {node.name} ({node.target}) has no meta['val'] (shape and dtype)")
            break
    return found


def verify(program: Program, *, capture: bool = True) -> None:
    """Raise ``VerificationError`` listing every problem, if any; on success with ``capture``,
    ``program.verified_graph`` is the graph that was checked."""
    found = problems(program, capture=capture)
    if found:
        raise VerificationError("IR verification failed: " + "; ".join(found))
    if capture:
        program.verified_graph = program.exported


def verify_graph(program: Program, ep: ExportedProgram) -> ExportedProgram:
    """Check a graph derived from ``program`` (a lowering step's output) and record it as the
    program's verified graph; returns ``ep``."""
    found = graph_problems(program, ep)
    if found:
        raise VerificationError("IR verification failed: " + "; ".join(found))
    program.verified_graph = ep
    return ep


__all__ = ["VerificationError", "graph_problems", "problems", "verify", "verify_graph"]
