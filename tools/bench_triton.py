"""Benchmark of the Triton linear kernels (``modelfold.kernels``) against a dense fp16 matmul.

    .venv/bin/python tools/bench_triton.py                        # default shapes, on a GPU
    .venv/bin/python tools/bench_triton.py --shapes 1x4096x4096 16x4096x4096 --peak-gbs 3350
    .venv/bin/python tools/bench_triton.py --interpret            # CPU smoke test (< 1 min)

Every case computes ``y [M, N] = x [M, K] @ W^T`` with fp16 activations from one random float32
``W [N, K]`` (built on the CPU, then stored in the case's format and moved to the device; scales
cast to fp16 as the Triton backend does). Per case and shape: median time of
``triton.testing.do_bench`` (L2 flushed between runs), bytes moved (weights as stored, with
scales, zero points, indices and LoRA factors, + x + y), GB/s, fraction of the device's peak
memory bandwidth, TFLOP/s (dense-equivalent ``2 M N K / t``), speed-up over dense fp16 and the
error ``max|y - ref| / max|ref|`` against ``modelfold.kernels.reference`` (computed on the CPU).
Also checks the int4 GEMV targets (M = 1, N and K >= 4096): >= 60 % of peak bandwidth and
>= 2.5x faster than dense fp16.

Prints a markdown table; results accumulate, one entry per device, in ``--out``/results.json.
``--interpret`` runs the kernels in Triton's CPU interpreter (``TRITON_INTERPRET=1``) at tiny
shapes, timed with ``time.perf_counter``: those timings are meaningless, the mode only checks
the script end to end.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

DEFAULT_SHAPES = ((1, 4096, 4096), (1, 8192, 8192), (1, 11008, 4096), (16, 4096, 4096),
                  (128, 4096, 4096), (1024, 4096, 4096))
INTERPRET_SHAPES = ((1, 64, 128), (16, 96, 128))
BLOCK = 128  # quantization group size along K
BASELINE = "fp16"
CASES = ("fp16", "int4", "int4-sym", "int8", "2:4", "2:4+int4", "fp16+lora", "int4+lora", "w8a8")
# Peak memory bandwidth (GB/s) by device name: the first row whose words all occur in the name.
PEAK_GBS = (
    (("h200",), 4800),
    (("h100", "nvl"), 3938),
    (("h100", "pcie"), 2039),
    (("h100",), 3350),  # SXM
    (("a100", "80gb", "pcie"), 1935),
    (("a100", "80gb"), 2039),  # SXM
    (("a100",), 1555),  # 40GB
    (("l40s",), 864),
    (("l40",), 864),
    (("l4",), 300),
    (("4090",), 1008),
)
GEMV_CASES = ("int4", "int4-sym")
GEMV_MIN_NK = 4096
GEMV_PEAK_TARGET = 0.60
GEMV_SPEEDUP_TARGET = 2.5


@dataclass
class Case:
    key: str
    label: str
    run: Callable[[], torch.Tensor]  # the kernel on the device tensors
    ref: torch.Tensor  # the reference output (CPU)
    weight_bytes: int  # everything the case stores besides x: weights, grid, indices, LoRA


def peak_bandwidth(device: str, override: float | None) -> tuple[float, str]:
    if override is not None:
        return override, "--peak-gbs"
    words = set(re.split(r"[^a-z0-9]+", device.lower()))
    for needed, gbs in PEAK_GBS:
        if words.issuperset(needed):
            return float(gbs), "device table"
    raise SystemExit(f"the peak memory bandwidth of {device!r} is not in the table of "
                     f"tools/bench_triton.py: pass it with --peak-gbs (GB/s)")


def build_cases(m: int, n: int, k: int, keys: list[str], rank: int, device: torch.device,
                seed: int) -> list[Case]:
    """The cases ``keys`` at one shape; each runs the kernel and the reference with the same
    positional arguments (weights as stored) after ``x``."""
    from modelfold.ir.quant import PackedWeight, QuantFormat, W8A8Linear, pack_zero_points, quantize_rtn
    from modelfold.ir.sparse import NMQuantLinear, compress, decompress, nm_mask
    from modelfold.kernels import int8, linear
    from modelfold.kernels import reference as ref

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    x = torch.randn(m, k, generator=g).half()
    lora = ((torch.randn(rank, k, generator=g) / k ** 0.5).half(),
            (torch.randn(n, rank, generator=g) * 0.02).half(), 2.0)

    @functools.cache  # int4 asym serves two cases
    def quant(bits: int, symmetric: bool) -> tuple:
        p = PackedWeight.from_float(w, QuantFormat(bits, BLOCK, symmetric))
        return p.qweight, p.scales.half(), p.zero_points, None, k, p.fmt.storage_bits, BLOCK

    @functools.cache
    def pruned() -> tuple[torch.Tensor, torch.Tensor]:  # 2:4 by magnitude: values, indices
        return compress(w, nm_mask(w.abs(), 2, 4), 2, 4)

    def sparse_quant() -> tuple:
        values, indices = pruned()
        fmt = QuantFormat(4, BLOCK, False)
        codes, scales, zeros = quantize_rtn(decompress(values, indices, k, 2, 4), fmt)
        s = NMQuantLinear.from_codes(codes, scales, pack_zero_points(zeros, 4), fmt, indices, 2, 4)
        return s.codes, s.indices, s.scales.half(), s.zero_points, None, k, 4, BLOCK, 2, 4

    def sparse() -> tuple:
        values, indices = pruned()
        return values.half(), indices, None, k, 2, 4

    def w8a8() -> tuple:
        layer = W8A8Linear(w)
        return layer.qweight_t, layer.weight_scales.half(), None

    specs = {  # key: (label, kernel, reference, stored arguments)
        "fp16": ("dense fp16 (torch.matmul)", _matmul, _matmul_reference, lambda: (w.half(),)),
        "int4": (f"int4 g{BLOCK} asym", linear.quant_linear, ref.quant_linear,
                 lambda: quant(4, False)),
        "int4-sym": (f"int4 g{BLOCK} sym", linear.quant_linear, ref.quant_linear,
                     lambda: quant(4, True)),
        "int8": (f"int8 g{BLOCK} asym", linear.quant_linear, ref.quant_linear,
                 lambda: quant(8, False)),
        "2:4": ("2:4 sparse fp16", linear.nm_linear, ref.nm_linear, sparse),
        "2:4+int4": (f"2:4 + int4 g{BLOCK} asym", linear.nm_quant_linear, ref.nm_quant_linear,
                     sparse_quant),
        "fp16+lora": (f"fp16 + fused LoRA r{rank}", linear.dense_linear, ref.dense_linear,
                      lambda: (w.half(), None, *lora)),
        "int4+lora": (f"int4 g{BLOCK} asym + LoRA r{rank}", linear.quant_linear,
                      ref.quant_linear, lambda: (*quant(4, False), *lora)),
        "w8a8": ("w8a8 (int8 x int8)", int8.w8a8_linear, ref.w8a8_linear, w8a8),
    }
    xd = x.to(device)
    cases = []
    for key in keys:
        label, kernel, reference, make = specs[key]
        stored = make()
        on_device = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in stored)
        cases.append(Case(key, label, lambda f=kernel, a=on_device: f(xd, *a),
                          reference(x, *stored),
                          sum(a.nbytes for a in stored if isinstance(a, torch.Tensor))))
    return cases


def _matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.matmul(x, w.T)


def _matmul_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    from modelfold.kernels import reference

    return reference.dense_linear(x, w, None)


def make_timer(interpret: bool, warmup: int, rep: int) -> Callable[[Callable[[], Any]], float]:
    """Median milliseconds of a callable: ``do_bench`` on a GPU, 3 plain calls in the
    interpreter."""
    if interpret:
        def measure(fn: Callable[[], Any]) -> float:
            times = []
            for _ in range(3):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            return statistics.median(times) * 1e3
        return measure

    from triton.testing import do_bench

    return lambda fn: do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def bench_shape(m: int, n: int, k: int, args, device: torch.device, timer, peak: float | None
                ) -> list[dict[str, Any]]:
    print(f"{m}x{n}x{k}: building weights ...", file=sys.stderr, flush=True)
    keys = [BASELINE] + [c for c in args.cases if c != BASELINE]
    cases = build_cases(m, n, k, keys, args.rank, device, args.seed)
    rows = []
    for case in cases:
        y = case.run()  # first call: compiles and autotunes
        err = ((y.float().cpu() - case.ref.float()).abs().max() /
               case.ref.float().abs().max().clamp_min(1e-30)).item()
        ms = timer(case.run)
        moved = case.weight_bytes + (m * k + m * n) * 2  # fp16 x and y
        gbs = moved / ms / 1e6
        rows.append({"case": case.key, "label": case.label, "M": m, "N": n, "K": k, "ms": ms,
                     "bytes": moved, "gbs": gbs, "tflops": 2 * m * n * k / ms / 1e9,
                     "peak_fraction": None if peak is None else gbs / peak,
                     "max_rel_err": err})
        print(f"  {case.label}: {ms:.4g} ms, error {err:.1e}", file=sys.stderr, flush=True)
    base = rows[0]["ms"]
    for r in rows:
        r["speedup"] = base / r["ms"]
    del cases
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def gemv_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's GEMV targets for every int4 row at M = 1 and N, K >= 4096."""
    checks = []
    for r in rows:
        if r["case"] in GEMV_CASES and r["M"] == 1 and min(r["N"], r["K"]) >= GEMV_MIN_NK:
            bandwidth = r["peak_fraction"] >= GEMV_PEAK_TARGET
            speed = r["speedup"] >= GEMV_SPEEDUP_TARGET
            checks.append({"case": r["case"], "label": r["label"], "shape": _shape(r),
                           "peak_fraction": r["peak_fraction"], "speedup": r["speedup"],
                           "bandwidth_pass": bandwidth, "speedup_pass": speed,
                           "pass": bandwidth and speed})
    return checks


