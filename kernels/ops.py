"""The Triton backend's ``torch.library`` ops, and the CUDA implementations of the dialect ops.

Backend ops (namespace ``modelfold_triton``; ``custom_op`` + ``register_fake``, so
``torch.compile`` traces them as single opaque calls and Inductor compiles everything around
them). Each linear op takes an optional LoRA pair, fused into the same kernel:

- ``quant_linear(x, qweight, scales, zero_points?, bias?, lora_a?, lora_b?, scaling, in_features,
  bits, block_size)``
- ``nm_linear(x, values, indices, bias?, lora_a?, lora_b?, scaling, in_features, n, m)``
- ``nm_quant_linear(x, codes, indices, scales, zero_points?, bias?, lora_a?, lora_b?, scaling,
  in_features, bits, block_size, n, m)``
- ``lora_linear(x, weight, bias?, lora_a, lora_b, scaling)`` (fused LoRA over a float weight)
- ``lora_delta(x, lora_a, lora_b, scaling)``, ``w8a8_linear(x, qweight_t, weight_scales, bias?)``,
  ``quant_embedding(ids, qweight, scales, zero_points?, embedding_dim, bits, block_size)``
- ``moe(...)`` / ``quant_moe(...)``: ``modelfold::moe`` / ``quant_moe`` (``modelfold.ir.moe``),
  routed experts on the grouped kernels of ``modelfold.kernels.moe`` (tokens grouped by expert)
- ``attention(...)``: ``modelfold::attention`` (``modelfold.ir.attention``) on
  ``scaled_dot_product_attention``

Importing this module also registers the kernels as the ``cuda`` implementation of every dialect
op (``modelfold::quant_linear``, ``nm_linear``, ``nm_quant_linear``, ``lora_delta``,
``w8a8_linear``, ``quant_embedding``): on a GPU, an eager transformed model then runs them too.
(A plain ``custom_op`` rather than ``torch.library.triton_op``: ``triton_op`` / ``wrap_triton``
fail under ``torch.export`` in interpreter mode; see DESIGN.md.)
"""

from __future__ import annotations

import torch
from torch import Tensor

from modelfold.kernels import int8, linear
from modelfold.kernels import moe as moe_kernels

NAMESPACE = "modelfold_triton"


def _out(x: Tensor, n_out: int) -> Tensor:
    return x.new_empty((*x.shape[:-1], n_out))


@torch.library.custom_op(f"{NAMESPACE}::quant_linear", mutates_args=())
def quant_linear(x: Tensor, qweight: Tensor, scales: Tensor, zero_points: Tensor | None,
                 bias: Tensor | None, lora_a: Tensor | None, lora_b: Tensor | None,
                 scaling: float, in_features: int, bits: int, block_size: int) -> Tensor:
    return linear.quant_linear(x, qweight, scales, zero_points, bias, in_features, bits,
                               block_size, lora_a, lora_b, scaling)


@quant_linear.register_fake
def _(x, qweight, scales, zero_points, bias, lora_a, lora_b, scaling, in_features, bits,
      block_size):
    return _out(x, qweight.shape[0])


@torch.library.custom_op(f"{NAMESPACE}::nm_linear", mutates_args=())
def nm_linear(x: Tensor, values: Tensor, indices: Tensor, bias: Tensor | None,
              lora_a: Tensor | None, lora_b: Tensor | None, scaling: float, in_features: int,
              n: int, m: int) -> Tensor:
    return linear.nm_linear(x, values, indices, bias, in_features, n, m, lora_a, lora_b, scaling)


@nm_linear.register_fake
def _(x, values, indices, bias, lora_a, lora_b, scaling, in_features, n, m):
    return _out(x, values.shape[0])


@torch.library.custom_op(f"{NAMESPACE}::nm_quant_linear", mutates_args=())
def nm_quant_linear(x: Tensor, codes: Tensor, indices: Tensor, scales: Tensor,
                    zero_points: Tensor | None, bias: Tensor | None, lora_a: Tensor | None,
                    lora_b: Tensor | None, scaling: float, in_features: int, bits: int,
                    block_size: int, n: int, m: int) -> Tensor:
    return linear.nm_quant_linear(x, codes, indices, scales, zero_points, bias, in_features,
                                  bits, block_size, n, m, lora_a, lora_b, scaling)


@nm_quant_linear.register_fake
def _(x, codes, indices, scales, zero_points, bias, lora_a, lora_b, scaling, in_features, bits,
      block_size, n, m):
    return _out(x, codes.shape[0])


@torch.library.custom_op(f"{NAMESPACE}::lora_linear", mutates_args=())
def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor,
                scaling: float) -> Tensor:
    return linear.dense_linear(x, weight, bias, lora_a, lora_b, scaling)


