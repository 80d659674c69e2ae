"""Where a decoder artifact's decode time goes: ONNX Runtime's profiler, summed by op type.

    .venv/bin/python tools/profile_decode.py ARTIFACT [ARTIFACT ...] [--runs 3] [--new-tokens 64]
        [--kernels auto|onnxruntime] [--bandwidth]

Each artifact (ours, or onnxruntime-genai's folder: its `model.onnx` runs through the same
``OnnxCausalLM``) generates ``--new-tokens`` greedy tokens after a 16-token prompt ``--runs``
times with ``SessionOptions.enable_profiling``; the kernel time of every node is summed per op
type and the top ops are printed with their share and call count. Profiling slows every kernel a
little: compare artifacts with each other, not with ``bench_decode.py``'s speeds.

``--bandwidth`` adds the matrix products grouped by their weight (op type and shape): the median
time of one call (a decode step's: the prompt's calls are 1 in 1 + new-tokens) and the bytes of
the weight read per second in it. The time between nodes is not in these: a decode step's time
minus the sum of its nodes' is what the runtime spends between them.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import modelfold.backends.onnxruntime.runtime as runtime


def weight_bytes(model_path: Path) -> dict[str, tuple[str, tuple, int]]:
    """node name -> (op type, weight shape, bytes of its constant inputs) for the graph's matrix
    products (any node with ``MatMul`` in its op type whose second input is an initializer)."""
    model = onnx.load(str(model_path), load_external_data=False)
    inits = {i.name: i for i in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if "MatMul" not in node.op_type or len(node.input) < 2 or node.input[1] not in inits:
            continue
        size = sum(int(np.prod(inits[n].dims)) * onnx.helper.tensor_dtype_to_np_dtype(
            inits[n].data_type).itemsize for n in node.input[1:] if n in inits)
        out[node.name] = (node.op_type, tuple(inits[node.input[1]].dims), size)
    return out


def profile(artifact: Path, runs: int, new_tokens: int, top: int, threads: int,
            kernels: str = "auto", bandwidth: bool = False) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        plain = ort.SessionOptions

        class Profiled(plain):
            def __init__(self):
                super().__init__()
                self.enable_profiling = True
                self.profile_file_prefix = str(Path(tmp) / "profile")

        runtime.ort.SessionOptions = Profiled
        try:
            lm = runtime.OnnxCausalLM(artifact, threads=threads, kernels=kernels)
        finally:
            runtime.ort.SessionOptions = plain
        for _ in range(runs):
            lm.generate(list(range(100, 116)), new_tokens)
        events = json.loads(Path(lm.session.end_profiling()).read_text())
    micros: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()
    per_node: dict[str, list[int]] = collections.defaultdict(list)
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            micros[event["args"]["op_name"]] += event["dur"]
            calls[event["args"]["op_name"]] += 1
            per_node[event["name"][: -len("_kernel_time")]].append(event["dur"])
    total = sum(micros.values())
    print(f"{artifact}: {total / 1e3:.1f} ms of kernel time, {runs} x {new_tokens} tokens")
    for op, us in micros.most_common(top):
        print(f"  {op:40s} {us / 1e3:9.1f} ms {100 * us / total:5.1f} %  calls {calls[op]}")
    if bandwidth:
        groups: dict[tuple, list[float]] = collections.defaultdict(list)
        for name, (op, shape, size) in weight_bytes(lm.path).items():
            if per_node.get(name):
                groups[(op, shape, size)].append(statistics.median(per_node[name]))
        print("  matrix products by weight (median of the nodes' median call):")
        for (op, shape, size), medians in sorted(groups.items(), key=lambda g: -g[0][2]):
            us = statistics.median(medians)
            print(f"    {op} {'x'.join(map(str, shape)):>12s} x {len(medians):3d} nodes: "
                  f"{us:8.1f} us, {size / us / 1e3:5.1f} GB/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", nargs="+", type=Path)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--kernels", default="auto", choices=("auto", "onnxruntime"))
    parser.add_argument("--bandwidth", action="store_true",
                        help="the matrix products' time and bytes per second, by weight")
    args = parser.parse_args()
    for artifact in args.artifacts:
        profile(artifact, args.runs, args.new_tokens, args.top, args.threads, args.kernels,
                args.bandwidth)


if __name__ == "__main__":
    main()
