"""What an artifact's ONNX Runtime session holds in memory, with ONNX Runtime's kernels and with
modelfold's: the resident set of a fresh child process before the session, after opening it and
after generating a few tokens.

    .venv/bin/python tools/session_memory.py ARTIFACT [ARTIFACT ...] [--tokens 16]

Each (artifact, kernels) pair runs in its own child (``python -c``), so one measurement never
holds another's memory. RSS from ``/proc/self/status``: anonymous memory (what the session
allocated: packed weights, arenas) and file-backed (the memory-mapped external data it reads in
place). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = """
import json, sys
def rss():
    fields = dict(line.split(':', 1) for line in open('/proc/self/status') if ':' in line)
    return {k: int(fields[k].split()[0]) * 1024 for k in ('VmRSS', 'RssAnon', 'RssFile')}
from modelfold.backends.onnxruntime.runtime import OnnxCausalLM
before = rss()
lm = OnnxCausalLM(sys.argv[1], threads=2, kernels=sys.argv[2])
opened = rss()
lm.generate(list(range(100, 116)), int(sys.argv[3]))
print(json.dumps({"before": before, "opened": opened, "generated": rss(),
                  "kernels": lm.kernels["kernels"]}))
"""


def measure(artifact: Path, kernels: str, tokens: int) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, str(artifact), kernels, str(tokens)],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", nargs="+", type=Path)
    parser.add_argument("--tokens", type=int, default=16)
    args = parser.parse_args()
    mb = 1e6
    print("| artifact | kernels | session RSS (MB) | of which anonymous | of which file-backed |")
    print("|---|---|---|---|---|")
    for artifact in args.artifacts:
        for kernels in ("onnxruntime", "auto"):
            r = measure(artifact, kernels, args.tokens)
            grown = {k: r["generated"][k] - r["before"][k] for k in r["before"]}
            print(f"| {artifact.name} | {r['kernels']} | {grown['VmRSS'] / mb:.0f} | "
                  f"{grown['RssAnon'] / mb:.0f} | {grown['RssFile'] / mb:.0f} |", flush=True)


if __name__ == "__main__":
    main()
