"""N:M sparsity on SmolLM2-135M: one-shot methods, sparsity-aware training, sparse + int4 artifacts.

    .venv/bin/python tools/bench_sparsity.py oneshot      # magnitude / Wanda / SparseGPT at 2:4, 4:8
    .venv/bin/python tools/bench_sparsity.py cast         # CAST from one-shot SparseGPT 2:4
    .venv/bin/python tools/bench_sparsity.py artifacts    # ONNX bytes, perplexity, decode speed
    .venv/bin/python tools/bench_sparsity.py table        # print every table from results.json

Perplexity: the wikipedia evaluation split (first ``--chars`` characters, 512-token windows, the
``modelfold eval`` protocol). Calibration (Wanda, SparseGPT, GPTQ): 128 x 512 tokens of the
calibration split. Training text: the calibration split (never overlapping the evaluation split).
Results accumulate in ``--out``/results.json; every part reuses what earlier parts saved
(the SparseGPT 2:4 checkpoint, the CAST checkpoint).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import modelfold
from modelfold.passes.manager import PassContext

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import eager_ppl, load_results, save_results  # noqa: E402

QUIET = PassContext(log=None, verify=False, measure=False)
METHODS = ("magnitude", "wanda", "sparsegpt")
PATTERNS = ((2, 4), (4, 8))
# OPT-125M at 2:4 (AST README, METHODS.md): dense 27.76, SparseGPT 45.58, Wanda 60.91
PUBLISHED_OPT125M = {"dense": 27.76, "sparsegpt": 45.58, "wanda": 60.91}


def sparsegpt_checkpoint(out: Path, args) -> Path:
    """The one-shot SparseGPT 2:4 model, built once and saved."""
    path = out / "ckpt" / "sparsegpt-2-4"
    if not (path / "modelfold_checkpoint.json").is_file():
        result = modelfold.transform(args.model, "nm-sparsify{n=2,m=4,method=sparsegpt}",
                                     context=QUIET)
        modelfold.save(result, path, overwrite=True)
    return path


# -- one-shot ------------------------------------------------------------------------------------
def part_oneshot(args, out: Path, results: dict) -> None:
    base = modelfold.load(args.model)
    tokenizer = base.tokenizer
    dense = eager_ppl(base.module, tokenizer, args.chars)
    results["dense"] = {"perplexity": dense, "chars": args.chars}
    print(f"dense: {dense:.3f}", flush=True)
    del base
    rows = results.setdefault("oneshot", {})
    for n, m in PATTERNS:
        for method in METHODS:
            key = f"{method}-{n}:{m}"
            start = time.perf_counter()
            result = modelfold.transform(args.model, f"nm-sparsify{{n={n},m={m},method={method}}}",
                                         context=QUIET)
            seconds = time.perf_counter() - start
            details = result.program.log[-1].details
            ppl = eager_ppl(result.module, tokenizer, args.chars)
            rows[key] = {"method": method, "pattern": f"{n}:{m}", "perplexity": ppl,
                         "seconds": round(seconds, 1),
                         "pruned_layers": details["pruned_layers"],
                         "pruned_weights": details["pruned_weights"],
                         "skipped": len(result.program.log[-1].skipped),
                         "output_error": statistics.median(
                             e.get("output_error", e["weight_error"]) for e in details["layers"])}
            print(f"{key}: {ppl:.3f} ({seconds:.0f} s)", flush=True)
            if key == "sparsegpt-2:4":
                modelfold.save(result, out / "ckpt" / "sparsegpt-2-4", overwrite=True)
            save_results(out, results)
            del result


def table_oneshot(results: dict) -> None:
    dense = results["dense"]["perplexity"]
    rows = results.get("oneshot", {})
    if not rows:
        return
    print(f"\nOne-shot N:M pruning of SmolLM2-135M's 210 decoder linears (embeddings / LM head "
          f"dense); dense perplexity {dense:.3f} ({results['dense']['chars']:,} chars)\n")
    print("| pattern | method | perplexity | vs dense | median layer output error | "
          "pass time (s) |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows.values():
        # magnitude collects no inputs: its error column would be a weight error, not comparable
        err = "–" if r["method"] == "magnitude" else f"{r['output_error']:.4f}"
        print(f"| {r['pattern']} | {r['method']} | {r['perplexity']:.3f} | "
              f"{(r['perplexity'] / dense - 1) * 100:+.1f} % | {err} | {r['seconds']:.0f} |")
    pub = PUBLISHED_OPT125M
    print(f"\nPublished OPT-125M 2:4 (AST README): dense {pub['dense']}, SparseGPT "
          f"{pub['sparsegpt']} ({(pub['sparsegpt'] / pub['dense'] - 1) * 100:+.0f} %), Wanda "
          f"{pub['wanda']} ({(pub['wanda'] / pub['dense'] - 1) * 100:+.0f} %).")


# -- sparsity-aware training --------------------------------------------------------------------
def part_cast(args, out: Path, results: dict) -> None:
    from modelfold.sparse_training import sparse_train

    ckpt = sparsegpt_checkpoint(out, args)
    program = modelfold.load(str(ckpt))
    teacher = modelfold.load(args.model).module
    train_options = dict(steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                         seq_len=args.seq_len, warmup_steps=max(1, args.steps // 20),
                         eval_chars=args.chars, log_every=10)
    sparse_options = {"decay": args.decay, "harden_at": args.harden_at}
    start = time.perf_counter()
    report = sparse_train(program, teacher=teacher, sparse_options=sparse_options,
                          progress=False, **train_options)
    seconds = time.perf_counter() - start
    modelfold.save(program, out / "ckpt" / "cast-2-4", overwrite=True)
    results["cast"] = {"steps": args.steps, "lr": args.lr, "batch_size": args.batch_size,
                       "seq_len": args.seq_len, "decay": args.decay,
                       "harden_at": args.harden_at, "seconds": round(seconds, 1),
                       "seconds_per_step": report["seconds_per_step"],
                       "tokens": report["tokens"],
                       "trainable": report["trainable_parameters"],
                       "ppl_before": report["perplexity_before"],
                       "ppl_after": report["perplexity_after"],
                       "loss": report["loss_history"], "schedule": report["sparse"]["schedule"]}
    save_results(out, results)
    _plot_cast(results["cast"], out / "cast.png")
    print(f"CAST: {report['perplexity_before']:.3f} -> {report['perplexity_after']:.3f} in "
          f"{seconds:.0f} s", flush=True)


def table_cast(results: dict) -> None:
    c = results.get("cast")
    if not c:
        return
    dense = results["dense"]["perplexity"]
    gap_before = c["ppl_before"] - dense
    closed = (c["ppl_before"] - c["ppl_after"]) / gap_before * 100 if gap_before else 0.0
    print(f"\nSparsity-aware training (CAST-style) from one-shot SparseGPT 2:4: {c['steps']} "
          f"steps x {c['batch_size']} x {c['seq_len']} tokens ({c['tokens']:,} tokens), "
          f"lr {c['lr']:g}, decay {c['decay']:g}, hard mask from step "
          f"{round(c['harden_at'] * c['steps'])}; distilled from the dense model (0.33 CE + "
          f"0.67 KL)\n")
    print("| model | perplexity | vs dense | gap to dense closed | wall time |")
    print("|---|---:|---:|---:|---:|")
    print(f"| dense | {dense:.3f} | | | |")
    print(f"| one-shot SparseGPT 2:4 | {c['ppl_before']:.3f} | "
          f"{(c['ppl_before'] / dense - 1) * 100:+.1f} % | | |")
    print(f"| + sparsity-aware training | {c['ppl_after']:.3f} | "
          f"{(c['ppl_after'] / dense - 1) * 100:+.1f} % | {closed:.0f} % | "
          f"{c['seconds'] / 60:.1f} min |")


def _plot_cast(c: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax.plot(range(1, len(c["loss"]) + 1), c["loss"], color="tab:blue")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (0.33 CE + 0.67 KL)")
    ax.set_title(f"sparsity-aware training: {c['ppl_before']:.2f} -> {c['ppl_after']:.2f}")
    steps = [s["step"] for s in c["schedule"]]
    ax2.plot(steps, [s["dropped_to_kept_norm"] for s in c["schedule"]], "o-",
             label="||dropped|| / ||kept||")
    ax2.plot(steps, [s["alpha"] for s in c["schedule"]], "s--", label="soft-mask alpha")
    ax2.set_xlabel("step")
    ax2.legend(fontsize=8)
    ax3 = ax2.twinx()
    ax3.bar(steps, [s["mask_flips"] for s in c["schedule"]], width=3, alpha=0.3, color="gray")
    ax3.set_ylabel("mask flips")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- artifacts ------------------------------------------------------------------------------------
ARTIFACTS = {
    # name: (source: model name or checkpoint key, pipeline applied, export sparse mode, label)
    "fp32": (None, "", "compressed", "fp32 dense"),
    "2:4": ("sparsegpt-2-4", "", "compressed", "SparseGPT 2:4, compressed"),
    "2:4-dense": ("sparsegpt-2-4", "", "dense", "SparseGPT 2:4, dense with zeros"),
    "int4": (None, "quantize{bits=4,group_size=128,method=gptq}", "compressed",
             "int4 g128 GPTQ"),
    "2:4+int4": ("sparsegpt-2-4", "quantize{bits=4,group_size=128,method=gptq}", "compressed",
                 "SparseGPT 2:4 + int4 g128 GPTQ, compressed"),
    "2:4+int4-dense": ("sparsegpt-2-4", "quantize{bits=4,group_size=128,method=gptq}", "dense",
                       "SparseGPT 2:4 + int4 g128 GPTQ, dense MatMulNBits"),
    "cast+int4": ("cast-2-4", "quantize{bits=4,group_size=128,method=gptq}", "compressed",
                  "CAST 2:4 + int4 g128 GPTQ, compressed"),
}


def part_artifacts(args, out: Path, results: dict) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from ort_baseline import decode_speed, perplexity

    rows = results.setdefault("artifacts", {})
    names = [n for n in ARTIFACTS if not args.only or n in args.only]
    built = {}
    if args.decode_only:  # speeds of the artifacts already built and scored
        built = {n: out / "onnx" / n.replace(":", "-") for n in names if n in rows}
        names = []
    programs: dict[tuple, tuple] = {}  # (source, pipeline) -> (program, seconds): built once
    for name in names:
        source, pipeline, mode, label = ARTIFACTS[name]
        path = out / "onnx" / name.replace(":", "-")
        if source is not None and not (out / "ckpt" / source).is_dir():
            if source == "sparsegpt-2-4":
                sparsegpt_checkpoint(out, args)
            else:
                print(f"skip {name}: run the 'cast' part first", flush=True)
                continue
        if not (path / "modelfold.json").is_file() or not args.reuse:
            if (source, pipeline) not in programs:
                model = args.model if source is None else str(out / "ckpt" / source)
                start = time.perf_counter()
                program = modelfold.load(model)
                if pipeline:
                    program = modelfold.transform(program, pipeline, context=QUIET).program
                programs[(source, pipeline)] = (program, time.perf_counter() - start)
            program, seconds = programs[(source, pipeline)]
            modelfold.export(program, path, overwrite=True, sparse=mode)
            rows.setdefault(name, {})["pass_seconds"] = round(seconds, 1)
        built[name] = path
        facts = json.loads((path / "modelfold.json").read_text())
        ppl = perplexity(path, chars=args.chars, progress=False)["perplexity"]
        rows.setdefault(name, {}).update({
            "label": label, "bytes": sum(f.stat().st_size for f in path.iterdir()
                                         if f.name.startswith("model.onnx")),
            "perplexity": ppl, "parity": _parity_summary(facts)})
        print(f"{name}: {ppl:.3f}, {rows[name]['bytes']:,} bytes", flush=True)
        save_results(out, results)
    speeds = decode_speed(list(built.values()), runs=args.runs)
    for name, path in built.items():
        rows[name]["decode_tokens_per_s"] = speeds[str(path)]["decode_tokens_per_s"]
    results["artifacts_decode"] = {"runs": args.runs}
    save_results(out, results)


def _parity_summary(manifest: dict) -> float | None:
    """Largest |logit difference| torch vs ONNX Runtime (prefill and decode) in the manifest."""
    parity = manifest.get("parity") or {}
    values = [parity.get(k) for k in ("prefill_max_abs_diff", "decode_max_abs_diff")]
    values = [v for v in values if isinstance(v, float)]
    return max(values) if values else None


def table_artifacts(results: dict) -> None:
    rows = results.get("artifacts")
    if not rows or "fp32" not in rows:
        return
    base = rows["fp32"]
    print(f"\nONNX Runtime artifacts (CPU, 2 threads); perplexity of the artifact; decode: batch 1, "
          f"median of {results.get('artifacts_decode', {}).get('runs', '?')} interleaved runs\n")
    print("| artifact | perplexity | vs fp32 | bytes | vs fp32 | decode tok/s | "
          "max abs logit diff vs torch |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows.values():
        speed, parity = r.get("decode_tokens_per_s"), r.get("parity")
        print(f"| {r['label']} | {r['perplexity']:.3f} | "
              f"{(r['perplexity'] / base['perplexity'] - 1) * 100:+.1f} % | {r['bytes']:,} | "
              f"{r['bytes'] / base['bytes'] * 100:.1f} % | "
              f"{'' if speed is None else f'{speed:.1f}'} | "
              f"{'' if parity is None else f'{parity:.1e}'} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("part", choices=["oneshot", "cast", "artifacts", "table"])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--chars", type=int, default=100_000)
    ap.add_argument("--out", default="out/bench_sparsity")
    ap.add_argument("--steps", type=int, default=150, help="cast: optimizer steps")
    ap.add_argument("--lr", type=float, default=1e-4, help="cast: peak learning rate")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--decay", type=float, default=2.0, help="cast: peak L1 decay")
    ap.add_argument("--harden-at", type=float, default=0.75)
    ap.add_argument("--runs", type=int, default=3, help="artifacts: decode runs")
    ap.add_argument("--only", nargs="*", help="artifacts: rows to build")
    ap.add_argument("--reuse", action="store_true", help="artifacts: reuse exported artifacts")
    ap.add_argument("--decode-only", action="store_true",
                    help="artifacts: only measure the decode speed of the rows already scored")
    args = ap.parse_args()
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = load_results(out)
    if args.part == "oneshot":
        part_oneshot(args, out, results)
    elif args.part == "cast":
        part_cast(args, out, results)
    elif args.part == "artifacts":
        part_artifacts(args, out, results)
    if "dense" in results:
        table_oneshot(results)
        table_cast(results)
    table_artifacts(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
