"""``modelfold::attention``: grouped-query attention with rotary embedding and the KV cache, one op.

The ``fuse-attention`` graph pass (``modelfold.passes.fuse_attention``) replaces what a decoder
layer's attention module computes between its projections and its output projection (reshapes,
rotary embedding, the cache update, K/V expanded to the query heads, masking, softmax) by this
op. Its semantics are those of ONNX Runtime's ``com.microsoft.GroupQueryAttention``, which is
what the ONNX lowering emits (``backends/onnxruntime/attention_lowering.py``):

- K/V are never expanded: query head ``h`` reads KV head ``h // (num_heads / kv_num_heads)``;
- the cache is ``[B, Hkv, C, D]``; the present cache has ``L = max(T, C)`` rows where ``T`` is the
  attention mask's length: with ``C = P`` (the past as long as it is) that is ``P + S`` rows, the
  concatenation of past and new keys; with a buffer longer than ``T`` (ONNX Runtime's
  ``past_present_share_buffer``: the same buffer bound as past and present) the new keys are
  written into it and nothing else moves;
- the mask is right-padded: row ``b`` holds ``T_b = sum(mask[b])`` tokens after this step, of
  which the last ``Q_b = min(S, T_b)`` are this step's (valid query rows ``[0, Q_b)``, the rest
  is padding whose output is zero here and unspecified in ONNX Runtime); query row ``s`` is at
  absolute position ``T_b - Q_b + s``, which is also its rotary position;
- causal, with an optional left window (``window`` keys including itself, as transformers'
  sliding-window mask and GroupQueryAttention's ``local_window_size``) and soft-capping of the
  scores (``softcap * tanh(scores / softcap)``, Gemma 2);
- rotary embedding (``rotate_half`` form) on the first ``R`` dims of q and k from tables
  ``cos_cache`` / ``sin_cache`` ``[M, R / 2]`` indexed by position.

For an all-ones mask (every prompt and every decode step of one sequence, and any batch of
sequences of equal length) this is exactly the attention of the captured model, so the pass is
exact; with padding, the runtime feeds right-padded masks (``OnnxCausalLM`` does).

With ``k_scale`` / ``v_scale`` (``[1, Hkv, 1, D]``, the ``quantize-kv`` pass) the cache is int8:
new rows are stored as ``clamp(round(x / scale), -128, 127)`` (round half to even) and every row
attention reads, the new ones included, is ``int8 * scale`` (GroupQueryAttention's per-channel
quantized cache, checked against ONNX Runtime).

``query`` is either q ``[B, S, H * D]`` (with ``key`` / ``value`` ``[B, S, Hkv * D]``) or the
packed ``[B, S, (H + 2 Hkv) * D]`` output of one fused q/k/v projection (``key = value = None``).

Shape legend: B = batch, S = new tokens, P = past rows, C = cache rows given, T = mask length,
L = present rows, H = query heads, Hkv = KV heads, G = H / Hkv, D = head dim, R = rotary dims,
M = positions in the rotary tables.
"""

from __future__ import annotations

import torch


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (``rotate_half`` form) of the first ``2 * cos.shape[-1]`` dims of x.

    x ``[B, H, S, D]``; cos / sin ``[B, 1, S, R / 2]`` (the tables gathered at the positions).
    """
    half = cos.shape[-1]
    rot, rest = x[..., : 2 * half], x[..., 2 * half:]
    x1, x2 = rot[..., :half], rot[..., half:]
    cos2, sin2 = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
    rotated = rot * cos2 + torch.cat([-x2, x1], -1) * sin2
    return torch.cat([rotated, rest], -1) if rest.shape[-1] else rotated


def _write(cache: torch.Tensor, rows: torch.Tensor, index: torch.Tensor, length) -> torch.Tensor:
    """``cache`` ``[B, Hkv, C, D]`` extended to ``length`` rows with ``rows`` ``[B, Hkv, S, D]``
    written at ``index`` ``[B, S]`` (``length`` for rows that are not written: a scratch row,
    dropped)."""
    b, h, c, d = cache.shape
    grown = torch.cat([cache, cache.new_zeros(b, h, length + 1 - c, d)], 2)  # [B, Hkv, L + 1, D]
    grown = grown.scatter(2, index[:, None, :, None].expand(b, h, index.shape[1], d), rows)
    return grown[:, :, :length].contiguous()  # what the op's fake (and torch.compile) expects


def quantize_rows(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Rows ``[B, Hkv, S, D]`` as int8 on a per-channel grid ``scale`` ``[1, Hkv, 1, D]``."""
    return torch.clamp(torch.round(x / scale), -128, 127).to(torch.int8)


