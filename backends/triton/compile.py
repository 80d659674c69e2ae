"""``modelfold.compile(result, backend="triton")``: Triton kernels for the dialect ops, Inductor
for the rest, compiled from the Program's graph.

The Program's captured graph (the signature every backend runs: flat KV-cache inputs and outputs)
is the input: in float32 on the CPU (Triton's interpreter) it is the Program's verified graph
itself; for another dtype or device it is the same Program captured again from a copy of its
module cast there (its graph passes replayed). ``modelfold.backends.triton.lowering`` rewrites
that graph: every dialect op becomes the matching ``modelfold_triton::*`` op
(``modelfold.kernels.ops``), a ``LoraLinear``'s base and active adapters fuse into one kernel
call, float layers stay ATen. The result is verified, turned into a ``GraphModule`` and wrapped
in ``torch.compile`` (Inductor). Tensors shared between layers (tied embeddings, ``tie-layers``
blocks) stay one lifted tensor.

Without a CUDA GPU this raises ``TritonBackendError`` unless the interpreter is requested
(``interpret=True`` or ``TRITON_INTERPRET=1``), where the kernels run on CPU tensors in Triton's
interpreter (correct, slow: for tests and debugging).
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from modelfold.errors import ModelfoldError


class TritonBackendError(ModelfoldError, RuntimeError):
    """The Triton backend cannot run here or cannot take this model."""


def _kernels_mode() -> bool | None:
    """The mode the kernels were imported in (True: interpreter), or None if not yet imported."""
    mod = sys.modules.get("modelfold.kernels._runtime")
    return None if mod is None else mod.INTERPRET


def load_kernels(interpret: bool | None = None) -> bool:
    """Import the kernels in the requested mode; returns whether they run in the interpreter.

    ``interpret=None`` follows ``TRITON_INTERPRET``. Raises ``TritonBackendError`` without a CUDA
    GPU unless the interpreter is requested, and when the kernels were already imported in the
    other mode in this process (Triton fixes the mode when a kernel is defined).
    """
    if interpret is None:
        interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if not interpret and not torch.cuda.is_available():
        raise TritonBackendError(
            "the Triton backend needs an NVIDIA GPU with CUDA, and this machine has none "
            "(torch.cuda.is_available() is False). Pass interpret=True (CLI: --interpret) to run "
            "the kernels in Triton's CPU interpreter (correct but slow: for tests and "
            "debugging), or export for CPU with backend='onnxruntime'")
    mode = _kernels_mode()
    if mode is not None and mode != interpret:
        raise TritonBackendError(
            f"the Triton kernels were already loaded {'in' if mode else 'without'} interpreter "
            f"mode in this process and cannot switch (Triton fixes it when kernels are defined); "
            f"start a new process {'without' if mode else 'with'} TRITON_INTERPRET=1")
    if mode is None:  # the kernels read it when they are defined, on the import below
        os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    try:
        import triton  # noqa: F401
    except ImportError as e:  # pragma: no cover - triton is a dependency on Linux
        raise TritonBackendError(f"the Triton backend needs the 'triton' package: {e}") from None
    import modelfold.kernels.ops  # noqa: F401  (registers the ops)

    return interpret


# -- the compiled model ---------------------------------------------------------------------------
class CompiledModel:
    """A Program lowered to Triton kernels (+ Inductor), with the Program's signature.

    Call it with the signature's flat inputs (``input_ids, attention_mask, position_ids,
    *past``) to get ``(logits, *present)``, or use ``logits`` / ``generate``. ``kernels`` maps each
    lowered layer's path to its kernel; ``summary()`` counts them; ``graph`` is the lowered,
    verified ``ExportedProgram``.
    """

    def __init__(self, forward: Any, graph: Any, signature: Any, kernels: dict[str, str], *,
                 device: torch.device, dtype: torch.dtype, interpret: bool, inductor: bool):
        self.forward, self.graph, self.signature = forward, graph, signature
        self.kernels = kernels
        self.device, self.dtype, self.interpret, self.inductor = device, dtype, interpret, inductor
        self.runtime = "triton-interpreter" if interpret else "triton"

    def __call__(self, *inputs: torch.Tensor) -> Any:
        with torch.no_grad():
            return self.forward(*inputs)

    def logits(self, input_ids: Any) -> torch.Tensor:
        """Logits ``[B, S, V]`` (last hidden state for an encoder) for ``input_ids`` ``[B, S]``
        (torch or numpy), with an empty cache."""
        from modelfold.ir.signature import graph_inputs

        ids = torch.as_tensor(np.asarray(input_ids) if not isinstance(input_ids, torch.Tensor)
                              else input_ids, dtype=torch.long).to(self.device)
        if self.signature.kind == "encoder":
            args = [ids, torch.ones_like(ids)]
            if len(self.signature.inputs) > 2:
                args.append(torch.zeros_like(ids))
        else:
            args = graph_inputs(self.signature, ids)
        out = self(*args)
        return out[0] if isinstance(out, (tuple, list)) else out

    def generate(self, input_ids: Sequence[int] | Sequence[Sequence[int]], max_new_tokens: int,
                 eos_token_id: int | Sequence[int] | None = None, sampling: Any = None,
                 pad_token_id: int = 0) -> dict[str, Any]:
        """Generation from one prompt or a batch with the KV cache, greedy or sampled (the same
        loop and result dict as ``OnnxCausalLM.generate``, ``modelfold.generation``)."""
        from modelfold.generation import generate

        if self.signature.kind != "causal-lm":
            raise TritonBackendError("generate needs a decoder (causal LM)")
        return generate(_TorchDecoder(self), input_ids, max_new_tokens, eos_token_id, sampling,
                        pad_token_id)

    def summary(self) -> str:
        counts = Counter(v.split("(")[0] for v in self.kernels.values())
        mode = "Triton interpreter (CPU)" if self.interpret else f"Triton on {self.device}"
        parts = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no dialect layers"
        return (f"{mode}, {str(self.dtype).replace('torch.', '')}, "
                f"{'torch.compile (Inductor)' if self.inductor else 'eager'}: {parts}")


class _TorchDecoder:
    """A ``CompiledModel`` as a ``modelfold.generation.Decoder`` (the cache as torch tensors,
    grown by concatenation; right padding when the attention is fused)."""

    def __init__(self, model: CompiledModel):
        self.model = model
        self.padding = "right" if "sdpa" in model.kernels.values() else "left"

    def new_cache(self, batch: int, capacity: int) -> list[torch.Tensor]:
        m, layout = self.model, self.model.signature.cache
        shape = (batch, layout.num_kv_heads, 0, layout.head_dim)
        return [torch.zeros(shape, dtype=m.dtype, device=m.device) for _ in m.signature.past_names]

    def step(self, ids, mask, positions, past, logits_to_keep=0):  # every position's logits
        m = self.model
        args = [torch.as_tensor(a, device=m.device) for a in (ids, mask, positions)]
        out = m(*args, *past)
        return out[0].float().cpu().numpy(), list(out[1:])


def compile_model(target: Any, *, device: str | torch.device | None = None,
                  dtype: torch.dtype | str | None = None, interpret: bool | None = None,
                  inductor: bool = True,
                  compile_options: dict[str, Any] | None = None) -> CompiledModel:
    """Lower a Program's graph to Triton kernels and ``torch.compile`` the rest.

    Args:
        target: a ``TransformResult``, a ``Program`` or an ``nn.Module``.
        device: default ``cuda`` (``cpu`` under the interpreter).
        dtype: activations and float weights; default float16 on a GPU, float32 under the
            interpreter (which has no bfloat16).
        interpret: run the kernels in Triton's CPU interpreter (default: ``TRITON_INTERPRET``).
        inductor: wrap the graph in ``torch.compile`` (False: it runs eagerly, still on the
            Triton kernels).
        compile_options: extra keyword arguments for ``torch.compile`` (default
            ``{"dynamic": True}``).
    """
    from modelfold.backends.triton.lowering import lower
    from modelfold.ir.graph import runnable
    from modelfold.ir.program import Program
    from modelfold.ir.verify import verify, verify_graph

    interpret = load_kernels(interpret)
    program = getattr(target, "program", target)
    if not isinstance(program, (Program, nn.Module)):
        raise TritonBackendError(f"compile takes a TransformResult, Program or nn.Module; got "
                                 f"{type(target).__name__}")
    dev = torch.device(device) if device is not None else torch.device(
        "cpu" if interpret else "cuda")
    if dev.type == "cpu" and not interpret:
        raise TritonBackendError("device='cpu' needs the interpreter (interpret=True)")
    if dev.type == "cuda" and interpret:
        raise TritonBackendError("the interpreter runs the kernels on CPU tensors; use device='cpu'")
    if isinstance(dtype, str):
        dtype = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16,
                 "bf16": torch.bfloat16, "float32": torch.float32,
                 "fp32": torch.float32}.get(dtype, dtype)
    dtype = dtype or (torch.float32 if interpret else torch.float16)
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TritonBackendError(f"dtype must be float16, bfloat16 or float32; got {dtype}")
    if interpret and dtype == torch.bfloat16:
        raise TritonBackendError("Triton's CPU interpreter has no bfloat16; use float16 or "
                                 "float32 with interpret=True")
    if isinstance(program, nn.Module):
        program = Program(program)
    source = program if (dev.type, dtype) == ("cpu", torch.float32) else \
        program.converted(device=dev, dtype=dtype)
    if source.verified_graph is None or source.verified_graph is not source.exported:
        verify(source)
    graph, kernels = lower(source.exported, source.module)
    graph = verify_graph(source, graph)
    forward = runnable(graph)
    if inductor:
        forward = torch.compile(forward, **(compile_options or {"dynamic": True}))
    return CompiledModel(forward, graph, source.signature, kernels, device=dev, dtype=dtype,
                         interpret=interpret, inductor=inductor)
