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

from modelfold.backends.onnxruntime import native
from modelfold.errors import UsageError
from modelfold.generation import Sampling, generate
from modelfold.ir import signature as sig

__all__ = ["OPTIMIZATION_LEVELS", "PROVIDERS", "OnnxCausalLM", "OnnxEncoder", "available_adapters",
           "create_session", "execution_providers"]

MODEL_FILE = "model.onnx"
# LoRA adapter files of an artifact exported with lora="inputs" (see lora_lowering.py).
ADAPTERS_DIR = "adapters"
ADAPTER_SUFFIX = ".onnx_adapter"
# The optional input of decoder artifacts that limits the LM head to the last k positions
# (see logits_lowering.py).
LOGITS_TO_KEEP = "logits_to_keep"

OPTIMIZATION_LEVELS = {
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
_ORT_TO_NUMPY = {
    "tensor(int8)": np.int8,  # a quantized KV cache (quantize-kv)
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
}
_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")


PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def execution_providers(provider: str) -> list[str]:
    """ONNX Runtime's provider list for ``provider`` ("cpu" or "cuda"; CUDA falls back to the
    CPU for the nodes it does not take).

    Raises:
        UsageError: an unknown provider, or one this ONNX Runtime build / machine lacks.
    """
    if provider not in PROVIDERS:
        raise UsageError(f"unknown execution provider {provider!r}; one of {', '.join(PROVIDERS)}")
    name = PROVIDERS[provider]
    if name not in ort.get_available_providers():
        raise UsageError(
            f"ONNX Runtime's {name} is not available here (available: "
            f"{', '.join(ort.get_available_providers())}); for 'cuda' install onnxruntime-gpu "
            "instead of onnxruntime and run on a machine with an NVIDIA GPU")
    return [name] if provider == "cpu" else [name, PROVIDERS["cpu"]]


def create_session(
    path: Path,
    *,
    threads: int | None = None,
    optimization_level: str = "all",
    provider: str = "cpu",
    kernels: str = "auto",
    kv_cache: str = "float32",
) -> ort.InferenceSession:
    """Opens an ONNX Runtime session.

    Args:
        path: The `.onnx` file (its external data file must sit beside it).
        threads: Intra-op threads; None lets ONNX Runtime use one per physical core.
        optimization_level: Graph optimizations applied at load ("disabled", "basic", "extended",
            "all"). The artifact is already optimized offline up to a portable level; "all" adds
            the hardware-specific ones for this machine.
        provider: "cpu" or "cuda" (``execution_providers``).
        kernels: "auto" (modelfold's CPU kernels where they apply and can run here, see
            ``native``), "modelfold" (required: an error where they cannot run) or
            "onnxruntime" (ONNX Runtime's own). The facts are the session's ``kernels``
            attribute; ``tiled_keys`` the past / present key names in the attention kernel's
            layout (``native.to_kernel_layout``).
        kv_cache: "float32" (default) or "float16": the precision of the KV cache of modelfold's
            attention kernel (float16 halves the bytes a decode step reads; modelfold's kernels).
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
    native.validate_choice(kernels)
    native.validate_cache(kv_cache)
    providers = execution_providers(provider)
    if provider != "cpu":
        if kernels == "modelfold" or kv_cache != "float32":
            raise UsageError("kernels='modelfold' and kv_cache='float16' are modelfold's CPU "
                             f"kernels; use kernels='onnxruntime' with provider={provider!r}")
        kernels = "onnxruntime"
    options = ort.SessionOptions()
    options.graph_optimization_level = OPTIMIZATION_LEVELS[optimization_level]
    options.intra_op_num_threads = threads or 0
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    if provider == "cpu":
        # flush denormals to zero on ONNX Runtime's threads: products that fall below 1.2e-38
        # (tiny softmax probabilities, tiny weights) otherwise cost microcode assists (a few
        # percent of a SmolLM2 decode step here, in a scratch A/B)
        options.add_session_config_entry("session.set_denormal_as_zero", "1")
    model, lib, facts = native.prepare(path, kernels, kv_cache)
    if lib is not None:
        options.register_custom_ops_library(str(lib))
        # the rewritten graph is passed as bytes: its external data is found beside the file
        options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                         str(path.parent.resolve()))
    session = ort.InferenceSession(model if model is not None else str(path), options,
                                   providers=providers)
    session.tiled_keys = set(facts.pop("tiled_keys", ()))
    session.kernels = facts
    return session


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
    slots = {i.name for i in session.get_overridable_initializers()} - {LOGITS_TO_KEEP}
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
    """A decoder artifact with a KV cache: perplexity logits and generation.

    Artifacts whose attention is ``GroupQueryAttention`` (the ``fuse-attention`` pass) take
    right-padded batches and decode with a zero-copy cache: one buffer per layer of the longest
    length a generation needs, bound with IO binding as both the past and the present, so each
    step writes only the new token's keys and values (``past_present_share_buffer``). Other
    artifacts take left-padded batches; their cache stays in ONNX Runtime ``OrtValue``s from one
    step to the next (no numpy round trip). Both bind the logits to a buffer that is reused.

    Args:
        artifact_dir: Directory holding `model.onnx` (or the `.onnx` file itself).
        threads: Intra-op threads (None: one per physical core).
        optimization_level: Graph optimizations ONNX Runtime applies at load.
        adapter: A LoRA adapter applied to every run: a name under the artifact's `adapters/`
            folder or a path to a `.onnx_adapter` file (artifacts exported with lora="inputs").
        provider: Execution provider: "cpu" (default) or "cuda" (needs `onnxruntime-gpu` and an
            NVIDIA GPU; float16 artifacts).
        kernels: "auto" (default: modelfold's CPU kernels for the int4 layers and the attention
            where they apply and can run, ``native``), "modelfold" (required) or "onnxruntime".
        kv_cache: "float32" (default) or "float16" (modelfold's attention kernel: half the
            cache memory and the bytes a decode step reads).
    """

    runtime = "onnxruntime"

    def __init__(
        self,
        artifact_dir: Path,
        *,
        threads: int | None = None,
        optimization_level: str = "all",
        adapter: str | Path | None = None,
        provider: str = "cpu",
        kernels: str = "auto",
        kv_cache: str = "float32",
    ):
        self.path = _artifact_model(artifact_dir)
        self.provider = provider
        self.session = create_session(self.path, threads=threads,
                                      optimization_level=optimization_level, provider=provider,
                                      kernels=kernels, kv_cache=kv_cache)
        self.kernels = self.session.kernels  # which kernels run the int4 layers, and why
        self.run_options, self.adapter_path, self._adapter = _adapter_run_options(
            self.session, self.path, adapter
        )
        inputs = {i.name: i for i in self.session.get_inputs()}
        missing = {sig.INPUT_IDS, sig.ATTENTION_MASK} - set(inputs)
        # layers that share attention keep a value only (scores) or nothing (kv): the cache is
        # the past inputs the artifact has, in layer order
        entries = sorted((int(m.group(1)), m.group(2)) for n in inputs if (m := _PAST.match(n)))
        layers = [i for i, kind in entries if kind == "key"]  # layers that own keys
        if missing or not layers:
            raise UsageError(
                f"{self.path} is not a KV-cache decoder artifact (inputs {sorted(inputs)}); "
                "export a *ForCausalLM model with export_onnx()"
            )
        self.has_positions = sig.POSITION_IDS in inputs
        self.num_layers = len(layers)
        past = inputs[sig.past_name(layers[0], "key")]
        _, self.num_kv_heads, _, self.head_dim = _cache_shape(self.path, past.shape)  # [B, H, P, D]
        self.cache_dtype = _ORT_TO_NUMPY[past.type]
        logits = next(o for o in self.session.get_outputs() if o.name == sig.LOGITS)
        self.vocab_size = logits.shape[-1]
        self.logits_dtype = _ORT_TO_NUMPY[logits.type]
        self.past_names = [sig.past_name(i, kind) for i, kind in entries]
        self.present_names = [sig.present_name(i, kind) for i, kind in entries]
        self.output_names = [sig.LOGITS] + self.present_names
        # the LM head for the last k positions only (``logits_lowering``; older artifacts: all)
        overridable = {i.name for i in self.session.get_overridable_initializers()}
        self.keeps_logits = LOGITS_TO_KEEP in overridable or LOGITS_TO_KEEP in inputs
        self._keep_bound: int | None = None
        self._keep_value: Any = None  # the bound OrtValue (kept alive while bound)
        # GroupQueryAttention reads the mask as per-row lengths: right padding, shared buffers
        self.padding = "right" if _has_op(self.path, "GroupQueryAttention") else "left"
        self._device = "cuda" if provider == "cuda" else "cpu"
        self._io = self.session.io_binding()
        self._logits: tuple[np.ndarray, Any] | None = None  # the logits' view and its OrtValue
        self._logits_memory: np.ndarray | None = None  # the memory behind it
        self._bound: list[Any] | None = None  # the cache bound to self._io
        self._logits_bound: Any = None
        self._adapter_inputs = {} if self.adapter_path is None else \
            dict(ort.AdapterFormat.read_adapter(str(self.adapter_path)).get_parameters())

    def empty_past(self, batch: int) -> list[np.ndarray]:
        """A zero-length KV cache: one array of shape [B, H, 0, D] per past input."""
        shape = (batch, self.num_kv_heads, 0, self.head_dim)
        return [np.zeros(shape, dtype=self.cache_dtype) for _ in self.past_names]

    def step(
        self,
        input_ids: np.ndarray,  # [B, S]
        attention_mask: np.ndarray,  # [B, T]
        position_ids: np.ndarray,  # [B, S]
        past: Sequence[Any],  # 2 * num_layers x [B, H, P, D] (numpy)
    ) -> tuple[np.ndarray, list[Any]]:
        """One forward pass through ``session.run``. Returns logits [B, S, V] and the present
        cache (numpy). ``generate`` uses the IO-bound path instead."""
        if len(past) != len(self.past_names):
            raise UsageError(f"expected {len(self.past_names)} past tensors, got {len(past)}")
        if self.padding == "right" and input_ids.shape[0] > 1 and input_ids.shape[1] > 1 and \
                past[0].shape[2] > 0:
            raise UsageError(f"{self.path} has GroupQueryAttention, which takes several new tokens "
                             "per row after a past for one row at a time (a batch: one token "
                             "per row, or an empty past)")
        return self._step(input_ids, attention_mask, position_ids, past, presents=True)

    def _step(self, input_ids, attention_mask, position_ids, past, presents: bool):
        feeds: dict[str, Any] = self._small_feeds(input_ids, attention_mask, position_ids)
        tiled = self.session.tiled_keys  # keys in modelfold's attention kernel's layout
        feeds.update((name, native.to_kernel_layout(p) if name in tiled else p)
                     for name, p in zip(self.past_names, past))
        outputs = self.session.run(self.output_names if presents else [sig.LOGITS], feeds,
                                   self.run_options)
        if not presents:
            return outputs[0], []
        return outputs[0], [native.from_kernel_layout(p) if name in tiled else p
                            for name, p in zip(self.present_names, outputs[1:])]

    def _small_feeds(self, input_ids, attention_mask, position_ids) -> dict[str, np.ndarray]:
        feeds = {sig.INPUT_IDS: np.ascontiguousarray(input_ids, dtype=np.int64),
                 sig.ATTENTION_MASK: np.ascontiguousarray(attention_mask, dtype=np.int64)}
        if self.has_positions:
            feeds[sig.POSITION_IDS] = np.ascontiguousarray(position_ids, dtype=np.int64)
        return feeds

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        """Logits for every position of `input_ids` [B, S] with no past -> [B, S, V] float32.

        `attention_mask` [B, S] (1 = token, 0 = padding: left padding, or right padding for
        artifacts with GroupQueryAttention, see ``padding``) defaults to all ones.
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
        self.check_padding(attention_mask)
        positions = _positions(attention_mask, input_ids.shape[1])
        logits, _ = self._step(input_ids, attention_mask, positions, self.empty_past(len(input_ids)),
                               presents=False)
        return logits.astype(np.float32, copy=False)  # [B, S, V]

    def check_padding(self, attention_mask: np.ndarray) -> None:
        """Raise UsageError when a mask [B, T] is padded on the side this artifact does not take."""
        mask = np.asarray(attention_mask)
        if mask.all():
            return
        ones_then_zeros = (np.diff(mask, axis=-1) <= 0).all()
        zeros_then_ones = (np.diff(mask, axis=-1) >= 0).all()
        if self.padding == "right" and not ones_then_zeros:
            raise UsageError(f"{self.path} has GroupQueryAttention, which takes right-padded "
                             "batches (each mask row: ones, then zeros)")
        if self.padding == "left" and not zeros_then_ones:
            raise UsageError(f"{self.path} takes left-padded batches (each mask row: zeros, "
                             "then ones)")

    # -- generation: the decoder protocol of modelfold.generation --------------------------------
    def new_cache(self, batch: int, capacity: int) -> list[Any]:
        """The empty cache of a generation: one shared [B, H, capacity, D] buffer per past /
        present pair (right padding), or zero-length OrtValues (left padding).

        The buffers are zeros: GroupQueryAttention reads only the rows it wrote, but a layer
        that shares another's cache (``modelfold::attend``) multiplies every row by its
        probability, zero for rows not written yet, and ``0 * NaN`` from uninitialised memory
        would be NaN."""
        if self.padding == "right":
            shape = (batch, self.num_kv_heads, capacity, self.head_dim)
            return [ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, self.cache_dtype),
                                                     self._device, 0)
                    for _ in self.past_names]
        return [ort.OrtValue.ortvalue_from_numpy(p, self._device, 0) for p in self.empty_past(batch)]

    def bound_step(self, input_ids: np.ndarray, attention_mask: np.ndarray,
                   position_ids: np.ndarray, cache: list[Any],
                   logits_to_keep: int = 0) -> tuple[np.ndarray, list[Any]]:
        """One forward pass with IO binding: the cache stays in OrtValues (shared buffers are
        written in place and stay bound from step to step: only the token, the mask and the
        positions are bound anew), the logits land in a reused buffer (a view the next step
        overwrites). ``logits_to_keep`` k > 0 asks for the logits of the last k positions only
        ([B, k, V]; artifacts without the ``logits_to_keep`` input return all S)."""
        io = self._io
        shared = self.padding == "right"
        seq = input_ids.shape[1]
        keep = logits_to_keep if self.keeps_logits and 0 < logits_to_keep < seq else 0
        if not shared or self._bound is not cache:
            io.clear_binding_inputs()
            io.clear_binding_outputs()
            self._bound, self._logits_bound, self._keep_bound = cache, None, None
            for name, value in zip(self.past_names, cache):
                io.bind_ortvalue_input(name, value)
            # run_with_iobinding does not apply the RunOptions' active adapter (ORT 1.32: the
            # logits were the base model's): its tensors are bound as the inputs they override
            for name, value in self._adapter_inputs.items():
                io.bind_ortvalue_input(name, value)
        if self.keeps_logits and keep != self._keep_bound:
            # an overridable initializer: bind_cpu_input looks for a graph input and fails
            self._keep_value = ort.OrtValue.ortvalue_from_numpy(np.array(keep, dtype=np.int64))
            io.bind_ortvalue_input(LOGITS_TO_KEEP, self._keep_value)
            self._keep_bound = keep
        logits = self._logits_buffer((input_ids.shape[0], keep or seq))
        if self._logits_bound is not logits[1]:
            if shared and self._logits_bound is not None:  # outputs are rebound as a set
                io.clear_binding_outputs()
            io.bind_ortvalue_output(sig.LOGITS, logits[1])  # first: get_outputs() follows this
            for name, value in zip(self.present_names, cache):
                if shared:
                    io.bind_ortvalue_output(name, value)
                else:
                    io.bind_output(name, self._device)
            self._logits_bound = logits[1]
        for name, value in self._small_feeds(input_ids, attention_mask, position_ids).items():
            io.bind_cpu_input(name, value)
        self.session.run_with_iobinding(io, self.run_options)
        if shared:
            return logits[0], cache
        return logits[0], io.get_outputs()[1:]

    def _logits_buffer(self, shape: tuple[int, ...]) -> tuple[np.ndarray, Any]:
        """A ``[B, S, V]`` view of one buffer kept for the session's life (grown, never shrunk):
        a fresh 200 MB buffer for a 1,024-token prefill cost SmolLM2 0.6 s of page faults, more
        than its LM head, on every prompt (ONNX Runtime's own arena is warm)."""
        batch, seq = shape
        wanted = (batch, seq, self.vocab_size)
        if self._logits is None or self._logits[0].shape != wanted:
            size = batch * seq * self.vocab_size
            if self._logits_memory is None or self._logits_memory.size < size:
                self._logits_memory = np.empty(size, dtype=self.logits_dtype)
            array = self._logits_memory[:size].reshape(wanted)
            self._logits = (array, ort.OrtValue.ortvalue_from_numpy(array))
        return self._logits

    def generate(
        self,
        input_ids: Sequence[int] | Sequence[Sequence[int]] | np.ndarray,
        max_new_tokens: int,
        eos_token_id: int | Sequence[int] | None = None,
        sampling: Sampling | None = None,
        pad_token_id: int = 0,
    ) -> dict[str, Any]:
        """Generate from one prompt or a batch of prompts (``modelfold.generation.generate``):
        greedy by default, or sampled (``Sampling``: temperature, top-k, top-p, seed).

        Returns:
            One prompt: `tokens` (prompt + new), `new_tokens`; a batch: `sequences`,
            `new_tokens` (one list per prompt). Both: `prefill_seconds` (prompt -> first token),
            `decode_seconds` (the remaining steps), `decode_tokens_per_s`.
        """
        return generate(_Bound(self), input_ids, max_new_tokens, eos_token_id, sampling,
                        pad_token_id)


