"""How far modelfold's int4 / int8 kernel is from ONNX Runtime's on a real artifact, next to how far ONNX
Runtime is from itself when one weight moves by 1e-6 (accuracy level 4 is chaotic).

    .venv/bin/python tools/kernel_agreement.py ARTIFACT [--chars 40000] [--tokens 512]

ARTIFACT: an int4 or int8 artifact exported with ``--accuracy-level 4`` (e.g. bench_decode.py's
``modelfold-int4-rtn`` or ``modelfold-int8``). Rows: ONNX Runtime's kernels; modelfold's kernels;
ONNX Runtime's kernels on a copy whose first RMSNorm weight is scaled by 1 + 1e-6. Columns:
perplexity on the first --chars characters of the evaluation split, its change, and the top-1
agreement with the first row over --tokens tokens of that text (one window). Prints a Markdown
table.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from modelfold.artifact import artifact_tokenizer
from modelfold.backends.onnxruntime.runtime import OnnxCausalLM
from modelfold.corpus import corpus_text
from modelfold.evaluate import evaluate


def perturbed_copy(artifact: Path, out: Path, factor: float) -> Path:
    """The artifact with its first ``RMSNormalization`` weight multiplied by ``factor``."""
    model = onnx.load(str(artifact / "model.onnx"))
    norm = next(n for n in model.graph.node if n.op_type == "RMSNormalization")
    weight = next(i for i in model.graph.initializer if i.name == norm.input[1])
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * np.float32(factor),
                                            weight.name))
    for f in artifact.iterdir():
        if not f.name.startswith("model.onnx") and f.is_file():
            shutil.copy(f, out / f.name)
    onnx.save(model, str(out / "model.onnx"), save_as_external_data=True,
              location="model.onnx.data")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--chars", type=int, default=40_000)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    tokenizer = artifact_tokenizer(args.artifact)
    text = corpus_text("wikipedia", "evaluation")
    ids = np.array([tokenizer(text[:20_000]).input_ids[:args.tokens]])
    with tempfile.TemporaryDirectory() as tmp:
        rows = {
            "ONNX Runtime's kernels": OnnxCausalLM(args.artifact, threads=args.threads,
                                                   kernels="onnxruntime"),
            "modelfold's kernels": OnnxCausalLM(args.artifact, threads=args.threads,
                                                kernels="modelfold"),
            "ONNX Runtime's kernels, first norm weight x (1 + 1e-6)": OnnxCausalLM(
                perturbed_copy(args.artifact, Path(tmp), 1 + 1e-6), threads=args.threads,
                kernels="onnxruntime"),
        }
        reference, base = None, None
        print(f"{args.artifact}: perplexity on {args.chars:,} chars; top-1 agreement with the "
              f"first row on {ids.shape[1]} tokens\n")
        print("| run | perplexity | change | top-1 agreement |")
        print("|---|---|---|---|")
        for name, lm in rows.items():
            ppl = evaluate(lm, tokenizer, text, chars=args.chars, progress=False)["perplexity"]
            top = lm.logits(ids).argmax(-1)
            reference = top if reference is None else reference
            base = ppl if base is None else base
            print(f"| {name} | {ppl:.3f} | {100 * (ppl / base - 1):+.2f} % | "
                  f"{(top == reference).mean():.3f} |", flush=True)


if __name__ == "__main__":
    main()
