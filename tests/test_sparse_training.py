"""Sparsity-aware training (modelfold.sparse_training) on tiny models: the schedule, the exact
N:M end state, training from a dense model, the CLI, and the errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import modelfold
from modelfold.cli import main as cli_main
from modelfold.ir.program import Program
from modelfold.ir.sparse import NMLinear, nm_mask, satisfies_nm
from modelfold.passes.sparsify import check_nm_invariant, sparse_layers
from modelfold.sparse_training import CastConfig, CastSchedule, SparseTrainLinear, sparse_train
from modelfold.train_checkpoints import TrainError
from tests.helpers import QUIET
from tests.tiny_models import tiny_model

TRAIN = dict(corpus="random", batch_size=2, seq_len=16, progress=False, log=None)


def _kl(teacher, student, ids) -> float:
    with torch.no_grad():
        p = torch.log_softmax(teacher(ids).logits, -1)
        q = torch.log_softmax(student(ids).logits, -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_sparse_train_from_one_shot_pruning_ends_exactly_n_m_and_moves_to_the_teacher():
    base = tiny_model("llama", initializer_range=0.2)  # peaked outputs: a KL worth closing
    teacher = copy.deepcopy(base)
    result = modelfold.transform(base, "nm-sparsify{method=magnitude}", context=QUIET)
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(5))
    kl_before = _kl(teacher, result.module, ids)
    before = {p: m.mask() for p, m in sparse_layers(result.module).items()}
    report = sparse_train(result, teacher=teacher, steps=40, lr=3e-3, warmup_steps=2,
                          ce_weight=0.0, kl_weight=1.0,
                          sparse_options={"mask_every": 5, "decay": 0.5, "harden_at": 0.5},
                          **TRAIN)
    layers = sparse_layers(result.module)
    assert len(layers) == 28 and all(isinstance(m, NMLinear) for m in layers.values())
    assert check_nm_invariant(result.module) == []
    assert _kl(teacher, result.module, ids) < 0.9 * kl_before  # hard 2:4 and closer to dense
    sparse = report["sparse"]
    assert sparse["pattern"] == "2:4" and sparse["layers"] == 28 and sparse["harden_step"] == 20
    # the mask moved while it was soft (weights regrew through the straight-through gradient)
    assert any(s["mask_flips"] for s in sparse["schedule"])
    assert any(not torch.equal(before[p], m.mask()) for p, m in layers.items())
    assert sparse["schedule"][-1]["alpha"] == 0.0
    # everything outside the sparse layers stayed frozen
    assert torch.equal(result.module.model.embed_tokens.weight, teacher.model.embed_tokens.weight)


def test_a_teacher_defaults_to_asts_loss_mix():
    base = tiny_model("llama")
    result = modelfold.transform(copy.deepcopy(base), "nm-sparsify{method=magnitude}",
                                 context=QUIET)
    report = sparse_train(result, teacher=base, steps=1, **TRAIN)
    assert report["config"]["ce_weight"] == 0.33 and report["config"]["kl_weight"] == 0.67


def test_after_the_hardening_point_the_forward_is_the_final_sparse_model():
    torch.manual_seed(0)
    w = torch.randn(8, 16)
    layer = SparseTrainLinear(w, None, 2, 4, nm_mask(w.abs(), 2, 4))
    schedule = CastSchedule({"l": layer}, CastConfig(harden_at=0.5, decay=1.0), steps=10)
    assert layer.alpha == 1.0
    for step in range(1, 11):
        layer.weight.data += 0.01 * torch.randn(8, 16)
        schedule.after_step(step, lr=1e-2)
    assert layer.alpha == 0.0
    x = torch.randn(3, 16)
    hard = layer.harden()
    assert satisfies_nm(hard.weight, 2, 4)
    assert torch.allclose(layer(x), hard(x), atol=1e-6)


def test_decay_shrinks_only_the_dropped_weights():
    w = torch.tensor([[1.0, 0.5, 0.2, 0.1]])
    layer = SparseTrainLinear(w, None, 2, 4, nm_mask(w.abs(), 2, 4))
    schedule = CastSchedule({"l": layer}, CastConfig(decay=1.0, harden_at=1.0, mask_every=100),
                            steps=4)
    schedule.after_step(4, lr=0.15)  # full decay: threshold 0.15
    assert torch.allclose(layer.weight.data, torch.tensor([[1.0, 0.5, 0.05, 0.0]]))


def test_sparse_train_from_a_dense_model_with_a_pattern():
    program = Program(tiny_model("gpt2"))
    report = sparse_train(program, steps=6, lr=1e-3, sparse_options={"n": 1, "m": 4}, **TRAIN)
    assert report["sparse"]["pattern"] == "1:4" and report["sparse"]["layers"] == 16
    assert check_nm_invariant(program.module) == []
    logits = program.module(torch.randint(0, 128, (1, 5))).logits
    assert torch.isfinite(logits).all()


def test_sparse_train_errors():
    with pytest.raises(TrainError, match="no N:M sparse layers"):
        sparse_train(Program(tiny_model("llama")), steps=2, **TRAIN)
    result = modelfold.transform(tiny_model("llama"), "nm-sparsify{method=magnitude}",
                                 context=QUIET)
    with pytest.raises(TrainError, match="2:4 sparse but n=1, m=4"):
        sparse_train(result, steps=2, sparse_options={"n": 1, "m": 4}, **TRAIN)
    with pytest.raises(TrainError, match="cannot resume"):
        sparse_train(result, steps=2, resume=True, **TRAIN)
    with pytest.raises(ValueError, match="harden_at"):
        sparse_train(result, steps=2, sparse_options={"harden_at": 0}, **TRAIN)
    with pytest.raises(ValueError, match="no option 'rate'"):
        sparse_train(result, steps=2, sparse_options={"rate": 1}, **TRAIN)


def test_finetune_cli_sparse_aware(tmp_path, capsys):
    src = tmp_path / "tiny"
    model = tiny_model("llama")
    model.save_pretrained(src)
    out = tmp_path / "run"
    code = cli_main(["finetune", str(src), "-p", "nm-sparsify{method=magnitude}", "-o", str(out),
                     "--steps", "4", "--batch-size", "2", "--seq-len", "16", "--teacher",
                     "--sparse-aware", "--sparse-option", "decay=1", "--train-option",
                     "corpus=random", "--save-model", str(tmp_path / "saved"), "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 4
    report = json.loads((out / "training.json").read_text())
    assert report["training"]["sparse"]["options"]["decay"] == 1.0
    assert report["training"]["config"]["kl_weight"] == 0.67
    loaded = modelfold.load(str(tmp_path / "saved"))
    assert len(sparse_layers(loaded.module)) == 28
    assert check_nm_invariant(loaded.module) == []
    assert cli_main(["finetune", str(src), "-p", "nm-sparsify", "-o", str(tmp_path / "x"),
                     "--sparse-option", "decay=1"]) == 2
    assert "--sparse-option needs --sparse-aware" in capsys.readouterr().err
