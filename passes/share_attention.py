"""``share-attention``: layers reuse an earlier layer's attention (EchoAtt score sharing, CLA /
MLKV KV sharing; METHODS.md section 2).

- ``mode=scores`` (EchoAtt): in a group, the first layer computes the attention probabilities and
  the others reuse them with their own values and output projection; the borrowers drop W_Q / W_K
  (their q/k norms become the owner's) and their cache holds values only.
- ``mode=kv`` (CLA / MLKV): the layers of a group attend with their own queries to the keys and
  values of the group's first layer; the borrowers drop W_K / W_V and have no cache entry.

Groups are given (``groups=[[4,5,6],[10,11]]``: the first layer of each owns) or chosen:
``count=N`` borrowing layers picked by the ``attention-similarity`` analysis
(``strategy=similarity``: greedily the borrower that adds the least next-token KL as the analysis
measured it for each pair of layers, ``scores_kl`` or ``kv_kl``), at a fixed
stride (``stride``: CLA's every other layer when N = L/2) or at random (``random``, ``seed``). A
borrower's owner is the nearest earlier owner among the layers it can share with: layers share only
with layers of the same attention kind (sliding window or global), head size, KV heads and rotary
settings. ``init=owner`` keeps the owner's projections, ``average`` folds the group's dropped
projections into the owner's by MLKV's running pairwise average (``w <- (w + w_j) / 2`` for each
borrower in order).

The model keeps working as a transformers model (``modelfold.ir.shared_attention``): its
``generate`` uses a cache with entries only for what the layers keep, and the captured graph's
KV-cache inputs and outputs follow the sharing. Sharing nothing (``count=0``) is exact; anything
else is lossy, and recovers with uptraining (``modelfold finetune --teacher``), which trains the
attention modules (what is left of q/k/v and o, q/k norms) of every layer in a group; the rest
of the model is frozen.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from modelfold.errors import OptionError
from modelfold.ir.modules import is_linear, linear_shape
from modelfold.ir.program import Program
from modelfold.ir.shared_attention import DROPPED, Sharing, is_sharing, share, sharing_of
from modelfold.passes.attention_similarity import ANALYSIS_KEY
from modelfold.passes.base import Pass, PassConfig, PreconditionError, option
from modelfold.passes.registry import register_pass


class Groups(tuple):
    """``[[4,5,6],[10,11]]``: sharing groups, each a sorted list of two or more layers."""

    type_name = "list of layer lists, e.g. [[4,5,6],[10,11]]"

    @classmethod
    def from_option(cls, raw: Any, where: str) -> Groups:
        value = raw
        if isinstance(raw, str):
            try:
                value = json.loads(raw.replace(";", ",")) if raw.strip() else []
            except json.JSONDecodeError:
                raise OptionError(f"{where} must be a list of layer lists such as [[4,5,6],[10,11]]"
                                  f"; got {raw!r}") from None
        if not isinstance(value, (list, tuple)) or \
                not all(isinstance(g, (list, tuple)) for g in value):
            raise OptionError(f"{where} must be a list of layer lists such as [[4,5,6],[10,11]]; "
                              f"got {raw!r}")
        groups = []
        for group in value:
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in group):
                raise OptionError(f"{where}: group {list(group)} must hold layer indices")
            if len(group) < 2 or list(group) != sorted(set(group)):
                raise OptionError(f"{where}: group {list(group)} must list two or more different "
                                  "layers in increasing order (the first owns)")
            groups.append(tuple(group))
        seen = [i for g in groups for i in g]
        if len(seen) != len(set(seen)):
            raise OptionError(f"{where}: a layer is in more than one group ({value})")
        return cls(groups)

    def to_json(self) -> list[list[int]]:
        return [list(g) for g in self]

    def __str__(self) -> str:
        return json.dumps(self.to_json()).replace(" ", "")


@dataclass(frozen=True)
class ShareAttentionConfig(PassConfig):
    mode: Literal["scores", "kv"] = option(
        "kv", "scores: later layers of a group reuse the first layer's attention probabilities "
        "(EchoAtt; they keep V/O, their cache holds values); kv: they attend to the first layer's "
        "keys/values (CLA/MLKV; no cache of their own)")
    groups: Groups = option(Groups(), "explicit groups [[4,5,6],[10,11]] (first layer owns); "
                                      "or give count")
    count: int | None = option(None, "N: how many layers borrow (give up their own Q/K or K/V)")
    strategy: Literal["similarity", "stride", "random"] = option(
        "similarity", "how count picks the borrowers: similarity (least measured KL; needs "
        "attention-similarity first), stride (evenly spaced), random")
    init: Literal["owner", "average"] = option(
        "owner", "owner: keep the owner's projections; average: MLKV's running pairwise average "
        "of the group's shared projections")
    seed: int = option(0, "seed of strategy=random")

    def validate(self) -> None:
        if self.groups and self.count is not None:
            raise OptionError("share-attention: give either 'groups' or 'count', not both")
        if not self.groups and self.count is None:
            raise OptionError("share-attention needs 'groups' ([[4,5,6],[10,11]]) or 'count' "
                              "(how many layers borrow)")
        if self.count is not None and self.count < 0:
            raise OptionError(f"share-attention option 'count' must be >= 0; got {self.count}")


def layer_classes(program: Program) -> dict[tuple, list[int]]:
    """Layers that may share attention with each other: same attention kind (sliding window or
    global), head size, KV width and rotary settings."""
    arch, config = program.arch, program.module.config
    layers = program.module.get_submodule(arch.layers)
    types = getattr(config, "layer_types", None)
    classes: dict[tuple, list[int]] = {}
    for i, layer in enumerate(layers):
        attn = layer.get_submodule(arch.layer.attention)
        kind = types[i] if types else "full_attention"
        proj = arch.layer.attention_proj
        width = linear_shape(layer.get_submodule(proj["k"]))[1] if "k" in proj else \
            linear_shape(layer.get_submodule(proj["qkv"]))[1] // 3
        key = (kind, getattr(attn, "sliding_window", None), getattr(attn, "head_dim", None),
               width)
        classes.setdefault(key, []).append(i)
    return classes


def _describe_classes(classes: dict[tuple, list[int]]) -> str:
    return "; ".join(f"{list(layers)} ({key[0]}" + (f", window {key[1]}" if key[1] else "") + ")"
                     for key, layers in classes.items())


@register_pass
class ShareAttention(Pass):
    """Layers reuse an earlier layer's attention probabilities (scores) or keys/values (kv)."""

    name = "share-attention"
    config_class = ShareAttentionConfig
    kind = "lossy"
    summary = ("attention shared across layers: EchoAtt score sharing or CLA/MLKV KV sharing "
               "(groups, or count by similarity / stride / random), a smaller KV cache")

    def requires(self, program: Program) -> None:
        arch = program.arch
        if arch.kind != "causal-lm":
            raise PreconditionError(f"share-attention: {arch.family} is an encoder; attention "
                                    "sharing is for decoders with a KV cache")
        roles = arch.layer.attention_proj
        if "qkv" in roles and self.config.init == "average":
            raise PreconditionError(
                f"share-attention: init=average is not built for {arch.family}'s packed q/k/v "
                f"projection ({roles['qkv']}); use init=owner")
        if sharing_of(program.module) is not None:
            raise PreconditionError("share-attention: the model already shares attention "
                                    "between layers; share the original model once")
        layers = program.module.get_submodule(arch.layers)
        for i, layer in enumerate(layers):
            if is_sharing(layer.get_submodule(arch.layer.attention)):
                raise PreconditionError(f"share-attention: layer {i} already shares attention")
            for role in [r for r in ("q", "k", "v", "qkv") if r in roles]:
                proj = layer.get_submodule(roles[role])
                if not is_linear(proj):
                    raise PreconditionError(
                        f"share-attention: layer {i}'s {role} projection is a "
                        f"{type(proj).__name__}; share attention first, then quantize / sparsify"
                        " / add LoRA")
        n = arch.num_layers
        for group in self.config.groups:
            if group[-1] >= n:
                raise PreconditionError(f"share-attention: group {list(group)} names layer "
                                        f"{group[-1]}, but the model has layers 0..{n - 1}")
        if self.config.groups:
            self._check_groups(program, [list(g) for g in self.config.groups])
        if self.config.count and self.config.strategy == "similarity" and \
                ANALYSIS_KEY not in program.analyses:
            raise PreconditionError(
                "share-attention{strategy=similarity} needs the attention-similarity analysis: "
                "run 'attention-similarity,share-attention{...}' (or choose strategy=stride / "
                "random)")

    def kind_for(self, program: Program) -> str:
        return "exact" if not self.config.groups and not self.config.count else "lossy"

    @staticmethod
    def _check_groups(program: Program, groups: list[list[int]]) -> None:
        classes = layer_classes(program)
        of = {i: key for key, layers in classes.items() for i in layers}
        for group in groups:
            kinds = {of[i] for i in group}
            if len(kinds) > 1:
                raise PreconditionError(
                    f"share-attention: group {group} mixes layers with different attention "
                    "(sliding window vs global, head size, KV heads or rotary settings); layers "
                    f"that can be grouped: {_describe_classes(classes)}")

    def choose(self, program: Program) -> list[list[int]]:
        """The groups: given, or ``count`` borrowers picked by the strategy."""
        cfg = self.config
        if cfg.groups:
            return [list(g) for g in cfg.groups]
        if not cfg.count:
            return []
        classes = [layers for layers in layer_classes(program).values()]
        eligible = [i for layers in classes for i in layers[1:]]
        if cfg.count > len(eligible):
            raise PreconditionError(
                f"share-attention: count={cfg.count} borrowing layers, but only {len(eligible)} "
                "layers have an earlier layer to share with (the first layer of each kind owns): "
                f"{_describe_classes(layer_classes(program))}")
        if cfg.strategy == "random":
            borrowers = set(random.Random(cfg.seed).sample(eligible, cfg.count))
        elif cfg.strategy == "stride":
            borrowers = _stride(classes, cfg.count)
        else:
            analysis = program.analyses[ANALYSIS_KEY]
            measured = f"{cfg.mode}_kl"
            if measured not in analysis:
                raise PreconditionError(
                    f"share-attention{{strategy=similarity}} picks borrowers by the measured "
                    f"'{measured}' of attention-similarity, which it did not measure (run it "
                    "with kl_tokens > 0)")
            borrowers = _by_cost(classes, cfg.count, analysis[measured])
        return _groups_of(classes, borrowers)

    def run(self, program: Program) -> dict[str, Any]:
        cfg = self.config
        arch = program.arch
        groups = self.choose(program)
        before = program.signature.cache.bytes_per_token
        analysis = program.analyses.get(ANALYSIS_KEY)
        measured = None
        if analysis is not None and f"{cfg.mode}_kl" in analysis:
            kl = analysis[f"{cfg.mode}_kl"]
            measured = {str(b): round(kl[g[0]][b], 5) for g in groups for b in g[1:]}
        if not groups:
            return {"mode": cfg.mode, "groups": [], "borrowers": [], "kv_bytes_per_token":
                    {"before": before, "after": before}}
        sharing = Sharing.from_groups(cfg.mode, arch.num_layers, groups)
        layers = program.module.get_submodule(arch.layers)
        if cfg.init == "average":
            with torch.no_grad():
                for group in groups:
                    _average(layers, arch, group, cfg.mode)
        share(program.module, layers, arch.layer.attention, arch.layer.attention_proj, sharing)
        # uptraining (``modelfold finetune``) trains the attention of the layers that share
        for p in program.module.parameters():
            p.requires_grad_(False)
        for group in groups:
            for i in group:
                for p in layers[i].get_submodule(arch.layer.attention).parameters():
                    p.requires_grad_(True)
        program.invalidate()
        after = program.signature.cache.bytes_per_token
        return {"mode": cfg.mode, "groups": groups, "borrowers": sharing.borrowers,
                "dropped": [f"{r}_proj" for r in DROPPED[cfg.mode]], "init": cfg.init,
                "measured_kl_alone": measured,
                "kv_bytes_per_token": {"before": before, "after": after}}


