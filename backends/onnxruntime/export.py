"""Export a Program to an optimized ONNX Runtime artifact.

The exporter lowers the Program's verified ``ExportedProgram`` (captured once with the backends'
signature, ``modelfold.ir.signature``): no second capture. Phases, each reported with its
elapsed time when a ``progress`` callback is given:

1. verify: the Program's graph (``modelfold.ir.verify``), unless the last pass already verified it;
2. lower: the graph passes this backend applies by default (``default_for`` "onnxruntime", e.g.
   ``tied-linear``; ``ExportOptions.disable`` skips them) and the graph steps of the registered
   lowerings (``lowering.py``: LoRA modes, N:M storage modes), each output verified; the last
   verified graph is the one translated;
3. translate: ``torch.onnx.export(exported_program, custom_translation_table=...)``;
4. optimize: ONNX Runtime's graph optimizations, applied offline;
5. save: ``model.onnx`` + ``model.onnx.data`` (equal initializers stored once);
6. parity: the artifact against the torch model.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort
import torch
from torch import nn
from torch.export import ExportedProgram

from modelfold.backends.onnxruntime.lowering import lowerings
from modelfold.backends.onnxruntime.options import ExportOptions, export_options
from modelfold.backends.onnxruntime.parity import check_parity
from modelfold.backends.onnxruntime.runtime import (
    MODEL_FILE,
    OPTIMIZATION_LEVELS,
    execution_providers,
)
from modelfold.backends.onnxruntime.translations import translation_table
from modelfold.errors import ModelfoldError, UsageError
from modelfold.ir.capture import owning_module
from modelfold.ir.graph import past_dtype
from modelfold.ir.program import Program
from modelfold.ir.shared_attention import sharing_of
from modelfold.ir.verify import verify, verify_graph

__all__ = ["OPTIMIZATION_LEVELS", "ExportError", "check_parity", "copy_tokenizer_files",
           "export_onnx", "lowered_graph"]

UNOPTIMIZED_FILE = "model.unoptimized.onnx"

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


class ExportError(ModelfoldError, RuntimeError):
    """The ONNX exporter could not translate the program (a dialect op with no translation...)."""


def export_onnx(model: Program | nn.Module, out_dir: Path, options: ExportOptions | None = None,
                *, progress: Callable[[str], None] | None = None,
                **kwargs: Any) -> dict[str, Any]:
    """Exports a Program (or a model, captured here once) to ``out_dir/model.onnx`` (+ data).

    A decoder becomes a KV-cache model: ``input_ids [B,S], attention_mask [B,T], position_ids
    [B,S], past_key_values.{i}.key/value [B,H,P,D]`` -> ``logits [B,S,V],
    present.{i}.key/value [B,H,T,D]``, with dynamic B, S, P (P = 0 for the prefill) and
    T = P + S. An encoder becomes ``input_ids, attention_mask[, token_type_ids]`` ->
    ``last_hidden_state``.

    Args:
        model: a ``Program`` (its verified graph is lowered) or a Hugging Face model in float32.
        out_dir: existing directory to write into (the caller owns atomic moves and manifests).
        options: ``ExportOptions`` (or give its fields as keyword arguments).
        progress: called with one line per phase (name and elapsed seconds).

    Returns:
        Facts for the manifest: kind, layer count and cache layout, files and byte sizes, opset,
        ``inputs`` / ``outputs`` (name -> dims, symbolic dims by name), op counts, optimization
        level, phase seconds, the graph passes applied by the lowering, ``lowered_graph``
        (whether it is the Program's verified graph and how many captures the export made),
        parity, and per registered lowering its facts (``lora``, ``sparse``) when it has any.
    """
    options = export_options(options, **kwargs)
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise UsageError(f"out_dir {out_dir} does not exist; create it before exporting")
    program = model if isinstance(model, Program) else Program(model)
    _check_float32(program.module)
    options.check_graph_passes()
    providers = execution_providers(options.provider)  # a missing provider fails here, at once
    if options.dtype == "float16":  # a copy of the program in float16, captured there
        program = program.converted(dtype=torch.float16)
    phases = _Phases(progress)
    captures = program.captures
    steps = [cls(program, options) for cls in lowerings()]  # option checks before any work
    with phases("verify"):
        if program.verified_graph is None or program.verified_graph is not program.exported:
            verify(program)
    with phases("lower"):
        ep, applied = lowered_graph(program, options, steps)
    facts = _signature_facts(program)
    facts["graph_passes"] = applied
    if program.signature.kind == "causal-lm":
        facts["attention"] = _attention_facts(ep, applied)
    moe = _moe_facts(program, ep)
    if moe:
        facts["moe"] = moe
    unoptimized = out_dir / UNOPTIMIZED_FILE
    with phases("translate"):
        _translate(ep, program, unoptimized, options, steps)
        graph_file = onnx.load(str(unoptimized), load_external_data=False)
        for step in steps:
            step.edit_onnx(graph_file)
        onnx.save_model(graph_file, str(unoptimized))  # the external data file is unchanged
    with phases("optimize"):
        if options.bounded_memory:
            _move_model(unoptimized, out_dir / MODEL_FILE)
        elif options.optimize:
            disabled = sorted({name for step in steps for name in step.disabled_optimizers()})
            _optimize_with_ort(unoptimized, out_dir / MODEL_FILE,
                               OPTIMIZATION_LEVELS[options.optimization_level],
                               options.external_data_threshold_bytes, disabled or None,
                               providers)
            if not options.keep_unoptimized:
                _remove_model(unoptimized)
        else:
            _resave(unoptimized, out_dir / MODEL_FILE, options.external_data_threshold_bytes)
            _remove_model(unoptimized)
    with phases("save"):
        facts["shared_initializers"] = {} if options.bounded_memory else _dedupe_initializers(
            out_dir / MODEL_FILE, options.external_data_threshold_bytes)
        for step in steps:
            step.finish(out_dir)
    facts["optimization_level"] = options.optimization_level \
        if options.optimize and not options.bounded_memory else "disabled"
    facts["opset"] = options.opset
    facts["provider"], facts["dtype"] = options.provider, options.dtype
    facts["accuracy_level"] = options.accuracy_level
    facts["files"] = {p.name: p.stat().st_size for p in sorted(out_dir.iterdir())
                      if p.name.startswith("model.")}
    facts.update(_graph_facts(out_dir / MODEL_FILE))
    facts["tied_weight_matmuls"] = sum(1 for n in ep.graph.nodes  # tied-linear's rewrites
                                       if str(n.target) == "modelfold.tied_linear.default")
    facts["lowered_graph"] = {"verified": ep is program.verified_graph,
                              "captures_during_export": program.captures - captures}
    if options.parity:
        with phases("parity"):
            custom = [r for r in (step.parity(out_dir) for step in steps) if r is not None]
            facts["parity"] = custom[0] if custom else check_parity(
                program.module, out_dir, provider=options.provider)
    for step in steps:
        if step.facts:
            facts[step.name] = step.facts
    facts["seconds"] = phases.seconds
    facts["export_seconds"] = round(sum(phases.seconds.values()), 3)
    return facts


def lowered_graph(program: Program, options: ExportOptions, steps: list | None = None
                  ) -> tuple[ExportedProgram, dict[str, Any]]:
    """The graph this backend translates: the Program's verified graph after the graph steps of
    the registered lowerings (LoRA merge, N:M storage) and then the graph passes this backend
    applies by default (fusions, ``tied-linear``; ``options.disable`` skips them), each output
    verified and each exact pass checked on a probe batch (``program.verified_graph`` is the
    result). Returns it with the details of the graph passes applied."""
    from modelfold.passes.registry import default_graph_passes

    ep = program.exported
    for step in steps if steps is not None else [c(program, options) for c in lowerings()]:
        new = step.rewrite(ep)
        if new is not ep:
            ep = verify_graph(program, new)
    applied: dict[str, Any] = {}
    done = {p.name for p in program.graph_passes}
    check = _ExactCheck(program)
    for cls in default_graph_passes("onnxruntime"):
        if cls.name in done or cls.name in options.disable or cls.name in program.disabled:
            continue
        graph_pass = cls()
        new, details = graph_pass.rewrite(program, ep)
        applied[cls.name] = details
        if new is not ep:
            verify_graph(program, new)
            check(graph_pass, ep, new)
            ep = new
    return ep, applied


class _ExactCheck:
    """Checks that an exact graph pass the lowering applied left the logits where they were (the
    pass manager's check, for passes no pipeline named): a small probe through both graphs, with
    every MoE layer routing to all its experts (top-k routing is discontinuous: a rounding-level
    difference can swap an expert at a near tie and move the logits far more than the pass)."""

    def __init__(self, program: Program):
        self.program = program
        self.probe: torch.Tensor | None = None
        self.before: tuple[int, torch.Tensor] | None = None

    def __call__(self, graph_pass: Any, before: ExportedProgram, after: ExportedProgram) -> None:
        from modelfold.passes.base import PostconditionError
        from modelfold.passes.fidelity import probe_inputs

        if graph_pass.kind != "exact":
            return
        if self.probe is None:
            self.probe = probe_inputs(self.program, n_samples=2, seq_len=32)[0]
        if self.before is None or self.before[0] != id(before):
            self.before = (id(before), self.program.graph_logits(self.probe, before,
                                                                 all_experts=True))
        reference = self.before[1]
        logits = self.program.graph_logits(self.probe, after, all_experts=True)
        diff = float((logits - reference).abs().max())
        # float16 programs (dtype="float16") round every op to 11 bits: 2e-3 of the logits' size
        rtol = max(graph_pass.exact_rtol, 2e-3 if reference.dtype == torch.float16 else 0.0)
        tolerance = 1e-4 + rtol * float(reference.abs().max())
        if not diff <= tolerance:
            raise PostconditionError(
                f"exact graph pass {graph_pass.name} changed the logits by {diff:.3g} (> "
                f"tolerance {tolerance:g}); export with --disable {graph_pass.name} and report "
                "the model")
        self.before = (id(after), logits)


class _Phases:
    """Times the export's phases and reports each (``progress``) as it starts and ends."""

    def __init__(self, progress: Callable[[str], None] | None):
        self.progress = progress
        self.seconds: dict[str, float] = {}
        self.start = time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.progress:
            self.progress(f"export: {name} ...")
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 3)
        if self.progress:
            self.progress(f"export: {name} done in {self.seconds[name]:.1f} s "
                          f"({time.perf_counter() - self.start:.0f} s so far)")


def _attention_facts(ep: ExportedProgram, applied: dict[str, Any]) -> dict[str, Any]:
    """How the artifact's attention and KV cache work (what the runtime must feed)."""
    from modelfold.passes.fuse_attention import fused_attention

    if fused_attention(ep):
        facts = {"op": "com.microsoft.GroupQueryAttention", "layers": fused_attention(ep),
                 "padding": "right",
                 "kv_cache": "past and present may be one buffer per layer (written in place)"}
        shared = (applied.get("fuse-attention") or {}).get("shared")
        if shared:  # borrowers attend to their owner's cache (modelfold::attend)
            facts["shared"] = {"mode": shared["mode"], "borrowers": shared["borrowers"],
                               "op": "MatMul / Softmax over the owner's cache"}
        return facts
    details = applied.get("fuse-attention")
    reason = details.get("not_fused", "") if details else "fuse-attention was disabled"
    return {"op": "the captured attention", "padding": "left",
            "kv_cache": "present = past + new tokens (Concat)", "not_fused": reason,
            "skipped": (details or {}).get("skipped", [])}


def _moe_facts(program: Program, ep: ExportedProgram) -> dict[str, Any]:
    """How each mixture-of-experts FFN (``moefy``) runs in the artifact."""
    from modelfold.backends.onnxruntime.moe_lowering import kernel_activation
    from modelfold.ir.graph import calls
    from modelfold.ir.moe import moe_layers

    layers = moe_layers(program.module)
    if not layers:
        return {}
    nodes = {}
    for node in calls(ep.graph):
        name = getattr(node.target, "name", lambda: "")()
        if name in ("modelfold::moe", "modelfold::quant_moe"):
            owner = owning_module(node) or ""
            nodes[owner] = name
    how = {}
    for path, m in layers.items():
        op = next((v for k, v in nodes.items() if k == path or k.startswith(path + ".")), None)
        if op == "modelfold::quant_moe":
            how[path] = "com.microsoft.QMoE (chosen experts only)"
        elif op == "modelfold::moe" and kernel_activation(m.activation, m.gated):
            how[path] = "com.microsoft.MoE (chosen experts only)"
        else:
            how[path] = "every expert, weighted (all expert weights read)"
    first = next(iter(layers.values()))
    return {"experts": first.num_experts, "top_k": first.top_k, "weighting": first.weighting,
            "layers": how}


def _signature_facts(program: Program) -> dict[str, Any]:
    sig = program.signature
    config = program.module.config
    facts: dict[str, Any] = {"kind": sig.kind,
                             "model_type": getattr(config, "model_type", type(program.module).__name__)}
    if sig.kind == "causal-lm":
        cache = sig.cache
        facts.update(num_layers=cache.num_layers, num_kv_heads=cache.num_kv_heads,
                     head_dim=cache.head_dim, vocab_size=config.vocab_size)
        dtype = past_dtype(program.exported, sig) or cache.dtype  # int8 after quantize-kv
        row = cache.num_kv_heads * cache.head_dim * torch.empty((), dtype=dtype).element_size()
        facts["kv_cache_bytes_per_token"] = {"artifact": len(cache.entries) * row,
                                             "without_sharing": 2 * cache.num_layers * row}
        sharing = sharing_of(program.module)
        if sharing is not None:
            facts["attention_sharing"] = {"mode": sharing.mode, "groups": sharing.groups}
        if getattr(config, "_experts_implementation", None) is not None:
            facts["experts_implementation"] = "batched_mm"  # what capture uses (signature.py)
    else:
        facts["num_layers"] = getattr(config, "num_hidden_layers", None)
    return facts


def _translate(ep: ExportedProgram, program: Program, path: Path, options: ExportOptions,
               steps: list) -> None:
    """``torch.onnx.export`` of ``ep`` to ``path`` (+ external data), dims named as the signature."""
    sig = program.signature
    with contextlib.ExitStack() as stack, warnings.catch_warnings(), torch.no_grad():
        for step in steps:
            stack.enter_context(step.context())
        logger = logging.getLogger("torch.onnx")
        level = logger.level
        if not options.verbose:
            # "The axis name: batch will not be used, since it shares the same shape constraints
            # with another axis: batch" is emitted once per input sharing a dim; it is harmless.
            warnings.simplefilter("ignore")
            logger.setLevel(logging.ERROR)
        try:
            onnx_program = torch.onnx.export(
                ep, (), dynamo=True, input_names=list(sig.inputs), output_names=list(sig.outputs),
                opset_version=options.opset, custom_translation_table=translation_table(),
                optimize=True, verbose=options.verbose, report=False)
        except Exception as err:
            raise ExportError(f"torch.onnx.export failed for {type(program.module).__name__}: "
                              f"{err}{_export_hint(err)}") from err
        finally:
            logger.setLevel(level)
    # Weights as external data: a >2 GB protobuf cannot be written at all, and a separate data
    # file lets ONNX Runtime memory-map the weights.
    onnx_program.save(str(path), external_data=True)
    _name_dims(path, ep, program)


def _name_dims(path: Path, ep: ExportedProgram, program: Program) -> None:
    """Gives the symbolic dims of the ONNX inputs and outputs the signature's names (batch,
    sequence, past_sequence, total_sequence) instead of torch.export's symbols (``s10``); the
    present keys/values' length is ``total_sequence``, as in the attention mask. Only the graph
    file changes."""
    sig = program.signature
    symbols: dict[str, str] = {}
    inputs = [n for n in ep.graph.nodes if n.op == "placeholder"][-len(sig.inputs):]
    for name, node in zip(sig.inputs, inputs):
        shape = getattr(node.meta.get("val"), "shape", ())
        for axis, dim in sig.dims.get(name, {}).items():
            if axis < len(shape) and not isinstance(shape[axis], int):
                symbols[str(shape[axis])] = dim
    if not symbols:
        return
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, symbols)) + r")\b")
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    for value in [*graph.input, *graph.output, *graph.value_info]:
        for d in value.type.tensor_type.shape.dim:
            if d.dim_param:
                d.dim_param = pattern.sub(lambda m: symbols[m.group(1)], d.dim_param)
    for output in graph.output:
        if output.name.startswith("present."):
            dims = output.type.tensor_type.shape.dim
            if len(dims) == 4 and dims[2].dim_param:
                dims[2].dim_param = "total_sequence"
    onnx.save_model(model, str(path))


