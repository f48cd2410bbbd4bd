"""gpt_staged.py: every fault a user can cause ends in one clear line (the file or key, what to do) and a documented
exit status: 2 for input and the file system, 130 for Ctrl-C, 141 for a closed output pipe. (docs/hostile_trial.md
lists the trial these tests come from.)

Run: python -m pytest -q tests/test_faults_gpt.py
"""
import errno
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import gpt_staged as gs
from conftest import require_shared
from test_gpt_staged import SMOKE, make_bins
from test_reliability import ENV, ROOT, one_line_error


def args(tmp_path, *extra):
    return [*SMOKE, "--data_dir", str(tmp_path / "data"), "--out_dir", str(tmp_path / "out"), "--max_iters", "8",
            "--eval_interval", "4", *extra]


@pytest.fixture
def run_dir(tmp_path):
    make_bins(tmp_path / "data")
    assert gs.main(args(tmp_path, "--stop_step", "4")) == 0
    return tmp_path


def hf_folder(folder, **config):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"n_positions": 64, "vocab_size": 128, "n_layer": 1, "n_head": 2,
                                                    "n_embd": 32, **config}) if config.get("raw") is None
                                        else config["raw"])
    return folder


# ---- the file system --------------------------------------------------------------------------------------------

def test_an_out_dir_that_is_a_file(tmp_path, capsys):
    make_bins(tmp_path / "data")
    (tmp_path / "out").write_text("not a folder")
    one_line_error(gs.main(args(tmp_path)), capsys.readouterr().err, "out: File exists",
                   "a file stands where a folder is needed: choose another path")


@pytest.mark.parametrize("code, words", [(errno.EROFS, "the file system is read-only: choose another --out_dir"),
                                         (errno.ENOSPC, "the disk is full: free space, then continue with --resume"),
                                         (errno.EACCES, "permission denied")])
def test_os_errors_while_writing_are_one_line_with_the_path_and_the_remedy(tmp_path, monkeypatch, capsys, code,
                                                                           words):
    make_bins(tmp_path / "data")

    def fail(path, row):
        raise OSError(code, os.strerror(code), str(path))
    monkeypatch.setattr(gs, "append_jsonl", fail)
    one_line_error(gs.main(args(tmp_path)), capsys.readouterr().err, "log.jsonl: " + os.strerror(code), words)


def test_empty_folders_are_refused_rather_than_meaning_the_current_folder(tmp_path, capsys):
    one_line_error(gs.main([*SMOKE, "--out_dir", ""]), capsys.readouterr().err, "--out_dir is empty")
    one_line_error(gs.main([*SMOKE, "--data_dir=", "--out_dir", str(tmp_path)]), capsys.readouterr().err,
                   "--data_dir is empty")


def test_a_data_dir_that_is_a_file(tmp_path, capsys):
    (tmp_path / "data").write_text("x")
    one_line_error(gs.main(args(tmp_path)), capsys.readouterr().err, "data is a file: --data_dir takes the folder")


# ---- Ctrl-C ------------------------------------------------------------------------------------------------------

def interrupt_at(monkeypatch, at):
    real = gs.get_lr

    def get_lr(step, *rest):
        if step == at:
            raise KeyboardInterrupt
        return real(step, *rest)
    monkeypatch.setattr(gs, "get_lr", get_lr)


def test_ctrl_c_names_the_intact_checkpoint_and_how_to_continue(tmp_path, monkeypatch, capsys):
    make_bins(tmp_path / "data")
    interrupt_at(monkeypatch, 6)
    assert gs.main(args(tmp_path)) == 130
    err = capsys.readouterr().err
    assert err.strip() == (f"interrupted: {tmp_path / 'out' / 'ckpt.pt'} (step 4) is intact: continue with the same "
                           f"command and --resume") and "Traceback" not in err
    monkeypatch.undo()
    assert gs.main(args(tmp_path, "--resume")) == 0  # the advice works


def test_ctrl_c_before_the_first_checkpoint_says_so(tmp_path, monkeypatch, capsys):
    make_bins(tmp_path / "data")
    interrupt_at(monkeypatch, 2)
    assert gs.main(args(tmp_path)) == 130
    assert "no checkpoint was written yet" in capsys.readouterr().err


