"""Export a model to an optimized ONNX Runtime artifact.

Pipeline: wrap the model (KV-cache signature for decoders, `wrappers.py`) ->
`torch.onnx.export(dynamo=True, custom_translation_table=...)` -> ONNX Runtime graph
optimizations applied offline -> `model.onnx` + `model.onnx.data` -> parity check against torch.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort
import torch
from torch import nn

from modelfold.backends.onnxruntime import wrappers
from modelfold.backends.onnxruntime.lora_lowering import check_lora_mode, lora_export
from modelfold.backends.onnxruntime.parity import check_parity
from modelfold.backends.onnxruntime.quant_lowering import check_accuracy_level, lowering_options
from modelfold.backends.onnxruntime.runtime import OPTIMIZATION_LEVELS
from modelfold.backends.onnxruntime.sparse_lowering import check_sparse_mode, sparse_export
from modelfold.backends.onnxruntime.translations import translation_table

__all__ = ["OPTIMIZATION_LEVELS", "check_parity", "copy_tokenizer_files", "export_onnx"]

MODEL_FILE = "model.onnx"
UNOPTIMIZED_FILE = "model.unoptimized.onnx"

# Offline optimization level of the artifact. Decode tokens/s of SmolLM2-135M (ORT 1.32, opset 23,
# 2 threads, 64-token prompt, 64 greedy tokens, median of 5 interleaved runs, session loaded with
# no further optimization): disabled 37.8, basic 43.8, extended 43.2, all 44.6 (torch eager 14.8);
# run-to-run noise on this shared machine is about +-3. basic/extended/all are equal within
# noise. "extended" is chosen: it is the highest level whose output is portable ("all" adds layout
# transforms for this machine's CPU, and ONNX Runtime documents that such a model must then run on
# the same hardware); the runtime may still apply "all" at load time.
DEFAULT_OPTIMIZATION_LEVEL = "extended"

# Files a Hugging Face model/tokenizer directory may hold that an artifact should carry along.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "config.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "added_tokens.json",
    "tokenizer.model",
    "chat_template.jinja",
)

# Example sizes for the dynamic dims: all >= 2 (a 1 specializes) and pairwise different, so that
# torch.export does not unify two dims that merely happen to be equal in the example.
_EXAMPLE_BATCH, _EXAMPLE_SEQUENCE, _EXAMPLE_PAST = 2, 3, 5


def export_onnx(
    model: nn.Module,
    out_dir: Path,
    *,
    opset: int = 23,
    optimize: bool = True,
    optimization_level: str = DEFAULT_OPTIMIZATION_LEVEL,
    keep_unoptimized: bool = False,
    external_data_threshold_bytes: int = 1024,
    parity: bool = True,
    verbose: bool = False,
    accuracy_level: int = 0,
    lora: str = "merge",
    sparse: str = "compressed",
) -> dict[str, Any]:
    """Exports `model` to `out_dir/model.onnx` (+ `model.onnx.data`) for ONNX Runtime.

    A decoder (`*ForCausalLM`) becomes a KV-cache model:
    `input_ids [B,S], attention_mask [B,P+S], position_ids [B,S], past_key_values.{i}.key/value
    [B,H,P,D]` -> `logits [B,S,V], present.{i}.key/value [B,H,P+S,D]`, with dynamic B, S, P
    (P = 0 for the prefill). An encoder becomes
    `input_ids, attention_mask[, token_type_ids]` -> `last_hidden_state`.

    Args:
        model: A Hugging Face model in float32 (any `nn.Module` with a HF config and forward).
        out_dir: Existing directory to write into (the caller owns atomic moves and manifests).
        opset: ONNX opset of the default domain. 23 (the default) has `Attention`,
            `RMSNormalization` and `RotaryEmbedding` ops: SmolLM2-135M decoded at 42.6 tokens/s
            against 31.3 with opset 18, where those are decomposed into small ops (1,184 vs 2,274
            nodes after optimization), with the same parity.
        optimize: Apply ONNX Runtime graph optimizations offline and save the optimized graph.
        optimization_level: One of `OPTIMIZATION_LEVELS`.
        keep_unoptimized: Keep `model.unoptimized.onnx` (+ data) next to the optimized model.
        external_data_threshold_bytes: Initializers at least this large go to `model.onnx.data`.
        parity: Run `check_parity` on the written artifact and include its result.
        verbose: Print the exporter's progress.
        accuracy_level: `accuracy_level` of the `MatMulNBits` nodes that quantized linears
            (`modelfold::quant_linear`) lower to: 0 (default) computes in float32 like the torch
            reference; 4 quantizes the activations to int8 per block inside the kernel, much faster
            on a CPU but only close to the reference; 1, 2, 3 = fp32, fp16, bf16.
        lora: What becomes of LoRA adapters (`LoraLinear` layers; see `lora_lowering.py`):
            "merge" (default) folds the active adapters of float bases into the weights for the
            export (the torch weights are restored exactly) and keeps those of packed bases as
            Gemm branches; "separate" keeps every adapter a Gemm branch; "inputs" exports the
            base with one overridable adapter slot per layer and writes one ONNX Runtime adapter
            file per named adapter under `out_dir/adapters/`.
        sparse: How N:M sparse layers (`NMLinear`, `NMQuantLinear`; see `sparse_lowering.py`) are
            stored: "compressed" (default) keeps the kept values / codes and packed indices, with a
            decompression subgraph that ONNX Runtime constant-folds when it loads the model (so the
            offline optimization runs without constant folding; a session opened with
            optimization_level "disabled" would decompress on every run); "dense" exports dense
            weights (`MatMul` / `MatMulNBits` initializers, a bigger file).

    Returns:
        Facts for the manifest: kind, layer count and cache layout, files and byte sizes, opset,
        `inputs`/`outputs` (name -> dims, symbolic dims by name), op counts, optimization
        level, export/optimize seconds, parity (see `check_parity`), and `lora` (mode, layers,
        merged / kept_unmerged with reasons, adapters, adapter files, base parity) when the model
        has LoRA layers, and `sparse` (mode, layers, patterns, compressed and dense bytes of those
        layers' tensors) when it has N:M sparse layers.
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise ValueError(f"out_dir {out_dir} does not exist; create it before exporting")
    if optimization_level not in OPTIMIZATION_LEVELS:
        raise ValueError(
            f"optimization_level must be one of {sorted(OPTIMIZATION_LEVELS)}, got {optimization_level!r}"
        )
    if external_data_threshold_bytes < 0:
        raise ValueError(f"external_data_threshold_bytes must be >= 0, got {external_data_threshold_bytes}")
    if opset < 18:
        raise ValueError(f"opset must be >= 18 (torch.onnx's dynamo exporter), got {opset}")
    check_accuracy_level(accuracy_level)
    check_lora_mode(lora)
    check_sparse_mode(sparse)
    _check_float32(model)

    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        with (
            wrappers.exportable_experts(model) as experts_impl,
            lowering_options(accuracy_level=accuracy_level),
            sparse_export(model, sparse) as sparse_plan,  # before LoRA: a base may be swapped
            lora_export(model, lora) as lora_plan,
        ):
            if wrappers.is_decoder(model):
                facts = _export_decoder(model, out_dir / UNOPTIMIZED_FILE, opset, verbose)
            else:
                facts = _export_encoder(model, out_dir / UNOPTIMIZED_FILE, opset, verbose)
    finally:
        model.train(was_training)
    facts["export_seconds"] = round(time.perf_counter() - start, 3)
    if experts_impl is not None:
        facts["experts_implementation"] = experts_impl

    facts["tied_weight_matmuls"] = _rewrite_graph_in_place(out_dir / UNOPTIMIZED_FILE)
    lora_plan.expose_inputs(out_dir / UNOPTIMIZED_FILE)
    start = time.perf_counter()
    if optimize:
        _optimize_with_ort(
            out_dir / UNOPTIMIZED_FILE,
            out_dir / MODEL_FILE,
            OPTIMIZATION_LEVELS[optimization_level],
            external_data_threshold_bytes,
            # Folding would write the decompressed (dense) weights into the file; at load it runs.
            disabled_optimizers=["ConstantFolding"] if sparse_plan.compressed else None,
        )
        if not keep_unoptimized:
            _remove_model(out_dir / UNOPTIMIZED_FILE)
    else:
        _resave(out_dir / UNOPTIMIZED_FILE, out_dir / MODEL_FILE, external_data_threshold_bytes)
        _remove_model(out_dir / UNOPTIMIZED_FILE)
    facts["shared_initializers"] = _dedupe_initializers(out_dir / MODEL_FILE,
                                                        external_data_threshold_bytes)
    facts["optimize_seconds"] = round(time.perf_counter() - start, 3)
    facts["optimization_level"] = optimization_level if optimize else "disabled"
    facts["opset"] = opset
    facts["accuracy_level"] = accuracy_level
    facts["files"] = {
        p.name: p.stat().st_size for p in sorted(out_dir.iterdir()) if p.name.startswith("model.")
    }
    facts.update(_graph_facts(out_dir / MODEL_FILE))
    lora_plan.finish(model, out_dir / MODEL_FILE, out_dir)
    if parity:
        if lora_plan.slots:
            facts["parity"] = lora_plan.check_parity(model, out_dir)
        else:
            facts["parity"] = check_parity(model, out_dir)
    if lora_plan.has_layers:
        facts["lora"] = lora_plan.facts
    if sparse_plan.has_layers:
        facts["sparse"] = sparse_plan.facts
    return facts


def copy_tokenizer_files(src_dir: Path, out_dir: Path) -> list[str]:
    """Copies the tokenizer and config files present in `src_dir` into `out_dir`.

    Returns:
        The names of the files copied (absent ones are skipped: not every model has every file).
    """
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    if not src_dir.is_dir():
        raise ValueError(f"tokenizer source {src_dir} is not a directory")
    copied = []
    for name in TOKENIZER_FILES:
        if (src_dir / name).is_file():
            shutil.copy2(src_dir / name, out_dir / name)
            copied.append(name)
    return copied


def _check_float32(model: nn.Module) -> None:
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if dtypes - {torch.float32}:
        raise ValueError(
            f"export_onnx expects float32 floating-point parameters, found {sorted(map(str, dtypes))}; "
            "call model.float() first (lower precision belongs in a quantization pass)"
        )


def _export_decoder(model: nn.Module, path: Path, opset: int, verbose: bool) -> dict[str, Any]:
    layout = wrappers.probe_cache_layout(model)
    num_layers = layout.num_layers
    wrapper = wrappers.KVCacheDecoder(model, num_layers)

    batch, seq, past_len = _EXAMPLE_BATCH, _EXAMPLE_SEQUENCE, _EXAMPLE_PAST
    vocab = _vocab_size(model)
    input_ids = torch.randint(0, vocab, (batch, seq))  # [B, S]
    attention_mask = torch.ones(batch, past_len + seq, dtype=torch.long)  # [B, T]
    position_ids = wrappers.decoder_positions(attention_mask, seq)  # [B, S]
    cache_shape = (batch, layout.num_kv_heads, past_len, layout.head_dim)  # [B, H, P, D]
    past = [torch.randn(cache_shape, dtype=layout.dtype) for _ in range(2 * num_layers)]

    input_names = [wrappers.INPUT_IDS, wrappers.ATTENTION_MASK, wrappers.POSITION_IDS]
    output_names = [wrappers.LOGITS]
    for layer in range(num_layers):
        input_names += [wrappers.past_name(layer, "key"), wrappers.past_name(layer, "value")]
        output_names += [wrappers.present_name(layer, "key"), wrappers.present_name(layer, "value")]
    cache_dims = {0: "batch", 2: "past_sequence"}
    dynamic_shapes = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "total_sequence"},
        "position_ids": {0: "batch", 1: "sequence"},
        "past": tuple(cache_dims for _ in range(2 * num_layers)),
    }
    args = (input_ids, attention_mask, position_ids, *past)
    _torch_onnx_export(wrapper, args, dynamic_shapes, input_names, output_names, path, opset, verbose)
    return {
        "kind": "causal-lm",
        "model_type": getattr(model.config, "model_type", type(model).__name__),
        "num_layers": num_layers,
        "num_kv_heads": layout.num_kv_heads,
        "head_dim": layout.head_dim,
        "vocab_size": vocab,
    }


