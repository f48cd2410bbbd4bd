"""Tokenize a text corpus (OpenWebText, or any local text) with GPT-2's BPE into uint16 token bins.

Writes to --out_dir:  train.bin, val.bin  (uint16 token ids, read by gpt_staged.py as np.memmap)
                      meta.json           (token counts, samples of n_ctx, tokenizer, sources, settings)
Every document is followed by <|endoftext|> (50256). Each document goes to train or val by a hash of
(seed, document id), so the split does not depend on file order or on the number of worker processes;
default: nanoGPT's 0.05% of documents with seed 2357, and at least one validation document whenever there are
two or more. Documents are kept byte for byte: Project Gutenberg books keep their licence header and footer
unless --strip_gutenberg.

Local run (the project's CPU stand-in for OpenWebText; tokenizer files from ../shared/data, no network):
    python data_owt.py --input ../shared/data/text_corpus/gutenberg --bpe_dir ../shared/data/gpt2_bpe \
        --out_dir data/gutenberg
Full OpenWebText (21 x ~630 MB tar files from Hugging Face, ~13 GB, then ~9B tokens, ~17 GB of bins):
    python data_owt.py --download --out_dir data/owt
The same corpus from files you already have (HF's urlsf_subset*.tar, the Zenodo openwebtext.tar.xz, an
extracted folder of urlsf_subset*.xz, .txt files, or .jsonl with a "text" field):
    python data_owt.py --input path/to/openwebtext.tar.xz --out_dir data/owt

A run is complete iff meta.json exists and the bins have the sizes it records; meta.json is written last.
A re-run with unchanged input and settings prints "up to date" and does nothing.
"""
import argparse
import difflib
import errno
import hashlib
import io
import json
import lzma
import os
import re
import signal
import socket
import sys
import tarfile
import time
import urllib.request
from collections import deque
from functools import lru_cache
from multiprocessing import Pool
from pathlib import Path

import numpy as np

# ----------------------------------------------------------------------------- settings
EOT = 50256                 # GPT-2's <|endoftext|>, appended after every document (as nanoGPT does)
VOCAB_SIZE = 50257          # ids 0..50256 fit in uint16
N_CTX = 1024                # seed: n_ctx 1024
VAL_FRACTION = 0.0005       # nanoGPT's OWT split: 0.05% of documents (4,007 of 8,013,769) go to validation
SEED = 2357                 # nanoGPT's split seed; here it salts the per-document hash
BATCH_BYTES = 1 << 20       # text sent to a worker per task; small enough to bound memory
CONNECT_TIMEOUT = 10        # seconds; offline, fail at once instead of retrying for minutes
PROGRESS_EVERY = 5.0        # seconds between progress lines
HUB_URL = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
OWT_REPO = "Skylion007/openwebtext"   # subsets/urlsf_subset00.tar .. urlsf_subset20.tar (Git LFS files)

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
    for path in (encoder_path, merges_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: --bpe_dir must hold GPT-2's encoder.json and vocab.bpe "
                                    "(this project ships them in ../shared/data/gpt2_bpe)")
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    encoder = json.loads(encoder_path.read_text(encoding="utf-8"))
    ranks = {bytes(byte_of[c] for c in token): rank for token, rank in encoder.items() if token != "<|endoftext|>"}
    # tiktoken merges by rank, so rank order must be merge order: merge i of vocab.bpe makes token 256 + i
    merges = [line.split() for line in merges_path.read_text(encoding="utf-8").splitlines()[1:] if line]
    ok = len(ranks) == EOT and all(encoder.get(a + b) == 256 + i for i, (a, b) in enumerate(merges))
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


