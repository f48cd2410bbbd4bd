"""Tokenize a text corpus (OpenWebText, OpenWebText2, or any local text) with GPT-2's BPE into uint16 token bins.

Writes to --out_dir:  train.bin, val.bin  (uint16 token ids, read by gpt_staged.py as np.memmap)
                      meta.json           (token counts, samples of n_ctx, tokenizer, sources, settings)
Every document is followed by <|endoftext|> (50256). Each document goes to train or val by a hash of (seed, the
document's bytes), so the split depends neither on file names, order or layout nor on the number of worker
processes; default: nanoGPT's 0.05% of documents with seed 2357, and at least one validation document whenever
there are two or more. Documents are kept as published, except that CRLF and lone CR line ends become LF
(--newlines keep: byte for byte); Project Gutenberg books keep their licence header and footer unless
--strip_gutenberg.

Local run (the project's CPU stand-in for OpenWebText; tokenizer files from ../shared/data, no network):
    python data_owt.py --input ../shared/data/text_corpus/gutenberg --bpe_dir ../shared/data/gpt2_bpe \
        --out_dir data/gutenberg
Full OpenWebText (21 x ~630 MB tar files from Hugging Face, ~13 GB, then ~9B tokens, ~17 GB of bins):
    python data_owt.py --download --out_dir data/owt
The seed's corpus: OpenWebText plus the OpenWebText2 months after OpenWebText's (2018-01 .. 2020-04; OWT2 is one
29.3 GB tar of monthly .jsonl.zst files; reading it needs `pip install zstandard` before Python 3.14):
    python data_owt.py --download owt+owt2 --out_dir data/owt12
The same corpora from files you already have (HF's urlsf_subset*.tar, the Zenodo openwebtext.tar.xz, an
extracted folder of urlsf_subset*.xz, openwebtext2.jsonl.zst.tar or its YYYY-MM.jsonl.zst files, .txt files, or
.jsonl with a "text" field):
    python data_owt.py --input path/to/subsets path/to/openwebtext2.jsonl.zst.tar --after 2017-12 --out_dir data/owt12

A run is complete iff meta.json exists and the bins have the sizes it records; meta.json is written last.
A re-run with unchanged input and settings prints "up to date" and does nothing.
"""
import argparse
import contextlib
import difflib
import errno
import hashlib
import io
import json
import lzma
import multiprocessing
import os
import re
import shutil
import signal
import socket
import sys
import tarfile
import threading
import time
import urllib.request
from collections import deque
from concurrent.futures import ProcessPoolExecutor, TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np

# ----------------------------------------------------------------------------- settings
EOT = 50256                 # GPT-2's <|endoftext|>, appended after every document (as nanoGPT does)
VOCAB_SIZE = 50257          # ids 0..50256 fit in uint16
N_CTX = 1024                # seed: n_ctx 1024
VAL_FRACTION = 0.0005       # nanoGPT's OWT split: 0.05% of documents (4,007 of 8,013,769) go to validation
SEED = 2357                 # nanoGPT's split seed; here it salts the per-document hash
BATCH_BYTES = 1 << 20       # text per task when the main process reads a file for the workers (bounded memory)
ENCODE_CHARS = 1 << 20      # a longer document is encoded a piece at a time (bounded memory; see encode_document)
CONNECT_TIMEOUT = 10        # seconds; offline, fail at once instead of retrying for minutes
PROGRESS_EVERY = 5.0        # seconds between progress lines
HUB_URL = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
# What --download fetches: corpus name, Hugging Face dataset, its folder, the suffix of the files to take.
DOWNLOADS = {
    "owt": ("openwebtext", "Skylion007/openwebtext", "subsets", ".tar"),  # urlsf_subset00..20.tar (Git LFS)
    # OpenWebText2's "plug and play" release (the Pile's component, MIT): openwebtext2.jsonl.zst.tar, 29.3 GB,
    # 17,103,059 documents (openwebtext2.readthedocs.io), copied to the Hub by its card's author.
    "owt2": ("openwebtext2", "segyges/OpenWebText2", "", ".jsonl.zst.tar"),
}
# The date cut-off for the seed's corpus ("the OpenWebText2 components scraped after the creation of OWT"):
# OpenWebText2's own background page says "Coverage of the original OpenWebTextCorpus ended at December 2017", as
# GPT-2's WebText ("Scrape URLs from all Reddit submissions up to December 2017"), and OWT2 covers "all Reddit
# submissions from 2005 up until April 2020", one file per month of submissions (YYYY-MM.jsonl.zst). So the seed's
# OWT2 part is the months 2018-01 .. 2020-04: --after 2017-12, the default whenever --download takes OWT2.
OWT_LAST_MONTH = "2017-12"
# ----------------------------------------------------------------------------- tokenizer
# GPT-2's pre-tokenizer regex (openai/gpt-2 encoder.py), written with possessive quantifiers as tiktoken's
# r50k/gpt2 encoding writes it: the same splits, without the backtracking.
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def bytes_to_unicode():
    """GPT-2's map from the 256 byte values to printable characters (encoder.json keys are spelled in them)."""
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {b: chr(b) for b in visible}, 0
    for b in range(256):
        if b not in chars:
            chars[b], extra = chr(256 + extra), extra + 1
    return chars


def sha256_of(path, chunk=1 << 22):
    """The running sha256 of a file's bytes (a hashlib object, so a download can go on updating it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest


@lru_cache(maxsize=None)
def encoding_from_bpe_dir(bpe_dir):
    """Build tiktoken's GPT-2 Encoding from encoder.json + vocab.bpe (no network, no cache)."""
    import tiktoken
    encoder_path, merges_path = Path(bpe_dir) / "encoder.json", Path(bpe_dir) / "vocab.bpe"
    if Path(bpe_dir).exists() and not Path(bpe_dir).is_dir():
        raise ValueError(f"--bpe_dir {bpe_dir} is a file, not a folder: give the folder that holds GPT-2's "
                         "encoder.json and vocab.bpe (this project ships them in ../shared/data/gpt2_bpe)")
    for path in (encoder_path, merges_path):
        if not path.is_file():
            what = "not found" if not path.exists() else f"is {not_a_file(path)}"
            raise FileNotFoundError(f"{path} {what}: --bpe_dir must hold GPT-2's encoder.json and vocab.bpe "
                                    "(this project ships them in ../shared/data/gpt2_bpe)")
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    try:
        encoder = json.loads(encoder_path.read_text(encoding="utf-8"))
    except ValueError as e:  # JSON or UTF-8: a cut-off or foreign file; the message would name no file
        raise ValueError(f"{encoder_path}: not GPT-2's encoder.json ({str(e)[:120]}); use ../shared/data/gpt2_bpe")\
            from None
    if not isinstance(encoder, dict):
        raise ValueError(f"{encoder_path}: a JSON {type(encoder).__name__}, not GPT-2's {{token: id}} object; use "
                         "../shared/data/gpt2_bpe")
    ranks = {bytes(byte_of[c] for c in token): rank for token, rank in encoder.items() if token != "<|endoftext|>"}
    # tiktoken merges by rank, so rank order must be merge order: merge i of vocab.bpe makes token 256 + i
    merges = [line.split() for line in merges_path.read_text(encoding="utf-8").splitlines()[1:] if line]
    ok = len(ranks) == EOT and all(len(m) == 2 and encoder.get(m[0] + m[1]) == 256 + i for i, m in enumerate(merges))
    if not ok or encoder.get("<|endoftext|>") != EOT:
        raise ValueError(f"{bpe_dir}: encoder.json and vocab.bpe are not GPT-2's BPE (ranks do not follow the "
                         "merges, or the vocabulary is not 50257); use ../shared/data/gpt2_bpe")
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PAT_STR, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT}, explicit_n_vocab=VOCAB_SIZE)


