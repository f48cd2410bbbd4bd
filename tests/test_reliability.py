"""Reliability and security (issue 6), as tests: a run killed with SIGKILL resumes to the same losses bit for bit, a
crash while a checkpoint is written keeps the previous one, data preparation killed midway leaves nothing that looks
complete, bad input gets one clear line and changes nothing on disk, a diverging loss stops the run, a pickle that
would run code is refused by every loader, and two gloo processes train like one.

Kills are real: `os.kill(pid, SIGKILL)` on a subprocess, either after polling its log.jsonl for N step rows (a
random N per run; the tests slow each batch read by 30 ms so that the kill lands while the run is busy) or by the
subprocess itself at a chosen point (a wrapper around one function sends SIGKILL to its own pid).

Run: python -m pytest -q tests/test_reliability.py   (CPU, smoke-size models, data made here + ../shared/data)
"""
import functools
import json
import math
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import data_multiwoz as dm
import data_owt
import gpt_staged as gs
from conftest import require_shared
from test_data_multiwoz import write_raw
from test_gpt_staged import make_bins

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models: one thread is faster and the same in every process
SMOKE = ["--preset", "smoke", "--vocab_size", "128"]  # make_bins writes ids < 100


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def snapshot(*folders):
    """{path: bytes} of every file under the folders: 'nothing already written lost or half-overwritten'."""
    return {p: p.read_bytes() for folder in folders if folder.exists() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def read_rows(path):
    """The complete rows of a log.jsonl (a run killed while writing may leave a cut last line)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def without_time(rows):
    return [{k: v for k, v in row.items() if k not in ("dt", "eval_s", "tokens_per_s")} for row in rows]


def wrapper(tmp_path, script, patch):
    """A Python file that imports `script` as a module, runs `patch` (source text), then the script's main():
    the script's own code runs unchanged in a real process, with one function wrapped by the test."""
    path = tmp_path / f"wrap_{script}"
    path.write_text(f"import os, signal, sys, time\nsys.path.insert(0, {str(ROOT)!r})\n"
                    f"import {script.removesuffix('.py')} as module\n{patch}\nsys.exit(module.main())\n")
    return path


SLOW_BATCHES = """
real_get_batch = module.get_batch
def get_batch(*args, **kwargs):  # 30 ms per batch read: the run is slow enough to be killed at a chosen step
    time.sleep(0.03)
    return real_get_batch(*args, **kwargs)
module.get_batch = get_batch
"""


def kill_after(command, log_path, rows, timeout=120):
    """Start `command`, wait until log_path holds `rows` step rows, SIGKILL it; returns the last step row seen."""
    process = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + timeout
    try:
        while len([r for r in read_rows(log_path) if "loss" in r]) < rows:
            assert process.poll() is None, f"the run ended before step {rows}: {process.stderr.read().decode()}"
            assert time.time() < deadline, f"no step {rows} after {timeout} s"
            time.sleep(0.005)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL
    return max(r["step"] for r in read_rows(log_path) if "loss" in r)


# ================================================================================================================
# Crash and resume: gpt_staged.py

# 12 main steps, half at context 16 (steps 1-6), then 64 (7-12); match_tokens with recycle adds 6 extra
# full-context steps (13-18) that re-read the short steps' samples. Checkpoints every 3 steps: 3, 6, ..., 18.
GPT_RUN = [*SMOKE, "--max_iters", "12", "--stage_frac", "0.5", "--match_tokens", "--recycle", "--eval_interval", "3"]


@pytest.mark.slow
def test_gpt_killed_at_random_steps_resumes_to_the_same_losses(tmp_path):
    data = make_bins(tmp_path / "data")
    script = wrapper(tmp_path, "gpt_staged.py", SLOW_BATCHES)

    def command(out, *extra):
        return [sys.executable, str(script), *GPT_RUN, "--data_dir", str(data), "--out_dir", str(out), *extra]
    _, config = gs.parse_args([*GPT_RUN, "--data_dir", str(data), "--out_dir", str(tmp_path / "whole")])
    gs.train(config)  # the uninterrupted run, in this process (one thread, as the subprocesses)
    expected = read_rows(tmp_path / "whole" / "log.jsonl")
    assert [r["step"] for r in expected if "loss" in r] == list(range(1, 19))
    assert [r["ctx"] for r in expected if "loss" in r] == [16] * 6 + [64] * 12

    out, log = tmp_path / "killed", tmp_path / "killed" / "log.jsonl"
    # kill 1 in the short stage, kill 2 after the stage switch, kill 3 in the recycled match_tokens extra steps
    kill_at = [random.randint(4, 5), random.randint(8, 11), random.randint(14, 17)]
    killed_at = [kill_after(command(out), log, kill_at[0])]
    for rows in kill_at[1:]:
        killed_at.append(kill_after(command(out, "--resume"), log, rows))
    note = f"kill_at {kill_at}, killed after steps {killed_at}"
    assert killed_at[0] < 7 and 7 <= killed_at[1] <= 12 and 13 <= killed_at[2] < 18, note
    assert not (out / "results.jsonl").exists(), note
    done = subprocess.run(command(out, "--resume"), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "resumed from" in done.stdout
    # every row: step losses (CPU float32: bitwise), lr, ctx, tokens and the evaluations, each once, in order
    assert without_time(read_rows(log)) == without_time(expected), note
    result, expected_result = (json.loads((d / "results.jsonl").read_text()) for d in (out, tmp_path / "whole"))
    assert (result["val_loss"], result["tokens_seen"]) == (expected_result["val_loss"], expected_result["tokens_seen"])


def gpt_args(tmp_path, *extra):
    return [*SMOKE, "--data_dir", str(tmp_path / "data"), "--out_dir", str(tmp_path / "out"), "--max_iters", "8",
            "--eval_interval", "3", *extra]


def train_gpt(tmp_path, *extra):
    _, config = gs.parse_args(gpt_args(tmp_path, *extra))
    return gs.train(config)


def save_fails_midway(monkeypatch, error):
    """torch.save writes the first half of the checkpoint's bytes, then raises (a full disk, a crash)."""
    real_save = torch.save

    def half_save(obj, f, *args, **kwargs):
        import io
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        f.write(buffer.getvalue()[:len(buffer.getvalue()) // 2])
        f.flush()
        raise error
    monkeypatch.setattr(torch, "save", half_save)


@pytest.mark.parametrize("failure", ["write", "rename"])
def test_gpt_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch, failure):
    make_bins(tmp_path / "data")
    train_gpt(tmp_path, "--stop_step", "3")
    ckpt = tmp_path / "out" / "ckpt.pt"
    before = ckpt.read_bytes()
    if failure == "write":
        save_fails_midway(monkeypatch, OSError(28, "No space left on device"))
    else:
        real_replace = os.replace

        def replace(src, dst):
            if Path(dst).name == "ckpt.pt":
                raise OSError(5, "Input/output error")
            real_replace(src, dst)
        monkeypatch.setattr(gs.os, "replace", replace)
    with pytest.raises(OSError):
        train_gpt(tmp_path, "--resume")  # steps 4-6, then the checkpoint of step 6 fails
    monkeypatch.undo()
    assert ckpt.read_bytes() == before
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert checkpoint["step"] == 3
    assert [p.name for p in (tmp_path / "out").iterdir() if p.name.endswith(".pt")] == ["ckpt.pt"]  # the temporary
    # is ckpt.pt.tmp, which nothing loads; a resume continues from step 3 and finishes
    result = train_gpt(tmp_path, "--resume")
    assert result["steps"] == 8
    assert [r["step"] for r in read_rows(tmp_path / "out" / "log.jsonl") if "loss" in r] == list(range(1, 9))


# ================================================================================================================
# Bad input: one line `error: ...` naming the thing and what to do, exit status 2, every file already written
# unchanged. Each case runs against a folder holding an earlier run (data + out_dir with ckpt.pt and log.jsonl).

def one_line_error(code, err, *needles):
    assert code == 2, err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


@pytest.fixture(scope="module")
def gpt_earlier_run(tmp_path_factory):
    """data/ (make_bins) and out/ stopped at step 3 with ckpt.pt, log.jsonl: what a user's folder holds."""
    folder = tmp_path_factory.mktemp("gpt_run")
    make_bins(folder / "data")
    torch.set_num_threads(1)
    train_gpt(folder, "--stop_step", "3")
    return folder


def set_tokens(path, value):
    tokens = np.fromfile(path, dtype=np.uint16)
    tokens[:] = value
    tokens.tofile(path)


def short_val(data):
    np.zeros(40, dtype=np.uint16).tofile(data / "val.bin")
    meta = json.loads((data / "meta.json").read_text())
    (data / "meta.json").write_text(json.dumps({**meta, "val_tokens": 40}))


GPT_BAD_INPUT = {  # case: (damage to the folder, extra flags, what the one line must say)
    "train_bin_missing": (lambda d: (d / "data" / "train.bin").unlink(), [],
                          ["train.bin not found", "make the token bins with data_owt.py"]),
    "train_bin_truncated": (lambda d: (d / "data" / "train.bin").write_bytes(
        (d / "data" / "train.bin").read_bytes()[:50_000]), [],
        ["train.bin holds 25,000 tokens but meta.json says 60,000", "truncated or stale; re-run data_owt.py"]),
    "bin_odd_byte_length": (lambda d: (d / "data" / "train.bin").write_bytes(
        (d / "data" / "train.bin").read_bytes() + b"\0"), [],
        ["train.bin: 120,001 bytes, an odd count, so not a file of uint16 tokens", "re-run data_owt.py"]),
    "token_id_at_least_vocab_size": (lambda d: set_tokens(d / "data" / "train.bin", 5000), [],
                                     ["train.bin: token id 5000 >= --vocab_size 128", "re-run data_owt.py"]),
    "val_shorter_than_one_sample": (lambda d: short_val(d / "data"), [],
                                    ["val.bin holds 40 tokens, fewer than one sample of block_size + 1 = 65",
                                     "use more text or a smaller --block_size"]),
    "meta_json_not_json": (lambda d: (d / "data" / "meta.json").write_text("{\"vocab_size\": 1"), [],
                           ["meta.json: not valid JSON", "re-run data_owt.py"]),
    "stage_len_above_block_size": (None, ["--stage_frac", "0.25", "--stage_len", "65"],
                                   ["--stage_len must be in 1..block_size (64), got 65"]),
    "stage_len_zero": (None, ["--stage_frac", "0.25", "--stage_len", "0"], ["--stage_len must be in 1..block_size"]),
    "stage_frac_one": (None, ["--stage_frac", "1"], ["--stage_frac must be in [0, 1)", "got 1.0"]),
    "stage_frac_negative": (None, ["--stage_frac=-0.25"], ["--stage_frac must be in [0, 1)", "got -0.25"]),
    "unknown_config_key": (None, ["--stage_fracc", "0.25"],
                           ["unknown config key --stage_fracc (did you mean --stage_frac?)"]),
    "value_of_the_wrong_type": (None, ["--max_iters", "ten"], ["--max_iters expects an int, got 'ten'"]),
    "batch_not_divisible_by_micro_batch_x_world": (None, ["--micro_batch_size", "3"],
                                                   ["--batch_size 8 is not divisible by --micro_batch_size 3 x 1",
                                                    "change --micro_batch_size or --batch_size"]),
    "checkpoint_of_another_model": (None, ["--n_embd", "64"],
                                    ["ckpt.pt is from another model configuration: n_embd 32 (checkpoint) vs 64 "
                                     "(now)", "resume with the run's own settings or use another --out_dir"]),
    "checkpoint_cut_off": (lambda d: (d / "out" / "ckpt.pt").write_bytes(
        (d / "out" / "ckpt.pt").read_bytes()[:5000]), [], ["ckpt.pt: unreadable checkpoint", "is it cut off? Use another copy"]),
    "new_run_over_an_earlier_one": (None, ["--resume", "false"],
                                    ["ckpt.pt exists from an earlier run: continue it with --resume, or choose "
                                     "another --out_dir"]),
    "resume_without_checkpoint": (lambda d: (d / "out" / "ckpt.pt").unlink(), [],
                                  ["ckpt.pt not found; start the run without --resume"]),
}


@pytest.mark.parametrize("case", GPT_BAD_INPUT)
def test_gpt_bad_input_is_one_line_and_changes_nothing(tmp_path, gpt_earlier_run, case, capsys):
    damage, flags, needles = GPT_BAD_INPUT[case]
    shutil.copytree(gpt_earlier_run, tmp_path, dirs_exist_ok=True)
    if damage:
        damage(tmp_path)
    before = snapshot(tmp_path)
    code = gs.main(gpt_args(tmp_path, "--resume", *flags))
    one_line_error(code, capsys.readouterr().err, *needles)
    assert snapshot(tmp_path) == before


def test_gpt_bad_input_exits_with_status_2_from_the_command_line(tmp_path, gpt_earlier_run):
    shutil.copytree(gpt_earlier_run, tmp_path, dirs_exist_ok=True)
    (tmp_path / "data" / "val.bin").write_bytes(b"\0" * 41)
    before = snapshot(tmp_path)
    run = subprocess.run([sys.executable, "gpt_staged.py", *gpt_args(tmp_path, "--resume")], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=120)
    one_line_error(run.returncode, run.stderr, "val.bin: 41 bytes, an odd count")
    assert snapshot(tmp_path) == before


# ================================================================================================================
# A NaN or infinite loss stops the run with a message and keeps the last good checkpoint. In float16 (autocast runs
# float16 on CPU too) the GradScaler comes first: a step whose gradients overflow is skipped, and the run goes on.

def test_gpt_fp16_gradient_overflow_is_skipped_by_the_grad_scaler_not_stopped(tmp_path, monkeypatch):
    make_bins(tmp_path / "data")
    # a loss scale of 2^20 (GradScaler's default: 2^16) overflows this model's float16 gradients (max 65504; it
    # still does at 2^18, measured): the scaler skips those steps, halving its scale each time, until they fit
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=2.0 ** 20))
    result = train_gpt(tmp_path, "--dtype", "float16")
    assert result["steps"] == 8
    checkpoint = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert checkpoint["scaler"]["scale"] < 2.0 ** 20  # steps were skipped
    assert checkpoint["scaler"]["_growth_tracker"] > 0  # and the last ones were taken
    assert all(v.isfinite().all() for v in checkpoint["model"].values())
    rows = read_rows(tmp_path / "out" / "log.jsonl")
    assert all(math.isfinite(r.get("loss", r.get("val_loss"))) for r in rows)
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]  # the steps after the skips did train


