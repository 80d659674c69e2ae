"""The Triton backend on the real SmolLM2-135M (slow): 2:4 sparse + int4 (every one of its 210
linear layers on the ``nm_quant`` kernel) and int4 + LoRA, compiled under Triton's CPU
interpreter, give the eager model's logits and greedy tokens on real text."""

from __future__ import annotations

import pytest
import torch

import modelfold
from modelfold.passes.manager import PassContext
from tests.backends.test_triton_compile import randomize_adapters

pytestmark = pytest.mark.slow

QUIET = PassContext(log=None, verify=False, measure=False)


@pytest.fixture(scope="module")
def prompt_ids():
    program = modelfold.load("smollm2-135m")
    return program.tokenizer("The history of the Roman Empire", return_tensors="pt").input_ids


def test_smollm2_sparse_int4_compiled(prompt_ids):
    result = modelfold.transform(
        "smollm2-135m", "nm-sparsify{n=2,m=4,method=magnitude},quantize{bits=4,group_size=64}",
        context=QUIET)
    compiled = modelfold.compile(result, backend="triton", interpret=True, inductor=False)
    assert compiled.summary().endswith(": 210 nm_quant")
    with torch.no_grad():
        ref = result.module(input_ids=prompt_ids, use_cache=False).logits
    y = compiled.logits(prompt_ids)
    assert (y - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()
    assert torch.equal(y.argmax(-1), ref.argmax(-1))


def test_smollm2_int4_lora_generates_the_eager_tokens(prompt_ids):
    result = modelfold.transform("smollm2-135m",
                                 "quantize{bits=4,group_size=128},lora{rank=8,targets=[q_proj,v_proj]}",
                                 context=QUIET)
    randomize_adapters(result.module, seed=3)
    with torch.no_grad():  # keep the adapters' effect small: SmolLM2 should stay coherent
        for name, p in result.module.named_parameters():
            if "lora_B" in name:
                p.mul_(0.05)
    compiled = modelfold.compile(result, backend="triton", interpret=True, inductor=False)
    out = compiled.generate(prompt_ids[0].tolist(), 2)
    with torch.no_grad():
        expect = result.module.generate(prompt_ids, max_new_tokens=2, do_sample=False)
    assert out["new_tokens"] == expect[0, prompt_ids.shape[1]:].tolist()