def _stride(classes: list[list[int]], count: int) -> set[int]:
    """``count`` borrowers spread evenly: within each kind of layer, position ``j`` borrows when
    ``floor((j + 1) n / m) > floor(j n / m)`` (every other layer for n = m / 2), the counts split
    across kinds in proportion to their sizes."""
    total = sum(len(c) - 1 for c in classes)
    shares = [count * (len(c) - 1) // total if total else 0 for c in classes]
    for k in sorted(range(len(classes)), key=lambda k: -len(classes[k]))[:count - sum(shares)]:
        shares[k] += 1
    borrowers = set()
    for layers, n in zip(classes, shares):
        m = len(layers)
        borrowers |= {layers[j] for j in range(m) if (j + 1) * n // m > j * n // m}
    return borrowers


def _owner_map(classes: list[list[int]], borrowers: set[int]) -> dict[int, int]:
    owners = {}
    for layers in classes:
        current = layers[0]
        for i in layers:
            if i not in borrowers:
                current = i
            owners[i] = current
    return owners


def _by_cost(classes: list[list[int]], count: int, cost: list[list[float]]) -> set[int]:
    """Greedy: ``count`` times, add the borrower that makes the summed cost of every borrower
    with the owner it would have smallest (a pick moves later borrowers to an earlier owner);
    a negative cost means "not measured" and rules that pairing out."""
    borrowers: set[int] = set()
    candidates = [i for layers in classes for i in layers[1:]]
    for _ in range(count):
        best, best_total = None, float("inf")
        for j in candidates:
            if j in borrowers:
                continue
            trial = _owner_map(classes, borrowers | {j})
            costs = [cost[trial[b]][b] for b in borrowers | {j}]
            total = float("inf") if min(costs) < 0 else sum(costs)
            if total < best_total or best is None:
                best, best_total = j, total
        borrowers.add(best)
    return borrowers


def _groups_of(classes: list[list[int]], borrowers: set[int]) -> list[list[int]]:
    owners = _owner_map(classes, borrowers)
    groups: dict[int, list[int]] = {}
    for i in sorted(owners):
        groups.setdefault(owners[i], []).append(i)
    return [g for _, g in sorted(groups.items()) if len(g) > 1]


def _average(layers: nn.ModuleList, arch: Any, group: list[int], mode: str) -> None:
    """MLKV's fold: the owner's shared tensors become the running pairwise average of the
    group's (``w <- (w + w_j) / 2`` for each later layer j)."""
    owner = layers[group[0]]
    paths = [arch.layer.attention_proj[r] for r in DROPPED[mode]]
    norms = {"kv": ("k_norm",), "scores": ("q_norm", "k_norm")}[mode]
    paths += [f"{arch.layer.attention}.{n}" for n in norms
              if hasattr(owner.get_submodule(arch.layer.attention), n)]
    for path in paths:
        for name, param in owner.get_submodule(path).named_parameters(recurse=False):
            value = param.detach().float()
            for j in group[1:]:
                value = (value + getattr(layers[j].get_submodule(path), name).detach().float()) / 2
            param.copy_(value.to(param.dtype))


__all__ = ["Groups", "ShareAttention", "ShareAttentionConfig", "layer_classes"]
