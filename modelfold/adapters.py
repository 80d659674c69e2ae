"""Adapters on disk in PEFT's format: save ours, load PEFT's (and ours) onto a base model.

A saved adapter is a folder PEFT's ``PeftModel.from_pretrained(base, folder)`` loads as is:

    adapter_config.json          peft_type LORA, r, lora_alpha, target_modules (full paths),
                                 rank_pattern / alpha_pattern where layers differ, use_rslora,
                                 fan_in_fan_out (GPT-2 Conv1D), base_model_name_or_path
    adapter_model.safetensors    base_model.model.<path>.lora_A.weight [r, in] and .lora_B.weight
                                 [out, r], float32
    modelfold_adapter.json       what PEFT ignores: the base model's fingerprint (family, sizes,
                                 vocabulary) checked on load, the adapter kind, and how it was
                                 exported

Every adapter kind is written as plain LoRA with the same function: LoRA-XS / LoRA-SB as
``lora_A = R A`` (exact), NOLA as its effective pair (exact), PiSSA as a rank-``2r`` LoRA over the
*original* weights (``lora_A = [A; A0]``, ``lora_B = [B, -B0]``: PEFT's own conversion), since the
model's base holds the residual ``W - s B0 A0``.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modelfold.assets import atomic_output
from modelfold.ir.lora import LoraAdapter, LoraError, LoraLinear, lora_layers
from modelfold.ir.modules import is_conv1d, linear_shape, replace_module

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
SIDECAR = "modelfold_adapter.json"
PREFIX = "base_model.model."


class AdapterError(LoraError):
    """An adapter folder that cannot be written or applied to this model."""


def _module_of(model: Any) -> tuple[nn.Module, Any]:
    """``(nn.Module, Program or None)`` from a module, Program or TransformResult."""
    program = getattr(model, "program", None) or (model if hasattr(model, "arch") else None)
    module = program.module if program is not None else model
    if not isinstance(module, nn.Module):
        raise TypeError(f"expected a model, Program or TransformResult; got {type(model).__name__}")
    return module, program


def base_fingerprint(module: nn.Module) -> dict[str, Any]:
    """What identifies a base model family and size (checked when an adapter is loaded)."""
    config = getattr(module, "config", None)
    keys = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size",
            "num_attention_heads", "num_key_value_heads")
    return {k: getattr(config, k, None) for k in keys if getattr(config, k, None) is not None}


def _plain_pair(adapter: LoraAdapter) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(lora_A, lora_B, scaling)`` of plain LoRA with the adapter's function."""
    with torch.no_grad():
        a, b = adapter.effective()
        a, b = a.detach().float(), b.detach().float()
        if adapter.kind == "pissa":
            a = torch.cat([a, adapter.lora_A0.detach().float()], 0)
            b = torch.cat([b, -adapter.lora_B0.detach().float()], 1)
    return a.contiguous(), b.contiguous(), adapter.scaling


