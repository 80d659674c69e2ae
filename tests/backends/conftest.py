"""Fixtures for the backend tests (the tiny random models live in ort_tiny_models.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelfold import assets


def _installed_asset(name: str) -> Path:
    # `make test` pulls the assets first; a direct pytest run installs what is missing
    return assets.pull([name], progress=False)[name]


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct directory (a plain transformers checkpoint + tokenizer)."""
    return _installed_asset("smollm2-135m")


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 BERT encoder directory."""
    return _installed_asset("minilm-l6")
