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


def perplexity(logits_fn: LogitsFn, windows: list[torch.Tensor], *, batch_size: int = 4,
               progress: bool = True) -> dict[str, float]:
    """Mean token NLL over all windows and its exponential."""
    nll, tokens = 0.0, 0
    start = time.perf_counter()
    groups: dict[int, list[torch.Tensor]] = {}
    for w in windows:
        groups.setdefault(w.numel(), []).append(w)
    batches = [torch.stack(ws[i:i + batch_size]) for ws in groups.values()
               for i in range(0, len(ws), batch_size)]
    for batch in tqdm(batches, desc="perplexity", unit="batch", disable=not progress, leave=False):
        logits = logits_fn(batch)  # [B, S, V]
        if isinstance(logits, np.ndarray):
            logits = torch.from_numpy(logits)
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # [B, S-1, V]
        target = batch[:, 1:]  # [B, S-1]
        nll -= logp.gather(-1, target.unsqueeze(-1)).double().sum().item()
        tokens += target.numel()
    mean = nll / tokens
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": tokens,
            "windows": len(windows), "seconds": time.perf_counter() - start}


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
    else:
        fn, runtime = (lambda ids: target.logits(ids.numpy())), getattr(target, "runtime",
                                                                        "onnxruntime")
    result = perplexity(fn, windows, batch_size=batch_size, progress=progress)
    return {**result, "runtime": runtime, "chars": min(chars, len(text)), "window": window}