def poison_loss(monkeypatch, at_call, value):
    """The training loss of the at_call-th training forward pass becomes `value` (evaluation passes untouched)."""
    forward, calls = gs.GPT.forward, []

    def patched(self, idx, targets=None):
        logits, loss = forward(self, idx, targets)
        if self.training and targets is not None:
            calls.append(1)
            if len(calls) == at_call:
                loss = loss * value
        return logits, loss
    monkeypatch.setattr(gs.GPT, "forward", patched)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_gpt_infinite_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys, dtype):
    make_bins(tmp_path / "data")
    poison_loss(monkeypatch, at_call=9, value=math.inf)  # 2 micro-batches per step: step 5's first one
    code = gs.main(gpt_args(tmp_path, "--dtype", dtype))
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: loss is inf in step 5") and "ckpt.pt is kept" in err, err
    checkpoint = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert checkpoint["step"] == 3 and all(v.isfinite().all() for v in checkpoint["model"].values())
    assert max(r["step"] for r in read_rows(tmp_path / "out" / "log.jsonl")) == 4  # step 5 was not logged


def test_gpt_weights_broken_right_before_a_checkpoint_do_not_overwrite_the_last_good_one(tmp_path, monkeypatch,
                                                                                         capsys):
    make_bins(tmp_path / "data")
    real_get_lr = gs.get_lr
    # a NaN learning rate in step 6 (index 5) makes every weight NaN; step 6 is also a checkpoint step
    monkeypatch.setattr(gs, "get_lr", lambda step, *args: math.nan if step == 5 else real_get_lr(step, *args))
    code = gs.main(gpt_args(tmp_path))
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: ") and "nan" in err and "ckpt.pt is kept" in err, err
    checkpoint = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert checkpoint["step"] == 3 and all(v.isfinite().all() for v in checkpoint["model"].values())