def _export_encoder(model: nn.Module, path: Path, opset: int, verbose: bool) -> dict[str, Any]:
    wrapper = wrappers.Encoder(model)
    batch, seq = _EXAMPLE_BATCH, _EXAMPLE_SEQUENCE + 2
    input_ids = torch.randint(0, _vocab_size(model), (batch, seq))  # [B, S]
    attention_mask = torch.ones(batch, seq, dtype=torch.long)  # [B, S]
    args: tuple[torch.Tensor, ...] = (input_ids, attention_mask)
    dims = {0: "batch", 1: "sequence"}
    dynamic_shapes: dict[str, Any] = {"input_ids": dims, "attention_mask": dims}
    input_names = [wrappers.INPUT_IDS, wrappers.ATTENTION_MASK]
    if wrappers.encoder_uses_token_type_ids(model):
        args += (torch.zeros(batch, seq, dtype=torch.long),)
        dynamic_shapes["token_type_ids"] = dims
        input_names.append(wrappers.TOKEN_TYPE_IDS)
    output_names = [wrappers.LAST_HIDDEN_STATE]
    _torch_onnx_export(wrapper, args, dynamic_shapes, input_names, output_names, path, opset, verbose)
    return {
        "kind": "encoder",
        "model_type": getattr(model.config, "model_type", type(model).__name__),
        "num_layers": getattr(model.config, "num_hidden_layers", None),
    }