def read_cache(cache: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The cache as attention reads it: dequantized when it is int8."""
    return cache.to(dtype) if scale is None else cache.to(dtype) * scale.to(dtype)


def prepare(query, key, value, past_key, past_value, attention_mask, cos_cache, sin_cache,
            num_heads: int, kv_num_heads: int, k_scale=None, v_scale=None):
    """The parts every implementation shares: rotated q ``[B, H, S, D]``, the present caches
    ``[B, Hkv, L, D]`` (as stored: int8 with scales), which keys each query row may see
    ``[B, S, L]`` (causal, no window) with the query positions ``[B, S]``, and which query rows
    are valid ``[B, S]``."""
    b, s, _ = query.shape
    hkv, d = kv_num_heads, past_key.shape[-1]
    h = num_heads
    if key is None or value is None:
        query, key, value = query.split([h * d, hkv * d, hkv * d], dim=-1)
    length = max(attention_mask.shape[1], past_key.shape[2])  # L
    total = attention_mask.sum(-1)  # [B] T_b
    new = total.clamp(max=s)  # [B] Q_b
    steps = torch.arange(s, device=query.device)
    positions = (total - new)[:, None] + steps  # [B, S]
    valid = steps[None] < new[:, None]  # [B, S]

    q = query.reshape(b, s, h, d).transpose(1, 2)  # [B, H, S, D]
    k = key.reshape(b, s, hkv, d).transpose(1, 2)  # [B, Hkv, S, D]
    v = value.reshape(b, s, hkv, d).transpose(1, 2)
    if cos_cache is not None and sin_cache is not None:
        at = positions.clamp(max=cos_cache.shape[0] - 1)
        cos, sin = cos_cache[at][:, None], sin_cache[at][:, None]  # [B, 1, S, R / 2]
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    index = torch.where(valid, positions, length)  # [B, S]
    k = k.to(past_key.dtype) if k_scale is None else quantize_rows(k, k_scale)
    v = v.to(past_value.dtype) if v_scale is None else quantize_rows(v, v_scale)
    present_key = _write(past_key, k, index, length)  # [B, Hkv, L, D]
    present_value = _write(past_value, v, index, length)
    keys = torch.arange(length, device=query.device)
    allowed = keys[None, None, :] <= positions[:, :, None]  # [B, S, L]
    return q, present_key, present_value, allowed, positions, valid


def visible(allowed: torch.Tensor, positions: torch.Tensor, window: int) -> torch.Tensor:
    """``allowed`` ``[B, S, L]`` narrowed to the last ``window`` keys of each query (0: all)."""
    if window <= 0:
        return allowed
    keys = torch.arange(allowed.shape[-1], device=allowed.device)
    return allowed & (keys[None, None, :] > positions[:, :, None] - window)


def _attend(q: torch.Tensor, present_key: torch.Tensor, present_value: torch.Tensor,
            allowed: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, kv_num_heads: int,
            scale: float, softcap: float, window: int, k_scale: torch.Tensor | None,
            v_scale: torch.Tensor | None) -> torch.Tensor:
    """Rotated q ``[B, H, S, D]`` over the caches ``[B, Hkv, L, D]`` -> ``[B, S, H * D]``."""
    b, h, s, d = q.shape
    hkv, length = kv_num_heads, present_key.shape[2]
    g = h // hkv
    keys = read_cache(present_key, k_scale, q.dtype)
    scores = q.reshape(b, hkv, g * s, d) @ keys.transpose(-1, -2)  # [B, Hkv, G*S, L]
    scores = scores * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    allowed = visible(allowed, positions, window)
    allowed = allowed[:, None, None].expand(b, 1, g, s, length).reshape(b, 1, g * s, length)
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    out = probs @ read_cache(present_value, v_scale, q.dtype)  # [B, Hkv, G*S, D]
    out = out.reshape(b, h, s, d).transpose(1, 2) * valid[:, :, None, None]  # [B, S, H, D]
    return out.reshape(b, s, h * d)


@torch.library.custom_op("modelfold::attention", mutates_args=())
def attention(query: torch.Tensor, key: torch.Tensor | None, value: torch.Tensor | None,
              past_key: torch.Tensor, past_value: torch.Tensor, attention_mask: torch.Tensor,
              cos_cache: torch.Tensor | None, sin_cache: torch.Tensor | None, num_heads: int,
              kv_num_heads: int, scale: float, softcap: float, window: int,
              k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grouped-query attention over the KV cache (see the module docstring).

    Returns ``(output [B, S, H * D], present_key, present_value [B, Hkv, L, D])``.
    """
    q, present_key, present_value, allowed, positions, valid = prepare(
        query, key, value, past_key, past_value, attention_mask, cos_cache, sin_cache,
        num_heads, kv_num_heads, k_scale, v_scale)
    out = _attend(q, present_key, present_value, allowed, positions, valid, kv_num_heads, scale,
                  softcap, window, k_scale, v_scale)
    return out, present_key, present_value


def query_positions(attention_mask: torch.Tensor, s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions ``[B, S]`` of this step's rows and which rows are valid ``[B, S]`` (right-padded
    mask, as ``prepare``)."""
    total = attention_mask.sum(-1)  # [B] T_b
    new = total.clamp(max=s)  # [B] Q_b
    steps = torch.arange(s, device=attention_mask.device)
    return (total - new)[:, None] + steps, steps[None] < new[:, None]


@torch.library.custom_op("modelfold::attend", mutates_args=())
def attend(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
           attention_mask: torch.Tensor, cos_cache: torch.Tensor | None,
           sin_cache: torch.Tensor | None, num_heads: int, kv_num_heads: int, scale: float,
           softcap: float, window: int, k_scale: torch.Tensor | None = None,
           v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of ``query`` ``[B, S, H * D]`` (rotated here, as ``attention`` does) over caches
    ``[B, Hkv, L, D]`` that already hold this step's rows -- another layer's present keys/values
    (attention shared across layers): nothing is written. Returns ``[B, S, H * D]``."""
    b, s, _ = query.shape
    d = keys.shape[-1]
    positions, valid = query_positions(attention_mask, s)
    q = query.reshape(b, s, num_heads, d).transpose(1, 2)  # [B, H, S, D]
    if cos_cache is not None and sin_cache is not None:
        at = positions.clamp(max=cos_cache.shape[0] - 1)
        q = rotate(q, cos_cache[at][:, None], sin_cache[at][:, None])
    allowed = torch.arange(keys.shape[2], device=q.device)[None, None, :] <= positions[:, :, None]
    return _attend(q, keys, values, allowed, positions, valid, kv_num_heads, scale, softcap,
                   window, k_scale, v_scale)


@attend.register_fake
def _(query, keys, values, attention_mask, cos_cache, sin_cache, num_heads, kv_num_heads, scale,
      softcap, window, k_scale=None, v_scale=None):
    return query.new_empty(query.shape[:2] + (num_heads * keys.shape[-1],))


@torch.library.custom_op("modelfold::cache_write", mutates_args=())
def cache_write(past: torch.Tensor, rows: torch.Tensor, attention_mask: torch.Tensor,
                kv_num_heads: int, scale: torch.Tensor | None = None) -> torch.Tensor:
    """One cache (``past`` ``[B, Hkv, C, D]``) with this step's ``rows`` ``[B, S, Hkv * D]`` written
    at their positions (every row, padding rows too: they land past the row's length, where no
    query looks) -> ``[B, Hkv, L, D]``, ``L = max(T, C)``; int8 on ``scale``'s grid when given. The
    cache of a layer that keeps values only (score sharing)."""
    b, s, _ = rows.shape
    d = past.shape[-1]
    positions, _ = query_positions(attention_mask, s)
    length = max(attention_mask.shape[1], past.shape[2])
    new = rows.reshape(b, s, kv_num_heads, d).transpose(1, 2)  # [B, Hkv, S, D]
    new = new.to(past.dtype) if scale is None else quantize_rows(new, scale)
    grown = torch.cat([past, past.new_zeros(b, kv_num_heads, length - past.shape[2], d)], 2)
    index = positions[:, None, :, None].expand(b, kv_num_heads, s, d)
    return grown.scatter(2, index, new)


@cache_write.register_fake
def _(past, rows, attention_mask, kv_num_heads, scale=None):
    b, hkv, _, d = past.shape
    length = torch.sym_max(attention_mask.shape[1], past.shape[2])
    return past.new_empty((b, hkv, length, d))


@attention.register_fake
def _(query, key, value, past_key, past_value, attention_mask, cos_cache, sin_cache, num_heads,
      kv_num_heads, scale, softcap, window, k_scale=None, v_scale=None):
    b, s, _ = query.shape
    hkv, d = kv_num_heads, past_key.shape[-1]
    length = torch.sym_max(attention_mask.shape[1], past_key.shape[2])
    present = past_key.new_empty((b, hkv, length, d))
    return query.new_empty((b, s, num_heads * d)), present, present.clone()


__all__ = ["attend", "attention", "cache_write", "prepare", "query_positions", "quantize_rows",
           "read_cache", "rotate", "visible"]
