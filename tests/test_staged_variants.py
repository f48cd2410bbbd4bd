"""The staged variants beyond the seed, decoding, perplexity and the report, as a specification.

Run: python -m pytest -q tests/test_staged_variants.py   (CPU, tiny models, data made here + the shared GPT-2 BPE)
"""
import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from conftest import require_shared
from test_gpt_staged import SEED_SAMPLES, run_train

import gpt_staged as gs



# ---- reshape, recycling, schedules -----------------------------------------------------------------------------

def test_reshape_keeps_tokens_per_step_and_drops_nothing():
    plan = gs.make_plan(101, 4, 0.25, 8, 32, stage_mode="reshape")
    assert [plan.context_at(s) for s in range(25)] == [8] * 6 + [32] * 19
    assert {plan.step_tokens(plan.stage_at(s)) for s in range(25)} == {4 * 32}  # 4 samples as 16 rows of 8
    assert plan.truncated_tokens == 0 and plan.tokens_seen == 25 * 4 * 32
    assert gs.make_plan(101, 4, 0.25, 8, 32, match_tokens=True, stage_mode="reshape").total_steps == 25


def test_reshape_run_feeds_every_token_of_each_sample_as_short_rows(tmp_path, monkeypatch):
    seen = []
    forward = gs.GPT.forward
    monkeypatch.setattr(gs.GPT, "forward", lambda self, idx, targets=None, cache=None:
                        seen.append((idx.clone(), targets.clone())) or forward(self, idx, targets, cache))
    result, rows = run_train(tmp_path, "--stage_frac", "0.25", "--stage_mode", "reshape", "--max_iters", "8",
                             "--eval_samples", "1")
    x, y = seen[1]  # seen[0] is the evaluation at step 0; then step 1, micro-step 1 of 2: 4 samples as 16 rows of 16
    assert x.shape == y.shape == (16, 16)
    data = np.fromfile(tmp_path / "data" / "train.bin", dtype=np.uint16).astype(np.int64)
    first = gs.batch_indices(0, 1337, 937, 8)[:4]
    assert x.reshape(4, 64).tolist() == [data[i * 64:i * 64 + 64].tolist() for i in first]
    assert y.reshape(4, 64).tolist() == [data[i * 64 + 1:i * 64 + 65].tolist() for i in first]
    steps = [r for r in rows if "loss" in r]
    assert [r["ctx"] for r in steps] == [16, 16] + [64] * 6
    assert [r["tokens"] for r in steps] == [8 * 64 * k for k in range(1, 9)]
    assert result["tokens_seen"] == 8 * 8 * 64


def test_recycled_steps_read_exactly_the_truncated_samples_each_once():
    plan = gs.make_plan(1003, 16, 0.25, 8, 32, match_tokens=True, recycle=True)
    assert plan.short_steps == 16 and plan.total_steps == 62 + 16  # one extra step per truncated batch
    truncated = np.concatenate([gs.batch_indices(plan.sample_step(s), 7, 1003, 16) for s in range(16)])
    recycled = np.concatenate([gs.batch_indices(plan.sample_step(s), 7, 1003, 16) for s in range(62, 78)])
    assert len(set(recycled.tolist())) == len(recycled) == 16 * 16
    assert recycled.tolist() == truncated.tolist()  # the same samples, in the short stage's order
    assert {plan.context_at(s) for s in range(62, 78)} == {32}
    second_epoch = gs.make_plan(1003, 16, 0.25, 8, 32, match_tokens=True)  # the seed's Exp 2: 12 steps, new samples
    assert second_epoch.total_steps == 62 + 12 and second_epoch.sample_step(62) == 62
    assert not set(gs.batch_indices(62, 7, 1003, 16).tolist()) <= set(truncated.tolist())


