"""Suite-wide set-up and the shared real-model fixtures.

The Triton kernels are tested in Triton's CPU interpreter: ``TRITON_INTERPRET=1`` must be set
before ``modelfold.kernels`` is imported (Triton fixes the mode when a kernel is defined). On a
GPU machine, run the suite with ``TRITON_INTERPRET=0`` to test the kernels on CUDA instead.

`make test` runs the suite in two workers (pytest-xdist, one file per worker at a time, one
thread each). Real models are expensive, so they are loaded once per session (per worker) and
handed out as cheap copies:

- ``smollm2_base``: SmolLM2-135M as a ``Program``, loaded once. Never change it; take
  ``smollm2`` (a fresh copy per test, ~0.2 s) or ``copy_of(smollm2_base)``.
- ``smollm2_short``: a copy of the real model cut to its first ``SHORT_LAYERS`` layers, for tests
  where depth is not what is tested (kernels, lowerings, artifacts).
- ``smollm2_tokenizer``: the tokenizer alone (no model load).
- ``smollm2_artifact``: the one full-depth fp32 SmolLM2 export, shared by the tests that only
  read it.
- ``eval_text``: the wikipedia evaluation split.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers on two cores: one thread each, or torch and ONNX Runtime
    # oversubscribe the machine (set before torch is imported, so its OpenMP pool is sized once)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

SHORT_LAYERS = 4


def _installed_asset(name: str) -> Path:
    from modelfold import assets

    # `make test` pulls the assets first; a direct pytest run installs what is missing
    return assets.pull([name], progress=False)[name]


def copy_of(program):
    """A copy of a Program that a test may change (module deep-copied, tokenizer shared)."""
    return program.converted()


def shortened(program, layers: int):
    """A copy of ``program`` keeping only its first ``layers`` decoder layers (then the final
    norm and the head): the real weights, less depth."""
    from modelfold.ir.program import Program
    from modelfold.passes.drop_layers import remove_layers

    module = copy_of(program).module
    remove_layers(module, program.arch.layers, list(range(layers, program.arch.num_layers)))
    return Program(module, tokenizer=program.tokenizer, source=program.source)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct directory (a plain transformers checkpoint + tokenizer)."""
    return _installed_asset("smollm2-135m")


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 BERT encoder directory."""
    return _installed_asset("minilm-l6")


@pytest.fixture(scope="session")
def smollm2_base(smollm2_dir):
    """SmolLM2-135M as a Program, loaded once per session: do not change it."""
    import modelfold

    return modelfold.load(str(smollm2_dir))


@pytest.fixture
def smollm2(smollm2_base):
    """A fresh copy of SmolLM2-135M for one test."""
    return copy_of(smollm2_base)


@pytest.fixture(scope="session")
def smollm2_short_base(smollm2_base):
    return shortened(smollm2_base, SHORT_LAYERS)


@pytest.fixture
def smollm2_short(smollm2_short_base):
    """A fresh copy of SmolLM2-135M cut to its first SHORT_LAYERS layers."""
    return copy_of(smollm2_short_base)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def eval_text() -> str:
    from modelfold.corpus import corpus_text

    _installed_asset("wikipedia")
    return corpus_text("wikipedia", "evaluation")


@pytest.fixture(scope="session")
def smollm2_artifact(smollm2_base, tmp_path_factory):
    """``(folder, manifest)`` of the one full-depth fp32 SmolLM2 artifact (read it, don't change
    it)."""
    import modelfold

    out = tmp_path_factory.mktemp("smollm2") / "artifact"
    manifest = modelfold.export(smollm2_base, out)
    return out, manifest


CLI_PIPELINE = "layer-importance{n_samples=4,seq_len=32},drop-layers{count=1}"


@pytest.fixture(scope="session")
def small_model_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    """A 3-layer random Llama with SmolLM2's real tokenizer and vocabulary, saved to disk (a
    model folder for CLI tests)."""
    import torch
    import transformers as tf

    tokenizer = smollm2_tokenizer
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=1024, tie_word_embeddings=True,
                            bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id)
    path = tmp_path_factory.mktemp("models") / "small-llama"
    tf.LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def artifact(small_model_dir, tmp_path_factory) -> Path:
    """``modelfold convert`` of the small model (CLI_PIPELINE): an artifact folder to read."""
    from modelfold.cli import main

    out = tmp_path_factory.mktemp("artifacts") / "small"
    assert main(["convert", str(small_model_dir), "-p", CLI_PIPELINE, "-o", str(out)]) == 0
    return out
