"""The ``modelfold`` command line.

    modelfold assets pull                      install the embedded model, encoder and corpus
    modelfold passes                           list passes, options, defaults and docs
    modelfold convert [MODEL] -p PIPELINE -o OUT/ [--save-model CKPT/] [--adapter DIR]
    modelfold convert BIG/ -p "quantize{method=gptq}" --stream --save-model CKPT/ [--nproc N]
    modelfold finetune [MODEL] -p "lora{rank=8,alpha=16}" [--steps N] [--teacher] -o OUT/
    modelfold inspect MODEL_OR_ARTIFACT [--graph FILE]
    modelfold eval MODEL_OR_ARTIFACT [--adapter DIR] [--corpus NAME | --text FILE] [--chars N]
    modelfold generate ARTIFACT "prompt" [--max-new-tokens N] [--adapter NAME]

Every command that reports figures takes ``--json`` and then prints one JSON object on stdout.
Bad input ends with one ``modelfold: error: ...`` line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from modelfold.errors import UsageError


def _print_json(obj: Any) -> None:
    def default(o: Any) -> Any:
        return str(o)

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return str(v)
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    print(json.dumps(clean(obj), indent=2, default=default))


# -- commands --------------------------------------------------------------------------------
def cmd_passes(args: argparse.Namespace) -> int:
    from modelfold.passes.registry import registered_passes

    passes = registered_passes()
    if args.json:
        _print_json({name: {"kind": cls.kind, "level": cls.level, "summary": cls.summary,
                            "streams": bool(getattr(cls, "streams", False)),
                            "doc": (cls.__doc__ or "").strip(),
                            "options": cls.config_class.describe_options()}
                     for name, cls in passes.items()})
        return 0
    for name, cls in passes.items():
        streams = ", streams (--stream)" if getattr(cls, "streams", False) else ""
        print(f"{name}  ({cls.kind}, {cls.level} pass{streams})")
        print(f"    {cls.summary or (cls.__doc__ or '').strip()}")
        for opt in cls.config_class.describe_options():
            print(f"    {opt['name']:<12} {opt['type']:<28} default {opt['default']:<12} "
                  f"{opt['help']}")
        print()
    print("Pipeline syntax: name{key=value,key=[1,2]},name2  (or a YAML recipe file)")
    return 0


def cmd_assets(args: argparse.Namespace) -> int:
    from modelfold import assets

    if args.action == "pull":
        paths = assets.pull(args.names or None, force=args.force)
        if args.json:
            _print_json({k: str(v) for k, v in paths.items()})
        else:
            for name, path in paths.items():
                print(f"{name}: {path}")
        return 0
    rows = assets.list_assets()
    if args.json:
        _print_json(rows)
    else:
        for r in rows:
            mark = "installed" if r["installed"] else "not installed"
            print(f"{r['name']:<14} {r['kind']:<7} {mark:<14} {r['path']}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from modelfold.artifact import MANIFEST
    from modelfold.assets import check_output, output_lock
    from modelfold.checkpoint import check_destination
    from modelfold.distributed import init_from_env, is_main

    if args.nproc < 1:
        raise _UserError(f"--nproc must be >= 1; got {args.nproc}")
    if args.stream and args.no_stream:
        raise _UserError("--stream and --no-stream contradict each other; give one")
    if args.nproc > 1 and not _launched():
        # every rank must make the same choice: decide here, tell the workers
        decided = [] if args.stream or args.no_stream or not args.pipeline else \
            ["--stream" if _should_stream(args) else "--no-stream"]
        return _launch_ranks(args.nproc, decided)
    if _launched() and args.pipeline and not (args.stream or args.no_stream):
        raise _UserError("under torchrun give --stream or --no-stream, so that every rank "
                         "makes the same choice")
    init_from_env()
    if not is_main():  # workers calibrate; rank 0 checks and writes the outputs
        return _convert(args, Path(args.output) if args.output is not None else None)
    if args.output is None and args.save_model is None:
        raise _UserError("nothing to write: give -o OUT/ for an ONNX Runtime artifact and/or "
                         "--save-model DIR/ for a checkpoint that modelfold can reload")
    out = Path(args.output) if args.output is not None else None
    if out is not None:
        check_output(out, overwrite=args.overwrite, what="artifact", markers=(MANIFEST,))
    if args.save_model is not None:
        if out is not None and Path(args.save_model).resolve() == out.resolve():
            raise _UserError("-o and --save-model must name different folders")
        check_destination(args.save_model, args.overwrite)
    with contextlib.ExitStack() as locks:  # a second convert to the same output fails at once
        for path in (out, args.save_model):
            if path is not None:
                locks.enter_context(output_lock(path))
        return _convert(args, out)


def _convert(args: argparse.Namespace, out: Path | None) -> int:
    import modelfold
    from modelfold.backends.onnxruntime.options import ExportOptions
    from modelfold.passes.manager import PassContext
    from modelfold.passes.pipeline import build_pipeline

    # Everything that can be checked is checked before the model loads.
    disabled = tuple(args.disable or ()) + fusions_named(args.no_fuse or ())
    export_options = ExportOptions(parity=not args.no_parity, accuracy_level=args.accuracy_level,
                                   lora=args.lora_export, sparse=args.sparse_export,
                                   disable=disabled, provider=args.provider, dtype=args.dtype,
                                   bounded_memory=_streamed_checkpoint(args))
    export_options.check_graph_passes()
    if args.pipeline:
        build_pipeline(args.pipeline)
    if args.pipeline and _should_stream(args):
        return _convert_streamed(args, out, export_options)
    program = _load_for_convert(args)
    if args.adapter:
        _apply_adapter(program, args.adapter, quiet=args.json)
    if args.pipeline:
        context = PassContext(verify=not args.no_verify, disabled=disabled)
        result = modelfold.transform(program, args.pipeline, context=context)
    else:  # convert the model as it is (e.g. a checkpoint saved by --save-model)
        result = modelfold.TransformResult(program, "")
    summary: dict[str, Any] = {"pipeline": result.pipeline}
    from modelfold.distributed import is_main

    if not is_main():
        return 0
    if args.save_model is not None:
        # Saved before the export, so a failed export still leaves the transformed model.
        saved = modelfold.save(result, args.save_model, overwrite=args.overwrite,
                               format=args.save_format)
        kind = saved["format"] if saved["format"] != "modelfold-checkpoint" else "modelfold"
        summary.update(checkpoint=args.save_model, checkpoint_bytes=sum(saved["files"].values()),
                       checkpoint_format=kind)
        if not args.json:
            print(f"saved checkpoint {args.save_model}/ ({kind} format, "
                  f"{summary['checkpoint_bytes'] / 2**20:.1f} MiB)")
    if out is None:
        if args.json:
            _print_json(summary)
        return 0
    manifest = modelfold.export(result, out, overwrite=args.overwrite, options=export_options,
                                progress=_stderr_line)
    summary.update({"output": str(out), "parameters": manifest["model"]["parameters"],
                    "layers": manifest["model"]["layers"], "onnx_bytes": manifest["onnx_bytes"],
                    "parity": manifest["parity"]})
    if manifest["onnx"].get("kv_cache_bytes_per_token"):
        summary["kv_cache_bytes_per_token"] = manifest["onnx"]["kv_cache_bytes_per_token"]
    if args.json:
        _print_json(summary)
    else:
        print(f"wrote {out}/ ({manifest['onnx_bytes'] / 2**20:.1f} MiB ONNX, "
              f"{summary['layers']} layers, {summary['parameters']:,} parameters)")
        if manifest["parity"]:
            print("parity vs torch: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else
                                                   f"{k} {v}" for k, v in
                                                   manifest["parity"].items()))
        print(f"report: {out / 'report.md'}")
    return 0


def _launched() -> bool:
    import os

    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _launch_ranks(nproc: int, extra: list[str]) -> int:
    """Run this same command in ``nproc`` processes of one gloo group (what ``torchrun`` does);
    rank 0 prints and writes. A rank that fails stops the others."""
    import os
    import socket
    import subprocess
    import time

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    argv = [a for a in sys.argv[1:]]
    cleaned, skip = [], False
    for a in argv:  # drop --nproc N / --nproc=N
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        cleaned.append(a)
    cleaned += extra
    procs = []
    for rank in range(nproc):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               **({"TQDM_DISABLE": "1"} if rank else {}),
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS",
                                                 str(max(1, (os.cpu_count() or 1) // nproc)))}
        procs.append(subprocess.Popen([sys.executable, "-m", "modelfold", *cleaned], env=env,
                                      stdout=None if rank == 0 else subprocess.DEVNULL))
    status = [None] * nproc
    failure = 0  # the exit status of the first rank that failed on its own
    try:
        while any(s is None for s in status):
            for i, proc in enumerate(procs):
                if status[i] is None:
                    status[i] = proc.poll()
            if any(s not in (None, 0) for s in status):
                failure = next(s for s in status if s not in (None, 0))
                for proc in procs:
                    if proc.poll() is None:
                        proc.terminate()
                for proc in procs:
                    proc.wait()
                break
            time.sleep(0.2)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    if not failure:
        failure = next((p.returncode for p in procs if p.returncode), 0)
    # not the status of a rank this launcher stopped (SIGTERM: 241); a signal N is 128 + N
    return failure if failure >= 0 else 128 - failure


def _should_stream(args: argparse.Namespace) -> bool:
    """--stream, or automatically: a checkpoint whose float32 weights exceed --max-memory."""
    from modelfold.assets import resolve_model
    from modelfold.streaming import needs_streaming, parse_bytes

    if args.no_stream:
        return False
    if args.stream:
        return True
    if args.adapter:
        return False
    budget = parse_bytes(args.max_memory) if args.max_memory else None
    stream, why = needs_streaming(resolve_model(args.model), budget)
    if stream and not args.json:
        _stderr_line(f"streaming one layer at a time: {why} (--no-stream to load it whole)")
    return stream


def _convert_streamed(args: argparse.Namespace, out: Path | None, export_options: Any) -> int:
    from modelfold.distributed import is_main
    from modelfold.streaming import stream_transform

    if args.save_model is None:
        raise _UserError("streaming writes the transformed model as a checkpoint: give "
                         "--save-model DIR/ (and -o OUT/ to export it to ONNX as well)")
    if args.adapter:
        raise _UserError("--adapter cannot be combined with streaming; apply the adapter in a "
                         "run without --stream")
    try:
        manifest = stream_transform(args.model, args.pipeline, args.save_model,
                                    activation_budget=args.activation_budget,
                                    overwrite=args.overwrite, resume=not args.no_resume,
                                    measure=not args.no_verify,
                                    log=None if not args.json else (lambda line: None))
    except KeyboardInterrupt:
        if is_main():
            print(f"modelfold: interrupted; the layers finished so far are kept in "
                  f"{args.save_model.rstrip('/')}.partial/ - run the same command to continue "
                  "(--no-resume to start over)", file=sys.stderr)
        return 130
    if not is_main():
        return 0
    record = manifest["passes"][-1]
    streaming = record.get("details", {}).get("streaming", {})
    summary: dict[str, Any] = {"pipeline": manifest["pipeline"], "checkpoint": args.save_model,
                               "checkpoint_bytes": sum(manifest["files"].values()),
                               "checkpoint_format": "modelfold", "streamed": True,
                               "peak_rss_bytes": max(r.get("details", {}).get("streaming", {})
                                                     .get("peak_rss_bytes", 0)
                                                     for r in manifest["passes"]),
                               "layers": streaming.get("layers"),
                               "fidelity": record.get("fidelity", {})}
    if not args.json:
        print(f"saved checkpoint {args.save_model}/ (modelfold format, sharded, "
              f"{summary['checkpoint_bytes'] / 2**20:.1f} MiB); peak RSS "
              f"{summary['peak_rss_bytes'] / 2**30:.2f} GiB")
    if out is not None:
        from modelfold.streaming import export_streamed

        facts = export_streamed(args.save_model, out, overwrite=args.overwrite,
                                options=export_options, progress=_stderr_line)
        summary.update({"output": str(out), "onnx_bytes": facts["onnx_bytes"],
                        "onnx_peak_rss_bytes": facts["peak_rss_bytes"]})
        if not args.json:
            print(f"wrote {out}/ ({facts['onnx_bytes'] / 2**20:.1f} MiB ONNX)")
    if args.json:
        _print_json(summary)
    return 0


def _load_for_convert(args: argparse.Namespace) -> Any:
    """The model to convert; a checkpoint exported as it is gets memory-mapped weights (only
    what the export reads is paged in: a streamed checkpoint larger than memory exports)."""
    import modelfold
    from modelfold.assets import resolve_model
    from modelfold.checkpoint import is_checkpoint, load_checkpoint

    path = resolve_model(args.model)
    if not args.pipeline and not args.adapter and is_checkpoint(path):
        return load_checkpoint(path, mmap=True)
    return modelfold.load(args.model)


def _streamed_checkpoint(args: argparse.Namespace) -> bool:
    """Whether MODEL is a checkpoint written by streaming (exported with bounded memory)."""
    from modelfold.assets import resolve_model
    from modelfold.checkpoint import is_checkpoint, read_manifest
    from modelfold.errors import ModelfoldError

    if args.pipeline:
        return False
    try:  # a missing or bad model is reported later, in its turn
        path = resolve_model(args.model)
        return is_checkpoint(path) and bool(read_manifest(path).get("streamed"))
    except ModelfoldError:
        return False


def fusions_named(names: Sequence[str]) -> tuple[str, ...]:
    """The fusion passes ``--no-fuse`` names: ``attention`` or ``fuse-attention`` ..., or
    ``all`` (every ``fuse-*`` graph pass the ONNX lowering applies by default)."""
    from modelfold.passes.registry import default_graph_passes

    fusions = [cls.name for cls in default_graph_passes("onnxruntime")
               if cls.name.startswith("fuse-")]
    chosen: list[str] = []
    for name in names:
        full = name if name.startswith("fuse-") else f"fuse-{name}"
        if name == "all":
            chosen += fusions
        elif full in fusions:
            chosen.append(full)
        else:
            raise _UserError(f"--no-fuse {name}: not a fusion; one of "
                             f"{', '.join(f.removeprefix('fuse-') for f in fusions)}, all")
    return tuple(dict.fromkeys(chosen))


def _stderr_line(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


GRAPH_FORMATS = (".svg", ".html", ".htm")


def cmd_inspect(args: argparse.Namespace) -> int:
    from modelfold.artifact import is_artifact

    if args.graph and not args.graph.lower().endswith(GRAPH_FORMATS):
        raise _UserError(f"--graph writes SVG or HTML; give a file ending in "
                         f"{', '.join(GRAPH_FORMATS)} (got {args.graph!r})")
    if is_artifact(args.target):
        info = _inspect_artifact(Path(args.target))
        if args.graph:
            raise _UserError("--graph draws a model's dataflow; give a model, not an artifact")
    else:
        info = _inspect_model(args.target, args.graph)
    if args.json:
        _print_json(info)
    else:
        _print_inspect(info)
    return 0


def _inspect_model(target: str, graph_file: str | None) -> dict[str, Any]:
    import modelfold
    from modelfold.ir.dataflow import to_html, to_svg

    program = modelfold.load(target)
    arch = program.arch
    info: dict[str, Any] = {
        "type": "model", "path": program.source, "class": type(program.module).__name__,
        "architecture": {k: v for k, v in arch.to_dict().items() if k != "layer"},
        "parameters": program.parameter_count(), "bytes": program.parameter_bytes(),
        "breakdown": program.parameter_breakdown(),
        "module_tree": _module_tree(program),
        "dialect_ops": dict(program.dialect_ops()),
        "graph_nodes": sum(1 for n in program.exported.graph.nodes if n.op == "call_function"),
    }
    if graph_file:
        graph = program.dataflow()
        title = f"{type(program.module).__name__} ({arch.num_layers} layers) dataflow"
        text = to_html(graph, title=title) if graph_file.endswith((".html", ".htm")) \
            else to_svg(graph, title=title)
        Path(graph_file).parent.mkdir(parents=True, exist_ok=True)
        Path(graph_file).write_text(text)
        info["graph_file"] = graph_file
        info["dataflow"] = {"nodes": graph.number_of_nodes(), "edges": graph.number_of_edges()}
    return info


def _module_tree(program) -> list[str]:
    """Indented module tree; the layer stack is shown once with its repeat count."""
    layers = program.arch.layers
    lines: list[str] = []
    for name, module in program.module.named_modules():
        if not name:
            continue
        if name.startswith(layers + ".") and not name.startswith(layers + ".0"):
            continue
        depth = name.count(".")
        label = name.rpartition(".")[2]
        own = sum(p.numel() for p in module.parameters(recurse=False))
        extra = f"  x{program.arch.num_layers}" if name == f"{layers}.0" else ""
        lines.append(f"{'  ' * depth}{label}: {type(module).__name__}"
                     f"{f' ({own:,} params)' if own else ''}{extra}")
    return lines


def _inspect_artifact(path: Path) -> dict[str, Any]:
    from collections import Counter

    import onnx

    from modelfold.artifact import ArtifactError, read_manifest

    manifest = read_manifest(path)
    try:
        model = onnx.load(str(path / "model.onnx"), load_external_data=False)
    except Exception as exc:  # a missing, truncated or damaged protobuf
        raise ArtifactError(f"'{path / 'model.onnx'}' cannot be read (missing, corrupt or "
                            f"truncated?): {type(exc).__name__}") from exc
    ops = Counter(f"{n.domain + '.' if n.domain else ''}{n.op_type}" for n in model.graph.node)
    init_bytes = sum(
        int(next((e.value for e in t.external_data if e.key == "length"), 0)) or len(t.raw_data)
        for t in model.graph.initializer)
    return {
        "type": "artifact", "path": str(path), "pipeline": manifest.get("pipeline"),
        "source": manifest.get("source"), "model": manifest.get("model"),
        "onnx_bytes": manifest.get("onnx_bytes"), "initializer_bytes": init_bytes,
        "initializers": len(model.graph.initializer),
        "inputs": [i.name for i in model.graph.input],
        "outputs": [o.name for o in model.graph.output],
        "op_counts": dict(ops.most_common()),
        "custom_domain_ops": {k: v for k, v in ops.items() if "." in k},
        "parity": manifest.get("parity"), "files": manifest.get("files"),
    }


def _print_inspect(info: dict[str, Any]) -> None:
    if info["type"] == "artifact":
        print(f"artifact {info['path']}")
        print(f"  pipeline: {info['pipeline'] or '(none)'}   source: {info['source']}")
        print(f"  ONNX bytes: {info['onnx_bytes']:,} ({info['initializers']} initializers, "
              f"{info['initializer_bytes']:,} bytes)")
        print(f"  inputs: {len(info['inputs'])} ({', '.join(info['inputs'][:4])}, ...)")
        print(f"  outputs: {len(info['outputs'])} ({', '.join(info['outputs'][:3])}, ...)")
        print("  ops: " + ", ".join(f"{k} {v}" for k, v in info["op_counts"].items()))
        print(f"  custom-domain ops: {info['custom_domain_ops'] or 'none'}")
        print(f"  parity vs torch: {info['parity']}")
        return
    a = info["architecture"]
    print(f"{info['class']} from {info['path']}")
    print(f"  {a['family']} {a['kind']}: {a['num_layers']} layers, hidden {a['hidden_size']}, "
          f"{a['num_heads']} heads / {a['num_kv_heads']} KV heads (head dim {a['head_dim']}), "
          f"{a['activation']}, {a['mlp_type']} MLP, tied embeddings: {a['tied_embeddings']}")
    print(f"  {info['parameters']:,} parameters, {info['bytes'] / 2**20:.1f} MiB")
    print("  breakdown:")
    for part, entry in sorted(info["breakdown"].items(), key=lambda kv: -kv[1]["parameters"]):
        share = entry["parameters"] / max(info["parameters"], 1)
        print(f"    {part:<16} {entry['parameters']:>12,} params {entry['bytes'] / 2**20:>8.1f} "
              f"MiB {share:6.1%}")
    print(f"  dialect ops: {info['dialect_ops'] or 'none'} (graph: {info['graph_nodes']} ops)")
    print("  module tree:")
    for line in info["module_tree"]:
        print("    " + line)
    if info.get("graph_file"):
        print(f"  dataflow graph ({info['dataflow']['nodes']} nodes, {info['dataflow']['edges']} "
              f"edges) written to {info['graph_file']}")


def cmd_eval(args: argparse.Namespace) -> int:
    from modelfold.artifact import is_artifact
    from modelfold.evaluate import evaluate

    _check_backend_args(args)
    if args.text:
        text, text_name = _read_text_file(Path(args.text)), str(args.text)
    else:
        from modelfold.corpus import corpus_text

        text, text_name = corpus_text(args.corpus, args.split), f"{args.corpus}:{args.split}"
    if is_artifact(args.target) and args.backend == "triton":
        raise _UserError(f"'{args.target}' is an ONNX artifact (it runs on ONNX Runtime); "
                         "--backend triton takes a model or checkpoint")
    if is_artifact(args.target):
        from modelfold.artifact import artifact_tokenizer, open_artifact

        # an adapter of an artifact exported with --lora-export inputs
        target = open_artifact(args.target, adapter=args.adapter, provider=args.provider,
                               kernels=args.kernels, kv_cache=args.kv_cache)
        tokenizer = artifact_tokenizer(args.target)
    else:
        import modelfold

        program = modelfold.load(args.target)
        if args.adapter:
            _apply_adapter(program, args.adapter, quiet=args.json)
        if program.arch.kind != "causal-lm":
            raise _UserError(f"perplexity needs a causal LM; '{args.target}' is an "
                             f"{program.arch.kind}")
        target, tokenizer = program.module, program.tokenizer
        if args.backend == "triton":
            target = _triton_compile(program, args)
    result = evaluate(target, tokenizer, text, chars=args.chars, window=args.window,
                      batch_size=args.batch_size, progress=not args.json)
    result = {"model": args.target, "adapter": args.adapter, "text": text_name, **result}
    if is_artifact(args.target):  # whose kernels ran its int4 layers
        result["kernels"] = target.kernels["kernels"]
        result["runtime"] += " + modelfold's kernels" if result["kernels"] == "modelfold" else ""
        if target.kernels.get("attention"):  # the attention kernel's cache
            result["kv_cache"] = target.kernels["kv_cache"]
    if args.json:
        _print_json(result)
    else:
        print(f"perplexity {result['perplexity']:.3f} ({result['runtime']}, {result['tokens']:,} "
              f"tokens in {result['windows']} windows of {args.window}, {text_name}, "
              f"{result['seconds']:.1f}s)")
    return 0


def _read_text_file(path: Path) -> str:
    """A UTF-8 text file for ``eval --text``; a binary or non-UTF-8 file is refused."""
    if not path.is_file():
        raise _UserError(f"--text file '{path}' does not exist")
    data = path.read_bytes()
    if b"\x00" in data[:1 << 20]:
        raise _UserError(f"--text file '{path}' is binary (it contains NUL bytes); give a UTF-8 "
                         "text file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _UserError(f"--text file '{path}' is not UTF-8 text (invalid byte at offset "
                         f"{exc.start}); give a UTF-8 text file") from None
    if not text.strip():
        raise _UserError(f"--text file '{path}' is empty")
    return text


def _check_backend_args(args: argparse.Namespace) -> None:
    if args.backend != "triton":
        used = [f for f, on in (("--interpret", args.interpret), ("--dtype", args.dtype),
                                ("--no-inductor", args.no_inductor)) if on]
        if used:
            raise _UserError(f"{', '.join(used)} only apply with --backend triton")


def _triton_compile(program: Any, args: argparse.Namespace) -> Any:
    import modelfold

    compiled = modelfold.compile(program, backend="triton", interpret=args.interpret,
                                 dtype=args.dtype, inductor=not args.no_inductor)
    if not args.json:
        print(f"compiled: {compiled.summary()}", file=sys.stderr)
    return compiled


def _apply_adapter(program: Any, adapter: str, *, quiet: bool) -> None:
    from modelfold.adapters import load_adapter

    facts = load_adapter(program, adapter)
    if not quiet:
        print(f"adapter {adapter}: {facts['layers']} layers, {facts['parameters']:,} parameters",
              file=sys.stderr)


def cmd_finetune(args: argparse.Namespace) -> int:
    from modelfold.assets import check_output, output_lock

    out = Path(args.output)
    if out.exists() and not (args.resume or args.overwrite):
        raise _UserError(f"output folder '{out}' already exists; choose another, pass --resume to "
                         "continue its training, or --overwrite")
    if not args.resume:
        check_output(out, overwrite=args.overwrite, what="fine-tuning output",
                     markers=FINETUNE_MARKERS)
    with output_lock(out):
        return _finetune(args, out)


# What a `finetune` output folder holds (so --overwrite replaces only such folders).
FINETUNE_MARKERS = ("training.json", "checkpoints", "adapter", "report.md")


def _finetune(args: argparse.Namespace, out: Path) -> int:
    import json as _json

    import modelfold
    from modelfold.assets import atomic_output
    from modelfold.finetune import TrainConfig, plot_training, train
    from modelfold.passes.manager import PassContext
    from modelfold.passes.pipeline import build_pipeline

    if args.overwrite and not args.resume and out.exists():
        import shutil

        shutil.rmtree(out)
    options = dict(kv.split("=", 1) for kv in args.train_option or [] if "=" in kv)
    bad = [kv for kv in args.train_option or [] if "=" not in kv]
    if bad:
        raise _UserError(f"--train-option expects KEY=VALUE; got {bad[0]!r}")
    for key in ("steps", "lr", "batch_size", "grad_accum", "seq_len", "seed", "eval_every",
                "eval_chars", "checkpoint_every", "kl_weight", "hidden_weight", "temperature"):
        value = getattr(args, key)
        if value is not None:
            options[key] = value
    if args.gradient_checkpointing:
        options["gradient_checkpointing"] = True
    sparse_options = dict(kv.split("=", 1) for kv in args.sparse_option or [] if "=" in kv)
    if len(sparse_options) != len(args.sparse_option or []):
        raise _UserError("--sparse-option expects KEY=VALUE")
    if sparse_options and not args.sparse_aware:
        raise _UserError("--sparse-option needs --sparse-aware")
    if args.sparse_aware:
        from modelfold.sparse_training import CastConfig

        if args.resume:
            raise _UserError("--sparse-aware training cannot resume (its masks are not "
                             "checkpointed); rerun it")
        CastConfig.from_options(sparse_options)
        options.setdefault("lr", 1e-4)  # every weight of the sparse layers trains: not LoRA's 1e-3
        if args.teacher is not None and "kl_weight" not in options \
                and "hidden_weight" not in options:
            options.setdefault("ce_weight", 0.33)
            options["kl_weight"] = 0.67
    elif args.teacher is not None and "kl_weight" not in options \
            and "hidden_weight" not in options:
        options["kl_weight"] = 1.0
    if "tie-layers" in args.pipeline or "share-attention" in args.pipeline:
        options.setdefault("lr", 1e-4)  # whole weights train (shared layers, attention), not LoRA
    config = TrainConfig.from_options(options)  # bad options fail before any loading
    build_pipeline(args.pipeline)
    if args.save_model is not None:
        from modelfold.checkpoint import check_destination

        check_destination(args.save_model, args.overwrite)
    program = modelfold.load(args.model)
    teacher = None
    if args.teacher is not None:
        teacher = modelfold.load(args.model if args.teacher == "same" else args.teacher).module
    result = modelfold.transform(program, args.pipeline,
                                 context=PassContext(verify=not args.no_verify))
    out.mkdir(parents=True, exist_ok=True)
    if args.sparse_aware:
        from modelfold.sparse_training import sparse_train

        trained = sparse_train(result, teacher=teacher, sparse_options=sparse_options,
                               checkpoint_dir=out / "checkpoints", progress=not args.json,
                               **config.to_dict())
    else:
        trained = train(result, config=config, teacher=teacher,
                        checkpoint_dir=out / "checkpoints", resume=args.resume,
                        progress=not args.json)
    from modelfold.adapters import save_adapter
    from modelfold.ir.lora import adapter_names

    summary: dict[str, Any] = {"pipeline": result.pipeline, "output": str(out),
                               **{k: trained.get(k) for k in (
                                   "steps", "seconds", "trainable_parameters",
                                   "perplexity_before", "perplexity_after")}}
    names = adapter_names(result.module)
    for name in names:
        target = out / ("adapter" if name == names[0] else f"adapter-{name}")
        saved = save_adapter(result, target, name=name, overwrite=True)
        summary.setdefault("adapters", {})[name] = {"path": str(target), "bytes": saved["bytes"]}
    tying = next((r.details for r in result.program.log if r.name == "tie-layers"), None)
    if tying and tying.get("adapter") in names:
        # the adapter is the per-depth relaxation: write the shared base it applies to
        from modelfold.recursive import recursive_base

        modelfold.save(recursive_base(result, tying["adapter"]), out / "base", overwrite=True)
        summary["recursive_base"] = str(out / "base")
    if args.save_model is not None:
        modelfold.save(result, args.save_model, overwrite=args.overwrite)
        summary["checkpoint"] = args.save_model
    report = {**result.report, "training": trained}
    with atomic_output(out / "training.json") as tmp:
        tmp.write_text(_json.dumps(report, indent=2, default=str))
    with atomic_output(out / "report.md") as tmp:
        tmp.write_text(result.report_markdown() + "\n" + _training_markdown(trained))
    plot_training(trained, out / "training.png")
    if args.json:
        _print_json(summary)
    else:
        before, after = trained.get("perplexity_before"), trained.get("perplexity_after")
        if before is not None and after is not None:
            print(f"perplexity {before:.3f} -> {after:.3f} after {trained['steps']} steps "
                  f"({trained['seconds']:.0f} s, {trained['trainable_parameters']:,} trainable "
                  "parameters)")
        for name, facts in summary.get("adapters", {}).items():
            print(f"adapter '{name}' (PEFT format): {facts['path']}/")
        if "recursive_base" in summary:
            print(f"shared base for the relaxation adapter: {summary['recursive_base']}/")
        print(f"report: {out / 'report.md'}")
    return 0


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _training_markdown(trained: dict[str, Any]) -> str:
    lines = ["## Fine-tuning", "",
             f"- steps: {trained['steps']}, tokens: {trained.get('tokens', 0):,}, "
             f"time: {trained['seconds']:.1f} s ({trained['seconds_per_step']:.2f} s/step)",
             f"- trainable parameters: {trained['trainable_parameters']:,} of "
             f"{trained['total_parameters']:,}",
             f"- perplexity before / after: {_fmt(trained.get('perplexity_before'))} / "
             f"{_fmt(trained.get('perplexity_after'))}", "",
             "| step | perplexity |", "|---:|---:|"]
    lines += [f"| {e['step']} | {e['perplexity']:.3f} |" for e in trained.get("eval", [])
              if e.get("perplexity") is not None]
    return "\n".join(lines) + "\n\n![training](training.png)\n"


def cmd_generate(args: argparse.Namespace) -> int:
    from modelfold.artifact import is_artifact
    from modelfold.generation import Sampling

    _check_backend_args(args)
    if args.backend == "triton":
        if is_artifact(args.artifact):
            raise _UserError(f"'{args.artifact}' is an ONNX artifact (it runs on ONNX Runtime); "
                             "--backend triton takes a model or checkpoint")
        if args.provider != "cpu":
            raise _UserError("--provider applies to ONNX artifacts, not --backend triton")
    elif not is_artifact(args.artifact):
        from modelfold.checkpoint import is_checkpoint

        if is_checkpoint(args.artifact):
            raise _UserError(f"'{args.artifact}' is a modelfold checkpoint, not an artifact; "
                             f"export it with `modelfold convert {args.artifact} -o OUT/`")
        raise _UserError(f"'{args.artifact}' is not a modelfold artifact (no modelfold.json); "
                         "make one with `modelfold convert`")
    if args.max_new_tokens < 1:
        raise _UserError(f"--max-new-tokens must be >= 1; got {args.max_new_tokens}")
    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                        seed=args.seed)
    if args.backend == "triton":
        import modelfold

        program = modelfold.load(args.artifact)
        if args.adapter:
            _apply_adapter(program, args.adapter, quiet=args.json)
        tokenizer = program.tokenizer
        if tokenizer is None:
            raise _UserError(f"'{args.artifact}' has no tokenizer to encode the prompt")
    else:
        from modelfold.artifact import artifact_tokenizer

        tokenizer = artifact_tokenizer(args.artifact)
    prompts = [_encode_prompt(tokenizer, text, args.chat) for text in args.prompt]
    context = _context_length(program.module.config if args.backend == "triton"
                              else _artifact_config(Path(args.artifact)))
    longest = max(len(ids) for ids in prompts)
    if context is not None and longest + args.max_new_tokens > context:
        raise _UserError(f"the prompt ({longest} tokens) plus --max-new-tokens "
                         f"{args.max_new_tokens} is more than the model's context length of "
                         f"{context} tokens; lower --max-new-tokens to at most "
                         f"{max(context - longest, 0)}")
    if args.backend == "triton":
        lm = _triton_compile(program, args)
    else:
        from modelfold.artifact import open_artifact

        lm = open_artifact(args.artifact, adapter=args.adapter, provider=args.provider,
                           kernels=args.kernels, kv_cache=args.kv_cache)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = lm.generate(prompts if len(prompts) > 1 else prompts[0], args.max_new_tokens,
                      eos_token_id=tokenizer.eos_token_id, sampling=sampling, pad_token_id=pad)
    new_tokens = out["new_tokens"] if len(prompts) > 1 else [out["new_tokens"]]
    results = [{"prompt": text, "text": tokenizer.decode(new, skip_special_tokens=True),
                "new_tokens": new, "prompt_tokens": len(ids)}
               for text, ids, new in zip(args.prompt, prompts, new_tokens)]
    timing = {"prefill_seconds": out["prefill_seconds"], "decode_seconds": out["decode_seconds"],
              "tokens_per_s": out["decode_tokens_per_s"]}
    if args.json:
        _print_json({**results[0], **timing} if len(results) == 1 else
                    {"results": results, "batch": len(results), **timing})
    else:
        for result in results:
            print(result["prompt"] + result["text"])
        steps = max(len(new) for new in new_tokens)
        print(f"[{len(results)} x {steps} tokens, {out['decode_tokens_per_s']:.1f} tokens/s "
              f"decode{' per sequence' if len(results) > 1 else ''}, prefill "
              f"{out['prefill_seconds'] * 1000:.0f} ms]", file=sys.stderr)
    return 0


def _encode_prompt(tokenizer: Any, text: str, chat: bool) -> list[int]:
    if chat:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                            add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
    else:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise _UserError("the prompt is empty")
    return list(ids)


def _artifact_config(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}


def _context_length(config: Any) -> int | None:
    """The longest sequence the model's positions cover (None when the config does not say)."""
    get = config.get if isinstance(config, dict) else (lambda k: getattr(config, k, None))
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None


