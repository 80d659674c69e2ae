"""Models larger than memory: streamed int4 RTN / GPTQ of a 7B-shaped checkpoint, its ONNX
artifact, and the streamed-vs-in-memory check on SmolLM2.

    python tools/bench_streaming.py make-7b --out /data/llama7b      # random bf16, 13.5 GB
    python tools/bench_streaming.py run --model /data/llama7b --out /data/b7
    python tools/bench_streaming.py smollm2 --out /tmp/bstream        # ppl to 4 digits

``make-7b`` writes a Llama-2-7B-shaped checkpoint (32 layers, hidden 4096, MLP 11008, 32 heads,
vocabulary 32000) from seeded random bfloat16 weights, one layer per shard, never holding more
than one layer. ``run`` streams int4 RTN and GPTQ (``--calib`` sequences of 128 random tokens:
the checkpoint has no tokenizer) with ``modelfold convert --stream``, each in its own process
(peak RSS from ``ru_maxrss`` of the child), exports the int4 checkpoint to ONNX (memory-mapped
weights) and runs one forward in ONNX Runtime. It prints a table and the per-layer cost, and
projects 70B (80 layers of 8192 / 28672: 4.3x a 7B layer's weights; GPTQ's solve grows with
rows x columns^2, ~6.7x for the MLP) on one machine and on N ranks. ``smollm2`` converts the
embedded SmolLM2-135M with GPTQ in memory and streamed, exports both to ONNX, and evaluates
both artifacts' perplexity.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import load_results, save_results  # noqa: E402

LLAMA_7B = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}


def make_7b(out: Path, layers: int) -> None:
    """Write the random checkpoint one layer at a time (each its own shard) + index + config."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    out.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(**{**LLAMA_7B, "num_hidden_layers": layers})
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(out)
    h, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    gen = torch.Generator().manual_seed(0)
    weight_map: dict[str, str] = {}

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    def write(name: str, tensors: dict[str, torch.Tensor]) -> None:
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})

    start = time.perf_counter()
    write("model-embed.safetensors", {"model.embed_tokens.weight": rand(v, h)})
    for i in range(layers):
        p = f"model.layers.{i}."
        write(f"model-layer-{i:05d}.safetensors", {
            p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.k_proj.weight": rand(h, h),
            p + "self_attn.v_proj.weight": rand(h, h), p + "self_attn.o_proj.weight": rand(h, h),
            p + "mlp.gate_proj.weight": rand(f, h), p + "mlp.up_proj.weight": rand(f, h),
            p + "mlp.down_proj.weight": rand(h, f),
            p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16)})
        print(f"layer {i + 1}/{layers} written ({time.perf_counter() - start:.0f} s)",
              file=sys.stderr, flush=True)
    write("model-head.safetensors", {"model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
                                     "lm_head.weight": rand(v, h)})
    total = sum((out / n).stat().st_size for n in set(weight_map.values()))
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    print(f"wrote {out} ({total / 1e9:.2f} GB bfloat16, {2 * total / 1e9:.2f} GB in float32)")


def _child(argv: list[str], log: Path) -> dict:
    """Run ``python -m modelfold ...`` as a child; wall time and the child's peak RSS."""
    start = time.perf_counter()
    with open(log, "w") as handle:
        proc = subprocess.run([sys.executable, "-m", "modelfold", *argv], stdout=handle,
                              stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # the largest child
    if proc.returncode:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}); see {log}")
    return {"wall_s": wall, "children_peak_rss_bytes": peak}