def save_adapter(model: Any, out_dir: str | Path, *, name: str = "default",
                 base_model_name_or_path: str | None = None, overwrite: bool = False
                 ) -> dict[str, Any]:
    """Write adapter ``name`` of ``model`` as a PEFT LoRA adapter folder; returns its facts.

    Raises:
        AdapterError: the model has no adapter ``name``, or ``out_dir`` exists (without
            ``overwrite``).
    """
    from safetensors.torch import save_file

    module, program = _module_of(model)
    layers = {p: layer for p, layer in lora_layers(module).items() if name in layer.adapters}
    if not layers:
        present = sorted({n for m in lora_layers(module).values() for n in m.adapters})
        raise AdapterError(f"the model has no adapter named {name!r} (adapters: "
                           f"{', '.join(present) or 'none'})")
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise AdapterError(f"adapter folder '{out}' already exists; choose another or overwrite")
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    kinds = Counter()
    rslora = {layer.adapters[name].rslora for layer in layers.values()}
    if len(rslora) > 1:
        raise AdapterError("PEFT has one use_rslora flag per adapter; this adapter mixes both")
    use_rslora = rslora.pop()
    conv1d = False
    for path, layer in layers.items():
        ad = layer.adapters[name]
        a, b, s = _plain_pair(ad)
        r = a.shape[0]
        tensors[f"{PREFIX}{path}.lora_A.weight"] = a
        tensors[f"{PREFIX}{path}.lora_B.weight"] = b
        ranks[path] = r
        alphas[path] = s * (math.sqrt(r) if use_rslora else r)
        kinds[ad.kind] += 1
        conv1d |= is_conv1d(layer.base_layer)
    r0 = Counter(ranks.values()).most_common(1)[0][0]
    alpha0 = Counter(alphas.values()).most_common(1)[0][0]
    source = base_model_name_or_path or (getattr(program, "source", None) if program else None) \
        or getattr(getattr(module, "config", None), "_name_or_path", None) or ""
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(source),
        "r": r0, "lora_alpha": alpha0, "lora_dropout": 0.0, "bias": "none",
        "target_modules": sorted(layers), "fan_in_fan_out": conv1d, "use_rslora": use_rslora,
        "use_dora": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {re.escape(p): r for p, r in ranks.items() if r != r0},
        "alpha_pattern": {re.escape(p): a for p, a in alphas.items() if a != alpha0},
    }
    sidecar = {"format": "modelfold-adapter", "version": 1, "adapter": name,
               "kinds": dict(kinds), "base": base_fingerprint(module),
               "exported_as": "plain LoRA" + (" (PiSSA: rank 2r over the original weights)"
                                              if kinds.get("pissa") else ""),
               "layers": len(layers),
               "parameters": sum(t.numel() for t in tensors.values())}
    with atomic_output(out) as tmp:
        tmp.mkdir(parents=True)
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=2) + "\n")
    return {**sidecar, "path": str(out), "bytes": (out / WEIGHTS).stat().st_size}


