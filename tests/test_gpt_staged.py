"""gpt_staged.py as a specification: the seed's schedule and arithmetic, the model, one-epoch data, resume.

Run: python -m pytest -q tests/test_gpt_staged.py   (CPU, smoke-size models, data made here)
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import require_module
import gpt_staged as gs

ROOT = Path(__file__).resolve().parents[1]
SEED_SAMPLES = 12_574_161  # seed: num_train_samples of openwebtext1+2 at n_ctx 1024
# smoke model on a 128-token vocabulary (the synthetic bins below use ids < 100)
SMOKE = ["--preset", "smoke", "--vocab_size", "128"]
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}



def make_bins(folder, train_tokens=60_000, val_tokens=3_000, vocab=100, period=37):
    """train.bin / val.bin of a repetitive stream (a 37-token pattern): easy to learn, so the loss must fall."""
    folder.mkdir(parents=True, exist_ok=True)
    pattern = np.random.default_rng(0).integers(0, vocab, size=period)
    for name, n in (("train", train_tokens), ("val", val_tokens)):
        np.resize(pattern, n).astype(np.uint16).tofile(folder / f"{name}.bin")
    meta = {"vocab_size": vocab, "eot": vocab - 1, "n_ctx": 64, "train_tokens": train_tokens, "val_tokens": val_tokens}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def run_train(tmp_path, *args, out="out"):
    """train() in-process on the smoke preset; returns (result, rows of log.jsonl)."""
    data = make_bins(tmp_path / "data") if not (tmp_path / "data").exists() else tmp_path / "data"
    _, config = gs.parse_args([*SMOKE, "--data_dir", str(data), "--out_dir", str(tmp_path / out), *args])
    result = gs.train(config)
    rows = [json.loads(line) for line in (tmp_path / out / "log.jsonl").read_text().splitlines()]
    return result, rows


def losses(rows):
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def smoke_model(**overrides):
    torch.manual_seed(0)
    return gs.GPT(gs.GPTConfig(**{**dict(block_size=64, vocab_size=128, n_layer=2, n_head=2, n_embd=32), **overrides}))


# ---- the seed's LR schedule ----------------------------------------------------------------------------------

def test_lr_schedule_warmup_from_zero_cosine_to_ten_percent_then_flat():
    config = gs.Config()  # seed: warmup 2000, peak 6e-4 -> 6e-5 (10%), cosine over 90% of the remaining steps
    total = 24_558
    end_of_cosine = 2000 + 0.9 * (total - 2000)  # 22,302.2
    assert gs.get_lr(0, total, config) == 0.0
    assert gs.get_lr(1000, total, config) == pytest.approx(3e-4)
    assert gs.get_lr(2000, total, config) == pytest.approx(6e-4)
    assert gs.get_lr(2000 + 0.45 * (total - 2000), total, config) == pytest.approx(3.3e-4)  # mid-cosine
    assert gs.get_lr(22_302, total, config) > 6e-5
    assert gs.get_lr(math.ceil(end_of_cosine), total, config) == pytest.approx(6e-5)
    assert gs.get_lr(total - 1, total, config) == 6e-5
    tail = [gs.get_lr(t, total, config) for t in range(23_000, total)]
    assert set(tail) == {6e-5}


# ---- the staged plan -------------------------------------------------------------------------------------------

def test_plan_gives_context_per_step_and_token_counts():
    plan = gs.make_plan(num_samples=101, batch_size=4, stage_frac=0.25, stage_len=8, block_size=32)
    assert plan.steps == 25                                      # 101 // 4; the last sample is dropped
    assert [plan.context_at(s) for s in range(25)] == [8] * 6 + [32] * 19  # 0.25 x 25 = 6.25 -> 6 short steps
    assert plan.tokens_seen == 6 * 4 * 8 + 19 * 4 * 32
    assert plan.truncated_tokens == 6 * 4 * (32 - 8)
    with pytest.raises(IndexError):
        plan.context_at(25)
    matched = gs.make_plan(101, 4, 0.25, 8, 32, match_tokens=True)
    assert matched.total_steps == 25 + math.ceil(576 / (4 * 32))  # 5 extra full-context steps
    assert matched.context_at(29) == 32
    assert matched.tokens_seen >= 25 * 4 * 32                      # at least the baseline's tokens


def test_seed_arithmetic_matches_staged_md():
    plan = gs.make_plan(SEED_SAMPLES, 512, stage_frac=0.25, stage_len=128, block_size=1024)
    assert SEED_SAMPLES / 512 == pytest.approx(24_559, abs=0.5)   # "one epoch ~ 24,559 steps"
    assert plan.steps == 24_558                                    # whole batches only
    assert plan.stages[0] == gs.Stage(6_140, 128, "short")         # "25% ~ 6,140 short steps"
    assert round(plan.truncated_tokens / 1e9, 2) == 2.82           # "~2.82B truncated away"
    assert round(plan.tokens_seen / 1e9, 2) == 10.06               # "Exp 1 sees ~10.06B"
    extra = gs.match_tokens_steps(plan.truncated_tokens, 512, 1024)
    assert round(extra / 1e3, 2) == 5.37                           # "~5.37k extra steps for Exp 2"


def test_plan_command_prints_the_seed_arithmetic():
    out = subprocess.run([sys.executable, "gpt_staged.py", "plan", "--stage_frac", "0.25", "--num_samples",
                          str(SEED_SAMPLES)], cwd=ROOT, env=ONE_THREAD, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for figure in ("24,558.9", "6,140 steps", "at ctx 128", "tokens seen 10.06B",
                   "truncated away by the short stage: 2.82B", "5,373 extra full-context steps"):
        assert figure in out.stdout, figure


def test_unused_position_rows_shrink_by_the_planned_factor(tmp_path):
    # 10 of 20 steps at ctx 16: rows 16..63 of wpe get no gradient, only AdamW's decoupled decay
    run_train(tmp_path, "--stage_frac", "0.5", "--stop_step", "10", "--weight_decay", "1.0")
    checkpoint = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    config = gs.Config(**checkpoint["config"])
    torch.manual_seed(config.seed)
    initial = gs.GPT(gs.GPTConfig(**{k: getattr(config, k) for k in gs.MODEL_KEYS})).transformer.wpe.weight
    trained = checkpoint["model"]["transformer.wpe.weight"]
    plan = gs.make_plan(937, 8, 0.5, 16, 64, max_iters=20)  # the run's plan: 60,000 tokens // 64
    shrink = gs.unused_position_shrink(plan, config)
    assert shrink < 0.99
    torch.testing.assert_close(trained[16:], initial[16:] * shrink, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(trained[:16], initial[:16] * shrink)  # the used rows did learn


# ---- the model -------------------------------------------------------------------------------------------------

def test_gradient_accumulation_equals_one_large_batch():
    model = smoke_model()
    x = torch.randint(0, 128, (8, 64))
    y = torch.randint(0, 128, (8, 64))
    model(x, y)[1].backward()
    full = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    micro_batches = [(x[i:i + 2], y[i:i + 2]) for i in range(0, 8, 2)]  # 4 micro-batches of 2, through the loop's own
    loss = gs.forward_backward(model, micro_batches, 4, torch.autocast("cpu", enabled=False),  # accumulation step
                               torch.amp.GradScaler("cpu", enabled=False))
    assert float(loss) == pytest.approx(model(x, y)[1].item(), rel=1e-5)  # the step's loss: the batch mean
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, full[name], atol=1e-6, rtol=1e-5, msg=name)


def test_training_losses_do_not_depend_on_the_micro_batch_size(tmp_path):
    _, one = run_train(tmp_path, "--micro_batch_size", "8", "--max_iters", "6", out="one")
    _, four = run_train(tmp_path, "--micro_batch_size", "2", "--max_iters", "6", out="four")
    assert len(losses(one)) == 6
    for (step, a), (_, b) in zip(losses(one), losses(four)):
        assert a == pytest.approx(b, abs=1e-5), step


def test_causal_masking_future_tokens_do_not_change_earlier_logits():
    model = smoke_model().eval()
    x = torch.randint(0, 128, (2, 40))
    changed = x.clone()
    changed[:, 25] = (x[:, 25] + 1) % 128
    with torch.no_grad():
        a, b = model(x)[0], model(changed)[0]
    torch.testing.assert_close(a[:, :25], b[:, :25], atol=0, rtol=0)
    assert not torch.allclose(a[:, 25:], b[:, 25:])


def test_forward_accepts_any_context_up_to_block_size():
    model = smoke_model()
    for t in (1, 16, 64):
        logits, loss = model(torch.zeros(2, t, dtype=torch.long), torch.zeros(2, t, dtype=torch.long))
        assert logits.shape == (2, t, 128) and loss.ndim == 0


@pytest.mark.parametrize("layout", ["model.safetensors", "pytorch_model.bin"])
def test_from_pretrained_reproduces_hugging_face_logits(tmp_path, layout):
    transformers = require_module("transformers")
    hf_config = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=48, vocab_size=300,
                                        bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    reference = transformers.GPT2LMHeadModel(hf_config).eval()
    with torch.no_grad():  # non-trivial biases and LayerNorm weights, so a missed copy or transpose shows
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    reference.save_pretrained(tmp_path)
    if layout == "pytorch_model.bin":  # the original GPT-2 layout: no 'transformer.' prefix, mask buffers
        state = {k.removeprefix("transformer."): v for k, v in reference.state_dict().items() if k != "lm_head.weight"}
        state["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 48, 48))
        state["h.0.attn.masked_bias"] = torch.tensor(-1e4)
        torch.save(state, tmp_path / "pytorch_model.bin")
        (tmp_path / "model.safetensors").unlink()
    model = gs.GPT.from_pretrained(tmp_path).eval()
    x = torch.randint(0, 300, (2, 48))
    with torch.no_grad():
        expected = reference(x).logits
        logits, _ = model(x)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_training_starts_from_a_pretrained_folder(tmp_path):
    transformers = require_module("transformers")
    torch.manual_seed(0)
    reference = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=32, n_positions=48, vocab_size=120, bos_token_id=0, eos_token_id=0)).eval()
    reference.save_pretrained(tmp_path / "gpt2-tiny")
    result, rows = run_train(tmp_path, "--init_from", str(tmp_path / "gpt2-tiny"), "--max_iters", "6")
    config = result["config"]
    assert (config["vocab_size"], config["block_size"], config["n_embd"]) == (120, 48, 32)  # the checkpoint's shape
    val = np.fromfile(tmp_path / "data" / "val.bin", dtype=np.uint16).astype(np.int64)
    subset = gs.eval_subset((len(val) - 1) // 48, 8)  # the smoke preset's 8 samples, spread over val.bin
    samples = torch.from_numpy(np.stack([val[i * 48:i * 48 + 49] for i in subset]))
    with torch.no_grad():
        logits = reference(samples[:, :-1]).logits
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), samples[:, 1:].flatten())
    assert rows[0]["val_loss"] == pytest.approx(expected.item(), rel=1e-5)  # step 0 evaluates the loaded weights


# ---- one epoch of data -----------------------------------------------------------------------------------------

def test_one_epoch_visits_every_sample_exactly_once():
    num_samples, batch = 1003, 16
    steps = num_samples // batch  # 62 steps; 11 samples (a partial batch) are dropped
    seen = np.concatenate([gs.batch_indices(s, 7, num_samples, batch) for s in range(steps)])
    assert len(seen) == len(set(seen.tolist())) == steps * batch
    assert set(seen.tolist()) <= set(range(num_samples))
    second_epoch = np.concatenate([gs.batch_indices(steps + s, 7, num_samples, batch) for s in range(steps)])
    assert not np.array_equal(seen, second_epoch) and len(set(second_epoch.tolist())) == steps * batch


def test_ddp_ranks_read_disjoint_slices_that_cover_the_batch():
    for step in (0, 5, 61):
        full = gs.batch_indices(step, 7, 1003, 16)
        parts = [gs.batch_indices(step, 7, 1003, 16, world_size=4, rank=r) for r in range(4)]
        assert all(len(p) == 4 for p in parts)
        assert np.array_equal(np.concatenate(parts), full)  # disjoint, and together exactly the step's batch


def test_short_stage_reads_the_first_stage_len_plus_one_tokens_of_each_sample(tmp_path):
    path = tmp_path / "train.bin"
    np.arange(10 * 64 + 1, dtype=np.uint16).tofile(path)
    x, y = gs.get_batch(path, np.array([3, 0]), 16, 64, 1000, torch.device("cpu"))
    assert x.dtype == torch.int64 and x.shape == y.shape == (2, 16)
    assert x[0].tolist() == list(range(192, 208)) and y[0].tolist() == list(range(193, 209))


# ---- runs ------------------------------------------------------------------------------------------------------

def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tmp_path):
    args = ["--stage_frac", "0.25", "--max_iters", "12", "--eval_interval", "4"]  # 3 short steps, then full
    _, uninterrupted = run_train(tmp_path, *args, out="whole")
    run_train(tmp_path, *args, "--stop_step", "5", out="split")  # stops after step 5, past the stage switch
    with open(tmp_path / "split" / "log.jsonl", "a") as log:  # what a run killed after its checkpoint leaves
        log.write('{"step": 6, "loss": 123.0}\n{"step": 7, "lo')
    _, resumed = run_train(tmp_path, *args, "--resume", out="split")
    assert len(losses(uninterrupted)) == 12
    assert losses(resumed) == losses(uninterrupted)  # bitwise: CPU, float32, batches a function of (seed, step)


def test_staged_run_lowers_validation_loss_and_switches_context(tmp_path):
    data = make_bins(tmp_path / "data")
    out = subprocess.run([sys.executable, "gpt_staged.py", *SMOKE, "--data_dir", str(data), "--out_dir",
                          str(tmp_path / "out"), "--stage_frac", "0.25", "--max_iters", "40", "--eval_interval", "20"],
                         cwd=ROOT, env=ONE_THREAD, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    log = out.stdout
    assert "| ctx 16 |" in log and "| ctx 64 |" in log
    assert log.index("| ctx 16 |") < log.index("stage: context 16 -> 64 after 10 steps") < log.index("| ctx 64 |")
    rows = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(val) == 3 and val[-1] < val[0] - 1.0  # step 0, 20, 40
    result = json.loads((tmp_path / "out" / "results.jsonl").read_text().splitlines()[-1])
    assert result["tokens_seen"] == 10 * 8 * 16 + 30 * 8 * 64
    assert f"| staged 25% x 16 | {math.exp(val[-1]):.3f} |" in log


def test_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    real_get_lr = gs.get_lr
    monkeypatch.setattr(gs, "get_lr", lambda step, total, c, *plan:
                        math.nan if step == 5 else real_get_lr(step, total, c, *plan))
    data = make_bins(tmp_path / "data")
    code = gs.main([*SMOKE, "--data_dir", str(data), "--out_dir", str(tmp_path / "out"), "--eval_interval", "4"])
    assert code == 1
    assert "error: loss is nan in step 7" in capsys.readouterr().err
    checkpoint = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert checkpoint["step"] == 4 and all(v.isfinite().all() for v in checkpoint["model"].values())


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path, capsys):
    run_train(tmp_path, "--stop_step", "2")
    code = gs.main([*SMOKE, "--data_dir", str(tmp_path / "data"), "--out_dir", str(tmp_path / "out"), "--resume",
                    "--n_embd", "64"])
    assert code == 2
    assert "another model configuration: n_embd 32 (checkpoint) vs 64 (now)" in capsys.readouterr().err


# ---- user errors: one line, exit status 2 ----------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--stage_fracc", "0.25"], "unknown config key --stage_fracc (did you mean --stage_frac?)"),
    (["--batch_size", "abc"], "--batch_size expects an int, got 'abc'"),
    (["--match_tokens", "maybe"], "unexpected argument 'maybe'"),
    (["--stage_len", "2048"], "--stage_len must be in 1..block_size (1024), got 2048"),
    (["--stage_frac", "1.0"], "--stage_frac must be in [0, 1)"),
    (["--stage_frac=-0.1"], "--stage_frac must be in [0, 1)"),
    (["--micro_batch_size", "24"], "--batch_size 512 is not divisible by --micro_batch_size 24"),
    (["--preset", "tiny"], "unknown preset 'tiny'"),
    (["decode"], "unknown command 'decode'"),
    (["sample"], "this command needs a model: --ckpt out/x/ckpt.pt or --init_from"),
])
def test_config_errors_name_the_key(args, message, capsys):
    assert gs.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_config_error_exits_with_status_2_from_the_command_line():
    out = subprocess.run([sys.executable, "gpt_staged.py", "--n_layers", "4"], cwd=ROOT, env=ONE_THREAD,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip() == "error: unknown config key --n_layers (did you mean --n_layer?)"


def test_config_values_parse_by_type_and_presets_apply_first():
    command, config = gs.parse_args(["plan", "--stage_frac=0.25", "--learning_rate", "6e-4", "--match_tokens",
                                     "--bias", "false", "--preset", "cpu"])
    assert command == "plan" and config.stage_frac == 0.25 and config.match_tokens is True and config.bias is False
    assert config.n_layer == gs.PRESETS["cpu"]["n_layer"] and config.learning_rate == 6e-4  # flags beat the preset


@pytest.mark.parametrize("damage, message", [
    ("missing", "train.bin not found"),
    ("odd", "an odd count, so not a file of uint16 tokens"),
    ("truncated", "but meta.json says 60,000: the file is truncated or stale"),
    ("token", "token id 5000 >= --vocab_size 128"),
    ("short_val", "val.bin holds 40 tokens, fewer than one sample of block_size + 1 = 65"),
])
def test_bad_data_gives_a_clear_error(tmp_path, damage, message, capsys):
    data = make_bins(tmp_path / "data")
    train = data / "train.bin"
    if damage == "missing":
        train.unlink()
    elif damage == "odd":
        train.write_bytes(train.read_bytes() + b"\0")
    elif damage == "truncated":
        train.write_bytes(train.read_bytes()[:50_000])
    elif damage == "token":
        tokens = np.fromfile(train, dtype=np.uint16)
        tokens[:] = 5000
        tokens.tofile(train)
    elif damage == "short_val":
        np.zeros(40, dtype=np.uint16).tofile(data / "val.bin")
        meta = json.loads((data / "meta.json").read_text())
        (data / "meta.json").write_text(json.dumps({**meta, "val_tokens": 40}))
    code = gs.main([*SMOKE, "--data_dir", str(data), "--out_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and message in err, err
