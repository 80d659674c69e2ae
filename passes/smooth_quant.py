"""``smooth-quant``: W8A8 with dynamic per-token activations (Xiao et al., ICML 2023;
mit-han-lab/smoothquant ``smooth.py``).

Activation outliers live in a few channels, which makes activations hard to quantize. SmoothQuant
moves part of that difficulty into the weights with an exact per-channel rescaling:
``s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha)``, the preceding norm's weight (and bias) divided
by ``s``, the columns of every linear that reads the norm multiplied by ``s``. Then every targeted
linear becomes a ``W8A8Linear``: int8 per-output-channel symmetric weights, activations quantized
to int8 per token at run time (``modelfold::w8a8_linear``; ONNX: ``MatMulInteger``).

Which linears read which norm is found by running the model, not from a table: a linear whose
input is the very tensor a norm produced belongs to that norm's group. This covers sequential
(Llama) and parallel (Phi) blocks and GPT-2's ``Conv1D``; post-norm models (BERT) have no norm
before their linears, so they are quantized without smoothing, and the report says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from modelfold.ir.program import Program
from modelfold.ir.quant import W8A8Linear
from modelfold.passes.awq import fold_into_prev
from modelfold.passes.base import Pass, PassConfig, PreconditionError, option
from modelfold.passes.calibration import calibration_batches
from modelfold.passes.quantize import find_targets, linear_weight, replace_module, weight_error
from modelfold.passes.registry import register_pass


@dataclass(frozen=True)
class SmoothQuantConfig(PassConfig):
    alpha: float = option(0.5, "migration strength: 0 keeps activations, 1 moves all to weights")
    smooth: bool = option(True, "fold the smoothing scales into the preceding norms")
    targets: tuple[str, ...] = option(("*",), "linear layers to make W8A8 (glob or 're:<regex>')")
    exclude: tuple[str, ...] = option((), "linear layers to leave in float")
    corpus: str = option("wikipedia", "calibration corpus ('random' for models without text)")
    n_samples: int = option(128, "calibration sequences")
    seq_len: int = option(512, "tokens per calibration sequence")
    batch_size: int = option(8, "sequences per forward pass")
    seed: int = option(0, "calibration sampling seed")

    def validate(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"smooth-quant option 'alpha' must be in [0, 1]; got {self.alpha}")
        for name in ("n_samples", "seq_len", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"smooth-quant option '{name}' must be >= 1; "
                                 f"got {getattr(self, name)}")


def _is_norm(module: nn.Module) -> bool:
    name = type(module).__name__
    return isinstance(module, nn.LayerNorm) or name.endswith("RMSNorm") or \
        name.endswith("LayerNorm")


@register_pass
class SmoothQuant(Pass):
    """Smooth activation outliers into the weights, then W8A8 (lossy)."""

    name = "smooth-quant"
    config_class = SmoothQuantConfig
    kind = "lossy"
    summary = "SmoothQuant scales folded into norms, then int8 weights x per-token int8 activations"

    def requires(self, program: Program) -> None:
        if self.config.corpus != "random" and program.tokenizer is None:
            raise PreconditionError("smooth-quant calibrates on text and needs a tokenizer; load "
                                    "the model with its tokenizer, or use corpus=random")

    @torch.no_grad()
    def run(self, program: Program) -> dict[str, Any]:
        cfg = self.config
        selected, skipped = find_targets(
            program, cfg.targets, cfg.exclude, what="smooth-quant",
            sparse="N:M sparse layer: W8A8 has no sparse form; it stays sparse in float")
        targets = {p: m for layer in selected.values() for p, m in layer.items()}
        ids = calibration_batches(program, corpus=cfg.corpus, n_samples=cfg.n_samples,
                                  seq_len=cfg.seq_len, seed=cfg.seed)
        act_max, groups = self._statistics(program, ids, targets)
        smoothed = []
        if cfg.smooth:
            for norm_path, linears in groups.items():
                linears = [p for p in linears if p in targets]
                if not linears:
                    continue
                s = self._smooth(program, norm_path, linears, act_max)
                smoothed.append({"norm": norm_path, "linears": linears,
                                 "scale_max": float(s.max()), "scale_min": float(s.min())})
        grouped = {p for entry in smoothed for p in entry["linears"]}
        layers = []
        for path, module in targets.items():
            weight = linear_weight(module).detach()
            new = W8A8Linear(weight, module.bias)
            replace_module(program.module, path, new)
            layers.append({"path": path, "shape": list(weight.shape), "smoothed": path in grouped,
                           "act_absmax": float(act_max[path].max()),
                           "weight_error": weight_error(weight, new.weight)})
        not_smoothed = [p for p in targets if p not in grouped]
        if cfg.smooth and not_smoothed:
            skipped.append({"target": f"{len(not_smoothed)} linear layers",
                            "reason": "smoothing: no norm directly before them (e.g. "
                                      f"{not_smoothed[0]}); W8A8 without smoothing"})
        return {"alpha": cfg.alpha, "w8a8_layers": len(layers), "smoothed_groups": smoothed,
                "layers": layers, "skipped": skipped,
                "calibration": {"corpus": cfg.corpus, "sequences": int(ids.shape[0]),
                                "tokens_per_sequence": int(ids.shape[1])}}

    def _statistics(self, program: Program, ids: torch.Tensor, targets: dict[str, nn.Module]
                    ) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
        """Per-channel max |input| of every target; which linears read which norm's output."""
        module = program.module
        norms = {p: m for p, m in module.named_modules()
                 if p.startswith(program.arch.layers + ".") and _is_norm(m)}
        act_max: dict[str, torch.Tensor] = {}
        last_norm: dict[str, Any] = {}
        groups: dict[str, list[str]] = {}
        first_batch = [True]

        def norm_hook(path):
            def hook(mod, args, out):
                if first_batch[0]:
                    last_norm[path] = out
            return hook

        def linear_hook(path):
            def hook(mod, args, out):
                x = args[0]
                m = x.reshape(-1, x.shape[-1]).abs().amax(0).float()
                act_max[path] = m if path not in act_max else torch.maximum(act_max[path], m)
                if first_batch[0]:
                    for norm_path, y in last_norm.items():
                        if y is x or (y.shape == x.shape and y.data_ptr() == x.data_ptr()):
                            groups.setdefault(norm_path, []).append(path)
                            break
            return hook

        handles = [m.register_forward_hook(norm_hook(p)) for p, m in norms.items()]
        handles += [m.register_forward_hook(linear_hook(p)) for p, m in targets.items()]
        try:
            for start in tqdm(range(0, len(ids), self.config.batch_size),
                              desc="smooth-quant statistics", unit="batch", leave=False):
                program.logits(ids[start:start + self.config.batch_size])
                first_batch[0] = False
                last_norm.clear()
        finally:
            for h in handles:
                h.remove()
        return act_max, groups

    def _smooth(self, program: Program, norm_path: str, linears: list[str],
                act_max: dict[str, torch.Tensor]) -> torch.Tensor:
        module = program.module
        alpha = self.config.alpha
        x_max = act_max[linears[0]].clamp_min(1e-5)
        w_max = torch.stack([linear_weight(module.get_submodule(p)).detach().abs().amax(0)
                             for p in linears]).amax(0).clamp_min(1e-5)
        s = (x_max.pow(alpha) / w_max.pow(1 - alpha)).clamp_min(1e-5)
        fold_into_prev(program, module.get_submodule(norm_path), "norm", s)
        for p in linears:
            lin = module.get_submodule(p)
            if type(lin).__name__ == "Conv1D":
                lin.weight.data.mul_(s[:, None])
            else:
                lin.weight.data.mul_(s)
            act_max[p] = act_max[p] / s
        return s

    @staticmethod
    def plot(details: dict[str, Any], path: Path) -> bool:
        """Per-layer activation max |x| (after smoothing) and weight error."""
        layers = details.get("layers") or []
        if not layers:
            return False
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(max(6, len(layers) * 0.09), 3.2))
        x = range(len(layers))
        ax.plot(x, [e["act_absmax"] for e in layers], ".", color="#c92a2a",
                label="max |activation| (after smoothing)")
        ax.plot(x, [e["weight_error"] for e in layers], ".", color="#4c6ef5",
                label="int8 relative weight error")
        ax.set_yscale("log")
        ax.set_xlabel("linear layer")
        ax.set_title(f"smooth-quant alpha={details['alpha']}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return True


__all__ = ["SmoothQuant", "SmoothQuantConfig"]
