"""data_owt.py and data_multiwoz.py: every fault a user can cause ends in one clear line (the path, what stands
there, what to do) and a documented exit status: 2 for input and the file system, 130 for Ctrl-C, 141 for a closed
output pipe; and what the user meant is done when it can be (a file given twice is read once, a symlinked folder
is followed). tools/hostile_trial.py runs the same faults as commands.

Run: python -m pytest -q tests/test_faults_data.py
"""
import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import data_multiwoz as dm
import data_owt
from conftest import require_shared
from test_data_multiwoz import DIALOGUES, write_per_split, write_raw

ROOT = Path(__file__).resolve().parents[1]


def one_line(status, err, *needles):
    assert status == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, (status, err)
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


# ================================================================================================================
# data_owt.py

def texts(folder, names="abc"):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / f"{name}.txt").write_text(f"Document {name}: the quick brown fox. " * 30)
    return folder


def owt(capsys, *args, bpe_dir=None):
    """data_owt.main in this process, one worker; returns (status, stdout, stderr)."""
    status = data_owt.main([*map(str, args), "--bpe_dir", str(bpe_dir or require_shared("gpt2_bpe")),
                            "--num_proc", "1"])
    out, err = capsys.readouterr()
    return status, out, err


def documents(out_dir):
    meta = json.loads((out_dir / "meta.json").read_text())
    return meta["train_documents"] + meta["val_documents"]


@pytest.mark.parametrize("out_dir, setup, needle", [
    ("out", lambda t: (t / "out").write_text("x"), "out: File exists; a file stands where a folder is needed"),
    ("f/out", lambda t: (t / "f").write_text("x"), "f/out: Not a directory; a file stands where a folder is needed"),
    ("out", lambda t: (t / "out" / "train.bin").mkdir(parents=True),
     "out/train.bin: Is a directory; a folder stands where a file is needed"),
    ("/proc/owt", lambda t: None, "/proc/owt: No such file or directory; it is not there, and cannot be made"),
])
def test_owt_out_dir_where_the_file_system_says_no_is_one_line(tmp_path, capsys, out_dir, setup, needle):
    setup(tmp_path)  # before: FileExistsError / NotADirectoryError tracebacks, a folder found only at publish
    path = out_dir if out_dir.startswith("/") else tmp_path / out_dir
    one_line(*owt(capsys, "--input", texts(tmp_path / "texts"), "--out_dir", path)[::2], f"error: {tmp_path}/"
             * (not out_dir.startswith("/")) + needle)
    assert not list(tmp_path.glob("out/*.tmp")) and not list(tmp_path.glob("out/parts.*"))


def test_owt_disk_full_is_named_and_the_cleanup_does_not_hide_it(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "train.bin.tmp").symlink_to("/dev/full")  # every write: ENOSPC, the close's flush too
    status, _, err = owt(capsys, "--input", texts(tmp_path / "texts"), "--out_dir", tmp_path / "out")
    one_line(status, err, "out: no space left on device; the disk is full: free some space",
             "no new output was published")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []  # before: OSError from f.close() in finally


@pytest.mark.parametrize("flag", ["--input", "--out_dir", "--bpe_dir"])
def test_owt_an_empty_path_is_refused_not_read_as_the_current_folder(tmp_path, capsys, flag, monkeypatch):
    monkeypatch.chdir(texts(tmp_path / "texts"))  # before: --input "" tokenized this folder, --out_dir "" wrote here
    args = {"--input": str(tmp_path / "texts"), "--out_dir": str(tmp_path / "out"), flag: ""}
    status = data_owt.main([f"{k}={v}" for k, v in args.items()] + ["--num_proc", "1"] +
                           ([] if flag == "--bpe_dir" else ["--bpe_dir", str(require_shared("gpt2_bpe"))]))
    one_line(status, capsys.readouterr().err, f"{flag} is an empty path")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["texts"]