def _torch_onnx_export(
    wrapper: nn.Module,
    args: tuple[torch.Tensor, ...],
    dynamic_shapes: dict[str, Any],
    input_names: list[str],
    output_names: list[str],
    path: Path,
    opset: int,
    verbose: bool,
) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        if not verbose:
            # "The axis name: batch will not be used, since it shares the same shape constraints
            # with another axis: batch" is emitted once per input sharing a dim; it is harmless.
            warnings.simplefilter("ignore")
        logger = logging.getLogger("torch.onnx")
        level = logger.level
        if not verbose:
            logger.setLevel(logging.ERROR)
        try:
            program = torch.onnx.export(
                wrapper,
                args,
                dynamo=True,
                dynamic_shapes=dynamic_shapes,
                input_names=input_names,
                output_names=output_names,
                opset_version=opset,
                custom_translation_table=translation_table(),
                optimize=True,
                verbose=verbose,
                report=False,
            )
        except Exception as err:
            hint = _export_hint(err)
            raise RuntimeError(f"torch.onnx.export failed for {_model_name(wrapper)}: {err}{hint}") from err
        finally:
            logger.setLevel(level)
    # Weights as external data: a >2 GB protobuf cannot be written at all, and a separate data
    # file lets ONNX Runtime memory-map the weights.
    program.save(str(path), external_data=True)


