"""Artifact folders: what ``modelfold.export`` / ``modelfold convert`` write, and reading them back.

An artifact folder is self-contained:

    model.onnx, model.onnx.data   the optimized ONNX Runtime model (weights as external data)
    config.json, tokenizer files  so generation and evaluation need nothing else
    modelfold.json                the manifest: pipeline, sizes, parity figures, I/O names
    report.md, report.json        the per-pass report of the run that made it
"""

from __future__ import annotations

import datetime
import json
import time
from pathlib import Path
from typing import Any

from modelfold.errors import ModelfoldError
from modelfold.ir.program import Program

MANIFEST = "modelfold.json"
BACKENDS = ("onnxruntime",)


class ArtifactError(ModelfoldError, RuntimeError):
    """A folder is not a (valid) modelfold artifact, or an artifact cannot be written."""


def is_artifact(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest(path: str | Path) -> dict[str, Any]:
    manifest = Path(path) / MANIFEST
    if not manifest.is_file():
        raise ArtifactError(f"'{path}' is not a modelfold artifact (no {MANIFEST})")
    try:
        return json.loads(manifest.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"'{manifest}' is corrupt: {exc}") from None


def artifact_tokenizer(path: str | Path) -> Any:
    """The tokenizer an artifact folder carries (never running code that comes with it)."""
    from transformers import AutoTokenizer

    from modelfold.assets import refuse_remote_code

    refuse_remote_code(Path(path))
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except Exception as exc:  # a missing or damaged tokenizer file
        raise ArtifactError(f"cannot load the tokenizer of artifact '{path}': "
                            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                            ) from exc


def open_artifact(path: str | Path, **options: Any) -> Any:
    """An ``OnnxCausalLM`` for a decoder artifact (``options``: threads, adapter, ...).

    Raises:
        ArtifactError: not an artifact, or its ``model.onnx`` cannot be loaded (corrupt,
            truncated, missing data file) - one line naming the file.
    """
    from modelfold.backends.onnxruntime.runtime import OnnxCausalLM

    read_manifest(path)
    model = Path(path) / "model.onnx"
    if not model.is_file():
        raise ArtifactError(f"artifact '{path}' has no model.onnx")
    try:
        return OnnxCausalLM(path, **options)
    except ModelfoldError:
        raise
    except Exception as exc:  # onnxruntime raises its own types for a damaged file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ArtifactError(f"'{model}' cannot be loaded by ONNX Runtime (corrupt or "
                            f"truncated?): {first[:300]}") from exc


def write_artifact(program: Program, out_dir: str | Path, *, backend: str = "onnxruntime",
                   pipeline: str = "", overwrite: bool = False, options: Any = None,
                   progress: Any = None, **option_values: Any) -> dict[str, Any]:
    """Export ``program`` to ``out_dir`` atomically and return the manifest.

    ``options`` is an ``ExportOptions`` (or its fields are given as keyword arguments); see
    ``modelfold.backends.onnxruntime.export.export_onnx``. The manifest records the pipeline,
    the model, the export facts (``onnx``), ``parity``, and per lowering its facts (``lora``,
    ``sparse``) when the model has such layers. ``progress`` (a callable) receives one line per
    export phase.
    """
    from modelfold.assets import AssetError, atomic_output, check_output, output_lock
    from modelfold.passes.report import write_report

    if backend == "triton":
        raise ArtifactError("the Triton backend compiles in the running process instead of "
                            "writing an artifact: use modelfold.compile(result, backend='triton') "
                            "(CLI: eval / generate --backend triton), and modelfold.save to keep "
                            "the transformed model")
    if backend not in BACKENDS:
        raise ArtifactError(f"unknown backend '{backend}'; available: {', '.join(BACKENDS)}")
    out = Path(out_dir)
    try:
        check_output(out, overwrite=overwrite, what="artifact", markers=(MANIFEST,))
    except AssetError as exc:
        raise ArtifactError(str(exc)) from None
    from modelfold.backends.onnxruntime.export import export_onnx
    from modelfold.backends.onnxruntime.lowering import lowerings
    from modelfold.backends.onnxruntime.options import export_options

    options = export_options(options, **option_values)
    with output_lock(out), atomic_output(out) as tmp:
        tmp.mkdir()
        start = time.perf_counter()
        onnx_facts = export_onnx(program, tmp, options, progress=progress)
        parity_facts = onnx_facts.pop("parity", {})
        lowering_facts = {cls.name: onnx_facts.pop(cls.name) for cls in lowerings()
                          if cls.name in onnx_facts}
        program.module.config.save_pretrained(tmp)
        if program.tokenizer is not None:
            program.tokenizer.save_pretrained(tmp)
        gen_config = getattr(program.module, "generation_config", None)
        if gen_config is not None:
            gen_config.save_pretrained(tmp)
        write_report(program, tmp, pipeline=pipeline)
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        onnx_bytes = sum(size for name, size in files.items() if name.startswith("model.onnx"))
        manifest = {
            "format": 1,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "backend": backend,
            "source": program.source,
            "pipeline": pipeline,
            "accuracy_level": options.accuracy_level,
            "export_options": options.to_dict(),
            "model": program.summary(),
            "architecture": {"family": program.arch.family, "kind": program.arch.kind,
                             "num_layers": program.arch.num_layers},
            "onnx": onnx_facts,
            "parity": parity_facts,
            **lowering_facts,
            "onnx_bytes": onnx_bytes,
            "files": files,
            "export_seconds": round(time.perf_counter() - start, 2),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    return manifest
