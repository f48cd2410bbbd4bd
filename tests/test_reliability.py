"""Reliability and security (issue 6), as tests: a run killed with SIGKILL resumes to the same losses bit for bit, a
crash while a checkpoint is written keeps the previous one, data preparation killed midway leaves nothing that looks
complete, bad input gets one clear line and changes nothing on disk, a diverging loss stops the run, a pickle that
would run code is refused by every loader, and two gloo processes train like one.

Kills are real: `os.kill(pid, SIGKILL)` on a subprocess, either after polling its log.jsonl for N step rows (a
random N per run; the tests slow each batch read by 50 ms so that the kill lands while the run is busy) or by the
subprocess itself at a chosen point (a wrapper around one function sends SIGKILL to its own pid).

Run: python -m pytest -q tests/test_reliability.py   (CPU, smoke-size models, data made here + ../shared/data)
"""
import functools
import io
import json
import math
import os
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
import ds2
import gpt_staged as gs
from conftest import require_shared
from test_data_multiwoz import write_raw
from test_ds2 import write_data_dir
from test_gpt_staged import make_bins

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models: one thread is faster and the same in every process
SMOKE = ["--preset", "smoke", "--vocab_size", "128"]  # make_bins writes ids < 100



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
def get_batch(*args, **kwargs):  # 50 ms per batch read: the run is slow enough to be killed at a chosen step
    time.sleep(0.05)
    return real_get_batch(*args, **kwargs)
module.get_batch = get_batch
"""


def patch_in_process(monkeypatch, module, patch):
    """Run a wrapper's `patch` source on the imported module in this process, undone by monkeypatch."""
    class Module:
        def __getattr__(self, name):
            return getattr(module, name)

        def __setattr__(self, name, value):
            monkeypatch.setattr(module, name, value)
    exec(compile("import os, signal, sys, time\n" + patch, "<patch>", "exec"), {"module": Module()})


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
    # kill 1 after the stage switch (resumed at the checkpoint of step 6 or 9), kill 2 in the recycled match_tokens
    # extra steps (resumed at 12 or 15)
    kill_at = [random.randint(8, 11), random.randint(14, 16)]
    killed_at = [kill_after(command(out), log, kill_at[0]), kill_after(command(out, "--resume"), log, kill_at[1])]
    note = f"kill_at {kill_at}, killed after steps {killed_at}"
    assert 7 <= killed_at[0] <= 12 and 13 <= killed_at[1] < 18, note
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
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    train_gpt(folder, "--stop_step", "3")
    torch.set_num_threads(threads)
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
    "train_bin_tokenized_again": (lambda d: set_tokens(d / "data" / "train.bin", 7), [],
                                  ["ckpt.pt was trained on other data: train.bin was", "point --data_dir at the "
                                   "run's data"]),
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
        (d / "out" / "ckpt.pt").read_bytes()[:5000]), [],
        ["ckpt.pt: unreadable checkpoint", "is it cut off? Use another copy"]),
    "new_run_over_an_earlier_one": (None, ["--resume", "false"],
                                    ["ckpt.pt exists from an earlier run: continue it with --resume, or choose "
                                     "another --out_dir"]),
    "resume_without_checkpoint": (lambda d: (d / "out" / "ckpt.pt").unlink(), [],
                                  ["ckpt.pt not found: start the run without --resume"]),
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


# ================================================================================================================
# A NaN or infinite loss stops the run with a message and keeps the last good checkpoint. In float16 (autocast runs
# float16 on CPU too) the GradScaler comes first: a step whose gradients overflow is skipped, and the run goes on.

def test_gpt_fp16_gradient_overflow_is_skipped_by_the_grad_scaler_not_stopped(tmp_path, monkeypatch):
    make_bins(tmp_path / "data")
    # a loss scale of 2^20 (GradScaler's default: 2^16) overflows this model's float16 gradients (max 65504; it
    # still does at 2^19, measured): the scaler skips those steps, halving its scale each time, until they fit
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
    monkeypatch.undo()  # the message's advice works: resume with the other dtype (its GradScaler state differs)
    other = {"float32": "float16", "float16": "float32"}[dtype]
    assert gs.main(gpt_args(tmp_path, "--dtype", other, "--resume")) == 0, capsys.readouterr().err


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
    gs.load_checkpoint(malicious_checkpoint(tmp_path / "ckpt.pt", marker), gs.Config(), {})


