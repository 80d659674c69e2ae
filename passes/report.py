"""The per-run report: Markdown for people, JSON for machines, plots where a picture helps."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from modelfold.ir.program import Program


def report_dict(program: Program, *, pipeline: str, extra: dict[str, Any] | None = None
                ) -> dict[str, Any]:
    """Everything the report shows, JSON-serialisable."""
    probe = program.analyses.get("_probe", {})
    return {
        "source": program.source,
        "pipeline": pipeline,
        "model": {"family": program.arch.family, "kind": program.arch.kind,
                  "layers": program.arch.num_layers, "parameters": program.parameter_count(),
                  "bytes": program.parameter_bytes()},
        "probe": probe.get("description", ""),
        "passes": [_clean(asdict(r)) for r in program.log],
        **(extra or {}),
    }


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no inf; "inf" SQNR means bit-identical
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def to_markdown(report: dict[str, Any]) -> str:
    m = report["model"]
    lines = [
        "# modelfold report", "",
        f"- source: `{report.get('source')}`",
        f"- pipeline: `{report['pipeline']}`",
        f"- result: {m['family']} {m['kind']}, {m['layers']} layers, {m['parameters']:,} "
        f"parameters, {m['bytes'] / 2**20:.1f} MiB",
        f"- fidelity probe: {report.get('probe', '')}", "",
        "| # | pass | kind | time (s) | params before -> after | MiB before -> after | "
        "SQNR (dB) | KL | top-1 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(report["passes"], 1):
        fid = r.get("fidelity") or {}
        lines.append(
            f"| {i} | `{r['name']}` | {r['kind']} | {r['seconds']:.1f} | "
            f"{r['params_before']:,} -> {r['params_after']:,} | "
            f"{r['bytes_before'] / 2**20:.1f} -> {r['bytes_after'] / 2**20:.1f} | "
            f"{_fmt(fid.get('cumulative_sqnr_db'))} | {_fmt(fid.get('cumulative_kl'), 4)} | "
            f"{_fmt(fid.get('cumulative_top1_agreement'), 3)} |")
    lines.append("")
    lines.append("Fidelity columns compare with the original model on the probe batch.")
    for i, r in enumerate(report["passes"], 1):
        lines += ["", f"## {i}. `{r['name']}`", "", f"options: `{json.dumps(r['options'])}`"]
        for key, value in r.get("details", {}).items():
            if key == "plot":
                lines.append(f"\n![{r['name']}]({value})")
            else:
                lines.append(f"- {key}: {_short(value)}")
        for s in r.get("skipped", []):
            lines.append(f"- skipped `{s['target']}`: {s['reason']}")
    for key, value in report.items():
        if key not in ("source", "pipeline", "model", "probe", "passes"):
            lines += ["", f"## {key}", "", "```json", json.dumps(_clean(value), indent=2), "```"]
    return "\n".join(lines) + "\n"


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, str) or not math.isfinite(value):
        return "exact"
    return f"{value:.{digits}f}"


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list) and value and isinstance(value[0], float):
        return "[" + ", ".join(f"{v:.4g}" for v in value) + "]"
    return str(value)


def write_report(program: Program, out_dir: Path, *, pipeline: str,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``report.md``, ``report.json`` and the passes' plots into ``out_dir``."""
    from modelfold.passes.registry import registered_passes

    out_dir.mkdir(parents=True, exist_ok=True)
    passes = registered_passes()
    for i, record in enumerate(program.log, 1):
        cls = passes.get(record.name)
        plot = getattr(cls, "plot", None)
        if plot is not None and record.details:
            path = out_dir / f"pass{i}-{record.name}.png"
            if plot(record.details, path):
                record.details["plot"] = path.name
    report = report_dict(program, pipeline=pipeline, extra=extra)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    (out_dir / "report.md").write_text(to_markdown(report))
    return report


def plot_layer_errors(ax: Any, layers: list[dict[str, Any]], *, method: str, baseline: str,
                      weight_label: str) -> None:
    """Per-layer error dots on ``ax``: ``output_error`` against ``<baseline>_output_error`` when
    the layers were calibrated, else ``weight_error`` (quantize and nm-sparsify reports)."""
    names = [entry["path"].split(".", 2)[-1] for entry in layers]
    x = range(len(layers))
    if "output_error" in layers[0]:
        ax.plot(x, [e[f"{baseline}_output_error"] for e in layers], ".", color="#adb5bd",
                label=f"{baseline} output error")
        ax.plot(x, [e["output_error"] for e in layers], ".", color="#c92a2a",
                label=f"{method} output error")
        ax.set_ylabel("relative output error")
    else:
        ax.plot(x, [e["weight_error"] for e in layers], ".", color="#4c6ef5",
                label="relative weight error")
        ax.set_ylabel(weight_label)
    ax.set_yscale("log")
    ax.set_xlabel(f"linear layer ({names[0]} ... {names[-1]})")
    ax.legend(fontsize=8)
