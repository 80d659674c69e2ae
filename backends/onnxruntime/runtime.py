"""Run modelfold ONNX artifacts with ONNX Runtime (CPU).

Shape legend: B = batch, S = new tokens, P = past tokens, T = P + S, H = KV heads,
D = head dim, V = vocabulary, E = hidden size.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from modelfold.errors import UsageError
from modelfold.generation import greedy_generate
from modelfold.ir import signature as sig

__all__ = ["OPTIMIZATION_LEVELS", "OnnxCausalLM", "OnnxEncoder", "available_adapters", "create_session"]

MODEL_FILE = "model.onnx"
# LoRA adapter files of an artifact exported with lora="inputs" (see lora_lowering.py).
ADAPTERS_DIR = "adapters"
ADAPTER_SUFFIX = ".onnx_adapter"

OPTIMIZATION_LEVELS = {
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
_ORT_TO_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
}
_PAST_KEY = re.compile(r"^past_key_values\.(\d+)\.key$")


def create_session(
    path: Path,
    *,
    threads: int | None = None,
    optimization_level: str = "all",
) -> ort.InferenceSession:
    """Opens an ONNX Runtime CPU session.

    Args:
        path: The `.onnx` file (its external data file must sit beside it).
        threads: Intra-op threads; None lets ONNX Runtime use one per physical core.
        optimization_level: Graph optimizations applied at load ("disabled", "basic", "extended",
            "all"). The artifact is already optimized offline up to a portable level; "all" adds
            the hardware-specific ones for this machine.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"no ONNX model at {path}; export one with export_onnx()")
    if optimization_level not in OPTIMIZATION_LEVELS:
        raise UsageError(
            f"optimization_level must be one of {sorted(OPTIMIZATION_LEVELS)}, got {optimization_level!r}"
        )
    if threads is not None and threads < 1:
        raise UsageError(f"threads must be >= 1 or None, got {threads}")
    options = ort.SessionOptions()
    options.graph_optimization_level = OPTIMIZATION_LEVELS[optimization_level]
    options.intra_op_num_threads = threads or 0
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _artifact_model(artifact_dir: Path) -> Path:
    artifact_dir = Path(artifact_dir)
    return artifact_dir / MODEL_FILE if artifact_dir.is_dir() else artifact_dir


def available_adapters(artifact_dir: Path) -> list[str]:
    """Names of the LoRA adapter files an artifact carries (`adapters/<name>.onnx_adapter`)."""
    folder = _artifact_model(artifact_dir).parent / ADAPTERS_DIR
    return sorted(p.name[: -len(ADAPTER_SUFFIX)] for p in folder.glob(f"*{ADAPTER_SUFFIX}"))


def _adapter_run_options(
    session: ort.InferenceSession, model_path: Path, adapter: str | Path | None
) -> tuple[ort.RunOptions | None, Path | None, Any]:
    """`(run options with the adapter active, its file, the loaded ort.LoraAdapter)`.

    `adapter` is a name under the artifact's `adapters/` folder or a path to a `.onnx_adapter` file.
    """
    if adapter is None:
        return None, None, None
    text = str(adapter)
    if isinstance(adapter, Path) or text.endswith(ADAPTER_SUFFIX) or Path(text).name != text:
        path = Path(adapter)
        if not path.is_file():
            raise UsageError(f"adapter file {path} does not exist")
    else:
        path = model_path.parent / ADAPTERS_DIR / f"{text}{ADAPTER_SUFFIX}"
        if not path.is_file():
            known = available_adapters(model_path.parent)
            raise UsageError(
                f"unknown adapter {text!r} for {model_path.parent}; available: {', '.join(known) or 'none'}"
            )
    slots = {i.name for i in session.get_overridable_initializers()}
    if not slots:
        raise UsageError(
            f"{model_path} has no adapter inputs (overridable initializers); export the model with "
            "lora='inputs' to run it with LoRA adapters"
        )
    unknown = sorted(set(ort.AdapterFormat.read_adapter(str(path)).get_parameters()) - slots)
    if unknown:
        raise UsageError(
            f"adapter {path} has parameters the model does not take as inputs, e.g. {unknown[0]!r} "
            f"({len(unknown)} of them); was it written for another artifact?"
        )
    lora_adapter = ort.LoraAdapter()
    lora_adapter.Load(str(path))
    options = ort.RunOptions()
    options.add_active_adapter(lora_adapter)
    return options, path, lora_adapter


