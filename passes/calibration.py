"""The shared calibration facility: token batches for every pass that needs activations."""

from __future__ import annotations

import torch

from modelfold.ir.program import Program
from modelfold.passes.base import PreconditionError


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
