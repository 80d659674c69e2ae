"""How much a pass changed the model's function, measured on a fixed probe batch."""

from __future__ import annotations

import math

import torch


def probe_inputs(program, *, n_samples: int = 4, seq_len: int = 64, seed: int = 1234
                 ) -> tuple[torch.Tensor, str]:
    """A fixed probe batch ``[n, seq]`` and a description of where it came from.

    Real calibration text when the program has a tokenizer and the corpus is installed;
    otherwise seeded random token ids (tiny test models).
    """
    if program.tokenizer is not None:
        from modelfold.assets import AssetError
        from modelfold.corpus import calibration_batches

        try:
            ids = calibration_batches(program.tokenizer, n_samples=n_samples, seq_len=seq_len,
                                      seed=seed)
            return ids, f"{n_samples} x {seq_len} tokens of the calibration split (seed {seed})"
        except AssetError:
            pass
    vocab = program.module.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n_samples, seq_len), generator=gen)
    return ids, f"{n_samples} x {seq_len} random token ids (seed {seed})"


@torch.no_grad()
def compare(reference: torch.Tensor, output: torch.Tensor, *, logits: bool = True
            ) -> dict[str, float]:
    """Max abs difference and SQNR (dB); for logits also mean KL(ref || out) and top-1 agreement.

    Shapes: ``[B, S, V]`` (logits) or ``[B, S, D]`` (hidden states).
    """
    ref, out = reference.double(), output.double()
    noise = (ref - out).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    sqnr = math.inf if noise == 0 else 10 * math.log10(signal / noise)
    result = {"max_abs_diff": (ref - out).abs().max().item(), "sqnr_db": sqnr}
    if logits:
        log_p, log_q = ref.log_softmax(-1), out.log_softmax(-1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()  # mean over [B, S]
        result["kl"] = max(kl, 0.0)
        result["top1_agreement"] = (ref.argmax(-1) == out.argmax(-1)).double().mean().item()
    return result


def weight_error(weight: torch.Tensor, approx: torch.Tensor) -> float:
    """Relative squared error of an approximated weight: ``||W - W_q||^2 / ||W||^2``."""
    w = weight.detach().float()
    return float(((w - approx.float()) ** 2).sum() / (w ** 2).sum().clamp_min(1e-30))
