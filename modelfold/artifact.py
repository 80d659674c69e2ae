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

from modelfold.ir.program import Program

MANIFEST = "modelfold.json"
BACKENDS = ("onnxruntime",)


class ArtifactError(RuntimeError):
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


def write_artifact(program: Program, out_dir: str | Path, *, backend: str = "onnxruntime",
                   pipeline: str = "", overwrite: bool = False, parity: bool = True,
                   accuracy_level: int = 0, lora: str = "merge",
                   sparse: str = "compressed") -> dict[str, Any]:
    """Export ``program`` to ``out_dir`` atomically and return the manifest.

    ``accuracy_level`` is the ``MatMulNBits`` compute type of quantized linears (see
    ``export_onnx``); it is recorded in the manifest. ``lora`` is how LoRA adapters are exported
    ("merge", "separate" or "inputs": ONNX Runtime adapter files under ``adapters/``; see
    ``export_onnx``); with LoRA layers, ``manifest["lora"]`` records the mode, what was merged,
    what was kept unmerged and why, the adapters and their files. ``sparse`` is how N:M sparse
    layers are stored ("compressed": values / codes + packed indices, decompressed when ONNX
    Runtime loads the model; "dense"); with such layers, ``manifest["sparse"]`` records the mode,
    the layer count and patterns, and their compressed and dense bytes.
    """
    from modelfold.assets import atomic_output
    from modelfold.passes.report import write_report

    if backend == "triton":
        raise ArtifactError("the Triton backend compiles in the running process instead of "
                            "writing an artifact: use modelfold.compile(result, backend='triton') "
                            "(CLI: eval / generate --backend triton), and modelfold.save to keep "
                            "the transformed model")
    if backend not in BACKENDS:
        raise ArtifactError(f"unknown backend '{backend}'; available: {', '.join(BACKENDS)}")
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise ArtifactError(f"output folder '{out}' already exists; choose another or pass "
                            "--overwrite")
    from modelfold.backends.onnxruntime.export import export_onnx
    from modelfold.backends.onnxruntime.lora_lowering import check_lora_mode
    from modelfold.backends.onnxruntime.sparse_lowering import check_sparse_mode

    check_lora_mode(lora)
    check_sparse_mode(sparse)
    with atomic_output(out) as tmp:
        tmp.mkdir()
        start = time.perf_counter()
        onnx_facts = export_onnx(program.module, tmp, parity=parity, accuracy_level=accuracy_level,
                                 lora=lora, sparse=sparse)
        parity_facts = onnx_facts.pop("parity", {})
        lora_facts = onnx_facts.pop("lora", None)
        sparse_facts = onnx_facts.pop("sparse", None)
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
            "accuracy_level": accuracy_level,
            "model": program.summary(),
            "architecture": {"family": program.arch.family, "kind": program.arch.kind,
                             "num_layers": program.arch.num_layers},
            "onnx": onnx_facts,
            "parity": parity_facts,
            **({"lora": lora_facts} if lora_facts is not None else {}),
            **({"sparse": sparse_facts} if sparse_facts is not None else {}),
            "onnx_bytes": onnx_bytes,
            "files": files,
            "export_seconds": round(time.perf_counter() - start, 2),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    return manifest