def get_encoding(bpe_dir=None):
    """GPT-2 BPE as a tiktoken Encoding: from bpe_dir if given, else tiktoken's cache (TIKTOKEN_CACHE_DIR)."""
    if bpe_dir:
        return encoding_from_bpe_dir(str(Path(bpe_dir).resolve()))
    import tiktoken
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(CONNECT_TIMEOUT)  # tiktoken fetches without a timeout when the cache is empty
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # requests' connection errors, a bad cached file, ...
        reason = str(e).splitlines()[0][:200]
        raise ValueError(f"cannot load tiktoken's GPT-2 BPE ({type(e).__name__}: {reason}); offline? Pass "
                         "--bpe_dir ../shared/data/gpt2_bpe, or set TIKTOKEN_CACHE_DIR to the absolute path of "
                         "../shared/data/gpt2_bpe/tiktoken_cache") from None
    finally:
        socket.setdefaulttimeout(previous)


def tokenizer_source(bpe_dir):
    if bpe_dir:
        folder = Path(bpe_dir).resolve()
        hashes = {name: sha256_of(folder / name).hexdigest() for name in ("encoder.json", "vocab.bpe")}
        return {"bpe_dir": str(folder), "sha256": hashes}
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or "<tmp>/data-gym-cache"
    return {"tiktoken_cache": cache}


def safe_cut(text, target, start):
    """A place in text near target where cutting leaves GPT-2's pre-tokenization, hence the tokens, unchanged.

    The pre-tokenizer (GPT2_PAT_STR) only makes pieces that are all whitespace or one optional leading space
    plus non-whitespace; so just before a space that follows a letter or digit, one piece ends and the next
    begins, whatever comes after, and encoding the two sides apart gives the same tokens as encoding the whole.
    Returns len(text) if there is no such place after start (then the rest is encoded whole).
    """
    lo, hi = start + 1, target
    while (i := text.rfind(" ", lo, hi)) > 0:  # the nearest one before target...
        if text[i - 1].isalnum():
            return i
        hi = i
    i = target - 1
    while (i := text.find(" ", i + 1)) > 0:  # ...or, failing that, after it
        if text[i - 1].isalnum():
            return i
    return len(text)


def encode_document(encoding, text, chunk=None):
    """GPT-2 tokens of one document followed by EOT, as uint16. A text longer than `chunk` characters is cut at
    safe places (safe_cut) and encoded a piece at a time: the same tokens, with the encoder's memory bounded by
    the piece. A 51 MB single-line .jsonl document took the process to a peak of 882 MiB encoded whole (16x its
    size above the 79 MiB of a tiny one; tiktoken's list of Python ints alone is 36 bytes a token) and to 305 MiB
    in pieces (4.6x: the text's own copies, str and bytes, and the tokens). tests/test_data_owt.py checks 6 MB."""
    chunk = chunk or ENCODE_CHARS
    if len(text) <= chunk:
        return np.array(encoding.encode_ordinary(text) + [EOT], dtype=np.uint16)
    pieces, start = [], 0
    while start < len(text):
        end = safe_cut(text, start + chunk, start) if start + chunk < len(text) else len(text)
        pieces.append(np.array(encoding.encode_ordinary(text[start:end]), dtype=np.uint16))
        start = end
    return np.concatenate(pieces + [np.array([EOT], dtype=np.uint16)])


# ----------------------------------------------------------------------------- download (online only)
def http_open(url, offset=0):
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    return urllib.request.urlopen(request, timeout=CONNECT_TIMEOUT)  # one try: no retry loop


