"""``nm-sparsify``: semi-structured N:M pruning (magnitude, Wanda, SparseGPT) into ``NMLinear``.

Every targeted linear layer of the layer stack keeps ``n`` of every ``m`` consecutive weights
along its input dimension and is replaced by an ``NMLinear`` (``modelfold.ir.sparse``) that stores
the kept values and their positions. Methods:

- ``magnitude``: the largest ``|w|`` (no data);
- ``wanda``: the largest ``|w| * ||x_j||`` on calibration text; no weight updated;
- ``sparsegpt``: Hessian-based choice, the kept weights updated to compensate.

Wanda and SparseGPT go layer by layer (``LayerwiseRunner``): each layer is calibrated on the
outputs of the layers before it, already pruned. Linears that read the same input (q/k/v,
gate/up) share one input Hessian. The embeddings and the LM head stay dense. A layer whose input
size is not a multiple of ``m`` is left dense and listed under ``skipped``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from modelfold.distributed import share
from modelfold.errors import OptionError
from modelfold.ir.modules import is_linear, linear_weight, replace_module
from modelfold.ir.program import Program
from modelfold.ir.quant import QuantLinear, W8A8Linear
from modelfold.ir.sparse import (
    NMLinear,
    SparsityFormatError,
    check_pattern,
    group_nonzeros,
    is_sparse_layer,
    satisfies_nm,
    sparse_layers,
)
from modelfold.ir.targets import SELECT, Skip, TargetSpec, select_layers
from modelfold.passes.base import Pass, PassError, PreconditionError, option
from modelfold.passes.calibration import CalibrationConfig
from modelfold.passes.fidelity import weight_error
from modelfold.passes.gptq import HessianAccumulator
from modelfold.passes.gptq_layerwise import shared_input_groups
from modelfold.passes.layerwise import LayerwiseRunner, each_layer
from modelfold.passes.registry import register_pass
from modelfold.passes.report import plot_layer_errors
from modelfold.passes.sparsegpt import prune

METHODS = ("magnitude", "wanda", "sparsegpt")


@dataclass(frozen=True)
class NMSparsifyConfig(CalibrationConfig):
    n: int = option(2, "weights kept in every group of m")
    m: int = option(4, "group size along the input dimension (the input size must be a multiple)")
    method: Literal["magnitude", "wanda", "sparsegpt"] = option(
        "sparsegpt", "magnitude (no data), wanda (|w| x input norm) or sparsegpt (Hessian-based, "
                     "kept weights updated)")
    targets: TargetSpec = option(TargetSpec(("*",)), "linear layers to prune: '*', bare names "
                                 "(q_proj), globs over module paths, or 're:<regex>'")
    exclude: TargetSpec = option(TargetSpec(), "linear layers to leave dense (same syntax)")
    damp: float = option(0.01, "SparseGPT: fraction of the mean Hessian diagonal added as damping")

    def validate(self) -> None:
        try:
            check_pattern(self.n, self.m)
        except SparsityFormatError as exc:
            raise OptionError(f"nm-sparsify options 'n', 'm': {exc}") from None
        if not 0 <= self.damp < 1:
            raise OptionError(f"nm-sparsify option 'damp' must be in [0, 1); got {self.damp}")
        if not self.targets:
            raise OptionError("nm-sparsify option 'targets' is empty; use '*' for every linear "
                             "layer of the layer stack")


@register_pass
class NMSparsify(Pass):
    """N:M semi-structured pruning of the layer stack's linear layers (lossy)."""

    name = "nm-sparsify"
    config_class = NMSparsifyConfig
    kind = "lossy"
    summary = "N:M semi-structured pruning (magnitude, wanda, sparsegpt) into compressed NMLinear"
    streams = True  # every method walks the layers one at a time

    def distribute_refusal(self) -> str | None:
        return None  # Wanda and SparseGPT all-reduce their Hessians; magnitude needs no data

    def requires(self, program: Program) -> None:
        cfg = self.config
        stack = program.module.get_submodule(program.arch.layers)
        quantized = [name for name, mod in stack.named_modules()
                     if isinstance(mod, (QuantLinear, W8A8Linear))]
        if quantized:
            raise PreconditionError(
                f"nm-sparsify runs on float weights, but the layer stack is already quantized "
                f"({len(quantized)} layers, e.g. {program.arch.layers}.{quantized[0]}); put "
                "nm-sparsify before quantize (the quantizer then keeps the N:M pattern)")
        if cfg.method != "magnitude":
            cfg.require_text(program, f"nm-sparsify method={cfg.method} calibrates on text")

    def run(self, program: Program) -> dict[str, Any]:
        cfg = self.config
        selection = select_layers(program.module, program.arch, cfg.targets, cfg.exclude,
                                  self._classify, what="nm-sparsify")
        selected, skipped = selection.layers, selection.skipped
        shape_skips = [s for s in skipped if s["reason"].startswith("input size")]
        if shape_skips and not selected:
            sizes = sorted({int(s["reason"].split()[2]) for s in shape_skips})
            raise PassError(f"nm-sparsify: m={cfg.m} divides the input size of none of the "
                            f"selected layers (input sizes {sizes}); choose an m that divides "
                            "them, e.g. 4 or 8")
        count = sum(len(v) for v in selected.values())
        start = time.perf_counter()
        calibration = None
        if cfg.method == "magnitude" or not count:
            layers = [self.install(program, path, module, None)
                      for index in each_layer(program, f"nm-sparsify ({cfg.method})")
                      for path, module in selected.get(index, {}).items()]
        else:
            ids = cfg.calibration_ids(program)
            calibration = cfg.calibration_facts(ids)
            runner = LayerwiseRunner(program, ids, batch_size=cfg.batch_size,
                                     desc=f"nm-sparsify ({cfg.method})")
            layers = []
            for index, _layer in runner.layers():
                layers += self._calibrated_layer(program, runner, index, selected.get(index, {}))
                runner.advance(index)
        seconds = time.perf_counter() - start
        violations = [e["path"] for e in layers if not e["nm_invariant"]]
        if violations:  # cannot happen by construction; never ship a wrong layer silently
            raise PassError(f"nm-sparsify produced layers that break {cfg.n}:{cfg.m}: "
                            f"{violations[:3]}")
        pruned = sum(e["pruned"] for e in layers)
        total = sum(e["shape"][0] * e["shape"][1] for e in layers)
        details: dict[str, Any] = {
            "method": cfg.method,
            "pattern": f"{cfg.n}:{cfg.m}",
            "pruned_layers": len(layers),
            "pruned_weights": pruned,
            "sparsity_of_pruned_layers": pruned / total if total else 0.0,
            "layers": layers,
            "skipped": skipped,
            "seconds": round(seconds, 2),
            "nm_invariant": f"every pruned layer has at most {cfg.n} non-zeros in every group "
                            f"of {cfg.m} (checked on the installed weights)",
        }
        if calibration:
            details["calibration"] = calibration
        return details

    def _classify(self, path: str, module: nn.Module):
        if is_sparse_layer(module):
            return Skip("already N:M sparse; left as it is")
        if not is_linear(module):
            return None
        k = linear_weight(module).shape[1]
        if k % self.config.m:
            return Skip(f"input size {k} is not a multiple of m={self.config.m}; left dense")
        return SELECT

    @torch.no_grad()
    def _calibrated_layer(self, program: Program, runner: LayerwiseRunner, index: int,
                          targets: dict[str, nn.Module]) -> list[dict[str, Any]]:
        if not targets:
            return []
        groups = shared_input_groups(runner, index, targets)
        heads = {group[0]: group for group in groups}
        acc = {name: HessianAccumulator(linear_weight(targets[name]).shape[1]) for name in heads}

        def add(name, module, x, out):
            acc[name].add(x)

        with runner.collect({name: targets[name] for name in heads}, add):
            runner.run_layer(index)
        out, solve = [], 0
        for head, group in heads.items():
            hessian = acc[head].value()
            for path in group:
                out.append(self.install(program, path, targets[path], hessian, solve=solve))
                solve += 1
        return out

    def install(self, program: Program, path: str, module: nn.Module,
                hessian: torch.Tensor | None, *, solve: int = 0) -> dict[str, Any]:
        """Prune ``module`` and replace it at ``path`` by an ``NMLinear`` (with distributed
        calibration, solve ``solve`` of the layer runs on one rank and is broadcast)."""
        cfg = self.config
        weight = linear_weight(module).detach().float()
        result = share(solve, lambda: prune(weight, cfg.method, cfg.n, cfg.m, hessian,
                                            damp=cfg.damp))
        new = NMLinear.from_dense(result.weight, result.keep, cfg.n, cfg.m, module.bias)
        replace_module(program.module, path, new)
        dense = new.weight
        entry: dict[str, Any] = {
            "path": path,
            "shape": list(weight.shape),
            "pruned": int(weight.numel() - result.keep.sum()),
            "sparsity": float((dense == 0).float().mean()),
            "max_nonzeros_per_group": int(group_nonzeros(dense, cfg.m).max()),
            "nm_invariant": satisfies_nm(dense, cfg.n, cfg.m),
            "weight_error": weight_error(weight, dense),
        }
        if result.output_error is not None:
            entry["output_error"] = result.output_error
            entry["magnitude_output_error"] = result.magnitude_output_error
        return entry

    @staticmethod
    def plot(details: dict[str, Any], path: Path) -> bool:
        """Per-layer output error (method vs magnitude) and sparsity."""
        layers = details.get("layers") or []
        if not layers:
            return False
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax, ax2) = plt.subplots(2, 1, figsize=(max(6, len(layers) * 0.09), 5.2),
                                      sharex=True)
        plot_layer_errors(ax, layers, method=details["method"], baseline="magnitude",
                          weight_label="||W - W_s||^2 / ||W||^2")
        ax.set_xlabel("")
        ax.set_title(f"nm-sparsify: {details['method']} {details['pattern']}")
        x = range(len(layers))
        names = [entry["path"].split(".", 2)[-1] for entry in layers]
        ax2.bar(x, [e["sparsity"] for e in layers], color="#37b24d", width=1.0)
        ax2.set_ylim(0, 1)
        ax2.set_ylabel("zeros")
        ax2.set_xlabel(f"linear layer ({names[0]} ... {names[-1]})")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return True


def check_nm_invariant(module: nn.Module) -> list[str]:
    """Paths of N:M layers whose dense weight breaks their pattern (empty when all hold)."""
    return [name for name, mod in sparse_layers(module).items()
            if not satisfies_nm(mod.weight, mod.n, mod.m)]


__all__ = ["NMSparsify", "NMSparsifyConfig", "check_nm_invariant", "sparse_layers"]
