"""data_owt.py: token bins that decode back to the documents, a split that is a pure function of
(seed, document bytes), OpenWebText2's monthly .jsonl.zst files with the seed's date cut-off, workers that read
their own share, and no output that looks complete unless it is."""
import errno
import hashlib
import io
import json
import lzma
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from conftest import require_module, require_shared

import data_owt

ROOT = Path(__file__).resolve().parents[1]
EOT = 50256


# ----------------------------------------------------------------------------- helpers
def run(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "data_owt.py", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)


def prep(capsys, *args):
    """data_owt.py run in this process, with one process unless told (fast: no interpreter start-up); returns
    what run() does."""
    args = [str(a) for a in args] + ([] if "--num_proc" in args else ["--num_proc", "1"])
    capsys.readouterr()
    code = data_owt.main(args)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def bpe_dir():
    return require_shared("gpt2_bpe")


@pytest.fixture
def reference_encoding(monkeypatch):
    """tiktoken's own gpt2 encoding, loaded offline from the shared tiktoken cache (the independent reference)."""
    import tiktoken
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(require_shared("gpt2_bpe/tiktoken_cache")))
    return tiktoken.get_encoding("gpt2")


def lf(text):
    """A document as data_owt.py writes it by default (--newlines lf): CRLF and lone CR become LF."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def zst(data):
    return require_module("zstandard").ZstdCompressor().compress(data)


def owt2_month(records):
    """Bytes of one OpenWebText2 file (YYYY-MM.jsonl.zst): lm_dataformat's {"text", "meta"} lines, zstd; the first
    line in a frame of its own, as an archive committed twice would be (a reader must go on across frames)."""
    lines = [(json.dumps({"text": text, "meta": meta}) + "\n").encode() for text, meta in records]
    return zst(lines[0]) + (zst(b"".join(lines[1:])) if lines[1:] else b"")


OWT2_MONTHS = {  # dates on both sides of the seed's cut-off (OWT ends 2017-12)
    "2017-11": [("November 2017 page, inside OpenWebText's time.", {"title": "a"})],
    "2017-12": [("December 2017 page, the last OpenWebText month.", {"title": "b"})],
    "2018-01": [("January 2018 page, after OpenWebText.", {"title": "c"}),
                ("Second January 2018 page \u2014 with CRLF\r\nline.", {"title": "d"})],
    "2020-04": [("April 2020 page, the last OpenWebText2 month.", {"title": "e", "reddit_scores": [3]})],
}


def write_owt2_tar(path, months=OWT2_MONTHS):
    """An OpenWebText2-shaped release: an uncompressed tar of monthly YYYY-MM.jsonl.zst files. Returns
    [(doc id, text, month)] in file order."""
    write_tar(path, {f"{m}.jsonl.zst": owt2_month(r) for m, r in months.items()}, "w")
    return [(f"{path.name}/{m}.jsonl.zst:{k}", t, m) for m, r in months.items() for k, (t, _) in enumerate(r, 1)]


def read_docs(path, encoding):
    """Decode a .bin into its documents: every document must end in EOT."""
    tokens = np.fromfile(path, dtype=np.uint16)
    assert len(tokens) == 0 or tokens[-1] == EOT
    ends = np.flatnonzero(tokens == EOT)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [encoding.decode(tokens[s:e].tolist()) for s, e in zip(starts, ends)]


def xz_tar(members):
    """Bytes of an xz-compressed tar holding {name: text}."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:xz") as tar:
        for name, text in members.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def write_tar(path, members, mode):
    with tarfile.open(path, mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def make_corpus(root):
    """Every input kind, OpenWebText's nested layouts included. Returns (inputs, [(doc id, text)] in order)."""
    docs = []
    folder = root / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.md").write_text("not a document")  # other types are ignored
    texts = {"a.txt": "Caf\u00e9 cr\u00e8me \u2014 line one\r\nline two\r\n",
             "sub/b.txt": "  leading spaces,\n\n\ntabs\t!"}
    (folder / "a.txt").write_bytes(texts["a.txt"].encode())
    (folder / "c.xz").write_bytes(lzma.compress("xz-compressed plain text document.".encode()))
    (folder / "sub/b.txt").write_bytes(texts["sub/b.txt"].encode())
    docs += [("a.txt", texts["a.txt"]), ("c.xz", "xz-compressed plain text document."),
             ("sub/b.txt", texts["sub/b.txt"])]
    lines = ["The literal text <|endoftext|> stays text.", "\u65e5\u672c\u8a9e and emoji \U0001f600", "third"]
    (root / "web.jsonl").write_text(json.dumps({"text": lines[0]}) + "\n\n" + json.dumps({"text": lines[1]}) +
                                    "\n" + json.dumps({"text": lines[2], "url": "x"}) + "\n")
    docs += [("web.jsonl:1", lines[0]), ("web.jsonl:3", lines[1]), ("web.jsonl:4", lines[2])]
    # Zenodo layout: openwebtext.tar.xz -> openwebtext/urlsf_subset00-N_data.xz (each an xz tar of .txt)
    outer = {}
    for part in (1, 2):
        inner = {f"{part:07d}-{k}.txt": f"Web page {part}.{k}: some words about topic {k * part}." for k in range(4)}
        outer[f"openwebtext/urlsf_subset00-{part}_data.xz"] = xz_tar(inner)
        docs += [(f"openwebtext.tar.xz/openwebtext/urlsf_subset00-{part}_data.xz/{n}", t) for n, t in inner.items()]
    write_tar(root / "openwebtext.tar.xz", outer, "w:xz")
    # Hugging Face layout: urlsf_subset01.tar (plain tar) -> openwebtext/urlsf_subset01-1_data.xz
    inner = {f"{k:07d}-hf.txt": f"Hugging Face subset page {k}." for k in range(5)}
    write_tar(root / "urlsf_subset01.tar", {"openwebtext/urlsf_subset01-1_data.xz": xz_tar(inner)}, "w")
    docs += [(f"urlsf_subset01.tar/openwebtext/urlsf_subset01-1_data.xz/{n}", t) for n, t in inner.items()]
    books = {"b1.txt": "First book of a .tar.gz.", "b2.txt": "Second book."}
    write_tar(root / "books.tar.gz", {n: t.encode() for n, t in books.items()}, "w:gz")
    docs += [(f"books.tar.gz/{n}", t) for n, t in books.items()]
    docs += [(i, t) for i, t, _ in write_owt2_tar(root / "openwebtext2.jsonl.zst.tar")]
    return [folder, root / "web.jsonl", root / "openwebtext.tar.xz", root / "urlsf_subset01.tar",
            root / "books.tar.gz", root / "openwebtext2.jsonl.zst.tar"], docs


def check_round_trip(out_dir, docs, encoding, newlines=lf):
    meta = json.loads((out_dir / "meta.json").read_text())
    val_ids = set(meta["val_document_ids"])
    assert val_ids <= {doc_id for doc_id, _ in docs}
    assert read_docs(out_dir / "train.bin", encoding) == [newlines(t) for i, t in docs if i not in val_ids]
    assert read_docs(out_dir / "val.bin", encoding) == [newlines(t) for i, t in docs if i in val_ids]
    return meta


def children_of(pid):
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def alive(pid):
    """A process that runs (not gone, not a zombie waiting to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when this returns: connections to it are refused


# ----------------------------------------------------------------------------- tokenizer
def test_bpe_dir_encoding_equals_tiktoken_gpt2_on_real_text(reference_encoding):
    ours = data_owt.get_encoding(bpe_dir())
    assert ours.encode_ordinary("Hello world") == [15496, 995]
    assert (ours.n_vocab, ours.eot_token) == (50257, 50256)
    texts = [require_shared("text_corpus/wikitext2_raw/wiki.test.raw").read_text(encoding="utf-8"),
             require_shared("text_corpus/gutenberg/Carroll_Lewis/Alice_s_Adventures_in_Wonderland.txt").read_text(),
             "trailing spaces   \n\n  x  \t\r\n y's we'll I'M 12345 \u00e9\u00e8 \U0001f600 \u00a0nbsp  "]
    for text in texts:
        assert ours.encode_ordinary(text) == reference_encoding.encode_ordinary(text)
    assert ours.encode("<|endoftext|>", allowed_special="all") == [EOT]


def test_bpe_dir_without_the_files_names_what_it_needs(tmp_path):
    with pytest.raises(FileNotFoundError, match="encoder.json"):
        data_owt.get_encoding(tmp_path)


def test_offline_without_cache_or_bpe_dir_fails_fast_naming_both_options(tmp_path):
    (tmp_path / "doc.txt").write_text("some text")
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "tiktoken_cache_dir")}
    closed = f"http://127.0.0.1:{free_port()}"  # even on a machine with internet this fetch fails
    env.update(TIKTOKEN_CACHE_DIR=str(tmp_path / "empty_cache"), HTTPS_PROXY=closed, HTTP_PROXY=closed)
    t0 = time.time()
    result = run("--input", tmp_path / "doc.txt", "--out_dir", tmp_path / "out", env=env)
    assert time.time() - t0 < 10
    assert result.returncode == 2
    assert "--bpe_dir ../shared/data/gpt2_bpe" in result.stderr and "TIKTOKEN_CACHE_DIR" in result.stderr
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- round trips
def test_round_trip_every_input_kind_including_owt_nested_tars(tmp_path, reference_encoding):
    inputs, docs = make_corpus(tmp_path)
    result = run("--input", *inputs, "--bpe_dir", bpe_dir(), "--out_dir", tmp_path / "out", "--val_fraction", 0.3,
                 "--num_proc", 1)
    assert result.returncode == 0, result.stderr
    meta = check_round_trip(tmp_path / "out", docs, reference_encoding)
    assert meta["train_documents"] + meta["val_documents"] == len(docs) == 26
    assert meta["train_documents"] > 0 and meta["val_documents"] > 0
    assert "ignoring 1 files" in result.stdout  # docs/notes.md


def test_round_trip_three_real_gutenberg_books(tmp_path, reference_encoding):
    folder = require_shared("text_corpus/gutenberg")
    books = [folder / "Austen_Jane/Pride_and_Prejudice.txt", folder / "Poe_Edgar_Allan/The_Raven.txt",
             folder / "Shelley_Mary_Wollstonecraft/Mathilda.txt"]  # Mathilda has CRLF line ends
    result = run("--input", *books, "--bpe_dir", bpe_dir(), "--out_dir", tmp_path / "out", "--num_proc", 2,
                 "--batch_bytes", 50_000)
    assert result.returncode == 0, result.stderr
    docs = [(book.name, book.read_bytes().decode("utf-8")) for book in books]
    assert "\r\n" in docs[2][1]
    meta = check_round_trip(tmp_path / "out", docs, reference_encoding)
    # 0.05% of 3 documents rounds to none; with >= 2 documents one still goes to validation
    assert (meta["train_documents"], meta["val_documents"]) == (2, 1)
    assert meta["sources"][0]["bytes"] == books[0].stat().st_size


def test_strip_gutenberg_keeps_the_text_between_start_and_end_markers():
    text = ("Header\r\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\r\n\r\nBody line.\r\n"
            "*** END OF THIS PROJECT GUTENBERG EBOOK X ***\r\nLicence")
    assert data_owt.strip_gutenberg(text) == "Body line."
    assert data_owt.strip_gutenberg("no markers here") == "no markers here"
    book = require_shared("text_corpus/gutenberg/Austen_Jane/Pride_and_Prejudice.txt").read_text()
    body = data_owt.strip_gutenberg(book)
    assert "*** START OF" not in body and "*** END OF" not in body and "Project Gutenberg License" not in body
    assert body.startswith("PRIDE AND PREJUDICE") or "It is a truth universally acknowledged" in body[:5000]


# ----------------------------------------------------------------------------- the split
def test_split_is_a_hash_of_seed_and_document_bytes_with_nanogpt_share():
    docs = [f"web page number {i}".encode() for i in range(200_000)]
    val = [d for d in docs if data_owt.split_value(2357, d) < 0.0005]
    assert abs(len(val) - 100) < 4 * 10  # binomial(200k, 0.0005): mean 100, sd 10
    assert val == [d for d in docs if data_owt.split_value(2357, d) < 0.0005]  # a pure function
    assert val != [d for d in docs if data_owt.split_value(1, d) < 0.0005]  # the seed matters


def test_ids_and_split_do_not_depend_on_how_the_inputs_are_named(tmp_path, capsys):
    """--input FOLDER, --input FILE..., and the same folder renamed give the same ids, split and bins."""
    folder = tmp_path / "subsets"
    folder.mkdir()
    write_owt2_tar(folder / "openwebtext2.jsonl.zst.tar")
    owt_subset_tar(folder / "urlsf_subset00.tar", 12)
    renamed = tmp_path / "elsewhere" / "copy"
    shutil.copytree(folder, renamed)
    outs = []
    for k, inputs in enumerate([[folder], sorted(folder.iterdir()), [renamed]]):
        out = tmp_path / f"out{k}"
        result = prep(capsys, "--input", *inputs, "--bpe_dir", bpe_dir(), "--out_dir", out, "--val_fraction", 0.3)
        assert result.returncode == 0, result.stderr
        outs.append(out)
    metas = [json.loads((out / "meta.json").read_text()) for out in outs]
    assert metas[0]["val_document_ids"] == metas[1]["val_document_ids"] == metas[2]["val_document_ids"]
    for meta in metas:
        assert [s["id"] for s in meta["sources"]] == ["openwebtext2.jsonl.zst.tar", "urlsf_subset00.tar"]
    for name in ("train.bin", "val.bin"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes() == (outs[2] / name).read_bytes()


def test_num_proc_1_and_2_give_byte_identical_bins(tmp_path):
    inputs, _ = make_corpus(tmp_path)
    outs = []
    for num_proc in (1, 2):
        out = tmp_path / f"out{num_proc}"
        result = run("--input", *inputs, "--bpe_dir", bpe_dir(), "--out_dir", out, "--val_fraction", 0.3,
                     "--num_proc", num_proc, "--batch_bytes", 40)  # a few documents per task: many tasks
        assert result.returncode == 0, result.stderr
        outs.append(out)
    for name in ("train.bin", "val.bin"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes()


# ----------------------------------------------------------------------------- outputs and re-runs
def test_meta_json_fields_and_printed_stats_block(tmp_path):
    inputs, docs = make_corpus(tmp_path)
    out = tmp_path / "out"
    result = run("--input", *inputs, "--bpe_dir", bpe_dir(), "--out_dir", out, "--n_ctx", 16, "--corpus", "toy")
    assert result.returncode == 0, result.stderr
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["vocab_size"], meta["eot"], meta["dtype"], meta["n_ctx"]) == (50257, 50256, "uint16", 16)
    assert meta["train_tokens"] * 2 == (out / "train.bin").stat().st_size
    assert meta["val_tokens"] * 2 == (out / "val.bin").stat().st_size
    assert meta["num_train_samples"] == (meta["train_tokens"] - 1) // 16
    assert meta["num_validation_samples"] == (meta["val_tokens"] - 1) // 16
    assert meta["total_training_tokens"] == meta["num_train_samples"] * 16
    assert meta["train_documents"] + meta["val_documents"] == len(docs)
    assert meta["tokenizer"]["name"] == "gpt2" and "bpe_dir" in meta["tokenizer"]["source"]
    assert [s["bytes"] for s in meta["sources"]] == [Path(s["path"]).stat().st_size for s in meta["sources"]]
    assert meta["settings"]["val_fraction"] == 0.0005 and meta["settings"]["seed"] == 2357
    assert result.stdout.rstrip().splitlines()[-6:] == [
        'corpus: "toy"', 'tokenizer: "GPT2"', "n_ctx: 16", f"num_train_samples: {meta['num_train_samples']}",
        f"num_validation_samples: {meta['num_validation_samples']}",
        f"total_training_tokens: {meta['total_training_tokens']} "
        f"#~{data_owt.human(meta['total_training_tokens'])} tokens"]


def test_stats_block_reproduces_the_seed_numbers():
    train_tokens = 12_574_161 * 1024 + 1  # seed: 12,574,161 train samples of 1024 (+1 token for the last target)
    meta = {"corpus": "openwebtext1+2", "n_ctx": 1024, "num_train_samples": data_owt.num_samples(train_tokens, 1024),
            "num_validation_samples": data_owt.num_samples(806_093 * 1024 + 1, 1024)}
    meta["total_training_tokens"] = meta["num_train_samples"] * 1024
    assert data_owt.format_stats(meta).splitlines() == [
        'corpus: "openwebtext1+2"', 'tokenizer: "GPT2"', "n_ctx: 1024", "num_train_samples: 12574161",
        "num_validation_samples: 806093", "total_training_tokens: 12875940864 #~12.9B tokens"]


def test_rerun_on_unchanged_input_is_a_no_op_and_a_changed_input_rebuilds(tmp_path):
    (tmp_path / "in").mkdir()
    for k in range(3):
        (tmp_path / "in" / f"{k}.txt").write_text(f"document number {k}")
    args = ("--input", tmp_path / "in", "--bpe_dir", bpe_dir(), "--out_dir", tmp_path / "out", "--num_proc", 1)
    assert run(*args).returncode == 0
    stamp = [(tmp_path / "out" / n).stat().st_mtime_ns for n in ("train.bin", "val.bin", "meta.json")]
    second = run(*args)
    assert second.returncode == 0 and "up to date" in second.stdout
    assert [(tmp_path / "out" / n).stat().st_mtime_ns for n in ("train.bin", "val.bin", "meta.json")] == stamp
    (tmp_path / "in" / "1.txt").write_text("document number 1, edited")
    third = run(*args)
    assert third.returncode == 0 and "up to date" not in third.stdout
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["train_tokens"] > 0


# ----------------------------------------------------------------------------- bad input
def test_empty_corpus_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run("--input", tmp_path / "empty", "--bpe_dir", bpe_dir(), "--out_dir", tmp_path / "out")
    assert result.returncode == 2 and result.stderr.startswith("error: empty corpus")
    assert len(result.stderr.strip().splitlines()) == 1
    (tmp_path / "empty" / "blank.txt").write_text("")  # a document with no text: still no tokens
    result = run("--input", tmp_path / "empty", "--bpe_dir", bpe_dir(), "--out_dir", tmp_path / "out")
    assert result.returncode == 2 and "empty corpus" in result.stderr
    assert not (tmp_path / "out" / "meta.json").exists() and not list((tmp_path / "out").glob("*.bin*"))


def test_non_utf8_and_unreadable_files_are_counted_or_with_strict_an_error(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "good.txt").write_text("fine text")
    (tmp_path / "in" / "latin1.txt").write_bytes("caf\u00e9".encode("latin-1"))
    (tmp_path / "in" / "other.txt").write_text("more fine text")
    (tmp_path / "in" / "truncated.xz").write_bytes(lzma.compress(b"x" * 1000)[:20])
    args = ("--input", tmp_path / "in", "--bpe_dir", bpe_dir(), "--out_dir", tmp_path / "out")
    result = run(*args)
    assert result.returncode == 0, result.stderr
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["skipped"] == {"not_utf8": 1, "unreadable": 1}
    assert meta["train_documents"] + meta["val_documents"] == 2
    assert "latin1.txt" in result.stdout and "truncated.xz" in result.stdout
    strict = run(*args, "--strict", "--out_dir", tmp_path / "strict")
    assert strict.returncode == 2 and "latin1.txt: not UTF-8" in strict.stderr
    assert len(strict.stderr.strip().splitlines()) == 1 and not (tmp_path / "strict" / "meta.json").exists()


def test_unknown_flag_is_rejected_in_one_line(tmp_path):
    result = run("--input", tmp_path, "--val_frac", "0.1")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: unrecognized arguments: --val_frac 0.1 (did you mean --val_fraction?)"


# ----------------------------------------------------------------------------- failures leave nothing complete
def small_args(tmp_path, out, *extra):
    (tmp_path / "in").mkdir(exist_ok=True)
    for k in range(6):
        (tmp_path / "in" / f"{k}.txt").write_text(f"document {k} " * 50)
    return ["--input", str(tmp_path / "in"), "--bpe_dir", str(bpe_dir()), "--out_dir", str(out), "--num_proc", "1",
            *extra]


def test_disk_full_leaves_no_output_and_keeps_an_earlier_complete_one(tmp_path, monkeypatch, capsys):
    def disk_full(f, tokens):
        raise OSError(errno.ENOSPC, "No space left on device")
    fresh, kept = tmp_path / "fresh", tmp_path / "kept"
    assert data_owt.main(small_args(tmp_path, kept)) == 0
    before = {p.name: p.read_bytes() for p in kept.iterdir()}
    monkeypatch.setattr(data_owt, "write_tokens", disk_full)
    capsys.readouterr()
    assert data_owt.main(small_args(tmp_path, fresh)) == 2
    assert f"cannot write to {fresh}: no space left on device" in capsys.readouterr().err
    assert list(fresh.iterdir()) == []  # no meta.json, no .bin, no .tmp
    assert data_owt.main(small_args(tmp_path, kept, "--seed", "1")) == 2  # a new run over a complete output
    assert {p.name: p.read_bytes() for p in kept.iterdir()} == before


def test_failure_while_publishing_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert data_owt.main(small_args(tmp_path, out)) == 0
    real_replace = os.replace

    def fail_on_val(src, dst):
        if Path(dst).name == "val.bin":
            raise OSError(errno.EIO, "Input/output error")
        real_replace(src, dst)
    monkeypatch.setattr(data_owt.os, "replace", fail_on_val)
    assert data_owt.main(small_args(tmp_path, out, "--seed", "1")) == 2  # train.bin is new, val.bin is old
    assert not (out / "meta.json").exists() and not list(out.glob("*.tmp"))


def test_interrupted_run_leaves_nothing_complete_and_a_rerun_finishes(tmp_path, monkeypatch):
    assert data_owt.main(small_args(tmp_path, tmp_path / "reference")) == 0
    calls = []
    real_write = data_owt.write_tokens

    def interrupt_on_third_document(f, tokens):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real_write(f, tokens)
    monkeypatch.setattr(data_owt, "write_tokens", interrupt_on_third_document)
    out = tmp_path / "out"
    assert data_owt.main(small_args(tmp_path, out)) == 130
    assert list(out.iterdir()) == []
    monkeypatch.setattr(data_owt, "write_tokens", real_write)
    assert data_owt.main(small_args(tmp_path, out)) == 0
    for name in ("train.bin", "val.bin"):
        assert (out / name).read_bytes() == (tmp_path / "reference" / name).read_bytes()


@pytest.mark.parametrize("sig, returncode", [(signal.SIGTERM, 130), (signal.SIGKILL, -9)])
def test_killed_run_leaves_no_complete_output_and_a_rerun_finishes(tmp_path, sig, returncode):
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "data_owt.py", "--input", require_shared("text_corpus/gutenberg"),
                                "--bpe_dir", bpe_dir(), "--out_dir", out, "--num_proc", "2"], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (out / "train.bin.tmp").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)  # midway: the whole folder (60 MB) takes far longer
    workers = children_of(process.pid)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == returncode, stderr
    deadline = time.time() + 10  # the workers end too (with kill -9, once they see their parent gone)
    while time.time() < deadline and any(alive(pid) for pid in workers):
        time.sleep(0.1)
    assert len(workers) == 2 and not any(alive(pid) for pid in workers)
    assert data_owt.read_complete_meta(out) is None and not (out / "meta.json").exists()
    if sig == signal.SIGTERM:
        assert list(out.iterdir()) == [] and "interrupted" in stderr
    assert data_owt.main(small_args(tmp_path, out)) == 0  # leftovers of a kill -9 do not get in the way
    assert data_owt.read_complete_meta(out) is not None and not list(out.glob("*.tmp"))


# ----------------------------------------------------------------------------- download
def test_offline_download_fails_at_once_naming_input(tmp_path):
    t0 = time.time()
    result = run("--download", "--hub_url", f"http://127.0.0.1:{free_port()}", "--out_dir", tmp_path / "out")
    assert time.time() - t0 < 10
    assert result.returncode == 2 and "--input PATH" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


class LocalHub:
    """A stand-in for the Hugging Face Hub on 127.0.0.1: tree listings (with each LFS file's sha256) and files
    served with HTTP Range support. files: {(dataset, path in it): (bytes, published sha256)}. Records the Range
    start of every file request."""
    def __init__(self, files):
        self.ranges = ranges = []

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                for (repo, path), (data, sha) in files.items():
                    folder = path.rpartition("/")[0]
                    if self.path == f"/api/datasets/{repo}/tree/main" + (f"/{folder}" if folder else ""):
                        body, status = json.dumps([{"type": "file", "path": p, "size": len(d), "lfs": {
                            "oid": h, "size": len(d), "pointerSize": 134}} for (r, p), (d, h) in files.items()
                            if r == repo and p.rpartition("/")[0] == folder]).encode(), 200
                        break
                    if self.path == f"/datasets/{repo}/resolve/main/{path}":
                        start = int(self.headers["Range"][6:-1]) if self.headers.get("Range") else 0
                        ranges.append(start)
                        body, status = data[start:], 206 if start else 200
                        break
                else:
                    body, status = b"not found", 404
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


OWT_SUBSET = ("Skylion007/openwebtext", "subsets/urlsf_subset00.tar")
OWT2_FILE = ("segyges/OpenWebText2", "openwebtext2.jsonl.zst.tar")


def owt_subset_tar(path, n_docs):
    write_tar(path, {"openwebtext/urlsf_subset00-1_data.xz": xz_tar({f"{k}.txt": f"page {k} " * 40
                                                                      for k in range(n_docs)})}, "w")
    return path.read_bytes()


def test_download_resumes_a_partial_file_verifies_sha256_and_prepares(tmp_path):
    data = owt_subset_tar(tmp_path / "payload.tar", 30)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    (downloads / "urlsf_subset00.tar.part").write_bytes(data[:1000])  # an earlier, interrupted download
    with LocalHub({OWT_SUBSET: (data, hashlib.sha256(data).hexdigest())}) as hub:
        result = run("--download", "--hub_url", hub.url, "--download_dir", downloads, "--out_dir", tmp_path / "out",
                     "--bpe_dir", bpe_dir())
    assert result.returncode == 0, result.stderr
    assert hub.ranges == [1000]  # resumed where the partial file ended
    assert (downloads / "urlsf_subset00.tar").read_bytes() == data
    assert not (downloads / "urlsf_subset00.tar.part").exists()
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["downloads"][0]["sha256"] == hashlib.sha256(data).hexdigest()
    assert meta["corpus"] == "openwebtext" and meta["train_documents"] + meta["val_documents"] == 30


def test_download_with_a_wrong_checksum_is_rejected_and_removed(tmp_path):
    data = owt_subset_tar(tmp_path / "payload.tar", 3)
    with LocalHub({OWT_SUBSET: (data, "0" * 64)}) as hub:
        result = run("--download", "--hub_url", hub.url, "--download_dir", tmp_path / "dl", "--out_dir",
                     tmp_path / "out", "--bpe_dir", bpe_dir())
    assert result.returncode == 2 and "sha256" in result.stderr and "run again" in result.stderr
    assert list((tmp_path / "dl").iterdir()) == [] and not (tmp_path / "out").exists()


def test_offline_download_of_the_seed_corpus_fails_at_once_naming_input(tmp_path, capsys):
    t0 = time.time()
    result = prep(capsys, "--download", "owt+owt2", "--hub_url", f"http://127.0.0.1:{free_port()}", "--out_dir",
                  tmp_path / "o")
    assert time.time() - t0 < 10
    assert result.returncode == 2 and "--input PATH" in result.stderr and "openwebtext2.jsonl.zst.tar" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_download_owt_plus_owt2_builds_the_seed_corpus_and_input_of_that_folder_gives_the_same(tmp_path, capsys):
    owt = owt_subset_tar(tmp_path / "payload.tar", 20)
    docs = write_owt2_tar(tmp_path / "openwebtext2.jsonl.zst.tar")
    owt2 = (tmp_path / "openwebtext2.jsonl.zst.tar").read_bytes()
    downloads = tmp_path / "downloads"
    with LocalHub({OWT_SUBSET: (owt, hashlib.sha256(owt).hexdigest()),
                   OWT2_FILE: (owt2, hashlib.sha256(owt2).hexdigest())}) as hub:
        result = prep(capsys, "--download", "owt+owt2", "--hub_url", hub.url, "--download_dir", downloads, "--out_dir",
                     tmp_path / "out", "--bpe_dir", bpe_dir(), "--val_fraction", 0.2)
    assert result.returncode == 0, result.stderr
    assert "download openwebtext2.jsonl.zst.tar: " in result.stdout  # the same progress lines as OWT's
    assert (downloads / "openwebtext2.jsonl.zst.tar").read_bytes() == owt2
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["corpus"] == "openwebtext1+2" and meta["settings"]["after"] == "2017-12"
    assert [d["corpus"] for d in meta["downloads"]] == ["openwebtext", "openwebtext2"]  # in --download's order
    owt2_stats, owt_stats = meta["corpora"]  # in file name order, as a folder lists them
    assert (owt_stats["name"], owt_stats["documents"], owt_stats["first_month"]) == ("openwebtext", 20, None)
    kept = [(i, t) for i, t, month in docs if month > "2017-12"]
    assert (owt2_stats["name"], owt2_stats["documents"], owt2_stats["files_before_cutoff"]) == (
        "openwebtext2", len(kept), 2) and len(kept) == 3
    assert (owt2_stats["first_month"], owt2_stats["last_month"]) == ("2018-01", "2020-04")
    assert owt_stats["tokens"] + owt2_stats["tokens"] == meta["train_tokens"] + meta["val_tokens"]
    owt2_ids = {i for i, _ in kept}
    assert {i for i in meta["val_document_ids"] if i.startswith("openwebtext2")} <= owt2_ids
    # the same folder as --input, with the cut-off given by hand: the same ids, split and bins
    again = prep(capsys, "--input", downloads, "--after", "2017-12", "--out_dir", tmp_path / "again", "--bpe_dir",
                 bpe_dir(), "--val_fraction", 0.2)
    assert again.returncode == 0, again.stderr
    assert json.loads((tmp_path / "again" / "meta.json").read_text())["val_document_ids"] == meta["val_document_ids"]
    for name in ("train.bin", "val.bin"):
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "out" / name).read_bytes()


# ----------------------------------------------------------------------------- OpenWebText2
def test_owt2_months_up_to_the_cutoff_are_left_out_unread(tmp_path, reference_encoding, capsys):
    months = dict(OWT2_MONTHS)
    docs = write_owt2_tar(tmp_path / "owt2.tar", months)
    with tarfile.open(tmp_path / "owt2.tar", "a") as tar:  # a month before the cut-off that cannot be read at all
        info = tarfile.TarInfo("2016-05.jsonl.zst")
        info.size = 9
        tar.addfile(info, io.BytesIO(b"not zstd!"))
    result = run("--input", tmp_path / "owt2.tar", "--after", "2017-12", "--bpe_dir", bpe_dir(), "--out_dir",
                 tmp_path / "out", "--val_fraction", 0.3, "--num_proc", 2)
    assert result.returncode == 0, result.stderr
    kept = [(i, t) for i, t, month in docs if month > "2017-12"]
    meta = check_round_trip(tmp_path / "out", kept, reference_encoding)
    assert meta["skipped"] == {}  # 2016-05 was never opened: not even counted as unreadable
    (corpus,) = meta["corpora"]
    assert (corpus["documents"], corpus["files_before_cutoff"], corpus["first_month"], corpus["last_month"]) == (
        3, 3, "2018-01", "2020-04")
    assert "3 monthly files up to 2017-12 left out" in result.stdout
    everything = prep(capsys, "--input", tmp_path / "owt2.tar", "--bpe_dir", bpe_dir(), "--out_dir", tmp_path / "all")
    assert everything.returncode == 0, everything.stderr
    meta = json.loads((tmp_path / "all" / "meta.json").read_text())
    assert meta["train_documents"] + meta["val_documents"] == len(docs) == 5
    assert meta["skipped"] == {"unreadable": 1} and meta["corpora"][0]["first_month"] == "2017-11"


def test_owt2_file_not_named_by_month_is_dated_by_its_first_reddit_submission(tmp_path, capsys):
    jan_2018 = 1514764800  # 2018-01-01T00:00:00Z
    records = [("kept: first submitted in January 2018", {"reddit_created_utc": [jan_2018 + 3600, jan_2018 + 99]}),
               ("dropped: the last second of 2017", {"reddit_created_utc": [jan_2018 - 1]}),
               ("dropped: submitted again in 2019, first in 2016", {"reddit_created_utc": [1560000000, 1460000000]}),
               ("kept, a number rather than a list", {"reddit_created_utc": jan_2018 + 86400 * 40}),
               ("undated: no metadata", {})]
    (tmp_path / "scrapes_1.jsonl.zst").write_bytes(owt2_month(records))
    args = ("--input", tmp_path / "scrapes_1.jsonl.zst", "--bpe_dir", bpe_dir(), "--after", "2017-12")
    result = prep(capsys, *args, "--out_dir", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["train_documents"] + meta["val_documents"] == 2
    assert meta["skipped"] == {"before_cutoff": 2, "undated": 1}
    assert (meta["corpora"][0]["first_month"], meta["corpora"][0]["last_month"]) == ("2018-01", "2018-02")
    strict = prep(capsys, *args, "--out_dir", tmp_path / "strict", "--strict")
    assert strict.returncode == 2 and "scrapes_1.jsonl.zst:5: no month" in strict.stderr


def test_without_zstandard_an_owt2_input_is_one_line_naming_pip_install(tmp_path, monkeypatch, capsys):
    write_owt2_tar(tmp_path / "openwebtext2.jsonl.zst.tar")
    for name in ("zstandard", "compression"):  # None in sys.modules: `import` raises ImportError
        monkeypatch.setitem(sys.modules, name, None)
    result = prep(capsys, "--input", tmp_path / "openwebtext2.jsonl.zst.tar", "--bpe_dir", bpe_dir(), "--out_dir",
                  tmp_path / "out")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "pip install zstandard" in result.stderr and "openwebtext2.jsonl.zst.tar" in result.stderr
    assert not (tmp_path / "out").exists()


def test_workers_read_the_members_of_plain_tars_and_the_main_process_only_compressed_streams(tmp_path):
    write_owt2_tar(tmp_path / "owt2.tar")
    owt_subset_tar(tmp_path / "urlsf_subset00.tar", 3)
    write_tar(tmp_path / "books.tar.gz", {"b.txt": b"a book"}, "w:gz")
    args = data_owt.parse_args(["--input", str(tmp_path), "--after", "2017-12"])
    files, _ = data_owt.list_input_files([("x", [tmp_path])])
    counts = data_owt.new_counts(len(files))
    tasks = list(data_owt.list_tasks(files, args, counts, data_owt.Progress()))
    assert [(t.name, t.kind, t.docs is None) for t in tasks] == [
        ("books.tar.gz", ".tar.gz", False),  # a gzip stream has no entry points: read here, documents to workers
        ("owt2.tar/2018-01.jsonl.zst", ".jsonl.zst", True), ("owt2.tar/2020-04.jsonl.zst", ".jsonl.zst", True),
        ("urlsf_subset00.tar/openwebtext/urlsf_subset00-1_data.xz", ".xz", True)]  # byte ranges: workers read them
    with open(tmp_path / "owt2.tar", "rb") as f:
        f.seek(tasks[1].offset)
        assert f.read(tasks[1].size) == owt2_month(OWT2_MONTHS["2018-01"])
    assert [s["files_before_cutoff"] for s in counts["sources"]] == [0, 2, 0]


# ----------------------------------------------------------------------------- robustness (issues 15 and 17)


def test_a_killed_worker_stops_the_run_with_one_line_and_publishes_nothing(tmp_path):
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "data_owt.py", "--input", require_shared("text_corpus/gutenberg"),
                                "--bpe_dir", bpe_dir(), "--out_dir", out, "--num_proc", "2"], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and process.poll() is None and not (
            list(out.glob("parts.*.tmp/*")) and len(children_of(process.pid)) >= 2):
        time.sleep(0.05)
    os.kill(children_of(process.pid)[0], signal.SIGKILL)  # as the kernel's OOM killer would
    _, stderr = process.communicate(timeout=60)  # before: Pool waited forever for the dead worker's task
    assert process.returncode == 1, stderr
    assert stderr.startswith("error: a worker process died") and len(stderr.strip().splitlines()) == 1
    assert list(out.iterdir()) == []


def test_a_long_document_is_encoded_in_pieces_with_the_same_tokens(reference_encoding):
    ours = data_owt.get_encoding(bpe_dir())
    text = require_shared("text_corpus/gutenberg/Carroll_Lewis/Alice_s_Adventures_in_Wonderland.txt").read_text()
    text = text[:30_000] + " x  y\u00a0z 12 345 \u65e5\u672c \U0001f600!! 'll 've  \t\n\n end "
    for chunk in (7, 64, 1000):
        assert data_owt.encode_document(ours, text, chunk).tolist() == reference_encoding.encode_ordinary(text) + [EOT]
    no_cut = "a" * 5000  # no space after a letter or digit: encoded whole, still right
    assert data_owt.safe_cut(no_cut, 100, 0) == 5000
    assert data_owt.encode_document(ours, no_cut, 100).tolist() == reference_encoding.encode_ordinary(no_cut) + [EOT]


def peak_rss_kb(tmp_path, document, name):
    """Peak RSS (KiB) of data_owt.py preparing a .jsonl of one document, in one process: VmHWM, the high-water
    mark of this program's memory (ru_maxrss would keep the larger peak of the forking pytest process)."""
    (tmp_path / f"{name}.jsonl").write_text(json.dumps({"text": document}) + "\n")
    probe = ("import re, sys, data_owt; code = data_owt.main(sys.argv[1:]); "
             "print('PEAK', re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1], code)")
    result = subprocess.run([sys.executable, "-c", probe, "--input", str(tmp_path / f"{name}.jsonl"), "--bpe_dir",
                             str(bpe_dir()), "--out_dir", str(tmp_path / name), "--num_proc", "1"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    peak, code = result.stdout.split("PEAK ")[1].split()
    assert code == "0", result.stderr
    return int(peak)


@pytest.mark.slow
def test_a_long_single_line_document_keeps_memory_bounded(tmp_path):
    words = require_shared("text_corpus/gutenberg/Austen_Jane/Emma.txt").read_text().split()
    document = (" ".join(words) * 8)[:6_000_000]
    extra_kb = peak_rss_kb(tmp_path, document, "long") - peak_rss_kb(tmp_path, "short", "short")
    # the file, its line, the text (twice: str and bytes) and the tokens: ~4x; tiktoken on the whole text: ~12x
    assert extra_kb * 1024 < 6 * len(document)


def test_crlf_and_lone_cr_become_lf_unless_newlines_keep(tmp_path, reference_encoding, capsys):
    text = "one\r\ntwo\rthree\n\r\nfour"
    (tmp_path / "doc.txt").write_bytes(text.encode())
    for newlines, expected in (("lf", "one\ntwo\nthree\n\nfour"), ("keep", text)):
        out = tmp_path / newlines
        result = prep(capsys, "--input", tmp_path / "doc.txt", "--bpe_dir", bpe_dir(), "--out_dir", out, "--newlines",
                      newlines)
        assert result.returncode == 0, result.stderr
        assert read_docs(out / "train.bin", reference_encoding) + read_docs(out / "val.bin", reference_encoding) == [
            expected]
