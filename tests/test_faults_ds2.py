"""ds2.py: every fault a user can cause ends in one clear line (the file, line or key, what to do) and a documented
exit status: 2 for input and the file system, 130 for Ctrl-C, 141 for a closed output pipe.

Run: python -m pytest -q tests/test_faults_ds2.py
"""
import errno
import json
import os
import shutil

import pytest
import torch

import ds2
from conftest import require_shared
from test_reliability import one_line_error


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """data/ and out/ of a smoke run stopped after step 3 (ckpt.pt, best.pt, log.jsonl)."""
    from test_ds2 import write_data_dir
    folder = tmp_path_factory.mktemp("ds2faults")
    write_data_dir(folder / "data", require_shared("t5/spiece.model"))
    assert ds2.main(["--preset", "smoke", "--data_dir", str(folder / "data"), "--out_dir", str(folder / "out"),
                     "--stop_step", "3"]) == 0
    return folder


@pytest.fixture
def run(stopped, tmp_path):
    shutil.copytree(stopped, tmp_path / "run")
    return tmp_path / "run"


def args(folder, *extra):
    return ["--preset", "smoke", "--data_dir", str(folder / "data"), "--out_dir", str(folder / "out"), *extra]


# ---- checkpoints recognized by what they hold -----------------------------------------------------------------

def test_best_pt_copied_to_ckpt_pt_cannot_be_resumed_and_says_why(run, capsys):
    shutil.copy(run / "out" / "best.pt", run / "out" / "ckpt.pt")
    one_line_error(ds2.main(args(run, "--resume")), capsys.readouterr().err,
                   "holds weights without the optimizer and training state (a best.pt?)", "not resumed")


def test_a_gpt_staged_checkpoint_is_named(run, capsys):
    torch.save({"model": {"transformer.wte.weight": torch.zeros(2)}, "config": {"n_layer": 1}, "step": 1},
               run / "out" / "ckpt.pt")
    one_line_error(ds2.main(args(run, "--resume")), capsys.readouterr().err,
                   "is a gpt_staged.py checkpoint (a GPT-2), not ds2.py's")


# ---- Hugging Face folders validated like flags -----------------------------------------------------------------

T5_SMALL = {"vocab_size": 32128, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 1, "num_heads": 2}


@pytest.mark.parametrize("config, words", [
    (dict(T5_SMALL, num_heads=0), "config.json: --num_heads must be positive, got 0"),
    (dict(T5_SMALL, num_layers="6"), "config.json: num_layers is '6', not a whole number"),
    ([1, 2], "config.json: a JSON list, not a T5 config.json"),
    ('{"d_model": 5', "config.json: not valid JSON"),
])
def test_a_t5_config_is_validated_as_flags_are(run, capsys, config, words):
    (run / "t5").mkdir()
    (run / "t5" / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    one_line_error(ds2.main(["evaluate", *args(run, "--init_from", str(run / "t5"))]), capsys.readouterr().err,
                   words)


# ---- data read with the file's name and line, before any long work ----------------------------------------------

@pytest.mark.parametrize("line, words", [("[1, 2]", "dev.jsonl line 2: not a JSON object"),
                                         ('{"dialogue_id": "a", "turn": 0, "summary": "x", "domains": []}',
                                          "dev.jsonl line 2: no valid state")])
def test_a_bad_record_is_named_with_its_line_before_decoding(run, capsys, line, words):
    path = run / "data" / "dev.jsonl"
    rows = path.read_text().splitlines()
    path.write_text("\n".join([rows[0], line, *rows[2:]]) + "\n")
    one_line_error(ds2.main(args(run, "--resume")), capsys.readouterr().err, words, "re-run data_multiwoz.py")


@pytest.mark.parametrize("meta, words", [("[1]", "not a meta.json of data_multiwoz.py"),
                                         ('{"vocab_size": "32000", "spm": {}}', "not a meta.json of data_multiwoz.py")])
def test_malformed_meta_json(run, capsys, meta, words):
    (run / "data" / "meta.json").write_text(meta)
    one_line_error(ds2.main(args(run, "--resume")), capsys.readouterr().err, "meta.json: " + words)


def test_a_damaged_log_line_is_named(run, capsys):
    log = run / "out" / "log.jsonl"
    rows = log.read_text().splitlines()
    log.write_text("\n".join([rows[0], '{"loss": 1}', *rows[1:]]) + "\n")
    one_line_error(ds2.main(args(run, "--resume")), capsys.readouterr().err, "log.jsonl:2: a row without a step")


# ---- the file system and Ctrl-C ---------------------------------------------------------------------------------

def test_an_out_dir_that_is_a_file_and_a_data_dir_that_is_a_file(run, capsys):
    (run / "outfile").write_text("x")
    one_line_error(ds2.main(["--preset", "smoke", "--data_dir", str(run / "data"), "--out_dir",
                             str(run / "outfile")]), capsys.readouterr().err, "File exists",
                   "a file stands where a folder is needed")
    one_line_error(ds2.main(["--preset", "smoke", "--data_dir", str(run / "outfile")]), capsys.readouterr().err,
                   "is a file: --data_dir takes the folder")
    one_line_error(ds2.main(["--preset", "smoke", "--out_dir="]), capsys.readouterr().err, "--out_dir is empty")


def test_a_full_disk_is_one_line_with_the_path(run, monkeypatch, capsys):
    def fail(path, row):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    monkeypatch.setattr(ds2, "append_jsonl", fail)
    one_line_error(ds2.main(args(run, "--resume")), capsys.readouterr().err, "log.jsonl: No space left on device",
                   "the disk is full")


def test_ctrl_c_names_the_intact_checkpoint(run, monkeypatch, capsys):
    real = ds2.get_lr

    def get_lr(step, *rest):
        if step == 4:
            raise KeyboardInterrupt
        return real(step, *rest)
    monkeypatch.setattr(ds2, "get_lr", get_lr)
    assert ds2.main(args(run, "--resume")) == 130
    err = capsys.readouterr().err
    assert err.strip() == (f"interrupted: {run / 'out' / 'ckpt.pt'} (step 3) is intact: continue with the same "
                           f"command and --resume")
