"""AWQ (Lin et al., MLSys 2024; mit-han-lab/llm-awq ``auto_scale.py`` / ``auto_clip.py``).

Per transformer layer, on calibration inputs that went through the already-quantized layers:

1. Scale search, per group of linears that read the same input: with ``s_x`` the mean ``|x|`` per
   input channel, try ``s = s_x^a`` (normalised by ``sqrt(max s * min s)``) for ``a`` in
   ``{0, 1/n, ..., (n-1)/n}``; score ``Q(W diag(s)) diag(s)^-1`` by the MSE of the group's module
   output (the attention block for q/k/v, the MLP for gate/up, the linear itself otherwise) and
   keep the best. The scale is folded exactly: the preceding norm's weight (or the preceding
   linear's rows) is divided by ``s``, the group's weight columns multiplied by ``s``.
2. Clipping search, per linear except q and k: shrink each group's range to ``(1 - i/20)`` of its
   max for ``i < 10`` and keep, per output channel and group, the one with the lowest output error
   on 512 sampled tokens.
3. Round to nearest on the scaled, clipped weights.

``method=awq-gptq`` keeps step 1 and replaces steps 2 and 3 by GPTQ on the scaled weights (with
the Hessian of the scaled inputs): AWQ moves the salient input channels onto finer grid steps,
GPTQ compensates the remaining rounding error.

Groups (from ``llm-awq``): input norm -> q, k, v; v -> o (skipped when the shapes differ, as with
grouped-query attention); post-attention norm -> gate, up; up -> down. OPT: the same with fc1/fc2
(ReLU keeps the fc1 -> fc2 scale exact).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from modelfold.ir.modules import linear_weight, set_linear_weight
from modelfold.ir.quant import QuantFormat, pseudo_quantize
from modelfold.passes.base import PreconditionError
from modelfold.passes.gptq_layerwise import gptq_layer

if TYPE_CHECKING:
    from modelfold.ir.program import Program
    from modelfold.passes.layerwise import LayerwiseRunner
    from modelfold.passes.quantize import Quantize

_GEMMA_NORM = ("gemma", "gemma2", "gemma3_text")
_LLAMA_LIKE = ("llama", "qwen2", "mistral", "mixtral", "gemma")
SUPPORTED = (*_LLAMA_LIKE, "gemma2", "gemma3_text", "opt")


@dataclass(frozen=True)
class ScaleGroup:
    """Linears (paths relative to the layer) that read the output of ``prev``."""

    name: str
    prev: str
    prev_kind: str  # "norm" | "linear"
    linears: tuple[str, ...]
    inspect: str  # module whose output scores a candidate scale


def check_supported(program: Program) -> None:
    if program.arch.family not in SUPPORTED:
        raise PreconditionError(
            f"quantize method=awq folds its scales into the norms of {', '.join(SUPPORTED)}; "
            f"{program.arch.family} is not supported (its layers have no foldable norm -> linear "
            "groups here); use method=gptq or method=rtn")


def scale_groups(program: Program, layer: nn.Module) -> list[ScaleGroup]:
    family = program.arch.family
    attn = program.arch.layer.attention_proj
    mlp = program.arch.layer.mlp_proj
    groups = []
    if family == "opt":
        groups.append(ScaleGroup("attention-in", "self_attn_layer_norm", "norm",
                                 (attn["q"], attn["k"], attn["v"]), "self_attn"))
        groups.append(ScaleGroup("attention-out", attn["v"], "linear", (attn["o"],), attn["o"]))
        groups.append(ScaleGroup("mlp-in", "final_layer_norm", "norm", (mlp["fc_in"],),
                                 mlp["fc_in"]))
        groups.append(ScaleGroup("mlp-out", mlp["fc_in"], "linear", (mlp["fc_out"],),
                                 mlp["fc_out"]))
    else:
        groups.append(ScaleGroup("attention-in", "input_layernorm", "norm",
                                 (attn["q"], attn["k"], attn["v"]), "self_attn"))
        groups.append(ScaleGroup("attention-out", attn["v"], "linear", (attn["o"],), attn["o"]))
        if program.arch.mlp_type == "gated":
            norm = "pre_feedforward_layernorm" if family in ("gemma2", "gemma3_text") \
                else "post_attention_layernorm"
            groups.append(ScaleGroup("mlp-in", norm, "norm", (mlp["gate"], mlp["up"]), "mlp"))
            groups.append(ScaleGroup("mlp-out", mlp["up"], "linear", (mlp["down"],),
                                     mlp["down"]))
    out = []
    for g in groups:
        if g.prev_kind == "linear":
            prev = layer.get_submodule(g.prev)
            first = layer.get_submodule(g.linears[0])
            if prev.weight.shape[0] != first.weight.shape[1]:
                continue  # v -> o under grouped-query attention: shapes differ
        out.append(g)
    return out


class _Capture:
    """Inputs (args, kwargs) of a module over the search batches."""

    def __init__(self, module: nn.Module):
        self.calls: list[tuple[tuple, dict]] = []
        self.handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.calls.append((args, dict(kwargs)))

    def remove(self) -> None:
        self.handle.remove()


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def quantize_awq(qpass: Quantize, program: Program, runner: LayerwiseRunner,
                 selected: dict[int, dict[str, nn.Module]]) -> list[dict[str, Any]]:
    cfg = qpass.config
    search = slice(0, max(1, math.ceil(cfg.awq_samples / cfg.batch_size)))
    report: list[dict[str, Any]] = []
    for index, layer in runner.layers():
        targets = selected.get(index, {})
        prefix = f"{program.arch.layers}.{index}."
        scales_used: dict[str, float] = {}
        for group in scale_groups(program, layer):
            if not all(prefix + p in targets for p in group.linears):
                continue
            ratio = _search_scale(qpass, runner, index, layer, group, search)
            scales_used[group.name] = ratio
        if cfg.method == "awq-gptq":
            report += gptq_layer(qpass, program, runner, index, targets)
        else:
            clip = {}
            if cfg.awq_clip and targets:
                clip = _search_clip(qpass, runner, index, layer, targets, prefix, search)
            for path, module in targets.items():
                entry = qpass.install(program, path, module, None)
                if path in clip:
                    entry["clip_mean_ratio"] = clip[path]
                report.append(entry)
        if report and scales_used:
            report[-1]["awq_scale_exponents"] = scales_used
        runner.advance(index)
    return report


def _search_scale(qpass: Quantize, runner: LayerwiseRunner, index: int, layer: nn.Module,
                  group: ScaleGroup, search: slice) -> float:

    cfg = qpass.config
    inspect = layer.get_submodule(group.inspect)
    linears = [layer.get_submodule(p) for p in group.linears]
    cap = _Capture(inspect)
    x_sum, x_n = None, 0

    def on_input(name, module, x, out):
        nonlocal x_sum, x_n
        flat = x.reshape(-1, x.shape[-1]).abs()
        x_sum = flat.sum(0) if x_sum is None else x_sum + flat.sum(0)
        x_n += flat.shape[0]

    try:
        with runner.collect({"x": linears[0]}, on_input):
            runner.run_layer(index, batches=search)
    finally:
        cap.remove()
    x_mean = x_sum / x_n  # [K]
    originals = [linear_weight(m).detach().clone() for m in linears]
    reference = [_first(inspect(*a, **k)) for a, k in cap.calls]

    best, best_loss, best_ratio = None, float("inf"), 0.0
    for step in range(cfg.awq_grid):
        ratio = step / cfg.awq_grid
        s = x_mean.pow(ratio).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        for m, w in zip(linears, originals):
            fmt = qpass.format_for(w.shape[1])
            set_linear_weight(m, pseudo_quantize(w * s, fmt) / s)
        loss = sum(float(((_first(inspect(*a, **k)) - ref) ** 2).mean())
                   for (a, k), ref in zip(cap.calls, reference)) / len(reference)
        if loss < best_loss:
            best, best_loss, best_ratio = s.clone(), loss, ratio
    for m, w in zip(linears, originals):
        set_linear_weight(m, w * best)
    fold_into_prev(runner.program, layer.get_submodule(group.prev), group.prev_kind, best)
    return best_ratio


def fold_into_prev(program: Program, prev: nn.Module, kind: str, s: torch.Tensor) -> None:
    """Divide the output channels of ``prev`` (a norm or a linear) by ``s``."""
    if kind == "linear":
        w = linear_weight(prev).detach()
        set_linear_weight(prev, w / s[:, None])
        if getattr(prev, "bias", None) is not None:
            prev.bias.data.div_(s)
        return
    if program.arch.family in _GEMMA_NORM:  # Gemma's RMSNorm multiplies by (1 + weight)
        prev.weight.data.copy_((1 + prev.weight.data) / s - 1)
    else:
        prev.weight.data.div_(s)
    if getattr(prev, "bias", None) is not None:
        prev.bias.data.div_(s)


def _search_clip(qpass: Quantize, runner: LayerwiseRunner, index: int, layer: nn.Module,
                 targets: dict[str, nn.Module], prefix: str, search: slice,
                 n_tokens: int = 512, n_grid: int = 20, max_shrink: float = 0.5
                 ) -> dict[str, float]:
    """Clip each linear's groups (not q / k) to the range that minimises the output error."""

    attn = runner.program.arch.layer.attention_proj
    no_clip = {prefix + attn[r] for r in ("q", "k", "qkv") if r in attn}
    modules = {p: m for p, m in targets.items() if p not in no_clip}
    inputs: dict[str, list[torch.Tensor]] = {p: [] for p in modules}

    def keep(name, module, x, out):
        inputs[name].append(x.reshape(-1, x.shape[-1]))

    with runner.collect(modules, keep):
        runner.run_layer(index, batches=search)
    out = {}
    for path, module in modules.items():
        x = torch.cat(inputs.pop(path))
        x = x[:: max(1, x.shape[0] // n_tokens)][:n_tokens]  # [T, K]
        w = linear_weight(module).detach().float()
        fmt = qpass.format_for(w.shape[1])
        clipped, mean_ratio = _clip_weight(w, x, fmt, n_grid, max_shrink)
        set_linear_weight(module, clipped)
        out[path] = mean_ratio
    return out


def _clip_weight(w: torch.Tensor, x: torch.Tensor, fmt: QuantFormat, n_grid: int,
                 max_shrink: float, rows_per_batch: int = 256) -> tuple[torch.Tensor, float]:
    n, k = w.shape
    g = fmt.block_size
    kb = fmt.k_blocks(k)
    wp = torch.zeros(n, kb * g)
    wp[:, :k] = w
    xp = torch.zeros(x.shape[0], kb * g)
    xp[:, :k] = x.float()
    xg = xp.reshape(-1, kb, g).transpose(0, 1)  # [kb, T, g]
    result = wp.clone()
    ratios = []
    for r0 in range(0, n, rows_per_batch):
        wb = wp[r0:r0 + rows_per_batch].reshape(-1, kb, g)  # [R, kb, g]
        ref = torch.bmm(xg, wb.permute(1, 2, 0))  # [kb, T, R]
        max_val = wb.abs().amax(dim=-1, keepdim=True)  # [R, kb, 1]
        best_err = torch.full((wb.shape[0], kb), float("inf"))
        best_max = max_val.clone()
        for i in range(int(max_shrink * n_grid)):
            cur_max = max_val * (1 - i / n_grid)
            cur = torch.clamp(wb, -cur_max, cur_max)
            q = pseudo_quantize(cur.reshape(-1, kb * g), QuantFormat(fmt.bits, g, fmt.symmetric))
            out = torch.bmm(xg, q.reshape(-1, kb, g).permute(1, 2, 0))
            err = ((out - ref) ** 2).mean(dim=1).T  # [R, kb]
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_max = torch.where(better.unsqueeze(-1), cur_max, best_max)
        clipped = torch.clamp(wb, -best_max, best_max)
        result[r0:r0 + rows_per_batch] = clipped.reshape(-1, kb * g)
        ratios.append((best_max / max_val.clamp_min(1e-12)).mean())
    return result[:, :k], float(torch.stack(ratios).mean())


__all__ = ["SUPPORTED", "ScaleGroup", "check_supported", "fold_into_prev", "quantize_awq", "scale_groups"]
