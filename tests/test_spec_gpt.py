"""gpt_staged.py: the behaviours a fork most easily breaks without any other test noticing, each checked against
the number the reference gives (GPT-2 / nanoGPT, the seed's STAGED.md, PaLM's FLOP count), never against the
implementation's own formula.

Run: python -m pytest -q tests/test_spec_gpt.py   (CPU, smoke-size models, data made here)
"""
import contextlib

import numpy as np
import pytest
import torch
import torch.nn as nn

import gpt_staged as gs
from test_gpt_staged import losses, make_bins, run_train


def small_gpt(n_layer=2, n_embd=32, seed=0, **overrides):
    torch.manual_seed(seed)
    config = dict(block_size=64, vocab_size=128, n_layer=n_layer, n_head=2, n_embd=n_embd, bias=True)
    return gs.GPT(gs.GPTConfig(**{**config, **overrides}))


def decayed_by_module_type(model):
    """The seed's rule written from the modules, not from tensor shapes: the weights of Linear and Embedding layers
    decay; biases and LayerNorm gains and biases do not. Returns {parameter name: True if decayed}."""
    decay = {}
    for module_name, module in model.named_modules():
        for name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            decay[full] = isinstance(module, (nn.Linear, nn.Embedding)) and name == "weight"
    return {name: decay[name] for name, _ in model.named_parameters()}  # the tied head is listed once, as wte


# ---- weight decay: "0.1 on all weights except biases and LayerNorm" (STAGED.md; nanoGPT: only dim >= 2) --------

def test_weight_decay_scales_matrices_and_embeddings_and_never_biases_or_layernorm():
    model = small_gpt()
    rule = decayed_by_module_type(model)
    assert sum(rule.values()) == 2 + 4 * 2 and sum(not d for d in rule.values()) == 2 * 8 + 2  # sanity of the rule
    lr, weight_decay = 0.1, 0.5
    optimizer = model.configure_optimizers(weight_decay, lr, (0.9, 0.95), "cpu")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # zero gradient: Adam moves nothing, only AdamW's decoupled decay acts
    optimizer.step()
    for name, p in model.named_parameters():
        factor = 1 - lr * weight_decay if rule[name] else 1.0  # AdamW (Loshchilov & Hutter): p <- p (1 - lr wd)
        torch.testing.assert_close(p.detach(), before[name] * factor, rtol=1e-6, atol=0, msg=name)


def test_decay_wpe_false_keeps_the_position_table_out_of_the_decay():
    model = small_gpt()
    optimizer = model.configure_optimizers(0.5, 0.1, (0.9, 0.95), "cpu", decay_wpe=False)
    wpe, wte = model.transformer.wpe.weight, model.transformer.wte.weight
    before = wpe.detach().clone(), wte.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    assert torch.equal(wpe.detach(), before[0])
    torch.testing.assert_close(wte.detach(), before[1] * 0.95, rtol=1e-6, atol=0)


# ---- gradient clipping: the global norm is at most grad_clip (1.0, the seed) after the clip ---------------------

class RecordingSGD(torch.optim.SGD):
    """SGD that keeps a copy of the gradients it is given: what the update used, after any clipping."""

    def step(self, closure=None):
        self.used = [p.grad.clone() for group in self.param_groups for p in group["params"]]
        return super().step(closure)


def test_optimizer_step_clips_the_global_gradient_norm_to_grad_clip():
    for scale, clipped in ((1e3, True), (1e-3, False)):
        model = small_gpt()
        x = torch.randint(0, 128, (2, 16))
        (model(x, x)[1] * scale).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        norm = torch.cat([g.flatten() for g in grads]).norm().item()
        assert (norm > 1.0) == clipped
        sgd = RecordingSGD(model.parameters(), lr=1e-3)
        gs.optimizer_step(model, sgd, torch.amp.GradScaler("cpu", enabled=False), grad_clip=1.0)
        used_norm = torch.cat([g.flatten() for g in sgd.used]).norm().item()
        assert used_norm == pytest.approx(1.0 if clipped else norm, rel=1e-5)  # clipped to 1.0, or untouched
        for used, grad in zip(sgd.used, grads):  # the direction is kept: one factor for every gradient
            torch.testing.assert_close(used, grad * min(1.0, 1.0 / norm), rtol=1e-5, atol=1e-12)
        assert all(p.grad is None for p in model.parameters())  # cleared for the next step


