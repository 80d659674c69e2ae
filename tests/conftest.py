"""Suite-wide set-up and the shared real-model fixtures.

The Triton kernels are tested in Triton's CPU interpreter: ``TRITON_INTERPRET=1`` must be set
before ``modelfold.kernels`` is imported (Triton fixes the mode when a kernel is defined). On a
GPU machine, run the suite with ``TRITON_INTERPRET=0`` to test the kernels on CUDA instead.

Real models are expensive, so they are loaded once per session and handed out as cheap copies:

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
