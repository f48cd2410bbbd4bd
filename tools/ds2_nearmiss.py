"""
Near-miss summaries: how well do the inverse rules read text that is *almost* a template output?

A trained model rarely writes template text word for word. This builds near misses of the template summaries of
real MultiWOZ states (phrases swapped or repeated, an ending cut off at the length limit, a number or article slip,
"in the x", DS2's own wordings, another domain order), each with the state a careful reader would take, and scores
a reader on them: slot precision / recall / F1 over (slot, value) pairs and the share of exactly right states.

    python tools/ds2_nearmiss.py --data_dir ../shared/data/multiwoz/convlab2_mwz21 --split test
    python tools/ds2_nearmiss.py ... --ds2_converter /tmp/ds2ref/state_sum_converter.py   # also DS2's own reader

--ds2_converter takes a local copy of DS2's `ds2/utils/state_sum_converter.py` (jshin49/ds2; not shipped here) and
scores its MwzConverter.sum_to_state on the same cases. A workshop script: it imports ds2.py, never the reverse.
"""
import argparse
import collections
import importlib.util
import json
import random
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the lesson files sit one folder up
import ds2  # noqa: E402
from ds2 import DOMAIN_PHRASE, DOMAINS, ORDERS, TEMPLATES, WHICH_SLOTS, YES_NO_SLOTS, slot_phrase

KINDS = ("swap", "repeat", "cutoff", "number", "article", "in_the", "ds2_wording", "domain_order", "ds2_layout")
DS2_OPENERS = ("he looks for ", "he searches for ", "he wants ", "he is searching for ")  # DS2 rotates its verbs
DS2_DONTCARE = ds2.DS2_DONTCARE_NAMES
# DS2's own summaries (its paper and state_sum_converter.py): per domain the plain phrases in this order, then
# ", which " and the rest joined by " and ", then ", and he does not care about ..."; the sentences in random
# order, joined by " Also, ", the openers rotating; "for 1 person", "which is a hotel", "serves x" without "food"
DS2_LAYOUT = {
    "train": (["train-book people", "train-departure", "train-destination", "train-day"],
              ["train-leaveat", "train-arriveby"]),
    "taxi": (["taxi-departure", "taxi-destination"], ["taxi-leaveat", "taxi-arriveby"]),
    "restaurant": (["restaurant-name", "restaurant-area", "restaurant-pricerange", "restaurant-book people",
                    "restaurant-book day", "restaurant-book time"], ["restaurant-food"]),
    "attraction": (["attraction-type", "attraction-name", "attraction-area"], []),
    "hotel": (["hotel-type", "hotel-name", "hotel-stars", "hotel-pricerange", "hotel-area", "hotel-book people",
               "hotel-book day", "hotel-book stay"], ["hotel-parking", "hotel-internet"]),
}
DS2_OPENER_ORDER = ("The user is looking for ", "he is searching for ", "he looks for ", "he searches for ",
                    "he wants ")
DS2_DONTCARE_ORDER = {  # the order of DS2's "does not care" names
    "train": ["book people", "departure", "destination", "day", "arriveby", "leaveat"],
    "restaurant": ["name", "area", "food", "pricerange", "book people", "book day", "book time"],
    "hotel": ["type", "name", "stars", "pricerange", "area", "book people", "book day", "book stay", "parking",
              "internet"],
    "taxi": ["destination", "departure", "leaveat", "arriveby"], "attraction": ["area", "name", "type"]}


def ds2_phrase(slot, value):
    """A slot's phrase as DS2 writes it."""
    name = slot.split("-", 1)[1]
    if slot in YES_NO_SLOTS:
        return f"has {'no ' if value == 'no' else ''}{name}"
    if name == "book stay":
        return f"for {value} day{'s' if value.isdigit() and int(value) > 1 else ''}"
    if name == "book people":
        return f"for {value} {'people' if value.isdigit() and int(value) > 1 else 'person'}"
    if slot == "hotel-type":
        return f"which is a {value}"
    if name == "food":
        return f"serves {value}"
    return slot_phrase(slot, value)