class _Bound:
    """``OnnxCausalLM`` as a ``modelfold.generation.Decoder`` over its IO-bound step."""

    def __init__(self, lm: OnnxCausalLM):
        self.lm = lm
        self.padding = lm.padding
        self.new_cache = lm.new_cache
        self.step = lm.bound_step


def _cache_shape(model_path: Path, shape: list) -> list:
    """A past input's ``[B, H, P, D]`` with H and D as numbers: from the graph, or, where the
    graph leaves them symbolic (onnxruntime-genai's ``kv_cache_dim``), from the folder's
    ``config.json`` / ``genai_config.json``."""
    if isinstance(shape[1], int) and isinstance(shape[3], int):
        return shape
    import json

    for name, keys in (("genai_config.json", ("model", "decoder")), ("config.json", ())):
        path = model_path.parent / name
        if path.is_file():
            config = json.loads(path.read_text())
            for key in keys:
                config = config.get(key, {})
            heads = config.get("num_key_value_heads") or config.get("num_attention_heads")
            dim = config.get("head_size") or config.get("head_dim") or (
                config.get("hidden_size", 0) // (config.get("num_attention_heads") or 1))
            if heads and dim:
                return [shape[0], heads, shape[2], dim]
    raise UsageError(f"{model_path}: the KV cache's head count / size are symbolic and no "
                     "config.json gives them")


def _has_op(model_path: Path, op_type: str) -> bool:
    """Whether the graph in ``model_path`` has a node of ``op_type`` (weights not loaded)."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    return any(node.op_type == op_type for node in graph.node)


class OnnxEncoder:
    """An encoder artifact: `(input_ids, attention_mask[, token_type_ids]) -> last_hidden_state`.

    Args:
        artifact_dir: Directory holding `model.onnx` (or the `.onnx` file itself).
        threads: Intra-op threads (None: one per physical core).
        optimization_level: Graph optimizations ONNX Runtime applies at load.
        adapter: A LoRA adapter applied to every run (see `OnnxCausalLM`).
        provider: Execution provider, "cpu" or "cuda" (see `OnnxCausalLM`).
    """

    def __init__(
        self,
        artifact_dir: Path,
        *,
        threads: int | None = None,
        optimization_level: str = "all",
        adapter: str | Path | None = None,
        provider: str = "cpu",
    ):
        self.path = _artifact_model(artifact_dir)
        self.session = create_session(self.path, threads=threads,
                                      optimization_level=optimization_level, provider=provider)
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