# ---- GPT-2 initialization: N(0, 0.02), residual projections N(0, 0.02 / sqrt(2 n_layer)) ------------------------

def test_gpt2_init_std_002_and_residual_projections_scaled_by_one_over_sqrt_2_n_layer():
    # GPT-2 paper, 2.3: "scale the weights of residual layers at initialization by a factor of 1/sqrt(N) where N is
    # the number of residual layers" (2 per block): with 8 blocks, 0.02 / 4 = 0.005 for attn/mlp c_proj
    model = small_gpt(n_layer=8, n_embd=128, vocab_size=512)
    for name, p in model.named_parameters():
        p = p.detach()
        if name.endswith("c_proj.weight"):
            assert p.std().item() == pytest.approx(0.005, rel=0.04), name
        elif name.endswith(("c_attn.weight", "c_fc.weight", "wte.weight", "wpe.weight")):
            assert p.std().item() == pytest.approx(0.02, rel=0.04), name
        elif name.endswith("bias"):
            assert torch.equal(p, torch.zeros_like(p)), name
        else:  # LayerNorm gains
            assert torch.equal(p, torch.ones_like(p)), name
    assert model.lm_head.weight is model.transformer.wte.weight  # tied: the head is the token table


# ---- MFU: FLOPs of the step's own context (PaLM, appendix B), not block_size ------------------------------------

def test_estimate_mfu_is_palm_flops_of_the_given_context():
    model = small_gpt()
    # N: the parameters without the position table (the token table counts once: it is also the head), counted
    # here from the tensors
    n = sum(p.numel() for name, p in model.named_parameters() if name != "transformer.wpe.weight")
    for context in (16, 64):
        flops_per_token = 6 * n + 12 * 2 * 32 * context  # 6N + 12 L d T
        expected = flops_per_token * 4 * context / 0.5 / 1e9  # 4 sequences of `context` tokens in 0.5 s, peak 1e9
        assert model.estimate_mfu(4, context, 0.5, 1e9) == pytest.approx(expected, rel=1e-12)


def test_training_reports_mfu_for_the_context_each_step_ran_at(tmp_path, monkeypatch):
    calls = []
    real = gs.GPT.estimate_mfu

    def spy(self, sequences, context, dt, peak):
        calls.append((sequences, context))
        return real(self, sequences, context, dt, peak)
    monkeypatch.setattr(gs.GPT, "estimate_mfu", spy)
    _, rows = run_train(tmp_path, "--stage_frac", "0.5", "--max_iters", "4", "--warmup_iters", "1",
                        "--log_interval", "1", "--eval_interval", "4")
    contexts = [r["ctx"] for r in rows if "loss" in r]
    assert contexts == [16, 16, 64, 64]
    per_step = calls[:4]  # one report per logged step (log_interval 1), then any per-stage summaries
    assert per_step == [(8, 16), (8, 16), (8, 64), (8, 64)]  # 8 sequences at the step's context, never block_size
    for sequences, context in calls[4:]:  # a summary counts the tokens of its own stage: 2 steps x 8 x context
        assert (sequences, context) in ((16, 16), (16, 64))


# ---- resume: the random stream continues, so dropout masks match an uninterrupted run ---------------------------

def test_resume_with_dropout_continues_exactly_as_the_uninterrupted_run(tmp_path):
    args = ["--dropout", "0.1", "--stage_frac", "0.25", "--max_iters", "8", "--eval_interval", "4"]
    _, whole = run_train(tmp_path, *args, out="whole")
    run_train(tmp_path, *args, "--stop_step", "4", out="split")
    _, resumed = run_train(tmp_path, *args, "--resume", out="split")
    assert len(losses(whole)) == 8
    assert losses(resumed) == losses(whole)  # bitwise: dropout draws the same masks after the resume
    _, no_dropout = run_train(tmp_path, *args[2:], out="no_dropout")  # and dropout does draw masks here: without
    assert [a for _, a in losses(no_dropout)] != [a for _, a in losses(whole)]  # it the losses differ