@lora_linear.register_fake
def _(x, weight, bias, lora_a, lora_b, scaling):
    return _out(x, weight.shape[0])


@torch.library.custom_op(f"{NAMESPACE}::lora_delta", mutates_args=())
def lora_delta(x: Tensor, lora_a: Tensor, lora_b: Tensor, scaling: float) -> Tensor:
    return linear.lora_delta(x, lora_a, lora_b, scaling)


@lora_delta.register_fake
def _(x, lora_a, lora_b, scaling):
    return _out(x, lora_b.shape[0])


@torch.library.custom_op(f"{NAMESPACE}::w8a8_linear", mutates_args=())
def w8a8_linear(x: Tensor, qweight_t: Tensor, weight_scales: Tensor, bias: Tensor | None
                ) -> Tensor:
    return int8.w8a8_linear(x, qweight_t, weight_scales, bias)


@w8a8_linear.register_fake
def _(x, qweight_t, weight_scales, bias):
    return _out(x, qweight_t.shape[1])


@torch.library.custom_op(f"{NAMESPACE}::quant_embedding", mutates_args=())
def quant_embedding(ids: Tensor, qweight: Tensor, scales: Tensor, zero_points: Tensor | None,
                    embedding_dim: int, bits: int, block_size: int) -> Tensor:
    return int8.quant_embedding(ids, qweight, scales, zero_points, embedding_dim, bits,
                                block_size)


@quant_embedding.register_fake
def _(ids, qweight, scales, zero_points, embedding_dim, bits, block_size):
    return scales.new_empty((*ids.shape, embedding_dim))


