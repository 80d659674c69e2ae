"""``quantize``: weight-only int2/3/4/8 quantization (RTN, GPTQ, AWQ) into ``QuantLinear`` layers.

Every targeted linear layer is replaced by a ``QuantLinear`` holding its weight in ONNX Runtime's
``MatMulNBits`` layout (``modelfold.ir.quant``), so the model still runs in eager PyTorch (through
the ``modelfold::quant_linear`` reference) and lowers to ``com.microsoft.MatMulNBits`` unchanged.

Methods:

- ``rtn``: round to nearest on a per-group min/max grid (no calibration data);
- ``gptq``: layer by layer on calibration text; every layer sees the outputs of the layers before
  it, already quantized; each weight column's rounding error is compensated on the remaining
  columns (``passes/gptq.py``);
- ``awq``: layer by layer; activation-aware per-channel scales folded into the preceding norm or
  linear, then a per-group clipping search, then RTN (``passes/awq.py``);
- ``awq-gptq``: AWQ's scales, then GPTQ instead of clipping + RTN.

The token embedding and the LM head are separate choices (``embeddings``, ``lm_head``): with tied
embeddings they are one tensor; quantizing both keeps them one (packed) tensor, quantizing only one
unties them and the report says so.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from modelfold.errors import OptionError
from modelfold.ir.modules import is_linear, linear_weight, replace_module
from modelfold.ir.program import Program
from modelfold.ir.quant import (
    SUPPORTED_BITS,
    PackedWeight,
    QuantEmbedding,
    QuantFormat,
    QuantFormatError,
    QuantLinear,
    block_size_for,
    describe_format,
    quantize_rtn,
)
from modelfold.ir.sparse import NMLinear, NMQuantLinear, satisfies_nm
from modelfold.ir.targets import SELECT, Selection, Skip, TargetSpec, select_layers
from modelfold.passes.awq import check_supported, quantize_awq
from modelfold.passes.base import Pass, PassError, PreconditionError, option
from modelfold.passes.calibration import CalibrationConfig
from modelfold.passes.fidelity import weight_error
from modelfold.passes.gptq_layerwise import quantize_gptq
from modelfold.passes.layerwise import LayerwiseRunner, each_layer
from modelfold.passes.registry import register_pass
from modelfold.passes.report import plot_layer_errors

METHODS = ("rtn", "gptq", "awq", "awq-gptq")


@dataclass(frozen=True)
class QuantizeConfig(CalibrationConfig):
    bits: int = option(4, "bits per weight: 2, 3, 4 or 8 (3-bit is stored in 4-bit containers)")
    group_size: int = option(128, "weights per scale along the input dimension: a power of 2 >= 16, "
                                  "or -1 for one scale per output channel")
    symmetric: bool = option(False, "symmetric grid (zero point 2^(bits-1)) instead of min/max")
    method: Literal["rtn", "gptq", "awq", "awq-gptq"] = option(
        "rtn", "rtn (no data), gptq, awq or awq-gptq (AWQ scales, then GPTQ; calibrated)")
    targets: TargetSpec = option(TargetSpec(("*",)), "linear layers to quantize: '*', bare names "
                                 "(q_proj), globs over module paths, or 're:<regex>'")
    exclude: TargetSpec = option(TargetSpec(), "linear layers to leave in float (same syntax)")
    embeddings: bool = option(False, "also quantize the token embedding (RTN)")
    lm_head: bool = option(False, "also quantize the LM head (RTN); with tied embeddings and "
                                  "embeddings=true the two stay one tensor")
    embedding_bits: int | None = option(None, "bits for the embedding / LM head (default: bits)")
    damp: float = option(0.01, "GPTQ: fraction of the mean Hessian diagonal added as damping")
    act_order: bool = option(True, "GPTQ: quantize columns by decreasing activation energy "
                                   "(static groups, so the stored layout is unchanged)")
    mse: bool = option(True, "GPTQ: fit each group's range by a search over shrunk ranges "
                              "(lowest |w - q|^2.4) instead of min/max")
    true_sequential: bool = option(False, "GPTQ: re-collect inputs after each sub-block "
                                          "(attention in, attention out, MLP in, MLP out)")
    awq_grid: int = option(20, "AWQ: scale exponents tried in [0, 1)")
    awq_clip: bool = option(True, "AWQ: search a per-group clipping range")
    awq_samples: int = option(8, "AWQ: calibration sequences used in the scale/clip search")

    def validate(self) -> None:
        for name in ("bits", "embedding_bits"):
            value = getattr(self, name)
            if value is not None and value not in SUPPORTED_BITS:
                raise OptionError(f"quantize option '{name}' must be one of "
                                 f"{', '.join(map(str, SUPPORTED_BITS))}; got {value}")
        try:
            block_size_for(self.group_size, 1)
        except QuantFormatError as exc:
            raise OptionError(f"quantize option 'group_size': {exc}") from None
        if not 0 <= self.damp < 1:
            raise OptionError(f"quantize option 'damp' must be in [0, 1); got {self.damp}")
        for name in ("awq_grid", "awq_samples"):
            if getattr(self, name) < 1:
                raise OptionError(f"quantize option '{name}' must be >= 1; got {getattr(self, name)}")
        if not self.targets and not (self.embeddings or self.lm_head):
            raise OptionError("quantize option 'targets' is empty; use '*' for every linear layer, "
                             "or set embeddings=true / lm_head=true to quantize only those")


# -- finding the linear layers -----------------------------------------------------------------
def _classify(path: str, module: nn.Module):
    if is_linear(module) or isinstance(module, NMLinear):
        return SELECT
    if isinstance(module, NMQuantLinear):
        return Skip("already sparse and quantized")
    return None


def find_targets(program: Program, cfg: QuantizeConfig) -> Selection:
    """The linear layers of the stack that ``quantize`` acts on (N:M sparse ones included)."""
    return select_layers(program.module, program.arch, cfg.targets, cfg.exclude, _classify,
                         what="quantize")


# -- the pass ------------------------------------------------------------------------------------
@register_pass
class Quantize(Pass):
    """Weight-only quantization into the MatMulNBits layout (lossy)."""

    name = "quantize"
    config_class = QuantizeConfig
    kind = "lossy"
    summary = "weight-only int2/3/4/8 quantization (rtn, gptq, awq) to MatMulNBits-layout layers"
    streams = True  # every method walks the layers; embeddings and head are loaded

    def requires(self, program: Program) -> None:
        if self.config.method in ("awq", "awq-gptq"):
            check_supported(program)
            stack = program.module.get_submodule(program.arch.layers)
            if any(isinstance(m, NMLinear) for m in stack.modules()):
                raise PreconditionError(
                    f"quantize method={self.config.method} rescales weights, which an N:M sparse "
                    "model (nm-sparsify) does not allow; use method=rtn or method=gptq, which "
                    "keep the pattern")
        if self.config.method != "rtn":
            self.config.require_text(program, f"quantize method={self.config.method} calibrates "
                                              "on text")

    def distribute_refusal(self) -> str | None:
        if self.config.method in ("awq", "awq-gptq"):
            return (f"method={self.config.method} searches its scales on the first calibration "
                    "batches, which one rank holds; use method=gptq or rtn over several ranks, "
                    "or run AWQ in one process")
        return None  # RTN needs no data; GPTQ all-reduces its Hessians

    def format_for(self, in_features: int, bits: int | None = None) -> QuantFormat:
        cfg = self.config
        return QuantFormat(bits or cfg.bits, block_size_for(cfg.group_size, in_features),
                           cfg.symmetric)

    def run(self, program: Program) -> dict[str, Any]:
        cfg = self.config
        selection = find_targets(program, cfg)
        selected, skipped = selection.layers, selection.skipped
        count = len(selection)
        start = time.perf_counter()
        if cfg.method == "rtn" or not count:
            layers = [self.install(program, path, module, None)
                      for index in each_layer(program, "quantize (rtn)")
                      for path, module in selected.get(index, {}).items()]
            calibration = None
        else:
            ids = cfg.calibration_ids(program)
            calibration = cfg.calibration_facts(ids)
            runner = LayerwiseRunner(program, ids, batch_size=cfg.batch_size,
                                     desc=f"quantize ({cfg.method})")
            if cfg.method == "gptq":
                layers = quantize_gptq(self, program, runner, selected)
            else:
                layers = quantize_awq(self, program, runner, selected)
        seconds = time.perf_counter() - start
        head = self._embeddings_and_head(program)
        details: dict[str, Any] = {
            "method": cfg.method,
            "format": describe_format(cfg.bits, cfg.group_size, cfg.symmetric),
            "quantized_layers": count,
            "layers": layers,
            "seconds_linear": round(seconds, 2),
            "skipped": skipped + head.pop("skipped", []),
            **head,
        }
        if calibration:
            details["calibration"] = calibration
        return details

    def install(self, program: Program, path: str, module: nn.Module,
                packed: PackedWeight | None, *, codes: torch.Tensor | None = None,
                **extra: Any) -> dict[str, Any]:
        """Replace ``module`` at ``path`` by a ``QuantLinear`` (RTN when ``packed`` is None).

        An N:M sparse ``NMLinear`` becomes an ``NMQuantLinear`` with the same kept positions
        (``codes``: the integer codes behind ``packed``; the pruned ones are the zero point).
        """
        weight = linear_weight(module).detach()
        fmt = self.format_for(weight.shape[1])
        if packed is None:
            codes, scales, zeros = quantize_rtn(weight, fmt)  # a pruned 0 rounds to the zero point
            packed = PackedWeight.from_codes(codes, scales, zeros, fmt)
        if isinstance(module, NMLinear):
            if codes is None:
                raise PassError(f"{path}: an N:M sparse layer needs its integer codes")
            new = NMQuantLinear.from_codes(codes, packed.scales, packed.zero_points, packed.fmt,
                                           module.indices, module.n, module.m, module.bias)
            approx = new.weight
            extra = {**extra, "pattern": f"{module.n}:{module.m}",
                     "nm_invariant": satisfies_nm(approx, module.n, module.m)}
        else:
            new = QuantLinear(packed, module.bias)
            approx = packed.dequantize()
        replace_module(program.module, path, new)
        return {"path": path, "shape": list(weight.shape),
                "weight_error": weight_error(weight, approx), **extra}

    # -- embeddings and LM head -------------------------------------------------------------------
    def _embeddings_and_head(self, program: Program) -> dict[str, Any]:
        cfg = self.config
        if not (cfg.embeddings or cfg.lm_head):
            return {}
        module = program.module
        arch = program.arch
        bits = cfg.embedding_bits or cfg.bits
        out: dict[str, Any] = {"skipped": []}
        emb_path = arch.embeddings[0]
        emb = module.get_submodule(emb_path)
        head = module.get_submodule(arch.lm_head) if arch.lm_head else None
        tied = arch.tied_embeddings and head is not None and \
            getattr(head, "weight", None) is getattr(emb, "weight", None)
        if cfg.lm_head and head is None:
            out["skipped"].append({"target": "lm_head", "reason": "the model has no LM head"})
        if cfg.embeddings and not isinstance(emb, nn.Embedding):
            out["skipped"].append({"target": emb_path, "reason": f"{type(emb).__name__} is "
                                   "not an nn.Embedding"})
            return out
        fmt = self.format_for(emb.weight.shape[1], bits)
        if tied and cfg.embeddings and cfg.lm_head:
            packed = PackedWeight.from_float(emb.weight.detach(), fmt)
            new_emb = QuantEmbedding(packed, emb.padding_idx)
            # one table: both modules hold the same packed tensors
            new_head = QuantLinear(packed, getattr(head, "bias", None))
            replace_module(module, emb_path, new_emb)
            replace_module(module, arch.lm_head, new_head)
            out["embeddings"] = out["lm_head"] = {
                "format": describe_format(bits, cfg.group_size, cfg.symmetric), "tied": True,
                "weight_error": weight_error(emb.weight, packed.dequantize())}
            return out
        if tied:
            module.config.tie_word_embeddings = False
            out["untied"] = ("the tied embedding and LM head were untied: only one of them is "
                             "quantized, so the float table is still stored for the other")
        if cfg.embeddings:
            packed = PackedWeight.from_float(emb.weight.detach(), fmt)
            replace_module(module, emb_path, QuantEmbedding(packed, emb.padding_idx))
            out["embeddings"] = {"format": describe_format(bits, cfg.group_size, cfg.symmetric),
                                 "weight_error": weight_error(emb.weight, packed.dequantize())}
        if cfg.lm_head and head is not None:
            if not is_linear(head):
                out["skipped"].append({"target": arch.lm_head,
                                       "reason": f"{type(head).__name__} is not linear"})
            else:
                w = linear_weight(head).detach()
                packed = PackedWeight.from_float(w, self.format_for(w.shape[1], bits))
                replace_module(module, arch.lm_head, QuantLinear(packed, head.bias))
                out["lm_head"] = {"format": describe_format(bits, cfg.group_size, cfg.symmetric),
                                  "weight_error": weight_error(w, packed.dequantize())}
        return out

    @staticmethod
    def plot(details: dict[str, Any], path: Path) -> bool:
        """Per-layer quantization error (weight error; GPTQ: output error vs RTN's)."""
        layers = details.get("layers") or []
        if not layers:
            return False
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(max(6, len(layers) * 0.09), 3.2))
        plot_layer_errors(ax, layers, method=details["method"], baseline="rtn",
                          weight_label="||W - Wq||^2 / ||W||^2")
        ax.set_title(f"quantize: {details['method']} {details['format']}")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return True


__all__ = ["Quantize", "QuantizeConfig", "find_targets"]
