"""The perplexity protocol: windows, BOS, every token scored once; an exact oracle."""

import math

import pytest
import torch

from modelfold.evaluate import eval_windows, evaluate, perplexity


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer):
    return smollm2_tokenizer


def test_windows_prepend_bos_and_cover_every_token_once(tokenizer):
    text = "Rome was founded, according to legend, in 753 BC. " * 30
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = eval_windows(tokenizer, text, window=64)
    assert len(windows) == math.ceil(len(ids) / 64)
    assert all(w[0].item() == tokenizer.bos_token_id for w in windows)
    assert torch.cat([w[1:] for w in windows]).tolist() == ids
    assert all(w.numel() == 65 for w in windows[:-1])


def test_uniform_model_has_perplexity_equal_to_vocabulary(tokenizer):
    windows = eval_windows(tokenizer, "The quick brown fox jumps over the lazy dog. " * 20,
                           window=32)
    vocab = len(tokenizer)
    result = perplexity(lambda ids: torch.zeros(*ids.shape, vocab), windows, progress=False)
    assert result["perplexity"] == pytest.approx(vocab, rel=1e-5)  # float32 log_softmax
    assert result["tokens"] == sum(w.numel() - 1 for w in windows)


def test_perfect_model_has_perplexity_one(tokenizer):
    windows = eval_windows(tokenizer, "one two three four five six seven " * 10, window=16)

    def oracle(ids):  # puts all mass on the true next token
        logits = torch.full((*ids.shape, 50000), -1e4)
        logits[:, :-1].scatter_(-1, ids[:, 1:].unsqueeze(-1), 1e4)
        return logits

    assert perplexity(oracle, windows, progress=False)["perplexity"] == pytest.approx(1.0)


@pytest.mark.parametrize("kwargs, message", [({"chars": 0}, "--chars must be >= 1"),
                                             ({"window": 1}, "window must be >= 2")])
def test_bad_arguments(tokenizer, kwargs, message):
    with pytest.raises(ValueError, match=message):
        evaluate(torch.nn.Identity(), tokenizer, "some text here", progress=False, **kwargs)


def test_large_vocabulary_evaluation_keeps_memory_bounded(tmp_path, tokenizer, eval_text):
    """A 262k vocabulary: [4, 513, V] float logits are 2.15 GB a batch, several copies before
    issue 17. Now batches shrink to fit MAX_LOGITS_BYTES and the loss is computed in chunks:
    `modelfold eval` of an artifact peaks under 3 GB (measured in a child process)."""
    import json
    import subprocess
    import sys

    import transformers as tf

    import modelfold

    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=262_144, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                            max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id)
    model_dir = tmp_path / "model"
    tf.LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    modelfold.export(modelfold.load(str(model_dir)), tmp_path / "artifact", parity=False)
    text = tmp_path / "text.txt"
    text.write_text(eval_text[:12_000])
    # the child's own peak: VmHWM belongs to its address space (ru_maxrss would also count the
    # parent's resident set at the fork, a pytest worker holding other tests' models)
    child = ("import json, sys\n"
             "from modelfold.cli import main\n"
             "code = main(sys.argv[1:])\n"
             "hwm = next(l for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
             "print(json.dumps({'peak_kib': int(hwm.split()[1])}), file=sys.stderr)\n"
             "sys.exit(code)\n")
    run = subprocess.run([sys.executable, "-c", child, "eval", str(tmp_path / "artifact"),
                          "--text", str(text), "--json"], capture_output=True, text=True,
                         check=True)
    peak_kib = json.loads(run.stderr.strip().splitlines()[-1])["peak_kib"]
    result = json.loads(run.stdout)
    assert result["batch_size"] == 1 and result["windows"] >= 4
    assert math.isfinite(result["perplexity"])
    assert peak_kib < 3 * 2**20, f"eval peaked at {peak_kib / 2**20:.2f} GiB"