# -- parser ----------------------------------------------------------------------------------
class _UserError(UsageError):
    """Bad command-line input (printed as one line, exit 2)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modelfold", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("passes", help="list registered passes and their options")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_passes)

    p = sub.add_parser("assets", help="install or list the embedded models and corpus")
    p.add_argument("action", choices=["pull", "list"])
    p.add_argument("names", nargs="*", help="assets to pull (default: all)")
    p.add_argument("--force", action="store_true", help="re-install even if present")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_assets)

    p = sub.add_parser("convert", help="transform a model; export an ONNX Runtime artifact "
                                       "and/or save a reloadable checkpoint")
    p.add_argument("model", nargs="?", default=None,
                   help="asset name, local HF model directory or modelfold checkpoint "
                        "(default: smollm2-135m)")
    p.add_argument("-p", "--pipeline",
                   help="pipeline string, e.g. 'layer-importance,drop-layers{count=4}', or a "
                        "YAML recipe file; omit to convert the model as it is (e.g. a checkpoint "
                        "saved with --save-model)")
    p.add_argument("-o", "--output",
                   help="ONNX Runtime artifact folder to create; may be omitted when "
                        "--save-model is given (then no ONNX export runs)")
    p.add_argument("--save-model", metavar="DIR",
                   help="also save the transformed model as a checkpoint folder (safetensors + "
                        "config) that MODEL arguments and modelfold.load() accept, so it reloads "
                        "without re-running the pipeline; written before the ONNX export")
    p.add_argument("--save-format", choices=["auto", "modelfold", "transformers"],
                   default="auto",
                   help="--save-model's format: transformers = a standard checkpoint plain "
                        "transformers loads (a moefy{weights=softmax} conversion as Mixtral / "
                        "Qwen2-MoE), modelfold = modelfold's own, auto (default) = the standard "
                        "one where it exists")
    p.add_argument("--overwrite", action="store_true", help="replace existing output folders")
    p.add_argument("--no-verify", action="store_true", help="skip IR verification between passes")
    p.add_argument("--no-parity", action="store_true", help="skip the torch/ORT parity check")
    p.add_argument("--adapter", metavar="DIR",
                   help="apply a LoRA adapter folder (PEFT format) to MODEL before the pipeline")
    p.add_argument("--lora-export", choices=["merge", "separate", "inputs"], default="merge",
                   help="LoRA layers in the artifact: merged into the weights (default; adapters "
                        "on quantized bases stay a branch), a separate branch, or ONNX Runtime "
                        "adapter inputs (one base artifact, adapters/<name>.onnx_adapter files)")
    p.add_argument("--sparse-export", choices=["compressed", "dense"], default="compressed",
                   help="N:M sparse layers in the artifact: compressed (default; kept values and "
                        "packed indices, decompressed when ONNX Runtime loads the model) or dense "
                        "weights (a bigger file)")
    p.add_argument("--accuracy-level", type=int, choices=[0, 1, 2, 3, 4], default=0,
                   help="MatMulNBits compute type for quantized linears: 0 float like torch "
                        "(default), 4 int8 activations (faster on CPU, less exact)")
    p.add_argument("--disable", action="append", metavar="PASS",
                   help="skip this pass: one of the pipeline's, or a graph pass the ONNX "
                        "lowering applies by default (e.g. tied-linear); repeatable")
    p.add_argument("--provider", choices=["cpu", "cuda"], default="cpu",
                   help="execution provider the artifact is for (its parity check runs there); "
                        "cuda needs onnxruntime-gpu, an NVIDIA GPU and --dtype float16")
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32",
                   help="float type of the artifact (float16: half the bytes of float weights; "
                        "what CUDA runs)")
    p.add_argument("--no-fuse", action="append", metavar="NAME",
                   help="leave out a fusion the ONNX lowering applies by default: attention, "
                        "projections, norms (or fuse-attention ...), or all; repeatable")
    p.add_argument("--stream", action="store_true",
                   help="transform one decoder layer at a time (models larger than memory): "
                        "read, transform, write and free each layer; needs --save-model (the "
                        "sharded output checkpoint); chosen automatically when the model's "
                        "float32 weights do not fit --max-memory")
    p.add_argument("--no-stream", action="store_true", help="never stream (load the whole model)")
    p.add_argument("--max-memory", metavar="SIZE",
                   help="memory budget that decides streaming, e.g. 16GB (default: 80%% of the "
                        "memory available now)")
    p.add_argument("--activation-budget", metavar="SIZE", default="2GB",
                   help="streaming: calibration activations above this size (per rank) are kept "
                        "on disk (default 2GB)")
    p.add_argument("--no-resume", action="store_true",
                   help="streaming: discard the partial output of an interrupted run (OUT.partial) "
                        "instead of continuing after its last finished layer")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="spread calibration over N processes (torch.distributed, gloo on CPU): "
                        "samples split across ranks, statistics all-reduced, the per-linear "
                        "solves divided; the result equals one process's. torchrun works too")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("finetune", help="transform a model (e.g. add LoRA adapters) and train "
                                        "what the passes marked trainable; writes OUT/adapter/")
    p.add_argument("model", nargs="?", default=None,
                   help="asset name, model directory or checkpoint (default: smollm2-135m)")
    p.add_argument("-p", "--pipeline", required=True,
                   help="pipeline that marks parameters trainable, e.g. 'lora{rank=8,alpha=16}' "
                        "or 'quantize{bits=4},lora{rank=8}' (QLoRA)")
    p.add_argument("-o", "--output", required=True,
                   help="folder for adapter/ (PEFT format), checkpoints/, report.md, training.png")
    p.add_argument("--steps", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    p.add_argument("--seq-len", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--eval-every", type=int, help="evaluate every N steps (default: start/end)")
    p.add_argument("--eval-chars", type=int, help="characters of the evaluation split per eval")
    p.add_argument("--checkpoint-every", type=int, help="resumable checkpoint every N steps")
    p.add_argument("--teacher", nargs="?", const="same", default=None, metavar="MODEL",
                   help="distil from a teacher: the untransformed MODEL (no value) or another "
                        "model; sets --kl-weight 1 unless a weight is given")
    p.add_argument("--kl-weight", type=float)
    p.add_argument("--hidden-weight", type=float)
    p.add_argument("--temperature", type=float)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--train-option", action="append", metavar="KEY=VALUE",
                   help="any other training option (see modelfold.finetune.TrainConfig)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in OUT/checkpoints/")
    p.add_argument("--sparse-aware", action="store_true",
                   help="sparsity-aware training (CAST-style) of the N:M layers that nm-sparsify "
                        "made; ends exactly N:M (with --teacher: 0.33 CE + 0.67 KL by default)")
    p.add_argument("--sparse-option", action="append", metavar="KEY=VALUE",
                   help="sparsity-aware training option: decay, alpha, harden_at, mask_every, "
                        "scale, targets, n, m (see modelfold.sparse_training.CastConfig)")
    p.add_argument("--save-model", metavar="DIR",
                   help="also save the whole trained model as a reloadable checkpoint")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-verify", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("inspect", help="show a model's or artifact's structure and sizes")
    p.add_argument("target", help="asset name, model directory or artifact folder")
    p.add_argument("--graph", metavar="FILE", help="write the dataflow graph (.svg or .html)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("eval", help="perplexity of a model (torch) or an artifact (ONNX Runtime)")
    p.add_argument("target", help="asset name, model directory or artifact folder")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--corpus", default="wikipedia", help="installed corpus (default wikipedia)")
    src.add_argument("--text", metavar="FILE", help="evaluate on a UTF-8 text file instead")
    p.add_argument("--adapter", metavar="DIR",
                   help="LoRA adapter folder (PEFT format) applied to a model; for an artifact "
                        "exported with --lora-export inputs, an adapter name or .onnx_adapter")
    p.add_argument("--split", default="evaluation", help="corpus split (default evaluation)")
    p.add_argument("--chars", type=int, default=200_000, help="characters of text (default 200000)")
    p.add_argument("--window", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--provider", choices=["cpu", "cuda"], default="cpu",
                   help="ONNX Runtime execution provider for an artifact (cuda: onnxruntime-gpu)")
    _add_backend_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="greedy generation from an artifact (KV cache), or from a "
                                        "model / checkpoint with --backend triton")
    p.add_argument("artifact", help="artifact folder (or model / checkpoint with --backend triton)")
    p.add_argument("prompt", nargs="+", help="one prompt, or several (generated as one batch)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 (default): greedy; > 0: sample from softmax(logits / T)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="sample among the tokens that make up probability p (nucleus)")
    p.add_argument("--seed", type=int, help="sampling seed (same seed, same text)")
    p.add_argument("--provider", choices=["cpu", "cuda"], default="cpu",
                   help="ONNX Runtime execution provider (cuda: onnxruntime-gpu and a GPU)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--adapter", metavar="NAME_OR_FILE",
                   help="ONNX Runtime adapter of an artifact exported with --lora-export inputs "
                        "(with --backend triton: a PEFT adapter folder)")
    _add_backend_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_generate)
    return parser


def _add_backend_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kernels", choices=["auto", "modelfold", "onnxruntime"], default="auto",
                   help="CPU kernels for an artifact's int4 layers and attention: auto (default: "
                        "modelfold's where the CPU has AVX-512 VNNI and a C compiler is present), "
                        "modelfold (required) or onnxruntime (its MatMulNBits and "
                        "GroupQueryAttention)")
    p.add_argument("--kv-cache", choices=["float32", "float16"], default="float32",
                   help="precision of an artifact's KV cache in modelfold's attention kernel "
                        "(float16: half the cache memory and the bytes a decode step reads)")
    p.add_argument("--backend", choices=["default", "triton"], default="default",
                   help="triton: compile a model / checkpoint with the Triton kernels + "
                        "torch.compile (needs a CUDA GPU, or --interpret)")
    p.add_argument("--interpret", action="store_true",
                   help="with --backend triton: run the kernels in Triton's CPU interpreter "
                        "(slow; for machines without a GPU)")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"],
                   help="with --backend triton: compute dtype (default float16 on a GPU, float32 "
                        "in the interpreter)")
    p.add_argument("--no-inductor", action="store_true",
                   help="with --backend triton: skip torch.compile (kernels only, eager PyTorch)")


def main(argv: list[str] | None = None) -> int:
    """Run one command. A ``ModelfoldError`` (anything the input caused) prints one line and
    returns 2; any other exception is a bug and propagates with its traceback (exit status 1)."""
    args = build_parser().parse_args(argv)
    from modelfold.assets import interrupt_guard
    from modelfold.errors import ModelfoldError

    try:
        with interrupt_guard() as interrupted:
            try:
                return args.func(args)
            except Exception:
                if interrupted():  # a library turned the KeyboardInterrupt into another error
                    raise KeyboardInterrupt from None
                raise
    except KeyboardInterrupt:
        print("modelfold: interrupted (no partial output was kept)", file=sys.stderr)
        return 130
    except ModelfoldError as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"modelfold: error: {message}", file=sys.stderr)
        return 2


def run() -> None:
    """The console entry point (``modelfold`` and ``python -m modelfold``): ``main``'s status.

    After an interrupt the status is 130 and the process exits with it directly: CPython kills
    itself with SIGINT at exit (status -2, not 130) when a ``KeyboardInterrupt`` once passed
    through C code run by ``PyRun_*`` (a pybind11 extension being imported when Ctrl-C or
    SIGTERM arrived), even though ``main`` handled it. Everything was cleaned up by then.
    """
    code = main()
    if code == 130:
        import os

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    sys.exit(code)


if __name__ == "__main__":
    run()