def _ort_forward(artifact: Path) -> dict:
    code = f"""
import json, resource, time, numpy as np, onnxruntime as ort
from modelfold.backends.onnxruntime.runtime import OnnxCausalLM
start = time.perf_counter()
from pathlib import Path
lm = OnnxCausalLM(Path({str(artifact)!r}))
loaded = time.perf_counter() - start
ids = np.arange(1, 17, dtype=np.int64)[None]
t = time.perf_counter()
logits = lm.logits(ids)
print(json.dumps({{"load_s": loaded, "forward_s": time.perf_counter() - t,
                  "finite": bool(np.isfinite(logits).all()), "shape": list(logits.shape),
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"ONNX Runtime forward failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(model: Path, out: Path, calib: int, methods: list[str]) -> None:
    results = load_results(out)
    out.mkdir(parents=True, exist_ok=True)
    pipelines = {
        "rtn": "quantize{bits=4,group_size=128,method=rtn}",
        "gptq": f"quantize{{bits=4,group_size=128,method=gptq,mse=false,corpus=random,"
                f"n_samples={calib},seq_len=128,batch_size=4}}",
    }
    for method in methods:
        ckpt = out / f"{method}-ckpt"
        if method in results and ckpt.is_dir():
            continue
        facts = _child(["convert", str(model), "-p", pipelines[method], "--stream",
                        "--save-model", str(ckpt), "--overwrite", "--no-verify"],
                       out / f"{method}.log")
        manifest = json.loads((ckpt / "modelfold_checkpoint.json").read_text())
        stream = manifest["passes"][-1]["details"]["streaming"]
        facts.update(peak_rss_bytes=stream["peak_rss_bytes"],
                     seconds_per_layer=stream["seconds_per_layer"],
                     checkpoint_bytes=sum(manifest["files"].values()),
                     source_float32_bytes=stream["source_float32_bytes"])
        results[method] = facts
        save_results(out, results)
    if "onnx" not in results and "rtn" in results:
        artifact = out / "rtn-onnx"
        facts = _child(["convert", str(out / "rtn-ckpt"), "-o", str(artifact), "--overwrite",
                        "--no-parity", "--accuracy-level", "4"], out / "onnx.log")
        facts["onnx_bytes"] = sum(p.stat().st_size for p in artifact.iterdir()
                                  if p.name.startswith("model.onnx"))
        facts["ort"] = _ort_forward(artifact)
        results["onnx"] = facts
        save_results(out, results)
    _table(results)


def _table(results: dict) -> None:
    gib = 2**30
    print(f"\nmachine: {os.cpu_count()} cores, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / gib:.1f} GiB; "
          "7B-shaped Llama, random bf16 weights")
    print("| step | wall | peak RSS | per layer (median) | output |")
    print("|---|---|---|---|---|")
    for method in ("rtn", "gptq"):
        if method not in results:
            continue
        r = results[method]
        per = statistics.median(r["seconds_per_layer"])
        print(f"| stream int4 {method.upper()} | {r['wall_s'] / 60:.1f} min | "
              f"{r['peak_rss_bytes'] / gib:.2f} GiB | {per:.1f} s | "
              f"{r['checkpoint_bytes'] / 1e9:.2f} GB checkpoint (source {r['source_float32_bytes'] / 1e9:.1f}"
              " GB float32) |")
    if "onnx" in results:
        r = results["onnx"]
        print(f"| export int4 ONNX (memory-mapped) | {r['wall_s'] / 60:.1f} min | "
              f"{r['children_peak_rss_bytes'] / gib:.2f} GiB (largest child so far) | - | "
              f"{r['onnx_bytes'] / 1e9:.2f} GB |")
        o = r["ort"]
        print(f"| ONNX Runtime load + 16-token forward | {o['load_s']:.0f} s + {o['forward_s']:.1f} s"
              f" | {o['peak_rss_bytes'] / gib:.2f} GiB | - | logits {o['shape']}, finite "
              f"{o['finite']} |")
    for method, scale in (("rtn", 4.3), ("gptq", 5.9)):
        if method not in results:
            continue
        per = statistics.median(results[method]["seconds_per_layer"])
        one = per * scale * 80
        print(f"70B projection, {method.upper()}: {per:.1f} s x {scale} per layer x 80 layers = "
              f"{one / 3600:.1f} h on one such machine"
              + ("" if method == "rtn" else f"; {one / 3600 / 4:.1f} h on 4 ranks, "
                 f"{one / 3600 / 8:.1f} h on 8 (solves divided)"))


def smollm2(out: Path, calib: int, chars: int) -> None:
    """GPTQ of SmolLM2 in memory and streamed; both exported and evaluated."""
    results = load_results(out)
    out.mkdir(parents=True, exist_ok=True)
    pipeline = (f"quantize{{bits=4,group_size=64,method=gptq,n_samples={calib},seq_len=512}}")
    for mode in ("memory", "stream"):
        key = f"smollm2_{mode}"
        if key in results:
            continue
        flag = "--no-stream" if mode == "memory" else "--stream"
        facts = _child(["convert", "smollm2-135m", "-p", pipeline, flag, "--save-model",
                        str(out / f"{mode}-ckpt"), "-o", str(out / f"{mode}-onnx"),
                        "--overwrite"], out / f"{mode}.log")
        ev = subprocess.run([sys.executable, "-m", "modelfold", "eval", str(out / f"{mode}-onnx"),
                             "--chars", str(chars), "--json"], capture_output=True, text=True)
        if ev.returncode:
            raise SystemExit(ev.stderr[-2000:])
        facts["perplexity"] = json.loads(ev.stdout)["perplexity"]
        results[key] = facts
        save_results(out, results)
    print("| SmolLM2-135M GPTQ int4 g64 | convert + export wall | ONNX perplexity |")
    print("|---|---|---|")
    for mode in ("memory", "stream"):
        r = results[f"smollm2_{mode}"]
        print(f"| {'in memory' if mode == 'memory' else 'streamed'} | {r['wall_s']:.0f} s | "
              f"{r['perplexity']:.4f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("make-7b")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--layers", type=int, default=32)
    p = sub.add_parser("run")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--calib", type=int, default=8, help="GPTQ calibration sequences (128 tokens)")
    p.add_argument("--methods", default="rtn,gptq")
    p = sub.add_parser("smollm2")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--calib", type=int, default=32)
    p.add_argument("--chars", type=int, default=20_000)
    args = parser.parse_args()
    if args.cmd == "make-7b":
        make_7b(args.out, args.layers)
    elif args.cmd == "run":
        run(args.model, args.out, args.calib, args.methods.split(","))
    else:
        smollm2(args.out, args.calib, args.chars)


if __name__ == "__main__":
    main()