def download_openwebtext(hub_url, download_dir):
    """Download OpenWebText's 21 subset tars from the Hugging Face Hub; returns [{file, bytes, sha256}]."""
    listing = f"{hub_url}/api/datasets/{OWT_REPO}/tree/main/subsets"
    try:
        with http_open(listing) as response:
            entries = json.load(response)
    except OSError as e:  # urllib's URLError included
        raise ValueError(f"cannot reach {hub_url} to download OpenWebText ({getattr(e, 'reason', e)}); offline? "
                         "Prepare local files instead with --input PATH [PATH ...] (a folder, .txt, .xz, .tar, "
                         ".tar.xz or .jsonl; e.g. the urlsf_subset*.tar files copied from an online machine)") from None
    # The Hub publishes each Git LFS file's sha256 (its LFS oid) in this listing: we verify every byte against it.
    files = sorted((e for e in entries if e.get("path", "").endswith(".tar") and "lfs" in e), key=lambda e: e["path"])
    if not files:
        raise ValueError(f"{listing} lists no subset .tar files; download them yourself and pass --input")
    download_dir.mkdir(parents=True, exist_ok=True)
    print(f"downloading {len(files)} files, {sum(e['lfs']['size'] for e in files) / 1e9:.1f} GB, to {download_dir}")
    records = []
    for entry in files:
        dest = download_dir / Path(entry["path"]).name
        download_file(f"{hub_url}/datasets/{OWT_REPO}/resolve/main/{entry['path']}", dest,
                      entry["lfs"]["size"], entry["lfs"]["oid"])
        records.append({"file": str(dest), "bytes": entry["lfs"]["size"], "sha256": entry["lfs"]["oid"],
                        "url": f"{hub_url}/datasets/{OWT_REPO}/resolve/main/{entry['path']}"})
    return records


# ----------------------------------------------------------------------------- reading documents
KINDS = (".tar.xz", ".tar.gz", ".tgz", ".tar", ".jsonl", ".txt", ".xz")  # longest suffix first
READ_ERRORS = (OSError, EOFError, lzma.LZMAError, tarfile.TarError)


def kind_of(name):
    return next((kind for kind in KINDS if name.lower().endswith(kind)), None)


