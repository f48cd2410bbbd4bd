"""data_owt.py: token bins that decode back to the documents, a split that is a pure function of
(seed, document id), and no output that looks complete unless it is."""
import errno
import hashlib
import io
import json
import lzma
import os
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

from conftest import require_shared

import data_owt

ROOT = Path(__file__).resolve().parents[1]
EOT = 50256


# ----------------------------------------------------------------------------- helpers
def run(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "data_owt.py", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)


def bpe_dir():
    return require_shared("gpt2_bpe")


@pytest.fixture
def reference_encoding(monkeypatch):
    """tiktoken's own gpt2 encoding, loaded offline from the shared tiktoken cache (the independent reference)."""
    import tiktoken
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(require_shared("gpt2_bpe/tiktoken_cache")))
    return tiktoken.get_encoding("gpt2")


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
    docs += [("docs/a.txt", texts["a.txt"]), ("docs/c.xz", "xz-compressed plain text document."),
             ("docs/sub/b.txt", texts["sub/b.txt"])]
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
    return [folder, root / "web.jsonl", root / "openwebtext.tar.xz", root / "urlsf_subset01.tar",
            root / "books.tar.gz"], docs


def check_round_trip(out_dir, docs, encoding):
    meta = json.loads((out_dir / "meta.json").read_text())
    val_ids = set(meta["val_document_ids"])
    assert val_ids <= {doc_id for doc_id, _ in docs}
    assert read_docs(out_dir / "train.bin", encoding) == [t for i, t in docs if i not in val_ids]
    assert read_docs(out_dir / "val.bin", encoding) == [t for i, t in docs if i in val_ids]
    return meta


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
    assert meta["train_documents"] + meta["val_documents"] == len(docs) == 21
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
def test_split_is_a_hash_of_seed_and_document_id_with_nanogpt_share():
    ids = [f"urlsf_subset{i % 21:02d}.tar/doc{i}.txt" for i in range(200_000)]
    val = [i for i in ids if data_owt.split_value(2357, i) < 0.0005]
    assert abs(len(val) - 100) < 4 * 10  # binomial(200k, 0.0005): mean 100, sd 10
    assert val == [i for i in ids if data_owt.split_value(2357, i) < 0.0005]  # a pure function
    assert val != [i for i in ids if data_owt.split_value(1, i) < 0.0005]  # the seed matters


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
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == returncode, stderr
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
    """A stand-in for the Hugging Face Hub on 127.0.0.1: the tree listing (with each LFS file's sha256) and
    one subset file served with HTTP Range support. Records the Range start of every file request."""
    def __init__(self, data, published_sha256):
        listing = [{"type": "file", "path": "subsets/urlsf_subset00.tar", "size": len(data),
                    "lfs": {"oid": published_sha256, "size": len(data), "pointerSize": 134}}]
        self.ranges = ranges = []

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path == "/api/datasets/Skylion007/openwebtext/tree/main/subsets":
                    body, status = json.dumps(listing).encode(), 200
                else:
                    assert self.path == "/datasets/Skylion007/openwebtext/resolve/main/subsets/urlsf_subset00.tar"
                    start = int(self.headers["Range"][6:-1]) if self.headers.get("Range") else 0
                    ranges.append(start)
                    body, status = data[start:], 206 if start else 200
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


def owt_subset_tar(path, n_docs):
    write_tar(path, {"openwebtext/urlsf_subset00-1_data.xz": xz_tar({f"{k}.txt": f"page {k} " * 40
                                                                      for k in range(n_docs)})}, "w")
    return path.read_bytes()


def test_download_resumes_a_partial_file_verifies_sha256_and_prepares(tmp_path):
    data = owt_subset_tar(tmp_path / "payload.tar", 30)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    (downloads / "urlsf_subset00.tar.part").write_bytes(data[:1000])  # an earlier, interrupted download
    with LocalHub(data, hashlib.sha256(data).hexdigest()) as hub:
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
    with LocalHub(data, "0" * 64) as hub:
        result = run("--download", "--hub_url", hub.url, "--download_dir", tmp_path / "dl", "--out_dir",
                     tmp_path / "out", "--bpe_dir", bpe_dir())
    assert result.returncode == 2 and "sha256" in result.stderr and "run again" in result.stderr
    assert list((tmp_path / "dl").iterdir()) == [] and not (tmp_path / "out").exists()
