"""Sparsity-aware training (CAST-style): recover the quality N:M pruning loses, ending exactly N:M.

    result = modelfold.transform("smollm2-135m", "nm-sparsify{n=2,m=4,method=sparsegpt}")
    teacher = modelfold.load("smollm2-135m").module
    report = sparse_train(result, teacher=teacher, steps=150, lr=1e-4)

Every N:M layer of the layer stack (``NMLinear``; or, with ``n``/``m`` given, every dense linear of
the stack, for training from the dense model) becomes a ``SparseTrainLinear`` holding a *dense*
trainable weight ``W``, a per-output-channel scale ``s`` and a keep mask ``M`` (the top-``n``
``|W|`` of every group of ``m``). The fine-tuning engine (``modelfold.finetune.train``) trains
them, with distillation from the dense model when a teacher is given (AST's 0.33 CE + 0.67 KL by
default). After every optimizer step (``CastSchedule.after_step``):

- **mask** recomputed from ``|W|`` every ``mask_every`` steps (10, CAST's T1) until the hardening
  point, then frozen;
- **soft mask**: the forward uses ``s * W * (M + alpha_t (1 - M))``, ``alpha_t`` falling linearly
  from ``alpha`` to 0 at ``harden_at * steps``; from there on the forward is exactly N:M. The
  gradient reaches every weight (straight-through), so a dropped weight can grow back and win its
  group;
- **adaptive L1 decay** on the dropped weights only: a proximal step
  ``w <- sign(w) max(|w| - lr_t * lambda_t, 0)`` with ``lambda_t`` rising linearly to ``decay`` at
  the hardening point, so the weights the mask will drop shrink continuously;
- **weight scaling**: ``s`` (initialised to 1, trained) offsets the magnitude the decay and the
  pruning take from each output channel while keeping the pattern.

At the end every layer is hardened into an ``NMLinear`` (values ``s * W`` at the mask), checked
against the N:M invariant, so the model exports and quantizes like a one-shot pruned one.

Deviations from the paper (METHODS.md): CAST's exact weight-scaling form is not published in
code; ours is a trained per-channel scale. The decay is applied as a decoupled proximal step after
AdamW rather than inside AdamS's moments. SLoRB is not built.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modelfold.errors import OptionError
from modelfold.ir.architecture import Architecture, describe
from modelfold.ir.modules import is_linear, linear_weight, replace_module
from modelfold.ir.sparse import NMLinear, check_pattern, nm_mask, satisfies_nm
from modelfold.ir.targets import SELECT, Skip, TargetSpec, select_layers
from modelfold.options import Options, option
from modelfold.train_checkpoints import TrainError


@dataclass(frozen=True)
class CastConfig(Options):
    """Options of sparsity-aware training (the rest are ``TrainConfig``'s)."""

    label = "sparse-training"

    n: int = option(0, "kept weights per group, for training from a dense model (0: use the "
                       "model's NMLinear layers and their pattern)")
    m: int = option(0, "group size, with n")
    decay: float = option(2.0, "peak L1 decay lambda on the dropped weights (proximal step "
                                "lr_t * lambda_t per optimizer step)")
    alpha: float = option(1.0, "initial pass-through of the dropped weights in the forward "
                               "(soft mask), falling to 0 at the hardening point")
    harden_at: float = option(0.75, "fraction of the steps after which the mask is exact N:M "
                                    "and frozen")
    mask_every: int = option(10, "steps between mask recomputations (CAST's T1)")
    scale: bool = option(True, "train a per-output-channel weight scale")
    targets: TargetSpec = option(TargetSpec(("*",)), "layers of the stack to train ('*', bare "
                                 "names, globs over module paths, 're:<regex>'; with n/m: the "
                                 "dense linears to make sparse)")

    def validate(self) -> None:
        if (self.n, self.m) != (0, 0):
            check_pattern(self.n, self.m)
        if self.decay < 0:
            raise OptionError(f"sparse-training option 'decay' must be >= 0; got {self.decay}")
        if not 0 <= self.alpha <= 1:
            raise OptionError(f"sparse-training option 'alpha' must be in [0, 1]; got {self.alpha}")
        if not 0 < self.harden_at <= 1:
            raise OptionError(f"sparse-training option 'harden_at' must be in (0, 1]; "
                             f"got {self.harden_at}")
        if self.mask_every < 1:
            raise OptionError(f"sparse-training option 'mask_every' must be >= 1; "
                             f"got {self.mask_every}")


class SparseTrainLinear(nn.Module):
    """A dense trainable weight with an N:M keep mask, a soft pass-through and a channel scale."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, n: int, m: int,
                 keep: torch.Tensor, *, scale: bool = True):
        super().__init__()
        self.n, self.m = n, m
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.weight = nn.Parameter(weight.detach().float().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(),
                                                           requires_grad=False)
        self.scale = nn.Parameter(torch.ones(weight.shape[0]), requires_grad=scale)
        self.register_buffer("keep", keep.clone(), persistent=False)
        self.alpha = 0.0

    def effective_weight(self) -> torch.Tensor:
        w = self.weight
        soft = self.keep.to(w.dtype)
        if self.alpha:
            soft = soft + self.alpha * (1 - soft)
        masked = w + (w * soft - w).detach()  # forward: w * soft; gradient: every weight
        return masked * self.scale.unsqueeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight(), self.bias)

    def harden(self) -> NMLinear:
        with torch.no_grad():
            dense = (self.weight * self.scale.unsqueeze(1)).detach()
        return NMLinear.from_dense(dense, self.keep, self.n, self.m, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"pattern={self.n}:{self.m}, alpha={self.alpha:.3g}")


class CastSchedule:
    """The per-step mask / soft-mask / decay updates (``train``'s ``step_callback``)."""

    def __init__(self, layers: dict[str, SparseTrainLinear], cfg: CastConfig, steps: int):
        self.layers, self.cfg, self.steps = layers, cfg, steps
        self.harden_step = max(1, round(cfg.harden_at * steps))
        self.history: list[dict[str, float]] = []
        self.set_alpha(0)

    def alpha_at(self, step: int) -> float:
        return self.cfg.alpha * max(0.0, 1.0 - step / self.harden_step)

    def decay_at(self, step: int) -> float:
        return self.cfg.decay * min(1.0, step / self.harden_step)

    def set_alpha(self, step: int) -> None:
        for layer in self.layers.values():
            layer.alpha = self.alpha_at(step)

    @torch.no_grad()
    def after_step(self, step: int, lr: float) -> None:
        threshold = lr * self.decay_at(step)
        record = step % self.cfg.mask_every == 0 or step == self.steps
        flips, dropped_norm, kept_norm = 0, 0.0, 0.0
        for layer in self.layers.values():
            w = layer.weight
            if threshold > 0:  # proximal L1 step on the dropped weights only
                shrunk = w.abs().sub_(threshold).clamp_min_(0).mul_(torch.sign(w))
                torch.where(layer.keep, w, shrunk, out=w)
            if step < self.harden_step and step % self.cfg.mask_every == 0:
                keep = nm_mask(w.abs(), layer.n, layer.m)
                flips += int((keep != layer.keep).sum()) // 2
                layer.keep.copy_(keep)
            if record:
                sq = w.square()
                total = float(sq.sum())
                kept = float(sq[layer.keep].sum())
                kept_norm += kept
                dropped_norm += total - kept
        self.set_alpha(step)
        if record:
            self.history.append({"step": step, "alpha": self.alpha_at(step),
                                 "decay": self.decay_at(step), "mask_flips": flips,
                                 "dropped_to_kept_norm": (max(dropped_norm, 0.0)
                                                          / max(kept_norm, 1e-30)) ** 0.5})


def prepare(module: nn.Module, arch: Architecture, cfg: CastConfig
            ) -> tuple[dict[str, SparseTrainLinear], list[dict[str, str]]]:
    """Swap the target layers for ``SparseTrainLinear`` and freeze everything else."""

    def classify(path: str, mod: nn.Module):
        if isinstance(mod, NMLinear):
            if cfg.n and (mod.n, mod.m) != (cfg.n, cfg.m):
                raise TrainError(f"sparse training: {path} is {mod.n}:{mod.m} sparse but "
                                 f"n={cfg.n}, m={cfg.m} were asked for")
            return SELECT
        if cfg.n and is_linear(mod):
            k = linear_weight(mod).shape[1]
            return Skip(f"input size {k} is not a multiple of m={cfg.m}; left dense") \
                if k % cfg.m else SELECT
        return None

    selection = select_layers(module, arch, cfg.targets, TargetSpec(), classify,
                              what="sparse training")
    if not len(selection):
        what = "linear layers" if cfg.n else "N:M sparse layers (run nm-sparsify first, or give n and m)"
        raise TrainError(f"sparse training: no {what} in the layer stack match "
                         f"{list(cfg.targets)}")
    for p in module.parameters():
        p.requires_grad_(False)
    layers = {}
    for path, mod in selection.items():
        if isinstance(mod, NMLinear):
            new = SparseTrainLinear(mod.weight, mod.bias, mod.n, mod.m, mod.mask(),
                                    scale=cfg.scale)
        else:
            w = linear_weight(mod).detach()
            new = SparseTrainLinear(w, mod.bias, cfg.n, cfg.m, nm_mask(w.abs(), cfg.n, cfg.m),
                                    scale=cfg.scale)
        replace_module(module, path, new)
        layers[path] = new
    return layers, selection.skipped


def harden(module: nn.Module, layers: dict[str, SparseTrainLinear]) -> list[str]:
    """Replace every ``SparseTrainLinear`` by its exact ``NMLinear``; returns invariant breakers."""
    bad = []
    for path, layer in layers.items():
        new = layer.harden()
        if not satisfies_nm(new.weight, new.n, new.m):
            bad.append(path)
        replace_module(module, path, new)
    return bad


def sparse_train(model: Any, *, teacher: nn.Module | None = None, tokenizer: Any = None,
                 sparse_options: dict[str, Any] | None = None, progress: bool = True,
                 log: Any = "default", checkpoint_dir: Any = None,
                 **train_options: Any) -> dict[str, Any]:
    """Sparsity-aware training of ``model`` (a ``TransformResult``, ``Program`` or nn.Module)
    in place; the model ends with exact N:M ``NMLinear`` layers.

    Args:
        teacher: the dense model to distil from (default loss: 0.33 CE + 0.67 KL, as AST).
        sparse_options: ``CastConfig`` options (decay, alpha, harden_at, mask_every, scale,
            targets, n, m).
        **train_options: ``TrainConfig`` options (steps, lr, batch_size, seq_len, ...).

    Returns:
        ``train``'s report plus ``sparse``: the options, the layers trained, the schedule history
        (mask flips, dropped-to-kept weight norm), skipped layers and the invariant check.

    Raises:
        TrainError: no layer to train, a pattern mismatch, or an N:M violation after hardening.
    """
    from modelfold.finetune import TrainConfig, print_to_stderr, train
    from modelfold.finetune import _unwrap as unwrap

    cfg = CastConfig.from_options(dict(sparse_options or {}))
    if train_options.pop("resume", False):
        raise TrainError("sparse training cannot resume from a checkpoint (its masks are not "
                         "checkpointed); rerun it")
    if teacher is not None and "kl_weight" not in train_options \
            and "hidden_weight" not in train_options:
        train_options.setdefault("ce_weight", 0.33)
        train_options["kl_weight"] = 0.67
    train_options.setdefault("lr", 1e-4)
    config = TrainConfig.from_options(train_options)
    module, _tok, program = unwrap(model, tokenizer)
    arch = describe(module) if program is None else program.arch
    start = time.perf_counter()
    layers, skipped = prepare(module, arch, cfg)
    schedule = CastSchedule(layers, cfg, config.steps)
    try:
        report = train(model, config=config, tokenizer=tokenizer, teacher=teacher,
                       checkpoint_dir=checkpoint_dir, progress=progress,
                       log=print_to_stderr if log == "default" else log,
                       step_callback=schedule.after_step)
    finally:
        bad = harden(module, layers)
        if program is not None:
            program.invalidate(keep_analyses=True)
    if bad:
        raise TrainError(f"sparse training: layers break their N:M pattern after hardening: "
                         f"{bad[:3]}")
    report["seconds"] = time.perf_counter() - start
    report["sparse"] = {"options": cfg.to_dict(), "layers": len(layers),
                        "pattern": f"{next(iter(layers.values())).n}:"
                                   f"{next(iter(layers.values())).m}",
                        "harden_step": schedule.harden_step, "schedule": schedule.history,
                        "skipped": skipped, "nm_invariant": True}
    return report


__all__ = ["CastConfig", "CastSchedule", "SparseTrainLinear", "harden", "prepare",
           "sparse_train"]
