"""The linear kernels against their pure-PyTorch references (``modelfold.kernels.reference``).

Run under Triton's CPU interpreter (``TRITON_INTERPRET=1``, tests/conftest.py) at small shapes.
Every check covers both paths (GEMV for <= 4 rows, GEMM otherwise) on shapes that are not
multiples of the tiles, with the interpreter's large default tiles and with small forced tiles
(several tiles per output and several K steps; split-K for GEMV). Tolerance: max |y - ref| /
max |ref| <= 1e-5 in float32, 1e-3 in float16.
"""

from __future__ import annotations

import pytest
import torch

from modelfold.ir.quant import PackedWeight, QuantFormat, block_size_for, quantize_rtn
from modelfold.ir.sparse import NMQuantLinear, compress, nm_mask
from modelfold.kernels import linear, reference
from modelfold.kernels._runtime import INTERPRET, KernelError

DEVICE = "cpu" if INTERPRET else "cuda"
TOL = {torch.float32: 1e-5, torch.float16: 1e-3}
# (M, N, K): decode rows (GEMV), a few rows, a batch; N and K not multiples of any tile
SHAPES = [(1, 100, 200), (3, 70, 96), (37, 130, 320)]
SMALL_GEMM = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64}
SMALL_GEMV = {"BLOCK_N": 32, "BLOCK_K": 64, "SPLIT_K": 3}
DEFAULT = [("default", None, None)]
# small tiles: several tiles per output, several K steps, split-K (interpreter time: used on one
# case per kernel family)
SWEEP = [*DEFAULT, ("gemm-small-tiles", SMALL_GEMM, False), ("gemv-split-k", SMALL_GEMV, True)]


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30)).item()


def dev(*tensors):
    return [t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in tensors]


def check_all(fn, ref_fn, dtype, label: str, shapes=SHAPES, paths=DEFAULT, **make):
    """Run ``fn(x, config=..., gemv=...)`` against ``ref_fn(x)`` over shapes and paths."""
    worst = 0.0
    for m, n, k in shapes:
        gen = torch.Generator().manual_seed(m * 1000 + n + k)
        x = torch.randn(m, k, generator=gen).to(dtype)
        args = make["build"](n, k, gen)
        ref = ref_fn(x, *args)
        for path, config, gemv in paths:
            y = fn(*dev(x, *args), config=config, gemv=gemv).cpu()
            assert y.shape == (m, n) and y.dtype == dtype
            err = rel_err(y, ref)
            assert err <= TOL[dtype], f"{label} {path} {m}x{n}x{k} {dtype}: rel err {err:.2e}"
            worst = max(worst, err)
    return worst


def lora_pair(n: int, k: int, r: int, gen, dtype):
    return ((torch.randn(r, k, generator=gen) * 0.2).to(dtype),
            (torch.randn(n, r, generator=gen) * 0.2).to(dtype))


