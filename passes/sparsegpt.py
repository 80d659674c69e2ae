"""N:M pruning of one weight matrix: magnitude, Wanda and SparseGPT.

- magnitude: keep the ``n`` largest ``|w|`` of every group of ``m`` input columns.
- Wanda (Sun et al., ICLR 2024; locuslab/wanda): score ``|W_ij| * ||X_j||_2``; the column norms
  are ``sqrt(diag(X^T X))``, read off the same Hessian accumulator SparseGPT uses (a constant
  factor does not change the ranking). No weight is updated.
- SparseGPT (Frantar & Alistarh, ICML 2023; IST-DASLab/sparsegpt): the OBS loop of GPTQ with
  pruning instead of rounding. At every column ``i`` with ``i % m == 0`` the next ``m`` columns are
  scored by ``w^2 / [H^-1]_jj^2`` (the error-updated weights) and the ``m - n`` lowest per row are
  pruned; each column's error ``(w - q) / [H^-1]_ii`` is pushed onto the later columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from modelfold.ir.sparse import nm_mask
from modelfold.passes.gptq import _inverse_cholesky_upper


@dataclass
class PruneResult:
    weight: torch.Tensor  # [N, K] with zeros at the pruned positions
    keep: torch.Tensor  # bool [N, K]: exactly n of every m
    output_error: float | None  # tr(E H E^T) / tr(W H W^T); None without a Hessian
    magnitude_output_error: float | None  # the same for magnitude pruning, for comparison


def prune_magnitude(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep mask of magnitude pruning."""
    return nm_mask(weight.abs(), n, m)


def prune_wanda(weight: torch.Tensor, hessian: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep mask of Wanda: ``|W| * ||X_j||``."""
    norms = torch.sqrt(torch.diag(hessian).clamp_min(0)).float()
    return nm_mask(weight.abs().float() * norms.unsqueeze(0), n, m)


def prune_sparsegpt(weight: torch.Tensor, hessian: torch.Tensor, n: int, m: int, *,
                    damp: float = 0.01, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pruned weight, keep mask)`` by SparseGPT. ``block`` is rounded up to a multiple of m."""
    W = weight.detach().float().clone()
    rows, k = W.shape
    H = hessian.clone().float()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(k)
    Hinv = _inverse_cholesky_upper(H)
    block = -(-block // m) * m
    prune = torch.zeros(rows, k, dtype=torch.bool)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        P1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if i % m == 0:
                score = W1[:, i:i + m] ** 2 / d[i:i + m].unsqueeze(0) ** 2
                # prune the m - n lowest = keep the n highest (same tie rule as nm_mask)
                keep = nm_mask(score, n, m)
                P1[:, i:i + m] = ~keep
            w = W1[:, i]
            q = torch.where(P1[:, i], torch.zeros_like(w), w)
            Q1[:, i] = q
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        prune[:, i1:i2] = P1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W, ~prune


def output_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr(E H E^T) / tr(W H W^T)`` with ``E = W - approx``: the relative error of the layer's
    outputs on the calibration inputs."""
    w = weight.detach().float()
    h = hessian.float()
    e = w - approx.float()
    den = float((w @ h * w).sum().clamp_min(1e-30))
    return float((e @ h * e).sum()) / den


def prune(weight: torch.Tensor, method: str, n: int, m: int, hessian: torch.Tensor | None = None,
          *, damp: float = 0.01) -> PruneResult:
    """Prune ``weight`` ``[N, K]`` to n:m with ``method``; errors measured on ``hessian``."""
    w = weight.detach().float()
    if method == "magnitude":
        keep = prune_magnitude(w, n, m)
        pruned = w * keep
    elif hessian is None:
        raise ValueError(f"method {method!r} needs the calibration Hessian")
    elif method == "wanda":
        keep = prune_wanda(w, hessian, n, m)
        pruned = w * keep
    elif method == "sparsegpt":
        pruned, keep = prune_sparsegpt(w, hessian, n, m, damp=damp)
    else:
        raise ValueError(f"unknown pruning method {method!r}")
    if hessian is None:
        return PruneResult(pruned, keep, None, None)
    magnitude = w * prune_magnitude(w, n, m)
    return PruneResult(pruned, keep, output_error(w, pruned, hessian),
                       output_error(w, magnitude, hessian))


__all__ = ["PruneResult", "output_error", "prune", "prune_magnitude", "prune_sparsegpt",
           "prune_wanda"]