@torch.library.custom_op(f"{NAMESPACE}::attention", mutates_args=())
def attention(query: Tensor, key: Tensor | None, value: Tensor | None, past_key: Tensor,
              past_value: Tensor, attention_mask: Tensor, cos_cache: Tensor | None,
              sin_cache: Tensor | None, num_heads: int, kv_num_heads: int, scale: float,
              softcap: float, window: int, k_scale: Tensor | None = None,
              v_scale: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``modelfold::attention`` on ``scaled_dot_product_attention`` (flash / memory-efficient
    kernels on a GPU, K/V not expanded: ``enable_gqa``); soft-capped scores, which SDPA cannot
    take, use the op's reference."""
    from modelfold.ir import attention as ref

    if softcap > 0:
        return ref.attention(query, key, value, past_key, past_value, attention_mask, cos_cache,
                             sin_cache, num_heads, kv_num_heads, scale, softcap, window, k_scale,
                             v_scale)
    q, present_key, present_value, allowed, positions, valid = ref.prepare(
        query, key, value, past_key, past_value, attention_mask, cos_cache, sin_cache,
        num_heads, kv_num_heads, k_scale, v_scale)
    allowed = ref.visible(allowed, positions, window) | ~valid[:, :, None]  # padding rows: any
    out = torch.nn.functional.scaled_dot_product_attention(
        q, ref.read_cache(present_key, k_scale, q.dtype),
        ref.read_cache(present_value, v_scale, q.dtype), attn_mask=allowed[:, None],
        scale=scale, enable_gqa=True)  # [B, H, S, D]
    b, h, s, d = q.shape
    out = out.transpose(1, 2) * valid[:, :, None, None]
    return out.reshape(b, s, h * d), present_key, present_value


@attention.register_fake
def _(query, key, value, past_key, past_value, attention_mask, cos_cache, sin_cache, num_heads,
      kv_num_heads, scale, softcap, window, k_scale=None, v_scale=None):
    b, s, _ = query.shape
    length = torch.sym_max(attention_mask.shape[1], past_key.shape[2])
    present = past_key.new_empty((b, kv_num_heads, length, past_key.shape[-1]))
    return query.new_empty((b, s, num_heads * past_key.shape[-1])), present, present.clone()


@torch.library.custom_op(f"{NAMESPACE}::attend", mutates_args=())
def attend(query: Tensor, keys: Tensor, values: Tensor, attention_mask: Tensor,
           cos_cache: Tensor | None, sin_cache: Tensor | None, num_heads: int, kv_num_heads: int,
           scale: float, softcap: float, window: int, k_scale: Tensor | None = None,
           v_scale: Tensor | None = None) -> Tensor:
    """``modelfold::attend`` (attention over another layer's cache: shared attention) on
    ``scaled_dot_product_attention`` like ``attention``; soft-capped scores use the reference."""
    from modelfold.ir import attention as ref

    if softcap > 0:
        return ref.attend(query, keys, values, attention_mask, cos_cache, sin_cache, num_heads,
                          kv_num_heads, scale, softcap, window, k_scale, v_scale)
    b, s, _ = query.shape
    d = keys.shape[-1]
    positions, valid = ref.query_positions(attention_mask, s)
    q = query.reshape(b, s, num_heads, d).transpose(1, 2)  # [B, H, S, D]
    if cos_cache is not None and sin_cache is not None:
        at = positions.clamp(max=cos_cache.shape[0] - 1)
        q = ref.rotate(q, cos_cache[at][:, None], sin_cache[at][:, None])
    allowed = torch.arange(keys.shape[2], device=q.device)[None, None, :] <= positions[:, :, None]
    allowed = ref.visible(allowed, positions, window) | ~valid[:, :, None]  # padding rows: any
    out = torch.nn.functional.scaled_dot_product_attention(
        q, ref.read_cache(keys, k_scale, q.dtype), ref.read_cache(values, v_scale, q.dtype),
        attn_mask=allowed[:, None], scale=scale, enable_gqa=True)  # [B, H, S, D]
    out = out.transpose(1, 2) * valid[:, :, None, None]
    return out.reshape(b, s, num_heads * d)


@attend.register_fake
def _(query, keys, values, attention_mask, cos_cache, sin_cache, num_heads, kv_num_heads, scale,
      softcap, window, k_scale=None, v_scale=None):
    return query.new_empty((*query.shape[:2], num_heads * keys.shape[-1]))


@torch.library.custom_op(f"{NAMESPACE}::moe", mutates_args=())
def moe(x: Tensor, router: Tensor, w1: Tensor, w3: Tensor | None, w2: Tensor, b1: Tensor | None,
        top_k: int, activation: str, weighting: str) -> Tensor:
    """``modelfold::moe``: the router and top-k as the dialect op, the routed experts on the
    grouped kernels (``modelfold.kernels.moe``)."""
    from modelfold.ir.moe import route

    weights, index = route(torch.nn.functional.linear(x, router), top_k, weighting)
    return moe_kernels.routed_experts(x, weights, index, w1, w3, w2, b1, activation)


@moe.register_fake
def _(x, router, w1, w3, w2, b1, top_k, activation, weighting):
    return torch.empty_like(x)


@torch.library.custom_op(f"{NAMESPACE}::quant_moe", mutates_args=())
def quant_moe(x: Tensor, router: Tensor, q1: Tensor, s1: Tensor, z1: Tensor | None, q3: Tensor,
              s3: Tensor, z3: Tensor | None, q2: Tensor, s2: Tensor, z2: Tensor | None,
              top_k: int, activation: str, weighting: str, bits: int, block_size: int) -> Tensor:
    """``modelfold::quant_moe`` on the grouped kernels, decoding the experts' MatMulNBits bytes."""
    from modelfold.ir.moe import route

    weights, index = route(torch.nn.functional.linear(x, router), top_k, weighting)
    return moe_kernels.routed_experts(x, weights, index, q1, q3, q2, None, activation, s1=s1,
                                      z1=z1, s3=s3, z3=z3, s2=s2, z2=z2, bits=bits,
                                      block_size=block_size)


@quant_moe.register_fake
def _(x, router, q1, s1, z1, q3, s3, z3, q2, s2, z2, top_k, activation, weighting, bits,
      block_size):
    return torch.empty_like(x)


# -- the kernels as the CUDA implementation of the dialect ops ----------------------------------
def _register_dialect_cuda() -> None:
    import modelfold.ir.lora  # noqa: F401  (defines modelfold::lora_delta)
    import modelfold.ir.moe  # noqa: F401
    import modelfold.ir.quant  # noqa: F401
    import modelfold.ir.sparse  # noqa: F401

    reg = torch.library.register_kernel
    reg("modelfold::quant_linear", "cuda")(
        lambda x, qweight, scales, zero_points, bias, in_features, bits, block_size:
        linear.quant_linear(x, qweight, scales, zero_points, bias, in_features, bits, block_size))
    reg("modelfold::nm_linear", "cuda")(
        lambda x, values, indices, bias, in_features, n, m:
        linear.nm_linear(x, values, indices, bias, in_features, n, m))
    reg("modelfold::nm_quant_linear", "cuda")(
        lambda x, codes, indices, scales, zero_points, bias, in_features, bits, block_size, n, m:
        linear.nm_quant_linear(x, codes, indices, scales, zero_points, bias, in_features, bits,
                               block_size, n, m))
    reg("modelfold::lora_delta", "cuda")(linear.lora_delta)
    reg("modelfold::w8a8_linear", "cuda")(int8.w8a8_linear)
    reg("modelfold::quant_embedding", "cuda")(int8.quant_embedding)
    reg("modelfold::moe", "cuda")(moe)
    reg("modelfold::quant_moe", "cuda")(quant_moe)


_register_dialect_cuda()
