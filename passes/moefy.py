"""``moefy``: dense-to-MoE conversion. Each selected layer's FFN becomes ``E`` experts carved from
its neurons, with a router that picks ``top_k`` of them per token (METHODS.md section 3:
MoEfication, LLaMA-MoE, Read-ME).

Neurons -> experts (``split``), every expert the same number of neurons:

- ``random``: a seeded permutation (LLaMA-MoE's random split);
- ``cluster``: balanced k-means (deferred-acceptance assignment with equal capacities) on the
  L2-normalised weight rows of each neuron (gate and up rows
  side by side for a gated FFN, fc_in rows for a dense one): MoEfication / LLaMA-MoE's parameter
  clustering;
- ``coactivation``: balanced k-means on each neuron's activation pattern over calibration tokens
  (which tokens it is among the token's most active ``active_fraction`` of neurons), so neurons
  that fire together share an expert (MoEfication's co-activation graph, without METIS).

``shared=S`` first takes the S neurons that are strongly active on every calibration sequence
(the smallest, over sequences, of the neuron's mean ``|h|`` relative to the layer's) into an
always-active shared expert, in the spirit of Read-ME's shared expert (the intersection of its
domain masks).

Router (a linear map ``[E, H]`` without bias, as Mixtral's):

- ``centroid``: row ``e`` is the mean normalised gate (fc_in) row of expert ``e``: MoEfication's
  similarity router as a dot product;
- ``trained``: from the centroids, trained on the layer's cached input hidden states with
  binary cross-entropy against each expert's share of the output: ``||W_down,e h_e(x)||``,
  normalised by the batch maximum (MoEfication's MLP-router recipe, target by output norm since a
  SwiGLU activation is signed); Adam, ``router_lr``, ``router_epochs``, 90/10 split.

Weights of the chosen experts (``weights``): ``unit`` (each contributes as in the dense FFN;
``top_k = experts`` is exact) or ``softmax`` (Mixtral's renormalised probabilities, the down
projections scaled by ``top_k``; needed for a Mixtral / Qwen2-MoE checkpoint). The report gives
expert sizes, the per-layer routing load on held-out calibration tokens (plotted), the held-out
top-k recall of each router and the fraction of FFN parameters active per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from modelfold.errors import OptionError
from modelfold.ir.modules import is_linear, linear_weight, replace_module
from modelfold.ir.moe import Expert, MoEFFN, moe_layers, route
from modelfold.ir.program import Program
from modelfold.passes.base import Pass, PreconditionError, option
from modelfold.passes.calibration import CalibrationConfig, calibration_option
from modelfold.passes.registry import register_pass


@dataclass(frozen=True)
class MoefyConfig(CalibrationConfig):
    experts: int = option(8, "E: experts per converted FFN (its neurons split evenly)")
    top_k: int = option(2, "experts each token uses (top_k = experts with weights=unit is exact)")
    split: Literal["random", "cluster", "coactivation"] = option(
        "cluster", "neurons -> experts: random, cluster (balanced k-means on normalised gate/up "
        "rows), coactivation (balanced k-means on activation patterns)")
    shared: int = option(0, "neurons of an always-active shared expert (0: none)")
    router: Literal["centroid", "trained"] = option(
        "trained", "centroid (mean normalised gate row per expert) or trained on calibration "
        "hidden states")
    weights: Literal["unit", "softmax"] = option(
        "unit", "chosen experts' weights: unit (as in the dense FFN) or softmax (Mixtral's "
        "renormalised probabilities; what Mixtral / Qwen2-MoE checkpoints compute)")
    layers: tuple[int, ...] = option((), "layer indices to convert (default: all)")
    router_epochs: int = option(30, "epochs of router training")
    router_lr: float = option(0.01, "Adam learning rate of router training")
    active_fraction: float = option(0.1, "a neuron is active on a token when it is among the "
                                         "token's top fraction by |h| (split=coactivation)")
    kmeans_iters: int = option(20, "balanced k-means iterations")
    n_samples: int = calibration_option("n_samples", 16)
    seq_len: int = calibration_option("seq_len", 256)

    def validate(self) -> None:
        if self.experts < 2:
            raise OptionError(f"moefy option 'experts' must be >= 2; got {self.experts}")
        if not 1 <= self.top_k <= self.experts:
            raise OptionError(f"moefy option 'top_k' must be in 1..experts ({self.experts}); "
                              f"got {self.top_k}")
        if self.shared < 0:
            raise OptionError(f"moefy option 'shared' must be >= 0; got {self.shared}")
        if not 0 < self.active_fraction < 1:
            raise OptionError("moefy option 'active_fraction' must be in (0, 1); got "
                              f"{self.active_fraction}")
        if self.router_epochs < 0 or self.router_lr <= 0 or self.kmeans_iters < 1:
            raise OptionError("moefy options router_epochs >= 0, router_lr > 0, kmeans_iters "
                              ">= 1")


@dataclass
class _Dense:
    """A dense FFN's weights as ``[out, in]`` float tensors."""

    w1: torch.Tensor  # gate (gated) or fc_in  [I, H]
    w3: torch.Tensor | None  # up (gated)  [I, H]
    w2: torch.Tensor  # down / fc_out  [H, I]
    b1: torch.Tensor | None  # fc_in bias  [I]
    b2: torch.Tensor | None  # output bias  [H]
    activation: str

    @property
    def size(self) -> int:
        return self.w1.shape[0]

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """Neuron activations ``h`` ``[N, I]`` of inputs ``x`` ``[N, H]``."""
        from modelfold.ir.moe import _activation

        act = _activation(self.activation)
        h = F.linear(x, self.w1, self.b1)
        return act(h) * F.linear(x, self.w3) if self.w3 is not None else act(h)