def ds2_summary(state, rng):
    """The state written in DS2's layout, domains in random order; and the state a careful reader takes from it
    (DS2 writes "free" parking as "has parking": yes)."""
    domains = [d for d in DOMAINS if any(s.startswith(d + "-") for s in state)]
    rng.shuffle(domains)
    sentences = []
    for i, d in enumerate(domains):
        plain, which = DS2_LAYOUT[d]
        text = DS2_OPENER_ORDER[i] + DOMAIN_PHRASE[d] + "".join(
            " " + ds2_phrase(s, state[s]) for s in plain if state.get(s, "dontcare") != "dontcare")
        rest = [ds2_phrase(s, state[s]) for s in which if state.get(s, "dontcare") != "dontcare"]
        if rest:
            text += ", which " + " and ".join(rest)
        names = [DS2_DONTCARE.get(f"{d}-{n}", TEMPLATES[f"{d}-{n}"][1]) for n in DS2_DONTCARE_ORDER[d]
                 if state.get(f"{d}-{n}") == "dontcare"]
        if names:
            text += ds2.DONTCARE_LEAD + ds2._listing(names)
        sentences.append(text + ".")
    gold = {s: "yes" if s in YES_NO_SLOTS and v not in ("yes", "no", "dontcare") else v for s, v in state.items()}
    return " Also, ".join(sentences), gold


def sentence(domain, state, opener, order=None, phrase=None, dontcare_name=None, dontcare_lead=ds2.DONTCARE_LEAD):
    """One domain's sentence as the templates write it, with hooks to vary it: the order of the plain phrases, the
    text of a phrase (phrase(slot, value) -> text), the name of a dontcare slot, the lead of the dontcare clause."""
    phrase = phrase or slot_phrase
    said = [s for s in ORDERS[domain] if s in state and state[s] != "dontcare"]
    plain = [s for s in said if s not in WHICH_SLOTS]
    text = opener + DOMAIN_PHRASE[domain] + "".join(" " + phrase(s, state[s]) for s in (order or plain))
    which = [phrase(s, state[s]) for s in said if s in WHICH_SLOTS]
    if which:
        text += ", which " + " and ".join(which)
    names = [(dontcare_name or (lambda s: TEMPLATES[s][1]))(s) for s in ORDERS[domain] if state.get(s) == "dontcare"]
    if names:
        text += dontcare_lead + ds2._listing(names)
    return text + "."


def summary(state, domains=None, sentences=None):
    """The sentences of the domains (DOMAINS order unless given), the first with the first opener."""
    domains = domains or [d for d in DOMAINS if any(s.startswith(d + "-") for s in state)]
    sentences = sentences or {}
    out = []
    for i, d in enumerate(domains):
        opener = ds2.FIRST_OPENER if i == 0 else ds2.LATER_OPENER
        out.append(sentences[d](opener) if d in sentences else sentence(d, state, opener))
    return " ".join(out)


