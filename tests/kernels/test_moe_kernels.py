"""The grouped routed-expert kernels (``modelfold.kernels.moe``) against the dialect ops'
references (``modelfold::moe`` / ``quant_moe``), under Triton's CPU interpreter: gated and dense
experts, every activation, expert biases, int4 experts with and without zero points, decode
(one token) and prefill shapes, forced small tiles (several row blocks per expert)."""

from __future__ import annotations

import pytest
import torch

from modelfold.ir.moe import moe as moe_ref
from modelfold.ir.moe import quant_moe as quant_moe_ref
from modelfold.ir.quant import PackedWeight, QuantFormat
from modelfold.kernels import ops
from modelfold.kernels._runtime import INTERPRET, KernelError
from modelfold.kernels.moe import routed_experts

DEVICE = "cpu" if INTERPRET else "cuda"
E, H, INTER = 4, 48, 40


def rel_err(y, ref):
    return ((y - ref).abs().max() / ref.abs().max()).item()


def experts(gated: bool, bias: bool, seed: int = 0, inter: int = INTER):
    gen = torch.Generator().manual_seed(seed)
    w1 = torch.randn(E, inter, H, generator=gen) * 0.2
    w3 = torch.randn(E, inter, H, generator=gen) * 0.2 if gated else None
    w2 = torch.randn(E, H, inter, generator=gen) * 0.2
    b1 = torch.randn(E, inter, generator=gen) * 0.1 if bias else None
    router = torch.randn(E, H, generator=gen)
    return router, w1, w3, w2, b1


@pytest.mark.parametrize("tokens", [1, 37])
@pytest.mark.parametrize("gated,activation,bias,weighting", [
    (True, "silu", False, "unit"), (True, "gelu_pytorch_tanh", False, "softmax"),
    (False, "gelu_new", True, "unit"), (False, "relu", True, "softmax"),
    (False, "gelu", False, "unit")])
def test_float_experts_match_the_op(tokens, gated, activation, bias, weighting):
    router, w1, w3, w2, b1 = experts(gated, bias)
    x = torch.randn(tokens, H, generator=torch.Generator().manual_seed(1))
    ref = moe_ref(x, router, w1, w3, w2, b1, 2, activation, weighting)
    args = [t.to(DEVICE) if isinstance(t, torch.Tensor) else t
            for t in (x, router, w1, w3, w2, b1)]
    y = ops.moe(*args, 2, activation, weighting).cpu()
    assert rel_err(y, ref) <= 1e-5


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("tokens", [1, 37])
def test_int4_experts_match_the_op(symmetric, tokens):
    router, w1, w3, w2, _ = experts(True, False, inter=32)  # whole blocks, as quant_moe takes
    fmt = QuantFormat(4, 16, symmetric)

    def stack(w):
        packs = [PackedWeight.from_float(w[e], fmt) for e in range(E)]
        q = torch.stack([p.qweight.reshape(p.qweight.shape[0], -1) for p in packs])
        s = torch.stack([p.scales for p in packs])
        z = None if symmetric else torch.stack([p.zero_points for p in packs])
        return q, s, z

    q1, s1, z1 = stack(w1)
    q3, s3, z3 = stack(w3)
    q2, s2, z2 = stack(w2)
    x = torch.randn(tokens, H, generator=torch.Generator().manual_seed(2))
    args = (x, router, q1, s1, z1, q3, s3, z3, q2, s2, z2)
    ref = quant_moe_ref(*args, 2, "silu", "unit", 4, 16)
    y = ops.quant_moe(*[t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in args],
                      2, "silu", "unit", 4, 16).cpu()
    assert rel_err(y, ref) <= 1e-5


def test_small_tiles_and_skewed_routing():
    """Several row blocks per expert and experts nobody chose; tiles smaller than the dims."""
    router, w1, w3, w2, _ = experts(True, False)
    router[0] += 5.0  # every token picks expert 0 first
    x = torch.randn(70, H, generator=torch.Generator().manual_seed(3))
    from modelfold.ir.moe import route

    weights, index = route(x @ router.T, 1, "unit")
    ref = moe_ref(x, router, w1, w3, w2, None, 1, "silu", "unit")
    y = routed_experts(*[t.to(DEVICE) for t in (x, weights, index, w1, w3, w2)], None, "silu",
                       config={"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}).cpu()
    assert rel_err(y, ref) <= 1e-5


def test_bad_inputs_are_refused():
    router, w1, w3, w2, _ = experts(True, False)
    x = torch.randn(3, H)
    weights, index = torch.ones(3, 2), torch.zeros(3, 2, dtype=torch.long)
    with pytest.raises(KernelError, match="activation"):
        routed_experts(x, weights, index, w1, w3, w2, None, "tanh")
    with pytest.raises(KernelError, match="w2"):
        routed_experts(x, weights, index, w1, w3, w2[:, :, :8], None, "silu")
