"""The memory bandwidth a decode step can use here: ONNX Runtime's float32 ``MatMul`` (MLAS) of
one row through a chain of 1024 x 1024 weight matrices, for working sets from cache-sized to
larger than the SmolLM2 fp32 artifact.

    .venv/bin/python tools/bench_bandwidth.py [--sizes 200 540] [--rounds 5] [--threads 2]

A batch-1 decode step reads every weight once, so (bytes of weights) / (this bandwidth) bounds
its time from below: a working set that does not fit the caches streams from memory at the
rate printed for the largest sizes. Runs alternate between the sizes, --rounds times; medians
[min-max]. Prints a Markdown table and, for each ``--model-bytes``, the decode speed that rate
allows.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

SIDE = 1024  # a weight matrix is SIDE x SIDE float32 (4 MiB)


def chain(megabytes: float, threads: int) -> tuple[ort.InferenceSession, int]:
    count = max(1, round(megabytes * 1e6 / (4 * SIDE * SIDE)))
    rng = np.random.default_rng(0)
    nodes, inits, previous = [], [], "x"
    for i in range(count):
        inits.append(numpy_helper.from_array(
            (rng.standard_normal((SIDE, SIDE)) / SIDE ** 0.5).astype(np.float32), f"W{i}"))
        nodes.append(helper.make_node("MatMul", [previous, f"W{i}"], [f"y{i}"]))
        previous = f"y{i}"
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, SIDE])],
        [helper.make_tensor_value_info(previous, TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session, count * 4 * SIDE * SIDE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[200, 540],
                        help="working sets in MB")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=8, help="passes timed per round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model-bytes", type=float, nargs="*", default=[540.3e6],
                        help="weights a decode token reads (default: the SmolLM2 fp32 artifact)")
    args = parser.parse_args()
    x = np.ones((1, SIDE), np.float32)
    sessions = {size: chain(size, args.threads) for size in args.sizes}
    rates: dict[float, list[float]] = {size: [] for size in args.sizes}
    for round_ in range(args.rounds):
        for size, (session, nbytes) in sessions.items():
            session.run(None, {"x": x})
            start = time.perf_counter()
            for _ in range(args.runs):
                session.run(None, {"x": x})
            rates[size].append(nbytes * args.runs / (time.perf_counter() - start) / 1e9)
        print(f"round {round_ + 1}/{args.rounds} done", flush=True)
    print(f"\nfloat32 MatMul of one row, {args.threads} threads, {args.rounds} rounds "
          f"(median [min-max])\n")
    print("| working set | GB/s |")
    print("|---|---|")
    for size, (_, nbytes) in sessions.items():
        r = rates[size]
        print(f"| {nbytes / 1e6:,.0f} MB | {statistics.median(r):.1f} [{min(r):.1f}-{max(r):.1f}] |")
    largest = statistics.median(rates[max(args.sizes)])
    for model_bytes in args.model_bytes:
        print(f"- {model_bytes / 1e6:,.1f} MB of weights per token at {largest:.1f} GB/s: at most "
              f"{largest * 1e9 / model_bytes:.1f} tokens/s")


if __name__ == "__main__":
    main()
