"""Attention shared across layers, in the eager model: EchoAtt score sharing and CLA/MLKV KV
sharing (the ``share-attention`` pass; METHODS.md section 2).

A *group* is a sorted list of layers whose first layer *owns* and whose others *borrow*:

- ``mode="kv"`` (CLA / MLKV): a borrower attends with its own queries to the owner's keys and
  values; its ``k_proj`` / ``v_proj`` are gone (``Borrowed``: no parameters) and it has no cache
  entry;
- ``mode="scores"`` (EchoAtt): a borrower reuses the owner's attention probabilities with its own
  values: it computes ``softmax(Q_o K_o^T)`` from the owner's query and key projections (its own
  ``q_proj`` / ``k_proj`` are gone, its q/k norms are the owner's tensors), so its cache holds its
  values only (keys of width 0).

The model keeps its own attention code: an owner's and a borrower's attention module get a
subclass (``Lending<cls>`` / ``Borrowing<cls>``) whose forward hands the module a proxy of the
KV cache. The owner's proxy records the keys/values its ``update`` returns (and, for scores, the
q/k projection outputs) in a slot the group shares; a borrower's proxy returns the owner's keys
(and values, for kv) from that slot instead of storing its own. The slot is a plain object, so
the sharing works with transformers' caches (``generate``), without a cache (training) and in a
``torch.export`` capture, where the owner's tensors simply flow into the borrower's attention.

GPT-2's packed q/k/v projection becomes a ``PartialQKV`` in a borrower: the part it keeps (q for
kv sharing, v for scores), with zeros or the owner's q/k in the place of the rest.

The sharing is recorded in ``config.modelfold_attention_sharing`` (``{"mode", "owners"}``, owner
index per layer), so a checkpoint rebuilds it (``restore_sharing``).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from modelfold.ir.module_types import register_module_type, register_rebuild_hook

CONFIG_KEY = "modelfold_attention_sharing"
MODES = ("scores", "kv")
# Projections a borrower gives up, per mode.
DROPPED = {"kv": ("k", "v"), "scores": ("q", "k")}


@dataclass(frozen=True)
class Sharing:
    """Which layer each layer takes its attention from.

    Attributes:
        mode: ``scores`` or ``kv``.
        owners: per layer, the layer that owns its group (itself for an owner).
    """

    mode: str
    owners: tuple[int, ...]

    @property
    def groups(self) -> list[list[int]]:
        """Groups of two or more layers, owner first."""
        by_owner: dict[int, list[int]] = {}
        for layer, owner in enumerate(self.owners):
            by_owner.setdefault(owner, []).append(layer)
        return [g for g in by_owner.values() if len(g) > 1]

    @property
    def borrowers(self) -> list[int]:
        return [i for i, o in enumerate(self.owners) if o != i]

    def is_borrower(self, layer: int) -> bool:
        return self.owners[layer] != layer

    def cache_kinds(self, layer: int) -> tuple[str, ...]:
        """The cache entries layer ``layer`` keeps: ``("key", "value")``, ``("value",)`` (a
        score-sharing borrower) or ``()`` (a KV-sharing borrower)."""
        if not self.is_borrower(layer):
            return ("key", "value")
        return ("value",) if self.mode == "scores" else ()

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "owners": list(self.owners)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Sharing:
        return cls(str(data["mode"]), tuple(int(o) for o in data["owners"]))

    @classmethod
    def from_groups(cls, mode: str, num_layers: int, groups: list[list[int]]) -> Sharing:
        owners = list(range(num_layers))
        for group in groups:
            for layer in group[1:]:
                owners[layer] = group[0]
        return cls(mode, tuple(owners))


def sharing_of(model: nn.Module) -> Sharing | None:
    """The model's attention sharing (None when its layers share nothing)."""
    data = getattr(getattr(model, "config", None), CONFIG_KEY, None)
    return Sharing.from_dict(data) if data else None


def cache_kinds(model: nn.Module, num_layers: int) -> tuple[tuple[str, ...], ...]:
    """Per layer, the cache entries it keeps (every layer both without sharing)."""
    sharing = sharing_of(model)
    if sharing is None:
        return tuple(("key", "value") for _ in range(num_layers))
    return tuple(sharing.cache_kinds(i) for i in range(num_layers))


