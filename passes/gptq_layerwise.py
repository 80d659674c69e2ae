"""GPTQ over a whole model, one transformer layer at a time (``quantize{method=gptq}``; also the
rounding step of ``method=awq-gptq``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from modelfold.distributed import share
from modelfold.ir.modules import linear_weight
from modelfold.ir.quant import PackedWeight
from modelfold.ir.sparse import NMLinear
from modelfold.passes.gptq import HessianAccumulator, gptq_quantize
from modelfold.passes.layerwise import LayerwiseRunner

if TYPE_CHECKING:
    from modelfold.ir.program import Program
    from modelfold.passes.quantize import Quantize


def shared_input_groups(runner: LayerwiseRunner, index: int,
                        modules: dict[str, nn.Module]) -> list[list[str]]:
    """Group modules that receive the same input tensor (q/k/v, gate/up), from the first batch."""
    first: dict[str, torch.Tensor] = {}

    def keep(name, module, x, out):
        first.setdefault(name, x)

    with runner.collect(modules, keep):
        runner.run_layer(index, batches=slice(0, 1))
    groups: list[list[str]] = []
    for name in modules:
        for group in groups:
            ref = first[group[0]]
            if ref.shape == first[name].shape and torch.equal(ref, first[name]):
                group.append(name)
                break
        else:
            groups.append([name])
    return groups


def sub_blocks(program: Program, index: int, names: list[str]) -> list[list[str]]:
    """``true_sequential`` stages: attention inputs, attention output, MLP inputs, MLP output."""
    layout = program.arch.layer
    prefix = f"{program.arch.layers}.{index}."
    roles = [("q", "k", "v", "qkv"), ("o",), ("gate", "up", "fc_in"), ("down", "fc_out")]
    paths = {**layout.attention_proj, **layout.mlp_proj}
    stages, placed = [], set()
    for stage_roles in roles:
        stage = [n for n in names if any(n == prefix + paths[r] for r in stage_roles if r in paths)]
        if stage:
            stages.append(stage)
            placed.update(stage)
    rest = [n for n in names if n not in placed]
    return stages + ([rest] if rest else [])


@torch.no_grad()
def quantize_gptq(qpass: Quantize, program: Program, runner: LayerwiseRunner,
                  selected: dict[int, dict[str, nn.Module]]) -> list[dict[str, Any]]:
    report: list[dict[str, Any]] = []
    for index, _layer in runner.layers():
        report += gptq_layer(qpass, program, runner, index, selected.get(index, {}))
        runner.advance(index)
    return report


@torch.no_grad()
def gptq_layer(qpass: Quantize, program: Program, runner: LayerwiseRunner, index: int,
               targets: dict[str, nn.Module]) -> list[dict[str, Any]]:
    """GPTQ on the ``targets`` of layer ``index`` (installed as ``QuantLinear``)."""
    cfg = qpass.config
    stages = sub_blocks(program, index, list(targets)) if cfg.true_sequential \
        else ([list(targets)] if targets else [])
    report: list[dict[str, Any]] = []
    for stage in stages:
        modules = {name: targets[name] for name in stage}
        groups = shared_input_groups(runner, index, modules)
        heads = {group[0]: group for group in groups}
        acc = {name: HessianAccumulator(_in_features(modules[name])) for name in heads}

        def add(name, module, x, out, acc=acc):
            acc[name].add(x)

        with runner.collect({n: modules[n] for n in heads}, add):
            runner.run_layer(index)
        for solve, (head, group) in enumerate(heads.items()):
            report += _quantize_group(qpass, program, {n: modules[n] for n in group},
                                      acc[head].value(), cfg, solve=solve)
    return report


def _in_features(module: nn.Module) -> int:
    return linear_weight(module).shape[1]


def _quantize_group(qpass: Quantize, program: Program, modules: dict[str, nn.Module],
                    hessian: torch.Tensor, cfg: Any, *, solve: int = 0) -> list[dict[str, Any]]:
    """GPTQ on the row-concatenation of linears that share one input (one Hessian).

    With distributed calibration, solve number ``solve`` of the layer runs on one rank and its
    result is broadcast (``modelfold.distributed.share``).
    """

    weights = [linear_weight(m).detach().float() for m in modules.values()]
    stacked = torch.cat(weights, 0)
    fmt = qpass.format_for(stacked.shape[1])
    keep = None
    if any(isinstance(m, NMLinear) for m in modules.values()):
        keep = torch.cat([m.mask() if isinstance(m, NMLinear) else torch.ones_like(w, dtype=torch.bool)
                          for m, w in zip(modules.values(), weights)], 0)
    result = share(solve, lambda: gptq_quantize(stacked, hessian, fmt, damp=cfg.damp,
                                                act_order=cfg.act_order, mse=cfg.mse, keep=keep))
    out, row = [], 0
    for (path, module), w in zip(modules.items(), weights):
        rows = slice(row, row + w.shape[0])
        row += w.shape[0]
        packed = PackedWeight.from_codes(result.codes[rows], result.scales[rows],
                                         result.zeros[rows], fmt)
        out.append(qpass.install(program, path, module, packed, codes=result.codes[rows],
                                 output_error=result.relative_error,
                                 rtn_output_error=result.rtn_relative_error))
    return out