def test_owt_a_file_reached_by_two_paths_is_read_once_and_named(tmp_path, capsys):
    folder = texts(tmp_path / "texts", "ab")
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "alias.txt").symlink_to(folder / "a.txt")
    status, out, err = owt(capsys, "--input", folder, f"{tmp_path}/links/../texts/a.txt", tmp_path / "links",
                           "--out_dir", tmp_path / "out")
    assert status == 0, err  # before: 4 documents, a.txt with three ids (and on both sides of the split)
    assert documents(tmp_path / "out") == 2
    assert f"links/../texts/a.txt (the same file as {folder / 'a.txt'}: its documents are read once)" in out
    assert f"alias.txt (the same file as {folder / 'a.txt'}: its documents are read once)" in out


def test_owt_a_symlinked_folder_is_followed_and_a_link_loop_ends(tmp_path, capsys):
    texts(tmp_path / "elsewhere", "de")
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "more").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "texts" / "loop").symlink_to(tmp_path / "texts", target_is_directory=True)
    status, out, err = owt(capsys, "--input", tmp_path / "texts", "--out_dir", tmp_path / "out")
    assert status == 0, err  # before: "empty corpus" (rglob does not enter a symlinked folder)
    assert documents(tmp_path / "out") == 2
    assert f"not read: {tmp_path / 'texts' / 'loop'} (the same folder as {tmp_path / 'texts'}: its files" in out


def test_owt_a_fifo_is_named_as_such(tmp_path, capsys):
    os.mkfifo(tmp_path / "pipe")
    status, _, err = owt(capsys, "--input", tmp_path / "pipe", "--out_dir", tmp_path / "out")
    one_line(status, err, "pipe is not a regular file (a FIFO, socket or device)")  # before: "does not exist"
    folder = texts(tmp_path / "texts")
    os.mkfifo(folder / "stream.txt")  # inside a folder: not read (it would block), but named
    status, out, err = owt(capsys, "--input", folder, "--out_dir", tmp_path / "out")
    assert status == 0 and documents(tmp_path / "out") == 3, err
    assert "not read: " in out and "stream.txt (not a regular file" in out


@pytest.mark.parametrize("case, needle", [
    ("a_file", "bpe is a file, not a folder"),
    ("encoder_a_folder", "encoder.json is a folder"),  # before: "not found"
    ("encoder_cut_off", "encoder.json: not GPT-2's encoder.json (Unterminated string"),  # before: no file named
])
def test_owt_bpe_dir_faults_name_the_file(tmp_path, capsys, case, needle):
    bpe = tmp_path / "bpe"
    if case == "a_file":
        bpe.write_text("x")
    else:
        bpe.mkdir()
        (bpe / "vocab.bpe").write_text("#version: 0.2\n")
        if case == "encoder_a_folder":
            (bpe / "encoder.json").mkdir()
        else:
            (bpe / "encoder.json").write_text('{"!": 0, "#')
    data_owt.encoding_from_bpe_dir.cache_clear()
    one_line(*owt(capsys, "--input", texts(tmp_path / "texts"), "--out_dir", tmp_path / "out", bpe_dir=bpe)[::2],
             needle)


def test_owt_jsonl_record_that_is_a_list_is_named_with_file_and_line(tmp_path, capsys):
    (tmp_path / "docs.jsonl").write_text('{"text": "one"}\n[1, 2]\n{"text": "three"}\n')
    one_line(*owt(capsys, "--input", tmp_path / "docs.jsonl", "--out_dir", tmp_path / "out", "--strict")[::2],
             "docs.jsonl:2: not a JSON object with a string field 'text'")


