"""share-attention (EchoAtt score sharing, CLA/MLKV KV sharing) and attention-similarity on tiny
models of every family: the eager model, its cache, the captured and fused graph, the ONNX
artifact (parity, generation, KV-cache inputs), checkpoints, composition and the errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import DynamicCache

import modelfold
from modelfold.backends.onnxruntime.export import check_parity, export_onnx
from modelfold.backends.onnxruntime.runtime import OnnxCausalLM
from modelfold.checkpoint import load_checkpoint, save_checkpoint
from modelfold.errors import OptionError
from modelfold.ir.program import Program
from modelfold.ir.shared_attention import Borrowed, sharing_of
from modelfold.passes.base import PreconditionError
from modelfold.passes.calibration import calibration_batches
from modelfold.passes.registry import get_pass
from modelfold.passes.report import write_report
from modelfold.passes.share_attention import ShareAttention, _by_cost, _stride
from tests.conftest import copy_of
from tests.helpers import QUIET
from tests.tiny_models import tiny_model

FAMILIES = ["llama", "qwen2", "mistral", "gemma", "gemma2", "gemma3_text", "phi", "mixtral",
            "opt"]
# Gemma 2/3 alternate sliding-window and global layers: only every other layer can share.
GROUPS = {"gemma2": "[[0,2]]", "gemma3_text": "[[0,2]]"}


def shared(family: str, mode: str, groups: str | None = None, **options):
    model = tiny_model(family, layers=4, fusable=True)
    program = Program(model)
    groups = groups or GROUPS.get(family, "[[1,2,3]]")
    get_pass("share-attention")(mode=mode, groups=groups, **options).run(program)
    return program


def ids(batch=2, length=7, seed=0):
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mode", ["kv", "scores"])
@pytest.mark.parametrize("family", FAMILIES)
def test_eager_cache_graph_and_fused_graph_agree(family, mode):
    """The eager model decodes with a cache holding only what the layers keep (owners: keys and
    values; score borrowers: values, keys of width 0; KV borrowers: nothing), greedy decoding
    with the cache equals recomputing without it, the captured graph equals eager, and so does
    the fused graph, where the borrowers are modelfold::attend ops over the owner's cache (an
    independent reference of the sharing: its numbers come from the op, not the model)."""
    program = shared(family, mode)
    sharing = sharing_of(program.module)
    borrower = sharing.borrowers[0]
    cache = DynamicCache()
    program.module(input_ids=ids(1), past_key_values=cache, use_cache=True)
    layer = cache.layers[borrower] if borrower < len(cache.layers) else None
    if mode == "kv":  # no entry, or one never filled
        assert getattr(layer, "keys", None) is None
    else:
        assert layer.keys.shape[-1] == 0 and layer.values.shape[-2] == 7
    prompt = ids(1, 5)
    out = program.module.generate(prompt, max_new_tokens=5, do_sample=False, min_new_tokens=5)
    full = program.module(out, use_cache=False).logits
    assert torch.equal(full[0, 4:-1].argmax(-1), out[0, 5:])

    eager = program.module_logits(ids())
    assert torch.allclose(program.graph_logits(ids()), eager, atol=1e-5)
    details = get_pass("fuse-attention")().run(program)
    assert details["shared"]["borrowers"] == sharing.borrowers
    ops = program.dialect_ops()
    assert ops["modelfold::attend"] == len(sharing.borrowers)
    assert ops["modelfold::cache_write"] == (len(sharing.borrowers) if mode == "scores" else 0)
    assert torch.allclose(program.graph_logits(ids()), eager, atol=1e-5)


@pytest.mark.parametrize("mode", ["kv", "scores"])
def test_parameters_and_cache_entries(mode):
    program = shared("llama", mode, "[[0,1],[2,3]]")
    layers = program.module.model.layers
    dropped = ("k_proj", "v_proj") if mode == "kv" else ("q_proj", "k_proj")
    for i in (1, 3):
        for name in dropped:
            proj = getattr(layers[i].self_attn, name)
            assert isinstance(proj, Borrowed) and not list(proj.parameters())
    cache = program.signature.cache
    kept = [("key", "value"), (), ("key", "value"), ()] if mode == "kv" else \
        [("key", "value"), ("value",), ("key", "value"), ("value",)]
    assert [cache.layer_kinds(i) for i in range(4)] == kept
    assert cache.bytes_per_token == sum(map(len, kept)) * cache.num_kv_heads * cache.head_dim * 4
    assert program.signature.inputs[3:] == tuple(f"past_key_values.{i}.{k}" for i in range(4)
                                                 for k in kept[i])
    # uptraining trains the attention of the layers that share, nothing else
    trainable = {n for n, p in program.module.named_parameters() if p.requires_grad}
    assert trainable and all(".self_attn." in n for n in trainable)


@pytest.mark.parametrize("mode", ["kv", "scores"])
def test_onnx_artifact_parity_generation_and_cache(mode, tmp_path):
    """The artifact's past inputs are the owners' keys/values (and score borrowers' values):
    KV sharing half the layers halves the cache bytes per token exactly; prefill and decode
    match torch, and generation (IO-bound shared buffers, right padding, a batch) equals
    transformers' generate."""
    program = shared("llama", mode, "[[0,1],[2,3]]")
    facts = export_onnx(program, tmp_path, parity=False)
    past = [n for n in facts["inputs"] if n.startswith("past_key_values.")]
    assert past == list(program.signature.inputs[3:])
    per_token = facts["kv_cache_bytes_per_token"]
    if mode == "kv":
        assert past == ["past_key_values.0.key", "past_key_values.0.value",
                        "past_key_values.2.key", "past_key_values.2.value"]
        assert per_token["artifact"] * 2 == per_token["without_sharing"]
    assert facts["attention_sharing"] == {"mode": mode, "groups": [[0, 1], [2, 3]]}
    assert facts["onnx_nodes"]["com.microsoft.GroupQueryAttention"] == 2
    assert facts["attention"]["shared"]["borrowers"] == [1, 3]
    parity = check_parity(program.module, tmp_path, decode_steps=6)
    assert parity["prefill_max_abs_diff"] <= 1e-4 and parity["decode_max_abs_diff"] <= 1e-4
    lm = OnnxCausalLM(tmp_path)
    assert lm.past_names == past and lm.padding == "right"
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    out = lm.generate(prompts, max_new_tokens=8)["new_tokens"]
    for prompt, new in zip(prompts, out):
        expect = program.module.generate(torch.tensor([prompt]), max_new_tokens=8,
                                         min_new_tokens=8, do_sample=False)[0, len(prompt):]
        assert list(new) == expect.tolist()


@pytest.mark.parametrize("mode", ["kv", "scores"])
def test_gpt2_packed_projection(mode, tmp_path):
    """GPT-2's packed c_attn: a borrower keeps only its part (PartialQKV); the model is exported
    with its captured attention (fuse-attention does not split a packed projection and says so),
    left padding, parity, and a checkpoint round trip."""
    from modelfold.ir.shared_attention import PartialQKV

    program = shared("gpt2", mode)
    c_attn = program.module.transformer.h[2].attn.c_attn
    assert isinstance(c_attn, PartialQKV) and c_attn.weight.shape == (32, 32)
    prompt = ids(1, 5)
    out = program.module.generate(prompt, max_new_tokens=5, do_sample=False, min_new_tokens=5)
    assert torch.equal(program.module(out, use_cache=False).logits[0, 4:-1].argmax(-1), out[0, 5:])
    (tmp_path / "art").mkdir()
    facts = export_onnx(program, tmp_path / "art", parity=False)
    assert "packed q/k/v" in json.dumps(facts)
    parity = check_parity(program.module, tmp_path / "art", decode_steps=4)
    assert parity["decode_max_abs_diff"] <= 1e-4 and OnnxCausalLM(tmp_path / "art").padding == "left"
    save_checkpoint(program, tmp_path / "ckpt")
    assert torch.equal(load_checkpoint(tmp_path / "ckpt").module_logits(ids()),
                       program.module_logits(ids()))


def test_unfused_artifact_left_padding(tmp_path):
    program = shared("gemma3_text", "scores")
    export_onnx(program, tmp_path, parity=False,
                disable=("fuse-attention", "fuse-projections", "fuse-norms"))
    parity = check_parity(program.module, tmp_path, decode_steps=4)
    assert parity["decode_max_abs_diff"] <= 1e-4 and OnnxCausalLM(tmp_path).padding == "left"


def test_checkpoint_round_trip_and_copies(tmp_path):
    program = shared("gemma3_text", "scores")  # tied q/k norms, Borrowed modules
    expect = program.module_logits(ids())
    save_checkpoint(program, tmp_path / "ckpt")
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert sharing_of(loaded.module) == sharing_of(program.module)
    assert torch.equal(loaded.module_logits(ids()), expect)
    twin = Program(copy.deepcopy(program.module))  # the copy's borrowers read the copy's owner
    with torch.no_grad():
        for p in program.module.parameters():
            p.add_(1.0)
    assert torch.equal(twin.module_logits(ids()), expect)


def test_composes_with_quantize_and_lora(tmp_path):
    result = modelfold.transform(
        tiny_model("llama", layers=4, fusable=True),
        "share-attention{mode=kv,count=2,strategy=stride},quantize{bits=4,group_size=16},"
        "lora{rank=4,targets=[q_proj,o_proj]}", context=QUIET)
    kinds = result.program.signature.cache.kinds
    assert kinds[1] == () and kinds[3] == ()
    facts = export_onnx(result.program, tmp_path, parity=False, lora="merge")
    assert facts["onnx_nodes"].get("com.microsoft.MatMulNBits", 0) > 0
    parity = check_parity(result.module, tmp_path, decode_steps=3)
    assert parity["top1_agreement"] == 1.0


def test_init_average_is_mlkvs_running_pairwise_average():
    model = tiny_model("llama", layers=4)
    w = [model.model.layers[i].self_attn.k_proj.weight.detach().clone() for i in (1, 2, 3)]
    program = Program(model)
    get_pass("share-attention")(mode="kv", groups="[[1,2,3]]", init="average").run(program)
    expect = ((w[0] + w[1]) / 2 + w[2]) / 2
    assert torch.allclose(program.module.model.layers[1].self_attn.k_proj.weight, expect)


def test_count_strategies():
    classes = [[0, 1, 2, 3, 4, 5]]
    assert _stride(classes, 3) == {1, 3, 5}  # CLA2: every other layer
    assert _stride(classes, 2) == {2, 5}
    assert _stride([[0, 2, 4], [1, 3, 5]], 2) == {4, 5}
    # measured costs (KL) of b borrowing from o: 2 from 1 and 5 from 4 are cheap; 3 borrowing
    # from 1 (when 2 borrows too) is not measured (-1), so 2 and 3 never borrow together
    cost = torch.full((6, 6), 5.0)
    cost[1, 2], cost[4, 5], cost[3, 4], cost[0, 1] = 0.1, 0.2, 0.3, 0.4
    cost[1, 3] = -1.0
    assert _by_cost(classes, 2, cost.tolist()) == {2, 5}
    assert _by_cost(classes, 3, cost.tolist()) == {2, 4, 5}  # 4 then reads 3, 5 reads 3 too
    program = Program(tiny_model("llama", layers=6))
    picked = ShareAttention(mode="kv", count=2, strategy="random", seed=3).choose(program)
    again = ShareAttention(mode="kv", count=2, strategy="random", seed=3).choose(program)
    assert picked == again and sum(len(g) - 1 for g in picked) == 2


def test_similarity_analysis_and_strategy(tmp_path):
    result = modelfold.transform(
        tiny_model("llama", layers=4),
        "attention-similarity{corpus=random,n_samples=2,seq_len=16},"
        "share-attention{mode=kv,count=1}", context=QUIET)
    write_report(result.program, tmp_path, pipeline="attention-similarity,share-attention")
    analysis = result.program.log[0].details
    for kind in ("maps", "keys", "values", "kv"):
        matrix = torch.tensor(analysis[kind])
        assert matrix.shape == (4, 4) and torch.allclose(matrix.diagonal(), torch.ones(4))
        assert torch.allclose(matrix, matrix.T, atol=1e-6)
    kl = torch.tensor(analysis["kv_kl"])  # measured for every earlier layer (distance <= 8)
    below = torch.ones(4, 4, dtype=torch.bool).tril(-1)
    assert (kl.triu(1) > 0).sum() == 6 and (kl[below] == -1).all()
    assert (torch.tensor(analysis["scores_kl"]).triu(1) >= 0).all()
    details = result.program.log[1].details
    borrower = details["borrowers"][0]
    owner = next(g[0] for g in details["groups"] if borrower in g)
    best = min((kl[i - 1, i].item(), i) for i in range(1, 4))  # one borrower: the cheapest pair
    assert (kl[owner, borrower].item(), borrower) == best
    # the measurement is what sharing that pair does: the KL of the shared model itself
    original = Program(tiny_model("llama", layers=4))
    probe = calibration_batches(original, corpus="random", n_samples=2, seq_len=16, seed=0)
    alone = copy_of(original)
    get_pass("share-attention")(mode="kv", groups=f"[[{owner},{borrower}]]").run(alone)
    ref = original.module_logits(probe).log_softmax(-1)
    got = alone.module_logits(probe).log_softmax(-1)
    assert (ref.exp() * (ref - got)).sum(-1).mean().item() == pytest.approx(
        kl[owner, borrower].item(), rel=1e-4)
    assert [p.name for p in tmp_path.glob("*.png")] and \
        "attention-similarity" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize("options, match", [
    ({"mode": "kv"}, "needs 'groups'"),
    ({"mode": "kv", "groups": "[[1,2]]", "count": 1}, "either 'groups' or 'count'"),
    ({"mode": "kv", "groups": "[[2,1]]"}, "increasing order"),
    ({"mode": "kv", "groups": "[[1,2],[2,3]]"}, "more than one group"),
    ({"mode": "kv", "groups": "[1,2]"}, "list of layer lists"),
    ({"mode": "both", "groups": "[[1,2]]"}, "one of scores, kv"),
])
def test_option_errors(options, match):
    with pytest.raises(OptionError, match=match):
        ShareAttention(**options)


def test_precondition_errors():
    gemma3 = Program(tiny_model("gemma3_text", layers=4))
    with pytest.raises(PreconditionError, match=r"layers that can be grouped: \[0, 2\]"):
        ShareAttention(mode="kv", groups="[[0,1]]").requires(gemma3)
    with pytest.raises(PreconditionError, match="init=average is not built"):
        ShareAttention(mode="kv", groups="[[0,1]]", init="average").requires(
            Program(tiny_model("gpt2")))
    llama = Program(tiny_model("llama", layers=4))
    with pytest.raises(PreconditionError, match="has layers 0..3"):
        ShareAttention(mode="kv", groups="[[2,4]]").requires(llama)
    with pytest.raises(PreconditionError, match="needs the attention-similarity analysis"):
        ShareAttention(mode="kv", count=1).requires(llama)
    with pytest.raises(PreconditionError, match="only 3 layers"):
        ShareAttention(mode="kv", count=4, strategy="stride").choose(llama)
    quantized = modelfold.transform(tiny_model("llama", layers=4), "quantize{bits=4,group_size=16}",
                                    context=QUIET)
    with pytest.raises(PreconditionError, match="share attention first"):
        ShareAttention(mode="kv", groups="[[0,1]]").requires(quantized.program)
    program = shared("llama", "kv")
    with pytest.raises(PreconditionError, match="already shares"):
        ShareAttention(mode="kv", groups="[[0,1]]").requires(program)
    with pytest.raises(PreconditionError, match="quantize-kv does not support attention shared"):
        get_pass("quantize-kv")(corpus="random").requires(program)


def test_nothing_shared_is_exact():
    result = modelfold.transform(tiny_model("llama", layers=4), "share-attention{count=0}",
                                 context=QUIET)
    assert result.program.log[0].kind == "exact" and sharing_of(result.module) is None