def near_miss(kind, state, rng):
    """(text, gold state) of one near miss of this kind built from `state`, or None when the state has nothing to
    vary that way."""
    domains = [d for d in DOMAINS if any(s.startswith(d + "-") for s in state)]
    said = {d: [s for s in ORDERS[d] if s in state and state[s] != "dontcare"] for d in domains}
    pick = rng.choice
    if kind == "swap":  # the plain phrases of one sentence in another order
        options = [d for d in domains if len([s for s in said[d] if s not in WHICH_SLOTS]) >= 2]
        if not options:
            return None
        d = pick(options)
        plain = [s for s in said[d] if s not in WHICH_SLOTS]
        order = plain[:]
        while order == plain:
            rng.shuffle(order)
        return summary(state, sentences={d: lambda o: sentence(d, state, o, order=order)}), state
    if kind == "repeat":  # one phrase said twice in a row
        d = pick(domains)
        if not said[d]:
            return None
        twice = pick(said[d])
        phrase = lambda s, v: slot_phrase(s, v) + (" " + slot_phrase(s, v) if s == twice and s not in WHICH_SLOTS
                                                   else " and " + slot_phrase(s, v) if s == twice else "")
        return summary(state, sentences={d: lambda o: sentence(d, state, o, phrase=phrase)}), state
    if kind == "cutoff":  # the summary stops at the length limit right after the lead of its last phrase
        d = domains[-1]
        if not said[d] or any(state.get(s) == "dontcare" for s in ORDERS[d]):
            return None
        text = summary(state)[:-1]
        last = ([s for s in said[d] if s in WHICH_SLOTS] or said[d])[-1]  # the "which" phrases come last
        full = slot_phrase(last, state[last])
        if not text.endswith(full):
            return None
        lead = "has" if last in YES_NO_SLOTS else full[:full.index(state[last])].rstrip()
        return text[:-len(full)] + lead, {s: v for s, v in state.items() if s != last}
    if kind == "number":  # "for 1 people", "ranked 4 star", "for 2 day"
        slots = [s for s in state if s.endswith(("book people", "book stay", "stars")) and state[s].isdigit()]
        if not slots:
            return None
        slot = pick(slots)
        words = {"people": ("people", "person"), "stay": ("days", "day"), "stars": ("stars", "star")}
        plural, singular = words[slot.rsplit(" ", 1)[-1].split("-")[-1]]
        wrong = plural if state[slot] == "1" else singular
        phrase = lambda s, v: re.sub(r" \w+$", " " + wrong, slot_phrase(s, v)) if s == slot else slot_phrase(s, v)
        d = slot.split("-")[0]
        return summary(state, sentences={d: lambda o: sentence(d, state, o, phrase=phrase)}), state
    if kind == "article":  # "with a expensive price", "which is an museum"
        slots = [s for s in state if s.endswith(("pricerange", "-type")) and state[s] != "dontcare"]
        if not slots:
            return None
        slot = pick(slots)
        swap = lambda text: re.sub(r"\b(a|an) (?=\S+( price)?$)", lambda m: "an " if m.group(1) == "a" else "a ",
                                   text, count=1)
        phrase = lambda s, v: swap(slot_phrase(s, v)) if s == slot else slot_phrase(s, v)
        d = slot.split("-")[0]
        return summary(state, sentences={d: lambda o: sentence(d, state, o, phrase=phrase)}), state
    if kind == "in_the":  # "in the north" for "located in the north"
        slots = [s for s in state if s.endswith("-area") and state[s] in ("north", "south", "east", "west", "centre")]
        if not slots:
            return None
        slot = pick(slots)
        phrase = lambda s, v: "in the " + v if s == slot else slot_phrase(s, v)
        d = slot.split("-")[0]
        return summary(state, sentences={d: lambda o: sentence(d, state, o, phrase=phrase)}), state
    if kind == "ds2_wording":  # DS2's verbs, its "does not care" names, "serves x" without "food", ". He does not"
        openers = {d: ("The user wants " if i == 0 else "Also, " + pick(DS2_OPENERS)) for i, d in enumerate(domains)}
        name = lambda s: DS2_DONTCARE.get(s, TEMPLATES[s][1])
        phrase = lambda s, v: "serves " + v if s == "restaurant-food" else slot_phrase(s, v)
        lead = pick((ds2.DONTCARE_LEAD, ". He does not care about "))
        sentences = {d: (lambda o, d=d: sentence(d, state, openers[d], phrase=phrase, dontcare_name=name,
                                                 dontcare_lead=lead)) for d in domains}
        text = summary(state, sentences=sentences)
        return (text, state) if text != ds2.state_to_summary(state) else None
    if kind == "domain_order":  # the domains in another order (DS2 shuffles them on every call)
        if len(domains) < 2:
            return None
        order = domains[:]
        while order == domains:
            rng.shuffle(order)
        return summary(state, domains=order), state
    if kind == "ds2_layout":  # DS2's own summary of the state (the text DS2's model learns to write)
        return ds2_summary(state, rng) if len(domains) >= 2 or any(v == "dontcare" for v in state.values()) \
            or any(s in state for s in ("restaurant-food", "hotel-type", "train-book people")) else None
    raise ValueError(f"unknown near-miss kind {kind!r} (kinds: {', '.join(KINDS)})")


def build_cases(states, per_kind=40, seed=0):
    """per_kind near misses of each kind from distinct non-empty states, drawn with `seed`: [(kind, text, gold)]."""
    rng = random.Random(seed)
    pool = [s for s in {json.dumps(s, sort_keys=True): s for s in states if s}.values()]
    rng.shuffle(pool)
    cases = []
    for kind in KINDS:
        made = 0
        for state in pool:
            case = near_miss(kind, state, rng)
            if case is not None:
                cases.append((kind, *case))
                made += 1
                if made == per_kind:
                    break
    return cases


