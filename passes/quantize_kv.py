"""``quantize-kv``: an int8 KV cache with per-channel scales calibrated on text (graph pass,
lossy).

At long context a decode step reads the whole cache: for SmolLM2-135M at 1,024 tokens that is
47 MB of float32 keys and values per token, as much as its int4 weights. This pass stores the
cache in int8 (a quarter of the bytes): each fused attention op (``fuse-attention``, applied here
first if the pipeline has not) gets per-channel scales ``[1, Hkv, 1, D]`` for its keys (after
rotary embedding, as they are cached) and values, ``max |x| / 127`` over the calibration text,
and the graph's past / present tensors become int8. ONNX Runtime's GroupQueryAttention reads
such a cache natively (``k_quant_type`` / ``v_quant_type`` PER_CHANNEL); the op's reference
quantizes and dequantizes the same way (round half to even, clamp to [-128, 127]).

The report records each layer's scale range and the relative round-trip error of its keys and
values on the calibration text, and the KV-cache bytes per token before and after.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch.export import ExportedProgram

import modelfold.ir.attention as attention_op
from modelfold.errors import OptionError
from modelfold.ir.graph import GraphEditor, runnable, user_inputs
from modelfold.ir.program import Program
from modelfold.ir.shared_attention import sharing_of
from modelfold.ir.signature import graph_inputs
from modelfold.passes.base import GraphPass, PreconditionError, option
from modelfold.passes.calibration import CalibrationConfig, calibration_option
from modelfold.passes.fuse_attention import FuseAttention, fused_attention
from modelfold.passes.registry import register_pass

_ATTENTION = attention_op.attention._opoverload


@dataclass(frozen=True)
class QuantizeKVConfig(CalibrationConfig):
    """Options of ``quantize-kv``."""

    bits: int = option(8, "bits per cached key / value (8: int8 with per-channel scales)")
    n_samples: int = calibration_option("n_samples", 16)

    def validate(self) -> None:
        if self.bits != 8:
            raise OptionError(f"pass 'quantize-kv' option 'bits' must be 8 (an int8 cache); got "
                              f"{self.bits}")


@register_pass
class QuantizeKV(GraphPass):
    """The KV cache in int8 with calibrated per-channel scales (lossy)."""

    name = "quantize-kv"
    config_class = QuantizeKVConfig
    kind = "lossy"
    summary = ("the KV cache stored in int8 with per-channel scales calibrated on text (a "
               "quarter of the bytes a decode step reads at long context)")
    order: ClassVar[int] = 15

    def requires(self, program: Program) -> None:
        if program.signature.kind != "causal-lm":
            raise PreconditionError(f"quantize-kv needs a decoder with a KV cache; "
                                    f"{program.arch.family} is an {program.arch.kind}")
        self.config.require_text(program, "quantize-kv calibrates the cache's scales on text")
        if sharing_of(program.module) is not None:
            raise PreconditionError(
                "quantize-kv does not support attention shared across layers (share-attention): "
                "the borrowing layers read the owners' cache, whose int8 scales they would need; "
                "share attention without quantize-kv, or quantize the cache of an unshared model")

    def rewrite(self, program: Program, ep: ExportedProgram) -> tuple[ExportedProgram,
                                                                        dict[str, Any]]:
        details: dict[str, Any] = {}
        if not fused_attention(ep):
            ep, fused = FuseAttention().rewrite(program, ep)
            details["fuse-attention"] = fused
            if not fused_attention(ep):
                raise PreconditionError(f"quantize-kv stores the cache of the fused attention op, "
                                        f"and the attention cannot be fused: {fused['not_fused']}"
                                        + "".join(f"; {s['target']}: {s['reason']}"
                                                  for s in fused.get("skipped", [])[:1]))
        sig = program.signature
        ids = self.config.calibration_ids(program)
        amax = _cache_amax(program, ep, self.config.batches(ids))  # [(k [1,H,1,D], v)] per layer
        editor = GraphEditor(ep)
        inputs = user_inputs(editor, sig.inputs)
        nodes = editor.calls(_ATTENTION)
        layers = []
        for i, (node, (k_max, v_max)) in enumerate(zip(nodes, amax)):
            if node.args[3] is not inputs[sig.past_names[2 * i]]:
                raise PreconditionError(f"attention op {i} does not read layer {i}'s cache")
            scales = [(m.clamp(min=1e-8) / 127.0).float() for m in (k_max, v_max)]
            k_scale, v_scale = (editor.add_tensor(f"kv_cache.{i}.{kind}_scale", s)
                                for kind, s in zip(("key", "value"), scales))
            new = editor.call(_ATTENTION, (*node.args[:13], k_scale, v_scale), near=node)
            editor.replace(node, new)
            layers.append({"layer": i, "key_scale": [float(scales[0].min()), float(scales[0].max())],
                           "value_scale": [float(scales[1].min()), float(scales[1].max())]})
        for name in sig.past_names:
            editor.retype(inputs[name], torch.int8)
        new_ep = editor.finish()
        errors = _round_trip_errors(program, ep, new_ep, ids[: self.config.batch_size])
        for layer, error in zip(layers, errors):
            layer.update(error)
        cache = sig.cache
        per_token = 2 * cache.num_layers * cache.num_kv_heads * cache.head_dim
        details.update(layers=layers, calibration=self.config.calibration_facts(ids),
                       kv_cache_bytes_per_token={"before": per_token * cache.dtype.itemsize,
                                                 "after": per_token})
        return new_ep, details


@torch.no_grad()
def _cache_amax(program: Program, ep: ExportedProgram, batches: list[torch.Tensor]
                ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the largest |key| and |value| of every (KV head, channel) the graph caches
    for the calibration batches: ``[1, Hkv, 1, D]`` each."""
    gm = runnable(ep)
    sig = program.signature
    amax: list[torch.Tensor] | None = None
    for batch in batches:
        presents = gm(*graph_inputs(sig, batch))[1:]  # [B, Hkv, S, D] each
        now = [p.abs().amax(dim=(0, 2), keepdim=True) for p in presents]
        amax = now if amax is None else [torch.maximum(a, b) for a, b in zip(amax, now)]
    return list(zip(amax[0::2], amax[1::2]))


@torch.no_grad()
def _round_trip_errors(program: Program, before: ExportedProgram, after: ExportedProgram,
                       ids: torch.Tensor) -> list[dict[str, float]]:
    """Per layer, ``|dequant(quant(x)) - x| / |x|`` of the keys and values cached for ``ids``."""
    sig = program.signature
    exact = runnable(before)(*graph_inputs(sig, ids))[1:]
    stored = runnable(after)(*graph_inputs(sig, ids, cache_dtype=torch.int8))[1:]
    editor = GraphEditor(after)
    scales = [editor.tensor(n.args[13 + j]) for n in editor.calls(_ATTENTION) for j in (0, 1)]
    errors = []
    for i in range(0, len(exact), 2):
        pair = {}
        for j, kind in ((0, "key"), (1, "value")):
            x, q = exact[i + j], attention_op.read_cache(stored[i + j], scales[i + j], torch.float32)
            pair[f"{kind}_relative_error"] = float((q - x).norm() / x.norm().clamp(min=1e-12))
        errors.append(pair)
    return errors


__all__ = ["QuantizeKV", "QuantizeKVConfig"]
