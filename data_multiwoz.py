"""
Prepare MultiWOZ for DS2: dialogues -> one example per user turn -> SentencePiece token bins.

In the order of this file: (1) text normalization and TRADE's label fixes, as the DS2 reference applies them;
(2) reading MultiWOZ 2.0/2.1 in the raw layout (data.json + valListFile + testListFile, plain or in a .zip such as
MULTIWOZ2.1.zip) or ConvLab-2's per-split layout (train/val/test.json[.zip], ids without ".json": we add it);
(3) one example per user turn: its state is the belief state (`metadata`) of the system turn after it;
(4) `select_examples`, the few-shot / cross-domain / multi-domain subsets ds2.py trains on; (5) the targets
(ds2.state_to_summary) and SentencePiece tokens; (6) writing, meta.json last; (7) the download; (8) main.

Run (offline, with the real MultiWOZ 2.1 dev/test in ../shared/data; there is no train split there, so a seeded 90%
of the dev dialogues becomes train and the rest stays dev; test is the official test split):
    python data_multiwoz.py --data_dir ../shared/data/multiwoz/convlab2_mwz21 --spm ../shared/data/t5/spiece.model \
        --out_dir data/mwz21 --train_from_dev 0.9
Full data, online (fetches the official archive into --data_dir, resumable), with T5's or a freshly trained SPM:
    python data_multiwoz.py --download --version 2.1 --data_dir data/multiwoz21 --spm ../shared/data/t5/spiece.model
    python data_multiwoz.py --data_dir data/multiwoz21 --out_dir data/mwz21_own_spm --spm_vocab_size 8000

Output in --out_dir, per split in (train, dev, test):
    {split}.jsonl     one example per line: {"dialogue_id", "turn", "domains", "history", "state", "summary"}
    {split}.src.bin   np.uint16 token ids of all sources, back to back (each ends with eos 1)
    {split}.tgt.bin   np.uint16 token ids of all targets
    {split}.idx.npy   np.int64 (N, 4): src_offset, src_len, tgt_offset, tgt_len (in tokens; row i = jsonl line i)
    spm.model, meta.json (sources, spm sha256, vocab size, ids, prefix, slots, counts per split)
Sources are stored whole; ds2.py truncates them from the left when it loads them.

Warm start (DS2's stage 1 is a model pre-trained on dialogue summarization): the same output for a summarization
corpus, one example per dialogue with an empty state, meta.json "task": "summarization" (ds2.py then early-stops
on the loss). DialogSum: dialogsum.{train,dev,test}.jsonl; SAMSum: {train,val,test}.csv (offline only val and test:
carve train out of val). Use the --spm of the MultiWOZ folder, so stage 2 reads the same token ids:
    python data_multiwoz.py --summarization dialogsum --data_dir ../shared/data/dialogue_summarization/dialogsum \
        --spm ../shared/data/t5/spiece.model --out_dir data/dialogsum
    python data_multiwoz.py --summarization samsum --data_dir ../shared/data/dialogue_summarization/samsum \
        --spm ../shared/data/t5/spiece.model --out_dir data/samsum --train_from_dev 0.9

Choices, checked against the reference code (jshin49/ds2 create_data_mwoz.py, data_loader.py, fix_label.py):
  - history: " system: <sys> user: <usr>" per turn, the first system utterance is the word "none" (DS2);
  - domains: the dialogue's goal domains (DS2 evaluates a turn on the slots of these domains), sorted;
  - hospital/police: DS2 drops a dialogue when `domains[0]` (a Python set's order) is one of them; we drop it
    when any goal domain is one of them: the same for single-domain dialogues, deterministic for the rest;
  - like the reference, dialogues with an odd number of turns, an utterance of more than 50 words or non-ASCII
    text are dropped (--keep_all_dialogues keeps the last two kinds), and turns with a "|" value are dropped from
    train and dev (kept in test). Counts of everything dropped go to meta.json. On the real MultiWOZ 2.1 test set
    this leaves 999 dialogues / 7368 turns (1000 / 7372 with --keep_all_dialogues; tests/test_data_multiwoz.py).
"""
import argparse
import contextlib
import csv
import errno
import functools
import hashlib
import io
import json
import os
import random
import re
import signal
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import sentencepiece as spm

# -----------------------------------------------------------------------------------------------------------------
# The task: 5 domains, 30 slots (TRADE's ontology order; DS2 uses the same keys)

DOMAINS = ("hotel", "train", "restaurant", "attraction", "taxi")
SLOTS = (
    "hotel-pricerange", "hotel-type", "hotel-parking", "hotel-book stay", "hotel-book day", "hotel-book people",
    "hotel-area", "hotel-stars", "hotel-internet", "hotel-name",
    "train-destination", "train-day", "train-departure", "train-arriveby", "train-book people", "train-leaveat",
    "restaurant-food", "restaurant-pricerange", "restaurant-area", "restaurant-name",
    "restaurant-book time", "restaurant-book day", "restaurant-book people",
    "attraction-area", "attraction-name", "attraction-type",
    "taxi-leaveat", "taxi-destination", "taxi-departure", "taxi-arriveby",
)
EXCLUDED_DOMAINS = ("hospital", "police")  # only in the training set (TRADE, DS2)
GOAL_NOT_DOMAINS = ("eod", "topic", "messageLen", "message")  # goal keys that are not domains
IGNORED_BOOK_KEYS = ("booked", "ticket")  # booking results, not constraints; "ticket" is outside the 30 slots
DONTCARE = ("dont care", "dontcare", "don't care", "do not care")
MAX_WORDS = 50  # reference: a dialogue with an utterance longer than 50 words is dropped
PREFIX = "Summarize this dialogue: "  # DS2 prefixes the T5 input with this (its T5 was trained T0-style)
SPLITS = ("train", "dev", "test")
URLS = {  # the official archives, as the DS2 and TRADE scripts fetch them
    "2.0": "https://www.repository.cam.ac.uk/bitstream/handle/1810/280608/MULTIWOZ2.zip?sequence=3&isAllowed=y",
    "2.1": "https://www.repository.cam.ac.uk/bitstream/handle/1810/294507/MULTIWOZ2.1.zip?sequence=1&isAllowed=y",
}
ARCHIVES = {"2.0": "MULTIWOZ2.zip", "2.1": "MULTIWOZ2.1.zip"}

