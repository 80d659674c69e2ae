"""Shared launcher plumbing for the Triton kernels: device and tensor checks, interpreter mode,
and picking a tile configuration (autotuned on a GPU, one fixed large-tile config under the
interpreter).

Triton decides at ``@triton.jit`` time whether a kernel is compiled for the GPU or run by its CPU
interpreter (``TRITON_INTERPRET=1``), so the mode is fixed when ``modelfold.kernels`` is first
imported; ``modelfold.backends.triton`` checks it before using the kernels.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import triton

from modelfold.errors import ModelfoldError


class KernelError(ModelfoldError, ValueError):
    """A tensor a kernel cannot take: wrong device, dtype, shape or memory layout."""


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    """Whether the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    return INTERPRET


# Read when this module is imported, i.e. when the kernels below it are defined.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_device(op: str, *tensors: torch.Tensor | None) -> torch.device:
    """All tensors on one device the kernels can run on: CUDA, or the CPU under the interpreter."""
    devices = {t.device for t in tensors if t is not None}
    if len(devices) != 1:
        raise KernelError(f"{op}: tensors are on different devices: {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type == "cuda":
        return device
    if device.type == "cpu" and INTERPRET:
        return device
    raise KernelError(
        f"{op}: the Triton kernels run on CUDA tensors; got {device.type} tensors. Move the "
        "model to a GPU, or set TRITON_INTERPRET=1 before importing modelfold.kernels to run "
        "them in Triton's (slow) CPU interpreter")


def check(op: str, name: str, t: torch.Tensor | None, *, dtypes: Sequence[torch.dtype] | None = None,
          shape: Sequence[int | None] | None = None, contiguous: bool = True) -> None:
    """Raise ``KernelError`` naming ``op`` and ``name`` unless ``t`` has the given properties
    (``None`` in ``shape`` matches any size)."""
    if t is None:
        return
    if dtypes is not None and t.dtype not in dtypes:
        raise KernelError(f"{op}: {name} must be {' or '.join(map(str, dtypes))}; got {t.dtype}")
    if shape is not None:
        if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise KernelError(f"{op}: {name} must have shape {want}; got {list(t.shape)}")
    if contiguous and not t.is_contiguous():
        raise KernelError(f"{op}: {name} must be contiguous (call .contiguous() on it)")


def as_rows(op: str, x: torch.Tensor, k: int) -> torch.Tensor:
    """``x [..., K]`` as a 2-D ``[M, K]`` view with unit stride along K (copied only if needed)."""
    if x.shape[-1] != k:
        raise KernelError(f"{op}: x has {x.shape[-1]} features in its last dimension; the weight "
                          f"expects {k}")
    if x.dtype not in FLOAT_DTYPES:
        raise KernelError(f"{op}: x must be float16, bfloat16 or float32; got {x.dtype}")
    if x.dtype == torch.bfloat16 and INTERPRET:
        raise KernelError(f"{op}: Triton's CPU interpreter has no bfloat16 (numpy lacks it); use "
                          "float16 or float32 under the interpreter (bfloat16 runs on a GPU)")
    x2 = x.reshape(-1, k)
    return x2 if x2.stride(-1) == 1 or x2.shape[0] == 0 else x2.contiguous()


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def launch(kernel: Any, tuned: Any, grid: Callable[[dict[str, Any]], tuple[int, ...]],
           args: dict[str, Any], config: dict[str, Any] | None, interpret_config: dict[str, Any]
           ) -> None:
    """Launch ``kernel``: with ``config`` (a dict of tile sizes, plus optional ``num_warps`` /
    ``num_stages``) if given, with ``interpret_config`` under the interpreter, otherwise through
    the autotuned wrapper ``tuned``."""
    if config is None and INTERPRET:
        config = interpret_config
    if config is None:
        tuned[grid](**args)
        return
    meta = dict(config)
    kernel[lambda _: grid(meta)](**args, **meta)


def autotune(configs: list[dict[str, Any]], key: list[str], **kw: Any) -> Callable[[Any], Any]:
    """``triton.autotune`` over plain dicts (``num_warps`` / ``num_stages`` split out)."""
    cfgs = []
    for c in configs:
        c = dict(c)
        warps, stages = c.pop("num_warps", 4), c.pop("num_stages", 3)
        cfgs.append(triton.Config(c, num_warps=warps, num_stages=stages))
    return triton.autotune(cfgs, key=key, **kw)
