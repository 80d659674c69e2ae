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