def test_two_stage_schedule_gives_each_context_its_share_of_the_steps():
    plan = gs.make_plan(101, 4, 0, 8, 32, stages="8:0.25,16:0.25")  # 6.25 -> 6 steps, 12.5 -> 13: 7 more
    assert [plan.context_at(s) for s in range(25)] == [8] * 6 + [16] * 7 + [32] * 12
    assert plan.tokens_seen == 4 * (6 * 8 + 7 * 16 + 12 * 32)
    assert plan.truncated_tokens == 4 * (6 * 24 + 7 * 16)
    seed = gs.make_plan(SEED_SAMPLES, 512, 0, 128, 1024, stages="128:0.25,256:0.25")  # the seed's 128 -> 256 try
    assert [(s.steps, s.context) for s in seed.stages] == [(6_140, 128), (6_139, 256), (12_279, 1024)]


def test_linear_length_warmup_grows_in_multiples_of_length_step():
    plan = gs.make_plan(SEED_SAMPLES, 512, 0.25, 128, 1024, length_warmup=True, length_step=8)
    contexts = [plan.context_at(s) for s in range(6_141)]
    assert contexts[0] == 128 and contexts[6_139] == 1016 and contexts[6_140] == 1024
    assert all(c % 8 == 0 for c in contexts) and contexts == sorted(contexts)
    assert contexts[3_070] == 128 + 896 // 2  # halfway: halfway between 128 and 1024
    assert plan.tokens_seen == 512 * (sum(contexts[:6_140]) + 18_418 * 1024)


def test_token_based_lr_decay_reaches_its_floor_at_the_planned_token_count():
    config = gs.Config(lr_decay_by="tokens")  # seed LR: 2000 warmup steps, cosine to 10% over 90%, then flat
    plan = gs.make_plan(SEED_SAMPLES, 512, 0.25, 128, 1024)
    warm = plan.tokens_before(2000)
    floor = warm + 0.9 * (plan.tokens_seen - warm)
    first = next(s for s in range(plan.total_steps) if plan.tokens_before(s) >= floor)
    assert gs.get_lr(first, plan.total_steps, config, plan) == config.min_lr
    assert gs.get_lr(first - 1, plan.total_steps, config, plan) > config.min_lr
    assert first > math.ceil(2000 + 0.9 * (plan.total_steps - 2000))  # later than by steps: short steps count less
    # at the stage switch the token clock has moved 25% x 1/8 of the way the step clock has
    by_steps = gs.get_lr(6_140, plan.total_steps, dataclasses.replace(config, lr_decay_by="steps"), plan)
    assert gs.get_lr(6_140, plan.total_steps, config, plan) > by_steps
    whole = dataclasses.replace(config, lr_decay_frac=1.0)
    assert gs.get_lr(plan.total_steps - 1, plan.total_steps, whole, plan) > config.min_lr
    assert gs.get_lr(plan.total_steps, plan.total_steps, whole, plan) == config.min_lr


@pytest.mark.parametrize("args, message", [
    (["--recycle"], "add --match_tokens"),
    (["--stage_frac", "0.25", "--stage_len", "24", "--stage_mode", "reshape"], "must divide --block_size"),
    (["--stages", "128:0.5,256:0.5"], "a sum < 1"),
    (["--stages", "128-0.5"], "is not context:fraction"),
    (["--length_warmup"], "set --stage_frac > 0"),
    (["--lr_decay_by", "samples"], "--lr_decay_by must be steps or tokens"),
])
def test_variant_errors_name_the_key(args, message, capsys):
    assert gs.main(["plan", "--num_samples", "1000", *args]) == 2
    assert message in capsys.readouterr().err


# ---- decoding and perplexity -----------------------------------------------------------------------------------

def tiny_gpt(vocab_size=128, block_size=16):
    torch.manual_seed(0)
    return gs.GPT(gs.GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=32)).eval()


def test_kv_cache_decoding_equals_decoding_without_the_cache():
    model = tiny_gpt()
    prompt = torch.tensor([[5, 17, 3, 99, 42]])
    # 5 + 20 tokens > block_size 16: also the path where the full cache is rebuilt over the last 16 tokens
    cached, cached_logits = model.generate(prompt, 20, use_cache=True)
    plain, plain_logits = model.generate(prompt, 20, use_cache=False)
    assert cached.tolist() == plain.tolist()
    torch.testing.assert_close(cached_logits, plain_logits, rtol=0, atol=1e-5)
    sampled = [model.generate(prompt, 20, temperature=0.8, top_k=10, use_cache=c,
                              generator=torch.Generator().manual_seed(1))[0].tolist() for c in (True, False)]
    assert sampled[0] == sampled[1] != cached.tolist()


