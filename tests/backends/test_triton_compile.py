"""``modelfold.compile(result, backend="triton")`` on tiny models, under Triton's CPU interpreter.

The main check: a tiny Llama with int4, N:M sparse, N:M sparse + int4 and LoRA (over float and
quantized bases) layers, compiled with ``torch.compile`` (Inductor) around the Triton kernels,
gives the eager model's logits and greedy tokens.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import modelfold
from modelfold.backends.triton.compile import TritonBackendError, compile_model, load_kernels
from modelfold.ir.graph import calls
from modelfold.ir.lora import LoraLinear
from tests.helpers import QUIET
from tests.tiny_models import tiny_model

MIXED = ("nm-sparsify{n=2,m=4,method=magnitude,targets=[*mlp*]},"
         "quantize{bits=4,group_size=16,targets=[*q_proj,*k_proj,*gate_proj,*down_proj]},"
         "lora{rank=4,targets=[q_proj,v_proj]}")


def randomize_adapters(module: nn.Module, seed: int = 0) -> None:
    """LoRA B starts at zero; give the adapters weight so that a missing update would show."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


@pytest.fixture(scope="module")
def mixed():
    result = modelfold.transform(tiny_model("llama", num_hidden_layers=2), MIXED, context=QUIET)
    randomize_adapters(result.module)
    return result


def greedy_matches_eager(compiled, module, prompt: list[int], new: int = 6) -> None:
    """Greedy decoding with the KV cache (prefill through GEMM, decode steps through GEMV)
    gives the eager model's tokens."""
    out = compiled.generate(prompt, new)
    with torch.no_grad():
        expect = module.generate(torch.tensor([prompt]), max_new_tokens=new,
                                 do_sample=False)[0, len(prompt):].tolist()
    assert out["new_tokens"] == expect


def logits_close(y: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-5) -> float:
    diff = (y - ref).abs().max().item()
    assert diff <= rtol * ref.abs().max().item() + 1e-6, f"max |diff| {diff:.2e}"
    return diff


@pytest.mark.slow
def test_compiled_tiny_llama_matches_eager(mixed):
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = mixed.module(input_ids=ids, use_cache=False).logits
    compiled = modelfold.compile(mixed, backend="triton", interpret=True)
    assert compiled.inductor and compiled.interpret and compiled.dtype == torch.float32
    counts = compiled.summary()
    assert "2 nm," in counts and "4 nm_quant" in counts and "2 quant," in counts
    assert "2 quant+lora" in counts and "2 dense+lora" in counts
    logits_close(compiled.logits(ids), ref)
    greedy_matches_eager(compiled, mixed.module, [5, 17, 3, 99])


def triton_ops(graph) -> list[str]:
    return [str(n.target) for n in calls(graph) if "modelfold" in str(n.target)]


def test_lowering_rewrites_the_programs_verified_graph(mixed):
    """float32 under the interpreter: the Program's own captured graph is lowered (no second
    capture); every dialect op becomes a modelfold_triton op, LoRA fused into its base."""
    program = mixed.program
    captures = program.captures
    compiled = compile_model(mixed, interpret=True, inductor=False)
    assert program.captures == captures + (0 if captures else 1)
    assert program.verified_graph is compiled.graph
    kernels = compiled.kernels
    assert kernels["model.layers.0.self_attn.q_proj"] == "quant+lora(r=4, 1 adapter)"
    assert kernels["model.layers.0.self_attn.v_proj"] == "dense+lora(r=4, 1 adapter)"
    assert kernels["model.layers.1.mlp.up_proj"] == "nm"
    assert kernels["model.layers.1.mlp.gate_proj"] == "nm_quant"
    assert "model.layers.0.self_attn.o_proj" not in kernels  # float: left to Inductor
    ops = triton_ops(compiled.graph)
    assert ops and all(op.startswith("modelfold_triton.") for op in ops)
    assert ops.count("modelfold_triton.lora_linear.default") == 2  # v_proj of both layers
    # the model and the Program's graph still run the dialect ops
    assert isinstance(mixed.module.model.layers[0].self_attn.q_proj, LoraLinear)
    assert program.dialect_ops()["modelfold::lora_delta"] == 4
    ids = torch.randint(0, 128, (1, 5))
    with torch.no_grad():
        logits_close(compiled.logits(ids), mixed.module(input_ids=ids, use_cache=False).logits)


def test_fp16_compile_under_the_interpreter(mixed):
    compiled = compile_model(mixed, interpret=True, inductor=False, dtype="float16")
    ids = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        ref = mixed.module(input_ids=ids, use_cache=False).logits
    y = compiled.logits(ids)
    assert y.dtype == torch.float16
    assert (y.float() - ref).abs().max().item() <= 2e-2 * ref.abs().max().item()


