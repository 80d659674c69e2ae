"""GPTQ (Frantar et al., ICLR 2023; IST-DASLab/gptq): quantize a weight column by column and
push each column's rounding error onto the columns not yet quantized, weighted by the inverse
Hessian of the layer's inputs.

For a linear layer with inputs X (tokens x K), the Hessian of the output error is
``H = 2 X^T X / n``. Column i is rounded, its error ``(w_i - q_i) / [H^-1]_ii`` is subtracted from
the later columns through row i of the Cholesky factor of ``H^-1``. Group parameters are refitted
at the start of every group from the error-updated weights; with ``act_order`` the columns are
processed in order of decreasing ``diag(H)`` and the group grids are fitted up front on the
original weights ("static groups"), so the stored layout stays the plain MatMulNBits one (no
``g_idx``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from modelfold.ir.quant import QuantFormat, codes_for, fit_params, fit_params_mse, group_params


class HessianAccumulator:
    """Running ``2 X^T X / n`` over the rows of every input seen (float64 accumulation)."""

    def __init__(self, in_features: int):
        self.h = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # [T, K]
        self.h += (x.T @ x).double()  # float32 products per batch, float64 running sum
        self.n += x.shape[0]

    def value(self) -> torch.Tensor:
        """``2 X^T X / n``, summed over every rank's inputs when calibration is distributed."""
        from modelfold.distributed import all_reduce_sum, rank_and_world

        h, n = self.h, self.n
        if rank_and_world()[1] > 1:
            h = all_reduce_sum(self.h.clone())
            n = int(all_reduce_sum(torch.tensor([float(self.n)], dtype=torch.float64)).item())
        if n == 0:
            raise ValueError("no calibration inputs reached this layer")
        return (2.0 / n * h).float()


@dataclass
class GPTQResult:
    codes: torch.Tensor  # [N, K] integer codes
    scales: torch.Tensor  # [N, k_blocks]
    zeros: torch.Tensor  # [N, k_blocks]
    relative_error: float  # tr(E H E^T) / tr(W H W^T), E = W - dequant
    rtn_relative_error: float  # the same for round-to-nearest, for comparison


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, fmt: QuantFormat, *,
                  damp: float = 0.01, act_order: bool = False, mse: bool = False,
                  block: int = 128, keep: torch.Tensor | None = None) -> GPTQResult:
    """Quantize ``weight`` ``[N, K]`` given the input Hessian ``[K, K]``.

    Args:
        damp: fraction of the mean diagonal added to the diagonal (GPTQ's ``percdamp``).
        act_order: process columns by decreasing Hessian diagonal (static groups).
        mse: fit each group's range by the shrink search of ``fit_params_mse``.
        block: columns updated lazily together (GPTQ's ``blocksize``); raised to the group size
            when that is larger, so groups never straddle blocks.
        keep: bool ``[N, K]`` of an N:M sparse weight: the other positions are set to the zero
            point (exactly 0) and their error is compensated like a rounding error.
    """
    w_orig = weight.detach().float()
    W = w_orig.clone()
    n, k = W.shape
    H = hessian.clone().float()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    g = fmt.block_size
    per_channel = g >= k
    static = act_order or per_channel
    kb = fmt.k_blocks(k)
    if static:
        scales, zeros = group_params(W, fmt, mse=mse)  # [N, kb]
    else:
        scales = torch.zeros(n, kb)
        zeros = torch.zeros(n, kb)

    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(k)
    W = W[:, perm]
    H = H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(k)
    Hinv = _inverse_cholesky_upper(H)

    codes = torch.zeros(n, k)
    block = max(block, g) if not per_channel else block
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            grp = col // g
            if not static and col % g == 0:
                s, z = (fit_params_mse if mse else fit_params)(W1[:, i:i + g], fmt)
                scales[:, grp], zeros[:, grp] = s, z
            s, z = scales[:, grp], zeros[:, grp]
            w = W1[:, i]
            q_int = torch.clamp(torch.round(w / s) + z, 0, fmt.maxq)
            if keep is not None:
                q_int = torch.where(keep[:, col], q_int, z)
            q = s * (q_int - z)
            codes[:, col] = q_int
            d = Hinv1[i, i]
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    deq = _dequant(codes, scales, zeros, g, k)
    h = hessian.float()
    den = float((w_orig @ h * w_orig).sum().clamp_min(1e-30))
    e = w_orig - deq
    rtn_codes = codes_for(w_orig, *group_params(w_orig, fmt), fmt)
    e_rtn = w_orig - _dequant(rtn_codes, *group_params(w_orig, fmt), g, k)
    return GPTQResult(codes, scales, zeros, float((e @ h * e).sum()) / den,
                      float((e_rtn @ h * e_rtn).sum()) / den)


def _dequant(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g: int,
             k: int) -> torch.Tensor:
    s = scales.repeat_interleave(g, 1)[:, :k]
    z = zeros.repeat_interleave(g, 1)[:, :k]
    return s * (codes - z)


def _inverse_cholesky_upper(H: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of ``H^-1``; more damping if ``H`` is not positive definite."""
    extra = 0.0
    eye = torch.eye(H.shape[0])
    mean_diag = float(torch.mean(torch.diag(H)))
    for _ in range(6):
        try:
            L = torch.linalg.cholesky(H + extra * eye)
            Hinv = torch.cholesky_inverse(L)
            return torch.linalg.cholesky(Hinv, upper=True)
        except torch.linalg.LinAlgError:
            extra = mean_diag * (0.01 if extra == 0 else extra / mean_diag * 10)
    raise torch.linalg.LinAlgError("the calibration Hessian is not positive definite even with "
                                   "heavy damping; use more calibration samples or a larger damp")


__all__ = ["GPTQResult", "HessianAccumulator", "gptq_quantize"]