def test_top_k_sampling_draws_only_among_the_k_most_likely_tokens():
    model = tiny_gpt()
    _, logits = model.generate(torch.tensor([[1, 2]]), 1)
    top3 = set(torch.topk(logits[0, 0], 3).indices.tolist())
    draws = {model.generate(torch.tensor([[1, 2]]), 1, temperature=5.0, top_k=3,
                            generator=torch.Generator().manual_seed(s))[0][0, -1].item() for s in range(40)}
    assert draws <= top3 and len(draws) > 1


def save_tiny_checkpoint(path, zero=False):
    config = gs.Config(n_layer=1, n_head=2, n_embd=16, block_size=32)
    model = gs.GPT(gs.GPTConfig(**{k: getattr(config, k) for k in gs.MODEL_KEYS}))
    if zero:  # all-zero weights: uniform logits over the 50304 rows, so the loss is exactly ln 50304
        for p in model.parameters():
            p.data.zero_()
    torch.save({"model": model.state_dict(), "config": dataclasses.asdict(config)}, path)
    return path


def test_ppl_command_scores_every_token_of_a_text_file_once(tmp_path, capsys):
    bpe = require_shared("gpt2_bpe")
    text = tmp_path / "text.txt"
    text.write_text("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
                    "must be in want of a wife. " * 3)  # 79 tokens: windows of 32, 32, 14 targets
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt.pt", zero=True)
    assert gs.main(["ppl", "--ckpt", str(ckpt), "--text_file", str(text), "--bpe_dir", str(bpe)]) == 0
    out = capsys.readouterr().out
    assert "78 tokens predicted in 3 non-overlapping windows of up to 32" in out
    assert float(out.split("ppl ")[-1]) == pytest.approx(50_304, rel=1e-5)


def test_sample_command_decodes_greedily_from_a_checkpoint(tmp_path, capsys):
    bpe = require_shared("gpt2_bpe")
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt.pt")
    _, config = gs.parse_args(["sample", "--ckpt", str(ckpt), "--bpe_dir", str(bpe), "--prompt", "Call me Ishmael.",
                               "--max_new_tokens", "8"])
    tokens = gs.sample(config)
    assert len(tokens) == 8 and max(tokens) < 50257  # the padded vocabulary rows are never chosen
    assert capsys.readouterr().out.startswith("Call me Ishmael.")
    assert gs.sample(config) == tokens  # greedy: the same every time


# ---- the report ------------------------------------------------------------------------------------------------

def write_run(folder, val_ppl, **config):
    """The files a finished smoke run leaves: results.jsonl (with its config) and log.jsonl."""
    folder.mkdir(parents=True)
    c = gs.Config(**{**gs.PRESETS["smoke"], "vocab_size": 128, "max_iters": 12, **config})
    plan = gs.plan_for(c, 12 * c.batch_size)
    evals = [{"step": 0, "val_loss": 4.8, "tokens": 0},
             {"step": 12, "val_loss": math.log(val_ppl), "tokens": plan.tokens_seen}]
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
    result = {"run": folder.name, "val_ppl": val_ppl, "val_samples": 8, "tokens_seen": plan.tokens_seen,
              "total_steps": plan.total_steps, "train_time_s": 999.0, "config": dataclasses.asdict(c)}
    (folder / "results.jsonl").write_text(json.dumps(result) + "\n")


