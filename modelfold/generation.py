"""Greedy decoding over a KV-cache step function: one loop for every runtime.

A runtime (ONNX Runtime, the Triton backend) provides ``step(input_ids, attention_mask,
position_ids, past) -> (logits of the last position [B, V], present)`` on numpy integer inputs
and ``empty_past(batch)``; ``greedy_generate`` feeds the prompt once (prefill), then one token
per step with the previous step's present keys/values as the past.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from modelfold.errors import OptionError

Step = Callable[[np.ndarray, np.ndarray, np.ndarray, Any], tuple[np.ndarray, Any]]


def eos_set(eos_token_id: int | Sequence[int] | None) -> set[int]:
    """The stop tokens as a set (``generation_config.eos_token_id`` may be an int or a list)."""
    if eos_token_id is None:
        return set()
    if isinstance(eos_token_id, (int, np.integer)):
        return {int(eos_token_id)}
    return {int(t) for t in eos_token_id}


def greedy_generate(step: Step, empty_past: Callable[[int], Any], input_ids: Sequence[int],
                    max_new_tokens: int, eos_token_id: int | Sequence[int] | None = None
                    ) -> dict[str, Any]:
    """Greedy decoding of one prompt.

    Returns:
        ``tokens`` (prompt + new), ``new_tokens``, ``prefill_seconds`` (prompt -> first token),
        ``decode_seconds`` (the remaining steps), ``decode_tokens_per_s``.
    """
    prompt = np.asarray(input_ids, dtype=np.int64).reshape(-1)
    if prompt.size == 0:
        raise OptionError("generate needs a non-empty prompt")
    if max_new_tokens < 1:
        raise OptionError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    stop = eos_set(eos_token_id)

    start = time.perf_counter()
    seq = prompt.size
    last, past = step(prompt[None, :],  # [1, S]
                      np.ones((1, seq), dtype=np.int64),
                      np.arange(seq, dtype=np.int64)[None, :],
                      empty_past(1))
    new_tokens = [int(np.argmax(last[0]))]  # last: [1, V]
    prefill_seconds = time.perf_counter() - start

    start = time.perf_counter()
    mask = np.ones((1, seq + max_new_tokens), dtype=np.int64)  # sliced per step: [1, T]
    while len(new_tokens) < max_new_tokens and new_tokens[-1] not in stop:
        total = seq + len(new_tokens)
        last, past = step(np.array([[new_tokens[-1]]], dtype=np.int64),  # [1, 1]
                          mask[:, :total],
                          np.array([[total - 1]], dtype=np.int64),
                          past)
        new_tokens.append(int(np.argmax(last[0])))
    decode_seconds = time.perf_counter() - start
    decode_steps = len(new_tokens) - 1
    return {
        "tokens": prompt.tolist() + new_tokens,
        "new_tokens": new_tokens,
        "prefill_seconds": prefill_seconds,
        "decode_seconds": decode_seconds,
        "decode_tokens_per_s": decode_steps / decode_seconds if decode_steps else float("nan"),
    }


__all__ = ["eos_set", "greedy_generate"]