def format_eta(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def download_file(url, dest, size, sha256):
    """Fetch url into dest via dest.part, resuming with an HTTP Range request; verify size and sha256."""
    part = dest.with_name(dest.name + ".part")
    if dest.exists() and dest.stat().st_size == size and sha256_of(dest).hexdigest() == sha256:
        print(f"{dest.name}: already downloaded and verified")
        return
    have = part.stat().st_size if part.exists() else 0
    digest = sha256_of(part) if have else hashlib.sha256()  # bytes already on disk count towards the checksum
    try:
        with (http_open(url, have) if have < size else io.BytesIO()) as response:  # empty: .part is whole
            if have and getattr(response, "status", 206) != 206:  # the server ignored Range: start over
                have, digest = 0, hashlib.sha256()
            with open(part, "ab" if have else "wb") as f:
                t0, start, last = time.time(), have, 0.0
                while block := response.read(1 << 20):
                    f.write(block)
                    digest.update(block)
                    have += len(block)
                    now = time.time()
                    if now - last > 2 or have == size:
                        rate = (have - start) / max(now - t0, 1e-9)
                        print(f"download {dest.name}: {have / 1e6:,.0f}/{size / 1e6:,.0f} MB | {rate / 1e6:.1f} MB/s"
                              f" | ETA {format_eta((size - have) / max(rate, 1))}", flush=True)
                        last = now
                f.flush()
                os.fsync(f.fileno())
    except OSError as e:  # network trouble (or a full disk): what arrived stays in the .part file
        raise ValueError(f"download of {url} stopped at {have:,} of {size:,} bytes ({getattr(e, 'reason', e)}); "
                         f"run again to resume from {part}") from None
    if have != size or digest.hexdigest() != sha256:
        part.unlink()
        raise ValueError(f"{dest}: downloaded {have} bytes with sha256 {digest.hexdigest()}, but the published file "
                         f"has {size} bytes and sha256 {sha256}; the partial file was removed, run again")
    os.replace(part, dest)


def download_dataset(hub_url, which, download_dir):
    """Download one corpus of DOWNLOADS from the Hugging Face Hub; returns [{file, bytes, sha256, url}]."""
    corpus, repo, folder, suffix = DOWNLOADS[which]
    listing = f"{hub_url}/api/datasets/{repo}/tree/main" + (f"/{folder}" if folder else "")
    try:
        with http_open(listing) as response:
            entries = json.load(response)
    except OSError as e:  # urllib's URLError included
        raise ValueError(f"cannot reach {hub_url} to download {corpus} ({getattr(e, 'reason', e)}); offline? "
                         "Prepare local files instead with --input PATH [PATH ...] (a folder, .txt, .xz, .tar, "
                         ".tar.xz, .jsonl or .jsonl.zst; e.g. the urlsf_subset*.tar files or "
                         "openwebtext2.jsonl.zst.tar copied from an online machine)") from None
    # The Hub publishes each Git LFS file's sha256 (its LFS oid) in this listing: we verify every byte against it.
    files = sorted((e for e in entries if e.get("path", "").endswith(suffix) and "lfs" in e), key=lambda e: e["path"])
    if not files:
        raise ValueError(f"{listing} lists no {suffix} files; download them yourself and pass --input")
    download_dir.mkdir(parents=True, exist_ok=True)
    print(f"{corpus}: downloading {len(files)} files, {sum(e['lfs']['size'] for e in files) / 1e9:.1f} GB, "
          f"to {download_dir}")
    records = []
    for entry in files:
        url = f"{hub_url}/datasets/{repo}/resolve/main/{entry['path']}"
        dest = download_dir / Path(entry["path"]).name
        download_file(url, dest, entry["lfs"]["size"], entry["lfs"]["oid"])
        records.append({"corpus": corpus, "file": str(dest), "bytes": entry["lfs"]["size"],
                        "sha256": entry["lfs"]["oid"], "url": url})
    return records


# ----------------------------------------------------------------------------- reading documents
KINDS = (".jsonl.zst", ".tar.xz", ".tar.gz", ".tgz", ".tar", ".jsonl", ".txt", ".xz")  # longest suffix first
READ_ERRORS = (OSError, EOFError, lzma.LZMAError, tarfile.TarError)
MONTH_NAME = re.compile(r"(?:^|/)(\d{4})-(\d{2})\.jsonl\.zst$")  # OpenWebText2: one file a month, 2005-06.jsonl.zst


class MissingPackage(ValueError):
    pass


class Doc(NamedTuple):
    """One document as read: its id, its bytes as published, its month (YYYY-MM) if dated, and whether it comes
    from a dated corpus (OpenWebText2's .jsonl.zst), where a document without a date is suspect."""
    id: str
    raw: bytes
    month: str | None
    dated: bool


def kind_of(name):
    return next((kind for kind in KINDS if name.lower().endswith(kind)), None)


def month_of_name(name):
    """OpenWebText2's month of Reddit submissions from its file name (2018-01.jsonl.zst -> "2018-01"), else None."""
    match = MONTH_NAME.search(name)
    return f"{match[1]}-{match[2]}" if match else None


def month_of_meta(meta):
    """The month of the first Reddit submission of a document, from OpenWebText2's scrape metadata
    ("reddit_created_utc: list of submissions created times", openwebtext2.readthedocs.io/en/latest/replication),
    for .jsonl.zst files that are not named by month; None if absent."""
    created = meta.get("reddit_created_utc") if isinstance(meta, dict) else None
    created = [created] if isinstance(created, (int, float)) else created
    try:
        return time.strftime("%Y-%m", time.gmtime(min(float(c) for c in created)))
    except (TypeError, ValueError, OverflowError, OSError):
        return None


def before_cutoff(month, after):
    return after is not None and month is not None and month <= after


OTHER_TYPE = "not a kind of file this script reads"


def not_a_file(path):
    """What stands at an existing path that is not a regular file, for a message."""
    return "a folder" if path.is_dir() else "not a regular file (a FIFO, socket or device)"


def walk_files(folder, ignored):
    """Every entry below folder that is not a folder, following symlinked folders, as paths under folder, sorted
    by their parts. Each real folder is read once (so a link to an ancestor ends); a folder reached again goes to
    `ignored` with the path it was read by. Subfolders are walked in name order, so which path that is does not
    depend on the file system's listing order."""
    found, seen = [], {}
    for top, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:
            ignored.append((Path(top), f"the same folder as {seen[real]}: its files are read once"))
            dirs.clear()
            continue
        seen[real] = Path(top)
        dirs.sort()
        found += [Path(top) / name for name in names]
    return sorted(found, key=lambda p: p.relative_to(folder).parts)


def list_input_files(groups):
    """([(path, document id prefix, corpus)], [(path, why it is not read)]) in a fixed order, from
    [(corpus, [paths])]: folders walked recursively (symlinked folders too), names sorted. Ids are relative to
    the folder or file given, so `--input DIR` and `--download` (which passes DIR's files one by one) give the
    same ids. A file reached twice (given by two paths, or linked) is read once: two ids for one document could
    put it in both train and val."""
    files, ignored, first = [], [], {}

    def add(path, name, corpus):
        real = path.resolve()
        if real in first:
            again = "given twice" if path == first[real] else f"the same file as {first[real]}"
            ignored.append((path, f"{again}: its documents are read once"))
        else:
            first[real] = path
            files.append((path, name, corpus))
    for corpus, paths in groups:
        for given in paths:
            path = Path(given)
            if path.is_dir():
                for p in walk_files(path, ignored):
                    if not p.is_file():
                        ignored.append((p, not_a_file(p) if p.exists() else "a broken link"))
                    elif not kind_of(p.name):
                        ignored.append((p, OTHER_TYPE))
                    else:
                        add(p, p.relative_to(path).as_posix(), corpus)
            elif path.is_file():
                if not kind_of(path.name):
                    raise ValueError(f"{path}: unsupported input type; expected a folder or a file ending in "
                                     f"{', '.join(KINDS)}")
                add(path, path.name, corpus)
            elif path.exists():
                raise ValueError(f"--input {path} is {not_a_file(path)}; --input takes folders and files of "
                                 "documents (save a stream to a file first)")
            else:
                raise FileNotFoundError(f"{path} does not exist; --input takes folders and files of documents")
    return files, ignored


class CountingReader(io.RawIOBase):
    """Reads at most `limit` bytes of a file (a tar member, or all of it) and counts them into the progress, so
    progress and ETA follow the input."""
    def __init__(self, raw, progress, limit=None):
        self.raw, self.progress, self.left = raw, progress, limit

    def readable(self):
        return True

    def readinto(self, buffer):
        if self.left is not None:
            buffer = memoryview(buffer)[:self.left]
        n = self.raw.readinto(buffer) or 0
        if self.left is not None:
            self.left -= n
        self.progress.add(input_bytes=n)
        return n


class Replay:
    """Gives back `head` (bytes already read to look at a stream) first, then the rest of the stream `f`."""
    def __init__(self, head, f):
        self.head, self.f = head, f

    def read(self, n=-1):
        if n is None or n < 0:
            out, self.head = self.head + self.f.read(), b""
        else:
            out, self.head = self.head[:n], self.head[n:]
        return out or self.f.read(n)


def zstd_reader(f, name):
    """A decompressing reader over f and the error class of the library used: Python's own compression.zstd
    (3.14+), else the optional zstandard package, imported only now, when a .zst file is read."""
    try:
        from compression import zstd
        return zstd.ZstdFile(f), zstd.ZstdError
    except ImportError:
        pass
    try:
        import zstandard
    except ImportError:
        raise MissingPackage(f"{name}: reading .zst files needs the zstandard package: pip install zstandard "
                             "(or use Python 3.14+, which has compression.zstd)") from None
    # read_across_frames: a .zst file may hold several frames, one after another
    stream = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)
    return io.BufferedReader(stream, 1 << 20), zstandard.ZstdError


def skip(counts, kind, name, reason, strict):
    if strict:
        raise ValueError(f"{name}: {reason} (drop --strict to skip such files with a count)")
    counts["skipped"][kind] = counts["skipped"].get(kind, 0) + 1
    if len(counts["skipped_examples"]) < 5:
        counts["skipped_examples"].append(f"{name} ({reason})")