def test_owt_ctrl_c_is_one_line_saying_nothing_was_published(tmp_path, capsys, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(data_owt, "write_bins", interrupted)
    status, _, err = owt(capsys, "--input", texts(tmp_path / "texts"), "--out_dir", tmp_path / "out")
    assert status == 130 and err.startswith("interrupted: ") and len(err.splitlines()) == 1, err
    assert "nothing new published" in err and list((tmp_path / "out").iterdir()) == []


def test_owt_ctrl_c_during_the_renames_waits_for_them_and_says_the_output_is_complete(tmp_path, capsys,
                                                                                     monkeypatch):
    real_replace, calls = os.replace, []

    def replace(src, dst):
        if not calls:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C between train.bin and val.bin
        calls.append(dst)
        return real_replace(src, dst)
    monkeypatch.setattr(data_owt.os, "replace", replace)
    status, _, err = owt(capsys, "--input", texts(tmp_path / "texts"), "--out_dir", tmp_path / "out")
    assert status == 130 and "was written in full just before the stop" in err, err  # before: "nothing new
    assert documents(tmp_path / "out") == 3 and len(calls) == 3  # published", with meta.json gone and half the bins


def closed_pipe_run(script, *args, cwd=ROOT):
    """Run a script with its stdout a pipe whose reader is already gone (`... | head` after head quit)."""
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd, stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=120,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    finally:
        os.close(write)
    return done.returncode, done.stderr


def test_owt_closed_output_pipe_exits_141_quietly(tmp_path):
    code, err = closed_pipe_run("data_owt.py", "--input", texts(tmp_path / "texts"), "--bpe_dir",
                                require_shared("gpt2_bpe"), "--num_proc", 1, "--out_dir", tmp_path / "out")
    assert code == 141 and err == "", err  # before: a BrokenPipeError traceback


@pytest.mark.parametrize("module", [data_owt, dm])
@pytest.mark.parametrize("code, needle", [
    (errno.EROFS, "/x: Read-only file system; a read-only file system: pass an --out_dir on a writable disk"),
    (errno.ENOSPC, "/x: No space left on device; the disk is full"),
    (errno.EACCES, "/x: Permission denied; permission denied: pass paths you may read"),
])
def test_os_errors_become_the_path_the_cause_and_a_remedy(module, code, needle):
    assert module.os_error_line(OSError(code, os.strerror(code), "/x")).startswith(needle)


# ================================================================================================================
# data_multiwoz.py

def mwoz(capsys, data_dir, out_dir, *extra):
    """data_multiwoz.main in this process with T5's SentencePiece model; returns (status, stdout, stderr)."""
    status = dm.main(["--data_dir", str(data_dir), "--out_dir", str(out_dir), "--spm",
                      str(require_shared("t5/spiece.model")), *map(str, extra)])
    out, err = capsys.readouterr()
    return status, out, err


def test_mwoz_a_dialogue_in_two_split_files_is_refused_naming_both(tmp_path, capsys):
    data = write_per_split(tmp_path / "data")  # val: MUL0003, PMUL0001; test: SNG0002
    (data / "test.json").write_text(json.dumps({"SNG0002": DIALOGUES["SNG0002.json"],
                                                "MUL0003": DIALOGUES["MUL0003.json"]}))
    status, _, err = mwoz(capsys, data, tmp_path / "out", "--train_from_dev", "0.5")
    one_line(status, err, "test.json: dialogue MUL0003.json is also in", "val.json.zip:val.json",
             "remove it from one of the files")  # before: it moved to test without a word
    assert not (tmp_path / "out").exists()


def test_mwoz_an_id_in_both_split_lists_is_refused_naming_both(tmp_path, capsys):
    data = write_raw(tmp_path / "raw")
    (data / "valListFile.json").write_text("MUL0003.json\nSNG0002\n")  # also in testListFile, without ".json"
    one_line(*mwoz(capsys, data, tmp_path / "out")[::2], "dialogue SNG0002.json is also in",
             "valListFile.json; a dialogue belongs to one split")


@pytest.mark.parametrize("out_dir, setup, needle", [
    ("out", lambda t: (t / "out").write_text("x"), "out: File exists; a file stands where a folder is needed"),
    ("f/out", lambda t: (t / "f").write_text("x"), "f/out: Not a directory; a file stands where a folder is needed"),
    ("out", lambda t: (t / "out" / "train.jsonl").mkdir(parents=True),
     "out/train.jsonl: Is a directory; a folder stands where a file is needed"),
])
def test_mwoz_out_dir_where_the_file_system_says_no_is_one_line(tmp_path, capsys, out_dir, setup, needle,
                                                                  monkeypatch):
    setup(tmp_path)
    monkeypatch.chdir(tmp_path)
    one_line(*mwoz(capsys, write_raw(tmp_path / "raw"), out_dir)[::2], needle)
    assert not list(tmp_path.glob("out/*.tmp"))


@pytest.mark.parametrize("make, needle", [
    (lambda p: p.mkdir(), "t5.model is a folder"),  # before: "no such file"
    (os.mkfifo, "t5.model is not a regular file (a FIFO"),
    (lambda p: p.write_bytes(b""), "t5.model: an empty file (0 bytes)"),  # before: "pad/eos ids are -1/-1"
])
def test_mwoz_spm_that_is_not_a_model_file_says_what_it_is(tmp_path, capsys, make, needle):
    make(tmp_path / "t5.model")
    status = dm.main(["--data_dir", str(write_raw(tmp_path / "raw")), "--out_dir", str(tmp_path / "out"),
                      "--spm", str(tmp_path / "t5.model")])
    one_line(status, capsys.readouterr().err, needle)


@pytest.mark.parametrize("make", [lambda p: p.mkdir(), os.mkfifo])
def test_mwoz_a_folder_or_fifo_where_a_multiwoz_file_belongs_is_named(tmp_path, capsys, make):
    data = write_raw(tmp_path / "raw")
    (data / "testListFile.json").unlink()
    make(data / "testListFile.json")  # before: read as missing ("needs valListFile and testListFile")
    one_line(*mwoz(capsys, data, tmp_path / "out")[::2], "testListFile.json is ",
             "where a MultiWOZ file is expected")


def test_mwoz_summarization_faults_name_the_file(tmp_path, capsys):
    dsum = tmp_path / "dsum"
    dsum.mkdir()
    row = json.dumps({"fname": "dev_0", "dialogue": "#Person1#: Hi.\n#Person2#: Hello.", "summary": "Greetings."})
    (dsum / "dialogsum.dev.jsonl").write_text(f"{row}\n[1, 2]\n")
    status, _, err = mwoz(capsys, dsum, tmp_path / "out", "--summarization", "dialogsum", "--train_from_dev", "0.5")
    one_line(status, err, "dialogsum.dev.jsonl: record 2 is a JSON list, not an object")  # before: AttributeError
    (dsum / "dialogsum.dev.jsonl").unlink()
    (dsum / "dialogsum.dev.jsonl").mkdir()
    status, _, err = mwoz(capsys, dsum, tmp_path / "out", "--summarization", "dialogsum", "--train_from_dev", "0.5")
    one_line(status, err, "dialogsum.dev.jsonl is a folder, where the dialogsum dev file is expected")


@pytest.mark.parametrize("flags, needle", [
    (["--train_from_dev", "1.5"], "--train_from_dev expects a fraction of the dev dialogues in (0, 1), got 1.5"),
    (["--out_dir="], "--out_dir is an empty path"),  # before: written into the current folder
    (["--data_dir="], "--data_dir is an empty path"),
])
def test_mwoz_argument_errors_are_one_line(flags, needle, capsys):
    with pytest.raises(SystemExit) as exit_info:  # before: argparse's usage block, then the error
        dm.parse_args(flags)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert needle in err


def test_mwoz_ctrl_c_is_one_line_and_the_output_is_untouched(tmp_path, capsys, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(dm, "add_summaries", interrupted)
    status, _, err = mwoz(capsys, write_raw(tmp_path / "raw"), tmp_path / "out")
    assert status == 130 and err.startswith("interrupted: nothing was published") and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()  # before: a KeyboardInterrupt traceback


def test_mwoz_ctrl_c_during_the_renames_waits_for_them_and_says_the_output_is_complete(tmp_path, capsys,
                                                                                      monkeypatch):
    real_replace, calls = os.replace, []

    def replace(src, dst):
        if not calls:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C between the first and the second rename
        calls.append(dst)
        return real_replace(src, dst)
    monkeypatch.setattr(dm.os, "replace", replace)
    status, _, err = mwoz(capsys, write_raw(tmp_path / "raw"), tmp_path / "out")
    assert status == 130 and "was written in full just before the stop" in err, err
    assert (tmp_path / "out" / "meta.json").exists() and len(calls) == 14  # 12 split files, spm.model, meta.json


def test_mwoz_closed_output_pipe_exits_141_quietly(tmp_path):
    code, err = closed_pipe_run("data_multiwoz.py", "--data_dir", write_raw(tmp_path / "raw"), "--out_dir",
                                tmp_path / "out", "--spm", require_shared("t5/spiece.model"))
    assert code == 141 and err == "", err  # before: "error: [Errno 32] Broken pipe" (a ConnectionError)