def _export_hint(err: Exception) -> str:
    text = str(err)
    if "No decompositions registered" not in text:
        return ""
    match = re.search(r"target=(torch\.ops\.[\w.]+)", text)
    op_name = match.group(1) if match else "a custom op"
    if op_name.startswith("torch.ops.aten."):
        return f"\n{op_name} has no ONNX lowering in torch.onnx; try another opset."
    return (
        f"\n{op_name} has no ONNX translation: register one with "
        "modelfold.backends.onnxruntime.translations.register_translation(op, fn)."
    )


def _model_name(wrapper: nn.Module) -> str:
    return type(getattr(wrapper, "model", wrapper)).__name__


def _rewrite_graph_in_place(path: Path) -> int:
    """Graph touch-ups before ONNX Runtime's optimizer; returns the tied-weight MatMuls rewritten.

    Only the graph file changes; initializers and the external data file are untouched.
    """
    model = onnx.load(str(path), load_external_data=False)
    rewritten = _matmul_tied_weights(model.graph)
    if rewritten and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    _name_present_length(model.graph)
    onnx.save_model(model, str(path))
    return rewritten


def _name_present_length(graph: onnx.GraphProto) -> None:
    """Names the length dim of every present key/value "total_sequence" (as in attention_mask).

    The exporter writes the symbolic sum, once as "past_sequence + sequence" and once as
    "sequence + past_sequence"; one name tells a consumer that all of them are equal.
    """
    for output in graph.output:
        if output.name.startswith("present."):
            dims = output.type.tensor_type.shape.dim
            if len(dims) == 4 and dims[2].dim_param:
                dims[2].dim_param = "total_sequence"


