"""``w8a8_linear`` and ``quant_embedding`` kernels, and the torch.library ops, under the interpreter."""

from __future__ import annotations

import pytest
import torch

from modelfold.ir.quant import PackedWeight, QuantFormat, W8A8Linear, block_size_for
from modelfold.kernels import int8, reference
from modelfold.kernels._runtime import INTERPRET, KernelError

DEVICE = "cpu" if INTERPRET else "cuda"
TOL = {torch.float32: 1e-5, torch.float16: 1e-3}


def rel_err(y, ref):
    return ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_w8a8_linear(dtype):
    for m, n, k in [(1, 100, 192), (3, 70, 96), (37, 130, 320)]:
        gen = torch.Generator().manual_seed(m + n + k)
        layer = W8A8Linear(torch.randn(n, k, generator=gen), torch.randn(n, generator=gen))
        x = torch.randn(m, k, generator=gen).to(dtype)
        bias = layer.bias.detach().to(dtype)
        ref = reference.w8a8_linear(x, layer.qweight_t, layer.weight_scales, bias)
        for config in (None, {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}):
            y = int8.w8a8_linear(x.to(DEVICE), layer.qweight_t.to(DEVICE),
                                 layer.weight_scales.to(DEVICE), bias.to(DEVICE),
                                 config=config).cpu()
            assert y.dtype == dtype and y.shape == (m, n)
            assert rel_err(y, ref) <= TOL[dtype], (m, n, k, config)
    # float32 without bias: the same numbers as the dialect op's eager implementation
    x = torch.randn(4, 96)
    layer = W8A8Linear(torch.randn(40, 96))
    eager = layer(x)
    y = int8.w8a8_linear(x.to(DEVICE), layer.qweight_t.to(DEVICE), layer.weight_scales.to(DEVICE),
                         None).cpu()
    assert rel_err(y, eager) <= 1e-6


def test_w8a8_rounds_half_to_even_like_torch():
    # rows whose scaled values hit .5 exactly: 127 * v / max = k + 0.5
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, 63.5, -126.5] + [0.0] * 8])
    q_ref = torch.round(x / (x.abs().amax() / 127.0))
    eye = torch.eye(16)
    layer = W8A8Linear(eye)
    y = int8.w8a8_linear(x.to(DEVICE), layer.qweight_t.to(DEVICE), layer.weight_scales.to(DEVICE),
                         None).cpu()
    # identity weights: y = q * (max / 127), so the codes are y / scale
    assert torch.equal(torch.round(y / (x.abs().amax() / 127.0)), q_ref)


@pytest.mark.parametrize("bits,group,symmetric", [(4, 32, False), (4, 128, True), (8, 16, False),
                                                  (2, 64, True), (3, -1, False)])
def test_quant_embedding(bits, group, symmetric):
    gen = torch.Generator().manual_seed(bits * 100 + group)
    vocab, dim = 50, 72
    fmt = QuantFormat(bits, block_size_for(group, dim), symmetric)
    pw = PackedWeight.from_float(torch.randn(vocab, dim, generator=gen), fmt)
    ids = torch.tensor([[0, 49, 7, 7], [3, 1, 0, 25]])
    for scales in (pw.scales, pw.scales.half()):
        ref = reference.quant_embedding(ids, pw.qweight, scales, pw.zero_points, dim,
                                        fmt.storage_bits, fmt.block_size, dtype=scales.dtype)
        for block in (None, 16):
            y = int8.quant_embedding(ids.to(DEVICE), pw.qweight.to(DEVICE), scales.to(DEVICE),
                                     None if pw.zero_points is None else pw.zero_points.to(DEVICE),
                                     dim, fmt.storage_bits, fmt.block_size, block_e=block).cpu()
            assert y.shape == (2, 4, dim) and y.dtype == scales.dtype
            assert torch.equal(y, ref), (bits, group, symmetric, scales.dtype, block)


def test_int8_launchers_reject_bad_tensors():
    layer = W8A8Linear(torch.randn(8, 32))
    q, s = layer.qweight_t.to(DEVICE), layer.weight_scales.to(DEVICE)
    with pytest.raises(KernelError, match="qweight_t must be torch.int8"):
        int8.w8a8_linear(torch.randn(2, 32, device=DEVICE), q.to(torch.uint8), s, None)
    with pytest.raises(KernelError, match=r"qweight_t must have shape \[16, \*\]"):
        int8.w8a8_linear(torch.randn(2, 16, device=DEVICE), q, s, None)
    pw = PackedWeight.from_float(torch.randn(10, 32), QuantFormat(4, 16, False))
    with pytest.raises(KernelError, match="ids must be int32 or int64"):
        int8.quant_embedding(torch.zeros(2, device=DEVICE), pw.qweight.to(DEVICE),
                             pw.scales.to(DEVICE), pw.zero_points.to(DEVICE), 32, 4, 16)


def test_library_ops_and_cuda_registrations():
    """The backend ops trace (fake impls) and run; the kernels are the dialect ops' CUDA impls."""
    import modelfold.kernels.ops  # noqa: F401

    pw = PackedWeight.from_float(torch.randn(24, 64), QuantFormat(4, 32, False))
    x = torch.randn(3, 64)
    a, b = torch.randn(4, 64) * 0.1, torch.randn(24, 4) * 0.1
    args = (x, pw.qweight, pw.scales, pw.zero_points, None, a, b, 0.5, 64, 4, 32)
    torch.library.opcheck(torch.ops.modelfold_triton.quant_linear, args,
                          test_utils=("test_schema", "test_faketensor"))
    y = torch.ops.modelfold_triton.quant_linear(*args)
    ref = reference.quant_linear(x, pw.qweight, pw.scales, pw.zero_points, None, 64, 4, 32, a, b,
                                 0.5)
    assert rel_err(y, ref) <= 1e-5
    with torch._subclasses.fake_tensor.FakeTensorMode():
        fx = torch.empty(7, 64)
        out = torch.ops.modelfold_triton.lora_linear(fx, torch.empty(24, 64), None,
                                                     torch.empty(4, 64), torch.empty(24, 4), 1.0)
        assert out.shape == (7, 24)
    for op in ("quant_linear", "nm_linear", "nm_quant_linear", "lora_delta", "w8a8_linear",
               "quant_embedding"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"modelfold::{op}", "CUDA"), op