def copy_tokenizer_files(src_dir: Path, out_dir: Path) -> list[str]:
    """Copies the tokenizer and config files present in `src_dir` into `out_dir`.

    Returns:
        The names of the files copied (absent ones are skipped: not every model has every file).
    """
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    if not src_dir.is_dir():
        raise UsageError(f"tokenizer source {src_dir} is not a directory")
    copied = []
    for name in TOKENIZER_FILES:
        if (src_dir / name).is_file():
            shutil.copy2(src_dir / name, out_dir / name)
            copied.append(name)
    return copied


def _check_float32(model: nn.Module) -> None:
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if dtypes - {torch.float32}:
        raise UsageError(
            f"export_onnx expects float32 floating-point parameters, found {sorted(map(str, dtypes))}; "
            "call model.float() first (a float16 artifact: export option dtype='float16'; lower "
            "precision belongs in a quantization pass)"
        )


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


def _optimize_with_ort(
    src: Path,
    dst: Path,
    level: ort.GraphOptimizationLevel,
    threshold_bytes: int,
    disabled_optimizers: list[str] | None = None,
    providers: list[str] | None = None,
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
        str(src), options, providers=providers or ["CPUExecutionProvider"],
        disabled_optimizers=disabled_optimizers
    )
    if not dst.is_file():
        raise RuntimeError(f"ONNX Runtime did not write the optimized model {dst}")


def _move_model(src: Path, dst: Path) -> None:
    """Move `src` and its external data file to `dst` / `dst.data` without loading the data:
    only the data file's name inside the graph changes."""
    model = onnx.load(str(src), load_external_data=False)
    old_data = {entry.value for init in model.graph.initializer
                for entry in init.external_data if entry.key == "location"}
    if len(old_data) > 1:
        raise RuntimeError(f"the exporter wrote several external data files: {sorted(old_data)}")
    for init in model.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                entry.value = dst.name + ".data"
    for name in old_data:
        (src.parent / name).replace(dst.parent / (dst.name + ".data"))
    onnx.save_model(model, str(dst))
    src.unlink()


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
