"""The shared calibration facility: one set of options and the token batches for every pass
that needs activations (layer-importance, GPTQ / AWQ, SmoothQuant, Wanda / SparseGPT, LoRA-SB).

A calibrating pass's config derives from ``CalibrationConfig`` and so has the options
``corpus``, ``n_samples``, ``seq_len``, ``batch_size`` and ``seed`` with one meaning and one
validation everywhere; a pass that wants other defaults redeclares the field with
``calibration_option(name, default)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from modelfold.errors import OptionError
from modelfold.ir.program import Program
from modelfold.options import option
from modelfold.passes.base import PassConfig, PreconditionError

_HELP = {
    "corpus": "calibration corpus ('random': seeded random token ids, for models without text)",
    "n_samples": "calibration sequences",
    "seq_len": "tokens per calibration sequence",
    "batch_size": "sequences per forward pass during calibration",
    "seed": "calibration sampling seed",
}


def calibration_option(name: str, default: Any) -> Any:
    """The field of calibration option ``name`` with another default (same help text)."""
    return option(default, _HELP[name])


@dataclass(frozen=True)
class CalibrationConfig(PassConfig):
    """Options shared by every calibrating pass."""

    trailing = ("corpus", "n_samples", "seq_len", "batch_size", "seed")

    corpus: str = calibration_option("corpus", "wikipedia")
    n_samples: int = calibration_option("n_samples", 128)
    seq_len: int = calibration_option("seq_len", 512)
    batch_size: int = calibration_option("batch_size", 8)
    seed: int = calibration_option("seed", 0)

    def __post_init__(self) -> None:
        super().__post_init__()
        where = self.label or type(self).__name__
        for name, low in (("n_samples", 1), ("seq_len", 2), ("batch_size", 1)):
            if getattr(self, name) < low:
                raise OptionError(f"{where} option '{name}' must be >= {low}; "
                                  f"got {getattr(self, name)}")
        from modelfold.corpus import check_corpus_option

        check_corpus_option(self.corpus, f"{where} option 'corpus'")

    def require_text(self, program: Program, why: str) -> None:
        """``PreconditionError`` when calibration text is needed and the program has no
        tokenizer (``why``: what the pass does with it)."""
        if self.corpus != "random" and program.tokenizer is None:
            raise PreconditionError(
                f"{why} and needs a tokenizer; load the model with its tokenizer "
                "(modelfold.load), or use corpus=random (tiny test models)")

    def calibration_ids(self, program: Program, *, n_samples: int | None = None
                        ) -> torch.Tensor:
        """Token ids ``[n_samples, seq_len]`` from the corpus's calibration split."""
        return calibration_batches(program, corpus=self.corpus,
                                   n_samples=n_samples or self.n_samples, seq_len=self.seq_len,
                                   seed=self.seed)

    def calibration_facts(self, ids: torch.Tensor) -> dict[str, Any]:
        """What the report records about the calibration data."""
        return {"corpus": self.corpus, "sequences": int(ids.shape[0]),
                "tokens_per_sequence": int(ids.shape[1])}

    def batches(self, ids: torch.Tensor) -> list[torch.Tensor]:
        """``ids`` cut into forward-pass batches of ``batch_size`` sequences."""
        return [ids[i:i + self.batch_size] for i in range(0, len(ids), self.batch_size)]


def calibration_batches(program: Program, *, corpus: str, n_samples: int, seq_len: int,
                        seed: int) -> torch.Tensor:
    """Token ids ``[n_samples, seq_len]`` drawn from ``corpus``'s calibration split.

    ``corpus="random"`` gives seeded uniform token ids instead (for tiny test models that have
    no tokenizer; the numbers it produces mean nothing about real text).
    """
    if corpus == "random":
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(0, program.module.config.vocab_size, (n_samples, seq_len),
                             generator=gen)
    if program.tokenizer is None:
        raise PreconditionError(
            "calibration needs a tokenizer: load the model with its tokenizer (modelfold.load), "
            "or pass corpus=random for a model without one")
    from modelfold.corpus import calibration_batches as corpus_batches

    return corpus_batches(program.tokenizer, n_samples=n_samples, seq_len=seq_len, seed=seed,
                          corpus=corpus)


__all__ = ["CalibrationConfig", "calibration_batches", "calibration_option"]
