"""Text generation over a KV-cache step function: one loop for every runtime.

A runtime (ONNX Runtime, the Triton backend) provides a ``Decoder``:

- ``padding``: ``"left"`` (a batch of prompts is left-padded; the mask keeps growing at the
  right) or ``"right"`` (GroupQueryAttention artifacts: each row's tokens stay at the start of
  its cache, the mask of row ``b`` is ``T_b`` ones then zeros);
- ``new_cache(batch, capacity)``: the empty cache for a batch that will hold at most ``capacity``
  tokens per row;
- ``step(input_ids [B, S], attention_mask [B, T], position_ids [B, S], cache, logits_to_keep)``
  -> ``(logits [B, S', V], cache)`` on numpy integer inputs: the logits of the last S' positions,
  S' = S or, where the runtime can, ``logits_to_keep`` (> 0) of them (a view that the next step
  may overwrite).

``generate`` runs the prompts once (prefill), then one token per row and step, choosing each
token greedily or by sampling (``Sampling``: temperature, top-k, top-p, seeded).

Shape legend: B = batch (prompts), S = new tokens of a step, T = mask length, V = vocabulary.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from modelfold.errors import OptionError
from modelfold.options import Options, option


class Decoder(Protocol):
    padding: str

    def new_cache(self, batch: int, capacity: int) -> Any: ...

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
             cache: Any, logits_to_keep: int = 0) -> tuple[np.ndarray, Any]: ...


@dataclass(frozen=True)
class Sampling(Options):
    """How the next token is chosen: greedy (``temperature=0``, the default) or sampled."""

    label = "sampling"

    temperature: float = option(0.0, "0: greedy (argmax); > 0: sample from softmax(logits / T)")
    top_k: int = option(0, "sample among the k most likely tokens only (0: all)")
    top_p: float = option(1.0, "sample among the smallest set of tokens whose probability "
                               "reaches p (nucleus sampling; 1: all)")
    seed: int | None = option(None, "seed of the sampler (None: a fresh random seed)")

    def validate(self) -> None:
        if not self.temperature >= 0:
            raise OptionError(f"sampling option 'temperature' must be >= 0; got {self.temperature}")
        if self.top_k < 0:
            raise OptionError(f"sampling option 'top_k' must be >= 0; got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise OptionError(f"sampling option 'top_p' must be in (0, 1]; got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class TokenChooser:
    """Chooses one token per row of a ``[B, V]`` logits array under a ``Sampling``."""

    def __init__(self, sampling: Sampling):
        self.sampling = sampling
        self.rng = np.random.default_rng(sampling.seed)

    def __call__(self, logits: np.ndarray) -> np.ndarray:  # [B, V] -> [B]
        s = self.sampling
        if s.greedy:
            return logits.argmax(-1)
        scores = logits.astype(np.float64) / s.temperature  # [B, V]
        if s.top_k and s.top_k < scores.shape[-1]:
            kth = np.partition(scores, -s.top_k, axis=-1)[:, -s.top_k][:, None]
            scores = np.where(scores < kth, -np.inf, scores)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        if s.top_p < 1:
            order = np.argsort(-probs, axis=-1)
            sorted_probs = np.take_along_axis(probs, order, -1)
            before = np.cumsum(sorted_probs, -1) - sorted_probs  # mass of the tokens ahead
            keep = np.zeros_like(probs, dtype=bool)
            np.put_along_axis(keep, order, before < s.top_p, -1)  # the first always stays
            probs = np.where(keep, probs, 0.0)
            probs /= probs.sum(-1, keepdims=True)
        return np.array([self.rng.choice(len(p), p=p) for p in probs])


def eos_set(eos_token_id: int | Sequence[int] | None) -> set[int]:
    """The stop tokens as a set (``generation_config.eos_token_id`` may be an int or a list)."""
    if eos_token_id is None:
        return set()
    if isinstance(eos_token_id, (int, np.integer)):
        return {int(eos_token_id)}
    return {int(t) for t in eos_token_id}


def _prompts(input_ids: Any) -> tuple[list[np.ndarray], bool]:
    """One prompt (a flat sequence of ids, a 1-D array or tensor) or several, as a list of 1-D
    int64 arrays, and whether it was one."""
    if hasattr(input_ids, "ndim"):  # numpy array or torch tensor
        single = input_ids.ndim == 1
        items = [input_ids] if single else list(input_ids)
    else:
        single = len(input_ids) > 0 and np.ndim(input_ids[0]) == 0
        items = [input_ids] if single else list(input_ids)
    prompts = [np.asarray(p, dtype=np.int64).reshape(-1) for p in items]
    if not prompts or any(p.size == 0 for p in prompts):
        raise OptionError("generate needs non-empty prompts")
    return prompts, single


def generate(decoder: Decoder, input_ids: Sequence[int] | Sequence[Sequence[int]] | np.ndarray,
             max_new_tokens: int, eos_token_id: int | Sequence[int] | None = None,
             sampling: Sampling | None = None, pad_token_id: int = 0) -> dict[str, Any]:
    """Generate up to ``max_new_tokens`` tokens for one prompt or a batch of prompts.

    A row stops at a stop token (kept) or after ``max_new_tokens``; the batch stops when every
    row has.

    Returns:
        For one prompt (a flat list of ids): ``tokens`` (prompt + new), ``new_tokens``. For a
        batch: ``sequences`` / ``new_tokens``, lists with one entry per prompt. Both:
        ``prefill_seconds`` (prompts -> first tokens), ``decode_seconds`` (the later steps),
        ``decode_tokens_per_s`` (steps per second, i.e. tokens per second of each row).
    """
    prompts, single = _prompts(input_ids)
    if max_new_tokens < 1:
        raise OptionError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    choose = TokenChooser(sampling or Sampling())
    stop = eos_set(eos_token_id)
    batch, lengths = len(prompts), np.array([p.size for p in prompts])
    width = int(lengths.max())
    ids = np.full((batch, width), pad_token_id, dtype=np.int64)  # [B, S]
    mask = np.zeros((batch, width + max_new_tokens), dtype=np.int64)  # sliced per step: [B, T]
    right = decoder.padding == "right"
    for b, p in enumerate(prompts):
        if right:
            ids[b, : p.size], mask[b, : p.size] = p, 1
        else:
            ids[b, width - p.size:], mask[b, width - p.size: width] = p, 1
    positions = np.maximum(np.cumsum(mask[:, :width], -1) - 1, 0)  # [B, S]
    if not right:
        positions = np.where(mask[:, :width] == 1, positions, 1)

    start = time.perf_counter()
    cache = decoder.new_cache(batch, width + max_new_tokens)
    last = lengths - 1 if right else np.full(batch, width - 1)  # each row's last prompt token
    logits, cache = decoder.step(ids, mask[:, :width], positions, cache,
                                 width - int(last.min()))  # [B, S', V]: the last S' positions
    token = choose(logits[np.arange(batch), last - (width - logits.shape[1])])  # [B]
    prefill_seconds = time.perf_counter() - start

    new = [[int(t)] for t in token]
    done = np.array([int(t) in stop for t in token])
    start, steps = time.perf_counter(), 0
    while steps + 1 < max_new_tokens and not done.all():
        steps += 1
        if right:  # row b holds lengths[b] + steps tokens after this step
            total = lengths + steps
            for b in range(batch):
                mask[b, total[b] - 1] = 1
            width_now = int(total.max())
            position = (total - 1)[:, None]
        else:
            width_now = width + steps
            mask[:, width_now - 1] = 1
            position = mask[:, :width_now].sum(-1, keepdims=True) - 1
        step_ids = np.where(done, pad_token_id, token)[:, None]  # [B, 1]
        logits, cache = decoder.step(step_ids, mask[:, :width_now], position, cache)
        token = choose(logits[:, -1])
        for b in range(batch):
            if not done[b]:
                new[b].append(int(token[b]))
                done[b] = int(token[b]) in stop
    decode_seconds = time.perf_counter() - start
    timing = {"prefill_seconds": prefill_seconds, "decode_seconds": decode_seconds,
              "decode_tokens_per_s": steps / decode_seconds if steps else float("nan")}
    if single:
        return {"tokens": prompts[0].tolist() + new[0], "new_tokens": new[0], **timing}
    return {"sequences": [p.tolist() + n for p, n in zip(prompts, new)], "new_tokens": new,
            **timing}


__all__ = ["Decoder", "Sampling", "TokenChooser", "eos_set", "generate"]