def test_tied_quantized_embedding_stays_shared():
    model = tiny_model("llama", num_hidden_layers=2, tie_word_embeddings=True)
    model.tie_weights()
    result = modelfold.transform(
        model, "quantize{bits=4,group_size=16,embeddings=true,lm_head=true}", context=QUIET)
    compiled = compile_model(result, interpret=True, inductor=False)
    assert compiled.kernels["model.embed_tokens"] == "quant_embedding"
    assert compiled.kernels["lm_head"] == "quant"
    embedding = next(n for n in calls(compiled.graph)
                     if str(n.target) == "modelfold_triton.quant_embedding.default")
    users = {str(u.target) for u in embedding.args[1].users}  # the packed table: stored once
    assert users == {"modelfold_triton.quant_embedding.default",
                     "modelfold_triton.quant_linear.default"}
    ids = torch.randint(0, 128, (2, 5))
    with torch.no_grad():
        logits_close(compiled.logits(ids), result.module(input_ids=ids, use_cache=False).logits)


def test_w8a8_base_with_lora_and_several_adapters():
    model = tiny_model("llama", num_hidden_layers=2)
    pipeline = ("smooth-quant{corpus=random,n_samples=8,seq_len=32},lora{rank=2,targets=[q_proj]},"
                "lora{rank=3,targets=[q_proj,o_proj],name=second}")
    result = modelfold.transform(model, pipeline, context=QUIET)
    randomize_adapters(result.module)
    compiled = compile_model(result, interpret=True, inductor=False)
    # two adapters, one concatenated pair of rank 2 + 3
    assert compiled.kernels["model.layers.0.self_attn.q_proj"] == "w8a8+lora(r=5, 2 adapters)"
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        logits_close(compiled.logits(ids), result.module(input_ids=ids, use_cache=False).logits)


def test_gpt2_conv1d_lora_is_fused():
    result = modelfold.transform(tiny_model("gpt2"), "lora{rank=4,targets=[c_attn,c_fc]}",
                                 context=QUIET)
    randomize_adapters(result.module)
    compiled = compile_model(result, interpret=True, inductor=False)
    assert compiled.kernels["transformer.h.0.attn.c_attn"] == "dense+lora(r=4, 1 adapter)"
    ids = torch.randint(0, 128, (2, 6))
    with torch.no_grad():
        logits_close(compiled.logits(ids), result.module(input_ids=ids, use_cache=False).logits)


def test_clear_errors():
    with pytest.raises(TritonBackendError, match="needs an NVIDIA GPU with CUDA"):
        load_kernels(interpret=False)
    with pytest.raises(ValueError, match="compile supports backend='triton'"):
        modelfold.compile(nn.Linear(2, 2), backend="onnxruntime")
    with pytest.raises(TritonBackendError, match="TransformResult, Program or nn.Module"):
        compile_model("not a model", interpret=True)
    with pytest.raises(TritonBackendError, match="use device='cpu'"):
        compile_model(nn.Linear(2, 2), interpret=True, device="cuda")
    with pytest.raises(TritonBackendError, match="has no bfloat16"):
        compile_model(nn.Linear(2, 2), interpret=True, dtype=torch.bfloat16)
    from modelfold.artifact import ArtifactError

    with pytest.raises(ArtifactError, match="modelfold.compile"):
        modelfold.export(tiny_model("llama", num_hidden_layers=1), "/tmp/never-written",
                         backend="triton")


@pytest.mark.slow
def test_shared_attention_compiles():
    """A model whose layers share attention (KV sharing, fused: the borrowers are
    modelfold::attend on SDPA) gives the eager model's logits and greedy tokens."""
    result = modelfold.transform(tiny_model("llama", num_hidden_layers=4, fusable=True),
                                 "share-attention{mode=kv,groups=[[0,1],[2,3]]},fuse-attention",
                                 context=QUIET)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = result.module(input_ids=ids, use_cache=False).logits
    compiled = modelfold.compile(result, backend="triton", interpret=True)
    assert "modelfold_triton.attend.default" in triton_ops(compiled.graph)
    logits_close(compiled.logits(ids), ref)
    greedy_matches_eager(compiled, result.module, [5, 17, 3, 99])


def test_mixture_of_experts_compiles():
    """A moefy model (layer 0's experts int4: modelfold::quant_moe; layer 1's float:
    modelfold::moe) runs its routed experts on the grouped kernels and gives the eager model's
    logits and greedy tokens."""
    result = modelfold.transform(
        tiny_model("llama", num_hidden_layers=2),
        "moefy{experts=4,top_k=2,corpus=random,seq_len=32,n_samples=4},"
        "quantize{bits=4,group_size=16,targets=[*layers.0.mlp.experts*]}", context=QUIET)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = result.module(input_ids=ids, use_cache=False).logits
    compiled = modelfold.compile(result, backend="triton", interpret=True)
    ops = triton_ops(compiled.graph)
    assert {"modelfold_triton.moe.default", "modelfold_triton.quant_moe.default"} <= set(ops)
    logits_close(compiled.logits(ids), ref)
    greedy_matches_eager(compiled, result.module, [5, 17, 3, 99])