# -----------------------------------------------------------------------------------------------------------------
# Text normalization (MultiWOZ's `normalize(text, clean_value=False)`, used by TRADE and DS2 on utterances and values)

# whole-word replacements from MultiWOZ's mapping.pair, applied in this order
REPLACEMENTS = tuple({
    "it's": "it is", "don't": "do not", "doesn't": "does not", "didn't": "did not", "you'd": "you would",
    "you're": "you are", "you'll": "you will", "i'm": "i am", "they're": "they are", "that's": "that is",
    "what's": "what is", "couldn't": "could not", "i've": "i have", "we've": "we have", "can't": "cannot",
    "i'd": "i would", "aren't": "are not", "isn't": "is not", "wasn't": "was not", "weren't": "were not",
    "won't": "will not", "there's": "there is", "there're": "there are", ". .": ".",
    "restaurants": "restaurant -s", "hotels": "hotel -s", "laptops": "laptop -s", "cheaper": "cheap -er",
    "dinners": "dinner -s", "lunches": "lunch -s", "breakfasts": "breakfast -s", "expensively": "expensive -ly",
    "moderately": "moderate -ly", "cheaply": "cheap -ly", "prices": "price -s", "places": "place -s",
    "venues": "venue -s", "ranges": "range -s", "meals": "meal -s", "locations": "location -s",
    "areas": "area -s", "policies": "policy -s", "children": "child -s", "kids": "kid -s",
    "kidfriendly": "kid friendly", "cards": "card -s", "upmarket": "expensive", "inpricey": "cheap",
    "inches": "inch -s", "uses": "use -s", "dimensions": "dimension -s", "driverange": "drive range",
    "includes": "include -s", "computers": "computer -s", "machines": "machine -s", "families": "family -s",
    "ratings": "rating -s", "constraints": "constraint -s", "pricerange": "price range",
    "batteryrating": "battery rating", "requirements": "requirement -s", "drives": "drive -s",
    "specifications": "specification -s", "weightrange": "weight range", "harddrive": "hard drive",
    "batterylife": "battery life", "businesses": "business -s", "hours": "hour -s",
    "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6", "seven": "7", "eight": "8",
    "nine": "9", "ten": "10", "eleven": "11", "twelve": "12", "anywhere": "any where", "good bye": "goodbye",
}.items())


def normalize(text: str) -> str:
    """Lower case, 'b&b' -> 'bed and breakfast', spaces around punctuation, "'s" split off, mapping.pair, digits."""
    text = text.lower().strip()
    text = re.sub(r"b&b|b and b", "bed and breakfast", text)
    text = re.sub("\u2018|\u2019", "'", text)
    text = text.replace(";", ",").replace("/", " and ").replace("-", " ")
    text = re.sub(r'["<>@()]', "", text)
    text = re.sub(r"(?<!\d)([?.,!])|([?.,!])(?!\d)", r" \1\2 ", text)  # not inside numbers such as 18.30 or 1,000
    text = text.replace("'s", " 's")
    text = re.sub(r"^'|'$", "", text)
    text = re.sub(r"'\s|\s'", " ", text)  # drop quotes next to a space: "king 's college" -> "king s college"
    for old, new in REPLACEMENTS:
        if old in text:
            text = (" " + text + " ").replace(" " + old + " ", " " + new + " ")[1:-1]
    tokens = []
    for token in text.split():  # join numbers split by spaces: "01223 351880" -> "01223351880"
        if tokens and token.isdecimal() and tokens[-1].isdecimal():
            tokens[-1] += token
        else:
            tokens.append(token)
    return " ".join(tokens)


# -----------------------------------------------------------------------------------------------------------------
# Label fixes (TRADE's fix_general_label_error as DS2 uses it), applied to normalized values

GENERAL_TYPOS = {  # any slot: type, area, price/day/parking/internet/stars, others
    "guesthouses": "guest house", "guest": "guest house", "mutiple sports": "multiple sports",
    "sports": "multiple sports", "mutliple sports": "multiple sports", "swimmingpool": "swimming pool",
    "concerthall": "concert hall", "concert": "concert hall", "pool": "swimming pool", "night club": "nightclub",
    "mus": "museum", "ol": "architecture", "colleges": "college", "coll": "college", "architectural": "architecture",
    "musuem": "museum", "churches": "church",
    "center": "centre", "center of town": "centre", "near city center": "centre", "in the north": "north",
    "cen": "centre", "east side": "east", "east area": "east", "west part of town": "west", "ce": "centre",
    "town center": "centre", "centre of cambridge": "centre", "city center": "centre", "the south": "south",
    "scentre": "centre", "town centre": "centre", "in town": "centre", "north part of town": "north",
    "centre of town": "centre", "cb30aq": "none",
    "mode": "moderate", "moderate -ly": "moderate", "mo": "moderate", "next friday": "friday", "monda": "monday",
    "free parking": "free", "free internet": "yes", "4 star": "4", "4 stars": "4", "0 star rarting": "none",
    "y": "yes", "any": "dontcare", "n": "no", "does not care": "dontcare", "not men": "none", "not": "none",
    "not mentioned": "none", "": "none", "not mendtioned": "none", "3 .": "3", "does not": "no", "fun": "none",
    "art": "none",
}
WRONG_VALUES = {  # a value of another slot, or a fragment: dropped
    "hotel-type": ("nigh", "moderate -ly priced", "bed and breakfast", "centre", "venetian", "intern",
                   "a cheap -er hotel"),
    "hotel-internet": ("4",), "hotel-pricerange": ("2",),
    "attraction-type": ("gastropub", "la raza", "galleria", "gallery", "science", "m"),
}
OUTSIDE_AREAS = {"restaurant-area": ("stansted airport", "cambridge", "silver street"),
                 "attraction-area": ("norwich", "ely", "museum", "same area as hotel")}


