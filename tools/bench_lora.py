"""LoRA fine-tuning on SmolLM2-135M: before/after perplexity, QLoRA, and adapter variants at an
equal trainable-parameter budget. Prints a markdown table; writes JSON and a loss plot.

    .venv/bin/python tools/bench_lora.py                 # all rows (about 30 min on 2 cores)
    .venv/bin/python tools/bench_lora.py --rows lora-r8,qlora-r8 --steps 20

Training text is the Wikipedia corpus's calibration split, evaluation text its evaluation split
(the two never overlap); every row trains the same steps on the same batches (same seed).

Equal budget: LoRA / PiSSA at rank r on every linear layer of the 30 decoder layers train
r * (in + out) numbers per layer; LoRA-XS / LoRA-SB train a k x k core, so they get the k with
7 k^2 = r * sum(in + out) per decoder layer (the row reports the exact counts).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

import modelfold
from modelfold.corpus import corpus_text
from modelfold.evaluate import evaluate
from modelfold.finetune import TrainConfig, train
from modelfold.passes.manager import PassContext

QUIET = PassContext(log=None, verify=False, measure=False)


def budget_rank(program, r: int) -> int:
    """Core size k of LoRA-XS/SB with about the trainable numbers of LoRA rank r."""
    layer = program.module.get_submodule(program.arch.layers)[0]
    shapes = [(m.in_features, m.out_features) for m in layer.modules()
              if isinstance(m, torch.nn.Linear)]
    return max(1, round(math.sqrt(r * sum(i + o for i, o in shapes) / len(shapes))))


def rows(r_budget: int, k: int, r_main: int) -> dict[str, tuple[str, str]]:
    """name -> (pipeline, description)."""
    return {
        f"lora-r{r_main}": (f"lora{{rank={r_main},alpha={2 * r_main}}}",
                            f"LoRA r={r_main} alpha={2 * r_main}, all linear layers"),
        f"qlora-r{r_main}": (f"quantize{{bits=4,group_size=128}},lora{{rank={r_main},"
                             f"alpha={2 * r_main}}}",
                             f"int4 g128 RTN base + LoRA r={r_main} (QLoRA-style)"),
        f"budget-lora-r{r_budget}": (f"lora{{rank={r_budget},alpha={2 * r_budget}}}",
                                     f"LoRA r={r_budget} (budget)"),
        f"budget-pissa-r{r_budget}": (f"lora{{rank={r_budget},alpha={2 * r_budget},init=pissa}}",
                                      f"PiSSA r={r_budget} (budget)"),
        f"budget-xs-k{k}": (f"lora{{rank={k},alpha={k},init=xs}}", f"LoRA-XS k={k} (budget)"),
        f"budget-sb-k{k}": (f"lora{{rank={k},alpha={k},init=sb,n_samples=32}}",
                            f"LoRA-SB k={k} (budget)"),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", help="comma-separated row names (default: all)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rank", type=int, default=8, help="rank of the LoRA / QLoRA rows")
    ap.add_argument("--budget-rank", type=int, default=2, help="LoRA rank that sets the budget")
    ap.add_argument("--eval-chars", type=int, default=100_000)
    ap.add_argument("--out", default="out/bench_lora")
    ap.add_argument("--table", metavar="JSON", help="only print the table of a results.json")
    args = ap.parse_args()
    if args.table:
        saved = json.loads(Path(args.table).read_text())
        _print_table(saved["fp32"], saved["config"], saved["rows"])
        return 0
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = corpus_text("wikipedia", "evaluation")

    base = modelfold.load("smollm2-135m")
    k = budget_rank(base, args.budget_rank)
    table = rows(args.budget_rank, k, args.rank)
    wanted = args.rows.split(",") if args.rows else list(table)
    unknown = [w for w in wanted if w not in table]
    if unknown:
        sys.exit(f"unknown rows {unknown}; known: {', '.join(table)}")
    fp32 = evaluate(base.module, base.tokenizer, text, chars=args.eval_chars,
                    progress=False)["perplexity"]
    print(f"fp32 SmolLM2-135M: perplexity {fp32:.3f} on {args.eval_chars:,} chars", flush=True)
    del base
    config = TrainConfig(steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                         seq_len=args.seq_len, warmup_steps=max(1, args.steps // 10),
                         eval_chars=args.eval_chars, log_every=10)
    results = []
    for name in wanted:
        pipeline, desc = table[name]
        print(f"\n== {name}: {pipeline}", flush=True)
        program = modelfold.load("smollm2-135m")
        start = time.perf_counter()
        result = modelfold.transform(program, pipeline, context=QUIET)
        pass_seconds = time.perf_counter() - start
        trained = train(result, config=config, progress=False)
        row = {"row": name, "description": desc, "pipeline": pipeline, "lr": args.lr,
               "trainable": trained["trainable_parameters"], "steps": trained["steps"],
               "tokens": trained["tokens"], "pass_seconds": round(pass_seconds, 1),
               "train_seconds": round(trained["seconds"], 1),
               "ppl_before": trained["perplexity_before"], "ppl_after": trained["perplexity_after"],
               "loss": trained["loss_history"]}
        results.append(row)
        print(f"{name}: {row['ppl_before']:.3f} -> {row['ppl_after']:.3f} "
              f"({row['train_seconds']:.0f} s train, {row['trainable']:,} trainable)", flush=True)
        (out / "results.json").write_text(json.dumps(
            {"fp32": fp32, "config": config.to_dict(), "rows": results}, indent=2))
        del program, result

    _print_table(fp32, config.to_dict(), results)
    _plot(results, out / "loss.png")
    print(f"\nwrote {out / 'results.json'} and {out / 'loss.png'}")
    return 0


def _print_table(fp32: float, config: dict, results: list[dict]) -> None:
    print(f"\nSmolLM2-135M, fp32 perplexity {fp32:.3f} ({config['eval_chars']:,} chars of the "
          f"evaluation split); {config['steps']} steps x {config['batch_size']} x "
          f"{config['seq_len']} tokens, AdamW, cosine\n")
    print("| row | lr | trainable | perplexity at init | after training | vs fp32 base | "
          "pass s | train s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        change = (r["ppl_after"] / fp32 - 1) * 100
        print(f"| {r['description']} | {r.get('lr', config['lr']):g} | {r['trainable']:,} | "
              f"{r['ppl_before']:.3f} | {r['ppl_after']:.3f} | {change:+.1f} % | "
              f"{r['pass_seconds']:.0f} | {r['train_seconds']:.0f} |")


def _plot(results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        loss = torch.tensor(r["loss"])
        smooth = torch.nn.functional.avg_pool1d(loss[None, None], 5, 1, 2,
                                                count_include_pad=False)[0, 0]
        ax.plot(smooth.tolist(), label=r["description"])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (5-step mean)")
    ax.set_title("SmolLM2-135M LoRA variants")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