def read_adapter(path: str | Path) -> tuple[dict[str, Any], dict[str, tuple[torch.Tensor, torch.Tensor]],
                                           dict[str, Any]]:
    """``(peft_config, {module_path: (lora_A, lora_B)}, sidecar)`` of an adapter folder.

    Raises:
        AdapterError: not an adapter folder, not a LoRA adapter, a feature modelfold does not
            support (DoRA, LoRA on biases or embeddings, modules_to_save), or a corrupt file.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(path)
    if not (folder / CONFIG).is_file() and (folder / "adapter" / CONFIG).is_file():
        folder = folder / "adapter"  # the output folder of `modelfold finetune`
    if not (folder / CONFIG).is_file():
        raise AdapterError(f"'{folder}' is not an adapter folder (no {CONFIG})")
    try:
        config = json.loads((folder / CONFIG).read_text())
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{folder / CONFIG} is not valid JSON: {exc}") from None
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{folder}: peft_type {config.get('peft_type')!r} is not supported; "
                           "modelfold loads LoRA adapters")
    for key, what in (("use_dora", "DoRA"), ("lora_bias", "LoRA on biases"),
                      ("modules_to_save", "modules_to_save (fully trained modules)")):
        if config.get(key):
            raise AdapterError(f"{folder}: {what} is not supported by modelfold's LoRA layers")
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise AdapterError(f"{folder}: missing {WEIGHTS} (modelfold reads safetensors adapters)")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"{weights} is corrupt or unreadable: {exc}") from None
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.(lora_A|lora_B)(?:\.[A-Za-z0-9_\-]+)?\.weight",
                         key)
        if m is None:
            raise AdapterError(f"{weights}: tensor {key!r} is not a LoRA A/B weight "
                               "(embedding or DoRA adapters are not supported)")
        pairs.setdefault(m.group(1), {})[m.group(2)] = tensor
    out = {}
    for path, ab in pairs.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise AdapterError(f"{weights}: {path} has only {', '.join(ab)}")
        out[path] = (ab["lora_A"].float(), ab["lora_B"].float())
    if not out:
        raise AdapterError(f"{weights} holds no LoRA weights")
    sidecar = json.loads((folder / SIDECAR).read_text()) if (folder / SIDECAR).is_file() else {}
    return config, out, sidecar


def _pattern_value(patterns: dict[str, Any], path: str, default: Any) -> Any:
    """PEFT's rank/alpha pattern lookup: a key matches a module path ending in it (regex)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def load_adapter(model: Any, path: str | Path, *, name: str = "default", activate: bool = True,
                 trainable: bool = False) -> dict[str, Any]:
    """Apply a PEFT LoRA adapter folder to ``model`` as adapter ``name``; returns its facts.

    The layers it names are wrapped in ``LoraLinear`` (or get one more adapter). The model's
    parameters are left as they are unless ``trainable`` (then only this adapter trains).

    Raises:
        AdapterError: the folder is not a usable adapter, or it was made for another base model
            (a different family or size, a layer this model lacks, or mismatched shapes).
    """
    from modelfold.passes.lora import is_adaptable, mark_trainable

    module, program = _module_of(model)
    config, pairs, sidecar = read_adapter(path)
    mine = base_fingerprint(module)
    theirs = sidecar.get("base") or {}
    diff = {k: (theirs[k], mine.get(k)) for k in theirs if mine.get(k) != theirs[k]}
    if diff:
        detail = ", ".join(f"{k} {a} (this model: {b})" for k, (a, b) in diff.items())
        raise AdapterError(f"adapter '{path}' was made for another base model: {detail}")
    modules = dict(module.named_modules())
    plan = []
    for p, (a, b) in pairs.items():
        target = modules.get(p)
        if target is None:
            raise AdapterError(f"adapter '{path}' targets '{p}', which this model does not have "
                               "(an adapter for another base model?)")
        if not (isinstance(target, LoraLinear) or is_adaptable(target)):
            raise AdapterError(f"adapter '{path}' targets '{p}', a {type(target).__name__}, "
                               "not a linear layer")
        if isinstance(target, LoraLinear) and name in target.adapters:
            raise AdapterError(f"{p} already has an adapter named {name!r}; load with another name")
        k, n = linear_shape(target.base_layer if isinstance(target, LoraLinear) else target)
        r = a.shape[0]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != k or b.shape != (n, r):
            raise AdapterError(f"adapter '{path}': {p} has lora_A {tuple(a.shape)} and lora_B "
                               f"{tuple(b.shape)}, but the layer is {n}x{k} (an adapter for "
                               "another base model?)")
        plan.append((p, target, a, b, r))
    use_rslora = bool(config.get("use_rslora"))
    for p, target, a, b, r in plan:
        alpha = float(_pattern_value(config.get("alpha_pattern"), p, config.get("lora_alpha", 8)))
        ad = LoraAdapter("lora", a.shape[1], b.shape[0], r, alpha, rslora=use_rslora,
                         dropout=float(config.get("lora_dropout") or 0.0))
        with torch.no_grad():
            ad.lora_A.copy_(a)
            ad.lora_B.copy_(b)
        wrapper = target if isinstance(target, LoraLinear) else LoraLinear(target)
        wrapper.add_adapter(name, ad, activate=activate)
        if wrapper is not target:
            replace_module(module, p, wrapper)
        for t in ad.parameters():
            t.requires_grad_(trainable)
    if trainable:
        mark_trainable(module, [name])
    if program is not None:
        program.invalidate(keep_analyses=True)
    return {"adapter": name, "path": str(path), "layers": len(plan),
            "parameters": sum(a.numel() + b.numel() for _, _, a, b, _ in plan),
            "base_model_name_or_path": config.get("base_model_name_or_path"),
            "kinds": sidecar.get("kinds", {"lora": len(plan)})}


__all__ = ["AdapterError", "base_fingerprint", "load_adapter", "read_adapter", "save_adapter"]
