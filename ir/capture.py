"""Capture a model into a ``torch.export.ExportedProgram`` with the backends' signature.

The graph is captured once, at the pre-decomposition level (``aten.linear`` stays one node), with
the signature of ``modelfold.ir.signature`` and named dynamic dims (batch, sequence,
past_sequence, total_sequence) shared by every input that has them.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.export import Dim, ExportedProgram

from modelfold.errors import ModelfoldError
from modelfold.ir.signature import (
    WRAPPED_PREFIX,
    Signature,
    example_inputs,
    exportable_experts,
    signature_module,
)


class CaptureError(ModelfoldError, RuntimeError):
    """``torch.export`` could not capture the model."""


def dynamic_shapes(signature: Signature) -> dict[str, object]:
    """``dynamic_shapes`` for ``torch.export``: every dim the signature names is
    ``Dim.DYNAMIC`` (its range inferred from the model, e.g. at most ``max_position_embeddings``
    tokens for BERT; an error if the model code specializes it).

    Inputs that share a dim (batch, sequence) are unified by the graph itself; the names come
    back through ``modelfold.ir.signature.Signature.dims``. torch.export traces with example
    sizes >= 2 and derives ranges from them (total_sequence >= 4); the captured graph is correct
    at the sizes a prefill (P = 0) and a decode step (S = 1) use (checked on every family), so
    graph modules made from it run without those range checks (``modelfold.ir.graph.runnable``).
    """
    shapes = {name: {axis: Dim.DYNAMIC for axis in signature.dims.get(name, {})}
              for name in signature.inputs}
    if signature.kind == "causal-lm":
        fixed = {n: shapes.pop(n) for n in signature.inputs[:3]}
        return {**fixed, "past": tuple(shapes[n] for n in signature.past_names)}
    return shapes


def capture(module: nn.Module, signature: Signature) -> ExportedProgram:
    """Export ``module`` behind ``signature`` at the pre-decomposition level.

    Raises:
        CaptureError: ``torch.export`` failed (the message names the model and the first line of
            the reason).
    """
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad(), exportable_experts(module):
            wrapper = signature_module(module, signature)
            args = example_inputs(module, signature)
            return torch.export.export(wrapper, args, dynamic_shapes=dynamic_shapes(signature),
                                       strict=False)
    except ModelfoldError:
        raise
    except Exception as exc:  # torch.export raises many unrelated types; name the model
        raise CaptureError(
            f"torch.export could not capture {type(module).__name__}: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    finally:
        module.train(was_training)


def owning_module(node: torch.fx.Node) -> str:
    """Module path of the model that produced ``node`` (last ``nn_module_stack`` entry), "" at
    top level or in the signature wrapper itself."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path, _ = list(stack.values())[-1]
    return _normalize(path)


def _normalize(path: str) -> str:
    # torch.export writes ModuleList entries as "layers.3", older versions as "layers[3]"; the
    # model sits under the signature wrapper's attribute
    path = path.replace("[", ".").replace("]", "").removeprefix("L['self'].")
    if path == WRAPPED_PREFIX.rstrip("."):
        return ""
    return path.removeprefix(WRAPPED_PREFIX)


__all__ = ["CaptureError", "capture", "dynamic_shapes", "owning_module"]