def fix_label(slot: str, value: str) -> str:
    """One value after TRADE's fixes; "none" means: drop the slot."""
    value = GENERAL_TYPOS.get(value, value)
    if (value in WRONG_VALUES.get(slot, ()) or ("area" in slot and value == "moderate")
            or ("day" in slot and value == "t")):
        value = "none"
    elif slot == "hotel-type" and value in ("hotel with free parking and free wifi", "4", "3 star hotel"):
        value = "hotel"
    elif slot == "hotel-stars" and value == "3 star hotel":  # the reference tests "hotel-star", a key never seen
        value = "3"
    elif "area" in slot:
        value = {"no": "north", "we": "west", "cent": "centre"}.get(value, value)
    elif "day" in slot:
        value = {"we": "wednesday", "no": "none"}.get(value, value)
    elif "price" in slot and value == "ch":
        value = "cheap"
    elif "internet" in slot and value == "free":
        value = "yes"
    return "none" if value in OUTSIDE_AREAS.get(slot, ()) else value


# -----------------------------------------------------------------------------------------------------------------
# Reading the files: plain or zipped, raw or per-split layout

def find_files(data_dir: Path) -> dict:
    """{base name: (path, zip member or None)} of every file in data_dir and inside its .zip archives."""
    if not data_dir.is_dir():
        raise FileNotFoundError(f"--data_dir {data_dir} is not a folder: point it at the MultiWOZ files "
                                f"(data.json + valListFile + testListFile, or val.json.zip + test.json.zip) "
                                f"or add --download when online")
    found = {}
    for path in sorted(data_dir.iterdir()):
        if path.suffix == ".zip":
            try:
                with zipfile.ZipFile(path) as archive:
                    for member in archive.namelist():
                        name = member.rsplit("/", 1)[-1]
                        if name and not member.startswith("__MACOSX"):
                            found.setdefault(name, (path, member))
            except zipfile.BadZipFile:
                raise ValueError(f"{path}: not a valid zip archive (a partial download?); delete it and retry")
        elif path.is_file():
            found[path.name] = (path, None)
        elif path.name in EXPECTED_NAMES:  # read as absent, it would give a misleading "empty split" later
            raise ValueError(f"{path} is {not_a_file(path)}, where a MultiWOZ file is expected; put the file there")
    return found


EXPECTED_NAMES = {stem + suffix for stem in ("data", "train", "val", "test") for suffix in (".json", ".json.zip")} | {
    stem + suffix for stem in ("valListFile", "testListFile") for suffix in ("", ".json", ".txt")}


def not_a_file(path: Path) -> str:
    """What stands at an existing path that is not a regular file, for a message."""
    return "a folder" if path.is_dir() else "not a regular file (a FIFO, socket or device)"


def read_text(source) -> str:
    path, member = source
    try:
        if member is None:
            return path.read_text(encoding="utf-8")
        with zipfile.ZipFile(path) as archive:
            return archive.read(member).decode("utf-8")
    except UnicodeDecodeError as e:  # a ValueError, but its message names no file
        raise ValueError(f"{source_name(source)}: not UTF-8 at byte {e.start}; MultiWOZ files are UTF-8: "
                         f"re-extract or re-download the file") from None


def source_name(source) -> str:
    path, member = source
    return str(path) if member is None else f"{path}:{member}"


def load_json(source):
    try:
        return json.loads(read_text(source))
    except json.JSONDecodeError as e:
        raise ValueError(f"{source_name(source)}: malformed JSON at line {e.lineno}, column {e.colno} ({e.msg}); "
                         f"re-extract or re-download the file") from None


def dialogue_id(name: str) -> str:
    name = name.strip()
    return name if name.endswith(".json") else name + ".json"


def read_dialogues(data_dir: Path):
    """All dialogues with their split, and the files read: ({id: (dialogue, split, file name)}, paths).

    Raw layout: the split lists decide (an id in neither list is train). Per-split layout: the file decides.
    """
    files = find_files(data_dir)
    if "data.json" in files:
        dialogue_files = [(files["data.json"], "train")]  # raw layout: the lists say what is dev and test
    else:
        dialogue_files = [(files[name], split) for name, split in
                          (("train.json", "train"), ("val.json", "dev"), ("test.json", "test")) if name in files]
    if not dialogue_files:
        raise FileNotFoundError(f"no MultiWOZ dialogues in {data_dir}: expected data.json (MultiWOZ 2.0/2.1 raw "
                                f"layout, maybe inside MULTIWOZ2.1.zip) or train/val/test.json[.zip]; "
                                f"fix --data_dir or add --download when online")
    lists = {split: next((files[stem + s] for s in ("", ".json", ".txt") if stem + s in files), None)
             for split, stem in (("dev", "valListFile"), ("test", "testListFile"))}
    if "data.json" in files and None in lists.values():
        raise FileNotFoundError(f"{data_dir}: data.json needs valListFile and testListFile beside it "
                                f"(the official split lists); copy them from the MultiWOZ archive")
    list_split, listed_in = {}, {}
    for split, source in lists.items():
        if source is not None and "data.json" in files:
            for line in read_text(source).splitlines():
                if line.strip():
                    did = dialogue_id(line)
                    if list_split.get(did, split) != split:
                        raise ValueError(in_two_splits(did, listed_in[did], source_name(source)))
                    list_split[did], listed_in[did] = split, source_name(source)
    dialogues = {}
    for source, file_split in dialogue_files:
        data = load_json(source)
        if not isinstance(data, dict):
            raise ValueError(f"{source_name(source)}: expected a JSON object {{dialogue id: dialogue}}")
        for name, dialogue in data.items():
            did = dialogue_id(name)
            if did in dialogues:  # another file (or the same id with and without ".json")
                raise ValueError(in_two_splits(did, dialogues[did][2], source_name(source)))
            dialogues[did] = (dialogue, list_split.get(did, file_split), source_name(source))
    sources = sorted({source[0] for source, _ in dialogue_files} | {s[0] for s in lists.values() if s})
    return dialogues, sources


