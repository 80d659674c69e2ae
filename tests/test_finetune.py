"""The recovery fine-tuning engine: only trainable parameters move, runs are reproducible and
resumable bit for bit, distillation pulls toward the teacher, bad input fails with a reason."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from modelfold.finetune import TrainConfig, TrainError, plot_training, train
from modelfold.ir.program import Program
from tests.tiny_models import tiny_model

FAST = dict(corpus="random", seq_len=16, batch_size=2, warmup_steps=2, progress=False, log=None)


def student(seed: int = 0, trainable: tuple[str, ...] = ("norm",), **overrides) -> torch.nn.Module:
    """A tiny llama with only parameters whose name contains one of ``trainable`` unfrozen."""
    model = tiny_model("llama", seed=seed, **overrides)
    for name, p in model.named_parameters():
        p.requires_grad_(any(t in name for t in trainable))
    return model


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# -- options -----------------------------------------------------------------------------------


def test_from_options_coerces_cli_strings():
    cfg = TrainConfig.from_options({"steps": "5", "lr": "1e-2", "gradient-checkpointing": "true",
                                    "corpus": "random", "kl_weight": "0.5"})
    assert (cfg.steps, cfg.lr, cfg.gradient_checkpointing, cfg.kl_weight) == (5, 0.01, True, 0.5)
    assert cfg.to_dict()["corpus"] == "random"


def test_unknown_option_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"no option 'stepz'; options: steps, lr, .*log_every"):
        TrainConfig.from_options({"stepz": 3})
    with pytest.raises(ValueError, match="no option 'stepz'"):
        train(student(), stepz=3, **FAST)


@pytest.mark.parametrize("options, message", [
    ({"steps": 0}, "'steps' must be >= 1"),
    ({"lr": 0.0}, "'lr' must be > 0"),
    ({"grad_accum": 0}, "'grad_accum' must be >= 1"),
    ({"batch_size": 0}, "'batch_size' must be >= 1"),
    ({"seq_len": 1}, "'seq_len' must be >= 2"),
    ({"temperature": 0.0}, "'temperature' must be > 0"),
    ({"kl_weight": -1.0}, "'kl_weight' must be >= 0"),
    ({"ce_weight": 0.0}, "at least one loss must be on"),
    ({"corpus": "shakespeare"}, "'corpus' must be 'random' or a known corpus"),
    ({"steps": "ten"}, "'steps' must be an integer"),
])
def test_bad_option_values_name_the_option(options, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_options(options)


def test_config_and_options_are_exclusive():
    with pytest.raises(TypeError, match="not both"):
        train(student(), config=TrainConfig(corpus="random"), steps=2)


# -- preconditions -----------------------------------------------------------------------------


def test_no_trainable_parameters_says_to_run_a_pass():
    with pytest.raises(TrainError, match="no trainable parameters.*e.g. lora"):
        train(student(trainable=()), steps=1, **FAST)


@pytest.mark.parametrize("weights", [{"kl_weight": 1.0}, {"hidden_weight": 1.0}])
def test_distillation_without_a_teacher(weights):
    with pytest.raises(TrainError, match="needs a teacher"):
        train(student(), steps=1, **weights, **FAST)


def test_teacher_with_another_vocabulary():
    with pytest.raises(TrainError, match=r"vocabulary \(64\) differs from the model's \(128\)"):
        train(student(), teacher=tiny_model("llama", vocab_size=64), kl_weight=1.0, steps=1, **FAST)


def test_teacher_must_be_a_separate_copy():
    model, teacher = student(trainable=("lm_head",)), tiny_model("llama")
    with pytest.raises(TrainError, match="the teacher is the model being trained"):
        train(model, teacher=model, kl_weight=1.0, steps=1, **FAST)
    teacher.lm_head.weight = model.lm_head.weight
    with pytest.raises(TrainError, match="shares 1 trainable parameter"):
        train(model, teacher=teacher, kl_weight=1.0, steps=1, **FAST)


def test_text_corpus_needs_a_tokenizer():
    with pytest.raises(TrainError, match="needs a tokenizer"):
        train(student(), steps=1, **{**FAST, "corpus": "wikipedia"})


# -- what moves and what does not --------------------------------------------------------------


def test_only_trainable_parameters_change_and_modes_are_restored():
    model = student(trainable=("norm", "lm_head"))
    model.model.layers[0].train()  # a mixed-mode model must come back exactly as it was
    modes = {n: m.training for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = snapshot(model)
    seen_training = []
    model.register_forward_pre_hook(lambda m, args: seen_training.append(m.training))

    result = train(model, steps=3, **FAST)

    for name, p in model.named_parameters():
        if flags[name]:
            assert not torch.equal(p, before[name]), f"{name} did not train"
        else:
            assert torch.equal(p, before[name]), f"frozen {name} changed"
        assert p.requires_grad == flags[name] and p.grad is None
    assert seen_training == [True] * 3  # train mode (dropout on) during the steps
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert result["trainable_parameters"] == sum(p.numel() for n, p in model.named_parameters()
                                                 if flags[n])
    assert result["total_parameters"] == sum(p.numel() for p in model.parameters())
    assert result["tokens"] == 3 * 2 * 16 and len(result["loss_history"]) == 3
    assert result["perplexity_before"] is None and "random" in result["eval_skipped"]


def test_distillation_reduces_kl_and_leaves_the_teacher_alone():
    model, teacher = student(trainable=("norm", "lm_head")), tiny_model("llama", seed=1)
    teacher_before = snapshot(teacher)
    result = train(model, teacher=teacher, ce_weight=0.0, kl_weight=1.0, hidden_weight=0.1,
                   steps=20, lr=1e-2, **FAST)
    kl = result["loss_terms"]["kl"]
    assert sum(kl[-3:]) / 3 < 0.7 * kl[0]
    assert result["teacher"] is True and result["hidden_layers_matched"] == 4  # 4 layer outputs
    assert all(torch.equal(p, teacher_before[n]) for n, p in teacher.named_parameters())
    assert not teacher.training


def test_hidden_loss_on_a_shallower_student_uses_the_last_state_only():
    model, teacher = student(num_hidden_layers=2), tiny_model("llama", seed=1)
    result = train(model, teacher=teacher, hidden_weight=1.0, steps=1, **FAST)
    assert result["hidden_layers_matched"] == 1
    assert "3 hidden states and the teacher 5" in result["notes"][0]


def test_same_seed_is_bit_identical_and_leaves_the_global_rng_alone():
    def run(seed):
        model = student(trainable=("norm", "lm_head"), attention_dropout=0.3)  # dropout is seeded
        rng = torch.get_rng_state()
        result = train(model, steps=4, seed=seed, **FAST)
        assert torch.equal(torch.get_rng_state(), rng)
        return result["loss_history"], snapshot(model)

    (loss_a, a), (loss_b, b), (loss_c, c) = run(0), run(0), run(1)
    assert loss_a == loss_b and all(torch.equal(a[n], b[n]) for n in a)
    assert loss_a != loss_c and not torch.equal(a["lm_head.weight"], c["lm_head.weight"])


def test_gradient_checkpointing_gives_the_same_losses():
    def run(**options):
        model, calls = student(), []
        mlp = model.model.layers[0].mlp
        forward = mlp.forward

        def counted(*args, **kwargs):  # a forward hook would not see the recompute
            calls.append(1)
            return forward(*args, **kwargs)

        mlp.forward = counted
        return model, train(model, steps=3, **options, **FAST)["loss_history"], len(calls)

    _, plain, plain_calls = run()
    model, checkpointed, checkpointed_calls = run(gradient_checkpointing=True)
    assert checkpointed == pytest.approx(plain, abs=1e-5)
    assert (plain_calls, checkpointed_calls) == (3, 6)  # the layer re-ran in each backward
    assert not model.is_activation_checkpointing  # switched back off, its embedding hook removed
    assert not getattr(model, "_require_grads_hooks", None)


def test_program_input_uses_its_tokenizer_and_real_text_lowers_perplexity(smollm2_tokenizer):
    tokenizer = smollm2_tokenizer
    model = student(trainable=("norm", "lm_head"), vocab_size=len(tokenizer),
                    bos_token_id=tokenizer.bos_token_id)
    program = Program(model, tokenizer=tokenizer)
    result = train(program, steps=12, lr=3e-2, eval_every=6, eval_chars=2000, **{
        **FAST, "corpus": "wikipedia", "seq_len": 64})
    assert [e["step"] for e in result["eval"]] == [0, 6, 12]
    assert result["perplexity_after"] < 0.5 * result["perplexity_before"]
    assert sum(result["loss_history"][-3:]) < sum(result["loss_history"][:3])


# -- checkpoints and resume --------------------------------------------------------------------


class Interrupt(Exception):
    pass


def interrupt_after(step: int):
    def log(line: str) -> None:
        if line.startswith(f"step {step}/"):
            raise Interrupt
    return log


def test_checkpoint_layout_is_complete_and_atomic(tmp_path, monkeypatch):
    def failing_save(*args, **kwargs):
        raise OSError("disk full")

    with monkeypatch.context() as patch:  # a checkpoint that fails half-written leaves nothing
        patch.setattr(torch, "save", failing_save)
        with pytest.raises(OSError, match="disk full"):
            train(student(), steps=2, checkpoint_dir=tmp_path, **FAST)
    assert list(tmp_path.iterdir()) == []

    model = student()
    result = train(model, steps=5, checkpoint_every=2, checkpoint_dir=tmp_path, **FAST)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000002", "step-000004", "step-000005"]
    last = tmp_path / "step-000005"
    assert result["checkpoint"] == str(last)
    assert sorted(p.name for p in last.iterdir()) == ["optimizer.pt", "state.json",
                                                      "trainable.safetensors"]
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    saved = load_file(last / "trainable.safetensors")
    assert saved.keys() == trainable.keys() and all(torch.equal(saved[n], trainable[n]) for n in saved)
    state = json.loads((last / "state.json").read_text())
    assert state["step"] == 5 and state["config"]["checkpoint_every"] == 2
    assert state["history"]["loss"] == result["loss_history"] and state["fingerprint"]


def test_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path):
    options = dict(FAST, steps=6, grad_accum=2, checkpoint_every=1, log_every=1)
    straight = student(trainable=("norm", "lm_head"), attention_dropout=0.2)
    expected = train(straight, **options)

    model = student(trainable=("norm", "lm_head"), attention_dropout=0.2)
    with pytest.raises(Interrupt):
        train(model, checkpoint_dir=tmp_path, **{**options, "log": interrupt_after(3)})
    # Step 3's line is logged before its checkpoint is written: the run stopped after step 2's.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000001", "step-000002"]
    model = student(trainable=("norm", "lm_head"), attention_dropout=0.2)  # a fresh process
    resumed = train(model, checkpoint_dir=tmp_path, resume=True, **options)

    assert resumed["resumed_from"] == 2 and resumed["steps_this_run"] == 4
    assert resumed["loss_history"] == expected["loss_history"]
    ref = dict(straight.named_parameters())
    for name, p in model.named_parameters():
        assert torch.allclose(p, ref[name], atol=1e-6, rtol=0), name


def test_resume_rejects_a_mismatched_model_or_options(tmp_path):
    train(student(), steps=2, checkpoint_dir=tmp_path, **FAST)
    with pytest.raises(TrainError, match="other trainable parameters.*only in the model: lm_head"):
        train(student(trainable=("norm", "lm_head")), steps=4, checkpoint_dir=tmp_path,
              resume=True, **FAST)
    with pytest.raises(TrainError, match="other training options.*lr: checkpoint 0.001, now 0.01"):
        train(student(), steps=4, lr=1e-2, checkpoint_dir=tmp_path, resume=True, **FAST)
    with pytest.raises(TrainError, match="already holds checkpoints.*resume=True"):
        train(student(), steps=4, checkpoint_dir=tmp_path, **FAST)


def test_resume_rejects_a_damaged_or_missing_checkpoint(tmp_path):
    with pytest.raises(TrainError, match="holds no step-\\* checkpoint"):
        train(student(), steps=2, checkpoint_dir=tmp_path, resume=True, **FAST)
    train(student(), steps=2, checkpoint_dir=tmp_path, **FAST)
    (tmp_path / "step-000002" / "trainable.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(TrainError, match="step-000002 is corrupt"):
        train(student(), steps=4, checkpoint_dir=tmp_path, resume=True, **FAST)
    (tmp_path / "step-000002" / "optimizer.pt").unlink()
    with pytest.raises(TrainError, match=r"incomplete \(missing optimizer.pt\)"):
        train(student(), steps=4, checkpoint_dir=tmp_path, resume=True, **FAST)


def test_plot_training_writes_a_png(tmp_path):
    result = {"loss_history": [3.0, 2.5, 2.2], "eval": [{"step": 0, "perplexity": 30.0},
                                                        {"step": 3, "perplexity": 20.0}]}
    plot_training(result, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- the real model ----------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_post_attention_norms_recover_a_damaged_model(smollm2):
    program = smollm2
    module = program.module
    with torch.no_grad():  # the damage to recover from: perplexity 17 -> ~900 on this text
        for name, p in module.named_parameters():
            p.requires_grad_(name.endswith("post_attention_layernorm.weight"))
            if p.requires_grad:
                p.mul_(0.7)
    frozen = module.model.layers[0].self_attn.q_proj.weight.detach().clone()
    result = train(program, steps=8, batch_size=2, seq_len=128, lr=1e-2, warmup_steps=2,
                   eval_chars=5000, progress=False, log=None)
    assert result["trainable_parameters"] == 30 * 576
    assert result["perplexity_after"] < 0.2 * result["perplexity_before"]  # measured 35 vs 925
    assert torch.equal(module.model.layers[0].self_attn.q_proj.weight, frozen)