@register_pass
class Moefy(Pass):
    """Dense FFNs -> mixtures of experts (experts carved from the neurons, a router, top-k)."""

    name = "moefy"
    config_class = MoefyConfig
    kind = "lossy"
    exact_rtol = 2e-5
    summary = ("dense-to-MoE: FFN neurons split into experts (random / cluster / coactivation, "
               "optional shared expert), centroid or trained router, top-k")

    def kind_for(self, program: Program) -> str:
        cfg = self.config
        return "exact" if cfg.top_k == cfg.experts and cfg.weights == "unit" else "lossy"

    def requires(self, program: Program) -> None:
        arch, cfg = program.arch, self.config
        if arch.mlp_type == "moe" or moe_layers(program.module):
            raise PreconditionError(f"moefy: the model ({arch.family}) is already a mixture of "
                                    "experts")
        if not arch.layer.mlp:
            raise PreconditionError(
                f"moefy: {arch.family}'s FFN is not one module in its layers (its fc1/fc2 sit "
                "directly in the layer); supported families have an 'mlp' module: gated "
                "(Llama, Qwen2, Mistral, Gemma, ...), GPT-2, Phi")
        n = arch.num_layers
        bad = [i for i in cfg.layers if not 0 <= i < n]
        if bad:
            raise PreconditionError(f"moefy: layers {bad} do not exist (the model has layers "
                                    f"0..{n - 1})")
        for i in self.selected(program):
            dense = self._roles(program, i)
            for role, module in dense.items():
                if not is_linear(module):
                    raise PreconditionError(
                        f"moefy: layer {i}'s {role} projection is a {type(module).__name__}; "
                        "convert the dense model first, then quantize / sparsify / add LoRA")
            size = linear_weight(dense["down" if "down" in dense else "fc_out"]).shape[1]
            rest = size - cfg.shared
            if rest <= 0 or rest % cfg.experts:
                raise PreconditionError(
                    f"moefy: layer {i}'s FFN has {size} neurons; {size} - shared ({cfg.shared})"
                    f" = {rest} must split into {cfg.experts} equal experts (choose experts / "
                    "shared so that it divides)")
        if cfg.split == "coactivation" or cfg.router == "trained" or cfg.shared:
            cfg.require_text(program, f"moefy{{split={cfg.split},router={cfg.router}}} "
                                      "collects activations")

    def selected(self, program: Program) -> list[int]:
        return sorted(self.config.layers) or list(range(program.arch.num_layers))

    @staticmethod
    def _roles(program: Program, i: int) -> dict[str, nn.Module]:
        layer = program.module.get_submodule(program.arch.layers)[i]
        return {role: layer.get_submodule(path)
                for role, path in program.arch.layer.mlp_proj.items()}

    def _dense(self, program: Program, i: int) -> _Dense:
        roles = self._roles(program, i)
        gated = "gate" in roles
        first, out = (roles["gate"], roles["down"]) if gated else (roles["fc_in"],
                                                                    roles["fc_out"])
        up = roles.get("up")
        if gated and (getattr(first, "bias", None) is not None or up.bias is not None):
            raise PreconditionError(f"moefy: layer {i}'s gate/up projections have biases; "
                                    "gated FFNs with biases are not supported")
        return _Dense(w1=linear_weight(first).detach().float(),
                      w3=linear_weight(up).detach().float() if gated else None,
                      w2=linear_weight(out).detach().float(),
                      b1=None if first.bias is None else first.bias.detach().float(),
                      b2=None if out.bias is None else out.bias.detach().float(),
                      activation=program.arch.activation)

    # -- calibration ---------------------------------------------------------------------------
    @torch.no_grad()
    def _inputs(self, program: Program, layers: list[int]) -> tuple[dict[int, torch.Tensor],
                                                                     torch.Tensor]:
        """The FFN inputs ``[N, H]`` of every selected layer on calibration text (and the ids)."""
        cfg = self.config
        ids = cfg.calibration_ids(program)
        stack = program.module.get_submodule(program.arch.layers)
        seen: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
        handles = [stack[i].get_submodule(program.arch.layer.mlp).register_forward_hook(
            lambda m, args, out, i=i: seen[i].append(args[0].detach().reshape(
                -1, args[0].shape[-1]).float())) for i in layers]
        try:
            for batch in tqdm(cfg.batches(ids), desc="moefy calibration", unit="batch",
                              leave=False):
                program.module_logits(batch)
        finally:
            for h in handles:
                h.remove()
        return {i: torch.cat(v) for i, v in seen.items()}, ids

    # -- the pass ------------------------------------------------------------------------------
    def run(self, program: Program) -> dict[str, Any]:
        cfg, arch = self.config, program.arch
        layers = self.selected(program)
        inputs, ids = self._inputs(program, layers)
        tokens = next(iter(inputs.values())).shape[0]
        held = torch.arange(tokens) % 10 == 9  # every tenth token: held out for the report
        gen = torch.Generator().manual_seed(cfg.seed)
        per_layer, loads = [], []
        for i in tqdm(layers, desc="moefy", unit="layer", leave=False):
            dense = self._dense(program, i)
            x = inputs[i]
            h = dense.hidden(x)
            shared = _shared_neurons(h, ids.shape[0], cfg.shared)
            keep = torch.ones(dense.size, dtype=torch.bool)
            keep[shared] = False
            rest = torch.nonzero(keep).flatten()
            groups = self._split(dense, h, rest, gen)
            centroids = _centroids(dense.w1, groups)
            fit, router = x[~held], centroids
            recall = {"centroid": _recall(x[held], h[held], dense, groups, centroids, cfg.top_k)}
            if cfg.router == "trained":
                router = _train_router(fit, h[~held], dense, groups, centroids, cfg)
                recall["trained"] = _recall(x[held], h[held], dense, groups, router, cfg.top_k)
            module = _build(dense, groups, shared, router, cfg)
            layer = program.module.get_submodule(arch.layers)[i]
            replace_module(layer, arch.layer.mlp, module.to(dtype=_dtype(layer)))
            _, index = route(F.linear(x[held], router), cfg.top_k, cfg.weights)
            load = torch.bincount(index.flatten(), minlength=cfg.experts).float()
            load = (load / load.sum()).tolist()
            loads.append(load)
            per_layer.append({
                "layer": i, "expert_size": int(groups.shape[1]), "shared": len(shared),
                "top_k_recall": {k: round(v, 4) for k, v in recall.items()},
                "max_load": round(max(load) * cfg.experts, 3),
                "active_ffn_fraction": round((cfg.top_k * groups.shape[1] + len(shared))
                                             / dense.size, 4)})
        for p in program.module.parameters():  # recovery trains routers (and experts) only
            p.requires_grad_(False)
        for m in moe_layers(program.module).values():
            m.router.weight.requires_grad_(True)
        program.invalidate()
        total = sum(_ffn_params(program, i) for i in range(arch.num_layers))
        active = sum(_ffn_params(program, i, active=True) for i in range(arch.num_layers))
        return {"experts": cfg.experts, "top_k": cfg.top_k, "split": cfg.split,
                "router": cfg.router, "weights": cfg.weights, "shared": cfg.shared,
                "layers": per_layer, "load": loads,
                "ffn_params": total, "active_ffn_params_per_token": active,
                "active_ffn_fraction": round(active / total, 4) if total else None,
                "held_out_tokens": int(held.sum()), **cfg.calibration_facts(ids)}

    def _split(self, dense: _Dense, h: torch.Tensor, rest: torch.Tensor,
               gen: torch.Generator) -> torch.Tensor:
        """``[E, I / E]`` neuron indices of each expert (from ``rest``)."""
        cfg = self.config
        e = cfg.experts
        if cfg.split == "random":
            return rest[torch.randperm(len(rest), generator=gen)].reshape(e, -1).sort(1).values
        if cfg.split == "cluster":
            feats = [F.normalize(dense.w1[rest], dim=1)]
            if dense.w3 is not None:
                feats.append(F.normalize(dense.w3[rest], dim=1))
            features = torch.cat(feats, 1)
        else:
            a = h[:, rest].abs()
            top = max(1, int(round(cfg.active_fraction * h.shape[1])))
            threshold = h.abs().topk(top, dim=1).values[:, -1:]
            features = (a >= threshold).float().t()  # [R, N] activation pattern
        labels = balanced_kmeans(F.normalize(features, dim=1), e, cfg.kmeans_iters, gen)
        return torch.stack([rest[labels == c] for c in range(e)]).sort(1).values