class _Slot:
    """What an owner hands its borrowers during one forward pass (a plain object, not state of
    any module: nothing here is a parameter, a buffer or part of a checkpoint)."""

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.outputs: dict[str, torch.Tensor] = {}


@dataclass
class _Share:
    mode: str
    owner: bool
    slot: _Slot
    records: dict[str, str] | None = None  # scores owner: role -> projection path to record


def _records(attention: str, projections: dict[str, str]) -> dict[str, str]:
    """What a score-sharing owner records: its q and k projections (or GPT-2's packed one), by
    path inside the attention module."""
    roles = ("qkv",) if "qkv" in projections else DROPPED["scores"]
    return {role: projections[role].removeprefix(attention + ".") for role in roles}


class Borrowed(nn.Module):
    """A projection a borrowing layer no longer has (no parameters).

    For score sharing, ``q`` / ``k`` return the owner's projection outputs of this forward pass;
    for KV sharing, ``k`` / ``v`` return zeros, which the attention then discards (the cache
    proxy hands it the owner's keys/values instead).
    """

    def __init__(self, role: str, in_features: int, out_features: int):
        super().__init__()
        self.role, self.in_features, self.out_features = role, in_features, out_features
        self._slot: _Slot | None = None  # set by share(); a plain attribute

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._slot is None:  # kv sharing: discarded
            return x.new_zeros(*x.shape[:-1], self.out_features)
        output = self._slot.outputs.get(self.role)
        if output is None:
            raise RuntimeError(f"a borrowed {self.role} projection ran before its owner layer")
        return output

    def extra_repr(self) -> str:
        return f"role={self.role}, in_features={self.in_features}, " \
               f"out_features={self.out_features}"


register_module_type(
    Borrowed,
    lambda m: {"role": m.role, "in_features": m.in_features, "out_features": m.out_features},
    lambda f: Borrowed(str(f["role"]), int(f["in_features"]), int(f["out_features"])))


class PartialQKV(nn.Module):
    """GPT-2's packed q/k/v projection (``Conv1D``, weight ``[in, 3 E]``) of a borrowing layer:
    only the parts it keeps are stored (kv sharing: q; score sharing: v); the dropped parts are
    zeros (kv: discarded by the cache proxy) or the owner's (scores: its q/k, recorded from its
    packed projection in this forward pass)."""

    def __init__(self, keep: str, embed_dim: int):
        super().__init__()
        self.keep, self.embed_dim = keep, embed_dim
        self.weight = nn.Parameter(torch.empty(embed_dim, embed_dim))  # [in, out] as Conv1D
        self.bias = nn.Parameter(torch.empty(embed_dim))
        self._slot: _Slot | None = None

    @classmethod
    def from_conv1d(cls, conv: nn.Module, keep: str) -> PartialQKV:
        e = conv.weight.shape[0]
        part = "qkv".index(keep)
        module = cls(keep, e)
        with torch.no_grad():
            module.weight.copy_(conv.weight[:, part * e:(part + 1) * e])
            module.bias.copy_(conv.bias[part * e:(part + 1) * e])
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mine = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight)
        mine = mine.reshape(*x.shape[:-1], self.embed_dim)
        if self.keep == "q":  # kv sharing: k and v are discarded
            zeros = mine.new_zeros(*mine.shape[:-1], 2 * self.embed_dim)
            return torch.cat([mine, zeros], -1)
        owner = self._slot.outputs.get("qkv") if self._slot is not None else None
        if owner is None:
            raise RuntimeError("a borrowed q/k projection ran before its owner layer")
        return torch.cat([owner[..., : 2 * self.embed_dim], mine], -1)

    def extra_repr(self) -> str:
        return f"keep={self.keep}, embed_dim={self.embed_dim}"


register_module_type(PartialQKV, lambda m: {"keep": m.keep, "embed_dim": m.embed_dim},
                     lambda f: PartialQKV(str(f["keep"]), int(f["embed_dim"])))