def in_two_splits(did: str, first: str, second: str) -> str:
    """A dialogue in two splits would be trained or tuned on and then scored as unseen: which one the user means
    is theirs to say, so the message names both places."""
    return (f"{second}: dialogue {did} is also in {first}; a dialogue belongs to one split (in two, it is "
            f"learnt and then tested as unseen): remove it from one of the files")


SUMMARIZATION_FILES = {"dialogsum": {s: f"dialogsum.{s}.jsonl" for s in SPLITS},
                       "samsum": {"train": "train.csv", "dev": "val.csv", "test": "test.csv"}}


def read_summarization(corpus: str, data_dir: Path):
    """{split: examples} of DialogSum (JSON lines: fname, dialogue, summary; test: summary1 of 3) or SAMSum (CSV:
    id, summary, dialogue, quoted multi-line dialogues), one example per dialogue, and the files read."""
    splits, sources = {split: [] for split in SPLITS}, []
    for split, name in SUMMARIZATION_FILES[corpus].items():
        path = data_dir / name
        if path.exists() and not path.is_file():
            raise ValueError(f"{path} is {not_a_file(path)}, where the {corpus} {split} file is expected; put the "
                             f"file there")
        if not path.is_file():
            continue
        sources.append(path)
        with open(path, encoding="utf-8", newline="") as f:
            rows = csv.DictReader(f) if name.endswith(".csv") else (json.loads(line) for line in f if line.strip())
            n = 0
            try:
                for n, row in enumerate(rows, 1):
                    if not isinstance(row, dict):
                        raise ValueError(f"{path}: record {n} is a JSON {type(row).__name__}, not an object with "
                                         f"a dialogue, a summary and an id (fname/id)")
                    did, summary = row.get("fname", row.get("id")), row.get("summary", row.get("summary1"))
                    if not (isinstance(row.get("dialogue"), str) and isinstance(summary, str) and did):
                        raise ValueError(f"{path}: record {n} lacks a dialogue, a summary or an id (fname/id)")
                    history = " ".join(normalize(line) for line in row["dialogue"].splitlines() if line.strip())
                    splits[split].append(dict(dialogue_id=str(did), turn=0, domains=[], history=" " + history,
                                              state={}, summary=" ".join(summary.split())))
            except (json.JSONDecodeError, csv.Error) as e:
                kind = "CSV" if name.endswith(".csv") else "JSON"
                raise ValueError(f"{path}: record {n + 1} is not valid {kind} ({getattr(e, 'msg', e)})") from None
    if not sources:
        raise FileNotFoundError(f"--data_dir {data_dir}: none of {', '.join(SUMMARIZATION_FILES[corpus].values())} "
                                f"found; point it at the {corpus} folder (../shared/data/dialogue_summarization)")
    return splits, sources


# -----------------------------------------------------------------------------------------------------------------
# Dialogues -> examples (one per user turn)

def field(obj, key, kind, where):
    if not isinstance(obj, dict) or key not in obj:
        raise ValueError(f"{where}: missing field '{key}'; every MultiWOZ dialogue needs goal and log, every "
                         f"turn text, every system turn metadata (the belief state)")
    if not isinstance(obj[key], kind):
        raise ValueError(f"{where}: field '{key}' should be a {kind.__name__}, got {type(obj[key]).__name__}")
    return obj[key]


def belief_state(metadata: dict, where: str) -> dict:
    """The accumulated state {"domain-slot": value} of one system turn's `metadata`, normalized and fixed."""
    state = {}
    for domain in DOMAINS:
        if domain not in metadata:
            continue
        for part in ("semi", "book"):
            for key, value in field(metadata[domain], part, dict, f"{where}, metadata.{domain}").items():
                if part == "book" and key in IGNORED_BOOK_KEYS:
                    continue
                slot = f"{domain}-{'book ' if part == 'book' else ''}{key.lower()}"
                if slot not in SLOTS:
                    raise ValueError(f"{where}: unknown slot metadata.{domain}.{part}.{key} (not one of the 30 "
                                     f"DS2 slots); is this MultiWOZ 2.0/2.1 data?")
                if not isinstance(value, str):
                    raise ValueError(f"{where}: metadata.{domain}.{part}.{key} should be a string, got {value!r}")
                if value.strip().lower() in ("", "not mentioned"):
                    continue
                value = "dontcare" if value.strip().lower() in DONTCARE else clean_value(slot, value)
                if value != "none":
                    state[slot] = value
    return {slot: state[slot] for slot in SLOTS if slot in state}


