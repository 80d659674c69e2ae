"""``modelfold::attention`` against ONNX Runtime's GroupQueryAttention (the semantics it lowers
to, with the inputs ``attention_lowering`` computes from the mask), and the Triton backend's SDPA
version against the reference. (The op also takes several new tokens per row for a batch with a
past, which the lowering's GroupQueryAttention refuses: see ``OnnxCausalLM.step``.)"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from modelfold.ir.attention import attention

H, HKV, D, POSITIONS = 4, 2, 16, 64


def _tables(rotary_dim: int = D) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    freqs = torch.outer(torch.arange(POSITIONS).float(), inv)  # [M, R/2]
    return freqs.cos(), freqs.sin()


def _session(packed: bool, rotary: bool, window: int, softcap: float, scale: float,
             heads: tuple[int, int] = (H, HKV)) -> ort.InferenceSession:
    """One GroupQueryAttention node (ONNX Runtime's contrib op), inputs named as below."""
    h, hkv = heads
    inputs = [helper.make_tensor_value_info("q", TensorProto.FLOAT, ["B", "S", None])]
    names = ["q", "", ""] if packed else ["q", "k", "v"]
    if not packed:
        inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["B", "S", hkv * D])
                   for n in ("k", "v")]
    inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["B", hkv, "P", D])
               for n in ("pk", "pv")]
    inputs += [helper.make_tensor_value_info("seqlens", TensorProto.INT32, ["B"]),
               helper.make_tensor_value_info("total", TensorProto.INT32, [])]
    names += ["pk", "pv", "seqlens", "total"]
    initializers = []
    if rotary:
        cos, sin = _tables()
        initializers = [helper.make_tensor("cos", TensorProto.FLOAT, cos.shape, cos.flatten()),
                        helper.make_tensor("sin", TensorProto.FLOAT, sin.shape, sin.flatten())]
    names += ["cos", "sin"] if rotary else []
    node = helper.make_node("GroupQueryAttention", names, ["out", "present_k", "present_v"],
                            domain="com.microsoft", num_heads=h, kv_num_heads=hkv,
                            do_rotary=int(rotary), local_window_size=window if window else -1,
                            softcap=softcap, scale=scale)
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
               for n in ("out", "present_k", "present_v")]
    graph = helper.make_graph([node], "gqa", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


CASES = {  # name: (batch, new tokens, past rows, rows' total lengths or None, options)
    "prompt": (2, 5, 0, None, {}),
    "prompt, packed q/k/v": (2, 5, 0, None, {"packed": True}),
    "prompt, right-padded rows": (2, 5, 0, [5, 2], {}),
    "decode": (2, 1, 6, None, {}),
    "decode, ragged rows": (2, 1, 6, [7, 4], {}),
    "chunk after a past": (1, 4, 3, None, {}),
    "sliding window, prompt": (1, 7, 0, None, {"window": 3}),
    "sliding window, decode": (1, 1, 8, None, {"window": 3}),
    "soft-capped scores": (1, 6, 0, None, {"softcap": 2.0}),
    "no rotary, multi-head": (2, 5, 0, None, {"rotary": False, "heads": (4, 4)}),
    "scale": (1, 5, 2, None, {"scale": 0.2}),
    "a buffer longer than the sequence (shared)": (2, 1, 12, [6, 3], {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_op_is_group_query_attention(case):
    batch, new, past, totals, opts = CASES[case]
    packed, rotary = opts.get("packed", False), opts.get("rotary", True)
    window, softcap = opts.get("window", 0), opts.get("softcap", 0.0)
    h, hkv = opts.get("heads", (H, HKV))
    scale = opts.get("scale", D ** -0.5)
    gen = torch.Generator().manual_seed(len(case))
    q = torch.randn(batch, new, h * D, generator=gen)
    k, v = (torch.randn(batch, new, hkv * D, generator=gen) for _ in range(2))
    past_k, past_v = (torch.randn(batch, hkv, past, D, generator=gen) for _ in range(2))
    totals = totals or [past + new] * batch
    mask = (torch.arange(max(totals))[None] < torch.tensor(totals)[:, None]).long()  # [B, T]
    cos, sin = _tables() if rotary else (None, None)

    query = torch.cat([q, k, v], -1) if packed else q
    out, present_k, present_v = attention(
        query, None if packed else k, None if packed else v, past_k, past_v, mask, cos, sin,
        h, hkv, scale, softcap, window)
    feeds = {"q": query.numpy(), "pk": past_k.numpy(), "pv": past_v.numpy(),
             "seqlens": np.array([t - 1 for t in totals], np.int32),
             "total": np.array(max(totals), np.int32)}
    if not packed:
        feeds.update(k=k.numpy(), v=v.numpy())
    expected = _session(packed, rotary, window, softcap, scale, (h, hkv)).run(None, feeds)

    assert present_k.shape == expected[1].shape == (batch, hkv, max(past, max(totals)), D)
    for b, total in enumerate(totals):  # rows past a row's length are unspecified in ORT
        rows = min(new, total)
        np.testing.assert_allclose(out[b, :rows], expected[0][b, :rows], atol=2e-6)
        np.testing.assert_allclose(present_k[b, :, :total], expected[1][b, :, :total], atol=2e-6)
        np.testing.assert_allclose(present_v[b, :, :total], expected[2][b, :, :total], atol=2e-6)
        assert not out[b, rows:].any()  # padding rows: zeros here


def test_a_shared_buffer_is_written_only_at_the_new_rows():
    """Past = a longer buffer: the present is that buffer with the new token's row written."""
    gen = torch.Generator().manual_seed(0)
    past = torch.randn(1, HKV, 10, D, generator=gen)
    mask = torch.ones(1, 5, dtype=torch.long)  # 4 tokens cached, 1 new
    q = torch.randn(1, 1, H * D, generator=gen)
    k, v = (torch.randn(1, 1, HKV * D, generator=gen) for _ in range(2))
    _, present, _ = attention(q, k, v, past, past.clone(), mask, None, None, H, HKV, 0.25, 0.0, 0)
    assert present.shape == past.shape
    torch.testing.assert_close(present[:, :, :4], past[:, :, :4], rtol=0, atol=0)
    torch.testing.assert_close(present[:, :, 5:], past[:, :, 5:], rtol=0, atol=0)
    torch.testing.assert_close(present[0, :, 4], k.view(HKV, D), rtol=0, atol=0)


def test_the_fake_keeps_the_cache_length_symbolic():
    """Under torch.export the present length is max(mask length, past length)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 3, H * D)
        kv = torch.empty(2, 3, HKV * D)
        past = torch.empty(2, HKV, 5, D)
        out, present, _ = attention(q, kv, kv, past, past, torch.empty(2, 8, dtype=torch.long),
                                    None, None, H, HKV, 0.25, 0.0, 0)
    assert tuple(out.shape) == (2, 3, H * D) and tuple(present.shape) == (2, HKV, 8, D)


@pytest.mark.parametrize("window", [0, 3])
def test_the_triton_backends_sdpa_version_matches_the_reference(window):
    from modelfold.backends.triton.compile import load_kernels

    load_kernels(interpret=True)
    ops = torch.ops.modelfold_triton
    gen = torch.Generator().manual_seed(1)
    cos, sin = _tables()
    q = torch.randn(2, 1, H * D, generator=gen)
    k, v = (torch.randn(2, 1, HKV * D, generator=gen) for _ in range(2))
    past = [torch.randn(2, HKV, 6, D, generator=gen) for _ in range(2)]
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    args = (q, k, v, *past, mask, cos, sin, H, HKV, D ** -0.5, 0.0, window)
    for got, want in zip(ops.attention(*args), attention(*args)):
        torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)


def test_an_int8_cache_is_group_query_attentions_per_channel_cache():
    """k_scale / v_scale: rows stored as round-half-even(x / scale) clamped to int8, attention
    reads them dequantized (the new token's too), as ONNX Runtime's quantized cache."""
    gen = torch.Generator().manual_seed(5)
    batch, new, past_len = 2, 1, 6
    q = torch.randn(batch, new, H * D, generator=gen)
    k, v = (torch.randn(batch, new, HKV * D, generator=gen) for _ in range(2))
    scales = [torch.rand(1, HKV, 1, D, generator=gen) * 0.05 + 0.01 for _ in range(2)]
    past = [torch.randint(-128, 128, (batch, HKV, past_len, D), generator=gen, dtype=torch.int8)
            for _ in range(2)]
    totals = [7, 4]
    mask = (torch.arange(7)[None] < torch.tensor(totals)[:, None]).long()
    cos, sin = _tables()
    out, present_k, present_v = attention(q, k, v, *past, mask, cos, sin, H, HKV, D ** -0.5, 0.0,
                                          0, *scales)
    assert present_k.dtype == torch.int8
    inputs = [helper.make_tensor_value_info("q", TensorProto.FLOAT, ["B", "S", H * D]),
              *[helper.make_tensor_value_info(n, TensorProto.FLOAT, ["B", "S", HKV * D])
                for n in ("k", "v")],
              *[helper.make_tensor_value_info(n, TensorProto.INT8, ["B", HKV, "P", D])
                for n in ("pk", "pv")],
              helper.make_tensor_value_info("seqlens", TensorProto.INT32, ["B"]),
              helper.make_tensor_value_info("total", TensorProto.INT32, []),
              *[helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, HKV, 1, D])
                for n in ("ks", "vs")]]
    init = [helper.make_tensor(n, TensorProto.FLOAT, t.shape, t.flatten())
            for n, t in zip(("cos", "sin"), (cos, sin))]
    node = helper.make_node(
        "GroupQueryAttention",
        ["q", "k", "v", "pk", "pv", "seqlens", "total", "cos", "sin", "", "", "", "ks", "vs"],
        ["out", "present_k", "present_v"], domain="com.microsoft", num_heads=H, kv_num_heads=HKV,
        do_rotary=1, k_quant_type="PER_CHANNEL", v_quant_type="PER_CHANNEL", kv_cache_bit_width=8)
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, None),
               *[helper.make_tensor_value_info(n, TensorProto.INT8, None)
                 for n in ("present_k", "present_v")]]
    model = helper.make_model(helper.make_graph([node], "gqa8", inputs, outputs, init),
                              opset_imports=[helper.make_opsetid("", 17),
                                             helper.make_opsetid("com.microsoft", 1)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"q": q.numpy(), "k": k.numpy(), "v": v.numpy(),
                                  "pk": past[0].numpy(), "pv": past[1].numpy(),
                                  "seqlens": np.array([t - 1 for t in totals], np.int32),
                                  "total": np.array(7, np.int32), "ks": scales[0].numpy(),
                                  "vs": scales[1].numpy()})
    for b, total in enumerate(totals):
        np.testing.assert_allclose(out[b], expected[0][b], atol=1e-5, rtol=1e-5)
        np.testing.assert_array_equal(present_k[b, :, :total], expected[1][b, :, :total])
        np.testing.assert_array_equal(present_v[b, :, :total], expected[2][b, :, :total])
