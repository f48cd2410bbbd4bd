"""data_multiwoz.py: MultiWOZ -> DS2 examples -> token bins.

Fixture: three tiny MultiWOZ-format dialogues and a police one, written by the tests in both layouts (raw data.json +
lists, ConvLab-2 per-split files), plain and zipped. Real data: the MultiWOZ 2.1 dev and test sets in ../shared/data.
"""
import http.server
import json
import re
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

import data_multiwoz as dm
from conftest import require_shared

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------------
# The fixture: MultiWOZ's belief state layout (all 7 domains + bus in every system turn)

def metadata(**values):
    """A system turn's `metadata` with the given {"domain-semi slot" or "domain-book slot": value}."""
    meta = {
        "taxi": {"book": {"booked": []},
                 "semi": dict.fromkeys(["leaveAt", "destination", "departure", "arriveBy"], "")},
        "police": {"book": {"booked": []}, "semi": {}},
        "restaurant": {"book": {"booked": [], "time": "", "day": "", "people": ""},
                       "semi": dict.fromkeys(["food", "pricerange", "name", "area"], "")},
        "hospital": {"book": {"booked": []}, "semi": {"department": ""}},
        "hotel": {"book": {"booked": [], "stay": "", "day": "", "people": ""},
                  "semi": dict.fromkeys(["name", "area", "parking", "pricerange", "stars", "internet", "type"], "")},
        "attraction": {"book": {"booked": []}, "semi": dict.fromkeys(["type", "name", "area"], "")},
        "train": {"book": {"booked": [], "people": "", "ticket": ""},
                  "semi": dict.fromkeys(["leaveAt", "destination", "day", "arriveBy", "departure"], "")},
        "bus": {"book": {"booked": [], "people": ""}, "semi": {"day": "", "departure": "x"}},
    }
    for key, value in values.items():
        domain, slot = key.split("-")
        part = "book" if slot.startswith("book_") else "semi"
        meta[domain][part][slot.removeprefix("book_")] = value
    return meta


def dialogue(goal_domains, turns):
    """turns: [(user text, system text, metadata)]."""
    log = []
    for user, system, meta in turns:
        log += [{"text": user, "metadata": {}}, {"text": system, "metadata": meta}]
    return {"goal": {d: ({"info": {"x": 1}} if d in goal_domains else {}) for d in
                     ("taxi", "police", "hospital", "hotel", "attraction", "train", "restaurant")}
                    | {"message": ["m"], "topic": {"hotel": True}},
            "log": log}


HOTEL_TAXI = dialogue(["hotel", "taxi"], [
    ("I need a Guesthouse in the Center, please.", "Sure. What price range?",
     metadata(**{"hotel-type": "guesthouses", "hotel-area": "center", "hotel-pricerange": "not mentioned"})),
    ("I don't care about the price. 2 nights for three people.", "Booked! Anything else?",
     metadata(**{"hotel-type": "guesthouses", "hotel-area": "center", "hotel-pricerange": "dont care",
                 "hotel-book_stay": "2", "hotel-book_people": "three", "hotel-book_booked": [{"ref": "X1"}]})),
    ("Also a taxi to the B&B.", "When do you want to leave?",
     metadata(**{"hotel-type": "guesthouses", "hotel-area": "center", "hotel-pricerange": "dont care",
                 "hotel-book_stay": "2", "hotel-book_people": "three", "taxi-destination": "Alexander B&B",
                 "taxi-leaveAt": "Don't Care", "taxi-arriveBy": "any"})),
])
RESTAURANT = dialogue(["restaurant"], [
    ("Find me a cheap place to eat.", "Which area?",
     metadata(**{"restaurant-pricerange": "cheap", "restaurant-area": "cb30aq"})),
    ("The north-east is fine. Book it at 19:30.", "Done.",
     metadata(**{"restaurant-pricerange": "cheap", "restaurant-area": "north", "restaurant-book_time": "19:30",
                 "restaurant-food": "do not care"})),
])
TRAIN_ATTRACTION = dialogue(["train", "attraction"], [
    ("A train to Ely on Monday.", "Leaving when?", metadata(**{"train-destination": "ely", "train-day": "monday"})),
    ("After 10:00 or 11:00. Also a museum.", "Ok.",
     metadata(**{"train-destination": "ely", "train-day": "monday", "train-leaveAt": "10:00|11:00",
                 "attraction-type": "museum"})),
    ("Just 10:00.", "Bye.",
     metadata(**{"train-destination": "ely", "train-day": "monday", "train-leaveAt": "10:00",
                 "attraction-type": "museum"})),
])
POLICE = dialogue(["police"], [("Where is the police station?", "Parkside.", metadata())])

