"""Resumable checkpoints of a fine-tuning run (``modelfold.finetune``).

A checkpoint is a folder ``step-NNNNNN`` holding ``trainable.safetensors`` (the trainable tensors
by name), ``optimizer.pt`` (optimizer and scheduler state) and ``state.json`` (step, options,
a fingerprint of the trainable tensors, loss and evaluation history), written atomically.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from modelfold.errors import ModelfoldError

if TYPE_CHECKING:
    from modelfold.finetune import TrainConfig


class TrainError(ModelfoldError, ValueError):
    """Training cannot start or continue (nothing trainable, no teacher, bad checkpoint...)."""


_RESUMABLE_OPTIONS = {"steps", "eval_every", "eval_chars", "checkpoint_every", "log_every",
                      "gradient_checkpointing"}
_CHECKPOINT_FILES = ("trainable.safetensors", "optimizer.pt", "state.json")




def params_fingerprint(named: list[tuple[str, nn.Parameter]]) -> str:
    """Hash of the trainable parameters' names, shapes and dtypes, in order."""
    spec = [[n, list(p.shape), str(p.dtype)] for n, p in named]
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:16]


def checkpoint_steps(directory: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (``step-NNNNNN``; temporaries start with '.'), by step."""
    found = []
    for path in directory.glob("step-*"):
        match = re.fullmatch(r"step-(\d+)", path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def checkpoint_to_resume(checkpoint_dir: str | Path | None, resume: bool) -> Path | None:
    if checkpoint_dir is None:
        if resume:
            raise TrainError("resume=True needs checkpoint_dir")
        return None
    existing = checkpoint_steps(Path(checkpoint_dir)) if Path(checkpoint_dir).is_dir() else []
    if resume:
        if not existing:
            raise TrainError(f"resume=True but {checkpoint_dir} holds no step-* checkpoint")
        return existing[-1][1]
    if existing:
        raise TrainError(f"{checkpoint_dir} already holds checkpoints ({existing[-1][1].name}); "
                         "pass resume=True to continue that run, or use an empty folder")
    return None


def save_checkpoint(directory: str | Path, step: int, cfg: TrainConfig,
                     named: list[tuple[str, nn.Parameter]], fingerprint: str,
                     optimizer: torch.optim.Optimizer, scheduler: Any,
                     history: dict[str, Any]) -> Path:
    from safetensors.torch import save_file

    from modelfold.assets import atomic_output

    path = Path(directory) / f"step-{step:06d}"
    state = {"step": step, "config": cfg.to_dict(), "fingerprint": fingerprint,
             "trainable": {n: list(p.shape) for n, p in named}, "history": history}
    with atomic_output(path) as tmp:
        tmp.mkdir()
        save_file({n: p.detach().cpu().contiguous() for n, p in named},
                  str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                   tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
    return path


def load_checkpoint(path: Path, cfg: TrainConfig, named: list[tuple[str, nn.Parameter]],
                     fingerprint: str, optimizer: torch.optim.Optimizer,
                     scheduler: Any) -> dict[str, Any]:
    """Check ``path`` against the model and config, then restore params, optimizer, scheduler."""
    from safetensors.torch import load_file

    missing = [f for f in _CHECKPOINT_FILES if not (path / f).is_file()]
    if missing:
        raise TrainError(f"checkpoint {path} is incomplete (missing {', '.join(missing)}); "
                         "delete it to resume from an earlier one")
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        step, saved_config, saved = state["step"], state["config"], state["trainable"]
    except (ValueError, KeyError, TypeError) as exc:
        raise TrainError(f"checkpoint {path} has a corrupt state.json ({exc})") from None
    if state.get("fingerprint") != fingerprint:
        current = {n: list(p.shape) for n, p in named}
        only_saved = sorted(set(saved) - set(current))
        only_model = sorted(set(current) - set(saved))
        reshaped = sorted(n for n in set(saved) & set(current) if saved[n] != current[n])
        detail = "; ".join(f"{label}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
                           for label, names in (("only in the checkpoint", only_saved),
                                                ("only in the model", only_model),
                                                ("shapes differ", reshaped)) if names)
        raise TrainError(f"checkpoint {path} was written for other trainable parameters "
                         f"({detail or 'dtype or order differs'}); resume needs the same model "
                         "and the same trainable parameters")
    changed = [f"{k}: checkpoint {saved_config.get(k)!r}, now {v!r}"
               for k, v in cfg.to_dict().items()
               if k not in _RESUMABLE_OPTIONS and saved_config.get(k) != v]
    if changed:
        raise TrainError(f"checkpoint {path} was written with other training options "
                         f"({'; '.join(changed)}); only {', '.join(sorted(_RESUMABLE_OPTIONS))} "
                         "may change on resume")
    try:
        tensors = load_file(str(path / "trainable.safetensors"))
        with torch.no_grad():
            for name, p in named:
                p.copy_(tensors[name])
        saved_optim = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        optimizer.load_state_dict(saved_optim["optimizer"])
        scheduler.load_state_dict(saved_optim["scheduler"])
    except Exception as exc:  # safetensors / pickle / shape errors: all mean a damaged checkpoint
        raise TrainError(f"checkpoint {path} is corrupt ({type(exc).__name__}: {exc})") from None
    return {"step": step, "history": state["history"]}