# ================================================================================================================
# Security: a checkpoint whose pickle would run code is refused by every loader, and the code does not run

class RunsCode:
    """Unpickling this calls os.system('touch MARKER'): what a malicious checkpoint from a stranger does."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def malicious_checkpoint(path, marker):
    torch.save({"model": {"wte.weight": torch.zeros(2)}, "config": {"n_layer": 2}, "payload": RunsCode(marker)}, path)
    return path


def test_the_crafted_checkpoint_does_run_code_without_weights_only(tmp_path):
    marker = tmp_path / "ran"  # the control: the file the other tests refuse is really dangerous
    torch.load(malicious_checkpoint(tmp_path / "evil.pt", marker), weights_only=False)
    assert marker.exists()


def hf_folder(folder, config, marker):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    malicious_checkpoint(folder / "pytorch_model.bin", marker)
    return folder


GPT2_CONFIG = dict(n_positions=64, vocab_size=128, n_layer=2, n_head=2, n_embd=32)
T5_CONFIG = dict(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2)


def load_with_gpt_load_checkpoint(tmp_path, marker):
    gs.load_checkpoint(malicious_checkpoint(tmp_path / "ckpt.pt", marker), gs.Config())


def load_with_gpt_from_pretrained(tmp_path, marker):
    gs.GPT.from_pretrained(hf_folder(tmp_path / "gpt2", GPT2_CONFIG, marker))


def load_with_ds2_load_checkpoint(tmp_path, marker):
    import ds2
    ds2.load_checkpoint(malicious_checkpoint(tmp_path / "best.pt", marker))


def load_with_t5_from_pretrained(tmp_path, marker):
    import ds2
    ds2.T5.from_pretrained(hf_folder(tmp_path / "t5", T5_CONFIG, marker))


@pytest.mark.parametrize("loader", [load_with_gpt_load_checkpoint, load_with_gpt_from_pretrained,
                                    load_with_ds2_load_checkpoint, load_with_t5_from_pretrained],
                         ids=lambda f: f.__name__.removeprefix("load_with_"))
def test_a_pickle_that_would_run_code_is_refused_by_every_loader(tmp_path, loader):
    marker = tmp_path / "ran"
    with pytest.raises(ValueError, match=r"refused: .*a pickle that could run code"):
        loader(tmp_path, marker)
    assert not marker.exists()


def test_resume_from_a_malicious_checkpoint_is_one_line_and_runs_nothing(tmp_path, gpt_earlier_run, capsys):
    shutil.copytree(gpt_earlier_run, tmp_path, dirs_exist_ok=True)
    marker = tmp_path / "ran"
    malicious_checkpoint(tmp_path / "out" / "ckpt.pt", marker)
    before = snapshot(tmp_path)
    code = gs.main(gpt_args(tmp_path, "--resume"))
    one_line_error(code, capsys.readouterr().err, "ckpt.pt: refused", "a pickle that could run code")
    assert not marker.exists() and snapshot(tmp_path) == before


# ================================================================================================================
# Distributed: torchrun with 2 processes on CPU (gloo) trains like one process with the same global batch

RECORD_RANKS = """
import json
log = open(os.environ["RANK_EVENTS"] + "." + os.environ.get("RANK", "0"), "a")
real_get_batch, real_save, real_append = module.get_batch, module.save_checkpoint, module.append_jsonl
def get_batch(path, indices, *args, **kwargs):  # which samples this rank reads
    if path.name == "train.bin":
        log.write(json.dumps({"samples": [int(i) for i in indices]}) + "\\n")
        log.flush()
    return real_get_batch(path, indices, *args, **kwargs)
