"""``lora``: wrap linear layers in ``LoraLinear`` with a named low-rank adapter.

Initialisations (``init``; see METHODS.md section 6):

- ``lora``: ``A`` kaiming-uniform, ``B = 0`` (PEFT's default); the model is unchanged;
- ``pissa``: ``A``, ``B`` from the top ``rank`` singular triplets of ``W`` (split as
  ``sqrt(S)``), the base becomes ``W - s B A``; unchanged up to float rounding. Float bases only:
  put ``lora{init=pissa}`` before ``quantize`` to quantize the residual;
- ``xs`` (LoRA-XS): frozen ``B = U_r``, ``A = S_r V_r^T``, trainable ``r x r`` core ``R = 0``
  (the reference draws ``N(0, 1e-5)``; zero keeps the model exact and its gradient is non-zero);
- ``sb`` (LoRA-SB): the first full fine-tuning update is estimated as ``-lr * sign(sum grad W)``
  over ``n_samples`` calibration sequences; ``B = U_r``, ``A = V_r^T``, ``R = S_r / s`` from its
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

from modelfold.errors import OptionError
from modelfold.ir.lora import LoraAdapter, LoraLinear, lora_layers
from modelfold.ir.modules import is_linear, linear_shape, linear_weight, replace_module, to_storage
from modelfold.ir.program import Program
from modelfold.ir.quant import QuantLinear, W8A8Linear
from modelfold.ir.sparse import is_sparse_layer
from modelfold.ir.targets import SELECT, Selection, Skip, TargetSpec, select_layers
from modelfold.passes.base import Pass, PassError, PreconditionError, option
from modelfold.passes.calibration import CalibrationConfig, calibration_option
from modelfold.passes.registry import register_pass

INITS = ("lora", "pissa", "xs", "sb", "nola")


@dataclass(frozen=True)
class LoraConfig(CalibrationConfig):
    # calibration (LoRA-SB's gradient estimate only)
    n_samples: int = calibration_option("n_samples", 16)
    seq_len: int = calibration_option("seq_len", 256)
    batch_size: int = calibration_option("batch_size", 4)
    seed: int = option(0, "seed of the random initialisations and of the calibration sampling")
    rank: int = option(8, "adapter rank r (LoRA-XS / LoRA-SB: the size of the r x r core)")
    alpha: float | None = option(None, "scaling numerator: scaling = alpha / rank "
                                       "(alpha / sqrt(rank) with rslora); default: alpha = rank")
    dropout: float = option(0.0, "dropout on the adapter input during training")
    targets: TargetSpec = option(TargetSpec(("all-linear",)), "layers to adapt: 'all-linear', "
                                 "bare names matched as path suffixes (q_proj), globs over module "
                                 "paths (model.layers.1*.mlp.*), or 're:<regex>'")
    exclude: TargetSpec = option(TargetSpec(), "layers to leave alone (same syntax)")
    init: Literal["lora", "pissa", "xs", "sb", "nola"] = option(
        "lora", "initialisation: lora (B=0), pissa, xs (LoRA-XS), sb (LoRA-SB), nola")
    name: str = option("default", "adapter name (several named adapters may coexist)")
    rslora: bool = option(False, "rank-stabilised scaling alpha / sqrt(rank)")
    rank_cap: bool = option(False, "cap the rank at min(in, out) per layer instead of failing")
    nola_k: int = option(64, "NOLA: random bases per factor")
    sb_lr: float = option(1e-3, "LoRA-SB: learning rate of the estimated first update")

    def validate(self) -> None:
        if self.rank < 1:
            raise OptionError(f"lora option 'rank' must be >= 1; got {self.rank}")
        if self.alpha is not None and self.alpha <= 0:
            raise OptionError(f"lora option 'alpha' must be > 0; got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise OptionError(f"lora option 'dropout' must be in [0, 1); got {self.dropout}")
        if not self.targets:
            raise OptionError("lora option 'targets' is empty; use 'all-linear' or name layers")
        if not re.fullmatch(r"[A-Za-z0-9_\-]+", self.name):
            raise OptionError(f"lora option 'name' must be letters, digits, '_' or '-'; "
                             f"got {self.name!r}")
        if self.nola_k < 1:
            raise OptionError(f"lora option 'nola_k' must be >= 1; got {self.nola_k}")
        if self.sb_lr <= 0:
            raise OptionError(f"lora option 'sb_lr' must be > 0; got {self.sb_lr}")


def is_adaptable(module: nn.Module) -> bool:
    """A layer LoRA can wrap: linear, ``Conv1D``, or a quantized linear."""
    return is_linear(module) or isinstance(module, (QuantLinear, W8A8Linear))


def _classify(path: str, module: nn.Module):
    if isinstance(module, LoraLinear):
        return SELECT  # another adapter on an adapted layer
    if is_sparse_layer(module):
        return Skip("N:M sparse layer: LoRA on a sparse base is not supported; no adapter")
    return SELECT if is_adaptable(module) else None


def find_lora_targets(program: Program, targets: TargetSpec, exclude: TargetSpec) -> Selection:
    """The layers of the stack that ``lora`` adapts (``LoraLinear`` s count as their own path).

    Raises:
        TargetError: a pattern matches no adaptable layer, or nothing is left to adapt.
    """
    return select_layers(program.module, program.arch, targets, exclude, _classify, what="lora",
                         refuse_tied=False, require_any=True)


@register_pass
class Lora(Pass):
    """Low-rank adapters on linear layers (LoRA, PiSSA, LoRA-XS, LoRA-SB, NOLA)."""

    name = "lora"
    config_class = LoraConfig
    kind = "exact"
    summary = "low-rank adapters (lora, pissa, xs, sb, nola) on linear layers; trainable, PEFT-compatible"

    def kind_for(self, program: Program) -> str:
        # LoRA-SB starts from an estimated first update, so it changes the outputs on purpose.
        return "lossy" if self.config.init == "sb" else "exact"

    def requires(self, program: Program) -> None:
        cfg = self.config
        if cfg.init == "sb":
            cfg.require_text(program, "lora init=sb estimates gradients on text")
        for path, layer in lora_layers(program.module).items():
            if cfg.name in layer.adapters:
                raise PreconditionError(f"{path} already has an adapter named {cfg.name!r}; "
                                        "give the new one another name=")

    def rank_for(self, path: str, module: nn.Module) -> int:
        k, n = linear_shape(module.base_layer if isinstance(module, LoraLinear) else module)
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
        selection = find_lora_targets(program, cfg.targets, cfg.exclude)
        selected, skipped = dict(selection.items()), selection.skipped
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
                w = linear_weight(wrapper.base_layer).float()
                u, sv, vh = torch.linalg.svd(w, full_matrices=False)
                root = torch.sqrt(sv[:rank] / s)
                ad.lora_A.copy_(root[:, None] * vh[:rank])
                ad.lora_B.copy_(u[:, :rank] * root[None, :])
                ad.lora_A0.copy_(ad.lora_A)
                ad.lora_B0.copy_(ad.lora_B)
                residual = w - s * (ad.lora_B @ ad.lora_A)
                wrapper.base_layer.weight.copy_(to_storage(wrapper.base_layer, residual))
            elif kind == "xs":
                w = linear_weight(wrapper.base_layer).float()
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

        cfg = self.config
        ids = cfg.calibration_ids(program)
        module = program.module
        grads = {p: torch.zeros(*linear_shape(m)[::-1]) for p, m in selected.items()}
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
            for x in tqdm(cfg.batches(ids), desc="lora-sb gradients", leave=False,
                          disable=ids.shape[0] <= cfg.batch_size):
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