@functools.lru_cache(maxsize=1 << 16)  # every turn repeats the values of the turns before it: normalize each once
def clean_value(slot: str, value: str) -> str:
    return fix_label(slot, normalize(value))


def goal_domains(goal: dict) -> list:
    return sorted(domain for domain, spec in goal.items() if spec and domain not in GOAL_NOT_DOMAINS)


def dialogue_examples(did: str, dialogue: dict, source: str, keep_all: bool):
    """The examples of one dialogue, or (None, reason) when the reference drops it."""
    where = f"{source}: dialogue {did}"
    domains = goal_domains(field(dialogue, "goal", dict, where))
    log = field(dialogue, "log", list, where)
    if any(domain in EXCLUDED_DOMAINS for domain in domains):
        return None, "hospital_police"
    if len(log) % 2:
        return None, "odd_turns"  # a user turn without the system turn that carries its state
    texts = [normalize(field(turn, "text", str, f"{where}, turn {i}")) for i, turn in enumerate(log)]
    if not keep_all and any(len(text.split()) > MAX_WORDS for text in texts):
        return None, "long_utterance"
    if not keep_all and not all(text.isascii() for text in texts):
        return None, "non_ascii"
    examples, history = [], ""
    for turn in range(len(log) // 2):
        system = texts[2 * turn - 1] if turn > 0 else "none"
        history += " system: " + system + " user: " + texts[2 * turn]
        where_turn = f"{where}, turn {2 * turn + 1} (system)"
        state = belief_state(field(log[2 * turn + 1], "metadata", dict, where_turn), where_turn)
        examples.append(dict(dialogue_id=did, turn=turn, domains=domains, history=history, state=state))
    return examples, None


def build_examples(dialogues: dict, keep_all: bool):
    """{split: [example, ...]} in file order, and {reason: dialogues dropped}."""
    by_split, dropped = {split: [] for split in SPLITS}, {}
    start = time.time()
    for n, (did, (dialogue, split, source)) in enumerate(dialogues.items(), 1):
        examples, reason = dialogue_examples(did, dialogue, source, keep_all)
        if reason:
            dropped[reason] = dropped.get(reason, 0) + 1
        else:
            by_split[split].extend(examples)
        progress("read", n, len(dialogues), start, "dialogues")
    return by_split, dropped


def drop_or_values(examples: list) -> list:
    """DS2 skips train/dev turns whose state has a "|" (several annotated values); test keeps them."""
    return [ex for ex in examples if not any("|" in value for value in ex["state"].values())]


def dialogue_ids(examples: list) -> list:
    return list(dict.fromkeys(ex["dialogue_id"] for ex in examples))  # in order of first appearance


def carve_train_from_dev(dev: list, fraction: float, seed: int):
    """Offline there is no train split: a seeded `fraction` of the dev dialogues becomes train, the rest dev."""
    ids = dialogue_ids(dev)
    random.Random(seed).shuffle(ids)
    train = set(ids[:int(len(ids) * fraction)])
    return [ex for ex in dev if ex["dialogue_id"] in train], [ex for ex in dev if ex["dialogue_id"] not in train]


# -----------------------------------------------------------------------------------------------------------------
# Few-shot, cross-domain and multi-domain subsets (ds2.py calls this on the examples of a split's .jsonl)

def select_examples(examples: list, fewshot: float = 1.0, seed: int = 0, except_domain: str = "",
                    only_domain: str = "", dialogue_filter: str = "min") -> list:
    """Indices of the examples to use, ascending.

    only_domain X: dialogues whose domains contain X (the caller evaluates X's slots only; DS2 keeps the full state
        as the target). except_domain X: dialogue_filter "min" (DS2's code default, ds2/configs/config.py:29 used at
        data_loader.py:81-84) drops only the dialogues whose sole goal domain is X; "max" drops every dialogue with
        X among its goal domains. Either way no turn whose state has an X slot is kept (data_loader.py:101).
    fewshot r < 1: int(N x r) whole dialogues sampled with `seed` from the N left by the domain filter
        (DS2: 1% / 5% / 10%), all their turns kept. Multi-domain few-shot = no domain filter.
    """
    if not 0.0 < fewshot <= 1.0:
        raise ValueError(f"fewshot must be in (0, 1] (a ratio of training dialogues), got {fewshot}")
    for key, domain in (("except_domain", except_domain), ("only_domain", only_domain)):
        if domain and domain not in DOMAINS:
            raise ValueError(f"{key} must be one of {', '.join(DOMAINS)} or empty, got {domain!r}")
    if except_domain and only_domain:
        raise ValueError("give except_domain (pre-training) or only_domain (fine-tuning, evaluation), not both")
    if dialogue_filter not in ("max", "min"):
        raise ValueError(f"dialogue_filter must be 'max' or 'min', got {dialogue_filter!r}")
    keep = []
    for i, ex in enumerate(examples):
        if only_domain and only_domain not in ex["domains"]:
            continue
        if except_domain:
            in_dialogue = (except_domain in ex["domains"] if dialogue_filter == "max"
                           else ex["domains"] == [except_domain])
            if in_dialogue or any(slot.startswith(except_domain + "-") for slot in ex["state"]):
                continue
        keep.append(i)
    if fewshot < 1.0:
        ids = dialogue_ids([examples[i] for i in keep])
        chosen = set(random.Random(seed).sample(ids, int(len(ids) * fewshot)))
        if not chosen:
            raise ValueError(f"fewshot {fewshot} of {len(ids)} dialogues selects none; use a larger ratio")
        keep = [i for i in keep if examples[i]["dialogue_id"] in chosen]
    return keep


# -----------------------------------------------------------------------------------------------------------------
# Targets and tokens

def add_summaries(examples: list) -> None:
    """The target of each example: the template summary of its state, from ds2.py (one definition for both files)."""
    from ds2 import state_to_summary  # here, not at the top: `import data_multiwoz` stays light (no torch)
    cache, start = {}, time.time()  # states repeat from turn to turn; state_to_summary checks itself, at a cost
    for n, ex in enumerate(examples, 1):
        key = tuple(ex["state"].items())
        if key not in cache:
            cache[key] = state_to_summary(ex["state"])
        ex["summary"] = cache[key]
        progress("summaries", n, len(examples), start, "examples")


def train_spm(texts: list, vocab_size: int) -> bytes:
    """A unigram SentencePiece model on the training text, with T5's ids (pad 0, eos 1, unk 2, no bos)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sorted(set(texts))), model_writer=model, vocab_size=vocab_size,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0,
        hard_vocab_limit=False, shuffle_input_sentence=False, num_threads=1, minloglevel=2)  # deterministic
    return model.getvalue()


def load_spm(model: bytes, where: str):
    try:
        sp = spm.SentencePieceProcessor(model_proto=model)
    except RuntimeError as e:
        raise ValueError(f"{where}: not a SentencePiece model ({e})") from None
    if (sp.pad_id(), sp.eos_id()) != (0, 1):
        raise ValueError(f"{where}: pad/eos ids are {sp.pad_id()}/{sp.eos_id()}, ds2.py needs T5's 0/1; "
                         f"use T5's spiece.model or omit --spm to train one")
    if sp.get_piece_size() >= 2 ** 16:
        raise ValueError(f"{where}: vocabulary of {sp.get_piece_size()} does not fit the uint16 token bins")
    return sp


def progress(label: str, done: float, total: float, start: float, unit: str, every: float = 2.0) -> None:
    """One line with the rate and ETA, at most every `every` seconds and once at the end."""
    now = time.time()
    if done == total or now - max(progress.last, start) >= every:
        progress.last, rate = now, done / max(now - start, 1e-9)
        print(f"{label}: {done:,.0f}/{total:,.0f} {unit} | {rate:,.1f} {unit}/s | eta {(total - done) / rate:.0f}s")
progress.last = 0.0  # when the last line was printed


def encode(sp, texts: list, label: str, chunk: int = 1000) -> list:
    """Token ids of each text followed by eos."""
    ids, start = [], time.time()
    for i in range(0, len(texts), chunk):
        ids.extend(seq + [sp.eos_id()] for seq in sp.encode(texts[i:i + chunk]))
        progress(f"tokenize {label}", len(ids), len(texts), start, "examples")
    return ids


# -----------------------------------------------------------------------------------------------------------------
# Writing: every file to a temporary name first; meta.json last, so a complete output is recognisable

def write_temp(path: Path, data: bytes) -> Path:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def split_files(split: str, examples: list, src: list, tgt: list) -> dict:
    """{file name: bytes} of one split."""
    lens = np.array([[len(s), len(t)] for s, t in zip(src, tgt)], dtype=np.int64)
    offsets = np.cumsum(lens, axis=0) - lens
    idx = np.stack([offsets[:, 0], lens[:, 0], offsets[:, 1], lens[:, 1]], axis=1)
    npy = io.BytesIO()
    np.save(npy, idx)
    keys = ("dialogue_id", "turn", "domains", "history", "state", "summary")
    jsonl = "".join(json.dumps({k: ex[k] for k in keys}) + "\n" for ex in examples)
    return {f"{split}.jsonl": jsonl.encode("utf-8"), f"{split}.idx.npy": npy.getvalue(),
            f"{split}.src.bin": np.concatenate([np.array(s, dtype=np.uint16) for s in src]).tobytes(),
            f"{split}.tgt.bin": np.concatenate([np.array(t, dtype=np.uint16) for t in tgt]).tobytes()}


def commit(out_dir: Path, files: dict, meta: dict) -> None:
    """Temporaries for everything, then renames: an input error or a crash before this leaves out_dir as it was."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("*.tmp"):  # temporaries of a run that was killed (their pid is in the name)
        stale.unlink()
    temps = {}
    try:
        for name, data in files.items():
            temps[name] = write_temp(out_dir / name, data)
        meta_tmp = write_temp(out_dir / "meta.json", (json.dumps(meta, indent=2) + "\n").encode("utf-8"))
    except BaseException:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
        raise
    # Ctrl-C waits for the renames (milliseconds), so that "nothing was published" stays true when it is said
    # (A handler that only records, not a blocked signal mask: a process-wide signal may reach another thread.)
    received = []
    previous = {sig: signal.signal(sig, lambda number, frame: received.append(number))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        (out_dir / "meta.json").unlink(missing_ok=True)  # from here until the end the folder reads as incomplete
        for name, tmp in temps.items():
            os.replace(tmp, out_dir / name)
        os.replace(meta_tmp, out_dir / "meta.json")
        commit.published = out_dir  # a Ctrl-C held back until now finds the output complete: main says so
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        raise KeyboardInterrupt


commit.published = None


# -----------------------------------------------------------------------------------------------------------------
# Download (online only; offline it fails at once and names --data_dir)

def download(version: str, data_dir: Path, url: str = "") -> None:
    """Fetch the official archive into data_dir (resumable from a .part file), unless data is there already."""
    url = url or URLS[version]
    target = data_dir / ARCHIVES[version]
    if target.exists() or (data_dir / "data.json").exists():
        print(f"download: {target.name if target.exists() else 'data.json'} already in {data_dir}, skipped")
        return
    data_dir.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=10)
    except (urllib.error.URLError, OSError) as e:
        raise ConnectionError(f"cannot download MultiWOZ {version} from {url} ({getattr(e, 'reason', e)}); offline? "
                              f"copy data.json, valListFile and testListFile (or {target.name}) into a folder "
                              f"and pass it with --data_dir, without --download") from None
    with response:
        if have and response.status != 206:
            have = 0  # the server ignored the range: start over
        todo, done, start = int(response.headers.get("Content-Length") or 0), 0, time.time()
        print(f"download: {url} -> {part}" + (f" (resuming after {have / 1e6:.1f} MB)" if have else ""))
        with open(part, "ab" if have else "wb") as f:
            while chunk := response.read(1 << 20):
                f.write(chunk)
                done += len(chunk)
                progress("download", done / 1e6, todo / 1e6, start, "MB")
    if not zipfile.is_zipfile(part):
        raise ValueError(f"{part}: the download is not a zip archive; delete it and retry, or use --data_dir")
    os.replace(part, target)


# -----------------------------------------------------------------------------------------------------------------
# main

def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def prepare(args) -> dict:
    """Everything in memory first (so that bad input changes nothing on disk), then commit()."""
    data_dir, out_dir = Path(args.data_dir), Path(args.out_dir)
    commit.published = None
    if args.spm and not Path(args.spm).is_file():
        what = f" is {not_a_file(Path(args.spm))}" if Path(args.spm).exists() else ": no such file"
        raise FileNotFoundError(f"--spm {args.spm}{what}; give T5's spiece.model "
                                f"(../shared/data/t5/spiece.model) or omit --spm to train one")
    if args.spm and Path(args.spm).stat().st_size == 0:
        raise ValueError(f"--spm {args.spm}: an empty file (0 bytes), not a SentencePiece model; give T5's "
                         f"spiece.model (../shared/data/t5/spiece.model) or omit --spm to train one")
    for name in ["spm.model", "meta.json", *(f"{split}.{kind}" for split in SPLITS
                                              for kind in ("jsonl", "src.bin", "tgt.bin", "idx.npy"))]:
        if (out_dir / name).is_dir():  # found now, not after the work, half-way through replacing the files
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(out_dir / name))
    if args.download:
        download(args.version, data_dir, args.url)
    if args.summarization:  # the warm-start corpus: its own summaries, no states
        (splits, sources), dropped = read_summarization(args.summarization, data_dir), {}
    else:
        dialogues, sources = read_dialogues(data_dir)
        splits, dropped = build_examples(dialogues, args.keep_all_dialogues)
    carved = None
    if args.train_from_dev:
        if splits["train"]:
            raise ValueError(f"{data_dir} has a train split ({len(dialogue_ids(splits['train']))} dialogues); "
                             f"--train_from_dev is only for data without one: drop the flag")
        splits["train"], splits["dev"] = carve_train_from_dev(splits["dev"], args.train_from_dev, args.seed)
        carved = dict(fraction=args.train_from_dev, seed=args.seed,
                      note="NO OFFICIAL TRAIN SPLIT: train is a seeded part of the official dev dialogues, "
                           "dev is the rest of them; test is the official test split")
        print(f"NOTE: {carved['note']} (fraction {args.train_from_dev}, seed {args.seed})")
    for split in ("train", "dev"):
        before = len(splits[split])
        splits[split] = drop_or_values(splits[split])
        dropped[f"{split}_turns_with_or_value"] = before - len(splits[split])
    for split, examples in splits.items():
        if not examples:
            hint = " (no train data here: add --train_from_dev 0.9 to carve one out of dev)" * (split == "train")
            raise ValueError(f"{data_dir}: the {split} split is empty{hint}")
    if not args.summarization:
        add_summaries([ex for examples in splits.values() for ex in examples])
    if args.spm:
        model, spm_source = Path(args.spm).read_bytes(), str(Path(args.spm).resolve())
    else:
        print(f"training a SentencePiece model ({args.spm_vocab_size} pieces) on the train split")
        texts = [args.prefix.strip()] + [ex["summary"] for ex in splits["train"]]
        texts += ["system: " + ex["history"].rsplit(" system: ", 1)[-1] for ex in splits["train"]]  # its own turn
        model, spm_source = train_spm(texts, args.spm_vocab_size), "trained on the train split"
    sp = load_spm(model, args.spm or "trained model")
    files, meta_splits = {"spm.model": model}, {}
    for split, examples in splits.items():
        src = encode(sp, [args.prefix + ex["history"].strip() for ex in examples], f"{split} sources")
        tgt = encode(sp, [ex["summary"] for ex in examples], f"{split} targets")
        files.update(split_files(split, examples, src, tgt))
        meta_splits[split] = dict(
            dialogues=len(dialogue_ids(examples)), examples=len(examples),
            src_tokens=sum(map(len, src)), tgt_tokens=sum(map(len, tgt)),
            max_src_len=max(map(len, src)), max_tgt_len=max(map(len, tgt)))
    meta = dict(
        version=args.version, created_by="data_multiwoz.py", args=vars(args),
        task="summarization" if args.summarization else "dst",
        sources=[dict(path=str(p.resolve()), bytes=p.stat().st_size, sha256=sha256(p.read_bytes())) for p in sources],
        spm=dict(file="spm.model", source=spm_source, sha256=sha256(model)),
        vocab_size=sp.get_piece_size(), vocab_note="T5 pads its embedding to 32128 (32000 pieces + 100 sentinels)",
        pad_id=sp.pad_id(), eos_id=sp.eos_id(), unk_id=sp.unk_id(), prefix=args.prefix,
        domains=list(DOMAINS), slots=list(SLOTS), dropped=dropped, train_from_dev=carved,
        keep_all_dialogues=args.keep_all_dialogues, splits=meta_splits,
        files=dict(jsonl="{split}.jsonl", src="{split}.src.bin (uint16)", tgt="{split}.tgt.bin (uint16)",
                   idx="{split}.idx.npy (int64 N x 4: src_offset, src_len, tgt_offset, tgt_len)"))
    commit(out_dir, files, meta)
    return meta


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of the usage block; exit 2 as argparse does
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def parse_args(argv):
    p = ArgumentParser(description=__doc__.split("\n\n")[0].strip(), allow_abbrev=False)
    p.add_argument("--data_dir", default="data/multiwoz21", help="folder with the MultiWOZ files (plain or .zip)")
    p.add_argument("--out_dir", default="data/mwz21", help="where the bins, jsonl and meta.json go")
    p.add_argument("--version", default="2.1", choices=sorted(URLS), help="MultiWOZ version")
    p.add_argument("--download", action="store_true", help="fetch the official archive into --data_dir first")
    p.add_argument("--url", default="", help="download from this URL instead of the official one")
    p.add_argument("--spm", default="", help="SentencePiece model (T5's spiece.model); none: train one")
    p.add_argument("--spm_vocab_size", type=int, default=8000, help="pieces of the trained model (at most)")
    p.add_argument("--prefix", default=PREFIX, help="text before the dialogue history in every source")
    p.add_argument("--train_from_dev", type=float, default=0.0,
                   help="no train split (offline): this fraction of the dev dialogues becomes train")
    p.add_argument("--seed", type=int, default=0, help="seed of --train_from_dev")
    p.add_argument("--summarization", default="", choices=["", *SUMMARIZATION_FILES],
                   help="prepare this dialogue-summarization corpus in --data_dir instead (warm start)")
    p.add_argument("--keep_all_dialogues", action="store_true",
                   help="keep the dialogues the reference drops for a >50-word utterance or non-ASCII text")
    args = p.parse_args(argv)
    if args.spm_vocab_size < 100 or args.spm_vocab_size >= 2 ** 16:
        p.error(f"--spm_vocab_size must be in [100, 65535], got {args.spm_vocab_size}")
    if args.summarization and (args.download or not args.spm):
        p.error("--summarization reads a local corpus folder (no --download) and needs --spm: the warm start and "
                "MultiWOZ must share one SentencePiece model")
    if not 0.0 <= args.train_from_dev < 1.0:
        p.error(f"--train_from_dev expects a fraction of the dev dialogues in (0, 1), got {args.train_from_dev}")
    for flag in ("data_dir", "out_dir"):
        if getattr(args, flag) == "":  # an unset shell variable: it would mean the current folder
            p.error(f"--{flag} is an empty path (an unset shell variable?); name the folder (. for the current one)")
    return args


