"""The hostile trial: faults a user can cause, each run as a real command in a scratch folder, recorded as it ends.

    python tools/hostile_trial.py                      # every case; writes docs/hostile_trial.md
    python tools/hostile_trial.py --only gpt_staged    # one script's cases

A case is CLEAN when the command ends with a documented exit status (2 for input and the file system, 130 for
Ctrl-C, 141 for a closed output pipe) and one `error: ...` or `interrupted: ...` line, without a traceback; OK when
it does what the user meant (exit 0). Anything else is a FAIL and the script exits 1. Each case names the scenario
it builds, so a row can be reproduced by hand. (tests/test_faults_gpt.py checks the same behaviours one by one.)
"""
import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SHARED_DATA", ROOT.parent / "shared" / "data"))
SMOKE = "--preset smoke --vocab_size 128"
RUN = f"{SMOKE} --data_dir data --out_dir out --max_iters 8 --eval_interval 4"


# ---- scenarios: what the scratch folder holds before the command runs --------------------------------------------

def bins(folder):
    """data/: a smoke-size token stream (ids < 100) with meta.json."""
    data = folder / "data"
    data.mkdir(exist_ok=True)
    pattern = np.random.default_rng(0).integers(0, 100, size=37)
    for name, n in (("train", 60_000), ("val", 3_000)):
        np.resize(pattern, n).astype(np.uint16).tofile(data / f"{name}.bin")
    (data / "meta.json").write_text(json.dumps({"vocab_size": 100, "train_tokens": 60_000, "val_tokens": 3_000}))


