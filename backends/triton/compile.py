"""``modelfold.compile(result, backend="triton")``: Triton kernels for the dialect ops, Inductor
for the rest.

Lowering is a module rewrite of a copy of the transformed model:

- every dialect layer (``QuantLinear``, ``NMLinear``, ``NMQuantLinear``, ``W8A8Linear``,
  ``QuantEmbedding``) becomes a ``TritonLinear`` / ``TritonEmbedding`` that calls the matching
  ``modelfold_triton::*`` op (``modelfold.kernels.ops``);
- a ``LoraLinear`` with active, unmerged adapters is fused with its base: one kernel computes
  ``base(x) + sum_a s_a B_a A_a x`` (several adapters are concatenated into one pair with the
  scalings folded into ``B``); a ``Conv1D`` base is transposed to ``[out, in]`` first; only a
  ``W8A8Linear`` base keeps a separate ``lora_delta`` kernel;
- float layers (plain ``nn.Linear``, norms, attention, embeddings) are left to Inductor.

Tensors shared between layers (tied embeddings, ``tie-layers`` recursive blocks) stay shared.
The model is then cast to ``dtype`` on ``device`` and its ``forward`` wrapped in
``torch.compile``. Without a CUDA GPU this raises ``TritonBackendError`` unless the interpreter is
requested (``interpret=True`` or ``TRITON_INTERPRET=1``), where the kernels run on CPU tensors in
Triton's interpreter (correct, slow: for tests and debugging).
"""

from __future__ import annotations

import copy
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


class TritonBackendError(RuntimeError):
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


