"""One artifact's decode and prefill speed under two or more commits of modelfold, interleaved.

    .venv/bin/python tools/bench_commits.py ARTIFACT COMMIT [COMMIT ...] [--rounds 7]
        [--what "prefill 128" "prefill 1024" decode]

``COMMIT`` is anything ``git worktree add`` takes (``HEAD~1``, a hash) or ``.`` for the working
tree. Each commit is checked out into a temporary worktree and runs in a child process of its own
(its ``backends`` / ``ir`` / ``passes`` / ``kernels`` packages, its kernels compiled from its
sources), which opens the artifact once (``OnnxCausalLM``, 2 threads, default kernels); then every
round asks each child in turn for one measurement, so the commits share the machine's noise.
Prefill: the time of ``generate(prompt, 1)`` for a prompt of N tokens (ms); decode: tokens per
second over 64 greedy tokens after a 16-token prompt, less the prompt's time. Prints medians
[min-max] and the ratio of each commit to the first.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

WORKER = r"""
import importlib, sys, time
root = sys.argv[1]
sys.path.insert(0, root)
import modelfold
for name in ("backends", "ir", "passes", "kernels"):  # this checkout's, not the installed one's
    sys.modules[f"modelfold.{name}"] = importlib.import_module(name)
from modelfold.backends.onnxruntime import runtime
lm = runtime.OnnxCausalLM(sys.argv[2], threads=2)
print("ready", lm.kernels.get("kernels"), flush=True)
for line in sys.stdin:
    what = line.split()
    if what[0] == "prefill":
        prompt = list(range(100, 100 + int(what[1])))
        t = time.perf_counter(); lm.generate(prompt, 1); print(time.perf_counter() - t, flush=True)
    else:
        prompt = list(range(100, 116))
        t = time.perf_counter(); lm.generate(prompt, 65); whole = time.perf_counter() - t
        t = time.perf_counter(); lm.generate(prompt, 1); first = time.perf_counter() - t
        print(64 / (whole - first), flush=True)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("commits", nargs="+")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--what", nargs="+", default=["prefill 128", "prefill 1024", "decode"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        roots = []
        for i, commit in enumerate(args.commits):
            if commit == ".":
                roots.append(ROOT)
                continue
            tree = Path(tmp) / f"c{i}"
            done = subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree),
                                   commit], capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"bench_commits: cannot check out {commit!r} ({done.stderr.strip()}); "
                         "give a commit of this repository or '.' for the working tree")
            roots.append(tree)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        children = []
        try:
            for root in roots:
                child = subprocess.Popen([sys.executable, "-c", WORKER, str(root), str(args.artifact)],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                         cwd=root, env=env)
                children.append(child)
                ready = child.stdout.readline().strip()
                if not ready.startswith("ready"):
                    sys.exit(f"bench_commits: {root} could not open {args.artifact} (its error is "
                             "above); give an artifact folder that commit's OnnxCausalLM opens")
                print(f"{root}: {ready}", flush=True)
            print(f"\n{args.artifact}, 2 threads, {args.rounds} interleaved rounds, median [min-max]\n")
            print("| measure | " + " | ".join(args.commits) + " | " +
                  " | ".join(f"{c} / {args.commits[0]}" for c in args.commits[1:]) + " |")
            print("|---" * (2 * len(args.commits)) + "|")
            for what in args.what:
                scale = 1e3 if what.startswith("prefill") else 1.0
                got: list[list[float]] = [[] for _ in children]
                for _ in range(args.rounds):
                    for i, child in enumerate(children):
                        child.stdin.write(what + "\n")
                        child.stdin.flush()
                        got[i].append(float(child.stdout.readline()) * scale)
                medians = [statistics.median(v) for v in got]
                unit = "ms" if scale > 1 else "tok/s"
                cells = [f"{m:.1f} [{min(v):.1f}-{max(v):.1f}]" for m, v in zip(medians, got)]
                ratios = [f"{m / medians[0]:.3f}x" for m in medians[1:]]
                print(f"| {what} ({unit}) | " + " | ".join(cells + ratios) + " |", flush=True)
        finally:
            for child in children:
                child.stdin.close()
                child.wait()
            for root in roots:
                if root != ROOT:
                    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                                    str(root)], capture_output=True)


if __name__ == "__main__":
    main()