# What to do about an OSError, by errno: the file system's faults are the user's to fix, in one line (exit 2).
OS_REMEDIES = {
    errno.EROFS: "a read-only file system: pass an --out_dir on a writable disk",
    errno.ENOSPC: "the disk is full: free some space or pass an --out_dir on another disk",
    errno.EDQUOT: "the disk quota is used up: free some space or pass an --out_dir on another disk",
    errno.EACCES: "permission denied: pass paths you may read (--data_dir, --spm) and write (--out_dir)",
    errno.EPERM: "not permitted: pass paths you may read (--data_dir, --spm) and write (--out_dir)",
    errno.EEXIST: "a file stands where a folder is needed: move it away or pass another path",
    errno.ENOTDIR: "a file stands where a folder is needed: move it away or pass another path",
    errno.EISDIR: "a folder stands where a file is needed: move it away or pass another path",
    errno.ENOENT: "it is not there, and cannot be made there (under /proc or /sys?): check the path",
}


def os_error_line(e: OSError) -> str:
    """`path: cause; remedy` of an OSError: the path it names (the target of a rename onto a folder)."""
    where = e.filename2 if e.errno == errno.EISDIR and e.filename2 else e.filename
    remedy = OS_REMEDIES.get(e.errno, "check the path, its permissions and the disk")
    return f"{os.fsdecode(where) if where else '?'}: {e.strerror or e}; {remedy}"


