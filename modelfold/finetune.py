"""Recovery fine-tuning: train the parameters a pass left trainable, optionally distilling from the
untransformed model.

    program = modelfold.load("smollm2-135m")
    for name, p in program.module.named_parameters():
        p.requires_grad_("layernorm" in name)
    report = train(program, steps=50, lr=1e-2, checkpoint_dir="out/train")

The engine trains exactly the parameters with ``requires_grad=True`` and never unfreezes one.
Every batch is a pure function of ``(seed, step, micro-batch)`` and dropout is seeded the same
way (inside ``torch.random.fork_rng``, so the caller's RNG is untouched); a run resumed from a
checkpoint therefore ends with the same parameters as an uninterrupted one.

Loss: ``ce_weight * CE + kl_weight * T^2 * KL(teacher || student at temperature T)
+ hidden_weight * hidden-state MSE``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from modelfold.errors import OptionError
from modelfold.options import Options, option
from modelfold.train_checkpoints import (
    TrainError,
    checkpoint_to_resume,
    load_checkpoint,
    params_fingerprint,
    save_checkpoint,
)


@dataclass(frozen=True)
class TrainConfig(Options):
    """Options of a training run (``TrainConfig.from_options`` accepts CLI-style strings)."""

    label = "training"

    steps: int = option(100, "optimizer steps")
    lr: float = option(1e-3, "peak learning rate (AdamW)")
    weight_decay: float = option(0.0, "AdamW weight decay, applied to every trainable parameter")
    warmup_steps: int = option(10, "linear warmup steps, then cosine decay to 10% of lr")
    batch_size: int = option(4, "sequences per micro-batch")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    seq_len: int = option(256, "tokens per sequence (BOS included)")
    max_grad_norm: float = option(1.0, "gradient clipping norm")
    gradient_checkpointing: bool = option(False, "recompute activations in backward (HF models)")
    seed: int = option(0, "seed of the batches and of dropout")
    corpus: str = option("wikipedia", "training text: the corpus's calibration split; 'random' = "
                                      "uniform random token ids (models without a tokenizer)")
    ce_weight: float = option(1.0, "weight of next-token cross entropy")
    kl_weight: float = option(0.0, "weight of T^2 * KL(teacher || student); needs a teacher")
    hidden_weight: float = option(0.0, "weight of the hidden-state MSE to the teacher")
    temperature: float = option(1.0, "distillation temperature T")
    balance_weight: float = option(0.0, "weight of the load-balancing loss of mixture-of-experts "
                                        "layers (moefy): E * sum_e load_e * mean_prob_e")
    eval_every: int = option(0, "evaluate perplexity every N steps (0: before and after only)")
    eval_chars: int = option(20_000, "characters of the evaluation split scored by each eval")
    checkpoint_every: int = option(0, "write a checkpoint every N steps (0: only at the end)")
    log_every: int = option(10, "log a line every N steps (0: never)")

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), type(f.default)
            ok = isinstance(value, (int, float)) if kind is float else isinstance(value, kind)
            if not ok or (kind is not bool and isinstance(value, bool)):
                raise OptionError(f"train option '{f.name}' must be {kind.__name__}; got {value!r}")
        minimum = {"steps": 1, "batch_size": 1, "grad_accum": 1, "seq_len": 2, "eval_chars": 1,
                   "warmup_steps": 0, "eval_every": 0, "checkpoint_every": 0, "log_every": 0}
        for name, low in minimum.items():
            if getattr(self, name) < low:
                raise OptionError(f"train option '{name}' must be >= {low}; got {getattr(self, name)}")
        for name in ("lr", "temperature", "max_grad_norm"):
            value = getattr(self, name)
            if not value > 0 or not math.isfinite(value):
                raise OptionError(f"train option '{name}' must be > 0; got {value}")
        for name in ("weight_decay", "ce_weight", "kl_weight", "hidden_weight", "balance_weight"):
            value = getattr(self, name)
            if not value >= 0 or not math.isfinite(value):
                raise OptionError(f"train option '{name}' must be >= 0; got {value}")
        if self.ce_weight == self.kl_weight == self.hidden_weight == 0:
            raise OptionError("train options ce_weight, kl_weight and hidden_weight are all 0: "
                             "at least one loss must be on")
        from modelfold.corpus import check_corpus_option

        check_corpus_option(self.corpus, "train option 'corpus'")


# Options that may change between a checkpoint and the run resuming it: they do not change the
# batches, the losses or the update rule of the steps already taken.


def print_to_stderr(message: str) -> None:
    """Default ``log`` of ``train``: one line on stderr, kept clear of the progress bar."""
    from tqdm.auto import tqdm

    tqdm.write(message, file=sys.stderr)


def train(model: Any, *, config: TrainConfig | None = None, tokenizer: Any = None,
          teacher: nn.Module | None = None, checkpoint_dir: str | Path | None = None,
          resume: bool = False, progress: bool = True,
          log: Callable[[str], None] | None = print_to_stderr,
          step_callback: Callable[[int, float], None] | None = None,
          **options: Any) -> dict[str, Any]:
    """Fine-tune the trainable parameters of ``model`` in place.

    Args:
        model: a ``TransformResult``, a ``Program`` or a causal-LM ``nn.Module``.
        config: the options; or give them as keyword ``options`` (not both).
        tokenizer: the text tokenizer (default: the Program's); needed unless ``corpus="random"``.
        teacher: the untransformed model for ``kl_weight`` / ``hidden_weight`` (run in eval mode
            without gradients; its parameters are not touched).
        checkpoint_dir: where ``step-NNNNNN/`` checkpoints go (every ``checkpoint_every`` steps
            and at the end), each written atomically.
        resume: continue from the latest checkpoint in ``checkpoint_dir``.
        progress: show a tqdm bar.
        log: receives progress lines (``None`` for silence).
        step_callback: called as ``step_callback(step, lr)`` after every optimizer step (``step``
            counts from 1; ``lr`` is the rate that step used); sparsity-aware training
            (``modelfold.sparse_training``) updates its masks and decay here.

    Returns:
        ``steps``, ``tokens``, ``seconds``, ``seconds_per_step``, ``trainable_parameters``,
        ``total_parameters``, ``loss_history`` (mean total loss per step), ``loss_terms`` (per
        active term), ``eval`` (``[{"step", "perplexity"}]``), ``perplexity_before`` /
        ``perplexity_after`` (``None`` when eval is skipped, with ``eval_skipped`` saying why),
        ``config``, ``teacher``, ``hidden_layers_matched``, ``notes``, ``resumed_from`` and
        ``checkpoint`` (the last checkpoint folder or ``None``).

    Raises:
        TrainError: nothing is trainable, a distillation loss without a usable teacher, a
            missing, corrupt or incompatible checkpoint, or a loss that is not finite.
        ValueError / TypeError: a bad option name or value.
    """
    started = time.perf_counter()
    if config is not None and options:
        raise TypeError("train: pass either config or keyword options, not both")
    if config is None:
        config = TrainConfig.from_options(options)
    elif not isinstance(config, TrainConfig):
        raise TypeError(f"train: config must be a TrainConfig, got {type(config).__name__}")
    cfg = config
    say = log or (lambda message: None)
    module, tokenizer, program = _unwrap(model, tokenizer)

    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if not named:
        raise TrainError("the model has no trainable parameters (every requires_grad is False); "
                         "run a pass that marks parameters trainable first, e.g. lora")
    vocab = _vocab_size(module)
    _check_teacher(cfg, module, teacher, named, vocab)
    max_positions = _max_positions(module)
    if max_positions is not None and cfg.seq_len > max_positions:
        raise TrainError(f"seq_len={cfg.seq_len} is longer than the model's "
                         f"{max_positions} positions")
    if cfg.gradient_checkpointing and not getattr(module, "supports_gradient_checkpointing", False):
        raise TrainError(f"gradient_checkpointing=true needs a Hugging Face model that supports "
                         f"it; {type(module).__name__} does not")
    if cfg.corpus != "random" and tokenizer is None:
        raise TrainError(f"corpus={cfg.corpus!r} needs a tokenizer: pass tokenizer=, or use "
                         "corpus='random' for a model without one")
    if cfg.corpus == "random" and vocab is None:
        raise TrainError("corpus='random' needs the vocabulary size (model.config.vocab_size)")

    fingerprint = params_fingerprint(named)
    checkpoint = checkpoint_to_resume(checkpoint_dir, resume)

    ids, bos = None, None
    if cfg.corpus != "random":
        from modelfold.corpus import corpus_token_ids

        ids = corpus_token_ids(tokenizer, corpus=cfg.corpus, split="calibration")  # [N]
        bos = getattr(tokenizer, "bos_token_id", None)
        if ids.numel() < cfg.seq_len:
            raise TrainError(f"seq_len={cfg.seq_len} is longer than the {cfg.corpus!r} "
                             f"calibration split ({ids.numel()} tokens)")
    eval_text, eval_skipped = None, None
    if cfg.corpus == "random":
        eval_skipped = "corpus='random' has no evaluation text"
    else:
        from modelfold.corpus import corpus_text

        eval_text = corpus_text(cfg.corpus, "evaluation")
    window = min(512, max_positions - 1) if max_positions else 512

    params = [p for _, p in named]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(cfg, step))
    history: dict[str, Any] = {"loss": [], "terms": {}, "eval": [], "train_seconds": 0.0}
    start = 0
    if checkpoint is not None:
        if int(checkpoint.name.removeprefix("step-")) > cfg.steps:
            raise TrainError(f"the checkpoint {checkpoint.name} is beyond steps={cfg.steps}")
        state = load_checkpoint(checkpoint, cfg, named, fingerprint, optimizer, scheduler)
        start, history = state["step"], state["history"]
        say(f"resumed from {checkpoint} (step {start})")

    device = params[0].device
    fork_devices = [device] if device.type == "cuda" else []
    modes = [(m, m.training) for m in module.modules()]
    teacher_modes = [(m, m.training) for m in teacher.modules()] if teacher is not None else []
    checkpointing_before = cfg.gradient_checkpointing and _activation_checkpointing(module)
    input_grad_hooks_before = bool(getattr(module, "_require_grads_hooks", None))
    info: dict[str, Any] = {"hidden_layers_matched": None, "notes": []}
    if teacher is not None and cfg.kl_weight == cfg.hidden_weight == 0:
        info["notes"].append("a teacher was given but kl_weight and hidden_weight are 0: unused")
    last_checkpoint, bar = checkpoint, None
    try:
        if cfg.gradient_checkpointing:
            _activation_checkpointing(module, enable=True)
        if teacher is not None:
            teacher.eval()
        if eval_text is not None and start == 0:
            _record_eval(history, 0, module, tokenizer, eval_text, cfg, window, say)
        module.train()
        bar = _progress_bar(cfg.steps, start, progress)
        tick, tick_step = time.perf_counter(), start
        for step in range(start, cfg.steps):
            step_start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss, terms = 0.0, {}
            for micro in range(cfg.grad_accum):
                batch = _draw_batch(cfg, ids, bos, vocab, step, micro).to(device)  # [B, S]
                with torch.random.fork_rng(devices=fork_devices):
                    torch.manual_seed(_derived_seed(cfg.seed, step, micro, "dropout"))
                    micro_loss, micro_terms = _loss(module, teacher, batch, cfg, info)
                    (micro_loss / cfg.grad_accum).backward()
                loss += micro_loss.item() / cfg.grad_accum
                for key, value in micro_terms.items():
                    terms[key] = terms.get(key, 0.0) + value / cfg.grad_accum
            if not math.isfinite(loss):
                raise TrainError(f"the loss is {loss} at step {step + 1}; lower lr "
                                 f"(now {cfg.lr}) or max_grad_norm")
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            done = step + 1
            if step_callback is not None:
                step_callback(done, lr)
            history["loss"].append(loss)
            for key, value in terms.items():
                history["terms"].setdefault(key, []).append(value)
            history["train_seconds"] += time.perf_counter() - step_start
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if cfg.log_every and done % cfg.log_every == 0:
                per_step = (time.perf_counter() - tick) / (done - tick_step)
                say(f"step {done}/{cfg.steps} loss {loss:.4g} lr {_short_float(lr)} "
                    f"{per_step:.3g} s/step")
                tick, tick_step = time.perf_counter(), done
            if done == cfg.steps:  # the final eval and checkpoint follow the loop
                break
            if eval_text is not None and cfg.eval_every and done % cfg.eval_every == 0:
                _record_eval(history, done, module, tokenizer, eval_text, cfg, window, say)
                module.train()
            if checkpoint_dir is not None and cfg.checkpoint_every and done % cfg.checkpoint_every == 0:
                last_checkpoint = save_checkpoint(checkpoint_dir, done, cfg, named, fingerprint,
                                                   optimizer, scheduler, history)
        final_step = max(start, cfg.steps)
        if eval_text is not None and (not history["eval"] or history["eval"][-1]["step"] != final_step):
            _record_eval(history, final_step, module, tokenizer, eval_text, cfg, window, say)
        if checkpoint_dir is not None and start < cfg.steps:
            last_checkpoint = save_checkpoint(checkpoint_dir, cfg.steps, cfg, named, fingerprint,
                                               optimizer, scheduler, history)
    finally:
        if bar is not None:
            bar.close()
        optimizer.zero_grad(set_to_none=True)
        if cfg.gradient_checkpointing and not checkpointing_before:
            _activation_checkpointing(module, enable=False)
            # Enabling also hooks the input embeddings (their output requires grad) and HF's
            # disable keeps that hook on non-PEFT models: remove it if we added it.
            if not input_grad_hooks_before and hasattr(module, "disable_input_require_grads"):
                module.disable_input_require_grads()
        for m, training in [*modes, *teacher_modes]:
            m.training = training
        if program is not None:  # the weights changed: the captured graph and analyses are stale
            program.invalidate(keep_analyses=True)

    trained = cfg.steps - start
    tokens_per_step = cfg.grad_accum * cfg.batch_size * cfg.seq_len
    evals = history["eval"]
    return {
        "steps": cfg.steps,
        "tokens": cfg.steps * tokens_per_step,
        "seconds": time.perf_counter() - started,
        "seconds_per_step": history["train_seconds"] / cfg.steps if cfg.steps else 0.0,
        "trainable_parameters": sum(p.numel() for p in params),
        "total_parameters": sum(p.numel() for p in module.parameters()),
        "loss_history": list(history["loss"]),
        "loss_terms": {k: list(v) for k, v in history["terms"].items()},
        "eval": list(evals),
        "perplexity_before": evals[0]["perplexity"] if evals and evals[0]["step"] == 0 else None,
        "perplexity_after": evals[-1]["perplexity"] if evals else None,
        "eval_skipped": eval_skipped,
        "config": cfg.to_dict(),
        "teacher": teacher is not None,
        "hidden_layers_matched": info["hidden_layers_matched"],
        "notes": info["notes"],
        "resumed_from": start if checkpoint is not None else None,
        "steps_this_run": trained,
        "checkpoint": str(last_checkpoint) if last_checkpoint is not None else None,
    }


def plot_training(result: dict[str, Any], path: str | Path) -> None:
    """Save the loss curve and the eval perplexity points of a ``train`` result as a PNG."""
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend alone

    fig = Figure(figsize=(7, 4), dpi=120)
    ax = fig.add_subplot()
    losses = result.get("loss_history", [])
    ax.plot(range(1, len(losses) + 1), losses, color="tab:blue", label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss", color="tab:blue")
    points = [(e["step"], e["perplexity"]) for e in result.get("eval", [])
              if e.get("perplexity") is not None]
    if points:
        ax2 = ax.twinx()
        ax2.plot(*zip(*points), "o--", color="tab:red", label="eval perplexity")
        ax2.set_ylabel("eval perplexity", color="tab:red")
    ax.set_title(f"training: {len(losses)} steps")
    fig.tight_layout()
    fig.savefig(Path(path), format="png")


# --------------------------------------------------------------------------------------------
# Model, teacher and data
# --------------------------------------------------------------------------------------------


def _unwrap(model: Any, tokenizer: Any) -> tuple[nn.Module, Any, Any]:
    """``(module, tokenizer, program or None)`` of a TransformResult, Program or module."""
    from modelfold import TransformResult
    from modelfold.ir.program import Program

    if isinstance(model, TransformResult):
        model = model.program
    if isinstance(model, Program):
        if model.arch.kind == "encoder":
            raise TrainError(f"train fine-tunes causal language models; this is an encoder "
                             f"({model.arch.family})")
        return model.module, tokenizer if tokenizer is not None else model.tokenizer, model
    if isinstance(model, nn.Module):
        return model, tokenizer, None
    raise TypeError(f"train: model must be a TransformResult, Program or nn.Module; "
                    f"got {type(model).__name__}")


def _vocab_size(module: nn.Module) -> int | None:
    size = getattr(getattr(module, "config", None), "vocab_size", None)
    if size is None and hasattr(module, "get_output_embeddings"):
        head = module.get_output_embeddings()
        size = getattr(head, "out_features", None)
    return size


def _max_positions(module: nn.Module) -> int | None:
    config = getattr(module, "config", None)
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def _check_teacher(cfg: TrainConfig, module: nn.Module, teacher: nn.Module | None,
                   named: list[tuple[str, nn.Parameter]], vocab: int | None) -> None:
    distilling = [n for n in ("kl_weight", "hidden_weight") if getattr(cfg, n) > 0]
    if distilling and teacher is None:
        raise TrainError(f"{' and '.join(distilling)} > 0 needs a teacher: pass teacher= the "
                         "untransformed model (e.g. a copy.deepcopy taken before the pass)")
    if teacher is None:
        return
    if teacher is module:
        raise TrainError("the teacher is the model being trained; pass an untransformed copy")
    shared = {id(p) for p in teacher.parameters()} & {id(p) for _, p in named}
    if shared:
        raise TrainError(f"the teacher shares {len(shared)} trainable parameter(s) with the model; "
                         "pass a copy taken before the pass (copy.deepcopy)")
    teacher_vocab = _vocab_size(teacher)
    if cfg.kl_weight > 0 and None not in (vocab, teacher_vocab) and vocab != teacher_vocab:
        raise TrainError(f"the teacher's vocabulary ({teacher_vocab}) differs from the model's "
                         f"({vocab}); KL needs the same vocabulary")


def _activation_checkpointing(module: nn.Module, enable: bool | None = None) -> bool:
    """Query (``enable=None``) or switch HF activation checkpointing, non-reentrant.

    transformers 5 renamed ``gradient_checkpointing_*`` to ``activation_checkpointing_*`` (the
    old names warn); use whichever the model has.
    """
    if enable is None:
        flag = "is_activation_checkpointing"
        return bool(getattr(module, flag if hasattr(type(module), flag) else "is_gradient_checkpointing"))
    if not enable:
        off = getattr(module, "activation_checkpointing_disable", None)
        (off or module.gradient_checkpointing_disable)()
    elif hasattr(module, "activation_checkpointing_enable"):
        module.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return enable


def _derived_seed(*parts: Any) -> int:
    """A 63-bit seed from ``parts``; independent streams per (seed, step, micro-batch)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _draw_batch(cfg: TrainConfig, ids: torch.Tensor | None, bos: int | None, vocab: int | None,
                step: int, micro: int) -> torch.Tensor:
    """The micro-batch ``[B, S]`` of (step, micro): a pure function of the seed, so resumes agree.

    Rows are ``[bos] + seq_len - 1`` consecutive corpus tokens (as ``calibration_batches``), or
    uniform random ids when ``ids`` is ``None``.
    """
    generator = torch.Generator().manual_seed(_derived_seed(cfg.seed, step, micro, "batch"))
    if ids is None:
        return torch.randint(0, vocab, (cfg.batch_size, cfg.seq_len), generator=generator)
    body = cfg.seq_len - 1 if bos is not None else cfg.seq_len
    starts = torch.randint(0, ids.numel() - body + 1, (cfg.batch_size,), generator=generator)  # [B]
    windows = ids[starts[:, None] + torch.arange(body)]  # [B, body]
    if bos is not None:
        windows = torch.cat([torch.full((cfg.batch_size, 1), bos, dtype=torch.long), windows], 1)
    return windows  # [B, S]


# --------------------------------------------------------------------------------------------
# Loss, schedule, evaluation
# --------------------------------------------------------------------------------------------


def _loss(module: nn.Module, teacher: nn.Module | None, batch: torch.Tensor, cfg: TrainConfig,
          info: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted total loss of one micro-batch and its terms as floats.

    Shapes: B = batch, S = sequence, V = vocabulary, D = hidden.
    """
    want_hidden = cfg.hidden_weight > 0
    out = module(input_ids=batch, use_cache=False, output_hidden_states=want_hidden or None)
    logits = getattr(out, "logits", None)  # [B, S, V]
    if logits is None:
        raise TrainError(f"{type(module).__name__} returns no logits; train needs a causal LM")
    flat = logits.flatten(0, 1).float()  # [B*S, V]; a view for fp32 logits, no copy
    total = flat.new_zeros(())
    terms: dict[str, float] = {}
    if cfg.ce_weight > 0:
        # The label of position i is token i+1; the last position has none (-100 is ignored).
        # Padding the labels, not slicing the logits, avoids a copy of [B, S, V].
        labels = F.pad(batch[:, 1:], (0, 1), value=-100)  # [B, S]
        ce = F.cross_entropy(flat, labels.flatten(), ignore_index=-100)
        total = total + cfg.ce_weight * ce
        terms["ce"] = ce.item()
    if cfg.balance_weight > 0:
        from modelfold.ir.moe import balance_loss

        balance = balance_loss(module)
        if balance is None:
            raise TrainError("balance_weight > 0 but the model has no mixture-of-experts layers "
                             "(moefy) in training mode")
        total = total + cfg.balance_weight * balance
        terms["balance"] = balance.item()
    if teacher is None or not (cfg.kl_weight > 0 or want_hidden):
        return total, terms
    teacher_device = next(teacher.parameters()).device
    with torch.no_grad():
        t_out = teacher(input_ids=batch.to(teacher_device), use_cache=False,
                        output_hidden_states=want_hidden or None)
    if cfg.kl_weight > 0:
        t_flat = t_out.logits.flatten(0, 1).to(flat.device).float()  # [B*S, V]
        if t_flat.shape[-1] != flat.shape[-1]:
            raise TrainError(f"the teacher's logits have {t_flat.shape[-1]} classes, the model's "
                             f"{flat.shape[-1]}; KL needs the same vocabulary")
        t = cfg.temperature
        s_logp = F.log_softmax(flat / t if t != 1 else flat, dim=-1)
        t_logp = F.log_softmax(t_flat / t if t != 1 else t_flat, dim=-1)
        # batchmean over [B*S, V] = KL summed over the vocabulary, averaged over tokens.
        kl = F.kl_div(s_logp, t_logp, reduction="batchmean", log_target=True) * (t * t)
        total = total + cfg.kl_weight * kl
        terms["kl"] = kl.item()
    if want_hidden:
        student_h, teacher_h = out.hidden_states, t_out.hidden_states
        if len(student_h) == len(teacher_h) and len(student_h) > 1:
            pairs = list(zip(student_h[1:], teacher_h[1:]))  # layer outputs; [0] is the embedding
        else:
            pairs = [(student_h[-1], teacher_h[-1])]
            if info["hidden_layers_matched"] is None:
                info["notes"].append(f"the model has {len(student_h)} hidden states and the "
                                     f"teacher {len(teacher_h)}: hidden loss on the last one only")
        info["hidden_layers_matched"] = len(pairs)
        losses = []
        for s, th in pairs:  # [B, S, D] each
            if s.shape != th.shape:
                raise TrainError(f"hidden states differ in shape (model {tuple(s.shape)}, teacher "
                                 f"{tuple(th.shape)}); set hidden_weight=0")
            losses.append(F.mse_loss(s.float(), th.to(s.device).float()))
        hidden = torch.stack(losses).mean()
        total = total + cfg.hidden_weight * hidden
        terms["hidden"] = hidden.item()
    return total, terms


def _lr_factor(cfg: TrainConfig, step: int) -> float:
    """Linear warmup over ``warmup_steps`` (the first step at lr/warmup), then cosine to 10%."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _record_eval(history: dict[str, Any], step: int, module: nn.Module, tokenizer: Any, text: str,
                 cfg: TrainConfig, window: int, say: Callable[[str], None]) -> None:
    from modelfold.evaluate import evaluate

    module.eval()
    ppl = evaluate(module, tokenizer, text, chars=cfg.eval_chars, window=window,
                   progress=False)["perplexity"]
    history["eval"].append({"step": step, "perplexity": ppl})
    say(f"eval step {step}/{cfg.steps}: perplexity {ppl:.3f}")


def _progress_bar(total: int, initial: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", disable=not enabled,
                leave=False)


def _short_float(value: float) -> str:
    return f"{value:.1e}".replace("e-0", "e-").replace("e+0", "e+")
