"""``attention-similarity``: how alike the layers' attention is, layer by layer (analysis).

On calibration text, every layer's attention probabilities ``A_l = softmax(Q K^T / sqrt(d) +
mask)`` (``[B, H, S, S]``, the model run with transformers' eager attention) and its cached keys
and values (``[B, Hkv, S, D]``, after rotary embedding) are flattened, and the layer x layer
cosine similarity of each is accumulated over the calibration set:

    sim(i, j) = <X_i, X_j> / (|X_i| |X_j|),   summed over every sequence.

``maps`` is what EchoAtt groups layers by (score sharing), ``keys`` / ``values`` (and their mean,
``kv``) what KV sharing does. The matrices are stored in ``program.analyses`` for
``share-attention{strategy=similarity}`` and drawn as heatmaps in the report.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from modelfold.ir.program import Program
from modelfold.passes.base import Pass, PreconditionError
from modelfold.passes.calibration import CalibrationConfig, calibration_option
from modelfold.passes.registry import register_pass

ANALYSIS_KEY = "attention-similarity"
KINDS = ("maps", "keys", "values")


@dataclass(frozen=True)
class AttentionSimilarityConfig(CalibrationConfig):
    n_samples: int = calibration_option("n_samples", 16)
    seq_len: int = calibration_option("seq_len", 256)
    batch_size: int = calibration_option("batch_size", 2)


@register_pass
class AttentionSimilarity(Pass):
    """Layer x layer cosine similarity of attention maps, keys and values (analysis)."""

    name = ANALYSIS_KEY
    config_class = AttentionSimilarityConfig
    kind = "analysis"
    summary = ("layer x layer cosine similarity of the attention maps (EchoAtt) and of the "
               "keys / values (KV sharing) on calibration text, with heatmaps")

    def requires(self, program: Program) -> None:
        if program.arch.kind != "causal-lm":
            raise PreconditionError(f"attention-similarity: {program.arch.family} is an encoder; "
                                    "attention sharing is for decoders with a KV cache")
        self.config.require_text(program, "attention-similarity runs the model on text")

    @torch.no_grad()
    def run(self, program: Program) -> dict[str, Any]:
        from transformers import DynamicCache

        cfg = self.config
        model = program.module
        ids = cfg.calibration_ids(program)  # [N, S]
        n = program.arch.num_layers
        grams = {kind: torch.zeros(n, n, dtype=torch.float64) for kind in KINDS}
        previous = model.config._attn_implementation
        model.set_attn_implementation("eager")  # the probabilities themselves
        try:
            for batch in tqdm(cfg.batches(ids), desc=ANALYSIS_KEY, unit="batch", leave=False):
                cache = DynamicCache()
                out = model(input_ids=batch, past_key_values=cache, use_cache=True,
                            output_attentions=True)
                layers = cache.layers
                tensors = {
                    "maps": [a.float() for a in out.attentions],  # [B, H, S, S]
                    "keys": [_layer_tensor(layers, i, "keys") for i in range(n)],
                    "values": [_layer_tensor(layers, i, "values") for i in range(n)],
                }
                for kind, per_layer in tensors.items():
                    for b in range(batch.shape[0]):
                        flat = torch.stack([t[b].reshape(-1).float() for t in per_layer])
                        grams[kind] += (flat @ flat.T).double()  # [L, L]
        finally:
            model.set_attn_implementation(previous)
        result: dict[str, Any] = {kind: _cosine(g).tolist() for kind, g in grams.items()}
        result["kv"] = ((torch.tensor(result["keys"]) + torch.tensor(result["values"])) / 2
                        ).tolist()
        program.analyses[ANALYSIS_KEY] = result
        adjacent = {kind: [round(result[kind][i][i + 1], 4) for i in range(n - 1)]
                    for kind in ("maps", "kv")}
        return {**result, "adjacent": adjacent, **cfg.calibration_facts(ids)}

    @staticmethod
    def plot(details: dict[str, Any], path: Path) -> bool:
        """Heatmaps of the three similarity matrices."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
        for ax, kind in zip(axes, KINDS):
            image = ax.imshow(details[kind], cmap="viridis", vmin=0, vmax=1)
            ax.set_title(f"cosine similarity of {'attention maps' if kind == 'maps' else kind}")
            ax.set_xlabel("layer")
            ax.set_ylabel("layer")
            fig.colorbar(image, ax=ax, fraction=0.046)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return True


def _layer_tensor(layers: list, index: int, name: str) -> torch.Tensor:
    tensor = getattr(layers[index], name, None) if index < len(layers) else None
    if tensor is None or tensor.shape[-1] == 0:
        raise PreconditionError(f"attention-similarity: layer {index} keeps no {name} in the "
                                "cache (its attention is already shared); run the analysis on "
                                "the model before share-attention")
    return tensor


def _cosine(gram: torch.Tensor) -> torch.Tensor:
    norms = gram.diagonal().clamp(min=1e-30).sqrt()
    return (gram / norms[:, None] / norms[None, :]).clamp(-1, 1)


__all__ = ["ANALYSIS_KEY", "AttentionSimilarity", "AttentionSimilarityConfig"]