# ---- validation loss: the mean over tokens of the fixed subset ---------------------------------------------------

def test_validation_loss_is_the_mean_over_all_tokens_when_the_last_micro_batch_is_short(tmp_path):
    make_bins(tmp_path, train_tokens=64 * 10 + 1, val_tokens=64 * 5 + 1)  # 5 validation samples
    config = gs.Config(**{**gs.PRESETS["smoke"], "vocab_size": 128, "micro_batch_size": 2})
    model = small_gpt(n_layer=1).eval()
    loss = gs.estimate_loss(model, tmp_path / "val.bin", np.arange(5), config, contextlib.nullcontext(),
                            torch.device("cpu"))
    val = np.fromfile(tmp_path / "val.bin", dtype=np.uint16).astype(np.int64)
    samples = torch.from_numpy(np.stack([val[i * 64:i * 64 + 65] for i in range(5)]))  # micro-batches 2, 2, 1
    with torch.no_grad():
        logits, _ = model(samples[:, :-1])
    expected = nn.functional.cross_entropy(logits.flatten(0, 1), samples[:, 1:].flatten())  # all 5 x 64 tokens
    assert loss == pytest.approx(expected.item(), rel=1e-6)
    assert model.training  # estimate_loss puts the model back in training mode


# ---- the staged plan: where 128 switches to 1024, in the seed's numbers --------------------------------------

def test_truncated_steps_read_the_head_of_each_sample_and_full_steps_the_whole_sample(tmp_path):
    path = tmp_path / "train.bin"
    np.arange(8 * 64 + 1, dtype=np.uint16).tofile(path)  # token i at position i: values show positions
    plan = gs.make_plan(num_samples=8, batch_size=2, stage_frac=0.5, stage_len=16, block_size=64)
    assert [plan.context_at(s) for s in range(plan.total_steps)] == [16, 16, 64, 64]
    for step in range(4):
        context = plan.context_at(step)
        x, y = gs.get_batch(path, np.array([5]), context, 64, 1000, torch.device("cpu"))
        assert x[0].tolist() == list(range(320, 320 + context))          # sample 5 starts at token 5 x 64
        assert y[0].tolist() == list(range(321, 321 + context))          # targets: the next token of each


def test_match_tokens_extra_steps_bring_the_tokens_to_at_least_the_baseline():
    baseline = gs.make_plan(1000, 8, 0.0, 16, 64)
    for frac in (0.1, 0.25, 0.5):
        plan = gs.make_plan(1000, 8, frac, 16, 64, match_tokens=True)
        extra = [s for s in plan.stages if s.what == "extra"][0]
        assert plan.tokens_seen >= baseline.tokens_seen                   # seed Exp 2: the baseline's tokens ...
        assert plan.tokens_seen - baseline.tokens_seen < 8 * 64            # ... within one full step
        assert extra.context == 64 and plan.context_at(plan.total_steps - 1) == 64


# ---- data: sample i is tokens [i x block_size, i x block_size + block_size + 1); passes past one epoch ------------

def test_a_bin_holds_one_sample_per_block_size_tokens_plus_the_last_target(tmp_path):
    path = tmp_path / "train.bin"
    for tokens, samples in ((5 * 64 + 1, 5), (5 * 64, 4), (5 * 64 + 63, 5), (6 * 64 + 1, 6)):
        np.zeros(tokens, dtype=np.uint16).tofile(path)  # 5 x 64 tokens: the 5th sample lacks its last target
        assert gs.count_samples(path, 64) == samples, tokens


def test_each_pass_after_the_first_rereads_the_epochs_samples_in_its_own_order():
    num_samples, batch = 1003, 16
    steps = num_samples // batch
    passes = [np.concatenate([gs.batch_indices(p * steps + s, 7, num_samples, batch) for s in range(steps)])
              for p in range(3)]
    assert all(sorted(p.tolist()) == sorted(passes[0].tolist()) for p in passes)  # the same 992 samples each pass
    assert len({tuple(p.tolist()) for p in passes}) == 3                        # in three different orders
