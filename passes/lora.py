"""``lora``: wrap linear layers in ``LoraLinear`` with a named low-rank adapter.

Initialisations (``init``; see METHODS.md section 6):

- ``lora``: ``A`` kaiming-uniform, ``B = 0`` (PEFT's default); the model is unchanged;
- ``pissa``: ``A``, ``B`` from the top ``rank`` singular triplets of ``W`` (split as
  ``sqrt(S)``), the base becomes ``W - s B A``; unchanged up to float rounding. Float bases only:
  put ``lora{init=pissa}`` before ``quantize`` to quantize the residual;
- ``xs`` (LoRA-XS): frozen ``B = U_r``, ``A = S_r V_r^T``, trainable ``r x r`` core ``R = 0``
  (the reference draws ``N(0, 1e-5)``; zero keeps the model exact and its gradient is non-zero);
- ``sb`` (LoRA-SB): the first full fine-tuning update is estimated as ``-lr * sign(sum grad W)``
  over ``sb_samples`` calibration sequences; ``B = U_r``, ``A = V_r^T``, ``R = S_r / s`` from its
  SVD. The model changes by that (truncated) first step, so the pass is reported as lossy;
- ``nola``: ``A = A_0 + sum alpha_i A_i``, ``B = sum beta_j B_j`` over ``nola_k`` seeded random
  bases, ``alpha = beta = 0``; only the coefficients are stored.

Every parameter of the model is frozen except the new adapter's trainable tensors, which is what
the fine-tuning engine (``modelfold.train``) trains. Running the pass again with another
``name`` adds a second adapter to the same layers.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from modelfold.ir.lora import LoraAdapter, LoraLinear, base_shape, base_weight, lora_layers
from modelfold.ir.program import Program
from modelfold.ir.sparse import is_sparse_layer
from modelfold.passes.base import Pass, PassConfig, PassError, PreconditionError, option
from modelfold.passes.quantize import is_linear, matches, replace_module
from modelfold.passes.registry import register_pass

INITS = ("lora", "pissa", "xs", "sb", "nola")
ALL_LINEAR = "all-linear"


@dataclass(frozen=True)
class LoraConfig(PassConfig):
    rank: int = option(8, "adapter rank r (LoRA-XS / LoRA-SB: the size of the r x r core)")
    alpha: float | None = option(None, "scaling numerator: scaling = alpha / rank "
                                       "(alpha / sqrt(rank) with rslora); default: alpha = rank")
    dropout: float = option(0.0, "dropout on the adapter input during training")
    targets: tuple[str, ...] = option((ALL_LINEAR,), "layers to adapt: 'all-linear', bare names "
                                      "matched as path suffixes (q_proj), globs over module paths "
                                      "(model.layers.1*.mlp.*), or 're:<regex>'")
    exclude: tuple[str, ...] = option((), "layers to leave alone (same syntax)")
    init: Literal["lora", "pissa", "xs", "sb", "nola"] = option(
        "lora", "initialisation: lora (B=0), pissa, xs (LoRA-XS), sb (LoRA-SB), nola")
    name: str = option("default", "adapter name (several named adapters may coexist)")
    rslora: bool = option(False, "rank-stabilised scaling alpha / sqrt(rank)")
    rank_cap: bool = option(False, "cap the rank at min(in, out) per layer instead of failing")
    nola_k: int = option(64, "NOLA: random bases per factor")
    sb_samples: int = option(16, "LoRA-SB: calibration sequences for the gradient estimate")
    sb_seq_len: int = option(256, "LoRA-SB: tokens per sequence")
    sb_lr: float = option(1e-3, "LoRA-SB: learning rate of the estimated first update")
    corpus: str = option("wikipedia", "LoRA-SB calibration corpus ('random' for tiny models)")
    seed: int = option(0, "seed of the random initialisations")

    def validate(self) -> None:
        if self.rank < 1:
            raise ValueError(f"lora option 'rank' must be >= 1; got {self.rank}")
        if self.alpha is not None and self.alpha <= 0:
            raise ValueError(f"lora option 'alpha' must be > 0; got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora option 'dropout' must be in [0, 1); got {self.dropout}")
        if not self.targets:
            raise ValueError("lora option 'targets' is empty; use 'all-linear' or name layers")
        if not re.fullmatch(r"[A-Za-z0-9_\-]+", self.name):
            raise ValueError(f"lora option 'name' must be letters, digits, '_' or '-'; "
                             f"got {self.name!r}")
        for opt in ("nola_k", "sb_samples", "sb_seq_len"):
            if getattr(self, opt) < 1:
                raise ValueError(f"lora option '{opt}' must be >= 1; got {getattr(self, opt)}")
        if self.sb_lr <= 0:
            raise ValueError(f"lora option 'sb_lr' must be > 0; got {self.sb_lr}")
        for pattern in (*self.targets, *self.exclude):
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as exc:
                    raise ValueError(f"lora pattern {pattern!r} is not a valid regex: {exc}") \
                        from None


def _patterns(patterns: tuple[str, ...]) -> tuple[str, ...]:
    """PEFT-style bare names (``q_proj``) become suffix globs (``*.q_proj``)."""
    out = []
    for p in patterns:
        if p == ALL_LINEAR:
            out.append("*")
        elif p.startswith("re:") or any(c in p for c in "*?[."):
            out.append(p)
        else:
            out.append(f"*.{p}")
    return tuple(out)


def is_adaptable(module: nn.Module) -> bool:
    """A layer LoRA can wrap: linear, ``Conv1D``, or a quantized linear."""
    from modelfold.ir.quant import QuantLinear, W8A8Linear

    return is_linear(module) or isinstance(module, (QuantLinear, W8A8Linear))


def find_lora_targets(program: Program, targets: tuple[str, ...], exclude: tuple[str, ...]
                      ) -> tuple[dict[str, nn.Module], list[dict[str, str]]]:
    """Adaptable layers in the layer stack selected by the patterns (``LoraLinear`` s count as
    their own path), and the selected layers that are skipped, with the reason.

    Raises:
        PassError: a pattern matches no adaptable layer.
    """
    arch = program.arch
    stack = program.module.get_submodule(arch.layers)
    experts = arch.layer.mlp_proj.get("experts")
    router = arch.layer.mlp_proj.get("router")
    inc, exc = _patterns(targets), _patterns(exclude)
    candidates: dict[str, nn.Module] = {}
    skipped: list[dict[str, str]] = []
    for index, layer in enumerate(stack):
        prefix = f"{arch.layers}.{index}."
        inside_lora: list[str] = []
        for rel, module in layer.named_modules():
            path = prefix + rel
            if any(path.startswith(p + ".") for p in inside_lora):
                continue
            if experts and rel == experts:
                if matches(path, inc) and not matches(path, exc):
                    skipped.append({"target": path, "reason": "MoE experts are batched 3-D "
                                    "tensors, not linear layers; no adapter"})
                continue
            if isinstance(module, LoraLinear):
                inside_lora.append(path)
            elif is_sparse_layer(module):
                if matches(path, inc) and not matches(path, exc):
                    skipped.append({"target": path, "reason": "N:M sparse layer: LoRA on a "
                                    "sparse base is not supported; no adapter"})
                continue
            elif not is_adaptable(module):
                continue
            if router and rel == router and matches(path, inc) and not matches(path, exc):
                skipped.append({"target": path, "reason": "MoE router: left without an adapter"})
                continue
            candidates[path] = module
    for raw, pattern in zip(targets, inc):
        if not any(matches(p, (pattern,)) for p in candidates):
            example = next(iter(candidates), "(none found)")
            raise PassError(f"lora option 'targets': {raw!r} matches no linear layer (layers "
                            f"are named like '{example}')")
    for raw, pattern in zip(exclude, exc):
        if not any(matches(p, (pattern,)) for p in candidates):
            raise PassError(f"lora option 'exclude': {raw!r} matches no linear layer")
    selected = {p: m for p, m in candidates.items() if matches(p, inc) and not matches(p, exc)}
    if not selected:
        raise PassError("lora: the targets minus the exclusions leave no layer to adapt")
    return selected, skipped


@register_pass
class Lora(Pass):
    """Low-rank adapters on linear layers (LoRA, PiSSA, LoRA-XS, LoRA-SB, NOLA)."""

    name = "lora"
    config_class = LoraConfig
    kind = "exact"
    summary = "low-rank adapters (lora, pissa, xs, sb, nola) on linear layers; trainable, PEFT-compatible"

    def __init__(self, config: LoraConfig | None = None, **options: Any):
        super().__init__(config, **options)
        # LoRA-SB starts from an estimated first update, so it changes the outputs on purpose.
        self.kind = "lossy" if self.config.init == "sb" else "exact"

    def requires(self, program: Program) -> None:
        cfg = self.config
        if cfg.init == "sb" and cfg.corpus != "random" and program.tokenizer is None:
            raise PreconditionError("lora init=sb estimates gradients on text and needs a "
                                    "tokenizer; load the model with one, or use corpus=random")
        for path, layer in lora_layers(program.module).items():
            if cfg.name in layer.adapters:
                raise PreconditionError(f"{path} already has an adapter named {cfg.name!r}; "
                                        "give the new one another name=")

    def rank_for(self, path: str, module: nn.Module) -> int:
        k, n = base_shape(module.base_layer if isinstance(module, LoraLinear) else module)
        limit = min(k, n)
        if self.config.rank <= limit:
            return self.config.rank
        if self.config.rank_cap:
            return limit
        raise PassError(f"lora option 'rank': {self.config.rank} is above min(in, out) = {limit} "
                        f"of {path} ({n}x{k}); lower the rank, exclude the layer, or set "
                        "rank_cap=true")

    def run(self, program: Program) -> dict[str, Any]:
        cfg = self.config
        selected, skipped = find_lora_targets(program, cfg.targets, cfg.exclude)
        ranks = {p: self.rank_for(p, m) for p, m in selected.items()}
        if cfg.init == "pissa":
            for path, m in selected.items():
                base = m.base_layer if isinstance(m, LoraLinear) else m
                if not is_linear(base):
                    raise PassError(f"lora init=pissa rewrites the base weight, and {path} is a "
                                    f"packed {type(base).__name__}; run lora{{init=pissa}} before "
                                    "quantize (the residual is then quantized), or use init=lora")
        for p in program.module.parameters():
            p.requires_grad_(False)
        grads = self._sb_gradients(program, selected) if cfg.init == "sb" else {}
        gen = torch.Generator().manual_seed(cfg.seed)
        layers = []
        for index, (path, module) in enumerate(selected.items()):
            wrapper = module if isinstance(module, LoraLinear) else LoraLinear(module)
            adapter = self._init_adapter(wrapper, ranks[path], gen, grads.get(path), index)
            wrapper.add_adapter(cfg.name, adapter)
            if wrapper is not module:
                replace_module(program.module, path, wrapper)
            layers.append({"path": path, "shape": [wrapper.out_features, wrapper.in_features],
                           "rank": ranks[path], "trainable": adapter.trainable_count()})
        for wrapper in lora_layers(program.module).values():
            for name, adapter in wrapper.adapters.items():
                if name == cfg.name:
                    for p in adapter.parameters():
                        p.requires_grad_(_trainable(adapter, p))
        trainable = sum(e["trainable"] for e in layers)
        total = program.parameter_count()
        return {"adapter": cfg.name, "init": cfg.init, "layers_adapted": len(layers),
                "layers": layers, "trainable_parameters": trainable,
                "trainable_fraction": trainable / max(total, 1),
                "scaling": (cfg.alpha or cfg.rank) / (math.sqrt(cfg.rank) if cfg.rslora else cfg.rank),
                "skipped": skipped}

    # -- initialisations -------------------------------------------------------------------------
    def _init_adapter(self, wrapper: LoraLinear, rank: int, gen: torch.Generator,
                      grad: torch.Tensor | None, index: int) -> LoraAdapter:
        cfg = self.config
        alpha = cfg.alpha if cfg.alpha is not None else float(cfg.rank)
        if cfg.rank_cap and rank != cfg.rank and cfg.alpha is None:
            alpha = float(rank)
        kind = cfg.init
        ad = LoraAdapter(kind, wrapper.in_features, wrapper.out_features, rank, alpha,
                         dropout=cfg.dropout, rslora=cfg.rslora, nola_k=cfg.nola_k,
                         seed=cfg.seed * 1_000_003 + index)
        s = ad.scaling
        with torch.no_grad():
            if kind == "lora":
                nn.init.kaiming_uniform_(ad.lora_A, a=math.sqrt(5), generator=gen)
            elif kind == "pissa":
                w = base_weight(wrapper.base_layer).float()
                u, sv, vh = torch.linalg.svd(w, full_matrices=False)
                root = torch.sqrt(sv[:rank] / s)
                ad.lora_A.copy_(root[:, None] * vh[:rank])
                ad.lora_B.copy_(u[:, :rank] * root[None, :])
                ad.lora_A0.copy_(ad.lora_A)
                ad.lora_B0.copy_(ad.lora_B)
                residual = w - s * (ad.lora_B @ ad.lora_A)
                target = residual.t() if type(wrapper.base_layer).__name__ == "Conv1D" else residual
                wrapper.base_layer.weight.copy_(target)
            elif kind == "xs":
                w = base_weight(wrapper.base_layer).float()
                u, sv, vh = torch.linalg.svd(w, full_matrices=False)
                ad.lora_B.copy_(u[:, :rank])
                ad.lora_A.copy_(sv[:rank, None] * vh[:rank])
            elif kind == "sb":
                update = -cfg.sb_lr * torch.sign(grad)
                u, sv, vh = torch.linalg.svd(update, full_matrices=False)
                ad.lora_B.copy_(u[:, :rank])
                ad.lora_A.copy_(vh[:rank])
                ad.lora_R.copy_(torch.diag(sv[:rank] / s))
        return ad

    def _sb_gradients(self, program: Program, selected: dict[str, nn.Module]
                      ) -> dict[str, torch.Tensor]:
        """Sum over calibration sequences of dL/dW for every selected layer (``[out, in]``),
        collected with hooks, so packed (quantized) bases work too."""
        from tqdm.auto import tqdm

        from modelfold.passes.calibration import calibration_batches

        cfg = self.config
        ids = calibration_batches(program, corpus=cfg.corpus, n_samples=cfg.sb_samples,
                                  seq_len=cfg.sb_seq_len, seed=cfg.seed)
        module = program.module
        grads = {p: torch.zeros(*base_shape(m)[::-1]) for p, m in selected.items()}
        handles = []

        def hook_for(path: str):
            def forward_hook(mod, inputs, output):
                x = inputs[0].detach()

                def grad_hook(g):
                    g2 = g.reshape(-1, g.shape[-1]).float()
                    grads[path].add_(g2.t() @ x.reshape(-1, x.shape[-1]).float())
                output.register_hook(grad_hook)
            return forward_hook

        for path, m in selected.items():
            handles.append(m.register_forward_hook(hook_for(path)))
        emb = module.get_input_embeddings()
        handles.append(emb.register_forward_hook(lambda mod, i, out: out.requires_grad_()))
        was_training = module.training
        module.eval()
        try:
            batch = 4
            for start in tqdm(range(0, ids.shape[0], batch), desc="lora-sb gradients",
                              leave=False, disable=ids.shape[0] <= batch):
                x = ids[start:start + batch]
                logits = module(input_ids=x, use_cache=False).logits
                loss = torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1))
                loss.backward()
        finally:
            for h in handles:
                h.remove()
            module.train(was_training)
        return grads


def _trainable(adapter: LoraAdapter, p: nn.Parameter) -> bool:
    if adapter.kind in ("lora", "pissa"):
        return p is adapter.lora_A or p is adapter.lora_B
    if adapter.kind in ("xs", "sb"):
        return p is adapter.lora_R
    return p is adapter.nola_alpha or p is adapter.nola_beta


def mark_trainable(module: nn.Module, names: list[str] | None = None) -> int:
    """Freeze every parameter, then unfreeze the trainable tensors of the named (default: active)
    adapters; returns the number of trainable parameters."""
    for p in module.parameters():
        p.requires_grad_(False)
    count = 0
    for layer in lora_layers(module).values():
        for name in (names if names is not None else layer.active):
            if name in layer.adapters:
                ad = layer.adapters[name]
                for p in ad.parameters():
                    if _trainable(ad, p):
                        p.requires_grad_(True)
                        count += p.numel()
    return count


__all__ = ["Lora", "LoraConfig", "find_lora_targets", "mark_trainable"]