# -- int2 / int3 / int4 / int8 weight-only, MatMulNBits layout -------------------------------------
GROUPS = [16, 32, 64, 128, 256, -1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quant_linear_every_group_size(bits, dtype):
    for group in GROUPS:
        for symmetric in (False, True):
            def build(n, k, gen, group=group, symmetric=symmetric):
                fmt = QuantFormat(bits, block_size_for(group, k), symmetric)
                pw = PackedWeight.from_float(torch.randn(n, k, generator=gen), fmt)
                bias = torch.randn(n, generator=gen).to(dtype)
                return (pw.qweight, pw.scales, pw.zero_points, bias, k, fmt.storage_bits,
                        fmt.block_size)

            paths = SWEEP if group == 32 and not symmetric else DEFAULT
            check_all(linear.quant_linear, reference.quant_linear, dtype,
                      f"int{bits} g{group} {'sym' if symmetric else 'asym'}", paths=paths,
                      build=build)


def test_quant_linear_fp16_scales_and_no_bias():
    def build(n, k, gen):
        fmt = QuantFormat(4, 64, False)
        pw = PackedWeight.from_float(torch.randn(n, k, generator=gen), fmt)
        return pw.qweight, pw.scales.half(), pw.zero_points, None, k, 4, 64

    check_all(linear.quant_linear, reference.quant_linear, torch.float16, "fp16 scales",
              build=build)


def test_quant_linear_matches_the_dialect_op():
    """The kernel computes what ``modelfold::quant_linear`` (the eager reference) computes."""
    gen = torch.Generator().manual_seed(0)
    fmt = QuantFormat(4, 32, False)
    pw = PackedWeight.from_float(torch.randn(48, 160, generator=gen), fmt)
    x = torch.randn(2, 5, 160, generator=gen)
    eager = torch.ops.modelfold.quant_linear(x, pw.qweight, pw.scales, pw.zero_points, None, 160,
                                             4, 32)
    y = linear.quant_linear(*dev(x, pw.qweight, pw.scales, pw.zero_points), None, 160, 4, 32)
    assert y.shape == (2, 5, 48)
    assert rel_err(y.cpu(), eager) <= 1e-5


# -- N:M sparse -------------------------------------------------------------------------------------
# every index width (1, 2, 4, 8 bits per stored position) and keep ratios from 1/32 to 3/4
PATTERNS = [(1, 2), (2, 4), (1, 4), (3, 4), (2, 8), (4, 8), (5, 16), (2, 32), (16, 32)]


def nm_shapes(m: int):
    """SHAPES with K rounded up to a multiple of m."""
    return [(rows, n, -(-k // m) * m) for rows, n, k in SHAPES]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,m", PATTERNS)
def test_nm_linear(n, m, dtype):
    def build(rows, k, gen):
        w = torch.randn(rows, k, generator=gen)
        values, indices = compress(w, nm_mask(w.abs(), n, m), n, m)
        return values.to(dtype), indices, torch.randn(rows, generator=gen).to(dtype), k, n, m

    check_all(linear.nm_linear, reference.nm_linear, dtype, f"{n}:{m}", shapes=nm_shapes(m),
              paths=SWEEP if (n, m) == (2, 4) else DEFAULT, build=build)


def nm_quant_args(rows: int, k: int, n: int, m: int, fmt: QuantFormat, gen, bias_dtype):
    w = torch.randn(rows, k, generator=gen)
    mask = nm_mask(w.abs(), n, m)
    codes, scales, zeros = quantize_rtn(w * mask, fmt)
    grid = PackedWeight.from_codes(codes, scales, zeros, fmt)  # packs the zero points
    indices = compress(w, mask, n, m)[1]
    layer = NMQuantLinear.from_codes(codes, grid.scales, grid.zero_points, fmt, indices, n, m)
    bias = torch.randn(rows, generator=gen).to(bias_dtype)
    return (layer.codes, layer.indices, layer.scales, layer.zero_points, bias, k,
            layer.storage_bits, layer.block_size, n, m)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,m,bits,group,symmetric", [
    (2, 4, 4, 32, False), (2, 4, 8, 16, True), (1, 4, 2, -1, False), (4, 8, 3, 64, False),
    (5, 16, 4, 128, True), (16, 32, 4, 16, False)])
def test_nm_quant_linear(n, m, bits, group, symmetric, dtype):
    def build(rows, k, gen):
        fmt = QuantFormat(bits, block_size_for(group, k), symmetric)
        return nm_quant_args(rows, k, n, m, fmt, gen, dtype)

    check_all(linear.nm_quant_linear, reference.nm_quant_linear, dtype,
              f"{n}:{m} int{bits} g{group}", shapes=nm_shapes(m),
              paths=SWEEP if (n, m, bits) == (2, 4, 4) else DEFAULT, build=build)


# -- LoRA -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rank", [1, 5, 16, 33])
def test_fused_lora_linear(rank, dtype):
    def build(n, k, gen):
        a, b = lora_pair(n, k, rank, gen, dtype)
        return torch.randn(n, k, generator=gen).to(dtype), torch.randn(n, generator=gen).to(dtype), \
            a, b, 0.75

    check_all(linear.dense_linear, reference.dense_linear, dtype, f"lora r{rank}",
              paths=SWEEP if rank == 5 else DEFAULT, build=build)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_lora_delta_alone(dtype):
    def build(n, k, gen):
        return (*lora_pair(n, k, 8, gen, dtype), 2.0)

    check_all(linear.lora_delta, reference.lora_delta, dtype, "lora_delta", paths=SWEEP,
              build=build)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_lora_fused_into_every_packed_format(dtype):
    def quant(n, k, gen):
        fmt = QuantFormat(4, 32, False)
        pw = PackedWeight.from_float(torch.randn(n, k, generator=gen), fmt)
        return (pw.qweight, pw.scales, pw.zero_points, None, k, 4, 32,
                *lora_pair(n, k, 4, gen, dtype), 0.5)

    def nm(n, k, gen):
        w = torch.randn(n, k, generator=gen)
        values, indices = compress(w, nm_mask(w.abs(), 2, 4), 2, 4)
        return (values.to(dtype), indices, None, k, 2, 4, *lora_pair(n, k, 4, gen, dtype), 0.5)

    def nm_quant(n, k, gen):
        args = nm_quant_args(n, k, 2, 4, QuantFormat(4, 32, True), gen, dtype)
        return (*args, *lora_pair(n, k, 4, gen, dtype), 0.5)

    check_all(linear.quant_linear, reference.quant_linear, dtype, "int4+lora", build=quant)
    check_all(linear.nm_linear, reference.nm_linear, dtype, "2:4+lora", build=nm)
    check_all(linear.nm_quant_linear, reference.nm_quant_linear, dtype, "2:4 int4+lora",
              build=nm_quant)


def test_empty_and_batched_inputs():
    fmt = QuantFormat(4, 16, False)
    pw = PackedWeight.from_float(torch.randn(24, 48), fmt)
    args = dev(pw.qweight, pw.scales, pw.zero_points)
    empty = linear.quant_linear(torch.zeros(0, 48, device=DEVICE), *args, None, 48, 4, 16)
    assert empty.shape == (0, 24)
    x = torch.randn(2, 3, 48)
    y = linear.quant_linear(x.to(DEVICE), *args, None, 48, 4, 16).cpu()
    assert y.shape == (2, 3, 24)
    ref = reference.quant_linear(x, pw.qweight, pw.scales, pw.zero_points, None, 48, 4, 16)
    assert rel_err(y, ref) <= 1e-5
    # a non-contiguous x (a column slice) is read through its row stride
    wide = torch.randn(5, 96)
    y = linear.quant_linear(wide[:, :48].to(DEVICE), *args, None, 48, 4, 16).cpu()
    ref = reference.quant_linear(wide[:, :48], pw.qweight, pw.scales, pw.zero_points, None, 48,
                                 4, 16)
    assert rel_err(y, ref) <= 1e-5


# -- launcher validation ------------------------------------------------------------------------
def test_launchers_reject_bad_tensors():
    fmt = QuantFormat(4, 32, False)
    pw = PackedWeight.from_float(torch.randn(16, 64), fmt)
    q, s, z = dev(pw.qweight, pw.scales, pw.zero_points)
    x = torch.randn(2, 64, device=DEVICE)
    with pytest.raises(KernelError, match="x has 63 features"):
        linear.quant_linear(x[:, :63], q, s, z, None, 64, 4, 32)
    with pytest.raises(KernelError, match="qweight must be torch.uint8"):
        linear.quant_linear(x, q.to(torch.int8), s, z, None, 64, 4, 32)
    with pytest.raises(KernelError, match=r"scales must have shape \[16, 2\]"):
        linear.quant_linear(x, q, s[:, :1].contiguous(), z, None, 64, 4, 32)
    with pytest.raises(KernelError, match="scales must be contiguous"):
        linear.quant_linear(x, q, s.t().contiguous().t(), z, None, 64, 4, 32)
    with pytest.raises(KernelError, match="storage bits must be 2, 4 or 8"):
        linear.quant_linear(x, q, s, z, None, 64, 3, 32)
    with pytest.raises(KernelError, match="block_size must be a power of 2"):
        linear.quant_linear(x, q, s, z, None, 64, 4, 24)
    with pytest.raises(KernelError, match=r"bias must have shape \[16\]"):
        linear.quant_linear(x, q, s, z, torch.zeros(15, device=DEVICE), 64, 4, 32)
    with pytest.raises(KernelError, match="give both lora_a and lora_b"):
        linear.quant_linear(x, q, s, z, None, 64, 4, 32, torch.zeros(2, 64, device=DEVICE))
    with pytest.raises(KernelError, match="lora_b must be torch.float32"):
        linear.dense_linear(x, torch.randn(16, 64, device=DEVICE), None,
                            torch.zeros(2, 64, device=DEVICE),
                            torch.zeros(16, 2, device=DEVICE, dtype=torch.float16))
    with pytest.raises(KernelError, match="x must be float16, bfloat16 or float32"):
        linear.quant_linear(x.to(torch.int32), q, s, z, None, 64, 4, 32)
    with pytest.raises(KernelError, match="different devices"):
        linear.quant_linear(x, q, s.to("meta"), z, None, 64, 4, 32)
    w = torch.randn(16, 64)
    values, indices = compress(w, nm_mask(w.abs(), 2, 4), 2, 4)
    with pytest.raises(KernelError, match="not a multiple of m=3"):
        linear.nm_linear(x, *dev(values, indices), None, 64, 2, 3)
    with pytest.raises(KernelError, match="n must satisfy"):
        linear.nm_linear(x, *dev(values, indices), None, 64, 4, 4)
    with pytest.raises(KernelError, match=r"values must have shape \[16, 32\]"):
        linear.nm_linear(x, *dev(values[:, :30].contiguous(), indices), None, 64, 2, 4)


@pytest.mark.skipif(not INTERPRET, reason="interpreter-only limits")  # GPU runs: TRITON_INTERPRET=0
def test_interpreter_limits_are_clear_errors():
    pw = PackedWeight.from_float(torch.randn(16, 64), QuantFormat(4, 32, False))
    with pytest.raises(KernelError, match="no bfloat16"):
        linear.quant_linear(torch.randn(2, 64, dtype=torch.bfloat16), pw.qweight, pw.scales,
                            pw.zero_points, None, 64, 4, 32)
    with pytest.raises(KernelError, match="run on CUDA tensors"):
        from modelfold.kernels._runtime import check_device

        check_device("op", torch.zeros(1, device="meta"))
