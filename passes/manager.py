"""The pass manager: preconditions, run, verify, measure, log — for every pass in a pipeline."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from modelfold.ir.program import PassRecord, Program
from modelfold.ir.verify import verify
from modelfold.passes.base import Pass, PassError, PostconditionError
from modelfold.passes.fidelity import compare, probe_inputs


@dataclass
class PassContext:
    """Cross-cutting switches for a pipeline run (one place, not in every pass).

    Attributes:
        verify: run IR verification (including re-capture) after every pass.
        measure: measure each pass's effect on the probe batch.
        exact_atol: the largest max-abs logit change an ``exact`` pass may cause.
        disabled: pass names to skip (recorded in the report as skipped); the program keeps
            them, so a backend's default graph passes (the fusions) skip them as well.
        log: where progress lines go (``None`` for silence).
    """

    verify: bool = True
    measure: bool = True
    exact_atol: float = 1e-4
    disabled: tuple[str, ...] = ()
    probe: torch.Tensor | None = None
    log: Callable[[str], None] | None = field(
        default=lambda msg: print(msg, file=sys.stderr, flush=True))


class PassManager:
    """Runs configured passes over a ``Program``.

    For each pass: ``requires`` (preconditions), ``run``, re-capture and ``verify``, then the
    fidelity check on a fixed probe batch: analysis passes must leave the logits bit-identical,
    exact passes within ``exact_atol``; lossy passes get SQNR / KL / top-1 recorded.
    """

    def __init__(self, passes: list[Pass], context: PassContext | None = None):
        self.passes = passes
        self.context = context or PassContext()

    def _say(self, msg: str) -> None:
        if self.context.log:
            self.context.log(msg)

    def run(self, program: Program) -> Program:
        ctx = self.context
        check_distributable(self.passes)
        probe, probe_desc = (ctx.probe, "given probe batch") if ctx.probe is not None \
            else probe_inputs(program)
        is_logits = program.arch.kind == "causal-lm"
        original = program.logits(probe) if ctx.measure else None
        previous = original
        program.disabled |= set(ctx.disabled)  # the export's default graph passes too
        program.analyses.setdefault("_probe", {"description": probe_desc,
                                               "shape": list(probe.shape)})
        if ctx.verify:  # the input: its graph too if it was captured already (no capture for it)
            verify(program, capture=program.is_captured)
        for i, p in enumerate(self.passes, 1):
            record = PassRecord(name=p.name, options=p.config.to_dict(), kind=p.kind,
                                level=p.level)
            if p.name in ctx.disabled:
                record.skipped.append({"target": p.name, "reason": "disabled by the context"})
                program.log.append(record)
                self._say(f"[{i}/{len(self.passes)}] {p!r}: disabled, skipped")
                continue
            self._say(f"[{i}/{len(self.passes)}] {p!r}")
            p.requires(program)
            record.kind = kind = p.kind_for(program)
            record.params_before = program.parameter_count()
            record.bytes_before = program.parameter_bytes()
            # top-k routing can swap an expert at a near tie under a rounding change: an exact
            # graph pass on a routed MoE graph is judged with every expert routed
            pinned = program.graph_logits(probe, all_experts=True) \
                if ctx.measure and kind == "exact" and p.level == "graph" \
                and _routed_moe(program) else None
            start = time.perf_counter()
            details = p.run(program) or {}
            record.seconds = time.perf_counter() - start
            record.skipped.extend(details.pop("skipped", []))
            record.details = details
            if p.level == "module" and kind != "analysis":
                program.invalidate()
            record.params_after = program.parameter_count()
            record.bytes_after = program.parameter_bytes()
            if ctx.verify:
                verify(program)
            if ctx.measure:
                after = program.logits(probe)
                judged = kind
                if pinned is not None:
                    self._judge(p.name, kind, p.exact_rtol, pinned,
                                program.graph_logits(probe, all_experts=True), pinned, is_logits)
                    judged = "lossy"  # the routed logits' change is recorded, not judged
                record.fidelity = self._judge(p.name, judged, p.exact_rtol, previous, after,
                                              original, is_logits)
                previous = after
            program.log.append(record)
            self._say(f"    done in {record.seconds:.1f}s; params {record.params_before:,} -> "
                      f"{record.params_after:,}" + _fidelity_text(record.fidelity))
        return program

    def _judge(self, name: str, kind: str, exact_rtol: float, previous: torch.Tensor,
               after: torch.Tensor, original: torch.Tensor, is_logits: bool) -> dict[str, Any]:
        if previous.shape != after.shape:
            raise PostconditionError(f"{name} changed the output shape from "
                                     f"{tuple(previous.shape)} to {tuple(after.shape)}")
        step = compare(previous, after, logits=is_logits)
        if kind == "analysis" and not torch.equal(previous, after):
            raise PostconditionError(f"analysis pass {name} changed the model's outputs "
                                     f"(max abs diff {step['max_abs_diff']:.3g})")
        tolerance = self.context.exact_atol + exact_rtol * float(previous.abs().max())
        if kind == "exact" and step["max_abs_diff"] > tolerance:
            raise PostconditionError(
                f"exact pass {name} changed the logits by {step['max_abs_diff']:.3g} "
                f"(> tolerance {tolerance:g})")
        total = compare(original, after, logits=is_logits)
        return {**step, **{f"cumulative_{k}": v for k, v in total.items()}}


def check_distributable(passes: list[Pass]) -> None:
    """Under ``torch.distributed`` (several ranks), refuse a pass that cannot split its work."""
    from modelfold.distributed import rank_and_world

    world = rank_and_world()[1]
    if world == 1:
        return
    for p in passes:
        why = p.distribute_refusal()
        if why:
            raise PassError(f"{p.name} cannot run over {world} ranks: {why}")


def _routed_moe(program: Program) -> bool:
    from modelfold.ir.moe import moe_layers

    return any(m.top_k < m.num_experts for m in moe_layers(program.module).values())


def _fidelity_text(fid: dict[str, Any]) -> str:
    if not fid:
        return ""
    parts = [f"SQNR {fid['sqnr_db']:.1f} dB"]
    if "top1_agreement" in fid:
        parts.append(f"top-1 {fid['top1_agreement']:.3f}")
        parts.append(f"KL {fid['kl']:.4f}")
    return "; " + ", ".join(parts)


__all__ = ["PassContext", "PassError", "PassManager"]
