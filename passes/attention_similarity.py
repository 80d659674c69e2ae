"""``attention-similarity``: how alike the layers' attention is, layer by layer (analysis).

On calibration text, every layer's attention probabilities ``A_l = softmax(Q K^T / sqrt(d) +
mask)`` (``[B, H, S, S]``, the model run with transformers' eager attention) and its cached keys
and values (``[B, Hkv, S, D]``, after rotary embedding) are flattened, and the layer x layer
cosine similarity of each is accumulated over the calibration set:

    sim(i, j) = <X_i, X_j> / (|X_i| |X_j|),   summed over every sequence.

``maps`` is what EchoAtt groups layers by (score sharing), ``keys`` / ``values`` (and their mean,
``kv``) what KV sharing would. These cosines are cheap but predict badly which layers can share:
on SmolLM2-135M, 15 KV borrowers picked by the mean key/value cosine scored a perplexity of
56,643 untrained where random ones scored 1,650 (README, Measured), and an attention-output error
measured per layer did no better (what matters is how the change travels through the layers
above). So the analysis
also measures it: for every earlier layer ``o`` of the same kind within ``max_distance`` layers of
layer ``b``, the model runs with only ``b`` sharing ``o``'s attention (``trial``: nothing dropped),
and the KL divergence of its next-token distribution from the original's, over ``kl_tokens``
tokens of two calibration sequences, is

    scores_kl[o][b]  (b reuses o's attention probabilities)    kv_kl[o][b]  (b reads o's K/V)

(-1 where not measured). ``share-attention{strategy=similarity}`` picks borrowers by these:
greedily the borrower that adds the least KL, summed over the borrowers with the owners they
would have. The matrices are stored in ``program.analyses`` and drawn as heatmaps in the report.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from modelfold.errors import OptionError
from modelfold.ir.program import Program
from modelfold.passes.base import Pass, PreconditionError, option
from modelfold.passes.calibration import CalibrationConfig, calibration_option
from modelfold.passes.registry import register_pass

ANALYSIS_KEY = "attention-similarity"
KINDS = ("maps", "keys", "values")


PROBE = "modelfold_probe"  # the attention implementation the analysis runs the model with


@dataclass(frozen=True)
class AttentionSimilarityConfig(CalibrationConfig):
    n_samples: int = calibration_option("n_samples", 16)
    seq_len: int = calibration_option("seq_len", 256)
    batch_size: int = calibration_option("batch_size", 2)
    max_distance: int = option(8, "measure sharing with owners up to this many layers before "
                                  "a layer")
    kl_tokens: int = option(128, "tokens of each of two calibration sequences the measured KL "
                                 "runs on (0: cosines only)")

    def validate(self) -> None:
        if self.max_distance < 1:
            raise OptionError(f"attention-similarity option 'max_distance' must be >= 1; got "
                              f"{self.max_distance}")
        if self.kl_tokens < 0:
            raise OptionError(f"attention-similarity option 'kl_tokens' must be >= 0; got "
                              f"{self.kl_tokens}")


@register_pass
class AttentionSimilarity(Pass):
    """Layer x layer cosine similarity of attention maps, keys and values (analysis)."""

    name = ANALYSIS_KEY
    config_class = AttentionSimilarityConfig
    kind = "analysis"
    summary = ("layer x layer cosine similarity of the attention maps (EchoAtt) and keys / "
               "values, and the measured next-token KL of each layer sharing an earlier layer's "
               "attention (scores / kv), on calibration text, with heatmaps")

    def requires(self, program: Program) -> None:
        if program.arch.kind != "causal-lm":
            raise PreconditionError(f"attention-similarity: {program.arch.family} is an encoder; "
                                    "attention sharing is for decoders with a KV cache")
        self.config.require_text(program, "attention-similarity runs the model on text")

    @torch.no_grad()
    def run(self, program: Program) -> dict[str, Any]:
        from modelfold.passes.share_attention import layer_classes

        cfg = self.config
        model = program.module
        ids = cfg.calibration_ids(program)  # [N, S]
        n = program.arch.num_layers
        of = {i: key for key, layers in layer_classes(program).items() for i in layers}
        pairs = [(o, b) for b in range(n) for o in range(max(0, b - cfg.max_distance), b)
                 if of[o] == of[b]]
        grams = {kind: torch.zeros(n, n, dtype=torch.float64) for kind in KINDS}
        records: dict[int, tuple] = {}
        _register_probe(records)
        previous = model.config._attn_implementation
        model.set_attn_implementation(PROBE)
        try:
            for batch in tqdm(cfg.batches(ids), desc=ANALYSIS_KEY, unit="batch", leave=False):
                records.clear()
                model(input_ids=batch, use_cache=False)
                if sorted(records) != list(range(n)):
                    raise PreconditionError(f"attention-similarity saw the attention of layers "
                                            f"{sorted(records)} of 0..{n - 1}")
                for kind, index in (("maps", 2), ("keys", 0), ("values", 1)):
                    for row in range(batch.shape[0]):
                        flat = torch.stack([records[i][index][row].reshape(-1).float()
                                            for i in range(n)])
                        grams[kind] += (flat @ flat.T).double()  # [L, L]
                records.clear()
        finally:
            model.set_attn_implementation(previous)
        result: dict[str, Any] = {kind: _cosine(g).tolist() for kind, g in grams.items()}
        result["kv"] = ((torch.tensor(result["keys"]) + torch.tensor(result["values"])) / 2
                        ).tolist()
        if cfg.kl_tokens:
            probe = ids[:2, : cfg.kl_tokens]
            for mode in ("scores", "kv"):
                result[f"{mode}_kl"] = _measured_kl(program, probe, mode, pairs).tolist()
        program.analyses[ANALYSIS_KEY] = result
        adjacent = {kind: [round(result[kind][i][i + 1], 4) for i in range(n - 1)]
                    for kind in ("maps", "kv", "scores_kl", "kv_kl") if kind in result}
        return {**result, "adjacent": adjacent, **cfg.calibration_facts(ids)}

    @staticmethod
    def plot(details: dict[str, Any], path: Path) -> bool:
        """Heatmaps of the three similarity matrices."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np

        titles = {"maps": "cosine of attention maps", "keys": "cosine of keys",
                  "values": "cosine of values",
                  "scores_kl": "KL when column reuses row's probabilities",
                  "kv_kl": "KL when column reads row's keys/values"}
        fig, axes = plt.subplots(2, 3, figsize=(15, 9.2))
        axes[1, 2].axis("off")
        for ax, kind in zip(axes.flat, titles):
            if kind not in details:
                ax.axis("off")
                continue
            values = np.array(details[kind], dtype=float)
            if kind.endswith("_kl"):  # log10 KL; unmeasured and the diagonal blank
                values = np.where(values > 0, np.log10(np.maximum(values, 1e-6)), np.nan)
                image = ax.imshow(values, cmap="magma_r")
            else:
                image = ax.imshow(values, cmap="viridis", vmin=0, vmax=1)
            ax.set_title(titles[kind] + (" (log10)" if kind.endswith("_kl") else ""),
                         fontsize=10)
            ax.set_xlabel("layer")
            ax.set_ylabel("layer")
            fig.colorbar(image, ax=ax, fraction=0.046)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return True