def score(read, cases):
    """Slot precision / recall / F1 over (slot, value) pairs and the exact-state rate, overall and per kind."""
    tp = fp = fn = 0
    exact, by_kind = 0, collections.defaultdict(lambda: [0, 0])
    for kind, text, gold in cases:
        pred = read(text)
        pred_pairs, gold_pairs = set(pred.items()), set(gold.items())
        tp, fp, fn = tp + len(pred_pairs & gold_pairs), fp + len(pred_pairs - gold_pairs), fn + len(gold_pairs - pred_pairs)
        exact += pred == gold
        by_kind[kind][0] += pred == gold
        by_kind[kind][1] += 1
    p, r = tp / max(1, tp + fp), tp / max(1, tp + fn)
    return {"cases": len(cases), "slot_precision": p, "slot_recall": r, "slot_f1": 2 * p * r / max(1e-12, p + r),
            "exact_state": exact / len(cases), "exact_by_kind": {k: v[0] / v[1] for k, v in by_kind.items()}}


def load_ds2_converter(path):
    """MwzConverter(...).sum_to_state of a local copy of DS2's state_sum_converter.py (its default converter)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: --ds2_converter takes a copy of jshin49/ds2's "
                                f"ds2/utils/state_sum_converter.py")
    spec = importlib.util.spec_from_file_location("ds2_state_sum_converter", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_converter("mwz").sum_to_state


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", default="../shared/data/multiwoz/convlab2_mwz21", help="raw MultiWOZ folder")
    parser.add_argument("--split", default="test", help="the split whose states the near misses are built from")
    parser.add_argument("--per_kind", type=int, default=40, help="near misses of each kind")
    parser.add_argument("--seed", type=int, default=0, help="RNG seed of the sample")
    parser.add_argument("--ds2_converter", default="", help="a local copy of DS2's state_sum_converter.py")
    parser.add_argument("--out", default="", help="write the cases with both readings here (JSONL)")
    args = parser.parse_args(argv)
    import data_multiwoz
    try:
        dialogues, _ = data_multiwoz.read_dialogues(Path(args.data_dir))
        examples, _ = data_multiwoz.build_examples(dialogues, keep_all=True)
        readers = {"ours (ds2.summary_to_state)": ds2.summary_to_state}
        if args.ds2_converter:
            readers["DS2's converter (MwzConverter.sum_to_state)"] = load_ds2_converter(args.ds2_converter)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cases = build_cases([ex["state"] for ex in examples[args.split]], args.per_kind, args.seed)
    print(f"{len(cases)} near misses from the {args.split} states of {args.data_dir} (seed {args.seed}): "
          + ", ".join(f"{k} {n}" for k, n in collections.Counter(k for k, _, _ in cases).items()))
    print("\n| reader | slot precision | slot recall | slot F1 | exact state |\n|---|---|---|---|---|")
    results = {}
    for name, read in readers.items():
        results[name] = m = score(read, cases)
        print(f"| {name} | {m['slot_precision']:.1%} | {m['slot_recall']:.1%} | {m['slot_f1']:.1%} | "
              f"{m['exact_state']:.1%} |")
    print("\nexact state by kind: " + "; ".join(
        f"{kind}: " + " / ".join(f"{results[n]['exact_by_kind'][kind]:.0%}" for n in readers) for kind in KINDS
        if kind in results[next(iter(readers))]["exact_by_kind"]) + f" ({' / '.join(readers)})")
    plain = [("template", ds2.state_to_summary(gold), gold) for kind, _, gold in cases if kind != "cutoff"]
    print(f"on the unchanged template summaries of the same states ({len(plain)}), exact state: " + ", ".join(
        f"{name} {score(read, plain)['exact_state']:.1%}" for name, read in readers.items()))
    if args.out:
        rows = [{"kind": k, "text": t, "gold": g, **{n: r(t) for n, r in readers.items()}} for k, t, g in cases]
        ds2.write_text(Path(args.out), "".join(json.dumps(row) + "\n" for row in rows))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