def _matmul_tied_weights(graph: onnx.GraphProto) -> int:
    """Rewrites `MatMul(x, Transpose(W))` to `FusedMatMul(x, W, transB=1)` when W is shared.

    A tied LM head reads the embedding table [V, E] through a Transpose. ONNX Runtime constant-folds
    that Transpose into a second, transposed copy of the table, which grew SmolLM2-135M's artifact
    from 538 MB to 651 MB. Multiplying by W transposed in the kernel keeps one copy; decode and
    prefill speed were unchanged (33.9 vs 33.5 tokens/s; logits for 256 tokens 1.41 vs 1.39 s).

    Returns:
        The number of MatMuls rewritten.
    """
    initializers = {init.name for init in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    removed: set[int] = set()
    rewritten = 0
    for index, node in enumerate(graph.node):
        weight = node.input[0] if node.op_type == "Transpose" else None
        if weight not in initializers or len(consumers[weight]) < 2:
            continue  # not a shared weight: ONNX Runtime's folding leaves a single copy
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        users = consumers.get(node.output[0], [])
        if perm != [1, 0] or not users:
            continue
        if not all(u.op_type == "MatMul" and u.input[1] == node.output[0] for u in users):
            continue
        for user in users:
            user.op_type, user.domain = "FusedMatMul", "com.microsoft"
            user.input[1] = weight
            user.attribute.extend(
                [onnx.helper.make_attribute("transB", 1), onnx.helper.make_attribute("alpha", 1.0)]
            )
            rewritten += 1
        removed.add(index)
    if removed:
        kept = [node for i, node in enumerate(graph.node) if i not in removed]
        del graph.node[:]
        graph.node.extend(kept)
    return rewritten


def _optimize_with_ort(
    src: Path,
    dst: Path,
    level: ort.GraphOptimizationLevel,
    threshold_bytes: int,
    disabled_optimizers: list[str] | None = None,
) -> None:
    """Runs ONNX Runtime's graph optimizer on `src` and saves the optimized graph as `dst`.

    `disabled_optimizers` names ONNX Runtime graph transformers to skip (e.g. "ConstantFolding",
    which would otherwise store the dense weights that compressed sparse layers decompress to).
    """
    _remove_model(dst)
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.optimized_model_filepath = str(dst)
    options.add_session_config_entry(
        "session.optimized_model_external_initializers_file_name", dst.name + ".data"
    )
    options.add_session_config_entry(
        "session.optimized_model_external_initializers_min_size_in_bytes", str(threshold_bytes)
    )
    options.log_severity_level = 3  # the "model may only run on this hardware" notice is expected
    ort.InferenceSession(
        str(src), options, providers=["CPUExecutionProvider"], disabled_optimizers=disabled_optimizers
    )
    if not dst.is_file():
        raise RuntimeError(f"ONNX Runtime did not write the optimized model {dst}")


def _resave(src: Path, dst: Path, threshold_bytes: int) -> None:
    """Rewrites `src` as `dst` with the external-data threshold applied."""
    _remove_model(dst)
    _save_external(onnx.load(str(src), load_external_data=True), dst, threshold_bytes)


def _save_external(model: onnx.ModelProto, dst: Path, threshold_bytes: int) -> None:
    """Saves `model` as `dst` + `dst.data` (initializers of at least `threshold_bytes`)."""
    onnx.save_model(
        model,
        str(dst),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=dst.name + ".data",
        size_threshold=threshold_bytes,
    )


def _dedupe_initializers(path: Path, threshold_bytes: int) -> dict[str, int]:
    """Stores every distinct initializer value once; returns how many copies and bytes went.

    Layer tying shares one weight among many layers. torch.onnx folds each use's
    ``Transpose(W)`` into its own constant, so the file would hold one transposed copy per
    depth. Copies are found by value (dtype, shape, bytes) and every use is pointed at the first
    one. Initializers that are also graph inputs (overridable, e.g. LoRA adapter slots) are left
    alone, and so are constants under 1 KiB. The file is rewritten only when there is something
    to remove.
    """
    import hashlib

    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=True)
    graph = model.graph
    overridable = {i.name for i in graph.input}
    first: dict[tuple, str] = {}
    rename: dict[str, str] = {}
    saved = 0
    for init in graph.initializer:
        if init.name in overridable:
            continue
        array = numpy_helper.to_array(init)
        if array.nbytes < 1024:  # small constants: not worth a rewrite of the file
            continue
        key = (init.data_type, tuple(init.dims), hashlib.sha256(array.tobytes()).hexdigest())
        if key in first:
            rename[init.name] = first[key]
            saved += array.nbytes
        else:
            first[key] = init.name
    if not rename:
        return {"removed": 0, "bytes_saved": 0}
    outputs = sorted(rename.keys() & {o.name for o in graph.output})
    if outputs:
        raise RuntimeError(f"initializers {outputs} are graph outputs; cannot deduplicate them")
    kept = [init for init in graph.initializer if init.name not in rename]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    _remove_model(path)
    _save_external(model, path, threshold_bytes)
    return {"removed": len(rename), "bytes_saved": int(saved)}


def _remove_model(path: Path) -> None:
    for p in (path, path.with_name(path.name + ".data")):
        p.unlink(missing_ok=True)


def _graph_facts(path: Path) -> dict[str, Any]:
    """Input/output shapes (symbolic dims by name) and op counts of the saved graph."""
    graph = onnx.load(str(path), load_external_data=False).graph

    def shapes(values) -> dict[str, list[int | str]]:
        return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in values}

    counts: dict[str, int] = {}
    for node in graph.node:
        key = f"{node.domain}.{node.op_type}" if node.domain else node.op_type
        counts[key] = counts.get(key, 0) + 1
    # Overridable initializers (LoRA adapter slots, lora="inputs") are inputs with a default.
    initializers = {init.name for init in graph.initializer}
    return {
        "inputs": shapes(i for i in graph.input if i.name not in initializers),
        "outputs": shapes(graph.output),
        "onnx_nodes": dict(sorted(counts.items())),
    }


def _vocab_size(model: nn.Module) -> int:
    vocab = getattr(model.config, "vocab_size", None)
    if not isinstance(vocab, int) or vocab < 2:
        raise ValueError(f"model.config.vocab_size is {vocab!r}; the export needs the vocabulary size")
    return vocab