def _expand(heads: int, x: torch.Tensor) -> torch.Tensor:
    """``[B, Hkv, ...]`` -> ``[B, H, ...]`` (each KV head serves H / Hkv query heads)."""
    return x.repeat_interleave(heads // x.shape[1], dim=1) if x.shape[1] != heads else x


def _attend(q, k, v, mask, scale, softcap):
    """Eager attention: ``(output [B, H, S, D], probabilities [B, H, S, L])``."""
    heads = q.shape[1]
    scores = (q @ _expand(heads, k).transpose(-1, -2)) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask[..., : k.shape[-2]]
    else:
        s, length = scores.shape[-2:]
        causal = torch.ones(s, length, dtype=torch.bool, device=q.device).tril(length - s)
        scores = scores.masked_fill(~causal, float("-inf"))
    probs = scores.float().softmax(-1).to(q.dtype)
    return probs @ _expand(heads, v), probs


def _register_probe(records: dict[int, tuple]) -> None:
    """The ``modelfold_probe`` attention implementation: eager attention (transformers' eager
    masks) that records each layer's keys, values and probabilities in ``records``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    def probe(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
              softcap=None, **kwargs):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        out, probs = _attend(query, key, value, attention_mask, scale, softcap)
        records[module.layer_idx] = (key, value, probs)
        return out.transpose(1, 2).contiguous(), probs

    AttentionInterface.register(PROBE, probe)
    AttentionMaskInterface.register(PROBE, eager_mask)


@torch.no_grad()
def _measured_kl(program: Program, ids: torch.Tensor, mode: str,
                 pairs: list[tuple[int, int]]) -> torch.Tensor:
    """``[L, L]``: KL(original || layer b sharing layer o's attention) of the next-token
    distributions on ``ids``, per measured pair (-1 elsewhere, 0 on the diagonal)."""
    from modelfold.ir.shared_attention import Sharing, trial

    model, arch = program.module, program.arch
    n = arch.num_layers
    layers = model.get_submodule(arch.layers)
    reference = model(input_ids=ids, use_cache=False).logits.float().log_softmax(-1)
    kl = torch.full((n, n), -1.0, dtype=torch.float64)
    kl.fill_diagonal_(0.0)
    for o, b in tqdm(pairs, desc=f"{ANALYSIS_KEY} ({mode} KL)", unit="pair", leave=False):
        sharing = Sharing.from_groups(mode, n, [[o, b]])
        with trial(layers, arch.layer.attention, arch.layer.attention_proj, sharing):
            shared = model(input_ids=ids, use_cache=False).logits.float().log_softmax(-1)
        kl[o, b] = (reference.exp() * (reference - shared)).sum(-1).mean().double().clamp(min=0)
    return kl


def _cosine(gram: torch.Tensor) -> torch.Tensor:
    norms = gram.diagonal().clamp(min=1e-30).sqrt()
    return (gram / norms[:, None] / norms[None, :]).clamp(-1, 1)


__all__ = ["ANALYSIS_KEY", "AttentionSimilarity", "AttentionSimilarityConfig"]