DIALOGUES = {"PMUL0001.json": HOTEL_TAXI, "SNG0002.json": RESTAURANT, "MUL0003.json": TRAIN_ATTRACTION,
             "SNG0004.json": POLICE}
T5_SPM = "t5/spiece.model"


def write_raw(folder: Path, zipped=False, dialogues=DIALOGUES) -> Path:
    """Raw MultiWOZ layout: data.json + valListFile.json + testListFile.json (train = the rest)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {"data.json": json.dumps(dialogues, indent=1), "valListFile.json": "MUL0003.json\n",
             "testListFile.json": "SNG0002.json\n"}
    if zipped:
        with zipfile.ZipFile(folder / "MULTIWOZ2.1.zip", "w") as archive:
            for name, text in files.items():
                archive.writestr(f"MULTIWOZ2.1/{name}", text)
    else:
        for name, text in files.items():
            (folder / name).write_text(text)
    return folder


def write_per_split(folder: Path) -> Path:
    """ConvLab-2 layout: val.json.zip (zipped) + test.json (plain), lists; ids without ".json"; no train."""
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(folder / "val.json.zip", "w") as archive:
        archive.writestr("val.json", json.dumps({"MUL0003": TRAIN_ATTRACTION, "PMUL0001": HOTEL_TAXI}))
    (folder / "test.json").write_text(json.dumps({"SNG0002": RESTAURANT}))
    (folder / "valListFile").write_text("MUL0003\nPMUL0001\n")
    (folder / "testListFile").write_text("SNG0002\n")
    return folder


def prepare(capsys, data_dir, out_dir, *extra):
    """data_multiwoz.main in this process (fast); returns (exit status, stderr)."""
    status = dm.main(["--data_dir", str(data_dir), "--out_dir", str(out_dir), "--spm_vocab_size", "120", *extra])
    return status, capsys.readouterr().err


def read_jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def raw_out(tmp_path, capsys):
    status, err = prepare(capsys, write_raw(tmp_path / "raw"), tmp_path / "out")
    assert status == 0, err
    return tmp_path / "out"


# ---------------------------------------------------------------------------------------------------------------
# Normalization and label fixes

def test_normalize_follows_multiwoz_text_rules():
    assert dm.normalize("I'd like a B&B, please!") == "i would like a bed and breakfast , please !"
    assert dm.normalize("King's College (north-east)") == "king s college north east"
    assert dm.normalize("leave at 18.30 or 1,000 and 3.") == "leave at 18.30 or 1,000 and 3 ."
    assert dm.normalize("call 01223 351880 for three people/two rooms") == \
        "call 01223351880 for 3 people and 2 rooms"
    # "'s" is split off before the mapping table, so "it's" becomes "it s" (not "it is"), as in the reference
    assert dm.normalize("\u2018ok\u2019 it's  fine; i'd go. restaurants") == "ok it s fine , i would go . restaurant -s"
    # the reference's whole-word replacement skips a repeated word: "two two" -> "2 two" (kept for fidelity)
    assert dm.normalize("restaurant two two") == "restaurant 2 two"


def test_fix_label_applies_trade_table():
    cases = {("hotel-type", "guesthouses"): "guest house", ("hotel-area", "center"): "centre",
             ("restaurant-food", "any"): "dontcare", ("hotel-internet", "free"): "yes",
             ("hotel-parking", "free parking"): "free", ("attraction-type", "gallery"): "none",
             ("restaurant-area", "cambridge"): "none", ("hotel-book day", "we"): "wednesday",
             ("train-day", "no"): "none", ("hotel-stars", "3 star hotel"): "3", ("hotel-area", "we"): "west",
             ("hotel-type", "3 star hotel"): "hotel", ("restaurant-pricerange", "ch"): "cheap",
             ("attraction-area", "moderate"): "none", ("taxi-destination", "ely"): "ely"}
    assert {case: dm.fix_label(*case) for case in cases} == cases


def test_belief_state_uses_semi_and_book_not_booked():
    state = dm.belief_state(HOTEL_TAXI["log"][5]["metadata"], "fixture")
    assert state == {"hotel-type": "guest house", "hotel-book stay": "2", "hotel-book people": "3",
                     "hotel-area": "centre", "hotel-pricerange": "dontcare",
                     "taxi-leaveat": "dontcare", "taxi-destination": "alexander bed and breakfast",
                     "taxi-arriveby": "dontcare"}
    assert list(state) == [slot for slot in dm.SLOTS if slot in state]  # always in SLOTS order
    booked = HOTEL_TAXI["log"][3]["metadata"]  # hotel.book.booked holds a reservation: not a slot
    assert booked["hotel"]["book"]["booked"] and "hotel-book booked" not in dm.belief_state(booked, "fixture")


def test_dontcare_variants_and_dropped_values():
    for raw in ("dont care", "dontcare", "don't care", "do not care", "Don't Care", "any", "does not care"):
        assert dm.belief_state(metadata(**{"hotel-area": raw}), "fixture") == {"hotel-area": "dontcare"}, raw
    for raw in ("not mentioned", "", "none", "not men", "cb30aq"):
        assert dm.belief_state(metadata(**{"hotel-area": raw}), "fixture") == {}, raw


def test_unknown_slot_is_an_error_naming_the_field():
    with pytest.raises(ValueError, match=r"data.json: dialogue X.json, turn 1.*metadata.hotel.semi.wifi"):
        dm.belief_state(metadata(**{"hotel-wifi": "yes"}), "data.json: dialogue X.json, turn 1")


def test_thirty_slots_in_five_domains():
    assert len(dm.SLOTS) == 30 and len(set(dm.SLOTS)) == 30
    assert [sum(s.startswith(d + "-") for s in dm.SLOTS) for d in dm.DOMAINS] == [10, 6, 7, 3, 4]
    assert {"hotel-book people", "train-arriveby", "restaurant-book time", "taxi-leaveat"} <= set(dm.SLOTS)


# ---------------------------------------------------------------------------------------------------------------
# Examples and splits on the fixture

def test_one_example_per_user_turn_with_history_and_state(raw_out):
    train = read_jsonl(raw_out / "train.jsonl")
    assert [(ex["dialogue_id"], ex["turn"]) for ex in train] == [("PMUL0001.json", t) for t in range(3)]
    assert train[0]["history"] == " system: none user: i need a guesthouse in the center , please ."
    assert train[1]["history"] == (train[0]["history"] + " system: sure . what price range ? user: i do not care "
                                   "about the price . 2 nights for 3 people .")
    assert train[0]["state"] == {"hotel-type": "guest house", "hotel-area": "centre"}
    assert train[2]["state"]["taxi-destination"] == "alexander bed and breakfast"
    assert all(ex["domains"] == ["hotel", "taxi"] for ex in train)  # the dialogue's goal domains


def test_splits_follow_the_lists_and_police_is_excluded(raw_out):
    meta = json.loads((raw_out / "meta.json").read_text())
    assert {split: meta["splits"][split]["dialogues"] for split in dm.SPLITS} == {"train": 1, "dev": 1, "test": 1}
    assert meta["dropped"]["hospital_police"] == 1
    test = read_jsonl(raw_out / "test.jsonl")
    assert [ex["state"] for ex in test] == [
        {"restaurant-pricerange": "cheap"},  # "cb30aq" in the area slot is one of TRADE's "none" labels
        {"restaurant-food": "dontcare", "restaurant-pricerange": "cheap", "restaurant-area": "north",
         "restaurant-book time": "19:30"}]


def test_turns_with_several_values_leave_dev_but_keep_their_history(raw_out):
    dev = read_jsonl(raw_out / "dev.jsonl")
    assert [ex["turn"] for ex in dev] == [0, 2]  # turn 1 has "10:00|11:00"
    assert "after 10:00 or 11:00 ." in dev[1]["history"]
    assert json.loads((raw_out / "meta.json").read_text())["dropped"]["dev_turns_with_or_value"] == 1


def test_summaries_come_from_ds2_templates(raw_out):
    from ds2 import state_to_summary
    for split in dm.SPLITS:
        for ex in read_jsonl(raw_out / f"{split}.jsonl"):
            assert ex["summary"] == state_to_summary(ex["state"])


def test_zipped_raw_layout_gives_the_same_output(tmp_path, capsys, raw_out):
    status, err = prepare(capsys, write_raw(tmp_path / "zipped", zipped=True), tmp_path / "out_zip")
    assert status == 0, err
    for name in ("train.jsonl", "dev.jsonl", "test.jsonl", "test.src.bin", "test.idx.npy", "spm.model"):
        assert (tmp_path / "out_zip" / name).read_bytes() == (raw_out / name).read_bytes(), name


def test_per_split_layout_adds_json_to_ids_and_carves_train_from_dev(tmp_path, capsys):
    data = write_per_split(tmp_path / "convlab")
    status, err = prepare(capsys, data, tmp_path / "out")
    assert status == 2 and "train split is empty" in err and "--train_from_dev" in err
    status, err = prepare(capsys, data, tmp_path / "out", "--train_from_dev", "0.5")
    assert status == 0, err
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["train_from_dev"]["fraction"] == 0.5 and "NO OFFICIAL TRAIN SPLIT" in meta["train_from_dev"]["note"]
    ids = {split: {ex["dialogue_id"] for ex in read_jsonl(tmp_path / "out" / f"{split}.jsonl")} for split in dm.SPLITS}
    assert ids["test"] == {"SNG0002.json"}
    assert sorted(ids["train"] | ids["dev"]) == ["MUL0003.json", "PMUL0001.json"] and not ids["train"] & ids["dev"]


# ---------------------------------------------------------------------------------------------------------------
# Tokens

def test_bins_decode_back_to_the_jsonl_texts(tmp_path, capsys):
    status, err = prepare(capsys, write_raw(tmp_path / "raw"), tmp_path / "out", "--spm",
                          str(require_shared(T5_SPM)))
    assert status == 0, err
    out = tmp_path / "out"
    sp = spm.SentencePieceProcessor(model_file=str(out / "spm.model"))
    for split in dm.SPLITS:
        examples, idx = read_jsonl(out / f"{split}.jsonl"), np.load(out / f"{split}.idx.npy")
        src = np.memmap(out / f"{split}.src.bin", dtype=np.uint16, mode="r")
        tgt = np.memmap(out / f"{split}.tgt.bin", dtype=np.uint16, mode="r")
        assert idx.dtype == np.int64 and idx.shape == (len(examples), 4)
        assert idx[-1, 0] + idx[-1, 1] == len(src) and idx[-1, 2] + idx[-1, 3] == len(tgt)
        for ex, (s_off, s_len, t_off, t_len) in zip(examples, idx):
            source, target = src[s_off:s_off + s_len].tolist(), tgt[t_off:t_off + t_len].tolist()
            assert source[-1] == 1 and target[-1] == 1  # eos
            assert sp.decode(source[:-1]) == "Summarize this dialogue: " + ex["history"].strip()
            assert sp.decode(target[:-1]) == ex["summary"]


def test_t5_sentencepiece_ids_and_meta(tmp_path, capsys):
    t5 = require_shared(T5_SPM)
    sp = dm.load_spm(t5.read_bytes(), str(t5))
    assert dm.encode(sp, ["Hello world"], "check") == [[8774, 296, 1]]  # MODELS.md
    status, err = prepare(capsys, write_raw(tmp_path / "raw"), tmp_path / "out", "--spm", str(t5))
    assert status == 0, err
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["spm"]["sha256"] == dm.sha256(t5.read_bytes()) == dm.sha256((tmp_path / "out/spm.model").read_bytes())
    assert (meta["vocab_size"], meta["pad_id"], meta["eos_id"], meta["unk_id"]) == (32000, 0, 1, 2)
    assert meta["prefix"] == "Summarize this dialogue: " and meta["slots"] == list(dm.SLOTS)


def test_trained_sentencepiece_is_deterministic_with_t5_ids(tmp_path, capsys, raw_out):
    status, err = prepare(capsys, write_raw(tmp_path / "raw2"), tmp_path / "again")
    assert status == 0, err
    for name in ("spm.model", "train.src.bin", "test.tgt.bin"):
        assert (tmp_path / "again" / name).read_bytes() == (raw_out / name).read_bytes(), name
    sp = spm.SentencePieceProcessor(model_file=str(raw_out / "spm.model"))
    assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)


# ---------------------------------------------------------------------------------------------------------------
# select_examples: few-shot, cross-domain, multi-domain (pure; ds2.py calls it)

def synthetic_examples(n_dialogues=200, seed=0):
    rng = np.random.default_rng(seed)
    examples = []
    for d in range(n_dialogues):
        domains = sorted(rng.choice(dm.DOMAINS, size=rng.integers(1, 4), replace=False).tolist())
        state = {}
        for turn in range(int(rng.integers(1, 6))):
            domain = domains[min(turn, len(domains) - 1)]
            state = state | {next(s for s in dm.SLOTS if s.startswith(domain + "-")): "x"}
            examples.append(dict(dialogue_id=f"D{d}.json", turn=turn, domains=domains, state=state))
    return examples


def test_fewshot_samples_int_n_times_ratio_whole_dialogues():
    examples = synthetic_examples()
    for ratio in (0.01, 0.05, 0.1, 0.5):  # DS2: 1%, 5%, 10%
        chosen = dm.select_examples(examples, fewshot=ratio, seed=3)
        ids = {examples[i]["dialogue_id"] for i in chosen}
        assert len(ids) == int(200 * ratio)
        assert chosen == [i for i, ex in enumerate(examples) if ex["dialogue_id"] in ids]  # all their turns
    assert dm.select_examples(examples, fewshot=1.0) == list(range(len(examples)))


def test_fewshot_is_deterministic_by_seed():
    examples = synthetic_examples()
    assert dm.select_examples(examples, 0.1, seed=1) == dm.select_examples(examples, 0.1, seed=1)
    assert dm.select_examples(examples, 0.1, seed=1) != dm.select_examples(examples, 0.1, seed=2)


def test_except_domain_keeps_dialogues_without_it():
    examples = synthetic_examples()
    chosen = dm.select_examples(examples, except_domain="hotel", dialogue_filter="max")
    assert chosen and all("hotel" not in examples[i]["domains"] for i in chosen)
    assert chosen == [i for i, ex in enumerate(examples) if "hotel" not in ex["domains"]]
    loose = dm.select_examples(examples, except_domain="hotel")  # "min", DS2's code default (config.py:29)
    assert loose == dm.select_examples(examples, except_domain="hotel", dialogue_filter="min")
    assert set(chosen) < set(loose)
    assert all(not any(s.startswith("hotel-") for s in examples[i]["state"]) for i in loose)
    assert all(examples[i]["domains"] != ["hotel"] for i in loose)


def test_only_domain_then_fewshot_samples_from_dialogues_with_it():
    examples = synthetic_examples()
    with_taxi = {ex["dialogue_id"] for ex in examples if "taxi" in ex["domains"]}
    chosen = dm.select_examples(examples, fewshot=0.1, seed=0, only_domain="taxi")
    ids = {examples[i]["dialogue_id"] for i in chosen}
    assert ids <= with_taxi and len(ids) == int(len(with_taxi) * 0.1)


@pytest.mark.parametrize("kwargs, message", [
    (dict(fewshot=0.0), "fewshot must be in"), (dict(fewshot=1.5), "fewshot must be in"),
    (dict(except_domain="police"), "except_domain must be one of"),
    (dict(except_domain="hotel", only_domain="taxi"), "not both"), (dict(fewshot=0.001), "selects none")])
def test_select_examples_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dm.select_examples(synthetic_examples(), **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Bad input: a clear error, exit status 2, nothing written or changed

def broken_data(folder: Path, kind: str) -> Path:
    write_raw(folder)
    if kind == "malformed":
        (folder / "data.json").write_text('{\n "A.json": {\n  "goal": {,\n')
    else:
        dialogues = json.loads(json.dumps(DIALOGUES))
        system_turn = dialogues["SNG0002.json"]["log"][3]
        if kind == "no_metadata":
            del system_turn["metadata"]
        else:
            system_turn["metadata"]["restaurant"]["semi"]["stars"] = "4"
        (folder / "data.json").write_text(json.dumps(dialogues))
    return folder


@pytest.mark.parametrize("kind, message", [
    ("malformed", r"data.json: malformed JSON at line 3, column 12"),
    ("no_metadata", r"data.json: dialogue SNG0002.json, turn 3 \(system\): missing field 'metadata'"),
    ("unknown_slot", r"data.json: dialogue SNG0002.json, turn 3 \(system\): unknown slot "
                     r"metadata.restaurant.semi.stars")])
def test_bad_input_is_named_and_leaves_the_output_untouched(tmp_path, capsys, raw_out, kind, message):
    before = {p.name: p.read_bytes() for p in raw_out.iterdir()}
    status, err = prepare(capsys, broken_data(tmp_path / kind, kind), raw_out)
    assert status == 2 and err.startswith("error: ") and len(err.splitlines()) == 1
    assert re.search(message, err), err
    assert {p.name: p.read_bytes() for p in raw_out.iterdir()} == before  # no temporaries left either


def test_unknown_version_and_missing_lists_are_rejected(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        dm.parse_args(["--version", "2.3"])
    assert exit_info.value.code == 2 and "invalid choice: '2.3'" in capsys.readouterr().err
    data = write_raw(tmp_path / "raw")
    (data / "testListFile.json").unlink()
    status, err = prepare(capsys, data, tmp_path / "out")
    assert status == 2 and "valListFile and testListFile" in err and not (tmp_path / "out").exists()


def test_train_from_dev_refuses_data_with_a_train_split(tmp_path, capsys):
    status, err = prepare(capsys, write_raw(tmp_path / "raw"), tmp_path / "out", "--train_from_dev", "0.5")
    assert status == 2 and "has a train split (1 dialogues)" in err


class RangeServer(http.server.BaseHTTPRequestHandler):
    """Serves `payload`, honouring "Range: bytes=N-" as the official server does."""
    payload, ranges = b"", []

    def do_GET(self):
        start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-")) if "Range" in self.headers else 0
        RangeServer.ranges.append(start)
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(self.payload) - start))
        self.end_headers()
        self.wfile.write(self.payload[start:])

    def log_message(self, *args):
        pass


def test_download_resumes_a_partial_archive_then_prepares_it(tmp_path, capsys):
    RangeServer.payload = (write_raw(tmp_path / "source", zipped=True) / "MULTIWOZ2.1.zip").read_bytes()
    data_dir = tmp_path / "downloaded"
    data_dir.mkdir()
    (data_dir / "MULTIWOZ2.1.zip.part").write_bytes(RangeServer.payload[:100])  # an interrupted download
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeServer) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}/MULTIWOZ2.1.zip"
        status, err = prepare(capsys, data_dir, tmp_path / "out", "--download", "--url", url)
        server.shutdown()
    assert status == 0, err
    assert RangeServer.ranges == [100]
    assert (data_dir / "MULTIWOZ2.1.zip").read_bytes() == RangeServer.payload
    assert not (data_dir / "MULTIWOZ2.1.zip.part").exists()
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["splits"]["test"]["dialogues"] == 1


def test_download_offline_fails_fast_naming_data_dir(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.time()
    result = subprocess.run([sys.executable, "data_multiwoz.py", "--download", "--data_dir", str(tmp_path / "mw"),
                             "--url", f"http://127.0.0.1:{port}/MULTIWOZ2.1.zip", "--out_dir", str(tmp_path / "o")],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert time.time() - start < 10
    assert result.returncode == 2 and "--data_dir" in result.stderr and "cannot download" in result.stderr
    assert not any((tmp_path / "mw").glob("*.zip"))


# ---------------------------------------------------------------------------------------------------------------
# The real MultiWOZ 2.1 dev and test sets (../shared/data/multiwoz/convlab2_mwz21)

REAL = "multiwoz/convlab2_mwz21"


@pytest.fixture(scope="module")
def real_out(tmp_path_factory):
    """The documented offline command, run once: T5's SentencePiece, train carved out of dev."""
    data, t5 = require_shared(REAL), require_shared(T5_SPM)
    out = tmp_path_factory.mktemp("real") / "mwz21"
    result = subprocess.run([sys.executable, "data_multiwoz.py", "--data_dir", str(data), "--spm", str(t5),
                             "--out_dir", str(out), "--train_from_dev", "0.9"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "NO OFFICIAL TRAIN SPLIT" in result.stdout
    return out


@pytest.mark.slow
def test_real_counts_after_the_reference_filters(real_out):
    meta = json.loads((real_out / "meta.json").read_text())
    splits = {split: (counts["dialogues"], counts["examples"]) for split, counts in meta["splits"].items()}
    assert splits["test"] == (999, 7368)  # PMUL1455 has a 50+-word utterance
    assert splits["train"][0] + splits["dev"][0] == 998  # PMUL2075 has non-ASCII text
    assert splits["train"][0] == int(998 * 0.9)
    assert splits["train"][1] + splits["dev"][1] == 7356 - 19  # 19 turns with a "|" value
    assert meta["dropped"] == {"long_utterance": 1, "non_ascii": 1, "train_turns_with_or_value": 19,
                               "dev_turns_with_or_value": 0}


@pytest.mark.slow
def test_real_bins_hold_t5_ids_of_the_jsonl_texts(real_out):
    sp = spm.SentencePieceProcessor(model_file=str(real_out / "spm.model"))
    for split in dm.SPLITS:
        examples, idx = read_jsonl(real_out / f"{split}.jsonl"), np.load(real_out / f"{split}.idx.npy")
        src = np.memmap(real_out / f"{split}.src.bin", dtype=np.uint16, mode="r")
        tgt = np.memmap(real_out / f"{split}.tgt.bin", dtype=np.uint16, mode="r")
        sources = sp.encode(["Summarize this dialogue: " + ex["history"].strip() for ex in examples])
        targets = sp.encode([ex["summary"] for ex in examples])
        assert all(src[o:o + n].tolist() == ids + [1] for (o, n, _, _), ids in zip(idx, sources))
        assert all(tgt[o:o + n].tolist() == ids + [1] for (_, _, o, n), ids in zip(idx, targets))


def test_real_dev_and_test_turns_slots_and_values():
    dialogues, _ = dm.read_dialogues(require_shared(REAL))
    splits, dropped = dm.build_examples(dialogues, keep_all=True)
    counts = {split: (len(dm.dialogue_ids(splits[split])), len(splits[split])) for split in dm.SPLITS}
    # all user turns: the official test split (7372 turns) and ConvLab-2's dev (999 of 1000 dialogues)
    assert counts == {"train": (0, 0), "dev": (999, 7365), "test": (1000, 7372)}
    assert dropped == {}  # no hospital/police dialogue in dev or test
    states = [ex["state"] for split in ("dev", "test") for ex in splits[split]]
    assert {slot for state in states for slot in state} == set(dm.SLOTS)  # all 30 slots occur
    values = {value for state in states for value in state.values()}
    assert not values & {"", "none", "not mentioned", "dont care", "don't care", "do not care", "any"}
    assert all(value == value.strip().lower() and "  " not in value for value in values)
    # normalized: a fixed point of normalize, except the reference's "two two" quirk (restaurant two two)
    assert {value for value in values if dm.normalize(value) != value} == {"restaurant 2 two", "2 two"}
