"""The Triton backend on the real SmolLM2-135M (slow): 2:4 sparse + int4 (every linear layer on
the ``nm_quant`` kernel) and int4 + LoRA, compiled under Triton's CPU interpreter, give the eager
model's logits and greedy tokens on real text.

Under the interpreter a full-depth forward takes tens of seconds, so these run on the real model's
first layers (``smollm2_short``): the kernels see the real weights and shapes of every layer type.
On a GPU machine (``TRITON_INTERPRET=0``) the same tests take the whole model (``FULL_DEPTH``).
"""

from __future__ import annotations

import os

import pytest
import torch

import modelfold
from tests.backends.test_triton_compile import randomize_adapters
from tests.conftest import SHORT_LAYERS, copy_of
from tests.helpers import QUIET

pytestmark = pytest.mark.slow

FULL_DEPTH = os.environ.get("TRITON_INTERPRET") == "0"
DEVICE = {} if not FULL_DEPTH else {"interpret": False}


@pytest.fixture
def model(smollm2_base, smollm2_short_base):
    return copy_of(smollm2_base if FULL_DEPTH else smollm2_short_base)


@pytest.fixture(scope="module")
def prompt_ids(smollm2_tokenizer):
    return smollm2_tokenizer("The history of the Roman Empire", return_tensors="pt").input_ids


def _compile(result):
    options = {"interpret": False} if FULL_DEPTH else {"interpret": True, "inductor": False}
    return modelfold.compile(result, backend="triton", **options)


def test_smollm2_sparse_int4_compiled(model, prompt_ids):
    result = modelfold.transform(
        model, "nm-sparsify{n=2,m=4,method=magnitude},quantize{bits=4,group_size=64}",
        context=QUIET)
    layers = 30 if FULL_DEPTH else SHORT_LAYERS
    compiled = _compile(result)
    assert compiled.summary().endswith(f": {7 * layers} nm_quant")
    with torch.no_grad():
        ref = result.module(input_ids=prompt_ids, use_cache=False).logits
    y = compiled.logits(prompt_ids).float().cpu()
    assert (y - ref).abs().max().item() <= (1e-4 if not FULL_DEPTH else 2e-2) * ref.abs().max().item()
    assert torch.equal(y.argmax(-1), ref.argmax(-1))


def test_smollm2_int4_lora_generates_the_eager_tokens(model, prompt_ids):
    result = modelfold.transform(model, "quantize{bits=4,group_size=128},"
                                        "lora{rank=8,targets=[q_proj,v_proj]}", context=QUIET)
    randomize_adapters(result.module, seed=3)
    with torch.no_grad():  # keep the adapters' effect small: SmolLM2 should stay coherent
        for name, p in result.module.named_parameters():
            if "lora_B" in name:
                p.mul_(0.05)
    compiled = _compile(result)
    assert "quant+lora(r=8, 1 adapter)" in compiled.kernels.values()
    out = compiled.generate(prompt_ids[0].tolist(), 4)
    with torch.no_grad():
        expect = result.module.generate(prompt_ids, max_new_tokens=4, do_sample=False)
    assert out["new_tokens"] == expect[0, prompt_ids.shape[1]:].tolist()