def jsonl_documents(f, name, args, counts, dated):
    """Documents of a JSON-lines stream: the --text_field of each line (OpenWebText2: {"text", "meta"})."""
    month = month_of_name(name)
    for line_number, line in enumerate(f, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            raw = record[args.text_field].encode("utf-8")
        except (ValueError, KeyError, TypeError, AttributeError):
            skip(counts, "bad_jsonl", f"{name}:{line_number}", f"not a JSON object with a string field "
                 f"'{args.text_field}' (see --text_field)", args.strict)
            continue
        doc = Doc(f"{name}:{line_number}", raw, month or month_of_meta(record.get("meta")), dated)
        line = record = None  # a 50 MB line is three copies of the document: hold only the bytes while it is encoded
        yield doc


def documents_in_stream(f, name, kind, args, counts):
    """Documents (Doc) from one stream; archives are walked member by member, never extracted."""
    if kind == ".txt":
        yield Doc(name, f.read(), None, False)
    elif kind == ".jsonl":
        yield from jsonl_documents(f, name, args, counts, dated=False)
    elif kind == ".jsonl.zst":  # OpenWebText2: zstd-compressed JSON lines, one file per month
        reader, zstd_error = zstd_reader(f, name)
        try:
            yield from jsonl_documents(reader, name, args, counts, dated=True)
        except zstd_error as e:
            raise OSError(f"zstd: {e}") from None
    elif kind == ".xz":  # xz text, or an xz tar (OpenWebText's urlsf_subsetNN-M_data.xz hold .txt documents)
        unpacked = lzma.open(f)
        head = unpacked.read(512)
        if len(head) == 512 and head[257:262] == b"ustar":  # the tar header's magic
            yield from documents_in_stream(Replay(head, unpacked), name, ".tar", args, counts)
        else:
            yield Doc(name, head + unpacked.read(), None, False)
    else:  # .tar, .tar.xz, .tar.gz: stream mode reads members in order, so nothing is extracted to disk
        with tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                member_kind = kind_of(member.name) if member.isfile() else None
                if not member_kind:
                    continue
                member_name = f"{name}/{member.name}"
                if before_cutoff(month_of_name(member_name), args.after):  # a whole month to leave out: unread
                    counts["files_before_cutoff"] += 1
                    continue
                try:  # a damaged member is skipped; the archive goes on with the next one
                    yield from documents_in_stream(tar.extractfile(member), member_name, member_kind, args, counts)
                except READ_ERRORS as e:
                    skip(counts, "unreadable", member_name, f"unreadable: {type(e).__name__}: {e}", args.strict)


def plain_tar_members(path):
    """([(member name, data offset, size)], error) for the regular files of an uncompressed tar, read from its
    headers alone (seeking over the data), or (None, None) if the file is not an uncompressed tar. A damaged
    header ends the list, with the error."""
    members = []
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if member.isreg():
                    members.append((member.name, member.offset_data, member.size))
    except READ_ERRORS as e:
        if not members and isinstance(e, tarfile.ReadError):
            return None, None  # not a plain tar (compressed, or not a tar at all): read it as a stream
        return members, f"unreadable after {len(members)} files: {type(e).__name__}: {e}"
    return members, None


# ----------------------------------------------------------------------------- the work: tasks
class Task(NamedTuple):
    """One unit of work for a worker process: either a byte range of a file (a whole file, or one member of an
    uncompressed tar such as an OWT subset's urlsf_subsetNN-M_data.xz or an OWT2 month) that the worker reads,
    decompresses and parses itself, or documents the main process has read already (from a compressed tar or
    a .jsonl, which can only be read from the start)."""
    source: int                  # index into the input files
    name: str                    # the document id, or id prefix
    kind: str
    path: str | None = None
    offset: int = 0
    size: int = 0
    docs: tuple | None = None    # (Doc, ...) when the main process read them


def new_counts(n_sources=0):
    """Tallies of a task, or of the run (with one entry per input file under "sources")."""
    return {"docs": {"train": 0, "val": 0}, "tokens": {"train": 0, "val": 0}, "text_bytes": 0, "skipped": {},
            "skipped_examples": [], "files_before_cutoff": 0, "months": [],
            "sources": [{"documents": 0, "tokens": 0, "first_month": None, "last_month": None,
                         "files_before_cutoff": 0} for _ in range(n_sources)]}


def list_tasks(files, args, counts, progress):
    """The tasks, in a fixed order (so the bins do not depend on --num_proc); files read by the main process
    are read here, lazily, a batch of about --batch_bytes at a time."""
    for source, (path, name, _) in enumerate(files):
        kind = kind_of(name)
        members, error = plain_tar_members(path) if kind == ".tar" else (None, None)
        if error:
            skip(counts, "unreadable", str(path), error, args.strict)
        if members is not None:
            for member, offset, size in members:
                member_kind, member_name = kind_of(member), f"{name}/{member}"
                if not member_kind:
                    continue
                if before_cutoff(month_of_name(member_name), args.after):  # a whole month to leave out: unread
                    counts["sources"][source]["files_before_cutoff"] += 1
                    progress.add(input_bytes=size)
                    continue
                yield Task(source, member_name, member_kind, str(path), offset, size)
        elif kind in (".tar", ".tar.xz", ".tar.gz", ".tgz", ".jsonl"):
            yield from read_in_main(path, name, kind, source, args, counts, progress)
        else:
            yield Task(source, name, kind, str(path), 0, path.stat().st_size)


def read_in_main(path, name, kind, source, args, counts, progress):
    """Tasks of documents read by the main process from one file (a compressed stream has no entry points)."""
    batch, size = [], 0
    stream_counts = new_counts()
    try:
        with open(path, "rb", buffering=0) as raw:
            for doc in documents_in_stream(io.BufferedReader(CountingReader(raw, progress), 1 << 20),
                                           name, kind, args, stream_counts):
                batch.append(doc)
                size += len(doc.raw)
                if size >= args.batch_bytes:
                    yield Task(source, name, kind, docs=tuple(batch))
                    batch, size = [], 0
    except READ_ERRORS as e:
        skip(stream_counts, "unreadable", str(path), f"unreadable: {type(e).__name__}: {e}", args.strict)
    finally:
        merge_counts(counts, stream_counts, source)
    if batch:
        yield Task(source, name, kind, docs=tuple(batch))


def merge_counts(counts, part, source):
    """Add one task's (or one reader's) tallies to the run's totals and to its source's."""
    for split in ("train", "val"):
        counts["docs"][split] += part["docs"][split]
        counts["tokens"][split] += part["tokens"][split]
    counts["text_bytes"] += part["text_bytes"]
    for kind, n in part["skipped"].items():
        counts["skipped"][kind] = counts["skipped"].get(kind, 0) + n
    counts["skipped_examples"] += part["skipped_examples"][:5 - len(counts["skipped_examples"])]
    stats = counts["sources"][source]
    stats["documents"] += part["docs"]["train"] + part["docs"]["val"]
    stats["tokens"] += part["tokens"]["train"] + part["tokens"]["val"]
    stats["files_before_cutoff"] += part["files_before_cutoff"]
    months = [m for m in (stats["first_month"], stats["last_month"], *part["months"]) if m]
    if months:
        stats["first_month"], stats["last_month"] = min(months), max(months)


# ----------------------------------------------------------------------------- split, text and tokens (workers)
def split_value(seed, raw):
    """A number in [0, 1) fixed by (seed, the document's bytes as published): the same on every machine, for
    every file name, layout, order and worker count; identical documents land on the same side."""
    digest = hashlib.blake2b(f"{seed}/".encode(), digest_size=8)
    digest.update(raw)
    return int.from_bytes(digest.digest(), "big") / 2**64


def strip_gutenberg(text):
    """Keep only the book: the lines between '*** START OF ...' and '*** END OF ...' (text unchanged if absent)."""
    start = re.search(r"^\*\*\* ?START OF.*$", text, re.M)
    end = re.search(r"^\*\*\* ?END OF", text[start.end():], re.M) if start else None
    return text[start.end():start.end() + end.start()].strip("\r\n") if end else text


def normalize_newlines(text):
    """CRLF and lone CR -> LF: one spelling of a line end, so "\\r\\n" does not cost a token more than "\\n"
    (GPT-2's BPE has no merge of "\\r" with "\\n"; web pages and books arrive with either)."""
    return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text


def document_text(doc, args, counts):
    """The text to tokenize from one document, or None (counted) when it is skipped."""
    if before_cutoff(doc.month, args.after):
        counts["skipped"]["before_cutoff"] = counts["skipped"].get("before_cutoff", 0) + 1
        return None
    if args.after is not None and doc.dated and doc.month is None:
        skip(counts, "undated", doc.id, "no month in its file name or metadata, so --after cannot place it",
             args.strict)
        return None
    try:
        text = doc.raw.decode("utf-8")
    except UnicodeDecodeError as e:
        skip(counts, "not_utf8", doc.id, f"not UTF-8 at byte {e.start}", args.strict)
        return None
    text = strip_gutenberg(text) if args.strip_gutenberg else text
    text = normalize_newlines(text) if args.newlines == "lf" else text
    if not text:
        counts["skipped"]["empty"] = counts["skipped"].get("empty", 0) + 1
        return None
    return text


class Progress:
    """Counters that the readers and workers advance (input bytes, documents, tokens, text bytes): a shared
    array across processes, or a list in one process, where `report` prints a line when one is due."""
    def __init__(self, array=None, report=None):
        self.array, self.report = (array if array is not None else [0, 0, 0, 0]), report

    def add(self, input_bytes=0, docs=0, tokens=0, text_bytes=0):
        lock = self.array.get_lock() if hasattr(self.array, "get_lock") else contextlib.nullcontext()
        with lock:
            for i, n in enumerate((input_bytes, docs, tokens, text_bytes)):
                self.array[i] += n
        if self.report:
            self.report()

    def values(self):
        return list(self.array)


_WORKER = {}  # per process: args, the parts folder, progress, the tokenizer


def exit_with_parent(parent):
    """A worker whose parent is gone (kill -9) would go on writing, or wait for work forever: end it."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def init_worker(args, parts, progress_array, in_process=False):
    if not in_process:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is handled once, by the main process
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # and stopping the pool ends workers quietly
        threading.Thread(target=exit_with_parent, args=(os.getppid(),), daemon=True).start()
    _WORKER.update(args=args, parts=Path(parts), encoding=get_encoding(args.bpe_dir),
                   progress=progress_array if in_process else Progress(progress_array))


def task_documents(task, args, counts, progress):
    """The documents of a task: read from its byte range (here, in the worker), or as the main process sent them."""
    if task.docs is not None:
        yield from task.docs
        return
    try:
        with open(task.path, "rb", buffering=0) as raw:
            raw.seek(task.offset)
            reader = io.BufferedReader(CountingReader(raw, progress, task.size), 1 << 20)
            yield from documents_in_stream(reader, task.name, task.kind, args, counts)
    except READ_ERRORS as e:
        skip(counts, "unreadable", task.name, f"unreadable: {type(e).__name__}: {e}", args.strict)


def write_tokens(f, tokens):
    f.write(tokens.tobytes())


def run_task(task, index):
    """Read (for a byte range), split and tokenize one task into part files (index.train.tmp, index.val.tmp in
    the parts folder); returns its tallies, its validation ids and its train document nearest the threshold."""
    args, encoding, progress = (_WORKER[k] for k in ("args", "encoding", "progress"))
    counts, val_ids, closest, months = new_counts(), [], None, set()
    paths = {split: _WORKER["parts"] / f"{index:08d}.{split}.tmp" for split in ("train", "val")}
    with open(paths["train"], "wb") as train, open(paths["val"], "wb") as val:
        for doc in task_documents(task, args, counts, progress):
            text = document_text(doc, args, counts)
            if text is None:
                continue
            tokens = encode_document(encoding, text)
            value = split_value(args.seed, doc.raw)
            split = "val" if value < args.val_fraction else "train"
            if split == "val":
                val_ids.append(doc.id)
            elif closest is None or value < closest[0]:
                closest = (value, doc.id, counts["tokens"]["train"], len(tokens))
            write_tokens(val if split == "val" else train, tokens)
            counts["docs"][split] += 1
            counts["tokens"][split] += len(tokens)
            counts["text_bytes"] += len(doc.raw)
            if doc.month:
                months.add(doc.month)
            progress.add(docs=1, tokens=len(tokens), text_bytes=len(doc.raw))
    counts["months"] = sorted(months)[:1] + sorted(months)[-1:]
    return {"counts": counts, "val_ids": val_ids, "closest": closest, "paths": {k: str(p) for k, p in paths.items()}}


# ----------------------------------------------------------------------------- running the tasks
class WorkerDied(Exception):
    pass


def stop_pool(pool):
    """End the workers now, running tasks included (Ctrl-C, an error, a dead worker)."""
    if hasattr(pool, "terminate_workers"):  # Python 3.14+
        pool.terminate_workers()
    else:  # before 3.14 the executor offers no public way to end running tasks; its process table is the handle
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            process.terminate()
    pool.shutdown(wait=True, cancel_futures=True)


def wait_for(task, future, report):
    while True:
        try:
            return task, future.result(timeout=PROGRESS_EVERY)
        except FutureTimeout:  # still busy: a progress line, then wait on
            report()
        except BrokenProcessPool:  # a worker died (SIGKILL, the kernel's OOM killer): its task would never finish
            raise WorkerDied("a worker process died (killed, or out of memory?), so its documents are lost; nothing "
                             "was published. Run again, with a lower --num_proc if memory was short") from None


def results_in_order(tasks, args, parts, progress, report):
    """(task, result) for every task, in task order. With --num_proc > 1 the tasks run in a process pool, at most
    2 * num_proc at once: memory stays bounded and finished part files wait on disk for their turn. Not
    Pool.imap: its feeder drains the task iterator without back-pressure, and a killed worker hangs it forever;
    ProcessPoolExecutor reports a dead worker (BrokenProcessPool)."""
    if args.num_proc == 1:
        init_worker(args, parts, progress, in_process=True)
        for index, task in enumerate(tasks):
            yield task, run_task(task, index)
        return
    pool = ProcessPoolExecutor(args.num_proc, mp_context=multiprocessing.get_context(), initializer=init_worker,
                               initargs=(args, str(parts), progress.array))
    try:
        pending = deque()
        for index, task in enumerate(tasks):
            pending.append((task, pool.submit(run_task, task, index)))
            if len(pending) >= 2 * args.num_proc:
                yield wait_for(*pending.popleft(), report)
        while pending:
            yield wait_for(*pending.popleft(), report)
    except BaseException:  # an error, Ctrl-C, or the consumer stopped: no worker may go on writing
        stop_pool(pool)
        raise
    pool.shutdown(wait=True)


# ----------------------------------------------------------------------------- writing
def append_part(path, f, chunk=1 << 22):
    with open(path, "rb") as part:
        shutil.copyfileobj(part, f, chunk)
    path.unlink()


def move_to_val(train_path, val_f, offset, length, chunk=1 << 20):
    """Move one document's tokens (at token offset, length) from the train file to the end of val_f."""
    with open(train_path, "r+b") as f:
        f.seek(2 * offset)
        val_f.write(f.read(2 * length))
        src, dst = 2 * (offset + length), 2 * offset
        while True:  # shift the rest of train left, one chunk at a time (bounded memory)
            f.seek(src)
            block = f.read(chunk)
            if not block:
                break
            f.seek(dst)
            f.write(block)
            src, dst = src + len(block), dst + len(block)
        f.truncate(dst)


def read_complete_meta(out_dir):
    """meta.json of a complete output (bins of the recorded sizes), else None."""
    try:
        meta = json.loads((out_dir / "meta.json").read_text())
        sizes_ok = all((out_dir / f"{s}.bin").stat().st_size == 2 * meta[f"{s}_tokens"] for s in ("train", "val"))
        return meta if sizes_ok else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def publish(out_dir, meta):
    """Make the finished temporaries the output: meta.json.tmp first, then bins, then meta.json (last)."""
    meta_tmp = out_dir / "meta.json.tmp"
    with open(meta_tmp, "w") as f:
        json.dump(meta, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    # Ctrl-C and SIGTERM wait for the renames (milliseconds), so that what main then says about the output is true.
    # (A handler that only records, not a blocked signal mask: a process-wide signal may reach another thread.)
    received = []
    previous = {sig: signal.signal(sig, lambda number, frame: received.append(number))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        (out_dir / "meta.json").unlink(missing_ok=True)  # from here until the end, no output looks complete
        for split in ("train", "val"):
            os.replace(out_dir / f"{split}.bin.tmp", out_dir / f"{split}.bin")
        os.replace(meta_tmp, out_dir / "meta.json")
        directory = os.open(out_dir, os.O_RDONLY)
        try:
            os.fsync(directory)  # make the renames themselves durable
        finally:
            os.close(directory)
        publish.done = out_dir
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        raise KeyboardInterrupt


publish.done = None  # the folder published by this run, once it is complete


# ----------------------------------------------------------------------------- statistics
def num_samples(tokens, n_ctx):
    # Sample i is tokens [i*n_ctx, i*n_ctx + n_ctx + 1): n_ctx inputs and the same n_ctx shifted by one as
    # targets, so consecutive samples share one token and the last needs a token after it: (tokens - 1) // n_ctx.
    return max(tokens - 1, 0) // n_ctx


def human(n):
    return next(f"{n / 10**p:.1f}{s}" for p, s in ((9, "B"), (6, "M"), (3, "K"), (0, "")) if n >= 10**p or p == 0)


def format_stats(meta):
    """The seed's statistics block, in its YAML shape. Seed (OWT1+2): 12,574,161 train samples x 1024 =
    12,875,940,864 training tokens (the seed's comment reads "~12.6B": the sample count in thousands)."""
    return "\n".join([f'corpus: "{meta["corpus"]}"', 'tokenizer: "GPT2"', f'n_ctx: {meta["n_ctx"]}',
                      f'num_train_samples: {meta["num_train_samples"]}',
                      f'num_validation_samples: {meta["num_validation_samples"]}',
                      f'total_training_tokens: {meta["total_training_tokens"]} '
                      f'#~{human(meta["total_training_tokens"])} tokens'])


def print_progress(values, t0, total_bytes):
    input_bytes, docs, tokens, text_bytes = values
    elapsed = max(time.time() - t0, 1e-9)
    done = input_bytes / max(total_bytes, 1)
    eta = format_eta(elapsed * (1 - done) / done) if done > 0 else "?"
    print(f"docs {docs:,} ({docs / elapsed:,.0f}/s) | text {text_bytes / 1e6:,.1f} MB "
          f"({text_bytes / 1e6 / elapsed:.2f} MB/s) | tokens {human(tokens)} ({tokens / elapsed:,.0f}/s) "
          f"| input {100 * done:.1f}% | ETA {eta}", flush=True)


def corpora_of(files, counts):
    """Per corpus (an --input path, or a downloaded corpus): documents, tokens and the months of its dated
    documents, summed over its files."""
    corpora = {}
    for (_, _, corpus), stats in zip(files, counts["sources"]):
        total = corpora.setdefault(corpus, {"name": corpus, "documents": 0, "tokens": 0, "first_month": None,
                                            "last_month": None, "files_before_cutoff": 0})
        for key in ("documents", "tokens", "files_before_cutoff"):
            total[key] += stats[key]
        months = [m for m in (total["first_month"], total["last_month"], stats["first_month"], stats["last_month"])
                  if m]
        if months:
            total["first_month"], total["last_month"] = min(months), max(months)
    return list(corpora.values())


# ----------------------------------------------------------------------------- the pipeline
def write_bins(files, args, out, counts, parts):
    """Documents -> tokens (in workers) -> out["train"] / out["val"] (open files); returns the validation ids."""
    total_bytes, t0, last = sum(p.stat().st_size for p, _, _ in files), time.time(), [time.time()]

    def report(force=False):
        if force or time.time() - last[0] > PROGRESS_EVERY:
            print_progress(progress.values(), t0, total_bytes)
            last[0] = time.time()
    progress = Progress(multiprocessing.get_context().Array("q", 4)) if args.num_proc > 1 else Progress(report=report)
    val_ids, closest = [], None  # closest: the train document nearest to the validation threshold
    results = results_in_order(list_tasks(files, args, counts, progress), args, parts, progress, report)
    try:
        for task, result in results:
            if result["closest"] and (closest is None or result["closest"][0] < closest[0]):
                value, doc_id, offset, length = result["closest"]
                closest = (value, doc_id, counts["tokens"]["train"] + offset, length)
            for split in ("train", "val"):
                append_part(Path(result["paths"][split]), out[split])
            val_ids += result["val_ids"]
            merge_counts(counts, result["counts"], task.source)
            report()
    finally:
        results.close()  # stops the worker pool, if any
    report(force=True)
    n_docs = sum(counts["docs"].values())
    if n_docs == 0:
        skipped = f" (skipped: {'; '.join(counts['skipped_examples'])})" if counts["skipped_examples"] else ""
        raise ValueError(f"empty corpus: no documents with text in "
                         f"{', '.join(str(p) for p, _, _ in files) or 'the input'}{skipped}; pass folders or files "
                         "holding text")
    if n_docs >= 2 and not val_ids:  # a small corpus still gets one validation document
        _, doc_id, offset, length = closest
        out["train"].flush()
        move_to_val(out["train"].name, out["val"], offset, length)
        val_ids.append(doc_id)
        for split, sign in (("train", -1), ("val", 1)):
            counts["docs"][split] += sign
            counts["tokens"][split] += sign * length
    if counts["tokens"]["train"] == 0:
        raise ValueError("every document went to validation: lower --val_fraction")
    return val_ids


def check_zstd(files):
    """Fail before any work when a .zst input cannot be read (the package is optional)."""
    if any(".zst" in name.lower() for _, name, _ in files):
        zstd_reader(io.BytesIO(), next(name for _, name, _ in files if ".zst" in name.lower()))


def prepare(args):
    out_dir = Path(args.out_dir)
    downloads = []
    if args.download:
        download_dir = Path(args.download_dir or out_dir / "subsets")
        for which in args.download.split("+"):
            downloads += download_dataset(args.hub_url, which, download_dir)
        # in name order, as `--input DOWNLOAD_DIR` lists them: the same bins either way
        groups = [(r["corpus"], [r["file"]]) for r in sorted(downloads, key=lambda r: Path(r["file"]).name)]
    else:
        groups = [(Path(p).resolve().name.split(".")[0], [p]) for p in args.input]
    files, ignored = list_input_files(groups)
    other_types = [p for p, why in ignored if why == OTHER_TYPE]
    if other_types:
        print(f"ignoring {len(other_types)} files of other types, e.g. {other_types[0]}")
    for n, (path, why) in enumerate((p, why) for p, why in ignored if why != OTHER_TYPE):
        print(f"not read: {path} ({why})" if n < 5 else f"not read: ... ({len(ignored) - len(other_types)} in all)")
        if n == 5:
            break
    check_zstd(files)
    corpus = args.corpus or {"owt": "openwebtext", "owt2": "openwebtext2", "owt+owt2": "openwebtext1+2"}.get(
        args.download) or "+".join(name for name, _ in groups)  # --input: one group per path given
    settings = {"corpus": corpus, "n_ctx": args.n_ctx, "val_fraction": args.val_fraction, "seed": args.seed,
                "strip_gutenberg": args.strip_gutenberg, "text_field": args.text_field, "strict": args.strict,
                "after": args.after, "newlines": args.newlines}
    sources = [{"path": str(p.resolve()), "id": name, "corpus": c, "bytes": p.stat().st_size} for p, name, c in files]
    # unchanged input = same files, sizes and modification times; num_proc is left out: it changes nothing
    stamps = [(s["id"], s["bytes"], p.stat().st_mtime_ns) for s, (p, _, _) in zip(sources, files)]
    fingerprint = hashlib.sha256(json.dumps(["data_owt/2", settings, stamps]).encode()).hexdigest()
    publish.done = None
    old = read_complete_meta(out_dir)
    if old and old.get("fingerprint") == fingerprint:
        print(f"{out_dir} is up to date (same input files and settings as its meta.json); nothing to do")
        print(format_stats(old))
        return old
    get_encoding(args.bpe_dir)  # fail on a missing tokenizer before writing anything
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("train.bin", "val.bin", "meta.json"):  # found now, not when publishing after hours of work
        if (out_dir / name).is_dir():
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(out_dir / name))
    for stale in out_dir.glob("parts.*.tmp"):  # part files of a run that was killed (kill -9)
        shutil.rmtree(stale, ignore_errors=True)
    counts = new_counts(len(files))
    out, t0, parts = {}, time.time(), out_dir / f"parts.{os.getpid()}.tmp"
    try:
        parts.mkdir()
        for split in ("train", "val"):
            out[split] = open(out_dir / f"{split}.bin.tmp", "wb")
        val_ids = write_bins(files, args, out, counts, parts)
        for f in out.values():
            f.flush()
            os.fsync(f.fileno())
        train_tokens, val_tokens = counts["tokens"]["train"], counts["tokens"]["val"]
        for source, stats in zip(sources, counts["sources"]):
            source.update(stats)
        meta = {"corpus": corpus, "vocab_size": VOCAB_SIZE, "eot": EOT, "dtype": "uint16", "n_ctx": args.n_ctx,
                "train_tokens": train_tokens, "val_tokens": val_tokens,
                "num_train_samples": num_samples(train_tokens, args.n_ctx),
                "num_validation_samples": num_samples(val_tokens, args.n_ctx),
                "total_training_tokens": num_samples(train_tokens, args.n_ctx) * args.n_ctx,
                "train_documents": counts["docs"]["train"], "val_documents": counts["docs"]["val"],
                "val_document_ids": val_ids, "text_bytes": counts["text_bytes"],
                "skipped": counts["skipped"], "skipped_examples": counts["skipped_examples"],
                "tokenizer": {"name": "gpt2", "source": tokenizer_source(args.bpe_dir)},
                "corpora": corpora_of(files, counts), "sources": sources, "downloads": downloads,
                "settings": settings, "fingerprint": fingerprint, "seconds": round(time.time() - t0, 1)}
        publish(out_dir, meta)
    except BrokenPipeError:  # the reader of the progress lines went away (main: exit 141), not the disk
        raise
    except OSError as e:
        what = "no space left on device" if e.errno in (errno.ENOSPC, errno.EDQUOT) else e.strerror or str(e)
        where = f" ({os.fsdecode(e.filename)})" if e.filename and Path(os.fsdecode(e.filename)) != out_dir else ""
        remedy = OS_REMEDIES.get(e.errno, "check the disk and the folder's permissions, or pass another --out_dir")
        raise ValueError(f"cannot write to {out_dir}: {what}{where}; {remedy}; its temporary files were removed and "
                         "no new output was published (an earlier complete one is untouched)") from None
    finally:  # on success the temporaries were renamed already; on any failure they go
        for f in out.values():
            with contextlib.suppress(OSError):  # a full disk fails the close's flush again: keep the first error
                f.close()
        for name in ("train.bin.tmp", "val.bin.tmp", "meta.json.tmp"):
            (out_dir / name).unlink(missing_ok=True)
        shutil.rmtree(parts, ignore_errors=True)
    if counts["skipped"]:
        print(f"skipped: {counts['skipped']}; first: {'; '.join(counts['skipped_examples'])}")
    for split, samples in (("train", "num_train_samples"), ("val", "num_validation_samples")):
        if meta[samples] == 0:
            print(f"warning: {split}.bin holds {meta[f'{split}_tokens']} tokens, fewer than n_ctx + 1 = "
                  f"{args.n_ctx + 1}: no {split} samples of n_ctx tokens")
    for c in meta["corpora"]:
        months = f", months {c['first_month']}..{c['last_month']}" if c["first_month"] else ""
        cut = f" ({c['files_before_cutoff']} monthly files up to {args.after} left out)" if c["files_before_cutoff"] \
            else ""
        print(f"{c['name']}: {c['documents']:,} documents, {c['tokens']:,} tokens{months}{cut}")
    print(f"wrote {out_dir}: train {train_tokens:,} tokens ({meta['train_documents']:,} documents), "
          f"val {val_tokens:,} tokens ({meta['val_documents']:,} documents) in {meta['seconds']} s")
    print(format_stats(meta))
    return meta


# ----------------------------------------------------------------------------- command line
class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, raised so main() prints `error: ...` and exits 2
        unknown = re.findall(r"(--[\w-]+)", message) if message.startswith("unrecognized") else []
        known = [o for a in self._actions for o in a.option_strings]
        hints = [f" (did you mean {m[0]}?)" for u in unknown if (m := difflib.get_close_matches(u, known, 1))]
        raise ValueError(message + "".join(hints))


def parse_bool(value):
    if value.lower() in ("1", "true", "yes"):
        return True
    if value.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expects true/false, got '{value}'")


def parse_download(value):
    value = value.lower()
    if value not in ("owt", "owt2", "owt+owt2"):
        raise argparse.ArgumentTypeError(f"expects owt, owt2 or owt+owt2, got '{value}'")
    return value


def parse_month(value):
    if not re.fullmatch(r"\d{4}-(0[1-9]|1[0-2])", value):
        raise argparse.ArgumentTypeError(f"expects a month as YYYY-MM (e.g. {OWT_LAST_MONTH}), got '{value}'")
    return value


def parse_args(argv):
    p = ArgumentParser(prog="data_owt.py", allow_abbrev=False, description=__doc__.split("\n")[0])
    p.add_argument("--input", nargs="+", metavar="PATH",
                   help="folders, .txt, .xz, .tar, .tar.xz, .tar.gz, .jsonl, .jsonl.zst")
    p.add_argument("--download", nargs="?", const="owt", default=None, type=parse_download,
                   help="fetch from the Hugging Face Hub first (online only): owt (the default), owt2, or owt+owt2 "
                        "(the seed's corpus: OpenWebText + OpenWebText2 after --after)")
    p.add_argument("--download_dir", help="where downloads go (default: OUT_DIR/subsets)")
    p.add_argument("--hub_url", default=HUB_URL, help="Hub endpoint (default: $HF_ENDPOINT or huggingface.co)")
    p.add_argument("--out_dir", default="data/owt", help="where the bins go (gpt_staged.py --data_dir)")
    p.add_argument("--bpe_dir", help="folder with GPT-2's encoder.json + vocab.bpe (e.g. ../shared/data/gpt2_bpe)")
    p.add_argument("--after", type=parse_month, metavar="YYYY-MM",
                   help="keep only dated documents (OpenWebText2's months) after this month; undated ones (OWT's, "
                        f".txt) are kept. Default: {OWT_LAST_MONTH} (where OWT ends) with --download owt2 or "
                        "owt+owt2, else none")
    p.add_argument("--n_ctx", type=int, default=N_CTX, help="sample length counted in meta.json (seed: 1024)")
    p.add_argument("--val_fraction", type=float, default=VAL_FRACTION, help="share of documents in val.bin")
    p.add_argument("--seed", type=int, default=SEED, help="salt of the per-document split hash")
    # Off by default: OpenWebText has no such markers; on, a Gutenberg book loses its licence header and footer,
    # which would otherwise repeat in every book.
    p.add_argument("--strip_gutenberg", nargs="?", const=True, default=False, type=parse_bool)
    p.add_argument("--newlines", choices=("lf", "keep"), default="lf",
                   help="lf: CRLF and lone CR become LF (the default); keep: documents byte for byte")
    p.add_argument("--text_field", default="text", help="the .jsonl field holding a document")
    p.add_argument("--strict", nargs="?", const=True, default=False, type=parse_bool,
                   help="stop at the first unreadable or non-UTF-8 file instead of skipping it")
    p.add_argument("--num_proc", type=int, default=os.cpu_count() or 1,
                   help="worker processes (each reads, decompresses and tokenizes its share)")
    p.add_argument("--batch_bytes", type=int, default=BATCH_BYTES,
                   help="text per task when the main process reads a file for the workers (compressed tars, .jsonl)")
    p.add_argument("--corpus", help="corpus name for the stats block (default: from the inputs)")
    args = p.parse_args(argv)
    if bool(args.input) == bool(args.download):
        raise ValueError("give either --input PATH [PATH ...] (local files) or --download [owt|owt2|owt+owt2]")
    for flag, value in (("--out_dir", args.out_dir), ("--bpe_dir", args.bpe_dir), ("--download_dir",
                        args.download_dir), *(("--input", path) for path in args.input or ())):
        if value == "":  # an unset shell variable: it would mean the current folder, or no folder at all
            raise ValueError(f"{flag} is an empty path (an unset shell variable?); name the folder or file "
                             f"(. for the current folder)")
    for key, ok, want in (("n_ctx", args.n_ctx >= 1, ">= 1"), ("num_proc", args.num_proc >= 1, ">= 1"),
                          ("batch_bytes", args.batch_bytes >= 1, ">= 1"),
                          ("val_fraction", 0 < args.val_fraction < 1, "in (0, 1)")):
        if not ok:
            raise ValueError(f"--{key} must be {want}, got {getattr(args, key)}")
    if args.after is None and args.download and "owt2" in args.download:
        args.after = OWT_LAST_MONTH  # the seed's OWT2 part: the months after OpenWebText's last (see settings)
    return args


# What to do about an OSError, by errno: the file system's faults are the user's to fix, in one line (exit 2).
OS_REMEDIES = {
    errno.EROFS: "a read-only file system: pass an --out_dir on a writable disk",
    errno.ENOSPC: "the disk is full: free some space or pass an --out_dir on another disk",
    errno.EDQUOT: "the disk quota is used up: free some space or pass an --out_dir on another disk",
    errno.EACCES: "permission denied: pass paths you may read (--input) and write (--out_dir)",
    errno.EPERM: "not permitted: pass paths you may read (--input) and write (--out_dir)",
    errno.EEXIST: "a file stands where a folder is needed: move it away or pass another path",
    errno.ENOTDIR: "a file stands where a folder is needed: move it away or pass another path",
    errno.EISDIR: "a folder stands where a file is needed: move it away or pass another path",
    errno.ENOENT: "it is not there, and cannot be made there (under /proc or /sys?): check the path",
}


def os_error_line(e, path=None):
    """`path: cause; remedy` of an OSError: the path it names (the second one of a rename), else `path`."""
    where = e.filename2 if e.errno == errno.EISDIR and e.filename2 else e.filename or path or "?"
    remedy = OS_REMEDIES.get(e.errno, "check the path, its permissions and the disk")
    return f"{os.fsdecode(where)}: {e.strerror or e}; {remedy}"


def main(argv=None):
    """Exit 0 when done; 2 with one `error:` line for bad input and the file system's faults; 130 on Ctrl-C or
    SIGTERM; 141 (quietly) when the reader of the output goes away (`| head`); 1 when a worker died. Either
    way nothing half-made is published. Anything else is a bug, and shows its traceback."""
    def terminate(signum, frame):
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, terminate)  # kill (SIGTERM) cleans up like Ctrl-C
    try:
        prepare(parse_args(sys.argv[1:] if argv is None else argv))
        return 0
    except BrokenPipeError:  # `data_owt.py ... | head`: the reader is gone; say nothing more to it
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush cannot fail
        return 141
    except OSError as e:  # FileNotFoundError included, with a message of ours or the system's
        print(f"error: {e}" if e.errno is None else f"error: {os_error_line(e)}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except WorkerDied as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if publish.done:  # the stop came during the renames, and waited for them
            print(f"interrupted: {publish.done} was written in full just before the stop (meta.json is there), so "
                  "it is complete; nothing to redo", file=sys.stderr)
        else:
            print("interrupted: temporary files removed, nothing new published (an earlier complete output is "
                  "untouched); run the same command again to redo", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
