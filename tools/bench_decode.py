"""Decode and prefill speed of modelfold's artifacts against onnxruntime-genai and torch, side by
side in one run.

    .venv/bin/python tools/bench_decode.py [--rounds 5] [--threads 2] [--new-tokens 64]
        [--chars 200000] [--rows ROW ...] [--reuse] [--out out/bench_decode]

(onnxruntime-genai is a benchmark extra: `.venv/bin/pip install -e '.[bench]'`.)

Rows (each built into --out/ROW unless --reuse finds it there):

- modelfold fp32, int8 (RTN, groups of 32 like genai's int8, the tied embedding / LM head table
  in int8), int4 g128 RTN (asymmetric, and symmetric like genai's), GPTQ and AWQ+GPTQ (linears
  and the table in int4, accuracy_level 4; with the float32 KV cache and with ``quantize-kv``'s
  int8 cache), all with the default fusions, run by ``OnnxCausalLM`` with its default kernels
  (modelfold's ``MatMulInt4`` / ``MatMulInt8`` for the int4 / int8 layers and ``CachedAttention``
  for the attention where the CPU has AVX-512 VNNI and a C compiler is present; the label says
  so);
- ``...@ort``: the fp32, int8 and int4 RTN artifacts (asymmetric and symmetric) again, on ONNX
  Runtime's own kernels (``kernels="onnxruntime"``: MatMulNBits, GroupQueryAttention), side by side
  with modelfold's; ``...@kv16``: the int4 RTN artifact with modelfold's attention kernel's
  float16 KV cache (``kv_cache="float16"``);
- ``--against DIR ...``: other artifacts of the same model (e.g. written by an earlier
  modelfold), run by today's runtime in the same rounds;
- onnxruntime-genai's model builder (`onnxruntime_genai.models.builder`) on the same SmolLM2
  folder: fp32, int8, int4 block 128 and int4 block 32 (its default), accuracy_level 4, run with
  genai's own `Generator` (as a user of genai would);
- torch eager fp32 with a DynamicCache.

Measured, in interleaved rounds (every row once per round, so machine noise hits all rows):
decode tokens/s after a 16-token prompt and after a 1,024-token prompt (--new-tokens greedy
tokens), prefill time of 128 and 1,024 tokens; medians with min / max. Also bytes on disk, ONNX
node counts and perplexity on the evaluation split (`modelfold eval` protocol; genai's
`model.onnx` runs in a plain ONNX Runtime session through OnnxCausalLM). Prints a Markdown table
and writes results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import DynamicCache

import modelfold
from modelfold.backends.onnxruntime.runtime import OnnxCausalLM
from modelfold.corpus import corpus_text, tokenize_text
from modelfold.evaluate import evaluate

sys.path.insert(0, str(Path(__file__).parent))
from benchlib import save_results  # noqa: E402

INT4 = "quantize{bits=4,group_size=128,embeddings=true,lm_head=true"
OURS = {  # row -> (pipeline, accuracy_level)
    "modelfold-fp32": ("", 0),
    # the table (tied embedding + LM head) quantized too, as genai quantizes its LM head
    "modelfold-int8": ("quantize{bits=8,group_size=32,embeddings=true,lm_head=true}", 4),
    "modelfold-int4-rtn": (INT4 + "}", 4),
    # symmetric (no zero points), as genai's MatMulNBits: MLAS's int8-compute path is faster
    "modelfold-int4-rtn-sym": (INT4 + ",symmetric=true}", 4),
    "modelfold-int4-rtn-kv8": (INT4 + "},quantize-kv", 4),
    "modelfold-int4-gptq-kv8": (INT4 + ",method=gptq},quantize-kv", 4),
    "modelfold-int4-awq-gptq": (INT4 + ",method=awq-gptq}", 4),
}
# the same artifacts run on ONNX Runtime's own kernels (MatMulNBits, GroupQueryAttention), next
# to modelfold's (the default, ``kernels="auto"``: backends/onnxruntime/native.py), or with
# modelfold's attention kernel's float16 cache: row -> (artifact row, OnnxCausalLM options)
VARIANTS = {"modelfold-fp32@ort": ("modelfold-fp32", {"kernels": "onnxruntime"}),
            "modelfold-int8@ort": ("modelfold-int8", {"kernels": "onnxruntime"}),
            "modelfold-int4-rtn@ort": ("modelfold-int4-rtn", {"kernels": "onnxruntime"}),
            "modelfold-int4-rtn-sym@ort": ("modelfold-int4-rtn-sym", {"kernels": "onnxruntime"}),
            "modelfold-int4-rtn@kv16": ("modelfold-int4-rtn", {"kv_cache": "float16"})}
GENAI = {  # row -> (precision, extra options); genai 0.18's defaults on CPU: block 32, level 4
    "genai-fp32": ("fp32", {}),
    "genai-int8": ("int8", {"accuracy_level": "4"}),
    "genai-int4-b128": ("int4", {"block_size": "128", "accuracy_level": "4"}),
    "genai-int4-b32": ("int4", {"block_size": "32", "accuracy_level": "4"}),
}
TORCH = "torch-fp32"
LABELS = {
    "modelfold-fp32": "modelfold fp32",
    "modelfold-int8": "modelfold int8 g32 RTN + int8 table (acc 4)",
    "modelfold-int4-rtn": "modelfold int4 g128 RTN + int4 table (acc 4), fp32 KV cache",
    "modelfold-int4-rtn-sym": "modelfold int4 g128 RTN symmetric + int4 table (acc 4), fp32 KV "
                              "cache",
    "modelfold-int4-rtn-kv8": "modelfold int4 g128 RTN + int4 table (acc 4), int8 KV cache",
    "modelfold-int4-gptq-kv8": "modelfold int4 g128 GPTQ + int4 table (acc 4), int8 KV cache",
    "modelfold-int4-awq-gptq": "modelfold int4 g128 AWQ+GPTQ + int4 table (acc 4), fp32 KV cache",
    "modelfold-fp32@ort": "the same fp32 artifact on ONNX Runtime's kernels",
    "modelfold-int8@ort": "the same int8 artifact on ONNX Runtime's kernels",
    "modelfold-int4-rtn@ort": "the same int4 RTN artifact on ONNX Runtime's kernels",
    "modelfold-int4-rtn@kv16": "the same int4 RTN artifact, float16 KV cache",
    "modelfold-int4-rtn-sym@ort": "the same int4 RTN symmetric artifact on ONNX Runtime's kernels",
    "genai-fp32": "onnxruntime-genai fp32",
    "genai-int8": "onnxruntime-genai int8 (acc 4)",
    "genai-int4-b128": "onnxruntime-genai int4 block 128 (acc 4)",
    "genai-int4-b32": "onnxruntime-genai int4 block 32, its default (acc 4)",
    TORCH: "torch eager fp32 (DynamicCache)",
}


# -- building ------------------------------------------------------------------------------------
def build_ours(row: str, out: Path, model: str) -> None:
    pipeline, level = OURS[row]
    program = modelfold.load(model)
    result = modelfold.transform(program, pipeline) if pipeline else \
        modelfold.TransformResult(program, "")
    modelfold.export(result, out, overwrite=True, accuracy_level=level, parity=False)


def build_genai(row: str, out: Path, model_dir: Path, threads: int) -> None:
    precision, extra = GENAI[row]
    tmp = out.with_name(out.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model_dir),
           "-o", str(tmp), "-p", precision, "-e", "cpu", "-c", str(tmp / "cache")]
    if extra:
        cmd += ["--extra_options", *[f"{k}={v}" for k, v in extra.items()]]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    shutil.rmtree(tmp / "cache", ignore_errors=True)
    config = json.loads((tmp / "genai_config.json").read_text())
    options = config["model"]["decoder"].setdefault("session_options", {})
    options.update(intra_op_num_threads=threads, inter_op_num_threads=1)
    (tmp / "genai_config.json").write_text(json.dumps(config, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


# -- running -------------------------------------------------------------------------------------
class OursRunner:
    def __init__(self, path: Path, threads: int, options: dict):
        self.lm = OnnxCausalLM(path, threads=threads, **options)

    def decode(self, prompt: list[int], new_tokens: int) -> float:
        return self.lm.generate(prompt, new_tokens)["decode_tokens_per_s"]

    def prefill(self, prompt: list[int]) -> float:
        return self.lm.generate(prompt, 1)["prefill_seconds"]


class GenaiRunner:
    def __init__(self, path: Path):
        import onnxruntime_genai as og

        self.og = og
        self.model = og.Model(str(path))

    def _generator(self, prompt: list[int], new_tokens: int):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(prompt) + new_tokens, do_sample=False)
        return self.og.Generator(self.model, params)

    def decode(self, prompt: list[int], new_tokens: int) -> float:
        generator = self._generator(prompt, new_tokens)
        generator.append_tokens(np.array(prompt, dtype=np.int32))  # prefill: the prompt's logits
        # the first generate_next_token only picks a token from the prefill's logits (no model
        # run): it belongs to the prefill, as in ours; each later one runs the model once
        generator.generate_next_token()
        start, steps = time.perf_counter(), 0
        while not generator.is_done():
            generator.generate_next_token()
            steps += 1
        return steps / (time.perf_counter() - start)

    def prefill(self, prompt: list[int]) -> float:
        generator = self._generator(prompt, 1)
        start = time.perf_counter()
        generator.append_tokens(np.array(prompt, dtype=np.int32))
        return time.perf_counter() - start


class TorchRunner:
    def __init__(self, model: torch.nn.Module):
        self.model = model

    @torch.no_grad()
    def decode(self, prompt: list[int], new_tokens: int) -> float:
        out = self.model(input_ids=torch.tensor([prompt]), past_key_values=DynamicCache(),
                         use_cache=True)
        token = int(out.logits[0, -1].argmax())
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            out = self.model(input_ids=torch.tensor([[token]]),
                             past_key_values=out.past_key_values, use_cache=True)
            token = int(out.logits[0, -1].argmax())
        return (new_tokens - 1) / (time.perf_counter() - start)

    @torch.no_grad()
    def prefill(self, prompt: list[int]) -> float:
        start = time.perf_counter()
        self.model(input_ids=torch.tensor([prompt]), past_key_values=DynamicCache(), use_cache=True)
        return time.perf_counter() - start


def perplexity_of(row: str, path: Path, program, tokenizer, text: str, args) -> float:
    """Perplexity through the artifact (torch for the eager row); kept in
    ``--out/perplexity.json`` so that ``--reuse`` does not score an artifact twice."""
    cache_file = Path(args.out) / "perplexity.json"
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    key = f"{row}@{args.chars}"
    if args.reuse and key in cache:
        return cache[key]
    target = program.module if row == TORCH else \
        OnnxCausalLM(path, threads=args.threads, **options_of(row))
    cache[key] = evaluate(target, tokenizer, text, chars=args.chars, progress=False)["perplexity"]
    cache_file.write_text(json.dumps(cache, indent=2))
    return cache[key]


def options_of(row: str) -> dict:
    if row in GENAI:  # genai's model.onnx in a plain ONNX Runtime session
        return {"kernels": "onnxruntime"}
    return VARIANTS[row][1] if row in VARIANTS else {}


def artifact_of(row: str) -> str:
    return VARIANTS[row][0] if row in VARIANTS else row


def onnx_facts(path: Path) -> dict:
    import onnx

    files = [f for f in path.iterdir() if f.name.startswith("model.onnx")]
    graph = onnx.load(str(path / "model.onnx"), load_external_data=False).graph
    return {"bytes": sum(f.stat().st_size for f in files), "nodes": len(graph.node)}


def summary(values: list[float], scale: float = 1.0) -> dict:
    return {"median": statistics.median(values) * scale, "min": min(values) * scale,
            "max": max(values) * scale, "runs": len(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rows", nargs="*", help="rows to run (default: all)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--chars", type=int, default=200_000, help="perplexity text (0: skip)")
    parser.add_argument("--reuse", action="store_true", help="reuse artifacts that exist")
    parser.add_argument("--out", default="out/bench_decode")
    parser.add_argument("--against", nargs="*", default=[],
                        help="other artifact folders of the model to run in the same rounds")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    known = [*OURS, *VARIANTS, *GENAI, TORCH]
    unknown = sorted(set(args.rows or ()) - set(known))
    if unknown:
        parser.error(f"unknown rows {', '.join(unknown)}; rows: {', '.join(known)}")
    rows = [r for r in known if not args.rows or r in args.rows]
    for path in args.against:
        LABELS[path] = f"{path} (--against)"

    program = modelfold.load(args.model)
    model_dir, tokenizer = Path(program.source), program.tokenizer
    for row in rows:
        path = out / artifact_of(row)
        if row == TORCH or (path / "model.onnx").is_file() and (args.reuse or row in VARIANTS):
            continue
        print(f"== building {row}", flush=True)
        start = time.perf_counter()
        if row in OURS or row in VARIANTS:
            build_ours(artifact_of(row), path, args.model)
        else:
            build_genai(row, path, model_dir, args.threads)
        print(f"   built in {time.perf_counter() - start:.0f} s", flush=True)

    text = corpus_text("wikipedia", "evaluation")
    ids = [tokenizer.bos_token_id] + tokenize_text(tokenizer, text[:20_000]).tolist()
    prompts = {"decode@16": ids[:16], "decode@1024": ids[:1024], "prefill@128": ids[:128],
               "prefill@1024": ids[:1024]}
    results: dict[str, dict] = {}
    runners = {}
    rows += args.against
    for row in rows:
        path = Path(row) if row in args.against else out / artifact_of(row)
        if row == TORCH:
            runners[row] = TorchRunner(program.module)
            results[row] = {"bytes": program.parameter_bytes(), "nodes": None}
        else:
            runners[row] = GenaiRunner(path) if row in GENAI else \
                OursRunner(path, args.threads, options_of(row))
            results[row] = onnx_facts(path)
            if row not in GENAI:
                results[row]["kernels"] = runners[row].lm.kernels
                if runners[row].lm.kernels["kernels"] == "modelfold":
                    LABELS[row] = f"{LABELS[row]}, modelfold's kernels"
        if args.chars:
            results[row]["perplexity"] = perplexity_of(row, path, program, tokenizer, text, args)
            print(f"{row}: perplexity {results[row]['perplexity']:.4f}", flush=True)
    for runner in runners.values():  # warm-up
        runner.decode(prompts["decode@16"], 4)
    samples: dict[str, dict[str, list[float]]] = {r: {k: [] for k in prompts} for r in rows}
    for i in range(args.rounds):
        for row, runner in runners.items():
            for key, prompt in prompts.items():
                if key.startswith("decode"):
                    samples[row][key].append(runner.decode(prompt, args.new_tokens))
                else:
                    samples[row][key].append(runner.prefill(prompt))
        print(f"round {i + 1}/{args.rounds} done", flush=True)
    for row in rows:
        for key, values in samples[row].items():
            results[row][key] = summary(values, 1.0 if key.startswith("decode") else 1000.0)

    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or 'cpu'}"
    print(f"\n{args.model}, batch 1, {args.threads} threads, {args.new_tokens} greedy tokens per "
          f"decode run, {args.rounds} interleaved rounds (median [min-max]); perplexity on the "
          f"first {args.chars:,} chars of the evaluation split; machine: {machine}\n")
    print("| artifact | bytes | ONNX nodes | perplexity | decode tok/s @16 | decode tok/s @1024 "
          "| prefill 128 (ms) | prefill 1024 (ms) |")
    print("|---|---|---|---|---|---|---|---|")

    def cell(r: dict) -> str:
        return f"{r['median']:.1f} [{r['min']:.1f}-{r['max']:.1f}]"

    for row in rows:
        r = results[row]
        ppl = f"{r['perplexity']:.3f}" if "perplexity" in r else "-"
        print(f"| {LABELS[row]} | {r['bytes']:,} | {r['nodes'] or '-'} | {ppl} | "
              f"{cell(r['decode@16'])} | {cell(r['decode@1024'])} | {cell(r['prefill@128'])} | "
              f"{cell(r['prefill@1024'])} |")
    pairs = [("modelfold-int4-rtn", "genai-int4-b128"), ("modelfold-int4-rtn-sym", "genai-int4-b128"),
             ("modelfold-int4-rtn@ort", "genai-int4-b128"),
             ("modelfold-int4-rtn-sym@ort", "genai-int4-b128"),
             ("modelfold-int4-rtn", "modelfold-int4-rtn@ort"),
             ("modelfold-int4-rtn-sym", "modelfold-int4-rtn-sym@ort"),
             ("modelfold-int4-rtn@kv16", "genai-int4-b128"),
             ("modelfold-int4-rtn@kv16", "modelfold-int4-rtn"),
             ("modelfold-int4-rtn-kv8", "genai-int4-b128"),
             ("modelfold-int4-gptq-kv8", "genai-int4-b128"),
             ("modelfold-int4-awq-gptq", "genai-int4-b32"), ("modelfold-int8", "genai-int8"),
             ("modelfold-fp32", "genai-fp32"), ("modelfold-fp32@ort", "genai-fp32"),
             ("modelfold-fp32", "modelfold-fp32@ort")]
    for ours, theirs in pairs:
        if ours in results and theirs in results:
            ratios = [f"{key}: {results[ours][key]['median'] / results[theirs][key]['median']:.2f}x"
                      for key in ("decode@16", "decode@1024", "prefill@128", "prefill@1024")]
            print(f"- {LABELS[ours]} / {LABELS[theirs]}: {', '.join(ratios)} (prefill: time, "
                  "lower is better)")
    save_results(out, {"machine": machine, "threads": args.threads, "rows": results,
                       "samples": samples})


if __name__ == "__main__":
    main()
