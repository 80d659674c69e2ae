"""Recursive (layer-tied) models after ``tie-layers``: uptraining, the shared base and its
per-depth relaxation adapters.

    result = modelfold.transform("smollm2-135m", "tie-layers{unique=15,relax_rank=64}")
    modelfold.uptrain(result, teacher=modelfold.load().module, steps=20)
    modelfold.save_recursive(result, "out/")   # out/base (shared weights once) + out/adapter (PEFT)

``out/base`` is a modelfold checkpoint of the recursive model without the relaxation: every
shared tensor is stored once and ``modelfold.load`` re-ties it. ``out/adapter`` holds the
per-depth deltas as a PEFT LoRA adapter (``lora_alpha = r``, one module per depth and linear
layer). With PEFT::

    base = modelfold.load("out/base").module
    model = peft.PeftModel.from_pretrained(base, "out/adapter")
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from torch import nn

from modelfold.adapters import _module_of, save_adapter
from modelfold.assets import atomic_output
from modelfold.errors import ModelfoldError
from modelfold.ir.lora import LoraError, lora_layers
from modelfold.ir.modules import replace_module


class RecursiveError(ModelfoldError, ValueError):
    """The model is not a tied (recursive) model, or lacks the named relaxation adapter."""


def _program(model: Any):
    from modelfold.ir.program import Program

    module, program = _module_of(model)
    return program if program is not None else Program(module)


def tying_record(model: Any) -> dict[str, Any]:
    """The details of the ``tie-layers`` pass that made ``model`` (from its pass log)."""
    program = _program(model)
    for record in reversed(program.log):
        if record.name == "tie-layers":
            return record.details
    raise RecursiveError("the model has no tie-layers pass in its log; run "
                         "modelfold.transform(model, 'tie-layers{unique=K,...}') (or "
                         "share-attention) first")


def recursive_base(model: Any, adapter: str = "relax"):
    """A copy of the recursive model without its relaxation adapters (a ``Program``).

    Layers whose only adapter is ``adapter`` go back to their base layer; shared tensors stay
    shared in the copy.
    """
    from modelfold.ir.program import Program

    program = _program(model)
    module = copy.deepcopy(program.module)  # the memo keeps shared Parameters shared
    layers = {p: m for p, m in lora_layers(module).items() if adapter in m.adapters}
    if not layers:
        raise RecursiveError(f"the model has no relaxation adapter named {adapter!r} "
                             "(tie-layers with relax_rank=0 has none: save it with modelfold.save)")
    for path, layer in layers.items():
        if layer.merged:
            raise LoraError(f"{path}: merged adapters cannot be separated from the shared base")
        if list(layer.adapters) == [adapter]:
            replace_module(module, path, layer.base_layer)
        else:
            layer.delete_adapter(adapter)
    base = Program(module, tokenizer=program.tokenizer, source=program.source)
    base.log = copy.deepcopy(program.log)
    return base


def save_recursive(model: Any, out_dir: str | Path, *, adapter: str = "relax",
                   overwrite: bool = False) -> dict[str, Any]:
    """Write ``out_dir/base`` (checkpoint, shared tensors once) and ``out_dir/adapter`` (PEFT
    LoRA with the per-depth relaxation) of a relaxed recursive model; returns their facts.

    A pure recursive model (no relaxation) is written as ``out_dir/base`` only.
    """
    from modelfold.checkpoint import check_destination, save_checkpoint

    record = tying_record(model)
    out = Path(out_dir)
    check_destination(out, overwrite)
    relaxed = bool(record.get("relax_rank"))
    facts: dict[str, Any] = {"unique": record["unique"], "layers": record["layers"]}
    with atomic_output(out) as tmp:
        tmp.mkdir(parents=True)
        base = recursive_base(model, adapter) if relaxed else _program(model)
        facts["base"] = save_checkpoint(base, tmp / "base")
        facts["base_bytes"] = (tmp / "base" / "model.safetensors").stat().st_size
        if relaxed:
            info = save_adapter(model, tmp / "adapter", name=adapter)
            facts["adapter"] = {k: v for k, v in info.items() if k != "path"}
            facts["adapter_bytes"] = info["bytes"]
    return facts


def uptrain(model: Any, *, teacher: nn.Module, **options: Any) -> dict[str, Any]:
    """Distil the original model into the recursive one (``tie-layers``) or into one whose layers
    share attention (``share-attention``) with the fine-tuning engine.

    Trains what the pass marked trainable (tie-layers: shared weights, per-depth vectors,
    relaxation adapters; share-attention: the attention of the layers in a group; moefy: the
    routers, and the experts too with ``train_experts=True``; ``balance_weight`` adds the
    load-balancing loss). Defaults:
    ``kl_weight=1`` (T^2 KL to the teacher), ``ce_weight=0``, ``lr=1e-4``; any
    ``modelfold.finetune.TrainConfig`` option (``steps``, ``batch_size``, ``seq_len`` ...)
    overrides them, and ``checkpoint_dir`` / ``tokenizer`` pass through to ``train``.
    """
    from modelfold.finetune import TrainConfig, train
    from modelfold.ir.moe import moe_layers
    from modelfold.ir.shared_attention import sharing_of

    module = _program(model).module
    experts = options.pop("train_experts", False)
    moe = moe_layers(module)
    if moe:  # moefy models train their routers (and, with train_experts, the experts)
        for m in moe.values():
            m.router.weight.requires_grad_(True)
            for p in m.experts.parameters():
                p.requires_grad_(bool(experts))
    elif experts:
        raise RecursiveError("train_experts is for mixture-of-experts models (moefy)")
    elif sharing_of(module) is None:  # share-attention models train their attention
        tying_record(model)
    passthrough = {k: options.pop(k) for k in ("checkpoint_dir", "tokenizer", "resume",
                                                "step_callback", "progress", "log") if k in options}
    options.setdefault("kl_weight", 1.0)
    options.setdefault("ce_weight", 0.0)
    options.setdefault("lr", 1e-4)
    config = TrainConfig.from_options(options)
    return train(model, config=config, teacher=teacher, **passthrough)


__all__ = ["RecursiveError", "recursive_base", "save_recursive", "tying_record", "uptrain"]