def save_checkpoint(path, *args, **kwargs):  # which files this rank writes
    log.write(json.dumps({"save": path.name}) + "\\n")
    log.flush()
    return real_save(path, *args, **kwargs)
def append_jsonl(path, *args, **kwargs):
    log.write(json.dumps({"append": path.name}) + "\\n")
    log.flush()
    return real_append(path, *args, **kwargs)
module.get_batch, module.save_checkpoint, module.append_jsonl = get_batch, save_checkpoint, append_jsonl
"""
DDP_RUN = [*SMOKE, "--max_iters", "6", "--stage_frac", "0.5", "--eval_interval", "3", "--micro_batch_size", "4"]


def torchrun(tmp_path, out, *extra):
    script = wrapper(tmp_path, "gpt_staged.py", RECORD_RANKS)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), *DDP_RUN, "--data_dir", str(tmp_path / "data"), "--out_dir", str(out), *extra],
                          cwd=ROOT, env={**ENV, "RANK_EVENTS": str(tmp_path / "events")}, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_two_gloo_processes_train_like_one_and_only_rank_0_writes(tmp_path):
    make_bins(tmp_path / "data")
    _, config = gs.parse_args([*DDP_RUN, "--data_dir", str(tmp_path / "data"), "--out_dir", str(tmp_path / "one")])
    gs.train(config)  # one process: 8 sequences = 4 x 2 micro-steps; two processes: 4 x 1 micro-step x 2
    run = torchrun(tmp_path, tmp_path / "two")
    assert run.returncode == 0, run.stderr[-3000:]
    one, two = (read_rows(tmp_path / d / "log.jsonl") for d in ("one", "two"))
    assert [r["step"] for r in two] == [r["step"] for r in one] == [0, 1, 2, 3, 3, 4, 5, 6, 6]  # each row once
    for a, b in zip(one, two):
        assert b.get("loss", b.get("val_loss")) == pytest.approx(a.get("loss", a.get("val_loss")), abs=1e-5), a
        assert (b.get("ctx"), b["tokens"]) == (a.get("ctx"), a["tokens"])
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["ckpt.pt", "log.jsonl", "results.jsonl"]
    assert run.stdout.count("step 1/6 |") == 1 and run.stdout.count("resumed") == 0  # rank 0 prints, once
    events = {rank: [json.loads(line) for line in (tmp_path / f"events.{rank}").read_text().splitlines()]
              for rank in (0, 1)}
    assert not [e for e in events[1] if "samples" not in e]  # rank 1 wrote no checkpoint and no log row
    assert {e["save"] for e in events[0] if "save" in e} == {"ckpt.pt"}
    reads = [[e["samples"] for e in events[rank] if "samples" in e] for rank in (0, 1)]
    assert len(reads[0]) == len(reads[1]) == 6  # one micro-batch of 4 per rank and step
    for step, (rank0, rank1) in enumerate(zip(*reads)):
        assert not set(rank0) & set(rank1)  # disjoint, and together exactly the batch one process reads
        assert rank0 + rank1 == gs.batch_indices(step, config.seed, 937, 8).tolist()


@pytest.mark.slow
def test_batch_not_divisible_by_micro_batch_times_world_size_under_torchrun(tmp_path, gpt_earlier_run):
    shutil.copytree(gpt_earlier_run, tmp_path, dirs_exist_ok=True)
    before = snapshot(tmp_path / "data", tmp_path / "out")
    run = torchrun(tmp_path, tmp_path / "out", "--micro_batch_size", "8", "--resume")  # 8 sequences, 2 x 8 read
    assert run.returncode != 0
    # each process prints the one line and exits 2; what follows is torchrun's own report of the failed children
    ours = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert ours and ours[0].startswith("error: --batch_size 8 is not divisible by --micro_batch_size 8 x 2 "
                                       "process(es) = 16") and "change --micro_batch_size or --batch_size" in ours[0]
    assert "exitcode  : 2" in run.stderr and 'gpt_staged.py", line' not in run.stderr  # no traceback of ours
    assert snapshot(tmp_path / "data", tmp_path / "out") == before
