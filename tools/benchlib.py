"""Shared helpers of the benchmark scripts: results.json accumulation and eager perplexity."""

from __future__ import annotations

import json
from pathlib import Path

from modelfold.corpus import corpus_text
from modelfold.evaluate import evaluate


def load_results(out: Path) -> dict:
    path = out / "results.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def save_results(out: Path, results: dict) -> Path:
    """Write ``out``/results.json (through a temporary file: an interrupted run keeps the old one)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(path)
    return path


def eager_ppl(module, tokenizer, chars: int) -> float:
    """Perplexity on the first ``chars`` characters of the wikipedia evaluation split."""
    text = corpus_text("wikipedia", "evaluation")
    return evaluate(module, tokenizer, text, chars=chars, progress=False)["perplexity"]
