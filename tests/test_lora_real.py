"""LoRA on the real SmolLM2-135M and real text (slow): a short fine-tune lowers perplexity, over
a float and over an int4 base; the trained adapter loads in PEFT with the same outputs; the CLI
writes a PEFT adapter that ``eval --adapter`` reproduces.

The runs are short (8 steps of 2 x 128 tokens, 5,000 evaluation characters) to keep the suite
fast; ``tools/bench_lora.py`` measures longer runs on more text.
"""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch

import modelfold
from modelfold.cli import main
from modelfold.finetune import TrainConfig, train
from tests.conftest import copy_of
from tests.helpers import QUIET

pytestmark = pytest.mark.slow

CONFIG = TrainConfig(steps=8, lr=2e-3, batch_size=2, seq_len=128, warmup_steps=1,
                     eval_chars=5_000, log_every=0)


@pytest.fixture(scope="module")
def base(smollm2_base):
    return smollm2_base


@pytest.fixture(scope="module")
def short_dir(smollm2_short_base, tmp_path_factory):
    """The real model's first layers saved as a checkpoint folder: a MODEL argument for the CLI."""
    out = tmp_path_factory.mktemp("short") / "smollm2-short"
    modelfold.save(smollm2_short_base, out)
    return str(out)


@pytest.mark.parametrize("pipeline", ["lora{rank=8,alpha=16}",
                                      "quantize{bits=4,group_size=128},lora{rank=8,alpha=16}"])
def test_short_finetune_lowers_perplexity(base, pipeline):
    program = copy_of(base)
    result = modelfold.transform(program, pipeline, context=QUIET)
    frozen = {n: p.detach().clone() for n, p in result.module.named_parameters()
              if not p.requires_grad}
    trained = train(result, config=CONFIG, progress=False, log=None)
    assert trained["perplexity_after"] < trained["perplexity_before"]
    assert trained["trainable_parameters"] < 0.02 * base.parameter_count()
    for n, p in result.module.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_trained_adapter_loads_in_peft_with_the_same_outputs(base, tmp_path):
    result = modelfold.transform(copy_of(base), "lora{rank=4,alpha=8,targets=[q_proj,v_proj]}",
                                 context=QUIET)
    train(result, config=TrainConfig(steps=2, lr=1e-2, batch_size=1, seq_len=64, warmup_steps=1,
                                     eval_chars=1_000, log_every=0), progress=False, log=None)
    ids = base.tokenizer("The history of the Roman Empire", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ours = result.module(input_ids=ids).logits
    modelfold.save_adapter(result, tmp_path / "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(copy_of(base).module, str(tmp_path / "adapter"))
    with torch.no_grad():
        theirs = pm.eval()(input_ids=ids).logits
    assert (ours - theirs).abs().max() <= 1e-5
    assert not torch.allclose(ours, base.logits(ids), atol=1e-4)  # the adapter does something


def test_cli_finetune_then_eval_with_the_adapter(short_dir, tmp_path, capsys):
    """finetune -> eval --adapter -> convert --lora-export inputs -> eval ARTIFACT --adapter, on
    the real model's first layers (the CLI and the formats are what is tested, not depth)."""
    out = tmp_path / "ft"
    code = main(["finetune", short_dir, "-p", "lora{rank=4,alpha=8,targets=[q_proj,v_proj]}",
                 "--steps", "2", "--batch-size", "1", "--seq-len", "64", "--eval-chars", "2000",
                 "--teacher", "--no-verify", "-o", str(out), "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "report.md").is_file() and (out / "training.png").is_file()
    code = main(["eval", short_dir, "--adapter", str(out / "adapter"), "--chars", "2000",
                 "--json"])
    assert code == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert abs(evaluated["perplexity"] - summary["perplexity_after"]) < 1e-3
    # one ONNX artifact for the base model, the adapter as an ONNX Runtime adapter file
    art = tmp_path / "art"
    assert main(["convert", short_dir, "--adapter", str(out), "--lora-export", "inputs",
                 "--no-verify", "-o", str(art), "--json"]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert exported["parity"]["prefill_max_abs_diff"] < 1e-3
    assert (art / "adapters" / "default.onnx_adapter").is_file()
    assert main(["eval", str(art), "--adapter", "default", "--chars", "2000", "--json"]) == 0
    on_ort = json.loads(capsys.readouterr().out)
    assert abs(on_ort["perplexity"] - summary["perplexity_after"]) < 1e-3 * summary["perplexity_after"]
    assert main(["eval", str(art), "--chars", "2000", "--json"]) == 0
    base_ort = json.loads(capsys.readouterr().out)
    assert abs(base_ort["perplexity"] - summary["perplexity_before"]) < 1e-3 * summary["perplexity_before"]
    # bad input: an existing output folder, an adapter for another model
    assert main(["finetune", short_dir, "-p", "lora", "-o", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["eval", "minilm-l6", "--adapter", str(out / "adapter")]) == 2
    assert "another base model" in capsys.readouterr().err