# -- lowered modules ------------------------------------------------------------------------------
class TritonLinear(nn.Module):
    """A linear layer run by one ``modelfold_triton`` kernel (base + optional fused LoRA).

    ``kind`` is the weight format: ``dense`` (float W, only with LoRA), ``quant``, ``nm``,
    ``nm_quant``, ``w8a8`` (LoRA, if any, as a separate ``lora_delta``) or ``lora`` (a LoRA
    delta over no base).
    """

    def __init__(self, kind: str, tensors: dict[str, torch.Tensor | None], meta: dict[str, Any],
                 in_features: int, out_features: int):
        super().__init__()
        self.kind = kind
        self.in_features, self.out_features = in_features, out_features
        self.meta = dict(meta)
        for name, t in tensors.items():
            self.register_buffer(name, t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = torch.ops.modelfold_triton
        m = self.meta
        a, b, s = self.lora_a, self.lora_b, m.get("scaling", 1.0)
        if self.kind == "quant":
            return ops.quant_linear(x, self.qweight, self.scales, self.zero_points, self.bias, a, b,
                                    s, m["in_features"], m["bits"], m["block_size"])
        if self.kind == "nm":
            return ops.nm_linear(x, self.values, self.indices, self.bias, a, b, s,
                                 m["in_features"], m["n"], m["m"])
        if self.kind == "nm_quant":
            return ops.nm_quant_linear(x, self.codes, self.indices, self.scales, self.zero_points,
                                       self.bias, a, b, s, m["in_features"], m["bits"],
                                       m["block_size"], m["n"], m["m"])
        if self.kind == "dense":
            return ops.lora_linear(x, self.weight, self.bias, a, b, s)
        if self.kind == "w8a8":
            y = ops.w8a8_linear(x, self.qweight_t, self.weight_scales, self.bias)
            return y if a is None else y + ops.lora_delta(x, a, b, s)
        raise TritonBackendError(f"unknown TritonLinear kind {self.kind!r}")

    def extra_repr(self) -> str:
        lora = f", lora_rank={self.lora_a.shape[0]}" if self.lora_a is not None else ""
        return f"{self.kind}, in_features={self.in_features}, out_features={self.out_features}{lora}"


class TritonEmbedding(nn.Module):
    """A ``QuantEmbedding`` run by the ``quant_embedding`` kernel."""

    def __init__(self, qweight, scales, zero_points, embedding_dim, bits, block_size):
        super().__init__()
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("zero_points", zero_points)
        self.embedding_dim, self.bits, self.block_size = embedding_dim, bits, block_size

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.ops.modelfold_triton.quant_embedding(ids, self.qweight, self.scales,
                                                          self.zero_points, self.embedding_dim,
                                                          self.bits, self.block_size)


# -- lowering -------------------------------------------------------------------------------------
def _lora_pair(layer: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None, float, int]:
    """One ``(A, B, scaling)`` for the active unmerged adapters of a ``LoraLinear`` (several are
    concatenated along the rank, scalings folded into B); ``(None, None, 1, 0)`` if none."""
    names = [n for n in layer.active if n not in layer.merged]
    if not names:
        return None, None, 1.0, 0
    with torch.no_grad():
        pairs = []
        for n in names:
            ad = layer.adapters[n]
            a, b = ad.effective()
            pairs.append((a.detach().float(), b.detach().float(), float(ad.scaling)))
    if len(pairs) == 1:
        a, b, s = pairs[0]
        return a.contiguous(), b.contiguous(), s, len(names)
    a = torch.cat([p[0] for p in pairs], 0)
    b = torch.cat([p[1] * p[2] for p in pairs], 1)
    return a.contiguous(), b.contiguous(), 1.0, len(names)


class _Lowering:
    def __init__(self) -> None:
        self.memo: dict[int, torch.Tensor] = {}
        self.kernels: dict[str, str] = {}

    def keep(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """A detached, contiguous copy of ``t``, made once per tensor (sharing survives)."""
        if t is None:
            return None
        key = id(t)
        if key not in self.memo:
            self.memo[key] = t.detach().contiguous().clone()
        return self.memo[key]

    def linear(self, base: nn.Module, lora: tuple | None) -> TritonLinear | None:
        from modelfold.ir.lora import base_shape, is_conv1d
        from modelfold.ir.quant import QuantLinear, W8A8Linear
        from modelfold.ir.sparse import NMLinear, NMQuantLinear

        a, b, s = (lora[0], lora[1], lora[2]) if lora else (None, None, 1.0)
        t: dict[str, Any] = {"lora_a": a, "lora_b": b}
        meta: dict[str, Any] = {"scaling": s}
        k = self.keep
        if isinstance(base, QuantLinear):
            kind = "quant"
            t.update(qweight=k(base.qweight), scales=k(base.scales),
                     zero_points=k(base.zero_points), bias=k(base.bias))
            meta.update(in_features=base.in_features, bits=base.storage_bits,
                        block_size=base.block_size)
        elif isinstance(base, NMQuantLinear):
            kind = "nm_quant"
            t.update(codes=k(base.codes), indices=k(base.indices), scales=k(base.scales),
                     zero_points=k(base.zero_points), bias=k(base.bias))
            meta.update(in_features=base.in_features, bits=base.storage_bits,
                        block_size=base.block_size, n=base.n, m=base.m)
        elif isinstance(base, NMLinear):
            kind = "nm"
            t.update(values=k(base.values), indices=k(base.indices), bias=k(base.bias))
            meta.update(in_features=base.in_features, n=base.n, m=base.m)
        elif isinstance(base, W8A8Linear):
            kind = "w8a8"
            t.update(qweight_t=k(base.qweight_t), weight_scales=k(base.weight_scales),
                     bias=k(base.bias))
        elif lora and isinstance(base, nn.Linear):
            kind = "dense"
            t.update(weight=k(base.weight), bias=k(base.bias))
        elif lora and is_conv1d(base):  # GPT-2 Conv1D stores [in, out]
            kind = "dense"
            t.update(weight=base.weight.detach().t().contiguous().clone(), bias=k(base.bias))
        else:
            return None
        in_f, out_f = base_shape(base)
        return TritonLinear(kind, t, meta, in_f, out_f)

    def run(self, model: nn.Module) -> dict[str, str]:
        from modelfold.ir.lora import LoraLinear
        from modelfold.ir.quant import QuantEmbedding, QuantLinear, W8A8Linear
        from modelfold.ir.sparse import NMLinear, NMQuantLinear

        dialect = (QuantLinear, NMLinear, NMQuantLinear, W8A8Linear)
        for path, mod in list(model.named_modules()):
            if not path:
                continue
            if isinstance(mod, LoraLinear):
                a, b, s, count = _lora_pair(mod)
                lora = (a, b, s) if a is not None else None
                new = self.linear(mod.base_layer, lora)
                if new is None:  # a float base without active adapters: leave it to Inductor
                    _replace(model, path, mod.base_layer)
                    self.kernels[path] = "inductor (LoRA adapters inactive or merged)"
                    continue
                _replace(model, path, new)
                self.kernels[path] = new.kind + (f"+lora(r={a.shape[0]}, {count} adapter"
                                                 f"{'s' if count > 1 else ''})" if lora else "")
            elif isinstance(mod, dialect) and not _inside(path, self.kernels):
                new = self.linear(mod, None)
                _replace(model, path, new)
                self.kernels[path] = new.kind
            elif isinstance(mod, QuantEmbedding):
                k = self.keep
                _replace(model, path, TritonEmbedding(k(mod.qweight), k(mod.scales),
                                                      k(mod.zero_points), mod.embedding_dim,
                                                      mod.storage_bits, mod.block_size))
                self.kernels[path] = "quant_embedding"
        return self.kernels


def _inside(path: str, done: dict[str, str]) -> bool:
    return any(path.startswith(p + ".") for p in done)


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, new)


def lower_module(module: nn.Module, *, copy_module: bool = True) -> tuple[nn.Module, dict[str, str]]:
    """The model with its dialect layers replaced by Triton-kernel layers (float32, on the
    module's device; nothing compiled yet) and ``{layer path: kernel}``."""
    model = copy.deepcopy(module) if copy_module else module
    kernels = _Lowering().run(model)
    return model.eval(), kernels


# -- the compiled model ---------------------------------------------------------------------------
class CompiledModel:
    """A transformed model lowered to Triton kernels (+ Inductor).

    ``module`` is the lowered model (its ``forward`` compiled); call the object like the model
    (``compiled(input_ids).logits``), or use ``logits`` / ``generate``. ``kernels`` maps each
    lowered layer's path to its kernel; ``summary()`` counts them.
    """

    def __init__(self, module: nn.Module, kernels: dict[str, str], *, device: torch.device,
                 dtype: torch.dtype, interpret: bool, inductor: bool):
        self.module, self.kernels = module, kernels
        self.device, self.dtype, self.interpret, self.inductor = device, dtype, interpret, inductor

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return self.module(*args, **kwargs)

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, S, V]`` for ``input_ids`` ``[B, S]`` (no cache)."""
        ids = torch.as_tensor(input_ids, dtype=torch.long, device=self.device)
        return self(input_ids=ids, use_cache=False).logits

    def generate(self, input_ids: Sequence[int], max_new_tokens: int,
                 eos_token_id: int | Sequence[int] | None = None) -> dict[str, Any]:
        """Greedy decoding of one prompt with the KV cache (the same result dict as
        ``OnnxCausalLM.generate``: tokens, new_tokens, prefill / decode seconds, tokens/s)."""
        from transformers import DynamicCache

        ids = torch.as_tensor(list(input_ids), dtype=torch.long, device=self.device)[None]
        if ids.numel() == 0:
            raise ValueError("generate needs a non-empty prompt")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        stop = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or [])
        cache = DynamicCache()
        start = time.perf_counter()
        out = self(input_ids=ids, past_key_values=cache, use_cache=True)
        new = [int(out.logits[0, -1].argmax())]
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        while len(new) < max_new_tokens and new[-1] not in stop:
            step = torch.tensor([[new[-1]]], dtype=torch.long, device=self.device)
            out = self(input_ids=step, past_key_values=out.past_key_values, use_cache=True)
            new.append(int(out.logits[0, -1].argmax()))
        decode = time.perf_counter() - start
        steps = len(new) - 1
        return {"tokens": ids[0].tolist() + new, "new_tokens": new, "prefill_seconds": prefill,
                "decode_seconds": decode,
                "decode_tokens_per_s": steps / decode if steps and decode > 0 else None}

    def summary(self) -> str:
        counts = Counter(v.split("(")[0] for v in self.kernels.values())
        mode = "Triton interpreter (CPU)" if self.interpret else f"Triton on {self.device}"
        parts = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no dialect layers"
        return (f"{mode}, {str(self.dtype).replace('torch.', '')}, "
                f"{'torch.compile (Inductor)' if self.inductor else 'eager'}: {parts}")


def compile_model(target: Any, *, device: str | torch.device | None = None,
                  dtype: torch.dtype | str | None = None, interpret: bool | None = None,
                  inductor: bool = True, copy_module: bool = True,
                  compile_options: dict[str, Any] | None = None) -> CompiledModel:
    """Lower a transformed model to Triton kernels and ``torch.compile`` the rest.

    Args:
        target: a ``TransformResult``, a ``Program`` or an ``nn.Module``.
        device: default ``cuda`` (``cpu`` under the interpreter).
        dtype: activations and float weights; default float16 on a GPU, float32 under the
            interpreter (which has no bfloat16).
        interpret: run the kernels in Triton's CPU interpreter (default: ``TRITON_INTERPRET``).
        inductor: wrap ``forward`` in ``torch.compile`` (False: the lowered model runs eagerly,
            still on the Triton kernels).
        copy_module: lower a copy (default) instead of rewriting ``target`` in place.
        compile_options: extra keyword arguments for ``torch.compile`` (default
            ``{"dynamic": True}``).
    """
    interpret = load_kernels(interpret)
    module = getattr(target, "module", target)
    if not isinstance(module, nn.Module):
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
    model, kernels = lower_module(module, copy_module=copy_module)
    model.to(device=dev, dtype=dtype)
    if inductor:
        model.forward = torch.compile(model.forward, **(compile_options or {"dynamic": True}))
    return CompiledModel(model, kernels, device=dev, dtype=dtype, interpret=interpret,
                         inductor=inductor)
