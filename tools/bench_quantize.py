"""Quantization methods side by side on the default model: quality, size, speed, time.

    .venv/bin/python tools/bench_quantize.py [--chars 200000] [--runs 5] [--out out/bench_quantize]
                                             [--reuse] [--only ROW ...] [--eager ROW ...]

Rows: fp32; int8 per-channel RTN; int4 group-128 RTN / GPTQ / AWQ / AWQ+GPTQ; W8A8 SmoothQuant;
int4 AWQ+GPTQ with the (tied) embedding and LM head quantized too (to int4 or int8, applied to the
saved AWQ+GPTQ checkpoint); and ONNX Runtime's own
``MatMulNBitsQuantizer`` at the same int4 group-128 asymmetric settings (its RTN and GPTQ
configs) as the reference point. Every row is exported to an ONNX Runtime artifact under
``--out`` (kept; ``--reuse`` skips rows whose artifact exists).

Columns: perplexity of the artifact (wikipedia evaluation split, first ``--chars`` chars,
512-token windows: the ``modelfold eval`` protocol), its increase over fp32, artifact bytes and
their share of fp32, decode tokens/s in ONNX Runtime (batch 1, 2 threads, median of ``--runs``
runs interleaved over all artifacts so machine noise hits all alike) at ``accuracy_level`` 0 and 4
(the MatMulNBits attribute, patched into a hard-linked copy of each artifact), and the
quantization wall time. ``--eager`` rows are reloaded from their saved checkpoint and evaluated in
eager PyTorch too (parity).
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
from modelfold.backends.onnxruntime.runtime import OnnxCausalLM
from modelfold.corpus import corpus_text, tokenize_text
from modelfold.evaluate import evaluate
from modelfold.passes.manager import PassContext

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ort_baseline import with_accuracy_level  # noqa: E402  (tools/ is not a package)

OURS = {
    "fp32": "",
    "int8-rtn-channel": "quantize{bits=8,group_size=-1,method=rtn}",
    "int4-rtn": "quantize{bits=4,group_size=128,method=rtn}",
    "int4-gptq": "quantize{bits=4,group_size=128,method=gptq}",
    "int4-awq": "quantize{bits=4,group_size=128,method=awq}",
    "int4-awq-gptq": "quantize{bits=4,group_size=128,method=awq-gptq}",
    "w8a8-smoothquant": "smooth-quant{alpha=0.5}",
}
# rows derived from another row's saved checkpoint: (base row, pipeline applied to it)
DERIVED = {
    "int4-awq-gptq+emb4": ("int4-awq-gptq",
                           "quantize{bits=4,group_size=128,targets=[],embeddings=true,lm_head=true}"),
    "int4-awq-gptq+emb8": ("int4-awq-gptq",
                           "quantize{bits=8,group_size=128,targets=[],embeddings=true,lm_head=true}"),
}
ORT = {
    "ort-rtn": {"method": "default"},
    # ORT 1.32's GPTQ reads the (zero) lower triangle of the upper Cholesky factor, so its result
    # does not depend on the calibration data; 32 windows instead of 128 keep the run short.
    "ort-gptq": {"method": "gptq", "calib_samples": 32},
}
LABELS = {
    "fp32": "fp32",
    "int8-rtn-channel": "int8 per-channel RTN (ours)",
    "int4-rtn": "int4 g128 RTN (ours)",
    "int4-gptq": "int4 g128 GPTQ (ours)",
    "int4-awq": "int4 g128 AWQ (ours)",
    "int4-awq-gptq": "int4 g128 AWQ+GPTQ (ours)",
    "w8a8-smoothquant": "W8A8 SmoothQuant (ours)",
    "int4-awq-gptq+emb4": "int4 g128 AWQ+GPTQ + int4 embedding/head (ours)",
    "int4-awq-gptq+emb8": "int4 g128 AWQ+GPTQ + int8 embedding/head (ours)",
    "ort-rtn": "ORT MatMulNBitsQuantizer default (RTN) g128",
    "ort-gptq": "ORT MatMulNBitsQuantizer GPTQ g128",
}


def checkpoint_dir(out: Path, row: str) -> Path:
    return out / "_checkpoints" / row


def build_ours(row: str, out: Path, model: str) -> dict:
    """Transform + save + export one of our rows; returns {'seconds': quantization wall time}."""
    root = out.parent
    if row in DERIVED:
        base, spec = DERIVED[row]
        program = modelfold.load(str(checkpoint_dir(root, base)))
        before = json.loads((root / base / "bench.json").read_text())["quantize_seconds"]
    else:
        program, spec, before = modelfold.load(model), OURS[row], 0.0
    start = time.perf_counter()
    if spec:
        result = modelfold.transform(program, spec,
                                     context=PassContext(verify=False, measure=False))
    else:
        result = program
    seconds = before + time.perf_counter() - start
    if spec:
        modelfold.save(result, checkpoint_dir(root, row), overwrite=True)
    modelfold.export(result, out, overwrite=True, parity=False)
    (out / "bench.json").write_text(json.dumps({"quantize_seconds": seconds}))
    return {"seconds": seconds}


def build_ort(row: str, out: Path, fp32: Path) -> dict:
    from ort_baseline import ort_quantize

    info = ort_quantize(fp32, out, bits=4, block_size=128, symmetric=False, overwrite=True,
                        **ORT[row])
    seconds = info.get("seconds", float("nan"))
    (out / "bench.json").write_text(json.dumps({"quantize_seconds": seconds}))
    return {"seconds": seconds}


def artifact_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.name.startswith("model.onnx"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--chars", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="out/bench_quantize")
    parser.add_argument("--reuse", action="store_true", help="reuse artifacts that exist")
    parser.add_argument("--only", nargs="*", help="rows to build (default: all)")
    parser.add_argument("--eager", nargs="*", default=["int4-awq-gptq", "w8a8-smoothquant",
                                                       "int4-awq-gptq+emb4"],
                        help="rows also evaluated in eager PyTorch, reloaded from their saved "
                             "checkpoint (parity, and the checkpoint round trip)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [r for r in [*OURS, *DERIVED, *ORT] if not args.only or r in args.only or r == "fp32"]

    for row in rows:
        path = out / row
        if args.reuse and (path / "bench.json").is_file():
            continue
        print(f"== building {row}", flush=True)
        if row in OURS or row in DERIVED:
            build_ours(row, path, args.model)
        else:
            build_ort(row, path, out / "fp32")

    program = modelfold.load(args.model)
    tokenizer = program.tokenizer
    text = corpus_text("wikipedia", "evaluation")
    results: dict[str, dict] = {}
    for row in rows:
        path = out / row
        lm = OnnxCausalLM(path, threads=args.threads)
        ppl = evaluate(lm, tokenizer, text, chars=args.chars, progress=False)
        info = json.loads((path / "bench.json").read_text())
        results[row] = {"perplexity": ppl["perplexity"], "tokens": ppl["tokens"],
                        "bytes": artifact_bytes(path), "seconds": info["quantize_seconds"]}
        print(f"{row}: perplexity {ppl['perplexity']:.4f}", flush=True)
    for row in args.eager or []:
        if row not in results or not OURS.get(row, row in DERIVED):
            continue
        reloaded = modelfold.load(str(checkpoint_dir(out, row)))
        ppl = evaluate(reloaded.module, tokenizer, text, chars=args.chars, progress=False)
        results[row]["eager_perplexity"] = ppl["perplexity"]
        print(f"{row}: eager perplexity {ppl['perplexity']:.4f}", flush=True)

    prompt = [tokenizer.bos_token_id] + tokenize_text(tokenizer, text[:4000]).tolist()
    prompt = prompt[:args.prompt_tokens]
    levels = {}
    for row in rows:
        for level in (0, 4):
            dst = out / "_levels" / f"{row}-{level}"
            with_accuracy_level(out / row, dst, level, overwrite=True, link_data=True,
                                require_nodes=False)
            levels[(row, level)] = dst
    sessions = {key: OnnxCausalLM(path, threads=args.threads) for key, path in levels.items()}
    speeds: dict[tuple, list[float]] = {key: [] for key in sessions}
    for lm in sessions.values():
        lm.generate(prompt, 4)  # warm-up
    for _ in range(args.runs):
        for key, lm in sessions.items():
            speeds[key].append(lm.generate(prompt, args.new_tokens)["decode_tokens_per_s"])

    base = results["fp32"]
    print(f"\n{args.model}, perplexity on the wikipedia evaluation split (first {args.chars:,} "
          f"chars, {base['tokens']:,} tokens, 512-token windows) through the ONNX Runtime "
          f"artifact; decode: batch 1, {args.threads} threads, prompt {len(prompt)} tokens, "
          f"{args.new_tokens} new tokens, median of {args.runs} interleaved runs\n")
    print("| method | perplexity | vs fp32 | artifact bytes | vs fp32 | decode tok/s (acc 0) "
          "| decode tok/s (acc 4) | quantization time (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        r = results[row]
        d0 = statistics.median(speeds[(row, 0)])
        d4 = statistics.median(speeds[(row, 4)])
        print(f"| {LABELS[row]} | {r['perplexity']:.3f} | "
              f"{(r['perplexity'] / base['perplexity'] - 1) * 100:+.1f} % | {r['bytes']:,} | "
              f"{r['bytes'] / base['bytes'] * 100:.1f} % | {d0:.1f} | {d4:.1f} | "
              f"{r['seconds']:.0f} |")
    parity = {row: r for row, r in results.items() if "eager_perplexity" in r}
    if parity:
        print("\n| method | eager PyTorch perplexity | ONNX Runtime (acc 0) | difference |")
        print("|---|---|---|---|")
        for row, r in parity.items():
            diff = abs(r["perplexity"] / r["eager_perplexity"] - 1) * 100
            print(f"| {LABELS[row]} | {r['eager_perplexity']:.4f} | {r['perplexity']:.4f} | "
                  f"{diff:.4f} % |")
    (out / "results.json").write_text(json.dumps(
        {"results": results, "decode": {f"{k[0]}@{k[1]}": v for k, v in speeds.items()}},
        indent=2))


if __name__ == "__main__":
    main()