def list_input_files(inputs):
    """[(path, document id prefix)] in a fixed order: folders walked recursively, names sorted."""
    files, ignored = [], []
    for given in inputs:
        path = Path(given)
        if path.is_dir():
            for p in sorted((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.relative_to(path).parts):
                name = p.relative_to(path.parent).as_posix()  # ids do not depend on where the folder lives
                (files if kind_of(p.name) else ignored).append((p, name))
        elif path.is_file():
            if not kind_of(path.name):
                raise ValueError(f"{path}: unsupported input type; expected a folder or a file ending in "
                                 f"{', '.join(KINDS)}")
            files.append((path, path.name))
        else:
            raise FileNotFoundError(f"{path} does not exist; --input takes folders and files of documents")
    return files, ignored


class CountingReader(io.RawIOBase):
    """Counts the bytes read from an input file (compressed), so progress and ETA can follow the input."""
    def __init__(self, raw, counts):
        self.raw, self.counts = raw, counts

    def readable(self):
        return True

    def readinto(self, buffer):
        n = self.raw.readinto(buffer)
        self.counts["input_bytes"] += n or 0
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


def strip_gutenberg(text):
    """Keep only the book: the lines between '*** START OF ...' and '*** END OF ...' (text unchanged if absent)."""
    start = re.search(r"^\*\*\* ?START OF.*$", text, re.M)
    end = re.search(r"^\*\*\* ?END OF", text[start.end():], re.M) if start else None
    return text[start.end():start.end() + end.start()].strip("\r\n") if end else text


def skip(counts, kind, name, reason, strict):
    if strict:
        raise ValueError(f"{name}: {reason} (drop --strict to skip such files with a count)")
    counts["skipped"][kind] = counts["skipped"].get(kind, 0) + 1
    if len(counts["skipped_examples"]) < 5:
        counts["skipped_examples"].append(f"{name} ({reason})")


def document(name, raw, args, counts):
    """One document from its bytes: UTF-8 text, optionally without the Project Gutenberg header/footer."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        skip(counts, "not_utf8", name, f"not UTF-8 at byte {e.start}", args.strict)
        return
    text = strip_gutenberg(text) if args.strip_gutenberg else text
    if text:
        yield name, text, len(raw)
    else:
        counts["skipped"]["empty"] = counts["skipped"].get("empty", 0) + 1


def documents_in_stream(f, name, kind, args, counts):
    """Documents (id, text, bytes) from one stream; archives are walked member by member, never extracted."""
    if kind == ".txt":
        yield from document(name, f.read(), args, counts)
    elif kind == ".jsonl":
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)[args.text_field].encode("utf-8")
            except (ValueError, KeyError, TypeError, AttributeError):
                skip(counts, "bad_jsonl", f"{name}:{line_number}", f"not JSON with a string field "
                     f"'{args.text_field}' (see --text_field)", args.strict)
                continue
            yield from document(f"{name}:{line_number}", raw, args, counts)
    elif kind == ".xz":  # xz text, or an xz tar (OpenWebText's urlsf_subsetNN-M_data.xz hold .txt documents)
        unpacked = lzma.open(f)
        head = unpacked.read(512)
        if len(head) == 512 and head[257:262] == b"ustar":  # the tar header's magic
            yield from documents_in_stream(Replay(head, unpacked), name, ".tar", args, counts)
        else:
            yield from document(name, head + unpacked.read(), args, counts)
    else:  # .tar, .tar.xz, .tar.gz: stream mode reads members in order, so nothing is extracted to disk
        with tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                member_kind = kind_of(member.name) if member.isfile() else None
                if not member_kind:
                    continue
                member_name = f"{name}/{member.name}"
                try:  # a damaged member is skipped; the archive goes on with the next one
                    yield from documents_in_stream(tar.extractfile(member), member_name, member_kind, args, counts)
                except READ_ERRORS as e:
                    skip(counts, "unreadable", member_name, f"unreadable: {type(e).__name__}: {e}", args.strict)


def iter_documents(files, args, counts):
    for path, name in files:
        try:
            with open(path, "rb", buffering=0) as raw:
                yield from documents_in_stream(io.BufferedReader(CountingReader(raw, counts), 1 << 20),
                                               name, kind_of(name), args, counts)
        except READ_ERRORS as e:
            skip(counts, "unreadable", str(path), f"unreadable: {type(e).__name__}: {e}", args.strict)


# ----------------------------------------------------------------------------- split and tokenization
def split_value(seed, doc_id):
    """A number in [0, 1) fixed by (seed, document id): the same on every machine, order and worker count."""
    digest = hashlib.blake2b(f"{seed}/{doc_id}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def batched(docs, batch_bytes):
    """Lists of documents holding about batch_bytes of text each (a long document may fill one alone)."""
    batch, size = [], 0
    for doc in docs:
        batch.append(doc)
        size += doc[2]
        if size >= batch_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


_ENCODING = None  # one per worker process


def init_worker(bpe_dir):
    global _ENCODING
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is handled once, by the main process
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # and Pool.terminate() ends workers quietly
    _ENCODING = get_encoding(bpe_dir)


def encode_batch(batch):
    """[(id, text, bytes)] -> [(id, uint16 tokens ending in EOT, bytes)]."""
    return [(doc_id, np.array(_ENCODING.encode_ordinary(text) + [EOT], dtype=np.uint16), n)
            for doc_id, text, n in batch]


def encoded_batches(batches, args):
    """encode_batch over the batches, in order, with at most 2 * num_proc + 2 batches in memory at once."""
    global _ENCODING
    if args.num_proc == 1:
        _ENCODING = get_encoding(args.bpe_dir)
        yield from map(encode_batch, batches)
        return
    # Not Pool.imap: its feeder thread drains the input iterator as fast as it can read (no back-pressure),
    # so a fast reader would hold the whole corpus in memory. A bounded queue of async tasks keeps order too.
    with Pool(args.num_proc, initializer=init_worker, initargs=(args.bpe_dir,)) as pool:
        pending = deque()
        for batch in batches:
            pending.append(pool.apply_async(encode_batch, (batch,)))
            if len(pending) > 2 * args.num_proc + 1:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# ----------------------------------------------------------------------------- writing
def write_tokens(f, tokens):
    f.write(tokens.tobytes())


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
    (out_dir / "meta.json").unlink(missing_ok=True)  # from here until the end, no output looks complete
    for split in ("train", "val"):
        os.replace(out_dir / f"{split}.bin.tmp", out_dir / f"{split}.bin")
    os.replace(meta_tmp, out_dir / "meta.json")
    directory = os.open(out_dir, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the renames themselves durable
    finally:
        os.close(directory)


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


def print_progress(counts, t0, total_bytes):
    elapsed = max(time.time() - t0, 1e-9)
    docs, tokens = sum(counts["docs"].values()), sum(counts["tokens"].values())
    done = counts["input_bytes"] / max(total_bytes, 1)
    eta = format_eta(elapsed * (1 - done) / done) if done > 0 else "?"
    print(f"docs {docs:,} ({docs / elapsed:,.0f}/s) | text {counts['text_bytes'] / 1e6:,.1f} MB "
          f"({counts['text_bytes'] / 1e6 / elapsed:.2f} MB/s) | tokens {human(tokens)} ({tokens / elapsed:,.0f}/s) "
          f"| input {100 * done:.1f}% | ETA {eta}", flush=True)


# ----------------------------------------------------------------------------- the pipeline
def write_bins(files, args, out, counts):
    """Stream documents -> tokens -> out["train"] / out["val"] (open files); returns the validation ids."""
    val_ids, closest = [], None  # closest: the train document nearest to the validation threshold
    total_bytes, t0, last = sum(p.stat().st_size for p, _ in files), time.time(), time.time()
    encoded = encoded_batches(batched(iter_documents(files, args, counts), args.batch_bytes), args)
    try:
        for batch in encoded:
            for doc_id, tokens, n_bytes in batch:
                value = split_value(args.seed, doc_id)
                split = "val" if value < args.val_fraction else "train"
                if split == "val":
                    val_ids.append(doc_id)
                elif closest is None or value < closest[0]:
                    closest = (value, doc_id, counts["tokens"]["train"], len(tokens))
                write_tokens(out[split], tokens)
                counts["docs"][split] += 1
                counts["tokens"][split] += len(tokens)
                counts["text_bytes"] += n_bytes
            if time.time() - last > PROGRESS_EVERY:
                print_progress(counts, t0, total_bytes)
                last = time.time()
    finally:
        encoded.close()  # stops the worker pool, if any
    print_progress(counts, t0, total_bytes)
    n_docs = sum(counts["docs"].values())
    if n_docs == 0:
        skipped = f" (skipped: {'; '.join(counts['skipped_examples'])})" if counts["skipped_examples"] else ""
        raise ValueError(f"empty corpus: no documents with text in {', '.join(str(p) for p, _ in files) or 'the input'}"
                         f"{skipped}; pass folders or files holding text")
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


def prepare(args):
    out_dir = Path(args.out_dir)
    downloads = download_openwebtext(args.hub_url, Path(args.download_dir or out_dir / "subsets")) \
        if args.download else []
    files, ignored = list_input_files([d["file"] for d in downloads] if args.download else args.input)
    if ignored:
        print(f"ignoring {len(ignored)} files of other types, e.g. {ignored[0][0]}")
    corpus = args.corpus or ("openwebtext" if args.download else
                             "+".join(Path(p).resolve().name.split(".")[0] for p in args.input))
    settings = {"corpus": corpus, "n_ctx": args.n_ctx, "val_fraction": args.val_fraction, "seed": args.seed,
                "strip_gutenberg": args.strip_gutenberg, "text_field": args.text_field, "strict": args.strict}
    sources = [{"path": str(p.resolve()), "id": name, "bytes": p.stat().st_size} for p, name in files]
    # unchanged input = same files, sizes and modification times; num_proc is left out: it changes nothing
    stamps = [(s["id"], s["bytes"], p.stat().st_mtime_ns) for s, (p, _) in zip(sources, files)]
    fingerprint = hashlib.sha256(json.dumps(["data_owt/1", settings, stamps]).encode()).hexdigest()
    old = read_complete_meta(out_dir)
    if old and old.get("fingerprint") == fingerprint:
        print(f"{out_dir} is up to date (same input files and settings as its meta.json); nothing to do")
        print(format_stats(old))
        return old
    get_encoding(args.bpe_dir)  # fail on a missing tokenizer before writing anything
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {"docs": {"train": 0, "val": 0}, "tokens": {"train": 0, "val": 0}, "text_bytes": 0,
              "input_bytes": 0, "skipped": {}, "skipped_examples": []}
    out, t0 = {}, time.time()
    try:
        for split in ("train", "val"):
            out[split] = open(out_dir / f"{split}.bin.tmp", "wb")
        val_ids = write_bins(files, args, out, counts)
        for f in out.values():
            f.flush()
            os.fsync(f.fileno())
        train_tokens, val_tokens = counts["tokens"]["train"], counts["tokens"]["val"]
        meta = {"corpus": corpus, "vocab_size": VOCAB_SIZE, "eot": EOT, "dtype": "uint16", "n_ctx": args.n_ctx,
                "train_tokens": train_tokens, "val_tokens": val_tokens,
                "num_train_samples": num_samples(train_tokens, args.n_ctx),
                "num_validation_samples": num_samples(val_tokens, args.n_ctx),
                "total_training_tokens": num_samples(train_tokens, args.n_ctx) * args.n_ctx,
                "train_documents": counts["docs"]["train"], "val_documents": counts["docs"]["val"],
                "val_document_ids": val_ids, "text_bytes": counts["text_bytes"],
                "skipped": counts["skipped"], "skipped_examples": counts["skipped_examples"],
                "tokenizer": {"name": "gpt2", "source": tokenizer_source(args.bpe_dir)},
                "sources": sources, "downloads": downloads, "settings": settings, "fingerprint": fingerprint,
                "seconds": round(time.time() - t0, 1)}
        publish(out_dir, meta)
    except OSError as e:
        what = "no space left on device" if e.errno in (errno.ENOSPC, errno.EDQUOT) else e.strerror or str(e)
        raise ValueError(f"cannot write to {out_dir}: {what}; its temporary files were removed and no new output "
                         "was published (an earlier complete one is untouched). Free some space or pass another "
                         "--out_dir") from None
    finally:  # on success the temporaries were renamed already; on any failure they go
        for f in out.values():
            f.close()
        for name in ("train.bin.tmp", "val.bin.tmp", "meta.json.tmp"):
            (out_dir / name).unlink(missing_ok=True)
    if counts["skipped"]:
        print(f"skipped: {counts['skipped']}; first: {'; '.join(counts['skipped_examples'])}")
    for split, samples in (("train", "num_train_samples"), ("val", "num_validation_samples")):
        if meta[samples] == 0:
            print(f"warning: {split}.bin holds {meta[f'{split}_tokens']} tokens, fewer than n_ctx + 1 = "
                  f"{args.n_ctx + 1}: no {split} samples of n_ctx tokens")
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


def parse_args(argv):
    p = ArgumentParser(prog="data_owt.py", allow_abbrev=False, description=__doc__.split("\n")[0])
    p.add_argument("--input", nargs="+", metavar="PATH", help="folders, .txt, .xz, .tar, .tar.xz, .tar.gz, .jsonl")
    p.add_argument("--download", nargs="?", const=True, default=False, type=parse_bool,
                   help="fetch OpenWebText from the Hugging Face Hub first (online only)")
    p.add_argument("--download_dir", help="where downloads go (default: OUT_DIR/subsets)")
    p.add_argument("--hub_url", default=HUB_URL, help="Hub endpoint (default: $HF_ENDPOINT or huggingface.co)")
    p.add_argument("--out_dir", default="data/owt", help="where the bins go (gpt_staged.py --data_dir)")
    p.add_argument("--bpe_dir", help="folder with GPT-2's encoder.json + vocab.bpe (e.g. ../shared/data/gpt2_bpe)")
    p.add_argument("--n_ctx", type=int, default=N_CTX, help="sample length counted in meta.json (seed: 1024)")
    p.add_argument("--val_fraction", type=float, default=VAL_FRACTION, help="share of documents in val.bin")
    p.add_argument("--seed", type=int, default=SEED, help="salt of the per-document split hash")
    # Off by default: documents are kept byte for byte (OpenWebText has no such markers); on, a Gutenberg
    # book loses its licence header and footer, which would otherwise repeat in every book.
    p.add_argument("--strip_gutenberg", nargs="?", const=True, default=False, type=parse_bool)
    p.add_argument("--text_field", default="text", help="the .jsonl field holding a document")
    p.add_argument("--strict", nargs="?", const=True, default=False, type=parse_bool,
                   help="stop at the first unreadable or non-UTF-8 file instead of skipping it")
    p.add_argument("--num_proc", type=int, default=os.cpu_count() or 1, help="tokenizer processes")
    p.add_argument("--batch_bytes", type=int, default=BATCH_BYTES, help="text per worker task")
    p.add_argument("--corpus", help="corpus name for the stats block (default: from the inputs)")
    args = p.parse_args(argv)
    if bool(args.input) == bool(args.download):
        raise ValueError("give either --input PATH [PATH ...] (local files) or --download")
    for key, ok, want in (("n_ctx", args.n_ctx >= 1, ">= 1"), ("num_proc", args.num_proc >= 1, ">= 1"),
                          ("batch_bytes", args.batch_bytes >= 1, ">= 1"),
                          ("val_fraction", 0 < args.val_fraction < 1, "in (0, 1)")):
        if not ok:
            raise ValueError(f"--{key} must be {want}, got {getattr(args, key)}")
    return args


def main(argv=None):
    def terminate(signum, frame):
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, terminate)  # kill (SIGTERM) cleans up like Ctrl-C
    try:
        prepare(parse_args(sys.argv[1:] if argv is None else argv))
        return 0
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: temporary files removed, nothing new published; run again to redo", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