def load_with_gpt_from_pretrained(tmp_path, marker):
    gs.GPT.from_pretrained(hf_folder(tmp_path / "gpt2", GPT2_CONFIG, marker))


def load_with_ds2_load_checkpoint(tmp_path, marker):
    ds2.load_checkpoint(malicious_checkpoint(tmp_path / "best.pt", marker))


def load_with_t5_from_pretrained(tmp_path, marker):
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


# ================================================================================================================
# Data preparation killed midway (SIGKILL, sent by the process to itself at a chosen point) leaves no output that
# looks complete; an earlier complete output survives a kill before the renames; re-running finishes the job.
# (tests/test_data_owt.py kills a fresh data_owt.py run from outside, by timing; these kill rebuilds at set points.)

KILL_AT_CALL = """
import functools
def kill_at(function, n, condition=lambda *args: True):
    calls = []
    @functools.wraps(function)
    def wrapped(*args, **kwargs):
        if condition(*args):
            calls.append(1)
            if len(calls) == n:
                os.kill(os.getpid(), signal.SIGKILL)
        return function(*args, **kwargs)
    return wrapped
"""


def run_killed(tmp_path, script, patch, args):
    run = subprocess.run([sys.executable, str(wrapper(tmp_path, script, KILL_AT_CALL + patch)), *map(str, args)],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == -signal.SIGKILL, run.stderr
    return run


def owt_args(out, *extra):
    return ["--input", str(out.parent / "docs"), "--bpe_dir", str(require_shared("gpt2_bpe")), "--out_dir",
            str(out), "--num_proc", "1", *extra]


@pytest.fixture(scope="module")
def owt_output(tmp_path_factory):
    """A complete data_owt.py output (out/) of 6 small documents (docs/)."""
    folder = tmp_path_factory.mktemp("owt")
    (folder / "docs").mkdir()
    for k in range(6):
        (folder / "docs" / f"{k}.txt").write_text(f"document {k} " * 50)
    assert data_owt.main(owt_args(folder / "out")) == 0
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("point, patch", [
    ("tokenizing", "module.write_tokens = kill_at(module.write_tokens, 3)"),
    ("publishing", "module.os.replace = kill_at(os.replace, 1, lambda src, dst: Path(dst).name == 'val.bin')\n"
                   "from pathlib import Path"),
], ids=["tokenizing", "publishing"])
def test_data_owt_killed_during_a_rebuild_leaves_nothing_half_done(tmp_path, owt_output, point, patch):
    shutil.copytree(owt_output, tmp_path, dirs_exist_ok=True)
    out, before = tmp_path / "out", snapshot(tmp_path / "out")
    old_meta = data_owt.read_complete_meta(out)
    run_killed(tmp_path, "data_owt.py", patch, owt_args(out, "--seed", "1"))  # a new split: a full rebuild
    if point == "tokenizing":  # before any rename: the earlier output is still complete and unchanged
        assert data_owt.read_complete_meta(out) == old_meta
        assert {p: b for p, b in snapshot(out).items() if not p.name.endswith(".tmp")} == before
    else:  # train.bin is the new one, val.bin the old one: meta.json is gone, so nothing claims to be complete
        assert data_owt.read_complete_meta(out) is None and not (out / "meta.json").exists()
        with pytest.raises(ValueError, match="data_owt.py was stopped while writing this folder"):
            gs.read_meta(out)  # and the trainer, which takes bins without meta.json (nanoGPT's), refuses these
    assert data_owt.main(owt_args(out, "--seed", "1")) == 0
    assert data_owt.main(owt_args(tmp_path / "reference", "--seed", "1")) == 0
    for name in ("train.bin", "val.bin"):
        assert (out / name).read_bytes() == (tmp_path / "reference" / name).read_bytes()
    assert not list(out.glob("*.tmp"))


def mwoz_args(data_dir, out, *extra):
    return ["--data_dir", str(data_dir), "--out_dir", str(out), "--spm_vocab_size", "120", *extra]


@pytest.fixture(scope="module")
def mwoz_output(tmp_path_factory):
    """MultiWOZ files (raw/, tests/test_data_multiwoz.py's dialogues) and a complete output made from them (out/)."""
    folder = tmp_path_factory.mktemp("mwoz")
    assert dm.main(mwoz_args(write_raw(folder / "raw"), folder / "out")) == 0
    return folder


def mwoz_files(out):
    """The output files ds2.py reads, without meta.json (it names the output folder and the run's arguments)."""
    return {p.name: p.read_bytes() for p in out.iterdir() if not p.name.endswith((".tmp", "meta.json"))}


@pytest.mark.slow
@pytest.mark.parametrize("point, patch", [
    ("writing_temporaries", "module.write_temp = kill_at(module.write_temp, 4)"),
    ("renaming", "module.os.replace = kill_at(os.replace, 3)"),
], ids=["writing_temporaries", "renaming"])
def test_data_multiwoz_killed_during_a_rebuild_leaves_nothing_half_done(tmp_path, mwoz_output, point, patch):
    shutil.copytree(mwoz_output, tmp_path, dirs_exist_ok=True)
    out, before = tmp_path / "out", snapshot(tmp_path / "out")
    rebuild = mwoz_args(tmp_path / "raw", out, "--prefix", "Summarize: ")  # other sources: every file changes
    run_killed(tmp_path, "data_multiwoz.py", patch, rebuild)
    if point == "writing_temporaries":  # before any rename: the earlier output is whole and unchanged
        assert {p: b for p, b in snapshot(out).items() if not p.name.endswith(".tmp")} == before
    else:  # some files renamed: meta.json, which is written last, is gone, and ds2.py refuses the folder
        assert not (out / "meta.json").exists()
        with pytest.raises(FileNotFoundError, match="a folder without it is incomplete"):
            ds2.read_meta(out)
    assert dm.main(rebuild) == 0
    assert dm.main(mwoz_args(tmp_path / "raw", tmp_path / "reference", "--prefix", "Summarize: ")) == 0
    assert mwoz_files(out) == mwoz_files(tmp_path / "reference")
    assert (out / "meta.json").exists() and not list(out.glob("*.tmp"))  # the killed run's temporaries are gone


# ---- bad input to the data scripts, run over a complete earlier output that must survive unchanged ------------

def owt_case(folder, case):
    """Extra flags for data_owt.py that make the input bad in one way."""
    bad = folder / "bad"
    bad.mkdir()
    if case == "empty_corpus":
        (bad / "blank.txt").write_text("")
        return ["--input", str(bad)]
    if case == "non_utf8_document_with_strict":
        (bad / "good.txt").write_text("fine text")
        (bad / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
        return ["--input", str(bad), "--strict"]
    if case == "input_missing":
        return ["--input", str(bad / "nowhere")]
    if case == "bpe_dir_without_the_bpe_files":  # with another seed: the output is not up to date
        return ["--bpe_dir", str(bad), "--seed", "1"]
    return {"unknown_flag": ["--val_frac", "0.1"], "value_out_of_range": ["--val_fraction", "1.5"],
            "value_of_the_wrong_type": ["--n_ctx", "long"]}[case]


OWT_BAD_INPUT = {
    "empty_corpus": ["empty corpus: no documents with text", "pass folders or files holding text"],
    "non_utf8_document_with_strict": ["latin1.txt: not UTF-8 at byte 3", "drop --strict to skip such files"],
    "input_missing": ["nowhere does not exist; --input takes folders and files of documents"],
    "bpe_dir_without_the_bpe_files": ["encoder.json not found: --bpe_dir must hold GPT-2's encoder.json"],
    "unknown_flag": ["unrecognized arguments: --val_frac 0.1 (did you mean --val_fraction?)"],
    "value_out_of_range": ["--val_fraction must be in (0, 1), got 1.5"],
    "value_of_the_wrong_type": ["argument --n_ctx: invalid int value: 'long'"],
}


@pytest.mark.parametrize("case", OWT_BAD_INPUT)
def test_data_owt_bad_input_is_one_line_and_keeps_the_earlier_output(tmp_path, owt_output, case, capsys):
    shutil.copytree(owt_output, tmp_path, dirs_exist_ok=True)
    args = owt_args(tmp_path / "out")
    flags = owt_case(tmp_path, case)
    for flag in flags:  # a flag given twice: argparse keeps the last
        if flag.startswith("--") and flag in args:
            del args[args.index(flag):args.index(flag) + 2]
    before = snapshot(tmp_path / "out", tmp_path / "docs")
    capsys.readouterr()
    one_line_error(data_owt.main(args + flags), capsys.readouterr().err, *OWT_BAD_INPUT[case])
    assert snapshot(tmp_path / "out", tmp_path / "docs") == before


def mwoz_case(folder, case):
    """(data_dir, extra flags) for data_multiwoz.py that make the input bad in one way."""
    raw = folder / "raw"
    if case == "non_utf8_file":
        (raw / "data.json").write_bytes((raw / "data.json").read_bytes().replace(b"Center", "Centr\u00e9".encode(
            "latin-1")))
    elif case == "empty_corpus":
        (raw / "data.json").write_text("{}")
    elif case == "value_not_a_string":
        data = json.loads((raw / "data.json").read_text())
        data["SNG0002.json"]["log"][1]["metadata"]["restaurant"]["semi"]["area"] = 7
        (raw / "data.json").write_text(json.dumps(data))
    elif case == "zip_cut_off":
        (raw / "MULTIWOZ2.1.zip").write_bytes(b"PK\x03\x04 cut off")
    elif case == "data_dir_missing":
        raw = folder / "nowhere"
    elif case == "spm_not_a_model":
        (folder / "spm.model").write_bytes(b"not a sentencepiece model")
        return raw, ["--spm", str(folder / "spm.model")]
    elif case == "spm_missing":
        return raw, ["--spm", str(folder / "t5.model")]
    return raw, []


MWOZ_BAD_INPUT = {
    "non_utf8_file": ["data.json: not UTF-8 at byte", "re-extract or re-download the file"],
    "empty_corpus": ["the train split is empty"],
    "value_not_a_string": ["dialogue SNG0002.json, turn 1 (system): metadata.restaurant.semi.area should be a "
                           "string, got 7"],
    "zip_cut_off": ["MULTIWOZ2.1.zip: not a valid zip archive (a partial download?); delete it and retry"],
    "data_dir_missing": ["nowhere is not a folder: point it at the MultiWOZ files"],
    "spm_not_a_model": ["spm.model: not a SentencePiece model"],
    "spm_missing": ["t5.model: no such file; give T5's spiece.model"],
}


@pytest.mark.parametrize("case", MWOZ_BAD_INPUT)
def test_data_multiwoz_bad_input_is_one_line_and_keeps_the_earlier_output(tmp_path, mwoz_output, case, capsys):
    shutil.copytree(mwoz_output, tmp_path, dirs_exist_ok=True)
    data_dir, flags = mwoz_case(tmp_path, case)
    before = snapshot(tmp_path / "out")
    capsys.readouterr()
    one_line_error(dm.main(mwoz_args(data_dir, tmp_path / "out", *flags)), capsys.readouterr().err,
                   *MWOZ_BAD_INPUT[case])
    assert snapshot(tmp_path / "out") == before


def test_data_multiwoz_value_of_the_wrong_type_is_rejected_by_argparse(tmp_path, mwoz_output, capsys):
    before = snapshot(mwoz_output / "out")
    with pytest.raises(SystemExit) as exit_info:
        dm.main(mwoz_args(mwoz_output / "raw", mwoz_output / "out", "--spm_vocab_size", "many"))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "error: argument --spm_vocab_size: invalid int value: 'many'" in err
    assert snapshot(mwoz_output / "out") == before


# ================================================================================================================
# ds2.py: crash and resume with early stopping, a crash while writing checkpoints, bad input, divergence

# Early stopping made certain: the wrapper reports a dev JGA of 0 and adds 2 x step to the validation loss, so the
# first evaluation (step 2) is the best and every later one is worse; with patience 3 the run stops after the
# evaluation of step 8 (steps 2, 4, 6, 8), long before max_iters 12. Batch reads are slowed by 50 ms, as for GPT.
DS2_EARLY_STOP = """
last_step = [0]
real_append, real_loss, real_evaluate = module.append_jsonl, module.estimate_loss, module.evaluate
def append_jsonl(path, row):
    if "loss" in row:
        last_step[0] = row["step"]
    return real_append(path, row)
def estimate_loss(*args, **kwargs):
    return real_loss(*args, **kwargs) + 2.0 * last_step[0]
def evaluate(*args, **kwargs):
    metrics, records = real_evaluate(*args, **kwargs)
    return {**metrics, "jga": 0.0}, records
module.append_jsonl, module.estimate_loss, module.evaluate = append_jsonl, estimate_loss, evaluate
"""
DS2_RUN = ["--preset", "smoke", "--max_iters", "12", "--eval_interval", "2", "--patience", "3"]


@pytest.fixture(scope="module")
def ds2_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ds2") / "data"
    write_data_dir(folder, require_shared("t5/spiece.model"), sizes=(("train", 28), ("dev", 14), ("test", 14)))
    return folder


def final_metrics(out):
    metrics = json.loads((out / "test_metrics.json").read_text())
    return {k: v for k, v in metrics.items() if k not in ("train_time_s", "config", "checkpoint", "eval_s")}


@pytest.mark.slow
def test_ds2_killed_at_random_steps_resumes_to_the_same_losses_and_early_stop(tmp_path, ds2_data, capsys):
    script = wrapper(tmp_path, "ds2.py", SLOW_BATCHES + DS2_EARLY_STOP)

    def command(out, *extra):
        return [sys.executable, str(script), *DS2_RUN, "--data_dir", str(ds2_data), "--out_dir", str(out), *extra]
    with pytest.MonkeyPatch.context() as monkeypatch:  # the uninterrupted run, in this process, one thread
        patch_in_process(monkeypatch, ds2, DS2_EARLY_STOP)
        assert ds2.main([*DS2_RUN, "--data_dir", str(ds2_data), "--out_dir", str(tmp_path / "whole")]) == 0
    assert "early stop: no better dev" in capsys.readouterr().out
    expected = read_rows(tmp_path / "whole" / "log.jsonl")
    assert [r["step"] for r in expected if "loss" in r] == list(range(1, 9))  # stopped early, after step 8

    out, log = tmp_path / "killed", tmp_path / "killed" / "log.jsonl"
    # kill 1 after the best evaluation (step 2), kill 2 with one or two evaluations without improvement behind it
    kill_at = [random.randint(3, 4), random.randint(6, 7)]
    killed_at = [kill_after(command(out), log, kill_at[0]), kill_after(command(out, "--resume"), log, kill_at[1])]
    note = f"kill_at {kill_at}, killed after steps {killed_at}"
    assert 3 <= killed_at[0] <= 5 and 6 <= killed_at[1] <= 8, note
    assert not (out / "test_metrics.json").exists(), note
    done = subprocess.run(command(out, "--resume"), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "early stop: no better dev" in done.stdout, note
    assert without_time(read_rows(log)) == without_time(expected), note
    best, expected_best = (torch.load(d / "best.pt", weights_only=True) for d in (out, tmp_path / "whole"))
    assert best["step"] == expected_best["step"] == 2, note
    for name, tensor in expected_best["model"].items():
        assert torch.equal(best["model"][name], tensor), name
    assert final_metrics(out) == final_metrics(tmp_path / "whole")


def ds2_args(data, out, *extra):
    return ["--preset", "smoke", "--data_dir", str(data), "--out_dir", str(out), *extra]


@pytest.fixture(scope="module")
def ds2_earlier_run(ds2_data):
    """out/ of a ds2.py run stopped at step 3 (ckpt.pt, best.pt of step 3, log.jsonl) beside data/."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    assert ds2.main(ds2_args(ds2_data, ds2_data.parent / "out", "--stop_step", "3")) == 0
    torch.set_num_threads(threads)
    return ds2_data.parent


@pytest.mark.parametrize("failure", ["write", "rename"])
def test_ds2_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, ds2_earlier_run, monkeypatch,
                                                                     failure):
    shutil.copytree(ds2_earlier_run, tmp_path, dirs_exist_ok=True)
    out = tmp_path / "out"
    before = snapshot(out)
    if failure == "write":
        save_fails_midway(monkeypatch, OSError(28, "No space left on device"))
    else:
        real_replace = os.replace

        def replace(src, dst):
            if Path(dst).name.endswith(".pt"):
                raise OSError(5, "Input/output error")
            real_replace(src, dst)
        monkeypatch.setattr(ds2.os, "replace", replace)
    with pytest.raises(OSError):
        ds2.train(ds2.parse_args(ds2_args(tmp_path / "data", out, "--resume"))[1])  # step 6: best.pt, ckpt.pt
    monkeypatch.undo()
    for name in ("ckpt.pt", "best.pt"):
        assert (out / name).read_bytes() == before[out / name]
        checkpoint = torch.load(out / name, weights_only=True)
        assert checkpoint.get("state", checkpoint)["step"] == 3
    assert sorted(p.name for p in out.glob("*.pt")) == ["best.pt", "ckpt.pt"]
    with open(out / "log.jsonl", "a") as log:  # a crash may also cut the log's last line short
        log.write('{"step": 7, "lo')
    assert ds2.main(ds2_args(tmp_path / "data", out, "--resume")) == 0  # and the run finishes from step 3
    assert [r["step"] for r in read_rows(out / "log.jsonl") if "loss" in r] == [1, 2, 3, 4, 5, 6]


def set_bin(path, value):
    tokens = np.fromfile(path, dtype=np.uint16)
    tokens[:] = value
    tokens.tofile(path)


def other_spm_checkpoint(folder):
    """best.pt of the earlier run, as if trained on another SentencePiece model's ids."""
    checkpoint = torch.load(folder / "out" / "best.pt", weights_only=True)
    torch.save({**checkpoint, "spm_sha256": "0" * 64}, folder / "other_spm.pt")


def bad_jsonl_state(folder):
    lines = (folder / "data" / "test.jsonl").read_text().splitlines()
    example = json.loads(lines[2])
    lines[2] = json.dumps({**example, "state": {**example["state"], "hotel-colour": "blue"}})
    (folder / "data" / "test.jsonl").write_text("\n".join(lines) + "\n")


DS2_BAD_INPUT = {  # case: (damage, flags, what the one line must say)
    "spm_model_does_not_match_the_bins": (
        lambda d, other: shutil.copy(other["mwoz"] / "out" / "spm.model", d / "data" / "spm.model"), ["--resume"],
        ["spm.model is missing or not the SentencePiece model meta.json names (sha256 differs): re-run "
         "data_multiwoz.py"]),
    "spm_model_missing": (lambda d, other: (d / "data" / "spm.model").unlink(), ["--resume"],
                          ["spm.model is missing or not the SentencePiece model meta.json names"]),
    "meta_json_missing": (lambda d, other: (d / "data" / "meta.json").unlink(), ["--resume"],
                          ["meta.json not found: make the data folder with data_multiwoz.py"]),
    "src_bin_odd_byte_length": (lambda d, other: (d / "data" / "train.src.bin").write_bytes(
        (d / "data" / "train.src.bin").read_bytes()[:-1]), ["--resume"],
        ["train.src.bin:", "not a file of uint16 tokens (empty or cut off?); re-run data_multiwoz.py"]),
    "tgt_bin_truncated": (lambda d, other: (d / "data" / "train.tgt.bin").write_bytes(
        (d / "data" / "train.tgt.bin").read_bytes()[:40]), ["--resume"],
        ["train.tgt.bin holds 20 tokens, not what train.idx.npy says (cut off?); re-run data_multiwoz.py"]),
    "token_id_at_least_vocab_size": (lambda d, other: set_bin(d / "data" / "dev.src.bin", 40000), ["--resume"],
                                     ["dev.src.bin: token id 40000 >= vocab_size 32000 of meta.json"]),
    "jsonl_line_malformed": (lambda d, other: (d / "data" / "dev.jsonl").write_text(
        (d / "data" / "dev.jsonl").read_text().replace('"turn"', "turn", 1)), ["--resume"],
        ["dev.jsonl line 1: not valid JSON", "re-run data_multiwoz.py"]),
    "validation_split_missing": (None, ["--resume", "--val_split", "valid"],
                                 ["valid.jsonl not found: no such split"]),
    "unknown_config_key": (None, ["--resume", "--patiense", "2"],
                           ["unknown config key --patiense (did you mean --patience?)"]),
    "value_of_the_wrong_type": (None, ["--resume", "--fewshot", "1%"], ["--fewshot expects a float, got '1%'"]),
    "batch_not_divisible_by_micro_batch": (None, ["--resume", "--micro_batch_size", "3"],
                                           ["--batch_size 8 is not divisible by"]),
    "checkpoint_cut_off": (lambda d, other: (d / "out" / "ckpt.pt").write_bytes(
        (d / "out" / "ckpt.pt").read_bytes()[:5000]), ["--resume"], ["ckpt.pt: unreadable checkpoint", "cut off"]),
    "checkpoint_of_another_spm": (lambda d, other: other_spm_checkpoint(d), ["--init_from", "{d}/other_spm.pt",
                                                                              "--out_dir", "{d}/new"],
                                  ["other_spm.pt was trained on token ids of another SentencePiece model",
                                   "prepare the data with the same --spm"]),
    "checkpoint_of_another_model": (lambda d, other: shutil.copy(other["gpt"] / "out" / "ckpt.pt", d / "gpt.pt"),
                                    ["--init_from", "{d}/gpt.pt", "--out_dir", "{d}/new"],
                                    ["gpt.pt is a gpt_staged.py checkpoint (a GPT-2), not ds2.py's"]),
    "new_run_over_an_earlier_one": (None, [], ["ckpt.pt exists from an earlier run: continue it with --resume"]),
    "state_with_an_unknown_slot": (lambda d, other: bad_jsonl_state(d), ["roundtrip", "--split", "test"],
                                   ["test.jsonl line 3", "unknown slot 'hotel-colour'"]),
}


@pytest.mark.parametrize("case", DS2_BAD_INPUT)
def test_ds2_bad_input_is_one_line_and_changes_nothing(tmp_path, ds2_earlier_run, mwoz_output, gpt_earlier_run,
                                                       case, capsys):
    damage, flags, needles = DS2_BAD_INPUT[case]
    shutil.copytree(ds2_earlier_run, tmp_path, dirs_exist_ok=True)
    if damage:
        damage(tmp_path, {"mwoz": mwoz_output, "gpt": gpt_earlier_run})
    flags = [flag.format(d=tmp_path) for flag in flags]
    command = [flags.pop(0)] if flags and not flags[0].startswith("--") else []
    before = snapshot(tmp_path / "data", tmp_path / "out")
    code = ds2.main(command + ds2_args(tmp_path / "data", tmp_path / "out") + flags)
    one_line_error(code, capsys.readouterr().err, *needles)
    assert snapshot(tmp_path / "data", tmp_path / "out") == before and not (tmp_path / "new").exists()


def test_ds2_weights_broken_right_before_a_checkpoint_do_not_overwrite_the_last_good_one(tmp_path, ds2_earlier_run,
                                                                                         monkeypatch, capsys):
    shutil.copytree(ds2_earlier_run, tmp_path, dirs_exist_ok=True)
    out = tmp_path / "out"
    before = {path: data for path, data in snapshot(out).items() if path.suffix == ".pt"}
    real_get_lr = ds2.get_lr
    # a NaN learning rate in step 6 (index 5) makes every weight NaN; step 6 evaluates and writes checkpoints
    monkeypatch.setattr(ds2, "get_lr", lambda step, *args: math.nan if step == 5 else real_get_lr(step, *args))
    code = ds2.main(ds2_args(tmp_path / "data", out, "--resume"))
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: ") and "nan" in err and "ckpt.pt is kept" in err, err
    assert {path: data for path, data in snapshot(out).items() if path.suffix == ".pt"} == before


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_ds2_infinite_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, ds2_earlier_run, monkeypatch,
                                                                       capsys, dtype):
    shutil.copytree(ds2_earlier_run, tmp_path, dirs_exist_ok=True)
    out = tmp_path / "out"
    saved = (out / "ckpt.pt").read_bytes()
    forward = ds2.T5.forward

    def diverged(self, src, labels):
        logits, loss = forward(self, src, labels)
        return logits, loss * math.inf
    monkeypatch.setattr(ds2.T5, "forward", diverged)
    code = ds2.main(ds2_args(tmp_path / "data", out, "--resume", "--dtype", dtype))
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: loss is inf at step 3") and "ckpt.pt is kept" in err, err
    assert (out / "ckpt.pt").read_bytes() == saved
