"""tools/bench_triton.py end to end in its interpreter mode (the GPU run needs a GPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_triton_interpret_mode(tmp_path):
    run = subprocess.run([sys.executable, "tools/bench_triton.py", "--interpret", "--shapes",
                          "1x48x64", "--out", str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "Correctness: PASS" in run.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    rows = results["CPU (Triton interpreter)"]["rows"]  # one entry per device
    assert len(rows) == 9 and all(r["max_rel_err"] <= 1e-2 for r in rows)
