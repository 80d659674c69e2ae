"""Attention sharing across layers (EchoAtt score sharing, CLA/MLKV KV sharing) on SmolLM2-135M
(30 layers, 9 query / 3 KV heads).

    .venv/bin/python tools/bench_share_attention.py untrained   # similarity vs stride vs random
    .venv/bin/python tools/bench_share_attention.py uptrain     # distil, export, ONNX perplexity
    .venv/bin/python tools/bench_share_attention.py speed       # decode tok/s of the artifacts
    .venv/bin/python tools/bench_share_attention.py table       # print the tables

untrained: ``attention-similarity`` once on the calibration split (heatmaps: --out/similarity.png),
then for each mode (scores, kv), count (``--counts``: borrowing layers) and strategy (similarity,
stride, random; and similarity with ``init=average``, MLKV's fold of the dropped projections)
``share-attention{mode,count,strategy,init}``: parameters, KV-cache bytes per token and the
perplexity without training.

uptrain: the similarity configurations distilled from the original (``modelfold.uptrain``: T^2 KL
only, ``--steps`` x ``--batch-size`` x ``--seq-len`` tokens of the calibration split, lr ``--lr``;
the attention of the sharing layers trains, the rest is frozen), then exported to ONNX (fp32,
default fusions) with the artifact's bytes, its KV-cache inputs and its perplexity next to the
eager model's.

speed: decode tokens/s (ONNX Runtime, batch 1, ``--threads`` threads, greedy, 64 new tokens) of
the original's artifact and each shared one after a 128- and a 1,024-token prompt, ``--rounds``
interleaved rounds, medians.

Perplexity: the wikipedia evaluation split, first ``--chars`` characters, 512-token windows.
Results accumulate in --out/results.json; finished rows are skipped (--redo recomputes).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import modelfold
from modelfold.corpus import corpus_text
from modelfold.evaluate import evaluate
from modelfold.ir.shared_attention import MODES
from modelfold.passes.manager import PassContext

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import eager_ppl, load_results, save_results  # noqa: E402

QUIET = PassContext(log=None, verify=False, measure=False)
STRATEGIES = ("similarity", "stride", "random")


def key(mode: str, count: int, strategy: str) -> str:
    return f"{mode}-{count}-{strategy}"


def _analysis(args, out: Path, results: dict, base):
    from modelfold.passes.attention_similarity import ANALYSIS_KEY, AttentionSimilarity

    if "similarity" not in results:
        program = base.converted()
        start = time.perf_counter()
        details = AttentionSimilarity(n_samples=args.samples, seq_len=256).run(program)
        details["seconds"] = round(time.perf_counter() - start, 1)
        results["similarity"] = {k: details[k] for k in ("maps", "keys", "values", "kv",
                                                          "scores_kl", "kv_kl",
                                                          "adjacent", "seconds")}
        save_results(out, results)
        AttentionSimilarity.plot(details, out / "similarity.png")
    return ANALYSIS_KEY, results["similarity"]


def shared_program(base, analysis, mode: str, count: int, strategy: str, init: str = "owner"):
    program = base.converted()
    program.analyses[analysis[0]] = analysis[1]
    result = modelfold.transform(program, f"share-attention{{mode={mode},count={count},"
                                          f"strategy={strategy},init={init}}}", context=QUIET)
    return result


def part_untrained(args, out: Path, results: dict) -> None:
    base = modelfold.load(args.model)
    if "original" not in results:
        ppl = eager_ppl(base.module, base.tokenizer, args.chars)
        cache = base.signature.cache
        results["original"] = {"perplexity": ppl, "parameters": base.parameter_count(),
                               "kv_bytes_per_token": cache.bytes_per_token, "chars": args.chars}
        save_results(out, results)
        print(f"original: ppl {ppl:.3f}", flush=True)
    analysis = _analysis(args, out, results, base)
    rows = results.setdefault("untrained", {})
    for mode in MODES:
        for count in args.counts:
            for strategy in (*STRATEGIES, "similarity-average"):
                name = key(mode, count, strategy)
                if name in rows and not args.redo:
                    continue
                strategy, _, init = strategy.partition("-")
                result = shared_program(base, analysis, mode, count, strategy, init or "owner")
                details = result.program.log[-1].details
                ppl = eager_ppl(result.module, base.tokenizer, args.chars)
                rows[name] = {"mode": mode, "count": count, "strategy": strategy,
                              "init": init or "owner",
                              "groups": details["groups"],
                              "parameters": result.program.parameter_count(),
                              "kv_bytes_per_token": details["kv_bytes_per_token"]["after"],
                              "perplexity": ppl}
                save_results(out, results)
                print(f"{name}: ppl {ppl:.2f}, groups {details['groups']}", flush=True)


def part_uptrain(args, out: Path, results: dict) -> None:
    from modelfold.backends.onnxruntime.runtime import OnnxCausalLM

    base = modelfold.load(args.model)
    analysis = _analysis(args, out, results, base)
    rows = results.setdefault("uptrained", {})
    text = corpus_text("wikipedia", "evaluation")
    if "original" not in results.setdefault("artifacts", {}):
        results["artifacts"]["original"] = _export(base, out / "onnx" / "original", text,
                                                   base.tokenizer, args.chars, OnnxCausalLM)
        save_results(out, results)
    for mode in MODES:
        for count in args.counts:
            name = key(mode, count, "similarity")
            if name in rows and not args.redo:
                continue
            result = shared_program(base, analysis, mode, count, "similarity")
            report = modelfold.uptrain(
                result, teacher=base.module, steps=args.steps, lr=args.lr,
                batch_size=args.batch_size, seq_len=args.seq_len,
                warmup_steps=max(1, args.steps // 10), eval_chars=args.chars, log_every=0,
                progress=False, log=None)
            rows[name] = {"ppl_before": report["perplexity_before"],
                          "ppl_after": report["perplexity_after"], "steps": args.steps,
                          "tokens": report["tokens"], "lr": args.lr,
                          "trainable_parameters": report["trainable_parameters"],
                          "train_seconds": round(report["seconds"], 1)}
            results["artifacts"][name] = _export(result, out / "onnx" / name, text,
                                                 base.tokenizer, args.chars, OnnxCausalLM)
            results["artifacts"][name]["eager_perplexity"] = report["perplexity_after"]
            save_results(out, results)
            print(f"{name}: ppl {report['perplexity_before']:.2f} -> "
                  f"{report['perplexity_after']:.2f} ({report['seconds']:.0f} s); ONNX ppl "
                  f"{results['artifacts'][name]['onnx_perplexity']:.3f}", flush=True)


def _export(result, target: Path, text: str, tokenizer, chars: int, runtime) -> dict:
    manifest = modelfold.export(result, target, backend="onnxruntime", overwrite=True)
    files = {p.name: p.stat().st_size for p in target.iterdir() if p.name.startswith("model.")}
    runner = runtime(target)
    ppl = evaluate(runner, tokenizer, text, chars=chars, progress=False)["perplexity"]
    onnx = manifest["onnx"]
    return {"bytes": sum(files.values()), "onnx_perplexity": ppl,
            "past_inputs": len(runner.past_names),
            "kv_bytes_per_token": onnx["kv_cache_bytes_per_token"]["artifact"],
            "parameters": getattr(result, "program", result).parameter_count()}


def part_speed(args, out: Path, results: dict) -> None:
    from modelfold.backends.onnxruntime.runtime import OnnxCausalLM

    artifacts = results.get("artifacts", {})
    base = modelfold.load(args.model)
    ids = base.tokenizer(corpus_text("wikipedia", "evaluation")[:20000]).input_ids
    prompts = {128: ids[:128], 1024: ids[:1024]}
    runners = {name: OnnxCausalLM(out / "onnx" / name, threads=args.threads)
               for name in artifacts if (out / "onnx" / name).is_dir()}
    speeds: dict[str, dict[int, list[float]]] = {n: {c: [] for c in prompts} for n in runners}
    for round_ in range(args.rounds):
        for name, runner in runners.items():
            for context, prompt in prompts.items():
                run = runner.generate(prompt, max_new_tokens=64)
                speeds[name][context].append(run["decode_tokens_per_s"])
        print(f"round {round_ + 1}/{args.rounds}", flush=True)
    for name in runners:
        artifacts[name]["decode_tokens_per_s"] = {
            str(c): statistics.median(v) for c, v in speeds[name].items()}
    results["speed"] = {"rounds": args.rounds, "threads": args.threads, "new_tokens": 64}
    save_results(out, results)


def print_tables(results: dict) -> None:
    original = results.get("original", {})
    rows = results.get("untrained", {})
    if rows:
        print(f"original: {original['parameters']:,} parameters, "
              f"{original['kv_bytes_per_token']:,} KV bytes/token, ppl "
              f"{original['perplexity']:.2f}\n")
        print("| mode | borrowing layers | parameters | KV bytes/token | ppl similarity | "
              "ppl stride | ppl random | ppl similarity, init=average |")
        print("|---|---|---|---|---|---|---|---|")
        done = sorted({(r["mode"], r["count"]) for r in rows.values()},
                      key=lambda t: (MODES.index(t[0]), t[1]))
        for mode, count in done:
            cells = [rows.get(key(mode, count, s)) for s in (*STRATEGIES, "similarity-average")]
            first = next(c for c in cells if c)
            ppl = [f"{c['perplexity']:.2f}" if c else "-" for c in cells]
            print(f"| {mode} | {count} | {first['parameters']:,} | "
                  f"{first['kv_bytes_per_token']:,} | {' | '.join(ppl)} |")
    up, art = results.get("uptrained", {}), results.get("artifacts", {})
    if art:
        print("\n| artifact | parameters | KV bytes/token | past inputs | bytes (MB) | "
              "decode tok/s @128 | @1024 | ppl untrained | ppl uptrained (eager / ONNX) |")
        print("|---|---|---|---|---|---|---|---|---|")
        for name, a in art.items():
            speed = a.get("decode_tokens_per_s", {})
            u = up.get(name, {})
            before = f"{u['ppl_before']:.2f}" if u else f"{original.get('perplexity', 0):.2f}"
            after = f"{u['ppl_after']:.2f} / {a['onnx_perplexity']:.2f}" if u else \
                f"- / {a['onnx_perplexity']:.2f}"
            print(f"| {name} | {a['parameters']:,} | {a['kv_bytes_per_token']:,} | "
                  f"{a['past_inputs']} | {a['bytes'] / 1e6:.1f} | "
                  f"{speed.get('128', 0):.1f} | {speed.get('1024', 0):.1f} | {before} | {after} |")
        if up:
            first = next(iter(up.values()))
            print(f"\nuptraining: {first['steps']} steps, {first['tokens']:,} tokens, lr "
                  f"{first['lr']}; trainable parameters: " + ", ".join(
                      f"{n} {u['trainable_parameters']:,}" for n, u in up.items()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=["untrained", "uptrain", "speed", "table"])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", type=Path, default=Path("runs/share_attention"))
    parser.add_argument("--counts", type=int, nargs="+", default=[10, 15])
    parser.add_argument("--chars", type=int, default=40_000)
    parser.add_argument("--samples", type=int, default=16, help="similarity calibration sequences")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--redo", action="store_true")
    args = parser.parse_args()
    results = load_results(args.out)
    if args.part == "untrained":
        part_untrained(args, args.out, results)
    elif args.part == "uptrain":
        part_uptrain(args, args.out, results)
    elif args.part == "speed":
        part_speed(args, args.out, results)
    print_tables(load_results(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