def test_report_pairs_runs_by_seed_and_gives_the_difference_with_its_interval(tmp_path, monkeypatch, capsys):
    write_run(tmp_path / "baseline", 100.0)
    write_run(tmp_path / "baseline_seed2", 102.0, seed=1338)
    write_run(tmp_path / "exp1", 101.0, stage_frac=0.25)
    write_run(tmp_path / "exp1_seed2", 104.0, stage_frac=0.25, seed=1338)
    # measured step times, fixed here: 0.1 s at context 16, 0.4 s at 64 (8 sequences each)
    monkeypatch.setattr(gs, "step_times", lambda config, shapes: {(8, 16): 0.1, (8, 64): 0.4})
    assert gs.main(["report", "--report_only", "--preset", "smoke", "--vocab_size", "128", "--runs", "baseline,exp1",
                    "--seeds", "2", "--out_dir", str(tmp_path)]) == 0
    table = (tmp_path / "report.md").read_text()
    # baseline 100, 102; exp1 101, 104: paired differences 1 and 2: mean 1.5, sd 0.707, 95% half-width
    # t(0.975, 1 df) 12.706 x 0.707 / sqrt(2) = 6.353; in %: 1.0 and 1.961, mean 1.480
    assert "| baseline (full context all the way) | 101.000 +- 1.414 | - | - | 4.8 s | +0.0% | 6,144 |" in table
    assert "| exp1 (seed Exp 1: 25% of steps at ctx 16) | 102.500 +- 2.121 | +1.500 +- 0.707 [-4.853, +7.853] | " \
           "+1.48% [" in table
    assert "| 3.9 s | -18.8% | 4,992 |" in table  # 3 steps x 0.1 s + 9 x 0.4 s, against 12 x 0.4 s
    assert "over 2 seed(s)" in table and "scored on 8 validation samples" in table
    summary = json.loads((tmp_path / "report.json").read_text())["runs"]
    assert summary["exp1"]["seeds"] == [1337, 1338] and summary["exp1"]["diff"][0] == pytest.approx(1.5)
    try:
        import matplotlib  # noqa: F401 -- optional: the plot needs it, the table never does
        assert (tmp_path / "val_loss.png").stat().st_size > 1000
    except ImportError:
        assert "matplotlib is not installed" in capsys.readouterr().out


def test_report_jobs_run_every_configuration_once_per_seed():
    _, jobs = gs.report_jobs(gs.Config(seed=7, seeds=3), ["baseline", "exp2"])
    assert [(folder, overrides["seed"]) for _, folder, overrides in jobs] == [
        ("baseline", 7), ("exp2", 7), ("baseline_seed2", 8), ("exp2_seed2", 8), ("baseline_seed3", 9),
        ("exp2_seed3", 9)]
    assert jobs[1][2]["match_tokens"] and jobs[1][2]["stage_frac"] == 0.25


@pytest.mark.slow
def test_report_trains_its_runs_two_at_a_time_and_writes_the_table(tmp_path):
    from test_gpt_staged import make_bins
    make_bins(tmp_path / "data")
    code = gs.main(["report", "--preset", "smoke", "--vocab_size", "128", "--data_dir", str(tmp_path / "data"),
                    "--max_iters", "8", "--eval_interval", "4", "--runs", "baseline,exp2", "--seeds", "2",
                    "--report_jobs", "2", "--bench_repeats", "1", "--bench_steps", "1", "--out_dir",
                    str(tmp_path / "report")])
    assert code == 0
    table = (tmp_path / "report" / "report.md").read_text()
    assert table.count("+- ") >= 3 and "| exp2 (" in table
    for folder in ("baseline", "exp2", "baseline_seed2", "exp2_seed2"):
        rows = [json.loads(line) for line in (tmp_path / "report" / folder / "log.jsonl").read_text().splitlines()]
        assert rows[-1]["step"] == (8 if folder.startswith("baseline") else 10)  # exp2: 2 extra steps


def test_report_runs_another_seed_of_any_named_run():
    runs = gs.report_runs(gs.Config(seed=1337), ["exp1_seed2", "baseline_seed3"])
    assert runs["exp1_seed2"][1] == dict(runs["exp1"][1], seed=1338) and runs["baseline_seed3"][1] == {"seed": 1339}
    assert runs["baseline_seed2"][1] == {"seed": 1338}


def test_report_names_a_run_that_has_not_finished(tmp_path, capsys):
    write_run(tmp_path / "baseline", 100.0)
    assert gs.main(["report", "--report_only", "--runs", "baseline,exp2", "--seeds", "1", "--out_dir",
                    str(tmp_path)]) == 2
    assert "exp2/results.jsonl not found: run exp2 has not finished" in capsys.readouterr().err