def balanced_kmeans(features: torch.Tensor, k: int, iters: int, gen: torch.Generator
                    ) -> torch.Tensor:
    """Labels ``[R]`` of ``k`` equal clusters of unit rows ``features`` ``[R, D]`` (cosine):
    each round assigns the points with capacity ``R / k`` per cluster (``_assign``), then moves
    the centroids to the normalised means, until the labels stop changing."""
    r = features.shape[0]
    cap = r // k
    centroids = features[torch.randperm(r, generator=gen)[:k]].clone()
    labels = torch.full((r,), -1, dtype=torch.long)
    for _ in range(iters):
        new = _assign(features @ centroids.t(), cap)
        if torch.equal(new, labels):
            break
        labels = new
        onehot = F.one_hot(labels, k).to(features.dtype)  # [R, k]
        centroids = F.normalize(onehot.t() @ features, dim=1)
    return labels


def _assign(sim: torch.Tensor, cap: int) -> torch.Tensor:
    """Points ``[R]`` -> clusters with at most ``cap`` each, by deferred acceptance: points
    propose to clusters in order of similarity, each cluster keeps its ``cap`` most similar
    proposers and rejects the rest, who propose to their next choice (a stable assignment)."""
    r, k = sim.shape
    pref = torch.argsort(sim, dim=1, descending=True)
    step = torch.zeros(r, dtype=torch.long)
    labels = torch.full((r,), -1, dtype=torch.long)
    while True:
        free = torch.nonzero(labels < 0).flatten()
        if not len(free):
            return labels
        labels[free] = pref[free, step[free]]
        step[free] += 1
        for c in range(k):
            members = torch.nonzero(labels == c).flatten()
            if len(members) > cap:
                keep = torch.zeros(len(members), dtype=torch.bool)
                keep[sim[members, c].topk(cap).indices] = True
                labels[members[~keep]] = -1


