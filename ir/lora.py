"""Low-rank adapters: the ``modelfold::lora_delta`` dialect op and the ``LoraLinear`` layer.

A LoRA-adapted linear layer computes ``y = base(x) + sum_a s_a * B_a (A_a x)`` over its active,
unmerged adapters ``a``. ``base`` is whatever was there before: an ``nn.Linear``, a GPT-2
``Conv1D``, or a quantized ``QuantLinear`` / ``W8A8Linear`` (QLoRA-style: the base stays packed,
the adapter trains in float).

In the IR every adapter is one ``modelfold::lora_delta(x, A, B, scaling)`` node
(= ``scaling * (x @ A.T) @ B.T``), owned by the module path of the adapted layer, so a graph view
shows exactly which layers carry adapters. Its ONNX lowering is two ``Gemm`` nodes; the Triton
backend gives it a fused kernel.

Adapter kinds (``LoraAdapter.kind``), all reducing to an effective pair ``(A [r, in], B [out, r])``:

- ``lora``: ``A``, ``B`` trainable (standard init: ``B = 0``, ``A`` kaiming-uniform);
- ``pissa``: like ``lora``, initialised from the principal singular components; the initial
  pair is kept (``A0``, ``B0``) so the adapter can be exported as plain LoRA over the
  original weights (rank ``2r``);
- ``xs`` (LoRA-XS) and ``sb`` (LoRA-SB): frozen ``A``, ``B`` and a trainable ``r x r`` core
  ``R``; effective ``A = R A``;
- ``nola``: ``A = A_0 + sum_i alpha_i A_i``, ``B = sum_j beta_j B_j`` over ``k`` random bases
  regenerated from a stored seed; only ``alpha``, ``beta`` (and the seed) are stored.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from modelfold.errors import ModelfoldError
from modelfold.ir.module_types import register_module_type
from modelfold.ir.modules import (
    add_to_linear_weight,
    is_linear,
    linear_shape,
    linear_weight,
    new_linear,
    replace_module,
)
from modelfold.ir.tying import parameter_uses

ADAPTER_KINDS = ("lora", "pissa", "xs", "sb", "nola")


# -- the dialect op ------------------------------------------------------------------------------
@torch.library.custom_op("modelfold::lora_delta", mutates_args=())
def lora_delta(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
               scaling: float) -> torch.Tensor:
    """``scaling * (x @ lora_a.T) @ lora_b.T``: x ``[..., in]``, A ``[r, in]``, B ``[out, r]``."""
    return F.linear(F.linear(x, lora_a), lora_b) * scaling


@lora_delta.register_fake
def _(x, lora_a, lora_b, scaling):
    return x.new_empty((*x.shape[:-1], lora_b.shape[0]))


def _lora_delta_setup(ctx, inputs, output):
    x, a, b, scaling = inputs
    ctx.scaling = scaling
    ctx.save_for_backward(x, a, b)


def _lora_delta_backward(ctx, grad):
    x, a, b = ctx.saved_tensors
    s = ctx.scaling
    need_x, need_a, need_b = ctx.needs_input_grad[:3]
    gb = F.linear(grad, b.t())  # [..., r] = grad @ B
    grad_x = F.linear(gb, a.t()) * s if need_x else None  # [..., in]
    grad_a = grad_b = None
    if need_a:
        grad_a = gb.reshape(-1, gb.shape[-1]).t() @ x.reshape(-1, x.shape[-1]) * s  # [r, in]
    if need_b:
        h = F.linear(x, a)  # [..., r]
        grad_b = grad.reshape(-1, grad.shape[-1]).t() @ h.reshape(-1, h.shape[-1]) * s  # [out, r]
    return grad_x, grad_a, grad_b, None


torch.library.register_autograd("modelfold::lora_delta", _lora_delta_backward,
                                setup_context=_lora_delta_setup)


# -- adapters ------------------------------------------------------------------------------------
class LoraAdapter(nn.Module):
    """One named adapter of a ``LoraLinear``: its kind, rank, scaling and tensors.

    Args:
        kind: one of ``ADAPTER_KINDS``.
        in_features, out_features, rank: the delta is ``[out, in]`` of rank ``rank``.
        alpha: ``scaling = alpha / rank`` (``alpha / sqrt(rank)`` with ``rslora``).
        dropout: dropout probability on the adapter's input (training only).
        nola_k: number of random bases of a ``nola`` adapter.
        seed: seed of a ``nola`` adapter's bases.
    """

    def __init__(self, kind: str, in_features: int, out_features: int, rank: int, alpha: float,
                 *, dropout: float = 0.0, rslora: bool = False, nola_k: int = 0, seed: int = 0):
        super().__init__()
        if kind not in ADAPTER_KINDS:
            raise ValueError(f"unknown adapter kind {kind!r}; one of {', '.join(ADAPTER_KINDS)}")
        self.kind = kind
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.alpha, self.rslora, self.dropout = float(alpha), bool(rslora), float(dropout)
        self.scaling = self.alpha / (math.sqrt(rank) if rslora else rank)
        self.nola_k, self.seed = nola_k, seed
        zeros = torch.zeros
        if kind in ("lora", "pissa"):
            self.lora_A = nn.Parameter(zeros(rank, in_features))
            self.lora_B = nn.Parameter(zeros(out_features, rank))
            if kind == "pissa":  # the initial pair, for the export as plain LoRA
                self.lora_A0 = nn.Parameter(zeros(rank, in_features), requires_grad=False)
                self.lora_B0 = nn.Parameter(zeros(out_features, rank), requires_grad=False)
        elif kind in ("xs", "sb"):
            self.lora_A = nn.Parameter(zeros(rank, in_features), requires_grad=False)
            self.lora_B = nn.Parameter(zeros(out_features, rank), requires_grad=False)
            self.lora_R = nn.Parameter(zeros(rank, rank))
        else:  # nola
            if nola_k < 1:
                raise ValueError(f"a nola adapter needs nola_k >= 1 bases; got {nola_k}")
            self.nola_alpha = nn.Parameter(zeros(nola_k))
            self.nola_beta = nn.Parameter(zeros(nola_k))
            self._bases: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    # -- the effective pair ------------------------------------------------------------------
    def nola_bases(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(A_0 [r, in], A_i [k, r, in], B_j [k, out, r])``, regenerated from ``seed``
        (uniform in ``[-1, 1) / sqrt(k)``, NOLA's choice), cached in memory only."""
        if self._bases is None:
            g = torch.Generator().manual_seed(self.seed)
            r, i, o, k = self.rank, self.in_features, self.out_features, self.nola_k

            def u(*shape: int) -> torch.Tensor:
                return (torch.rand(*shape, generator=g) * 2 - 1) / math.sqrt(k)

            a0 = (torch.rand(r, i, generator=g) * 2 - 1) / math.sqrt(i)  # kaiming-like A_0
            self._bases = (a0, u(k, r, i), u(k, o, r))
        return self._bases

    def effective(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A [r, in], B [out, r])`` with ``delta = scaling * B @ A``."""
        if self.kind in ("lora", "pissa"):
            return self.lora_A, self.lora_B
        if self.kind in ("xs", "sb"):
            return self.lora_R @ self.lora_A, self.lora_B
        a0, ai, bj = self.nola_bases()
        dev = self.nola_alpha.device
        a = a0.to(dev) + torch.einsum("k,kri->ri", self.nola_alpha, ai.to(dev))
        b = torch.einsum("k,kor->or", self.nola_beta, bj.to(dev))
        return a, b

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A`` ``[out, in]`` (float32, detached)."""
        with torch.no_grad():
            a, b = self.effective()
            return (b.float() @ a.float()) * self.scaling

    def trainable_count(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def stored_count(self) -> int:
        """Numbers this adapter stores (NOLA: coefficients only; bases come from the seed)."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dropout and self.training:
            x = F.dropout(x, self.dropout, training=True)
        a, b = self.effective()
        return torch.ops.modelfold.lora_delta(x, a, b, self.scaling)

    def extra_repr(self) -> str:
        extra = f", k={self.nola_k}" if self.kind == "nola" else ""
        return (f"{self.kind}, rank={self.rank}, alpha={self.alpha:g}, "
                f"scaling={self.scaling:g}{extra}")


class LoraError(ModelfoldError, ValueError):
    """An adapter operation that cannot be done (unknown adapter, merge into a packed base...)."""


class LoraLinear(nn.Module):
    """A linear layer with named low-rank adapters.

    ``base_layer`` is the original layer; ``adapters`` the named ``LoraAdapter`` s. ``active``
    lists the adapters used by ``forward``; ``merged`` those folded into a float base's weight
    (``merge`` / ``unmerge``).
    """

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = linear_shape(base_layer)
        self.adapters = nn.ModuleDict()
        self.active: list[str] = []
        self.merged: list[str] = []

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight as ``[out, in]`` (dequantized for a packed base)."""
        return linear_weight(self.base_layer)

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def add_adapter(self, name: str, adapter: LoraAdapter, *, activate: bool = True) -> None:
        if name in self.adapters:
            raise LoraError(f"the layer already has an adapter named {name!r}")
        if (adapter.in_features, adapter.out_features) != (self.in_features, self.out_features):
            raise LoraError(f"adapter {name!r} is {adapter.out_features}x{adapter.in_features}; "
                            f"the layer is {self.out_features}x{self.in_features}")
        self.adapters[name] = adapter
        if activate:
            self.active.append(name)

    def adapter(self, name: str) -> LoraAdapter:
        if name not in self.adapters:
            raise LoraError(f"no adapter named {name!r} (this layer has: "
                            f"{', '.join(self.adapters) or 'none'})")
        return self.adapters[name]

    def set_active(self, names: list[str]) -> None:
        for n in names:
            self.adapter(n)
        if any(n in self.merged for n in self.adapters if n not in names):
            raise LoraError("unmerge an adapter before deactivating it")
        self.active = list(dict.fromkeys([*names, *self.merged]))

    def can_merge(self) -> bool:
        return is_linear(self.base_layer)

    def merge(self, names: list[str] | None = None) -> list[str]:
        """Fold active adapters into the base weight (float bases only); returns the merged names."""
        names = [n for n in (names if names is not None else self.active) if n not in self.merged]
        if not names:
            return []
        if not self.can_merge():
            raise LoraError(f"cannot merge into a {type(self.base_layer).__name__} base: the "
                            "weight is packed (merging would re-quantize it); keep the adapter "
                            "unmerged, or merge before quantizing")
        with torch.no_grad():
            for n in names:
                if n not in self.active:
                    raise LoraError(f"adapter {n!r} is not active; activate it before merging")
                add_to_linear_weight(self.base_layer, self.adapter(n).delta_weight())
                self.merged.append(n)
        return names

    def unmerge(self, names: list[str] | None = None) -> list[str]:
        names = [n for n in (names if names is not None else list(self.merged))
                 if n in self.merged]
        with torch.no_grad():
            for n in reversed(names):
                add_to_linear_weight(self.base_layer, -self.adapter(n).delta_weight())
                self.merged.remove(n)
        return names

    def delete_adapter(self, name: str) -> None:
        self.adapter(name)
        if name in self.merged:
            self.unmerge([name])
        del self.adapters[name]
        self.active = [n for n in self.active if n != name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        for name in self.active:
            if name not in self.merged:
                y = y + self.adapters[name](x)
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"active={self.active}, merged={self.merged}")


# -- model-level helpers -------------------------------------------------------------------------
def lora_layers(module: nn.Module) -> dict[str, LoraLinear]:
    """Module path -> ``LoraLinear`` for every adapted layer of ``module``."""
    return {path: m for path, m in module.named_modules() if isinstance(m, LoraLinear)}


def adapter_names(module: nn.Module) -> list[str]:
    """Names of the adapters present anywhere in ``module`` (first-seen order)."""
    seen: dict[str, None] = {}
    for layer in lora_layers(module).values():
        seen.update(dict.fromkeys(layer.adapters))
    return list(seen)


def set_active_adapters(module: nn.Module, names: str | list[str]) -> None:
    """Make ``names`` the active adapters of every adapted layer that has them."""
    names = [names] if isinstance(names, str) else list(names)
    known = adapter_names(module)
    for n in names:
        if n not in known:
            raise LoraError(f"no adapter named {n!r} (the model has: {', '.join(known) or 'none'})")
    for layer in lora_layers(module).values():
        layer.set_active([n for n in names if n in layer.adapters])


def merge_adapters(module: nn.Module, names: list[str] | None = None) -> int:
    """Merge (active) adapters into float base weights; returns the number of layers merged.

    Raises ``LoraError`` before changing anything if a targeted layer has a packed base or a
    base weight shared with other layers.
    """
    layers = lora_layers(module)
    wanted = {path: [n for n in (names if names is not None else layer.active)
                     if n in layer.adapters]
              for path, layer in layers.items()}
    uses = parameter_uses(module)
    for path, names_here in wanted.items():
        if names_here and not layers[path].can_merge():
            raise LoraError(f"{path}: cannot merge into a {type(layers[path].base_layer).__name__} "
                            "base (packed weights); keep the adapters unmerged or merge before "
                            "quantizing")
        if names_here and uses[id(layers[path].base_layer.weight)] > 1:
            raise LoraError(f"{path}: its base weight is shared with other layers (tie-layers); "
                            "merging would change them too. Keep the adapters unmerged")
    return sum(bool(layers[path].merge(names_here)) for path, names_here in wanted.items())


def unmerge_adapters(module: nn.Module, names: list[str] | None = None) -> int:
    """Undo ``merge_adapters``; returns the number of layers unmerged."""
    return sum(bool(layer.unmerge(names)) for layer in lora_layers(module).values())


def unwrap(module: nn.Module, *, merge: bool = True) -> int:
    """Replace every ``LoraLinear`` by its base layer, merging the active adapters first when
    ``merge`` (float bases only); returns the number of layers replaced."""
    layers = lora_layers(module)
    if merge:
        merge_adapters(module)
    for path, layer in layers.items():
        replace_module(module, path, layer.base_layer)
    return len(layers)


# -- checkpoints -------------------------------------------------------------------------------
# The base layer is described here (a float Linear / Conv1D is built here; a packed base has its
# own manifest entry, swapped in after this one). Adapters are rebuilt from their constructor facts.
def _describe_lora_linear(m: LoraLinear) -> dict[str, Any]:
    base = m.base_layer
    return {"in_features": m.in_features, "out_features": m.out_features,
            "base": type(base).__name__, "has_bias": getattr(base, "bias", None) is not None,
            "active": list(m.active), "merged": list(m.merged),
            "adapters": {name: {"kind": a.kind, "rank": a.rank, "alpha": a.alpha,
                                "dropout": a.dropout, "rslora": a.rslora, "nola_k": a.nola_k,
                                "seed": a.seed} for name, a in m.adapters.items()}}


def _build_lora_linear(f: dict[str, Any]) -> LoraLinear:
    k, n = f["in_features"], f["out_features"]
    # a float Linear / Conv1D, or a placeholder that the packed base's own entry replaces
    base = new_linear("Conv1D" if f["base"] == "Conv1D" else "Linear", k, n, bias=f["has_bias"])
    layer = LoraLinear(base)
    for name, a in f["adapters"].items():
        layer.add_adapter(name, LoraAdapter(a["kind"], k, n, a["rank"], a["alpha"],
                                            dropout=a["dropout"], rslora=a["rslora"],
                                            nola_k=a["nola_k"], seed=a["seed"]), activate=False)
    layer.active, layer.merged = list(f["active"]), list(f["merged"])
    return layer


register_module_type(LoraLinear, _describe_lora_linear, _build_lora_linear)


__all__ = [
    "ADAPTER_KINDS", "LoraAdapter", "LoraError", "LoraLinear", "adapter_names", "lora_delta",
    "lora_layers", "merge_adapters", "set_active_adapters", "unmerge_adapters", "unwrap",
]
