"""Capture a model into a ``torch.export.ExportedProgram`` with dynamic batch and sequence dims."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.export import Dim, ExportedProgram


class CaptureError(RuntimeError):
    """``torch.export`` could not capture the model."""


@dataclass
class ExportSpec:
    """What the model is called with when captured.

    Attributes:
        example_inputs: keyword inputs, e.g. ``{"input_ids": LongTensor[2, 8]}``. Every dynamic
            dim needs an example size >= 2 (a size of 1 gets specialized by torch.export).
        dynamic_dims: per input, the dims that are dynamic, e.g. ``{"input_ids": (0, 1)}``.
        static_kwargs: non-tensor keyword arguments (``use_cache=False`` for decoders).
    """

    example_inputs: dict[str, torch.Tensor]
    dynamic_dims: dict[str, tuple[int, ...]] = field(default_factory=dict)
    static_kwargs: dict[str, object] = field(default_factory=dict)

    @classmethod
    def for_model(cls, module: nn.Module, kind: str, *, batch: int = 2, seq: int = 8) -> ExportSpec:
        """The default spec: ``input_ids [batch, seq]`` (and an attention mask for encoders)."""
        if batch < 2 or seq < 2:
            raise ValueError(f"example batch and seq must be >= 2 (got {batch}, {seq}): "
                             "torch.export specializes dynamic dims whose example size is 1")
        vocab = getattr(getattr(module, "config", None), "vocab_size", 2)
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (batch, seq), generator=gen)  # [B, S]
        if kind == "encoder":
            return cls({"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                       {"input_ids": (0, 1), "attention_mask": (0, 1)})
        return cls({"input_ids": ids}, {"input_ids": (0, 1)}, {"use_cache": False})

    def dynamic_shapes(self) -> dict:
        shapes: dict[str, object] = {
            name: {d: Dim.DYNAMIC for d in self.dynamic_dims.get(name, ())}
            for name in self.example_inputs}
        shapes.update({name: None for name in self.static_kwargs})
        return shapes


def capture(module: nn.Module, spec: ExportSpec) -> ExportedProgram:
    """Export ``module`` at the pre-decomposition level (``aten.linear`` stays one node)."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            return torch.export.export(
                module, (), kwargs={**spec.example_inputs, **spec.static_kwargs},
                dynamic_shapes=spec.dynamic_shapes(), strict=False)
    except Exception as exc:  # torch.export raises many unrelated types; name the model
        raise CaptureError(
            f"torch.export could not capture {type(module).__name__}: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    finally:
        module.train(was_training)


def owning_module(node: torch.fx.Node) -> str:
    """Module path that produced ``node`` (last ``nn_module_stack`` entry), "" at top level."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path, _ = list(stack.values())[-1]
    return _normalize(path)


def _normalize(path: str) -> str:
    # torch.export writes ModuleList entries as "layers.3", older versions as "layers[3]"
    return path.replace("[", ".").replace("]", "").removeprefix("L['self'].")
