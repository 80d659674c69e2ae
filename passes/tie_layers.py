"""``tie-layers``: turn an N-layer stack into K unique layers applied in a loop (Relaxed
Recursive Transformers, Bae et al. 2024; METHODS.md section 1).

Depth ``l`` (0-based) runs shared layer ``share(l)``:

- ``sharing=cycle``: ``l mod K`` (the block of K layers is looped ``B = N / K`` times; K must
  divide N);
- ``sharing=sequence``: ``floor(l * K / N)`` (each shared layer runs ``~B`` times in a row).

Shared layer ``k`` is initialised from the original layers (``init``):

- ``stepwise``: layer ``s_k`` with ``s = round(linspace(0, N - 1, K))`` (first and last kept);
- ``average``: the mean of the layers that will share it;
- ``lower``: layer ``k``.

Every parameter of a layer (attention and MLP weights and biases, norm weights) is shared: each
depth keeps its own module (so module paths, ``layer_idx`` and the KV cache stay per effective
depth), and its tensors become the very ``Parameter`` objects of the shared layer. Embeddings,
the final norm and the LM head are outside the loop and untouched.

Relaxation (``relax_rank=r`` or ``full``): every linear layer of every depth gets a LoRA adapter
(``LoraLinear``, adapter ``relax``, scaling 1) initialised from the truncated SVD of its residual
``W_l - W'_share(l)`` (``B = U_r S_r``, ``A = V_r^T``), the rank capped at ``min(in, out)``. With
relaxation each depth also keeps its own 1-D tensors (norm weights, biases; ``relax_vectors``),
so at full rank the model computes the original function up to float rounding. The relaxed
model trains the shared weights, the adapters and the per-depth vectors (``modelfold.train``
with a teacher for distillation); embeddings and the LM head stay frozen.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from modelfold.errors import OptionError
from modelfold.ir.lora import LoraAdapter, LoraLinear
from modelfold.ir.modules import from_storage, is_linear, linear_shape, linear_weight, replace_module
from modelfold.ir.program import Program
from modelfold.ir.tying import parameter_uses, tied_groups
from modelfold.passes.base import Pass, PassConfig, PreconditionError, option
from modelfold.passes.registry import register_pass

INITS = ("stepwise", "average", "lower")
SHARINGS = ("cycle", "sequence")


@dataclass(frozen=True)
class TieLayersConfig(PassConfig):
    unique: int = option(0, "K: number of unique (shared) layers; 1 <= K <= N")
    init: Literal["stepwise", "average", "lower"] = option(
        "stepwise", "shared-layer initialisation: stepwise (evenly spaced layers, ends kept), "
        "average (mean of the layers sharing it), lower (the first K layers)")
    sharing: Literal["cycle", "sequence"] = option(
        "cycle", "depth -> shared layer: cycle (l mod K; K must divide N) or sequence "
        "(floor(l*K/N): repeats in a row)")
    relax_rank: int | Literal["full"] = option(
        0, "per-depth LoRA relaxation rank r from the SVD of W_l - W_shared (0: none; 'full': "
        "min(in, out) per layer, which reproduces the original)")
    relax_vectors: bool = option(True, "with relaxation, each depth keeps its own 1-D tensors "
                                 "(norm weights, biases) so full rank is exact; false shares them")
    adapter: str = option("relax", "name of the relaxation adapters")

    def validate(self) -> None:
        if self.unique < 1:
            raise OptionError(f"tie-layers option 'unique' (K, the number of shared layers) must be "
                             f">= 1; got {self.unique}")
        if isinstance(self.relax_rank, int) and self.relax_rank < 0:
            raise OptionError(f"tie-layers option 'relax_rank' must be >= 0 or 'full'; "
                             f"got {self.relax_rank}")
        if not self.adapter.replace("_", "").replace("-", "").isalnum():
            raise OptionError(f"tie-layers option 'adapter' must be letters, digits, '_' or '-'; "
                             f"got {self.adapter!r}")

    @property
    def relaxed(self) -> bool:
        return self.relax_rank == "full" or self.relax_rank > 0


def depth_map(num_layers: int, unique: int, sharing: str) -> list[int]:
    """Shared-layer index of each depth ``0 .. N-1``."""
    if sharing == "cycle":
        if num_layers % unique:
            raise PreconditionError(
                f"tie-layers: K={unique} does not divide the {num_layers} layers, which cycle "
                f"sharing needs (depth l runs shared layer l mod K); choose K among "
                f"{[k for k in range(1, num_layers + 1) if num_layers % k == 0]} or use "
                "sharing=sequence")
        return [d % unique for d in range(num_layers)]
    return [d * unique // num_layers for d in range(num_layers)]


def stepwise_sources(num_layers: int, unique: int) -> list[int]:
    """``round(linspace(0, N - 1, K))``: the original layer each shared layer copies."""
    if unique == 1:
        return [0]
    return [int(round(i * (num_layers - 1) / (unique - 1))) for i in range(unique)]


def _layer_params(layer: nn.Module) -> dict[str, nn.Parameter]:
    return dict(layer.named_parameters(remove_duplicate=False))


def _set_param(layer: nn.Module, name: str, param: nn.Parameter) -> None:
    owner, _, attr = name.rpartition(".")
    setattr(layer.get_submodule(owner) if owner else layer, attr, param)


def check_stack(program: Program) -> nn.ModuleList:
    """The layer stack, if its layers are plain and alike (same parameter names, shapes, dtypes).

    Raises:
        PreconditionError: layers differ, carry rewritten modules, or are already tied.
    """
    stack = program.module.get_submodule(program.arch.layers)
    first = {n: (tuple(p.shape), p.dtype) for n, p in _layer_params(stack[0]).items()}
    for index, layer in enumerate(stack):
        foreign = [type(m).__name__ for m in layer.modules()
                   if type(m).__module__.startswith("modelfold.")]
        if foreign:
            raise PreconditionError(
                f"tie-layers: layer {index} contains {foreign[0]} (a rewritten layer); tie layers "
                "first and quantize / sparsify / add LoRA afterwards")
        here = {n: (tuple(p.shape), p.dtype) for n, p in _layer_params(layer).items()}
        if here != first:
            diff = sorted(set(here.items()) ^ set(first.items()))[:3]
            raise PreconditionError(
                f"tie-layers: layer {index} does not have the parameters of layer 0 (differs in "
                f"{', '.join(f'{n} {list(s)} {d}' for n, (s, d) in diff)}); only identical "
                "layers can share weights")
    if any(count > 1 for count in parameter_uses(stack).values()):
        raise PreconditionError("tie-layers: the layer stack already shares parameters between "
                                "layers (tie-layers ran before); tie the original model once")
    return stack


@register_pass
class TieLayers(Pass):
    """Share the weights of N layers among K unique layers, with per-depth LoRA relaxation."""

    name = "tie-layers"
    config_class = TieLayersConfig
    kind = "lossy"
    # Full rank computes W'x + B(Ax) instead of Wx: SmolLM2's logits (|max| ~ 30) moved 1.4e-4.
    exact_rtol = 2e-5
    summary = ("layer tying into K recursive layers (stepwise/average/lower init, cycle/sequence "
               "sharing) with per-depth SVD-initialised LoRA relaxation")

    def requires(self, program: Program) -> None:
        n, k = program.arch.num_layers, self.config.unique
        if k > n:
            raise PreconditionError(f"tie-layers: unique={k} is more than the model's {n} layers; "
                                    f"choose 1 <= K <= {n}")
        depth_map(n, k, self.config.sharing)
        check_stack(program)

    def kind_for(self, program: Program) -> str:
        # Exact when nothing is shared (K = N) or everything is relaxed at full rank (MoE expert
        # tensors are shared without relaxation).
        full = self.config.relax_rank == "full" and program.arch.mlp_type != "moe"
        return "exact" if self.config.unique == program.arch.num_layers or full else "lossy"

    def run(self, program: Program) -> dict[str, Any]:
        cfg = self.config
        arch = program.arch
        module = program.module
        stack = module.get_submodule(arch.layers)  # checked by requires()
        n, k = arch.num_layers, cfg.unique
        share = depth_map(n, k, cfg.sharing)
        groups = [[d for d in range(n) if share[d] == j] for j in range(k)]
        originals = [_layer_params(layer) for layer in stack]
        names = list(originals[0])
        block_before = _unique_count(stack)

        if cfg.init == "stepwise":
            sources = stepwise_sources(n, k)
        elif cfg.init == "lower":
            sources = list(range(k))
        else:
            sources = None
        shared: list[dict[str, nn.Parameter]] = []
        with torch.no_grad():
            for j in range(k):
                params = {}
                for name in names:
                    if sources is not None:
                        value = originals[sources[j]][name].detach().clone()
                    else:
                        members = torch.stack([originals[d][name].detach().float()
                                               for d in groups[j]])
                        value = members.mean(0).to(originals[0][name].dtype)
                    params[name] = nn.Parameter(value)
                shared.append(params)

        keep_vectors = cfg.relaxed and cfg.relax_vectors
        for depth, layer in enumerate(stack):
            for name in names:
                if keep_vectors and originals[depth][name].dim() == 1:
                    continue  # stays the depth's own (original) tensor
                _set_param(layer, name, shared[share[depth]][name])

        relaxation: dict[str, Any] = {}
        skipped: list[dict[str, str]] = []
        if cfg.relaxed:
            relaxation, skipped = self._relax(program, stack, originals, share)
        for p in module.parameters():
            p.requires_grad_(False)
        for p in stack.parameters():
            p.requires_grad_(True)
        for name, p in stack.named_parameters():
            if name.endswith(("lora_A0", "lora_B0")):
                p.requires_grad_(False)

        block_after = _unique_count(stack, adapters=False)
        adapters = _unique_count(stack, adapters=True) - block_after
        vectors = sum(p.numel() for d in range(n) for nm, p in originals[d].items()
                      if keep_vectors and p.dim() == 1)
        details: dict[str, Any] = {
            "layers": n, "unique": k, "loops": n / k, "init": cfg.init, "sharing": cfg.sharing,
            "depth_to_shared": share,
            "shared_sources": sources if sources is not None else groups,
            "block_parameters_before": block_before,
            "block_parameters_shared": block_after - vectors,
            "per_depth_vector_parameters": vectors,
            "relaxation_parameters": adapters,
            "block_parameters_after": block_after + adapters,
            "block_reduction": block_before / max(block_after + adapters, 1),
            "unique_parameters": program.parameter_count(),
            "kv_cache": f"per effective depth: {n} entries (each depth keeps its module and "
                        "layer_idx)",
            "skipped": skipped,
        }
        if relaxation:
            details.update(relaxation)
        if program.arch.tied_embeddings:
            details["embeddings"] = "tied embedding / LM head left as they were (outside the loop)"
        return details

    # -- relaxation ------------------------------------------------------------------------------
    def _relax(self, program: Program, stack: nn.ModuleList,
               originals: list[dict[str, nn.Parameter]], share: list[int]
               ) -> tuple[dict[str, Any], list[dict[str, str]]]:
        cfg = self.config
        arch = program.arch
        experts = arch.layer.mlp_proj.get("experts")
        skipped: list[dict[str, str]] = []
        per_depth: list[dict[str, Any]] = []
        ranks: dict[str, int] = {}
        from tqdm.auto import tqdm

        linears = [rel for rel, m in stack[0].named_modules() if is_linear(m)]
        if experts:
            for depth in range(len(stack)):
                skipped.append({"target": f"{arch.layers}.{depth}.{experts}",
                                "reason": "MoE expert tensors are shared without relaxation "
                                "(LoRA adapts linear layers only); full rank is not exact"})
        bar = tqdm(total=len(stack) * len(linears), desc="tie-layers: SVD relaxation",
                   unit="layer", leave=False, mininterval=2.0)
        for depth, layer in enumerate(stack):
            entry: dict[str, Any] = {"depth": depth, "shared": share[depth], "layers": {}}
            for rel in linears:
                base = layer.get_submodule(rel)
                k_in, n_out = linear_shape(base)
                cap = min(k_in, n_out)
                rank = cap if cfg.relax_rank == "full" else min(int(cfg.relax_rank), cap)
                ranks[rel] = rank
                original = originals[depth][f"{rel}.weight"]
                w = from_storage(base, original)
                residual = (w.detach().double() - linear_weight(base).detach().double())
                adapter = LoraAdapter("lora", k_in, n_out, rank, alpha=float(rank))
                u, s, vh = torch.linalg.svd(residual, full_matrices=False)
                with torch.no_grad():
                    adapter.lora_B.copy_((u[:, :rank] * s[:rank]).to(adapter.lora_B.dtype))
                    adapter.lora_A.copy_(vh[:rank].to(adapter.lora_A.dtype))
                total = float((s ** 2).sum())
                norm_w = float(w.detach().double().norm() ** 2)
                entry["layers"][rel] = {
                    "residual": total / max(norm_w, 1e-30),
                    "after": float((s[rank:] ** 2).sum()) / max(norm_w, 1e-30),
                }
                wrapper = LoraLinear(base)
                wrapper.add_adapter(cfg.adapter, adapter)
                replace_module(layer, rel, wrapper)
                bar.update(1)
            per_depth.append(entry)
        bar.close()
        facts = {
            "relax_rank": cfg.relax_rank, "adapter": cfg.adapter, "relax_ranks": ranks,
            "relax_vectors": cfg.relax_vectors,
            "residual_by_depth": [
                {"depth": e["depth"], "shared": e["shared"],
                 "residual": _mean(v["residual"] for v in e["layers"].values()),
                 "after_relaxation": _mean(v["after"] for v in e["layers"].values())}
                for e in per_depth],
        }
        return facts, skipped

    @staticmethod
    def plot(details: dict[str, Any], path: Path) -> bool:
        """Per depth: relative residual ||W_l - W'||^2 / ||W_l||^2 before and after relaxation."""
        rows = details.get("residual_by_depth")
        if not rows:
            return False
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.25), 3.4))
        x = [r["depth"] for r in rows]
        ax.bar(x, [r["residual"] for r in rows], color="#adb5bd", label="tied (no relaxation)")
        ax.bar(x, [r["after_relaxation"] for r in rows], color="#1c7ed6",
               label=f"relaxed, rank {details['relax_rank']}")
        ax.set_xlabel("depth (shared layer index above each bar)")
        ax.set_ylabel("||W - W_eff||^2 / ||W||^2")
        for r in rows:
            ax.text(r["depth"], r["residual"], str(r["shared"]), ha="center", va="bottom",
                    fontsize=7)
        ax.set_title(f"tie-layers: K={details['unique']} of {details['layers']} "
                     f"({details['init']}, {details['sharing']})")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return True


def _mean(values: Any) -> float:
    values = list(values)
    return sum(values) / max(len(values), 1)


def _unique_count(stack: nn.Module, adapters: bool = False) -> int:
    """Unique parameters in the layer stack (each shared tensor once); LoRA adapters included
    only with ``adapters``."""
    seen: dict[int, int] = {}
    for name, p in stack.named_parameters(remove_duplicate=False):
        if not adapters and ".adapters." in f".{name}":
            continue
        seen[id(p)] = p.numel()
    return sum(seen.values())


__all__ = ["TieLayers", "TieLayersConfig", "depth_map", "stepwise_sources", "tied_groups"]