class OnnxCausalLM:
    """A decoder artifact with a KV cache: perplexity logits and greedy generation.

    Args:
        artifact_dir: Directory holding `model.onnx` (or the `.onnx` file itself).
        threads: Intra-op threads (None: one per physical core).
        optimization_level: Graph optimizations ONNX Runtime applies at load.
        use_ort_values: Keep the KV cache in ONNX Runtime `OrtValue`s between decode steps
            (`run_with_ort_values`) instead of numpy arrays. Off by default: on SmolLM2-135M it
            made no measurable difference (43.8 vs 42.6 tokens/s, within noise), because on
            the CPU numpy inputs are used in place and the graph's Concat copies the past anyway.
        adapter: A LoRA adapter applied to every run: a name under the artifact's `adapters/`
            folder or a path to a `.onnx_adapter` file (artifacts exported with lora="inputs").
    """

    def __init__(
        self,
        artifact_dir: Path,
        *,
        threads: int | None = None,
        optimization_level: str = "all",
        use_ort_values: bool = False,
        adapter: str | Path | None = None,
    ):
        self.path = _artifact_model(artifact_dir)
        self.session = create_session(self.path, threads=threads, optimization_level=optimization_level)
        self.use_ort_values = use_ort_values
        self.run_options, self.adapter_path, self._adapter = _adapter_run_options(
            self.session, self.path, adapter
        )
        inputs = {i.name: i for i in self.session.get_inputs()}
        missing = {sig.INPUT_IDS, sig.ATTENTION_MASK, sig.POSITION_IDS} - set(inputs)
        layers = sorted(int(m.group(1)) for n in inputs if (m := _PAST_KEY.match(n)))
        if missing or not layers:
            raise UsageError(
                f"{self.path} is not a KV-cache decoder artifact (inputs {sorted(inputs)}); "
                "export a *ForCausalLM model with export_onnx()"
            )
        self.num_layers = len(layers)
        past = inputs[sig.past_name(0, "key")]
        _, self.num_kv_heads, _, self.head_dim = past.shape  # [B, H, P, D]
        self.cache_dtype = _ORT_TO_NUMPY[past.type]
        logits = next(o for o in self.session.get_outputs() if o.name == sig.LOGITS)
        self.vocab_size = logits.shape[-1]
        self.past_names = [
            sig.past_name(i, kind) for i in range(self.num_layers) for kind in ("key", "value")
        ]
        self.output_names = [sig.LOGITS] + [
            sig.present_name(i, kind) for i in range(self.num_layers) for kind in ("key", "value")
        ]

    def empty_past(self, batch: int) -> list[np.ndarray]:
        """A zero-length KV cache: 2 * num_layers arrays of shape [B, H, 0, D]."""
        shape = (batch, self.num_kv_heads, 0, self.head_dim)
        return [np.zeros(shape, dtype=self.cache_dtype) for _ in self.past_names]

    def step(
        self,
        input_ids: np.ndarray,  # [B, S]
        attention_mask: np.ndarray,  # [B, T]
        position_ids: np.ndarray,  # [B, S]
        past: Sequence[Any],  # 2 * num_layers x [B, H, P, D] (numpy or OrtValue)
    ) -> tuple[np.ndarray, list[Any]]:
        """One forward pass. Returns logits [B, S, V] and the present cache (same kind as `past`)."""
        if len(past) != len(self.past_names):
            raise UsageError(f"expected {len(self.past_names)} past tensors, got {len(past)}")
        feeds: dict[str, Any] = {
            sig.INPUT_IDS: np.ascontiguousarray(input_ids, dtype=np.int64),
            sig.ATTENTION_MASK: np.ascontiguousarray(attention_mask, dtype=np.int64),
            sig.POSITION_IDS: np.ascontiguousarray(position_ids, dtype=np.int64),
        }
        if past and isinstance(past[0], ort.OrtValue):
            feeds = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in feeds.items()}
            feeds.update(zip(self.past_names, past))
            outputs = self.session.run_with_ort_values(self.output_names, feeds, self.run_options)
            return outputs[0].numpy(), list(outputs[1:])
        feeds.update(zip(self.past_names, past))
        outputs = self.session.run(self.output_names, feeds, self.run_options)
        return outputs[0], outputs[1:]

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        """Logits for every position of `input_ids` [B, S] with no past -> [B, S, V] float32.

        `attention_mask` [B, S] (1 = token, 0 = left padding) defaults to all ones.
        """
        input_ids = np.asarray(input_ids, dtype=np.int64)
        if input_ids.ndim != 2 or input_ids.shape[1] == 0:
            raise UsageError(f"input_ids must be [batch, seq] with seq >= 1, got {input_ids.shape}")
        if attention_mask is None:
            attention_mask = np.ones_like(input_ids)
        attention_mask = np.asarray(attention_mask, dtype=np.int64)
        if attention_mask.shape != input_ids.shape:
            raise UsageError(
                f"attention_mask shape {attention_mask.shape} != input_ids shape {input_ids.shape}"
            )
        positions = _positions(attention_mask, input_ids.shape[1])
        logits, _ = self.step(input_ids, attention_mask, positions, self.empty_past(len(input_ids)))
        return logits.astype(np.float32, copy=False)  # [B, S, V]

    def generate(
        self,
        input_ids: Sequence[int] | np.ndarray,
        max_new_tokens: int,
        eos_token_id: int | Sequence[int] | None = None,
    ) -> dict[str, Any]:
        """Greedy decoding of one prompt with the KV cache (``modelfold.generation``).

        The prefill runs the whole prompt once; each later step feeds one token and the previous
        step's present keys/values as the past.

        Returns:
            `tokens` (prompt + new), `new_tokens`, `prefill_seconds` (prompt -> first token),
            `decode_seconds` (the remaining steps), `decode_tokens_per_s`.
        """

        def empty_past(batch: int) -> list[Any]:
            past: list[Any] = self.empty_past(batch)
            if self.use_ort_values:
                past = [ort.OrtValue.ortvalue_from_numpy(p) for p in past]
            return past

        def step(ids, mask, positions, past):
            logits, present = self.step(ids, mask, positions, past)
            return logits[:, -1], present  # [1, V]

        return greedy_generate(step, empty_past, input_ids, max_new_tokens, eos_token_id)


