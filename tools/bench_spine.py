"""Torch eager vs the ONNX Runtime artifact, side by side, on the default model (fp32, CPU).

    .venv/bin/python tools/bench_spine.py [--chars 200000] [--runs 5] [--prompt-tokens 128]
                                          [--new-tokens 64] [--artifact DIR] [--against DIR ...]

Prints one Markdown table: perplexity (evaluation split, `modelfold eval` protocol), artifact
bytes, prefill latency and decode tokens/s (medians of --runs, interleaved torch/ORT runs so
machine noise hits both), plus whether 32 greedy tokens match transformers' `generate`.
``--against`` adds other artifacts of the same model (e.g. one written by an earlier modelfold)
as rows, scored and timed in the same interleaved runs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import DynamicCache

import modelfold
from modelfold.artifact import read_manifest
from modelfold.backends.onnxruntime.runtime import OnnxCausalLM
from modelfold.corpus import corpus_text, tokenize_text
from modelfold.evaluate import evaluate


@torch.no_grad()
def torch_generate(model, ids: list[int], new_tokens: int) -> dict:
    """Greedy decoding in eager PyTorch with a DynamicCache (what `generate` does, minus overhead)."""
    cache = DynamicCache(config=model.config)
    start = time.perf_counter()
    out = model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True)
    token = int(out.logits[0, -1].argmax())
    prefill = time.perf_counter() - start
    tokens = [token]
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        out = model(input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values,
                    use_cache=True)
        token = int(out.logits[0, -1].argmax())
        tokens.append(token)
    decode = time.perf_counter() - start
    return {"new_tokens": tokens, "prefill_seconds": prefill,
            "decode_tokens_per_s": (new_tokens - 1) / decode}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--chars", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--artifact", help="reuse an artifact folder instead of exporting one")
    parser.add_argument("--against", nargs="*", default=[],
                        help="other artifact folders to score and time in the same runs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    program = modelfold.load(args.model)
    model, tokenizer = program.module, program.tokenizer
    tmp = tempfile.TemporaryDirectory()
    artifact = Path(args.artifact) if args.artifact else Path(tmp.name) / "artifact"
    if not args.artifact:
        start = time.perf_counter()
        modelfold.export(program, artifact)
        print(f"exported in {time.perf_counter() - start:.0f}s")
    manifest = read_manifest(artifact)
    lm = OnnxCausalLM(artifact, threads=args.threads)

    text = corpus_text("wikipedia", "evaluation")
    ppl_torch = evaluate(model, tokenizer, text, chars=args.chars, progress=False)
    ppl_ort = evaluate(lm, tokenizer, text, chars=args.chars, progress=False)
    others = {path: OnnxCausalLM(path, threads=args.threads) for path in args.against}
    ppl_others = {path: evaluate(o, tokenizer, text, chars=args.chars, progress=False)
                  for path, o in others.items()}

    prompt = [tokenizer.bos_token_id] + tokenize_text(tokenizer, text[:4000]).tolist()
    prompt = prompt[:args.prompt_tokens]
    torch_runs, ort_runs = [], []
    other_runs: dict[str, list] = {path: [] for path in others}
    torch_generate(model, prompt, 4)  # warm-up all
    lm.generate(prompt, 4)
    for o in others.values():
        o.generate(prompt, 4)
    for _ in range(args.runs):
        torch_runs.append(torch_generate(model, prompt, args.new_tokens))
        ort_runs.append(lm.generate(prompt, args.new_tokens))
        for path, o in others.items():
            other_runs[path].append(o.generate(prompt, args.new_tokens))

    greedy_prompt = tokenizer("The Roman Empire was", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        hf = model.generate(torch.tensor([greedy_prompt]), max_new_tokens=32, do_sample=False,
                            min_new_tokens=32)[0, len(greedy_prompt):].tolist()
    ort_tokens = lm.generate(greedy_prompt, 32)["new_tokens"]

    def med(runs, key):
        return statistics.median(r[key] for r in runs)

    t_pre, o_pre = med(torch_runs, "prefill_seconds"), med(ort_runs, "prefill_seconds")
    t_dec, o_dec = med(torch_runs, "decode_tokens_per_s"), med(ort_runs, "decode_tokens_per_s")
    params_bytes = program.parameter_bytes()
    print(f"\n{args.model}: fp32, {args.threads} threads, batch 1, prompt {len(prompt)} tokens, "
          f"{args.new_tokens} new tokens, median of {args.runs} interleaved runs; perplexity on "
          f"the wikipedia evaluation split, first {args.chars:,} chars ({ppl_torch['tokens']:,} "
          f"tokens), 512-token windows\n")
    print("| runtime | perplexity | bytes | prefill (ms) | decode (tokens/s) |")
    print("|---|---|---|---|---|")
    print(f"| torch eager (KV cache) | {ppl_torch['perplexity']:.4f} | {params_bytes:,} "
          f"(parameters) | {t_pre * 1000:.1f} | {t_dec:.1f} |")
    print(f"| ONNX Runtime artifact | {ppl_ort['perplexity']:.4f} | {manifest['onnx_bytes']:,} "
          f"(model.onnx + data) | {o_pre * 1000:.1f} | {o_dec:.1f} |")
    for path, runs in other_runs.items():
        size = read_manifest(path)["onnx_bytes"]
        print(f"| {path} | {ppl_others[path]['perplexity']:.4f} | {size:,} | "
              f"{med(runs, 'prefill_seconds') * 1000:.1f} | {med(runs, 'decode_tokens_per_s'):.1f} |")
    rel = abs(ppl_ort["perplexity"] / ppl_torch["perplexity"] - 1) * 100
    print(f"\nperplexity difference: {rel:.4f} %; ORT/torch decode speed: {o_dec / t_dec:.2f}x; "
          f"prefill: {t_pre / o_pre:.2f}x")
    print(f"greedy 32 tokens, ORT == transformers generate: {ort_tokens == hf}")
    print(f"parity (manifest): {manifest.get('parity')}")


if __name__ == "__main__":
    main()
