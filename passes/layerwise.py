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

from modelfold.distributed import my_batches
from modelfold.ir.program import Program

_DROP_KWARGS = ("past_key_values", "past_key_value", "layer_past", "use_cache", "cache_position")


class _Recorder(nn.Module):
    """Stands in for a layer during the recording pass: stores its inputs, passes them through."""

    def __init__(self, index: int, sink: list[list[tuple]], first_inputs: list,
                 tuple_output: bool, last: bool = False):
        super().__init__()
        self.index, self.sink, self.first_inputs = index, sink, first_inputs
        self.tuple_output, self.last = tuple_output, last

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = kwargs.pop("hidden_states") if "hidden_states" in kwargs else args[0]
        rest = args[1:] if args and args[0] is hidden else args
        kept = {k: v for k, v in kwargs.items() if k not in _DROP_KWARGS}
        self.sink[self.index].append((rest, kept))
        if self.index == 0:
            self.first_inputs.append(hidden)
        if self.last:
            raise _Stop
        return (hidden,) if self.tuple_output else hidden


class LayerwiseRunner:
    """Runs calibration batches through a model's transformer layers one layer at a time.

    Args:
        program: the model.
        ids: calibration token ids ``[N, S]``.
        batch_size: sequences per forward pass.
        desc: label for progress bars.
        distribute: under ``torch.distributed``, take only this rank's share of the batches
            (``modelfold.distributed``); False for a forward that one rank runs alone.
    """

    def __init__(self, program: Program, ids: torch.Tensor, *, batch_size: int = 8,
                 desc: str = "calibration", distribute: bool = True):
        self.program = program
        self.desc = desc
        self.residency = residency_of(program)
        self.stack: nn.ModuleList = program.module.get_submodule(program.arch.layers)
        # this rank's share of the batches (all of them in one process)
        batches = [ids[i:i + batch_size] for i in range(0, len(ids), batch_size)]
        self.batches = my_batches(batches) if distribute else batches
        # per layer, per batch: (positional args after the hidden states, keyword args)
        self.kwargs: list[list[tuple[tuple, dict[str, Any]]]] = [[] for _ in self.stack]
        self.hidden: Any = []  # per batch [B, S, D]: a list, or tensors spilled to disk
        self.residency.ensure(0)  # the first layer's output type is read from a real forward
        self.tuple_output = self._layer_returns_tuple()
        self._record()
        # a resumed streaming run: the finished layers' outputs are the inputs from here on
        self.start, hidden = self.residency.resume(len(self.batches))
        if hidden is not None:
            self.hidden = hidden

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
            self.stack[i] = _Recorder(i, self.kwargs, self.hidden, self.tuple_output,
                                      last=i == len(originals) - 1)
        try:
            for batch in self.batches:
                try:
                    self.program.module_logits(batch)
                except _Stop:  # the last layer's inputs are in: the head is not needed
                    pass
        finally:
            for i, layer in enumerate(originals):
                self.stack[i] = layer

    # -- running -----------------------------------------------------------------------------
    def layers(self) -> Iterator[tuple[int, nn.Module]]:
        """``(index, layer)`` in order, with a progress bar.

        The caller changes the layer and calls ``advance(index)`` before asking for the next
        one; a streamed model (``modelfold.streaming``) loads each layer before it is yielded and
        writes and frees it afterwards (a resumed run starts after the finished layers).
        """
        total = len(self.stack)
        for i in tqdm(range(self.start, total), desc=self.desc, unit="layer", leave=False,
                      initial=self.start, total=total):
            self.residency.ensure(i)
            yield i, self.stack[i]
            self.residency.commit(i, self.hidden)

    def inputs(self) -> list[torch.Tensor]:
        """The current layer's input hidden states, one tensor ``[B, S, D]`` per batch."""
        return self.hidden

    @torch.no_grad()
    def run_layer(self, index: int, layer: nn.Module | None = None, *,
                  batches: slice = slice(None)) -> list[torch.Tensor]:
        """Outputs of layer ``index`` (or a stand-in ``layer``) on the current inputs.

        ``batches`` selects a subset of the calibration batches (all by default).
        """
        return self._run(index, layer, batches, [])

    def _run(self, index: int, layer: nn.Module | None, batches: slice, sink: Any) -> Any:
        layer = self.stack[index] if layer is None else layer
        kwargs = self.kwargs[index]
        for b in range(len(self.batches))[batches]:  # one batch's inputs loaded at a time
            args, kw = kwargs[b]
            out = layer(self.hidden[b], *args, **kw)
            sink.append(out[0] if isinstance(out, (tuple, list)) else out)
        return sink

    @torch.no_grad()
    def advance(self, index: int) -> None:
        """Replace the inputs by layer ``index``'s outputs (through its current weights); a
        streamed run keeps them on disk when they exceed its activation budget."""
        self.hidden = self._run(index, None, slice(None), self.residency.activation_sink(index))

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


class InMemory:
    """The residency of an ordinary model: every layer is in memory; nothing to load or write."""

    def ensure(self, index: int) -> None:
        pass

    def commit(self, index: int, hidden: Any) -> None:
        pass

    def resume(self, batches: int) -> tuple[int, Any]:
        return 0, None

    def activation_sink(self, index: int) -> list:
        return []


def residency_of(program: Program) -> Any:
    """How ``program``'s layers are held: ``InMemory``, or a streaming run's residency
    (``modelfold.streaming``) that loads, writes and frees one layer at a time."""
    return getattr(program, "residency", None) or InMemory()


def each_layer(program: Program, desc: str) -> Iterator[int]:
    """Layer indices in order for passes that change one layer at a time without calibration
    (RTN, magnitude pruning): each layer is loaded before and written after when streaming."""
    residency = residency_of(program)
    if isinstance(residency, InMemory):
        yield from range(program.arch.num_layers)
        return
    start, _ = residency.resume(0)
    for i in tqdm(range(start, program.arch.num_layers), desc=desc, unit="layer", leave=False,
                  initial=start, total=program.arch.num_layers):
        residency.ensure(i)
        yield i
        residency.commit(i, None)


__all__ = ["InMemory", "LayerwiseRunner", "each_layer", "residency_of"]