def _shared_neurons(h: torch.Tensor, sequences: int, count: int) -> torch.Tensor:
    """The ``count`` neurons whose mean ``|h|`` (relative to the layer's) is highest on every
    calibration sequence: ranked by the smallest value over sequences."""
    if not count:
        return torch.zeros(0, dtype=torch.long)
    per_seq = h.abs().reshape(sequences, -1, h.shape[1]).mean(1)  # [S, I]
    score = (per_seq / per_seq.mean(1, keepdim=True)).min(0).values
    return torch.topk(score, count).indices.sort().values


def _centroids(w1: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    rows = F.normalize(w1, dim=1)
    return torch.stack([rows[g].mean(0) for g in groups])


def _expert_mass(h: torch.Tensor, dense: _Dense, groups: torch.Tensor) -> torch.Tensor:
    """``[N, E]``: the norm of each expert's contribution to the FFN output."""
    return torch.stack([(h[:, g] @ dense.w2[:, g].t()).norm(dim=1) for g in groups], 1)


def _recall(x: torch.Tensor, h: torch.Tensor, dense: _Dense, groups: torch.Tensor,
            router: torch.Tensor, k: int) -> float:
    """Held-out: the fraction of each token's top-k experts by output mass that the router picks."""
    truth = _expert_mass(h, dense, groups).topk(k, dim=1).indices
    picked = (x @ router.t()).topk(k, dim=1).indices
    hits = (truth[:, :, None] == picked[:, None, :]).any(-1).float()
    return float(hits.mean())


def _train_router(x: torch.Tensor, h: torch.Tensor, dense: _Dense, groups: torch.Tensor,
                  init: torch.Tensor, cfg: MoefyConfig) -> torch.Tensor:
    """A linear router trained with BCE against the normalised expert output mass."""
    target = _expert_mass(h, dense, groups)
    weight = nn.Parameter(init.clone())
    opt = torch.optim.Adam([weight], lr=cfg.router_lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    batch = 512
    with torch.enable_grad():
        for _ in range(cfg.router_epochs):
            for idx in torch.randperm(len(x), generator=gen).split(batch):
                t = target[idx]
                t = t / t.max().clamp_min(1e-12)
                loss = F.binary_cross_entropy_with_logits(x[idx] @ weight.t(), t)
                opt.zero_grad()
                loss.backward()
                opt.step()
    return weight.detach()


def _build(dense: _Dense, groups: torch.Tensor, shared: torch.Tensor, router: torch.Tensor,
           cfg: MoefyConfig) -> MoEFFN:
    gated = dense.w3 is not None
    e, size = groups.shape
    module = MoEFFN(dense.w2.shape[0], size, e, cfg.top_k, activation=dense.activation,
                    gated=gated, weighting=cfg.weights, expert_bias=dense.b1 is not None,
                    out_bias=dense.b2 is not None, shared_size=len(shared))
    scale = float(cfg.top_k) if cfg.weights == "softmax" else 1.0
    with torch.no_grad():
        module.router.weight.copy_(router)
        for expert, idx in zip(module.experts, groups):
            _fill(expert, dense, idx, scale)
        if module.shared is not None:
            _fill(module.shared, dense, shared, 1.0)
        if dense.b2 is not None:
            module.bias.copy_(dense.b2)
    return module


def _fill(expert: Expert, dense: _Dense, idx: torch.Tensor, scale: float) -> None:
    first = expert.gate_proj if dense.w3 is not None else expert.up_proj
    first.weight.copy_(dense.w1[idx])
    if dense.b1 is not None:
        first.bias.copy_(dense.b1[idx])
    if dense.w3 is not None:
        expert.up_proj.weight.copy_(dense.w3[idx])
    expert.down_proj.weight.copy_(dense.w2[:, idx] * scale)


def _dtype(layer: nn.Module) -> torch.dtype:
    return next(p.dtype for p in layer.parameters() if p.is_floating_point())


def _ffn_params(program: Program, i: int, *, active: bool = False) -> int:
    """Parameters of layer ``i``'s FFN (those a token uses when ``active``; router included)."""
    mlp = program.module.get_submodule(program.arch.layers)[i].get_submodule(
        program.arch.layer.mlp)
    if isinstance(mlp, MoEFFN):
        per_expert = sum(p.numel() for p in mlp.experts[0].parameters())
        count = mlp.top_k if active else mlp.num_experts
        rest = sum(p.numel() for p in mlp.router.parameters())
        rest += sum(p.numel() for p in mlp.shared.parameters()) if mlp.shared is not None else 0
        rest += mlp.bias.numel() if mlp.bias is not None else 0
        return count * per_expert + rest
    return sum(p.numel() for p in mlp.parameters())


def plot(details: dict[str, Any], path: Path) -> bool:
    """Routing load per layer and expert (held-out tokens), and the routers' top-k recall."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    load = np.array(details["load"], dtype=float)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 0.3 * len(load) + 2.5))
    image = ax.imshow(load * load.shape[1], cmap="coolwarm", vmin=0, vmax=2, aspect="auto")
    ax.set_yticks(range(len(load)), [str(r["layer"]) for r in details["layers"]])
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title("routing load / uniform share (held-out tokens)", fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.046)
    for name in details["layers"][0]["top_k_recall"]:
        bx.plot([r["layer"] for r in details["layers"]],
                [r["top_k_recall"][name] for r in details["layers"]], "o-", label=name)
    bx.axhline(details["top_k"] / details["experts"], color="#adb5bd", ls="--",
               label="random router")
    bx.set_xlabel("layer")
    bx.set_ylabel(f"top-{details['top_k']} recall")
    bx.set_title("router picks vs the experts with the largest output", fontsize=10)
    bx.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


Moefy.plot = staticmethod(plot)

__all__ = ["Moefy", "MoefyConfig", "balanced_kmeans"]
