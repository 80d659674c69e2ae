"""modelfold's int4 kernel (``ai.modelfold::MatMulInt4``) against ONNX Runtime's ``MatMulNBits``
(MLAS), one decode token's matrix-vector products of SmolLM2-135M, in the same ONNX Runtime.

    .venv/bin/python tools/bench_int4_kernel.py [--rounds 7] [--threads 2] [--rows 1]

Each case is one ONNX graph holding the same nodes twice over (random int4 weights in blocks of
128 with zero points, accuracy level 4): the 30 layers' q/k/v (576 -> 960), o (576 -> 576),
gate/up (576 -> 3072) and down (1536 -> 576) projections and the LM head (576 -> 49152), each
with its own weights, so the weights come from memory as in a real token (71 MB; the L3 cache is
32 MB here). "token" runs all 121 in one graph; the other rows run one kind of layer (30 nodes, or
the head once). Runs alternate between the two kernels, --rounds times; medians [min-max].
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from modelfold.backends.onnxruntime import native

LAYER = {"q/k/v": (576, 960), "o": (576, 576), "gate/up": (576, 3072), "down": (1536, 576)}
CASES = {
    "token (30 layers + head)": [s for _ in range(30) for s in LAYER.values()] + [(576, 49152)],
    **{f"{name} x 30": [shape] * 30 for name, shape in LAYER.items()},
    "LM head": [(576, 49152)],
}


def graph(shapes: list[tuple[int, int]], rows: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    nodes, inits, outputs = [], [], []
    for i, (K, N) in enumerate(shapes):
        blocks = -(-K // 128)
        inits += [numpy_helper.from_array(rng.integers(0, 256, (N, blocks, 64), dtype=np.uint8),
                                          f"B{i}"),
                  numpy_helper.from_array(rng.random(N * blocks, dtype=np.float32) * 0.01, f"S{i}"),
                  numpy_helper.from_array(rng.integers(0, 256, N * ((blocks + 1) // 2),
                                                       dtype=np.uint8), f"Z{i}")]
        nodes.append(helper.make_node("MatMulNBits", [f"x{K}", f"B{i}", f"S{i}", f"Z{i}"],
                                      [f"y{i}"], domain="com.microsoft", K=K, N=N, bits=4,
                                      block_size=128, accuracy_level=4))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [rows, N]))
    widths = sorted({K for K, _ in shapes})
    inputs = [helper.make_tensor_value_info(f"x{K}", TensorProto.FLOAT, [rows, K]) for K in widths]
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 21),
                                             helper.make_opsetid("com.microsoft", 1)])
    feeds = {f"x{K}": rng.standard_normal((rows, K)).astype(np.float32) for K in widths}
    return model, feeds


def session(model, threads: int, ours: bool) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    if ours:  # a rewritten copy: the caller's model stays ONNX Runtime's
        model = onnx.ModelProto.FromString(model.SerializeToString())
        native.rewrite(model)
        options.register_custom_ops_library(str(native.library()))
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def timed(sess: ort.InferenceSession, feeds: dict, runs: int) -> float:
    sess.run(None, feeds)
    start = time.perf_counter()
    for _ in range(runs):
        sess.run(None, feeds)
    return (time.perf_counter() - start) / runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=1, help="activation rows (1: decode)")
    args = parser.parse_args()
    print(f"{args.rows} activation row(s), {args.threads} threads, {args.rounds} alternating "
          "rounds of 20 runs, median [min-max] ms per graph run\n")
    print("| case | bytes of weights | MatMulNBits (ms) | MatMulInt4 (ms) | speed-up | "
          "MatMulInt4 GB/s |")
    print("|---|---|---|---|---|---|")
    for name, shapes in CASES.items():
        model, feeds = graph(shapes, args.rows)
        weights = sum(t.ByteSize() for t in model.graph.initializer)
        theirs = session(model, args.threads, ours=False)
        ours = session(model, args.threads, ours=True)
        times = {"theirs": [], "ours": []}
        for _ in range(args.rounds):
            times["theirs"].append(timed(theirs, feeds, 20) * 1e3)
            times["ours"].append(timed(ours, feeds, 20) * 1e3)
        a, b = statistics.median(times["theirs"]), statistics.median(times["ours"])
        print(f"| {name} | {weights / 1e6:.1f} MB | {a:.3f} [{min(times['theirs']):.3f}-"
              f"{max(times['theirs']):.3f}] | {b:.3f} [{min(times['ours']):.3f}-"
              f"{max(times['ours']):.3f}] | {a / b:.2f}x | {weights / b / 1e6:.1f} |", flush=True)


if __name__ == "__main__":
    main()
