"""Layer-by-layer (sequential) calibration: each layer sees the outputs of the layers before it,
as already transformed.

GPTQ, AWQ, Wanda and SparseGPT all work on one transformer layer at a time: collect statistics of
the layer's inputs, change the layer's weights, run the changed layer to produce the next layer's
inputs. Only one layer's activations are held at a time, and the error a quantized layer makes is
seen (and compensated) by the layers after it.

    runner = LayerwiseRunner(program, ids, batch_size=8)
    for index, layer in runner.layers():
        with runner.collect(layer, hooks):   # statistics of this layer's inputs
            runner.run_layer(index)
        ...change the layer...
        runner.advance(index)                # inputs of the next layer, through the changed one

The keyword arguments every layer receives (attention masks, rotary position embeddings, which
can differ per layer: Gemma 2/3 alternate sliding-window and global attention) are recorded once,
in a forward pass where every layer is replaced by a pass-through recorder, so no layer is
computed twice.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from modelfold.ir.program import Program

_DROP_KWARGS = ("past_key_values", "past_key_value", "layer_past", "use_cache", "cache_position")


class _Recorder(nn.Module):
    """Stands in for a layer during the recording pass: stores its inputs, passes them through."""

    def __init__(self, index: int, sink: list[list[tuple]], first_inputs: list,
                 tuple_output: bool):
        super().__init__()
        self.index, self.sink, self.first_inputs = index, sink, first_inputs
        self.tuple_output = tuple_output

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = kwargs.pop("hidden_states") if "hidden_states" in kwargs else args[0]
        rest = args[1:] if args and args[0] is hidden else args
        kept = {k: v for k, v in kwargs.items() if k not in _DROP_KWARGS}
        self.sink[self.index].append((rest, kept))
        if self.index == 0:
            self.first_inputs.append(hidden)
        return (hidden,) if self.tuple_output else hidden


class LayerwiseRunner:
    """Runs calibration batches through a model's transformer layers one layer at a time.

    Args:
        program: the model.
        ids: calibration token ids ``[N, S]``.
        batch_size: sequences per forward pass.
        desc: label for progress bars.
    """

    def __init__(self, program: Program, ids: torch.Tensor, *, batch_size: int = 8,
                 desc: str = "calibration"):
        self.program = program
        self.desc = desc
        self.stack: nn.ModuleList = program.module.get_submodule(program.arch.layers)
        self.batches = [ids[i:i + batch_size] for i in range(0, len(ids), batch_size)]
        # per layer, per batch: (positional args after the hidden states, keyword args)
        self.kwargs: list[list[tuple[tuple, dict[str, Any]]]] = [[] for _ in self.stack]
        self.hidden: list[torch.Tensor] = []
        self.tuple_output = self._layer_returns_tuple()
        self._record()

    # -- recording ---------------------------------------------------------------------------
    def _layer_returns_tuple(self) -> bool:
        """Whether layers return ``(hidden, ...)`` (GPT-2, OPT, BERT) or a bare tensor (Llama)."""
        captured: dict[str, Any] = {}

        def hook(module, args, kwargs, output):
            captured["tuple"] = isinstance(output, (tuple, list))
            raise _Stop

        handle = self.stack[0].register_forward_hook(hook, with_kwargs=True)
        try:
            self.program.module_logits(self.batches[0][:1, :8])
        except _Stop:
            pass
        finally:
            handle.remove()
        return captured.get("tuple", False)

    @torch.no_grad()
    def _record(self) -> None:
        originals = list(self.stack)
        for i in range(len(originals)):
            self.stack[i] = _Recorder(i, self.kwargs, self.hidden, self.tuple_output)
        try:
            for batch in self.batches:
                self.program.module_logits(batch)
        finally:
            for i, layer in enumerate(originals):
                self.stack[i] = layer

    # -- running -----------------------------------------------------------------------------
    def layers(self) -> Iterator[tuple[int, nn.Module]]:
        """``(index, layer)`` in order, with a progress bar."""
        for i in tqdm(range(len(self.stack)), desc=self.desc, unit="layer", leave=False):
            yield i, self.stack[i]

    def inputs(self) -> list[torch.Tensor]:
        """The current layer's input hidden states, one tensor ``[B, S, D]`` per batch."""
        return self.hidden

    @torch.no_grad()
    def run_layer(self, index: int, layer: nn.Module | None = None, *,
                  batches: slice = slice(None)) -> list[torch.Tensor]:
        """Outputs of layer ``index`` (or a stand-in ``layer``) on the current inputs.

        ``batches`` selects a subset of the calibration batches (all by default).
        """
        layer = self.stack[index] if layer is None else layer
        outputs = []
        for hidden, (args, kwargs) in zip(self.hidden[batches], self.kwargs[index][batches]):
            out = layer(hidden, *args, **kwargs)
            outputs.append(out[0] if isinstance(out, (tuple, list)) else out)
        return outputs


    def advance(self, index: int) -> None:
        """Replace the inputs by layer ``index``'s outputs (through its current weights)."""
        self.hidden = self.run_layer(index)

    @contextmanager
    def collect(self, modules: dict[str, nn.Module],
                fn: Callable[[str, nn.Module, torch.Tensor, torch.Tensor], None]):
        """Call ``fn(name, module, input, output)`` on every forward of the given modules."""
        handles = []
        for name, module in modules.items():
            def hook(mod, args, output, name=name):
                fn(name, mod, args[0], output)
            handles.append(module.register_forward_hook(hook))
        try:
            yield
        finally:
            for h in handles:
                h.remove()


class _Stop(Exception):
    pass


__all__ = ["LayerwiseRunner"]