class _CacheProxy:
    """The KV cache as one attention module of a sharing group sees it."""

    def __init__(self, cache: Any, share: _Share):
        self._cache, self._share = cache, share

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        share, cache = self._share, self._cache
        slot = share.slot
        if share.owner:
            if cache is not None:
                key_states, value_states = cache.update(key_states, value_states, layer_idx,
                                                        *args, **kwargs)
            slot.keys, slot.values = key_states, value_states
            return key_states, value_states
        if slot.keys is None:
            raise RuntimeError(f"layer {layer_idx} borrows attention from a layer that did not "
                               "run before it in this forward pass")
        if share.mode == "kv":
            return slot.keys, slot.values
        if cache is not None:  # scores: values only (keys of width 0)
            _, value_states = cache.update(key_states[..., :0], value_states, layer_idx,
                                           *args, **kwargs)
        return slot.keys, value_states

    def __getattr__(self, name: str) -> Any:
        if self._cache is None:
            raise AttributeError(name)
        return getattr(self._cache, name)


class _SharingMixin:
    """Forward of an attention module in a sharing group: the cache argument becomes a proxy."""

    _modelfold_share: _Share

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        share = self._modelfold_share
        index = _cache_index(type(self).__mro__[2])
        if "past_key_values" in kwargs or index is None or index >= len(args):
            kwargs["past_key_values"] = _CacheProxy(kwargs.get("past_key_values"), share)
        else:
            args = (*args[:index], _CacheProxy(args[index], share), *args[index + 1:])
        if not (share.owner and share.mode == "scores"):
            return super().forward(*args, **kwargs)
        share.slot.outputs = {}
        handles = [self.get_submodule(path).register_forward_hook(_Record(share.slot, role))
                   for role, path in share.records.items()]
        try:
            return super().forward(*args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()


class _Record:
    def __init__(self, slot: _Slot, role: str):
        self.slot, self.role = slot, role

    def __call__(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        self.slot.outputs[self.role] = output


_CACHE_INDEX: dict[type, int | None] = {}
_SUBCLASSES: dict[tuple[type, str], type] = {}


def _cache_index(cls: type) -> int | None:
    """Position of ``past_key_values`` among the positional arguments of ``cls.forward``."""
    if cls not in _CACHE_INDEX:
        names = list(inspect.signature(cls.forward).parameters)[1:]
        _CACHE_INDEX[cls] = names.index("past_key_values") if "past_key_values" in names \
            else None
    return _CACHE_INDEX[cls]


def _subclass(cls: type, role: str) -> type:
    """``Lending<cls>`` / ``Borrowing<cls>`` (one class object per base, so that a rebuilt
    checkpoint has the very classes it was saved with)."""
    key = (cls, role)
    if key not in _SUBCLASSES:
        _SUBCLASSES[key] = type(f"{role}{cls.__name__}", (_SharingMixin, cls),
                                {"__module__": __name__})
    return _SUBCLASSES[key]


def base_class(module: nn.Module) -> type:
    """The attention module's class before sharing."""
    cls = type(module)
    return cls.__mro__[2] if issubclass(cls, _SharingMixin) else cls


def is_sharing(module: nn.Module) -> bool:
    return isinstance(module, _SharingMixin)


def _borrow_projections(layer: nn.Module, projections: dict[str, str], mode: str,
                        slot: _Slot) -> list[tuple[str, nn.Module]]:
    """Put ``Borrowed`` (or, for a packed q/k/v projection, ``PartialQKV``) in place of what a
    borrowing layer drops; returns ``(path, module it replaced)`` for each replacement (none for
    a layer that already borrows, such as a rebuilt checkpoint)."""
    from modelfold.ir.modules import linear_shape

    replaced = []
    roles = ("qkv",) if "qkv" in projections else DROPPED[mode]
    for role in roles:
        path = projections[role]
        current = layer.get_submodule(path)
        if not isinstance(current, (Borrowed, PartialQKV)):
            replaced.append((path, current))
            current = PartialQKV.from_conv1d(current, "q" if mode == "kv" else "v") \
                if role == "qkv" else Borrowed(role, *linear_shape(current))
            layer.set_submodule(path, current)
        current._slot = slot if mode == "scores" else None
    return replaced


def _wire_groups(layers: nn.ModuleList, attention: str, projections: dict[str, str],
                 sharing: Sharing) -> Iterator[tuple[nn.Module, nn.Module, nn.Module,
                                                     list[tuple[str, nn.Module]]]]:
    """Subclass the attention modules of every group and give each borrower its borrowed
    projections; yields ``(owner attention, borrower layer, borrower attention, replaced)``
    per borrower, before the borrower's attention is wired (its q/k norms are the caller's)."""
    for group in sharing.groups:
        slot = _Slot()
        owner = layers[group[0]].get_submodule(attention)
        _wire(owner, "Lending", _Share(sharing.mode, True, slot, _records(attention, projections)))
        for index in group[1:]:
            attn = layers[index].get_submodule(attention)
            replaced = _borrow_projections(layers[index], projections, sharing.mode, slot)
            yield owner, layers[index], attn, replaced
            _wire(attn, "Borrowing", _Share(sharing.mode, False, slot))


def _score_norms(mode: str, attn: nn.Module, owner: nn.Module) -> list[str]:
    """The q/k norms a score borrower takes from its owner (Gemma 3)."""
    if mode != "scores":
        return []
    return [n for n in ("q_norm", "k_norm")
            if getattr(attn, n, None) is not None and getattr(owner, n, None) is not None]


def share(model: nn.Module, layers: nn.ModuleList, attention: str, projections: dict[str, str],
          sharing: Sharing) -> None:
    """Wire ``sharing`` into the model: subclass the attention modules of every group, replace
    the borrowers' dropped projections by ``Borrowed`` / ``PartialQKV`` (parameters must already
    be initialised, see ``modelfold.passes.share_attention``), tie score borrowers' q/k norms to
    the owner's, and record the sharing in the config. ``projections``: role -> path inside a
    layer (``arch.layer.attention_proj``)."""
    for owner, _, attn, _ in _wire_groups(layers, attention, projections, sharing):
        for norm in _score_norms(sharing.mode, attn, owner):
            for name, param in getattr(owner, norm).named_parameters(recurse=False):
                setattr(getattr(attn, norm), name, param)
    setattr(model.config, CONFIG_KEY, sharing.to_dict())


@contextlib.contextmanager
def trial(layers: nn.ModuleList, attention: str, projections: dict[str, str],
          sharing: Sharing) -> Iterator[None]:
    """The sharing wired in for the duration of the block, nothing dropped or tied for good:
    the dropped projections (and a score borrower's q/k norms) are set aside and put back, so an
    analysis can measure what sharing a pair of layers would do."""
    attentions = [layers[i].get_submodule(attention) for g in sharing.groups for i in g]
    classes = [(module, type(module)) for module in attentions]
    modules: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for owner, layer, attn, replaced in _wire_groups(layers, attention, projections, sharing):
            modules += [(layer, path, old) for path, old in replaced]
            for norm in _score_norms(sharing.mode, attn, owner):
                modules.append((attn, norm, getattr(attn, norm)))
                setattr(attn, norm, getattr(owner, norm))
        yield
    finally:
        for parent, path, old in reversed(modules):
            parent.set_submodule(path, old)
        for module, cls in classes:
            module.__class__ = cls
            module.__dict__.pop("_modelfold_share", None)


def _wire(module: nn.Module, role: str, share_: _Share) -> None:
    module.__class__ = _subclass(base_class(module), role)
    module._modelfold_share = share_


def restore_sharing(model: nn.Module) -> None:
    """Re-wire the sharing a rebuilt model's config records (checkpoint loading)."""
    sharing = sharing_of(model)
    if sharing is None:
        return
    from modelfold.ir.architecture import describe

    arch = describe(model)
    share(model, model.get_submodule(arch.layers), arch.layer.attention,
          arch.layer.attention_proj, sharing)


register_rebuild_hook(restore_sharing)


__all__ = ["CONFIG_KEY", "DROPPED", "MODES", "Borrowed", "PartialQKV", "Sharing", "base_class", "cache_kinds",
           "is_sharing", "restore_sharing", "share", "sharing_of", "trial"]