def _shape(r: dict[str, Any]) -> str:
    return f"{r['M']}x{r['N']}x{r['K']}"


def print_report(meta: dict[str, Any], rows: list[dict[str, Any]],
                 checks: list[dict[str, Any]] | None, tol: float) -> None:
    if meta["interpret"]:
        print("\n## Triton interpreter on CPU: the timings are the interpreter's and meaningless\n")
        print("This mode only checks the script end to end at tiny shapes; run it without "
              "--interpret on a GPU for real numbers.")
    else:
        print(f"\n## Triton kernels on {meta['device']} (peak {meta['peak_gbs']:.0f} GB/s, "
              f"{meta['peak_source']})\n")
        print("Time: median of triton.testing.do_bench (L2 flushed). Bytes: weights as stored "
              "(scales, zero points, indices, LoRA factors) + x + y. TFLOP/s: 2 M N K / time.")
    print(f"torch {meta['torch']}, triton {meta['triton']}; error: max|y - ref| / max|ref| vs "
          f"modelfold.kernels.reference (tolerance {tol:g})\n")
    print("| M x N x K | case | ms | MB moved | GB/s | % of peak | TFLOP/s | vs fp16 | error |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        peak = "-" if r["peak_fraction"] is None else f"{r['peak_fraction'] * 100:.1f} %"
        flag = " (!)" if r["max_rel_err"] > tol else ""
        print(f"| {_shape(r)} | {r['label']} | {r['ms']:.4g} | {r['bytes'] / 1e6:.4g} | "
              f"{r['gbs']:.0f} | {peak} | {r['tflops']:.2f} | {r['speedup']:.2f}x | "
              f"{r['max_rel_err']:.1e}{flag} |")
    print(f"\nGEMV targets (int4 g{BLOCK}, M = 1, N and K >= {GEMV_MIN_NK}): "
          f">= {GEMV_PEAK_TARGET * 100:.0f} % of peak bandwidth and >= {GEMV_SPEEDUP_TARGET}x dense fp16")
    if checks is None:
        print("not evaluated: interpreter timings")
    elif not checks:
        print(f"not evaluated: no int4 row at M = 1 with N and K >= {GEMV_MIN_NK}")
    else:
        for c in checks:
            print(f"{'PASS' if c['pass'] else 'FAIL'} {c['label']} {c['shape']}: "
                  f"{c['peak_fraction'] * 100:.1f} % of peak "
                  f"[{'PASS' if c['bandwidth_pass'] else 'FAIL'}], {c['speedup']:.2f}x vs fp16 "
                  f"[{'PASS' if c['speedup_pass'] else 'FAIL'}]")
        passed = sum(c["pass"] for c in checks)
        print(f"GEMV targets: {'PASS' if passed == len(checks) else 'FAIL'} "
              f"({passed}/{len(checks)})")
    bad = [f"{r['label']} {_shape(r)}" for r in rows if r["max_rel_err"] > tol]
    print(f"Correctness: {'FAIL: ' + ', '.join(bad) if bad else 'PASS'} (error <= {tol:g})")


def save(out: Path, meta: dict[str, Any], rows, checks) -> Path:
    """Accumulate in ``out``/results.json, one entry per device (the interpreter's included)."""
    from benchlib import load_results, save_results

    results = load_results(out)
    results[meta["device"]] = {**meta, "rows": rows, "gemv_targets": checks}
    return save_results(out, results)


def parse_shape(text: str) -> tuple[int, int, int]:
    try:
        m, n, k = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MxNxK, e.g. 1x4096x4096; got {text!r}") from None
    if min(m, n, k) < 1 or k % 4:
        raise argparse.ArgumentTypeError(f"{text}: sizes must be positive and K a multiple of 4 "
                                         "(2:4 groups)")
    return m, n, k


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", type=parse_shape, metavar="MxNxK",
                    help="default: the decode / prefill shapes of a 7B model (tiny ones with "
                         "--interpret)")
    ap.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES),
                    help="cases to run (dense fp16 always runs: it is the baseline)")
    ap.add_argument("--peak-gbs", type=float,
                    help="peak memory bandwidth in GB/s (default: from the device name)")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank")
    ap.add_argument("--warmup", type=int, default=25, help="do_bench warmup (ms)")
    ap.add_argument("--rep", type=int, default=100, help="do_bench repetition time (ms)")
    ap.add_argument("--tol", type=float, default=1e-2, help="largest accepted error")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="out/bench_triton")
    ap.add_argument("--interpret", action="store_true",
                    help="Triton's CPU interpreter at tiny shapes (checks the script, no timings)")
    args = ap.parse_args()

    if args.interpret:  # must precede the first import of modelfold.kernels
        os.environ["TRITON_INTERPRET"] = "1"
    elif os.environ.get("TRITON_INTERPRET") == "1":
        ap.error("TRITON_INTERPRET=1 is set: pass --interpret (or unset it for the GPU run)")
    import triton

    from modelfold.kernels._runtime import interpreting

    if interpreting() != args.interpret:
        ap.error("modelfold.kernels was imported in the other execution mode")
    if args.interpret:
        device, name, peak, peak_source = torch.device("cpu"), "CPU (Triton interpreter)", None, None
    elif not torch.cuda.is_available():
        ap.error("no CUDA device: run on an NVIDIA GPU, or pass --interpret for the CPU smoke test")
    else:
        device, name = torch.device("cuda"), torch.cuda.get_device_name()
        peak, peak_source = peak_bandwidth(name, args.peak_gbs)
    shapes = args.shapes or (INTERPRET_SHAPES if args.interpret else DEFAULT_SHAPES)
    timer = make_timer(args.interpret, args.warmup, args.rep)

    rows = []
    for m, n, k in shapes:
        rows += bench_shape(m, n, k, args, device, timer, peak)
    checks = None if args.interpret else gemv_targets(rows)
    meta = {"device": name, "interpret": args.interpret, "peak_gbs": peak,
            "peak_source": peak_source, "torch": torch.__version__, "triton": triton.__version__,
            "timing": "perf_counter, median of 3" if args.interpret else
            f"triton.testing.do_bench median (warmup {args.warmup} ms, rep {args.rep} ms)",
            "lora_rank": args.rank, "block_size": BLOCK, "seed": args.seed,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    print_report(meta, rows, checks, args.tol)
    path = save(Path(args.out), meta, rows, checks)
    print(f"\nresults: {path}")
    return 1 if any(r["max_rel_err"] > args.tol for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