def main(argv=None) -> int:
    """Exit 0 when done; 2 with one `error:` line for bad input, the network and the file system's faults; 130
    on Ctrl-C or SIGTERM; 141 (quietly) when the reader of the output goes away (`| head`). Nothing is written to
    --out_dir before the end (commit), so in each of these cases its earlier content is untouched. Anything else
    is a bug, and shows its traceback."""
    def terminate(signum, frame):
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, terminate)  # kill (SIGTERM) stops like Ctrl-C
    args = None
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        start = time.time()
        meta = prepare(args)
        for split, counts in meta["splits"].items():
            print(f"{split}: {counts['dialogues']} dialogues, {counts['examples']} examples, "
                  f"{counts['src_tokens']:,} source tokens (max {counts['max_src_len']}), "
                  f"{counts['tgt_tokens']:,} target tokens (max {counts['max_tgt_len']})")
        print(f"dropped: {meta['dropped']}")
        print(f"wrote {args.out_dir} in {time.time() - start:.1f}s")
        return 0
    except BrokenPipeError:  # `data_multiwoz.py ... | head`: the reader is gone; say nothing more to it
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush cannot fail
        return 141
    except OSError as e:  # FileNotFoundError and ConnectionError included, with a message of ours or the system's
        print(f"error: {e}" if e.errno is None else f"error: {os_error_line(e)}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if commit.published:
            print(f"interrupted: {commit.published} was written in full just before the stop (meta.json is there), "
                  f"so it is complete; nothing to redo", file=sys.stderr)
        else:
            where = f"{args.out_dir} is as it was" if args else "nothing was written"
            print(f"interrupted: nothing was published ({where}: the output is written at the end, all at once); "
                  f"run the same command again to prepare it", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
