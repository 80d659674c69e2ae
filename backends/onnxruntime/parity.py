"""Numerical parity of an ONNX artifact against the torch model it came from.

Shape legend: B = batch, S = new tokens, P = past tokens, T = P + S, V = vocabulary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import DynamicCache

from modelfold.backends.onnxruntime.runtime import OnnxCausalLM, OnnxEncoder
from modelfold.errors import OptionError
from modelfold.ir import signature as sig

# Default probe: a batch of 2 prompts of 7 tokens, the second left-padded by 2; then decode steps.
_PROBE_BATCH, _PROBE_SEQ, _PROBE_PAD = 2, 7, 2


@torch.no_grad()
def check_parity(
    model: nn.Module,
    out_dir: Path,
    *,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    decode_steps: int = 2,
    seed: int = 0,
    threads: int | None = None,
    adapter: str | Path | None = None,
    provider: str = "cpu",
) -> dict[str, Any]:
    """Runs torch and the ONNX artifact in `out_dir` on the same probe and compares outputs.

    Decoders: a prefill with an empty past (batch with left padding), then `decode_steps` single
    token steps, each side feeding its own returned cache and the token torch chose. Padded
    positions are excluded (their logits are undefined). Encoders: one forward pass.

    Args:
        model: The torch model that was exported.
        out_dir: The artifact directory (`model.onnx`).
        input_ids: Probe tokens [B, S]; default: random tokens from a fixed seed.
        attention_mask: Probe mask [B, S] (0 = left padding); default: row 1 padded by 2.
        decode_steps: Decode steps after the prefill.
        seed: Seed of the random probe.
        threads: ONNX Runtime intra-op threads.
        adapter: LoRA adapter the artifact runs with (a name under its `adapters/` folder or a
            `.onnx_adapter` path; artifacts exported with lora="inputs"). The torch model should
            have the same adapters active.
        provider: ONNX Runtime execution provider ("cpu" or "cuda").

    Returns:
        Decoders: `prefill_max_abs_diff`, `decode_max_abs_diff`, `top1_agreement` (fraction of
        compared positions where the argmax matches), `probe_shape`. Encoders: `max_abs_diff`.
    """
    if decode_steps < 0:
        raise OptionError(f"decode_steps must be >= 0, got {decode_steps}")
    was_training = model.training
    model.eval()
    try:
        input_ids, attention_mask = _probe(model, input_ids, attention_mask, seed)
        if sig.is_decoder(model):
            return _decoder_parity(model, out_dir, input_ids, attention_mask, decode_steps, threads,
                                   adapter, provider)
        return _encoder_parity(model, out_dir, input_ids, attention_mask, threads, adapter,
                               provider)
    finally:
        model.train(was_training)


def _probe(
    model: nn.Module,
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    if input_ids is None:
        generator = torch.Generator().manual_seed(seed)
        shape = (_PROBE_BATCH, _PROBE_SEQ)
        input_ids = torch.randint(0, model.config.vocab_size, shape, generator=generator)
        if attention_mask is None:
            attention_mask = torch.ones(shape, dtype=torch.long)
            attention_mask[1, :_PROBE_PAD] = 0
    input_ids = torch.as_tensor(input_ids, dtype=torch.long)
    if input_ids.ndim != 2:
        raise OptionError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = torch.as_tensor(attention_mask, dtype=torch.long)
    if attention_mask.shape != input_ids.shape:
        raise OptionError(
            f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
        )
    return input_ids, attention_mask


def _decoder_parity(
    model: nn.Module,
    out_dir: Path,
    input_ids: torch.Tensor,  # [B, S]
    attention_mask: torch.Tensor,  # [B, S]
    decode_steps: int,
    threads: int | None,
    adapter: str | Path | None = None,
    provider: str = "cpu",
) -> dict[str, Any]:
    onnx_model = OnnxCausalLM(out_dir, threads=threads, adapter=adapter, provider=provider)
    positions = sig.decoder_positions(attention_mask, input_ids.shape[1])  # [B, S]
    cache = DynamicCache()
    torch_logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
    ).logits  # [B, S, V]
    # The artifact gets the same rows, padded on the side it takes (GroupQueryAttention: right)
    ort_ids, ort_mask = _padded(input_ids, attention_mask, onnx_model.padding)
    ort_logits, past = onnx_model.step(
        ort_ids.numpy(),
        ort_mask.numpy(),
        _positions(ort_mask, ort_ids.shape[1]).numpy(),
        onnx_model.empty_past(input_ids.shape[0]),
    )
    real = attention_mask.bool().numpy()  # [B, S]
    prefill_diff, agree, total = _compare(torch_logits.numpy()[real],
                                          ort_logits[ort_mask.bool().numpy()])

    decode_diff = 0.0
    lengths = attention_mask.sum(-1)  # [B] tokens of each row so far
    for _ in range(decode_steps):
        next_ids = torch_logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]
        attention_mask = torch.cat([attention_mask, torch.ones_like(next_ids)], dim=1)  # [B, T]
        positions = sig.decoder_positions(attention_mask, 1)  # [B, 1]
        torch_logits = model(
            input_ids=next_ids,
            attention_mask=attention_mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
        ).logits  # [B, 1, V]
        lengths = lengths + 1
        if onnx_model.padding == "right":
            ort_mask = (torch.arange(int(lengths.max()))[None] < lengths[:, None]).long()
        else:
            ort_mask = attention_mask
        ort_logits, past = onnx_model.step(next_ids.numpy(), ort_mask.numpy(),
                                           (lengths - 1)[:, None].numpy(), past)
        diff, step_agree, step_total = _compare(
            torch_logits.numpy().reshape(-1, ort_logits.shape[-1]),
            ort_logits.reshape(-1, ort_logits.shape[-1]),
        )
        decode_diff = max(decode_diff, diff)
        agree, total = agree + step_agree, total + step_total
    return {
        "prefill_max_abs_diff": prefill_diff,
        "decode_max_abs_diff": decode_diff,
        "decode_steps": decode_steps,
        "top1_agreement": agree / total,
        "probe_shape": list(input_ids.shape),
    }


def _padded(input_ids: torch.Tensor, attention_mask: torch.Tensor, side: str
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """A left-padded batch [B, S] as the artifact takes it: as it is, or each row's tokens moved
    to the front (``side="right"``)."""
    if side != "right":
        return input_ids, attention_mask
    order = torch.argsort(1 - attention_mask, dim=1, stable=True)  # real tokens first, in order
    return input_ids.gather(1, order), attention_mask.gather(1, order)


def _positions(attention_mask: torch.Tensor, num_new: int) -> torch.Tensor:
    """Position ids of a left- or right-padded mask (the real tokens count 0, 1, ...)."""
    return sig.decoder_positions(attention_mask, num_new).clamp(min=0)


def _encoder_parity(
    model: nn.Module,
    out_dir: Path,
    input_ids: torch.Tensor,  # [B, S]
    attention_mask: torch.Tensor,  # [B, S]
    threads: int | None,
    adapter: str | Path | None = None,
    provider: str = "cpu",
) -> dict[str, Any]:
    onnx_model = OnnxEncoder(out_dir, threads=threads, adapter=adapter, provider=provider)
    wrapper = sig.Encoder(model)
    args = [input_ids, attention_mask]
    if sig.TOKEN_TYPE_IDS in onnx_model.input_names:
        args.append(torch.zeros_like(input_ids))
    expected = wrapper(*args).numpy()  # [B, S, E]
    actual = onnx_model(*(a.numpy() for a in args))
    real = attention_mask.bool().numpy()
    return {
        "max_abs_diff": float(np.abs(expected[real] - actual[real]).max()),
        "probe_shape": list(input_ids.shape),
    }


def _compare(expected: np.ndarray, actual: np.ndarray) -> tuple[float, int, int]:
    """Max abs diff and argmax agreement of two [N, V] logit arrays."""
    diff = float(np.abs(expected - actual).max()) if expected.size else 0.0
    agree = int((expected.argmax(-1) == actual.argmax(-1)).sum())
    return diff, agree, expected.shape[0]