class OnnxEncoder:
    """An encoder artifact: `(input_ids, attention_mask[, token_type_ids]) -> last_hidden_state`.

    Args:
        artifact_dir: Directory holding `model.onnx` (or the `.onnx` file itself).
        threads: Intra-op threads (None: one per physical core).
        optimization_level: Graph optimizations ONNX Runtime applies at load.
        adapter: A LoRA adapter applied to every run (see `OnnxCausalLM`).
    """

    def __init__(
        self,
        artifact_dir: Path,
        *,
        threads: int | None = None,
        optimization_level: str = "all",
        adapter: str | Path | None = None,
    ):
        self.path = _artifact_model(artifact_dir)
        self.session = create_session(self.path, threads=threads, optimization_level=optimization_level)
        self.run_options, self.adapter_path, self._adapter = _adapter_run_options(
            self.session, self.path, adapter
        )
        self.input_names = [i.name for i in self.session.get_inputs()]
        if self.input_names[:2] != [sig.INPUT_IDS, sig.ATTENTION_MASK]:
            raise UsageError(
                f"{self.path} is not an encoder artifact (inputs {self.input_names}); "
                "export an encoder model with export_onnx()"
            )

    def __call__(
        self,
        input_ids: np.ndarray,  # [B, S]
        attention_mask: np.ndarray | None = None,  # [B, S]
        token_type_ids: np.ndarray | None = None,  # [B, S]
    ) -> np.ndarray:
        """Returns last_hidden_state [B, S, E]."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        if input_ids.ndim != 2:
            raise UsageError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
        if attention_mask is None:
            attention_mask = np.ones_like(input_ids)
        feeds = {
            sig.INPUT_IDS: input_ids,
            sig.ATTENTION_MASK: np.asarray(attention_mask, dtype=np.int64),
        }
        if sig.TOKEN_TYPE_IDS in self.input_names:
            if token_type_ids is None:
                token_type_ids = np.zeros_like(input_ids)
            feeds[sig.TOKEN_TYPE_IDS] = np.asarray(token_type_ids, dtype=np.int64)
        return self.session.run([sig.LAST_HIDDEN_STATE], feeds, self.run_options)[0]  # [B, S, E]


def _positions(attention_mask: np.ndarray, num_new: int) -> np.ndarray:
    """Numpy twin of `sig.decoder_positions`: [B, T] mask -> [B, S] position ids."""
    positions = np.cumsum(attention_mask, axis=-1) - 1  # [B, T]
    positions[attention_mask == 0] = 1
    return positions[:, positions.shape[1] - num_new :]
