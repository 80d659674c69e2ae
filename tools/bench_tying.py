"""Layer tying (Relaxed Recursive Transformers) on SmolLM2-135M (30 layers): a rank sweep and
the ONNX artifacts.

    .venv/bin/python tools/bench_tying.py sweep       # K x init x rank: ppl before / after uptraining
    .venv/bin/python tools/bench_tying.py artifacts   # ONNX bytes, parity, decode speed
    .venv/bin/python tools/bench_tying.py table       # print the tables from results.json

Sweep: for every K in ``--unique``, init in ``--inits`` and rank in ``--ranks`` (0 = pure
recursive), ``tie-layers{unique=K,init=I,relax_rank=r}``, then ``modelfold.uptrain``
(distillation from the original: T^2 KL only, ``--steps`` x ``--batch-size`` x ``--seq-len``
tokens of the calibration split, lr ``--lr``). Perplexity: the wikipedia evaluation split (first
``--chars`` characters, 512-token windows), before and after uptraining. Unique parameters count
every shared tensor once (embeddings included; the LM head is tied to them). Results accumulate in
``--out``/results.json; finished configurations are skipped (``--redo`` recomputes them). A plot
of perplexity against unique parameters goes to ``--out``/sweep.png.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import modelfold
from modelfold.corpus import corpus_text
from modelfold.passes.manager import PassContext

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import eager_ppl, load_results, save_results  # noqa: E402

QUIET = PassContext(log=None, verify=False, measure=False)


def config_key(k: int, init: str, rank: int) -> str:
    return f"K{k}-{init}-r{rank}"


# -- sweep ---------------------------------------------------------------------------------------
def part_sweep(args, out: Path, results: dict) -> None:
    teacher = modelfold.load(args.model)
    tokenizer = teacher.tokenizer
    if "dense" not in results or results["dense"].get("chars") != args.chars:
        ppl = eager_ppl(teacher.module, tokenizer, args.chars)
        results["dense"] = {"perplexity": ppl, "chars": args.chars,
                            "parameters": teacher.parameter_count(),
                            "layers": teacher.arch.num_layers}
        save_results(out, results)
        print(f"original: ppl {ppl:.3f}, {teacher.parameter_count():,} parameters", flush=True)
    rows = results.setdefault("sweep", {})
    for k in args.unique:
        for init in args.inits:
            for rank in args.ranks:
                key = config_key(k, init, rank)
                if key in rows and not args.redo:
                    continue
                start = time.perf_counter()
                result = modelfold.transform(
                    args.model, f"tie-layers{{unique={k},init={init},relax_rank={rank}}}",
                    context=QUIET)
                tie_seconds = time.perf_counter() - start
                details = result.program.log[-1].details
                unique = result.program.parameter_count()
                report = modelfold.uptrain(
                    result, teacher=teacher.module, steps=args.steps, lr=args.lr,
                    batch_size=args.batch_size, seq_len=args.seq_len,
                    warmup_steps=max(1, args.steps // 10), eval_chars=args.chars,
                    log_every=0, progress=False, log=None)
                rows[key] = {
                    "unique": k, "init": init, "rank": rank, "parameters": unique,
                    "block_before": details["block_parameters_before"],
                    "block_after": details["block_parameters_after"],
                    "relaxation_parameters": details["relaxation_parameters"],
                    "ppl_before": report["perplexity_before"],
                    "ppl_after": report["perplexity_after"],
                    "steps": args.steps, "tokens": report["tokens"], "lr": args.lr,
                    "tie_seconds": round(tie_seconds, 1),
                    "train_seconds": round(report["seconds"], 1),
                    "seconds_per_step": report["seconds_per_step"],
                }
                save_results(out, results)
                print(f"{key}: {unique:,} params, ppl {report['perplexity_before']:.2f} -> "
                      f"{report['perplexity_after']:.2f} ({report['seconds']:.0f} s)", flush=True)
                del result, report
    plot_sweep(results, out / "sweep.png")


def table_sweep(results: dict) -> None:
    rows = results.get("sweep")
    if not rows:
        return
    dense = results["dense"]
    any_row = next(iter(rows.values()))
    print(f"\nRank sweep: SmolLM2-135M ({dense['layers']} layers), perplexity on "
          f"{dense['chars']:,} eval characters; uptraining = {any_row['steps']} steps x "
          f"{any_row['tokens'] // max(any_row['steps'], 1):,} tokens, T^2 KL from the original, "
          f"lr {any_row['lr']:g}\n")
    print("| K | init | relax rank | unique params | block params | ppl tied | ppl uptrained |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    print(f"| {dense['layers']} (original) | | | {dense['parameters'] / 1e6:.1f} M | | "
          f"{dense['perplexity']:.2f} | |")
    for r in sorted(rows.values(), key=lambda r: (-r["unique"], r["init"], r["rank"])):
        print(f"| {r['unique']} | {r['init']} | {r['rank'] or '-'} | "
              f"{r['parameters'] / 1e6:.1f} M | {r['block_after'] / 1e6:.1f} M "
              f"(÷{r['block_before'] / r['block_after']:.2f}) | {r['ppl_before']:.2f} | "
              f"{r['ppl_after']:.2f} |")


def plot_sweep(results: dict, path: Path) -> None:
    rows = results.get("sweep")
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    dense = results["dense"]
    colors = {"stepwise": "#1c7ed6", "average": "#e8590c", "lower": "#2f9e44"}
    markers = {15: "o", 10: "s"}
    for ax, when in zip(axes, ("ppl_before", "ppl_after")):
        for (k, init) in sorted({(r["unique"], r["init"]) for r in rows.values()}, reverse=True):
            pts = sorted((r["parameters"] / 1e6, r[when], r["rank"]) for r in rows.values()
                         if r["unique"] == k and r["init"] == init)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers.get(k, "^"),
                    color=colors.get(init, "black"), label=f"K={k} {init}",
                    linestyle="-" if k == max(markers) else "--")
            for x, y, rank in pts:
                ax.annotate(f"r{rank}", (x, y), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        ax.scatter([dense["parameters"] / 1e6], [dense["perplexity"]], color="black",
                   marker="*", s=120, label="original (30 layers)", zorder=5)
        ax.set_yscale("log")
        ax.set_xlabel("unique parameters (M)")
        ax.set_title("tied + SVD relaxation (no training)" if when == "ppl_before"
                     else "after uptraining (distillation)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("perplexity (log scale)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- artifacts -----------------------------------------------------------------------------------
ARTIFACTS = {"original": "", "K15": "tie-layers{unique=15}", "K10": "tie-layers{unique=10}",
             "K15-r64": "tie-layers{unique=15,init=average,relax_rank=64}"}


def part_artifacts(args, out: Path, results: dict) -> None:
    from modelfold.backends.onnxruntime.runtime import OnnxCausalLM

    rows = results.setdefault("artifacts", {})
    prompt_text = corpus_text("wikipedia", "evaluation")[:400]
    for name, pipeline in ARTIFACTS.items():
        if args.only and name not in args.only:
            continue
        target = out / "onnx" / name
        if pipeline:
            result = modelfold.transform(args.model, pipeline, context=QUIET)
        else:
            result = modelfold.load(args.model)
        module = result.module if hasattr(result, "module") else result
        program = getattr(result, "program", result)
        start = time.perf_counter()
        manifest = modelfold.export(result, target, backend="onnxruntime", overwrite=True)
        seconds = time.perf_counter() - start
        files = {p.name: p.stat().st_size for p in target.iterdir() if p.name.startswith("model.")}
        tokenizer = program.tokenizer
        ids = tokenizer(prompt_text, return_tensors="pt").input_ids[0, :64].tolist()
        runner = OnnxCausalLM(target)
        speeds = [runner.generate(ids, max_new_tokens=32)["decode_tokens_per_s"]
                  for _ in range(args.runs)]
        with torch.no_grad():
            eager = module.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                                    min_new_tokens=32)[0, len(ids):].tolist()
        onnx_tokens = runner.generate(ids, max_new_tokens=32)["new_tokens"]
        parity = manifest.get("parity") or {}
        rows[name] = {"pipeline": pipeline, "bytes": sum(files.values()), "files": files,
                      "parameters": program.parameter_count(),
                      "export_seconds": round(seconds, 1),
                      "decode_tokens_per_s": statistics.median(speeds),
                      "parity_max_abs": parity.get("prefill_max_abs_diff"),
                      "greedy_tokens_match": list(onnx_tokens) == eager,
                      "shared_initializers": manifest["onnx"].get("shared_initializers")}
        save_results(out, results)
        print(f"{name}: {sum(files.values()) / 1e6:.1f} MB, "
              f"{rows[name]['decode_tokens_per_s']:.1f} tok/s", flush=True)
        del result, runner


def table_artifacts(results: dict) -> None:
    rows = results.get("artifacts")
    if not rows:
        return
    base = rows.get("original", {}).get("bytes")
    print("\nONNX artifacts (fp32, ONNX Runtime CPU, 2 threads; decode = 32 new tokens after a "
          "64-token prompt, median of runs)\n")
    print("| model | unique params | artifact | vs original | decode tok/s | parity (max abs "
          "logit diff) | greedy tokens = eager |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, r in rows.items():
        ratio = f"{r['bytes'] / base * 100:.0f} %" if base else "-"
        parity = f"{r['parity_max_abs']:.1e}" if r.get("parity_max_abs") is not None else "-"
        print(f"| {name} `{r['pipeline'] or 'none'}` | {r['parameters'] / 1e6:.1f} M | "
              f"{r['bytes'] / 1e6:.1f} MB | {ratio} | {r['decode_tokens_per_s']:.1f} | {parity} | "
              f"{'yes' if r['greedy_tokens_match'] else 'no'} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("sweep", "artifacts", "table"))
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", default="out/bench_tying")
    parser.add_argument("--unique", type=int, nargs="+", default=[15, 10])
    parser.add_argument("--inits", nargs="+", default=["stepwise", "average"])
    parser.add_argument("--ranks", type=int, nargs="+", default=[0, 64, 128])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--chars", type=int, default=50_000)
    parser.add_argument("--redo", action="store_true")
    parser.add_argument("--only", nargs="*", help="artifacts: only these names")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = load_results(out)
    if args.part == "sweep":
        part_sweep(args, out, results)
    elif args.part == "artifacts":
        part_artifacts(args, out, results)
    table_sweep(results)
    table_artifacts(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
