"""Perplexity on real text, for a torch model or an ONNX Runtime artifact (same protocol).

Protocol: tokenize the first ``chars`` characters of the text, cut the tokens into
non-overlapping windows of ``window`` tokens, prepend BOS to each window, and score every text
token exactly once (BOS predicts the first token of the window).
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from modelfold.errors import OptionError, UsageError

LogitsFn = Callable[[torch.Tensor], Any]  # [B, S] int64 -> [B, S, V] (torch or numpy)


def eval_windows(tokenizer: Any, text: str, *, window: int = 512) -> list[torch.Tensor]:
    """Token windows, each ``[bos] + up to window tokens`` (1-D LongTensors)."""
    from modelfold.corpus import tokenize_text

    if window < 2:
        raise OptionError(f"window must be >= 2 tokens; got {window}")
    ids = tokenize_text(tokenizer, text)
    if ids.numel() < 2:
        raise UsageError("the text is too short to evaluate (fewer than 2 tokens)")
    bos = tokenizer.bos_token_id
    prefix = torch.tensor([bos] if bos is not None else [], dtype=torch.long)
    chunks = []
    for start in range(0, ids.numel(), window):
        chunk = ids[start:start + window]
        if bos is None and chunk.numel() < 2:
            continue
        chunks.append(torch.cat([prefix, chunk]))
    return chunks


# Logits are the largest tensors of an evaluation: [batch, 513, vocabulary] floats. A batch is
# cut down so that its logits stay under this many bytes (a 262k vocabulary: one window at a
# time), and the loss is computed a few positions at a time, never as a second [B, S, V] copy.
MAX_LOGITS_BYTES = 512 * 2**20
_NLL_CHUNK = 64  # positions per log-sum-exp


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Sum of ``-log softmax(logits)[target]`` over all positions, computed in chunks of
    positions so that no ``[B, S, V]`` temporary is made: logits ``[B, S, V]``, targets
    ``[B, S]``."""
    total = 0.0
    for start in range(0, logits.shape[1], _NLL_CHUNK):
        chunk = logits[:, start:start + _NLL_CHUNK].float()  # [B, c, V]
        target = targets[:, start:start + _NLL_CHUNK]
        picked = chunk.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # [B, c]
        total += float((torch.logsumexp(chunk, -1) - picked).double().sum())
    return total


def perplexity(logits_fn: LogitsFn, windows: list[torch.Tensor], *, batch_size: int = 4,
               progress: bool = True, vocab_size: int | None = None) -> dict[str, float]:
    """Mean token NLL over all windows and its exponential.

    With ``vocab_size`` given, batches are made small enough that their logits stay under
    ``MAX_LOGITS_BYTES`` (at least one window per batch).
    """
    nll, tokens = 0.0, 0
    start = time.perf_counter()
    groups: dict[int, list[torch.Tensor]] = {}
    for w in windows:
        groups.setdefault(w.numel(), []).append(w)
    if vocab_size:
        longest = max(groups)
        batch_size = max(1, min(batch_size, MAX_LOGITS_BYTES // (4 * longest * vocab_size)))
    batches = [torch.stack(ws[i:i + batch_size]) for ws in groups.values()
               for i in range(0, len(ws), batch_size)]
    for batch in tqdm(batches, desc="perplexity", unit="batch", disable=not progress, leave=False):
        logits = logits_fn(batch)  # [B, S, V]
        if isinstance(logits, np.ndarray):
            logits = torch.from_numpy(logits)
        nll += token_nll(logits[:, :-1], batch[:, 1:])
        tokens += batch[:, 1:].numel()
        del logits
    mean = nll / tokens
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": tokens,
            "windows": len(windows), "batch_size": batch_size,
            "seconds": time.perf_counter() - start}


def torch_logits_fn(module: torch.nn.Module) -> LogitsFn:
    @torch.no_grad()
    def fn(ids: torch.Tensor) -> torch.Tensor:
        return module(input_ids=ids, use_cache=False).logits
    return fn


def evaluate(target: Any, tokenizer: Any, text: str, *, chars: int = 200_000, window: int = 512,
             batch_size: int = 4, progress: bool = True) -> dict[str, Any]:
    """Perplexity of ``target`` on ``text[:chars]``: an ``nn.Module`` (a Hugging Face causal LM),
    or a runtime with ``logits(ids)`` (an ``OnnxCausalLM``, a Triton ``CompiledModel``)."""
    if chars < 1:
        raise OptionError(f"--chars must be >= 1; got {chars}")
    windows = eval_windows(tokenizer, text[:chars], window=window)
    if isinstance(target, torch.nn.Module):
        fn, runtime = torch_logits_fn(target), "torch"
        vocab = getattr(getattr(target, "config", None), "vocab_size", None)
    else:
        fn, runtime = (lambda ids: target.logits(ids.numpy())), getattr(target, "runtime",
                                                                        "onnxruntime")
        vocab = getattr(target, "vocab_size", None)
    result = perplexity(fn, windows, batch_size=batch_size, progress=progress,
                        vocab_size=vocab if isinstance(vocab, int) else None)
    return {**result, "runtime": runtime, "chars": min(chars, len(text)), "window": window}
