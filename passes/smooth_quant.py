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

from modelfold.errors import OptionError
from modelfold.ir.modules import is_linear, linear_weight, replace_module, scale_input_channels
from modelfold.ir.program import Program
from modelfold.ir.quant import W8A8Linear
from modelfold.ir.sparse import is_sparse_layer
from modelfold.ir.targets import SELECT, Skip, TargetSpec, select_layers
from modelfold.passes.awq import fold_into_prev
from modelfold.passes.base import Pass, option
from modelfold.passes.calibration import CalibrationConfig
from modelfold.passes.fidelity import weight_error
from modelfold.passes.registry import register_pass


@dataclass(frozen=True)
class SmoothQuantConfig(CalibrationConfig):
    alpha: float = option(0.5, "migration strength: 0 keeps activations, 1 moves all to weights")
    smooth: bool = option(True, "fold the smoothing scales into the preceding norms")
    targets: TargetSpec = option(TargetSpec(("*",)), "linear layers to make W8A8: '*', bare "
                                 "names (q_proj), globs over module paths, or 're:<regex>'")
    exclude: TargetSpec = option(TargetSpec(), "linear layers to leave in float (same syntax)")

    def validate(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise OptionError(f"smooth-quant option 'alpha' must be in [0, 1]; got {self.alpha}")


def _classify(path: str, module: nn.Module):
    if is_sparse_layer(module):
        return Skip("N:M sparse layer: W8A8 has no sparse form; it stays sparse in float")
    return SELECT if is_linear(module) else None


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
        self.config.require_text(program, "smooth-quant calibrates on text")

    @torch.no_grad()
    def run(self, program: Program) -> dict[str, Any]:
        cfg = self.config
        selection = select_layers(program.module, program.arch, cfg.targets, cfg.exclude,
                                  _classify, what="smooth-quant")
        skipped = selection.skipped
        targets = dict(selection.items())
        ids = cfg.calibration_ids(program)
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
                "calibration": cfg.calibration_facts(ids)}

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
            for batch in tqdm(self.config.batches(ids), desc="smooth-quant statistics",
                              unit="batch", leave=False):
                program.module_logits(batch)
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
            scale_input_channels(module.get_submodule(p), s)
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