def test_a_closed_output_pipe_stops_quietly(tmp_path):
    make_bins(tmp_path / "data")
    run = subprocess.run(f"{sys.executable} gpt_staged.py plan --stage_frac 0.25 --num_samples 12574161 | head -1",
                         shell=True, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert run.stdout.startswith("plan: 12,574,161 samples") and run.stderr == ""


# ---- checkpoints recognized by what they hold -----------------------------------------------------------------

def ds2_like_checkpoint(path):
    torch.save({"model": {"shared.weight": torch.zeros(4, 2)}, "model_config": {"d_model": 2}, "config": {"seed": 1},
                "state": {"step": 3}, "optimizer": {}}, path)
    return path


def test_a_ds2_checkpoint_given_to_resume_or_sample_is_named(run_dir, capsys):
    ds2_like_checkpoint(run_dir / "out" / "ckpt.pt")
    one_line_error(gs.main(args(run_dir, "--resume")), capsys.readouterr().err,
                   "is a ds2.py checkpoint (a T5), not gpt_staged.py's: use it with ds2.py")
    one_line_error(gs.main(["sample", "--ckpt", str(run_dir / "out" / "ckpt.pt")]), capsys.readouterr().err,
                   "is a ds2.py checkpoint (a T5)")


def test_weights_without_optimizer_state_can_be_sampled_but_not_resumed(run_dir, capsys):
    path = run_dir / "out" / "ckpt.pt"
    checkpoint = torch.load(path, weights_only=True)
    torch.save({"model": checkpoint["model"], "config": checkpoint["config"]}, path)
    one_line_error(gs.main(args(run_dir, "--resume")), capsys.readouterr().err,
                   "holds weights without optimizer, scaler, step, tokens_seen, train_time_s",
                   "it can be sampled (sample --ckpt) but not resumed")


@pytest.mark.parametrize("what", ["folder", "fifo"])
def test_a_ckpt_or_text_file_that_is_not_a_regular_file(tmp_path, capsys, what):
    path = tmp_path / "thing"
    path.mkdir() if what == "folder" else os.mkfifo(path)
    words = "is a folder" if what == "folder" else "is not a regular file (a FIFO, socket or device)"
    one_line_error(gs.main(["sample", "--ckpt", str(path)]), capsys.readouterr().err, words, "give --ckpt")
    one_line_error(gs.main(["ppl", "--text_file", str(path), "--ckpt", "x.pt"]), capsys.readouterr().err, words,
                   "--text_file takes a UTF-8 text file")


# ---- Hugging Face folders validated like flags -----------------------------------------------------------------

@pytest.mark.parametrize("config, words", [
    (dict(n_head=3), "config.json: --n_embd 32 is not divisible by --n_head 3"),
    (dict(n_layer=0), "config.json: --n_layer must be positive, got 0"),
    (dict(n_layer="2"), "config.json: n_layer is '2', not a whole number"),
    (dict(raw="[1, 2]"), "not a GPT-2 config.json"),
    (dict(raw="{\"n_layer\": 2"), "config.json: not valid JSON"),
])
def test_a_hugging_face_config_is_validated_as_flags_are(tmp_path, capsys, config, words):
    folder = hf_folder(tmp_path / "gpt2", **config)
    one_line_error(gs.main(["sample", "--init_from", str(folder)]), capsys.readouterr().err, words)


def test_init_from_a_file_asks_for_the_folder(tmp_path, capsys):
    (tmp_path / "model.safetensors").write_bytes(b"x")
    one_line_error(gs.main(["sample", "--init_from", str(tmp_path / "model.safetensors")]), capsys.readouterr().err,
                   "is a file: give the folder holding config.json")


# ---- token ids outside the model ---------------------------------------------------------------------------------

def test_prompt_and_text_ids_beyond_the_models_vocabulary(run_dir, capsys):
    bpe = require_shared("gpt2_bpe")
    ckpt = str(run_dir / "out" / "ckpt.pt")
    one_line_error(gs.main(["sample", "--ckpt", ckpt, "--bpe_dir", str(bpe), "--prompt", "Hello"]),
                   capsys.readouterr().err, "--prompt: token id 15496 >= the model's vocabulary of 128")
    (run_dir / "t.txt").write_text("Hello world, hello again.")
    one_line_error(gs.main(["ppl", "--ckpt", ckpt, "--bpe_dir", str(bpe), "--text_file", str(run_dir / "t.txt")]),
                   capsys.readouterr().err, "t.txt: token id", ">= the model's vocabulary of 128")


# ---- metadata and logs read with the file's name ---------------------------------------------------------------

@pytest.mark.parametrize("meta, words", [("[1, 2]", "a JSON list, not the object data_owt.py writes"),
                                         ('{"vocab_size": "100"}', "vocab_size is '100', not a whole number"),
                                         ('{"train_tokens": -5}', "train_tokens is -5, not a whole number")])
def test_malformed_meta_json_is_named_before_any_work(tmp_path, capsys, meta, words):
    make_bins(tmp_path / "data")
    (tmp_path / "data" / "meta.json").write_text(meta)
    one_line_error(gs.main(args(tmp_path)), capsys.readouterr().err, "meta.json: " + words, "re-run data_owt.py")


@pytest.mark.parametrize("line, words", [('{"loss": 1.0}', "log.jsonl:2: a row without a step number"),
                                         ("[1, 2]", "log.jsonl:2: a row without a step number"),
                                         ('{"step": 3, "lo', "log.jsonl:2: not a JSON row")])
def test_a_damaged_log_line_is_named_with_its_line_number(run_dir, capsys, line, words):
    log = run_dir / "out" / "log.jsonl"
    rows = log.read_text().splitlines()
    log.write_text("\n".join([rows[0], line, *rows[1:]]) + "\n")
    one_line_error(gs.main(args(run_dir, "--resume")), capsys.readouterr().err, words, "remove the line")


def test_a_last_log_line_cut_after_a_nested_object_is_dropped(run_dir):
    log = run_dir / "out" / "log.jsonl"
    log.write_text(log.read_text() + '{"step": 5, "last_eval": {"val_loss": 1.0}')  # ends in } but is cut
    assert gs.main(args(run_dir, "--resume")) == 0
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines() if '"loss"' in line]
    assert steps == list(range(1, 9))


def test_extra_val_must_be_a_token_bin(tmp_path, capsys):
    one_line_error(gs.main([*SMOKE, "--extra_val", "book.txt"]), capsys.readouterr().err,
                   "--extra_val book.txt: takes a token bin made by data_owt.py", "use the ppl command")


@pytest.mark.parametrize("script", ["gpt_staged.py", "ds2.py"])
def test_help_lists_every_key_with_its_default_and_exits_0(script):
    run = subprocess.run([sys.executable, script, "sample" if script == "gpt_staged.py" else "train", "--help"],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stderr == ""
    module = gs if script == "gpt_staged.py" else __import__("ds2")
    for field in gs.dataclasses.fields(module.Config):
        assert f"  --{field.name} " in run.stdout, field.name
    assert "--block_size               1024" in run.stdout or "--d_model" in run.stdout
