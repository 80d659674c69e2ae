"""Where a decoder artifact's decode time goes: ONNX Runtime's profiler, summed by op type.

    .venv/bin/python tools/profile_decode.py ARTIFACT [ARTIFACT ...] [--runs 3] [--new-tokens 64]

Each artifact (ours, or onnxruntime-genai's folder: its `model.onnx` runs through the same
``OnnxCausalLM``) generates ``--new-tokens`` greedy tokens after a 16-token prompt ``--runs``
times with ``SessionOptions.enable_profiling``; the kernel time of every node is summed per op
type and the top ops are printed with their share and call count. Profiling slows every kernel a
little: compare artifacts with each other, not with ``bench_decode.py``'s speeds.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path

import onnxruntime as ort

import modelfold.backends.onnxruntime.runtime as runtime


def profile(artifact: Path, runs: int, new_tokens: int, top: int, threads: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        plain = ort.SessionOptions

        class Profiled(plain):
            def __init__(self):
                super().__init__()
                self.enable_profiling = True
                self.profile_file_prefix = str(Path(tmp) / "profile")

        runtime.ort.SessionOptions = Profiled
        try:
            lm = runtime.OnnxCausalLM(artifact, threads=threads)
        finally:
            runtime.ort.SessionOptions = plain
        for _ in range(runs):
            lm.generate(list(range(100, 116)), new_tokens)
        events = json.loads(Path(lm.session.end_profiling()).read_text())
    micros: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            micros[event["args"]["op_name"]] += event["dur"]
            calls[event["args"]["op_name"]] += 1
    total = sum(micros.values())
    print(f"{artifact}: {total / 1e3:.1f} ms of kernel time, {runs} x {new_tokens} tokens")
    for op, us in micros.most_common(top):
        print(f"  {op:40s} {us / 1e3:9.1f} ms {100 * us / total:5.1f} %  calls {calls[op]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", nargs="+", type=Path)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args()
    for artifact in args.artifacts:
        profile(artifact, args.runs, args.new_tokens, args.top, args.threads)


if __name__ == "__main__":
    main()
