"""Which layers to drop? Perplexity after removing N layers of SmolLM2, by choice strategy.

    .venv/bin/python tools/bench_drop_layers.py [--count 4] [--chars 200000] [--random-seeds 3]

Prints a Markdown table: strategy, dropped layers, perplexity on the evaluation split (the
`modelfold eval` protocol: 512-token windows, BOS prepended), and the change from the original.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import modelfold
from modelfold.corpus import corpus_text
from modelfold.evaluate import evaluate
from modelfold.passes.manager import PassContext


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--count", type=int, default=4)
    parser.add_argument("--chars", type=int, default=200_000)
    parser.add_argument("--random-seeds", type=int, default=3)
    args = parser.parse_args()

    base = modelfold.load(args.model)
    text = corpus_text("wikipedia", "evaluation")
    quiet = PassContext(log=None, verify=False)

    def ppl(module) -> float:
        return evaluate(module, base.tokenizer, text, chars=args.chars, progress=False)["perplexity"]

    start = time.perf_counter()
    original = ppl(base.module)
    rows = [("original", "-", original)]
    importance = modelfold.transform(copy.deepcopy(base.module), "layer-importance",
                                     tokenizer=base.tokenizer, context=quiet)
    scores = importance.program.analyses["layer-importance"]["scores"]
    runs = [("importance (angular distance)", f"layer-importance,drop-layers{{count={args.count}}}"),
            (f"last {args.count}", f"drop-layers{{count={args.count},strategy=last}}")]
    runs += [(f"random (seed {s})", f"drop-layers{{count={args.count},strategy=random,seed={s}}}")
             for s in range(args.random_seeds)]
    for label, pipeline in runs:
        result = modelfold.transform(copy.deepcopy(base.module), pipeline,
                                     tokenizer=base.tokenizer, context=quiet)
        dropped = result.program.log[-1].details["dropped"]
        rows.append((label, str(dropped), ppl(result.module)))

    print(f"\nSmolLM2-135M, drop {args.count} of {base.arch.num_layers} layers; wikipedia "
          f"evaluation split, first {args.chars:,} chars, 512-token windows\n")
    print("| strategy | dropped layers | perplexity | change |")
    print("|---|---|---|---|")
    for label, dropped, value in rows:
        change = "-" if label == "original" else f"{(value / original - 1) * 100:+.1f} %"
        print(f"| {label} | {dropped} | {value:.2f} | {change} |")
    random_ppl = [v for label, _, v in rows if label.startswith("random")]
    if random_ppl:
        print(f"\nrandom: median {statistics.median(random_ppl):.2f}")
    print("\nlayer scores (angular distance, calibration split): "
          + ", ".join(f"{i}:{s:.3f}" for i, s in enumerate(scores)))
    print(f"total time {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