def stopped_run(folder):
    """data/ and out/ of a run stopped after step 4 (ckpt.pt, log.jsonl)."""
    bins(folder)
    subprocess.run([sys.executable, str(ROOT / "gpt_staged.py"), *shlex.split(RUN), "--stop_step", "4"], cwd=folder,
                   check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def write(path, text):
    def setup(folder):
        stopped_run(folder) if path.startswith("out/") else bins(folder)
        target = folder / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    return setup


def gpt2_config(**fields):
    def setup(folder):
        (folder / "gpt2").mkdir()
        config = {"n_positions": 64, "vocab_size": 128, "n_layer": 1, "n_head": 2, "n_embd": 32, **fields}
        (folder / "gpt2" / "config.json").write_text(fields.get("raw") or json.dumps(config))
    return setup


def torch_save(path, make):
    def setup(folder):
        import torch
        stopped_run(folder)
        torch.save(make(torch, torch.load(folder / "out" / "ckpt.pt", weights_only=True)), folder / path)
    return setup


def log_line(line, at=1):
    def setup(folder):
        stopped_run(folder)
        log = folder / "out" / "log.jsonl"
        rows = log.read_text().splitlines()
        log.write_text("\n".join(rows[:at] + [line] + rows[at:]) + "\n")
    return setup


def both(*setups):
    def setup(folder):
        for s in setups:
            s(folder)
    return setup


def fifo(name):
    def setup(folder):
        os.mkfifo(folder / name)
    return setup


def folder_named(name):
    def setup(folder):
        (folder / name).mkdir()
    return setup


def file_named(name, text="x"):
    def setup(folder):
        (folder / name).write_text(text)
    return setup


def nothing(folder):
    pass


# ---- scenarios of data_owt.py and data_multiwoz.py ---------------------------------------------------------------

GUTENBERG, T5_SPM, MWOZ = SHARED / "text_corpus" / "gutenberg", SHARED / "t5" / "spiece.model", SHARED / "multiwoz"
OWT = f"--bpe_dir {SHARED / 'gpt2_bpe'} --num_proc 1"
DOCUMENTS = ("python3 -c \"import json, sys; m = json.load(open('out/meta.json')); "
             "sys.exit(m['train_documents'] + m['val_documents'] != {})\"")  # how many documents were kept
MWOZ_RUN = f"--data_dir mwoz --spm {T5_SPM} --out_dir out --train_from_dev 0.5"


def texts(folder):
    """texts/: three short documents (a.txt, b.txt, c.txt)."""
    (folder / "texts").mkdir(exist_ok=True)
    for name in "abc":
        (folder / "texts" / f"{name}.txt").write_text(f"Document {name}: the quick brown fox. " * 30)


def symlinked_folder(folder):
    """texts/ holding only a symlink `more` to a folder of two documents outside it."""
    (folder / "elsewhere").mkdir()
    for name in "de":
        (folder / "elsewhere" / f"{name}.txt").write_text(f"Document {name} lives in a linked folder. " * 30)
    (folder / "texts").mkdir()
    (folder / "texts" / "more").symlink_to(folder / "elsewhere", target_is_directory=True)


def interrupt_after(seconds, setup):
    """A Ctrl-C case whose command makes no checkpoint: SIGINT `seconds` after the start, in the middle of the work."""
    def interrupted(folder):  # a new function each time: an attribute on a shared setup would be overwritten
        setup(folder)
    interrupted.interrupt_after = seconds
    return interrupted


def mwoz(dev=8, test=4, edit=None, raw=False):
    """mwoz/: the first `dev` and `test` dialogues of the real MultiWOZ 2.1 val.json.zip / test.json.zip, as
    val.json + test.json (per-split layout) or data.json + valListFile + testListFile (raw layout, with
    raw=True); edit(splits) changes {"val": {id: dialogue}, "test": {...}, "lists": {...}} first."""
    def setup(folder):
        import zipfile
        splits = {}
        for name, n in (("val", dev), ("test", test)):
            with zipfile.ZipFile(MWOZ / "convlab2_mwz21" / f"{name}.json.zip") as archive:
                splits[name] = dict(list(json.loads(archive.read(f"{name}.json")).items())[:n])
        splits["lists"] = {"valListFile": list(splits["val"]), "testListFile": list(splits["test"])}
        if edit:
            edit(splits)
        data = folder / "mwoz"
        data.mkdir()
        if raw:
            (data / "data.json").write_text(json.dumps({**splits["val"], **splits["test"]}))
            for name, ids in splits["lists"].items():
                (data / name).write_text("\n".join(ids) + "\n")
        else:
            for name in ("val", "test"):
                (data / f"{name}.json").write_text(json.dumps(splits[name]))
    return setup


def first_val_dialogue_also_in_test(splits):
    key = next(iter(splits["val"]))
    splits["test"][key] = splits["val"][key]


def first_test_id_also_in_the_dev_list(splits):
    splits["lists"]["valListFile"].append(splits["lists"]["testListFile"][0])


def dialogsum(record):
    """dsum/: DialogSum's dev file (5 records) with `record` (a raw JSON line) as line 3, and a test file."""
    def setup(folder):
        (folder / "dsum").mkdir()
        rows = [json.dumps({"fname": f"dev_{i}", "dialogue": "#Person1#: Hello.\n#Person2#: Hi there.",
                            "summary": "They greet."}) for i in range(5)]
        rows[2] = record
        (folder / "dsum" / "dialogsum.dev.jsonl").write_text("\n".join(rows) + "\n")
        (folder / "dsum" / "dialogsum.test.jsonl").write_text("\n".join(rows[:2]) + "\n")
    return setup


# ---- the cases: (script, what the user did, setup, arguments, expected outcome) ----------------------------------

BPE = f"--bpe_dir {SHARED / 'gpt2_bpe'}"
# ---- ds2.py scenarios: a smoke data folder (test_ds2.write_data_dir) and a run stopped after step 3 -------------

DS2_RUN = "--preset smoke --data_dir data --out_dir out"


def ds2_data(folder):
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    from test_ds2 import write_data_dir
    write_data_dir(folder / "data", SHARED / "t5" / "spiece.model")


def ds2_stopped(folder):
    ds2_data(folder)
    subprocess.run([sys.executable, str(ROOT / "ds2.py"), *shlex.split(DS2_RUN), "--stop_step", "3"], cwd=folder,
                   check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def ds2_line(path, line):
    def setup(folder):
        ds2_stopped(folder)
        target = folder / path
        rows = target.read_text().splitlines()
        target.write_text("\n".join(rows[:1] + [line] + rows[2:]) + "\n")
    return setup


def t5_config(text):
    def setup(folder):
        ds2_data(folder)
        (folder / "t5").mkdir()
        (folder / "t5" / "config.json").write_text(text)
    return setup


T5 = {"vocab_size": 32128, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 1, "num_heads": 2}


CASES = [
    ("gpt_staged", "--out_dir is an existing file", both(bins, file_named("out")), RUN, "CLEAN"),
    ("gpt_staged", "--out_dir inside a file", both(bins, file_named("f")), f"{RUN} --out_dir f/out", "CLEAN"),
    ("gpt_staged", "--out_dir on a read-only file system (/proc)", bins, f"{RUN} --out_dir /proc/staged", "CLEAN"),
    ("gpt_staged", "--out_dir empty", nothing, f"{SMOKE} --out_dir=", "CLEAN"),
    ("gpt_staged", "--data_dir empty", nothing, f"{SMOKE} --data_dir=", "CLEAN"),
    ("gpt_staged", "--data_dir is a file", file_named("data"), RUN, "CLEAN"),
    ("gpt_staged", "Ctrl-C during training (SIGINT after the first checkpoint)", bins,
     f"{RUN} --max_iters 400 --eval_interval 2", "SIGINT"),
    ("gpt_staged", "closed output pipe (plan | head -1)", nothing,
     "plan --stage_frac 0.25 --num_samples 12574161 | head -1", "OK"),
    ("gpt_staged", "a ds2.py checkpoint as ckpt.pt, --resume",
     torch_save("out/ckpt.pt", lambda torch, c: {"model": {"shared.weight": torch.zeros(2)}, "model_config": {},
                                                 "config": {}, "state": {}}), f"{RUN} --resume", "CLEAN"),
    ("gpt_staged", "a ds2.py checkpoint to sample --ckpt",
     torch_save("t5.pt", lambda torch, c: {"model": {"shared.weight": torch.zeros(2)}, "model_config": {}}),
     "sample --ckpt t5.pt", "CLEAN"),
    ("gpt_staged", "weights only (no optimizer) as ckpt.pt, --resume",
     torch_save("out/ckpt.pt", lambda torch, c: {"model": c["model"], "config": c["config"]}), f"{RUN} --resume",
     "CLEAN"),
    ("gpt_staged", "a list saved as a checkpoint", torch_save("list.pt", lambda torch, c: [1, 2]),
     "sample --ckpt list.pt", "CLEAN"),
    ("gpt_staged", "--ckpt is a folder", folder_named("ck"), "sample --ckpt ck", "CLEAN"),
    ("gpt_staged", "--text_file is a FIFO", both(stopped_run, fifo("pipe")),
     "ppl --ckpt out/ckpt.pt --text_file pipe", "CLEAN"),
    ("gpt_staged", "--text_file is a folder", both(stopped_run, folder_named("texts")),
     "ppl --ckpt out/ckpt.pt --text_file texts", "CLEAN"),
    ("gpt_staged", "--text_file is not UTF-8", both(stopped_run, lambda f: (f / "b.txt").write_bytes(b"\xff\xfe\x00")),
     "ppl --ckpt out/ckpt.pt --text_file b.txt", "CLEAN"),
    ("gpt_staged", "GPT-2 config.json: n_head does not divide n_embd", gpt2_config(n_head=3),
     "sample --init_from gpt2", "CLEAN"),
    ("gpt_staged", "GPT-2 config.json is a JSON list", gpt2_config(raw="[1, 2]"), "sample --init_from gpt2",
     "CLEAN"),
    ("gpt_staged", "GPT-2 config.json is cut off", gpt2_config(raw='{"n_layer": 2'), "sample --init_from gpt2",
     "CLEAN"),
    ("gpt_staged", "GPT-2 config.json with n_layer \"2\" (a string)", gpt2_config(n_layer="2"),
     "sample --init_from gpt2", "CLEAN"),
    ("gpt_staged", "GPT-2 config.json with n_embd 0", gpt2_config(n_embd=0), "sample --init_from gpt2", "CLEAN"),
    ("gpt_staged", "--init_from the weights file instead of its folder", file_named("model.safetensors"),
     "sample --init_from model.safetensors", "CLEAN"),
    ("gpt_staged", "sample: prompt ids beyond a 128-token model", stopped_run,
     f"sample --ckpt out/ckpt.pt {BPE} --prompt Hello", "CLEAN"),
    ("gpt_staged", "ppl: text ids beyond a 128-token model", both(stopped_run, file_named("t.txt", "Hello world")),
     f"ppl --ckpt out/ckpt.pt {BPE} --text_file t.txt", "CLEAN"),
    ("gpt_staged", "meta.json is a JSON list", write("data/meta.json", "[1, 2]"), RUN, "CLEAN"),
    ("gpt_staged", "meta.json vocab_size is a string", write("data/meta.json", '{"vocab_size": "100"}'), RUN,
     "CLEAN"),
    ("gpt_staged", "meta.json train_tokens negative", write("data/meta.json", '{"train_tokens": -5}'), RUN, "CLEAN"),
    ("gpt_staged", "log.jsonl row without a step, --resume", log_line('{"loss": 1.0}'), f"{RUN} --resume", "CLEAN"),
    ("gpt_staged", "log.jsonl row that is a list, --resume", log_line("[1, 2]"), f"{RUN} --resume", "CLEAN"),
    ("gpt_staged", "log.jsonl middle line cut, --resume", log_line('{"step": 3, "lo'), f"{RUN} --resume", "CLEAN"),
    ("gpt_staged", "log.jsonl last line cut after a nested object, --resume",
     log_line('{"step": 5, "last_eval": {"val_loss": 1.0}', at=10_000), f"{RUN} --resume", "OK"),
    ("gpt_staged", "--extra_val a text file", bins, f"{RUN} --extra_val book.txt", "CLEAN"),
    ("gpt_staged", "--final_eval all (not a choice)", nothing, f"{SMOKE} --final_eval all", "CLEAN"),
    ("gpt_staged", "--compile sometimes", nothing, f"{SMOKE} --compile sometimes", "CLEAN"),
    ("gpt_staged", "--device cuda:x", nothing, f"{SMOKE} --device cuda:x", "CLEAN"),
    ("gpt_staged", "--device cuda on a machine without CUDA", bins, f"{RUN} --device cuda", "CLEAN"),
    ("gpt_staged", "--eval_samples 0", nothing, f"{SMOKE} --eval_samples 0", "CLEAN"),
    ("gpt_staged", "--seeds 0 for the report", nothing, "report --seeds 0", "CLEAN"),
    ("gpt_staged", "--resume with another --seed", stopped_run, f"{RUN} --resume --seed 1", "CLEAN"),
    ("gpt_staged", "--resume after train.bin was tokenized again",
     both(stopped_run, lambda f: (f / "data" / "train.bin").write_bytes(
         (f / "data" / "train.bin").read_bytes()[2:] + b"\0\0")), f"{RUN} --resume", "CLEAN"),
    # ---- data_owt.py ----
    ("data_owt", "--out_dir is an existing file", both(texts, file_named("out")), f"--input texts {OWT} --out_dir out",
     "CLEAN"),
    ("data_owt", "--out_dir inside a file", both(texts, file_named("f")), f"--input texts {OWT} --out_dir f/out",
     "CLEAN"),
    ("data_owt", "--out_dir on a read-only file system (/proc)", texts, f"--input texts {OWT} --out_dir /proc/owt",
     "CLEAN"),
    ("data_owt", "--out_dir empty (the current folder?)", texts, f"--input texts {OWT} --out_dir=", "CLEAN"),
    ("data_owt", "--input empty (the current folder?)", texts, f"--input '' {OWT} --out_dir out", "CLEAN"),
    ("data_owt", "the same file given by two paths (counted once)", texts,
     f"--input texts/a.txt texts/b.txt ./texts/a.txt {OWT} --out_dir out && {DOCUMENTS.format(2)}", "OK"),
    ("data_owt", "a folder inside --input given again by its own path (counted once)", texts,
     f"--input texts texts/a.txt {OWT} --out_dir out && {DOCUMENTS.format(3)}", "OK"),
    ("data_owt", "a symlinked folder inside --input (followed)", symlinked_folder,
     f"--input texts {OWT} --out_dir out && {DOCUMENTS.format(2)}", "OK"),
    ("data_owt", "--input is a FIFO", fifo("pipe"), f"--input pipe {OWT} --out_dir out", "CLEAN"),
    ("data_owt", "a FIFO inside the --input folder (not read, named)", both(texts, fifo("texts/pipe.txt")),
     f"--input texts {OWT} --out_dir out && {DOCUMENTS.format(3)}", "OK"),
    ("data_owt", "--bpe_dir is a file", both(texts, file_named("bpe")), "--input texts --bpe_dir bpe --out_dir out",
     "CLEAN"),
    ("data_owt", "--bpe_dir with encoder.json a folder",
     both(texts, folder_named("bpe"), folder_named("bpe/encoder.json"), file_named("bpe/vocab.bpe", "#version: 0.2\n")),
     "--input texts --bpe_dir bpe --out_dir out", "CLEAN"),
    ("data_owt", "--bpe_dir with encoder.json cut off",
     both(texts, folder_named("bpe"), file_named("bpe/encoder.json", '{"!": 0, "\\"": 1, "#'),
          file_named("bpe/vocab.bpe", "#version: 0.2\n")), "--input texts --bpe_dir bpe --out_dir out", "CLEAN"),
    ("data_owt", ".jsonl record that is a list, --strict",
     file_named("docs.jsonl", '{"text": "one"}\n[1, 2]\n{"text": "three"}\n'),
     f"--input docs.jsonl {OWT} --out_dir out --strict", "CLEAN"),
    ("data_owt", "disk full while writing (out/train.bin.tmp -> /dev/full)",
     both(texts, folder_named("out"), lambda f: (f / "out" / "train.bin.tmp").symlink_to("/dev/full")),
     f"--input texts {OWT} --out_dir out", "CLEAN"),
    ("data_owt", "out/train.bin is a folder", both(texts, folder_named("out"), folder_named("out/train.bin")),
     f"--input texts {OWT} --out_dir out", "CLEAN"),
    ("data_owt", "Ctrl-C while tokenizing (1 process)", interrupt_after(1, nothing),
     f"--input {GUTENBERG} {OWT} --out_dir out", "SIGINT"),
    ("data_owt", "Ctrl-C while tokenizing (2 workers)", interrupt_after(1, nothing),
     f"--input {GUTENBERG} --bpe_dir {SHARED / 'gpt2_bpe'} --num_proc 2 --out_dir out", "SIGINT"),
    ("data_owt", "closed output pipe (| head -1)", texts, f"--input texts {OWT} --out_dir out | head -1", "OK"),
    # ---- data_multiwoz.py ----
    ("data_multiwoz", "--out_dir is an existing file", both(mwoz(), file_named("out")), MWOZ_RUN, "CLEAN"),
    ("data_multiwoz", "--out_dir inside a file", both(mwoz(), file_named("f")), f"{MWOZ_RUN} --out_dir f/out",
     "CLEAN"),
    ("data_multiwoz", "--out_dir on a read-only file system (/proc)", mwoz(), f"{MWOZ_RUN} --out_dir /proc/mwoz",
     "CLEAN"),
    ("data_multiwoz", "--out_dir empty (the current folder?)", mwoz(), f"{MWOZ_RUN} --out_dir=", "CLEAN"),
    ("data_multiwoz", "--data_dir empty (the current folder?)", mwoz(), f"{MWOZ_RUN} --data_dir=", "CLEAN"),
    ("data_multiwoz", "a dialogue in both val.json and test.json", mwoz(edit=first_val_dialogue_also_in_test),
     MWOZ_RUN, "CLEAN"),
    ("data_multiwoz", "an id in both valListFile and testListFile (raw layout)",
     mwoz(raw=True, edit=first_test_id_also_in_the_dev_list), MWOZ_RUN, "CLEAN"),
    ("data_multiwoz", "--spm is a folder", both(mwoz(), folder_named("t5")), f"{MWOZ_RUN} --spm t5", "CLEAN"),
    ("data_multiwoz", "--spm is a FIFO", both(mwoz(), fifo("t5.model")), f"{MWOZ_RUN} --spm t5.model", "CLEAN"),
    ("data_multiwoz", "--spm is an empty file", both(mwoz(), file_named("t5.model", "")),
     f"{MWOZ_RUN} --spm t5.model", "CLEAN"),
    ("data_multiwoz", "val.json is a FIFO", both(mwoz(), lambda f: (f / "mwoz" / "val.json").unlink(),
                                                fifo("mwoz/val.json")), MWOZ_RUN, "CLEAN"),
    ("data_multiwoz", "val.json is a JSON list", both(mwoz(), file_named("mwoz/val.json", "[1, 2]")), MWOZ_RUN,
     "CLEAN"),
    ("data_multiwoz", "a dialogue that is a list",
     mwoz(edit=lambda s: s["val"].update({next(iter(s["val"])): [1, 2]})), MWOZ_RUN, "CLEAN"),
    ("data_multiwoz", "a turn of the log that is a string",
     mwoz(edit=lambda s: next(iter(s["val"].values()))["log"].__setitem__(0, "hello")), MWOZ_RUN, "CLEAN"),
    ("data_multiwoz", "--train_from_dev 1.5", mwoz(), f"{MWOZ_RUN} --train_from_dev 1.5", "CLEAN"),
    ("data_multiwoz", "DialogSum record that is a JSON list", dialogsum("[1, 2]"),
     f"--summarization dialogsum --data_dir dsum --spm {T5_SPM} --out_dir out --train_from_dev 0.5", "CLEAN"),
    ("data_multiwoz", "DialogSum record cut off", dialogsum('{"fname": "dev_2", "dia'),
     f"--summarization dialogsum --data_dir dsum --spm {T5_SPM} --out_dir out --train_from_dev 0.5", "CLEAN"),
    ("data_multiwoz", "SAMSum val.csv is a folder",
     both(folder_named("sam"), folder_named("sam/val.csv"), file_named("sam/test.csv", "id,summary,dialogue\n")),
     f"--summarization samsum --data_dir sam --spm {T5_SPM} --out_dir out --train_from_dev 0.5", "CLEAN"),
    ("data_multiwoz", "out/train.jsonl is a folder", both(mwoz(), folder_named("out"), folder_named("out/train.jsonl")),
     MWOZ_RUN, "CLEAN"),
    ("data_multiwoz", "Ctrl-C while preparing the real dev + test", interrupt_after(5, nothing),
     f"--data_dir {MWOZ / 'convlab2_mwz21'} --spm {T5_SPM} --out_dir out --train_from_dev 0.9", "SIGINT"),
    ("data_multiwoz", "closed output pipe (| head -1)", mwoz(), f"{MWOZ_RUN} | head -1", "OK"),
    ("ds2", "best.pt copied to ckpt.pt, --resume",
     both(ds2_stopped, lambda f: (f / "out" / "ckpt.pt").write_bytes((f / "out" / "best.pt").read_bytes())),
     f"{DS2_RUN} --resume", "CLEAN"),
    ("ds2", "a gpt_staged.py checkpoint as ckpt.pt, --resume",
     both(ds2_stopped, lambda f: __import__("torch").save({"model": {"transformer.wte.weight": 0}, "config": {}},
                                                           f / "out" / "ckpt.pt")), f"{DS2_RUN} --resume", "CLEAN"),
    ("ds2", "T5 config.json with num_heads 0", t5_config(json.dumps({**T5, "num_heads": 0})),
     f"evaluate {DS2_RUN} --init_from t5", "CLEAN"),
    ("ds2", "T5 config.json is a JSON list", t5_config("[1, 2]"), f"evaluate {DS2_RUN} --init_from t5", "CLEAN"),
    ("ds2", "T5 config.json cut off", t5_config('{"d_model": 5'), f"evaluate {DS2_RUN} --init_from t5", "CLEAN"),
    ("ds2", "T5 config.json num_layers \"6\" (a string)", t5_config(json.dumps({**T5, "num_layers": "6"})),
     f"evaluate {DS2_RUN} --init_from t5", "CLEAN"),
    ("ds2", "a dev.jsonl record that is a list", ds2_line("data/dev.jsonl", "[1, 2]"), f"{DS2_RUN} --resume",
     "CLEAN"),
    ("ds2", "a dev.jsonl record without state",
     ds2_line("data/dev.jsonl", '{"dialogue_id": "a", "turn": 0, "summary": "x", "domains": []}'),
     f"{DS2_RUN} --resume", "CLEAN"),
    ("ds2", "meta.json is a JSON list", both(ds2_data, lambda f: (f / "data" / "meta.json").write_text("[1]")),
     DS2_RUN, "CLEAN"),
    ("ds2", "log.jsonl row without a step, --resume", ds2_line("out/log.jsonl", '{"loss": 1}'),
     f"{DS2_RUN} --resume", "CLEAN"),
    ("ds2", "--out_dir is an existing file", both(ds2_data, file_named("out")), DS2_RUN, "CLEAN"),
    ("ds2", "--data_dir is a file", file_named("data"), DS2_RUN, "CLEAN"),
    ("ds2", "--out_dir empty", nothing, "--preset smoke --out_dir=", "CLEAN"),
    ("ds2", "--init_from a folder without config.json", both(ds2_data, folder_named("t5")),
     f"evaluate {DS2_RUN} --init_from t5", "CLEAN"),
    ("ds2", "--resume with another --d_model", ds2_stopped, f"{DS2_RUN} --resume --d_model 64", "CLEAN"),
    ("ds2", "--device cuda:1 under no CUDA", ds2_data, f"{DS2_RUN} --device cuda:1", "CLEAN"),
]


def run_case(script, setup, arguments, expected, timeout=120):
    """(exit status, the command's last line on stderr or stdout) of one case in a fresh scratch folder."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        setup(folder)
        command = f"{shlex.quote(sys.executable)} {ROOT / (script + '.py')} {arguments}"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        if expected == "SIGINT":  # Ctrl-C once the first checkpoint is on disk
            # a runner started in the background inherits an ignored SIGINT: the command gets the default back
            process = subprocess.Popen(shlex.split(command), cwd=folder, env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True,
                                       preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
            after = getattr(setup, "interrupt_after", None)  # a command without checkpoints: after that long
            deadline = time.time() + (after or timeout)
            while (after or not (folder / "out" / "ckpt.pt").exists()) and time.time() < deadline \
                    and process.poll() is None:
                time.sleep(0.05)
            process.send_signal(signal.SIGINT)
            out, err = process.communicate(timeout=timeout)
            code = process.returncode
        else:
            done = subprocess.run(command, shell=True, cwd=folder, env=env, capture_output=True, text=True,
                                  timeout=timeout)
            code, out, err = done.returncode, done.stdout, done.stderr
    return code, out, err


def verdict(expected, code, err):
    lines = [line for line in err.strip().splitlines() if line.strip()]
    one_line = len(lines) == 1 and lines[0].startswith(("error: ", "interrupted: ")) and "Traceback" not in err
    if expected == "OK":
        return "OK" if code == 0 and "Traceback" not in err else "FAIL"
    if expected == "SIGINT":
        return "CLEAN" if code == 130 and one_line else "FAIL"
    return "CLEAN" if code == 2 and one_line else "FAIL"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="one script's cases (gpt_staged, ds2, data_owt, data_multiwoz)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "hostile_trial.md"), help="the table (markdown)")
    args = parser.parse_args(argv)
    rows, failed = [], 0
    for i, (script, what, setup, arguments, expected) in enumerate(CASES, 1):
        if args.only and script != args.only:
            continue
        code, out, err = run_case(script, setup, arguments, expected)
        result = verdict(expected, code, err)
        failed += result == "FAIL"
        message = (err.strip().splitlines() or out.strip().splitlines() or [""])[-1 if result == "FAIL" else 0]
        rows.append(f"| {i} | `{script}.py {arguments}` | {what} | {code} | {result} | "
                    f"{message.replace('|', '/')[:300]} |")
        print(f"{i:3d} {result:5s} exit {code:3d}  {script}: {what}", flush=True)
    table = ["| # | command (in a scratch folder) | what the user did | exit | result | the line the user sees |",
             "|---|---|---|---|---|---|", *rows]
    text = (f"# Hostile trial\n\nMade by `python tools/hostile_trial.py` ({len(rows)} cases, {failed} FAIL). CLEAN: "
            "one line and a documented exit status (2 input / file system, 130 Ctrl-C, 141 closed pipe); OK: "
            "does what the user meant.\n\n" + "\n".join(table) + "\n")
    if not args.only:
        Path(args.out).write_text(text)
    print(f"{len(rows)} cases, {failed} FAIL" + ("" if args.only else f"; wrote {args.out}"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
