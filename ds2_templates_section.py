# -----------------------------------------------------------------------------------------------------------------
# Templates and inverse rules: dialogue state <-> summary (DS2, Shin et al. 2022, Section 3)
#
# DS2 never predicts a state directly. The gold state {"domain-slot": value} is written as a summary by fixed
# templates, the model learns dialogue -> summary, and inverse rules read the generated summary back into a state.
# The inverse is a ceiling on the whole method: the paper's converter gives back only 91.3% of the MultiWOZ 2.1
# test states (it splits on stop words, so "alexander bed and breakfast" loses "and breakfast", "18,30" loses its
# comma, "free" parking comes back as "yes", and the domains come in random order). Ours is exact, by design:
#   1. One sentence per domain, domains always in DOMAINS order, slot phrases always in TEMPLATES order, so a state
#      has exactly one summary, whatever the order of its dict.
#   2. The parser reads that fixed order from the start of the summary to its end. Of all the readings that render
#      back to exactly the summary (generate-and-check), it keeps the one whose values are shortest in total, i.e.
#      the one that explains the most of the summary by template words: "for 2 people for 3 days" is 2 people for
#      3 days, not a stay of "2 people for 3" days. So values may hold " and ", " for ", " at ", commas, full
#      stops, digits, or another domain's words ("pipasha restaurant" contains "a restaurant").
#   3. A few states still share their summary with a shorter reading: a restaurant named "x at noon" with no
#      booking time reads as name "x" + time "noon". state_to_summary checks its own output and, when the parser
#      would read another state, writes every value in double quotes ('called "x at noon"'); quoted values are read
#      first and cannot be split wrongly. So summary_to_state(state_to_summary(s)) == s for every state; on the
#      real MultiWOZ 2.1 test and dev states no quotes are needed (tests/test_templates.py measures both).
#   4. A model's summary that is not a template output is read best effort, sentence by sentence, and never raises.
# -----------------------------------------------------------------------------------------------------------------
import bisect
import collections
import functools
import re

DOMAINS = ["hotel", "train", "restaurant", "attraction", "taxi"]  # hospital and police are excluded, as in DS2
SLOTS = [  # the 30 "domain-slot" keys of MultiWOZ as DS2 and TRADE use them
    "hotel-pricerange", "hotel-type", "hotel-parking", "hotel-book stay", "hotel-book day", "hotel-book people",
    "hotel-area", "hotel-stars", "hotel-internet", "hotel-name", "train-destination", "train-day",
    "train-departure", "train-arriveby", "train-book people", "train-leaveat", "restaurant-food",
    "restaurant-pricerange", "restaurant-area", "restaurant-name", "restaurant-book time", "restaurant-book day",
    "restaurant-book people", "attraction-area", "attraction-name", "attraction-type", "taxi-leaveat",
    "taxi-destination", "taxi-departure", "taxi-arriveby",
]
DOMAIN_PHRASE = {"hotel": "a place to stay", "train": "a train", "restaurant": "a restaurant",
                 "attraction": "an attraction", "taxi": "a taxi"}
FIRST_OPENER, LATER_OPENER = "The user is looking for ", "Also, he is searching for "
DONTCARE_LEAD = ", and he does not care about "
EMPTY_SUMMARY = "The user has not asked for anything yet."  # the summary of the empty state (DS2 writes "")

# slot: (its phrase in the domain's sentence, its name in the "does not care about" clause).
# The order of this dict is the order of the phrases in a sentence (the paper's order). {x} is the value;
# {a}, {people}, {days}, {stars} agree with it ("an expensive price", "for 1 person", "for 3 days").
TEMPLATES = {
    "hotel-type": ("which is {a} {x}", "the type"),
    "hotel-name": ("called {x}", "the name"),
    "hotel-stars": ("ranked {x} {stars}", "the stars"),
    "hotel-pricerange": ("with {a} {x} price", "the price range"),
    "hotel-area": ("located in the {x}", "the location"),
    "hotel-book people": ("for {x} {people}", "the number of people"),
    "hotel-book day": ("on {x}", "the day"),
    "hotel-book stay": ("for {x} {days}", "the length of stay"),
    "hotel-parking": ("has {x} parking", "the parking"),
    "hotel-internet": ("has {x} internet", "the internet"),
    "train-departure": ("from {x}", "the point of departure"),
    "train-destination": ("to {x}", "the destination"),
    "train-day": ("on {x}", "the day"),
    "train-book people": ("for {x} {people}", "the number of people"),
    "train-leaveat": ("leaves at {x}", "the departure time"),
    "train-arriveby": ("arrives by {x}", "the arrival time"),
    "restaurant-name": ("called {x}", "the name"),
    "restaurant-pricerange": ("with {a} {x} price", "the price range"),
    "restaurant-area": ("located in the {x}", "the location"),
    "restaurant-book people": ("for {x} {people}", "the number of people"),
    "restaurant-book day": ("on {x}", "the day"),
    "restaurant-book time": ("at {x}", "the time"),
    "restaurant-food": ("serves {x} food", "the food"),
    "attraction-type": ("which is {a} {x}", "the type"),
    "attraction-name": ("called {x}", "the name"),
    "attraction-area": ("located in the {x}", "the location"),
    "taxi-departure": ("from {x}", "the point of departure"),
    "taxi-destination": ("to {x}", "the destination"),
    "taxi-leaveat": ("leaves at {x}", "the departure time"),
    "taxi-arriveby": ("arrives by {x}", "the arrival time"),
}
# These phrases follow ", which ..." at the end of the sentence, joined by " and " ("..., which has no parking
# and has internet."); the others follow the domain phrase, separated by spaces.
WHICH_SLOTS = {"hotel-parking", "hotel-internet", "train-leaveat", "train-arriveby", "restaurant-food",
               "taxi-leaveat", "taxi-arriveby"}
YES_NO_SLOTS = {"hotel-parking", "hotel-internet"}  # "has parking" (yes), "has no parking" (no), "has free parking"
ORDERS = {d: [slot for slot in TEMPLATES if slot.startswith(d + "-")] for d in DOMAINS}  # phrase order
DONTCARE_NAMES = {d: {TEMPLATES[slot][1]: slot for slot in ORDERS[d]} for d in DOMAINS}  # "the location": area
WORD_FORMS = {"a": ("a", "an"), "people": ("people", "person"), "days": ("days", "day"), "stars": ("stars", "star")}
_FIRST_WORDS = "|".join(sorted({template.split(" ")[0] for template, _ in TEMPLATES.values()}))
# A phrase can only end where the next phrase, the "which" or "does not care" clause, or a full stop begins.
_NEXT = re.compile(r"(?=\.|, which |, and he | and (?:%s) | (?:%s) )|\Z" % (_FIRST_WORDS, _FIRST_WORDS))
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"', re.S)  # a quoted value; \" and \\ inside are escapes
_OPENER = re.compile(r"(?:is looking for|is searching for|looks for|searches for|wants) (%s)"
                     % "|".join(DOMAIN_PHRASE.values()), re.I)
_NOT_PLAIN = re.compile(_OPENER.pattern + "|the user |also, he ", re.I)  # what a plain value never holds


def _quote(value):
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def slot_phrase(slot, value, quoted=False):
    """The phrase for one slot value: slot_phrase("hotel-book people", "2") == "for 2 people"."""
    template = TEMPLATES[slot][0]
    if slot in YES_NO_SLOTS and value in ("yes", "no"):
        return template.replace("{x} ", "" if value == "yes" else "no ")
    words = {form: spellings[value[:1].lower() in "aeiou" if form == "a" else value == "1"]
             for form, spellings in WORD_FORMS.items()}
    return template.format(x=_quote(value) if quoted else value, **words)


def _listing(phrases):
    """["a"] -> "a"; ["a", "b"] -> "a and b"; ["a", "b", "c"] -> "a, b, and c"."""
    if len(phrases) <= 2:
        return " and ".join(phrases)
    return ", ".join(phrases[:-1]) + ", and " + phrases[-1]


def domain_sentence(domain, state, first=True, quoted=False):
    """One domain's sentence: its opener, its slot phrases in TEMPLATES order, then its "does not care" clause."""
    slots = [slot for slot in ORDERS[domain] if slot in state]
    said = [slot for slot in slots if state[slot] != "dontcare"]
    text = (FIRST_OPENER if first else LATER_OPENER) + DOMAIN_PHRASE[domain]
    text += "".join(" " + slot_phrase(s, state[s], quoted) for s in said if s not in WHICH_SLOTS)
    which = [slot_phrase(s, state[s], quoted) for s in said if s in WHICH_SLOTS]
    if which:
        text += ", which " + " and ".join(which)
    dontcare = [TEMPLATES[slot][1] for slot in slots if state[slot] == "dontcare"]
    if dontcare:
        text += DONTCARE_LEAD + _listing(dontcare)
    return text + "."


def _render(state, quoted):
    """The summary: the domains' sentences in DOMAINS order (the empty state has a sentence of its own)."""
    domains = [d for d in DOMAINS if any(slot.startswith(d + "-") for slot in state)]
    sentences = [domain_sentence(d, state, first=i == 0, quoted=quoted) for i, d in enumerate(domains)]
    return " ".join(sentences) if sentences else EMPTY_SUMMARY


def check_state(state):
    """Reject what the templates cannot express, instead of dropping it (the reference drops unknown slots)."""
    if not isinstance(state, dict):
        raise ValueError(f"a dialogue state is a dict {{'domain-slot': value}}, got {type(state).__name__}")
    for slot, value in state.items():
        if slot not in TEMPLATES:
            raise ValueError(f"unknown slot {slot!r} in the dialogue state; the templates know the 30 MultiWOZ "
                             f"slots {', '.join(SLOTS)} (normalize the state with data_multiwoz.py)")
        if not isinstance(value, str) or not value:
            raise ValueError(f"slot {slot!r} has value {value!r}; values are non-empty strings "
                             f"(drop 'not mentioned', '' and 'none' before writing a summary)")


def state_to_summary(state):
    """The DS2 summary of a dialogue state, e.g. {"train-day": "monday"} ->
    "The user is looking for a train on monday." Deterministic; exact to invert with summary_to_state."""
    check_state(state)
    plain = _render(state, quoted=False)
    reading = _read_exact(plain)
    if reading is not None and dict(reading) == state:
        return plain
    return _render(state, quoted=True)  # the plain summary reads as another state: quote the values (point 3)


# The inverse rules (points 2-4 above). The reading with the shortest values is found by dynamic programming over
# (domain, phrase, position in the summary), so even adversarial text is read in polynomial time.

def _spellings(part):
    """Every spelling of a template part: "with {a} " -> ["with a ", "with an "]."""
    return [part.replace("{%s}" % form, word) for form, words in WORD_FORMS.items()
            if "{%s}" % form in part for word in words] or [part]


_SPELLINGS = {slot: [_spellings(part) for part in template.split("{x}")] for slot, (template, _) in TEMPLATES.items()}
_FIXED = {slot: [(value, slot_phrase(slot, value)) for value in ("yes", "no")] for slot in YES_NO_SLOTS}
_CHECKED = YES_NO_SLOTS | {slot for slot, (template, _) in TEMPLATES.items() if re.search(r"\{(?!x\})", template)}


def _read_value(text, pos, slot, quoted, stops, limit=None, unsaid=()):
    """The readings (value, end) of the phrase of `slot` at text[pos:], shortest value first. `stops` are the sorted
    positions where a phrase may end (_NEXT); values longer than `limit` or holding an `unsaid` span are not read."""
    readings = [(value, pos + len(phrase)) for value, phrase in _FIXED.get(slot, ()) if text.startswith(phrase, pos)]
    leads, tails = _SPELLINGS[slot]
    for lead in leads:
        if not text.startswith(lead, pos):
            continue
        start = pos + len(lead)
        if quoted:  # a quoted value ends at its closing quote: one reading only
            match = _QUOTED.match(text, start)
            value, end = (re.sub(r"\\(.)", r"\1", match.group(1), flags=re.S), match.end()) if match else ("", 0)
            candidates = [(value, end + len(tail)) for tail in tails if text.startswith(tail, end)]
        else:       # a plain value may end wherever its tail ("people", "price", ...) ends at a stop
            # A plain value never holds a sentence opener ("he is searching for a train"; _NOT_PLAIN): such a
            # state is written quoted, and a model's summary with domains out of order is read sentence by sentence.
            last = len(text) if limit is None else start + limit + max(map(len, tails))
            last = min([last] + [end - 1 for begin, end in unsaid if begin >= start][:1])
            candidates = [(text[start:stop - len(tail)], stop)
                          for stop in stops[bisect.bisect_right(stops, start):bisect.bisect_right(stops, last)]
                          for tail in tails if stop - len(tail) > start and text.startswith(tail, stop - len(tail))]
        check = quoted or slot in _CHECKED  # generate-and-check the phrase, unless it cannot differ
        readings += [(value, stop) for value, stop in candidates if value and value != "dontcare"
                     and (not check or slot_phrase(slot, value, quoted) == text[pos:stop])]
    return readings


def _read_sentence_end(text, pos, domain):
    """Yield (dontcare slots, end) for the end of a domain's sentence: "." or ", and he does not care about ..."."""
    if text.startswith(".", pos):
        yield (), pos + 1
    stop = text.find(".", pos + len(DONTCARE_LEAD)) if text.startswith(DONTCARE_LEAD, pos) else -1
    if stop >= 0:
        listed = text[pos + len(DONTCARE_LEAD):stop]
        slots = [DONTCARE_NAMES[domain].get(name) for name in re.split(r", and |, | and ", listed)]
        if None not in slots and _listing([TEMPLATES[s][1] for s in ORDERS[domain] if s in slots]) == listed:
            yield tuple((slot, "dontcare") for slot in slots), stop + 1


def _best_reading(text, quoted):
    """The reading of a whole summary with the shortest values in total, as ((slot, value), ...), or None."""
    stops = [m.start() for m in _NEXT.finditer(text)]
    unsaid = [m.span() for m in _NOT_PLAIN.finditer(text)]

    @functools.lru_cache(maxsize=None)
    def best(j, i, which_open, pos):  # domain j, its phrases from the i-th on, at text[pos:] -> (cost, reading)
        domain, ends = DOMAINS[j], []
        for dontcare, stop in _read_sentence_end(text, pos, domain):  # no phrase is left...
            if not (i or dontcare):
                continue  # a sentence says something, or it is not there
            if stop == len(text):
                ends.append((0, dontcare))
            for k in range(j + 1, len(DOMAINS)):  # the next sentence is a later domain's
                opener = " " + LATER_OPENER + DOMAIN_PHRASE[DOMAINS[k]]
                rest = best(k, 0, False, stop + len(opener)) if text.startswith(opener, stop) else None
                if rest:
                    ends.append((rest[0], dontcare + rest[1]))
        options, bound = [], min([cost for cost, _ in ends], default=float("inf"))
        for k in range(i, len(ORDERS[domain])):  # ...or the next phrase present is the k-th (those before are absent)
            slot = ORDERS[domain][k]
            sep = (" and " if which_open else ", which ") if slot in WHICH_SLOTS else " "
            if not text.startswith(sep, pos):
                continue
            limit = None if bound == float("inf") else bound
            for value, end in _read_value(text, pos + len(sep), slot, quoted, stops, limit, unsaid):
                cost = 0 if slot in YES_NO_SLOTS and value in ("yes", "no") else len(value)  # "has parking"
                rest = best(j, k + 1, which_open or slot in WHICH_SLOTS, end) if cost <= bound else None
                if rest:  # (a value longer than the best reading so far cannot be part of the best reading)
                    options.append((rest[0] + cost, ((slot, value),) + rest[1]))
                    bound = min(bound, rest[0] + cost)
        options += ends
        return min(options, key=lambda option: option[0]) if options else None  # ties: the first found

    starts = [(j, len(FIRST_OPENER + DOMAIN_PHRASE[d])) for j, d in enumerate(DOMAINS)
              if text.startswith(FIRST_OPENER + DOMAIN_PHRASE[d])]
    readings = [reading for reading in (best(j, 0, False, pos) for j, pos in starts) if reading]
    return dict(min(readings, key=lambda r: r[0])[1]) if readings else None


@functools.lru_cache(maxsize=4096)  # state_to_summary reads its own output; summary_to_state reuses the reading
def _read_exact(summary):
    """The state whose summary is exactly `summary`, as (slot, value) pairs, or None. Quoted readings first."""
    if summary == EMPTY_SUMMARY:
        return ()
    for quoted in ((True, False) if '"' in summary else (False,)):  # a summary without quotes reads plainly
        state = _best_reading(summary, quoted)
        if state is not None and _render(state, quoted) == summary:  # generate-and-check
            return tuple(state.items())
    return None


def _read_best_effort(text):
    """Best-effort reading of text that is no template output (a model's summary with a mistake): every domain
    sentence found (any order, any of DS2's verbs; it ends at its first ". ") is read exactly if it can be, else
    by splitting on the phrase words, as the reference does. Junk is ignored; the first value for a slot wins."""
    text, state = " ".join(text.split()), {}
    openers = list(_OPENER.finditer(text))
    for m, after in zip(openers, openers[1:] + [None]):
        domain = next(d for d, phrase in DOMAIN_PHRASE.items() if phrase == m.group(1).lower())
        body = text[m.end():after.start() if after else len(text)].split(". ")[0]  # junk after a full stop
        body = re.sub(r"(?:[.,]?\s+(?:also,?\s+)?(?:the user|he))?[\s.,]*$", "", body, flags=re.I) + "."
        exact = _read_exact(FIRST_OPENER + DOMAIN_PHRASE[domain] + body)
        for slot, value in (exact if exact is not None else _scan_sentence(domain, body).items()):
            state.setdefault(slot, value)
    return state


def _scan_sentence(domain, body):
    """Lossy fallback for one domain's sentence: cut it at every phrase word and read each piece on its own."""
    slots, cut = {}, body.find("does not care about")
    if cut >= 0:
        for name in re.split(r",? and |, ", body[cut + len("does not care about"):].strip(" .,")):
            if name.strip() in DONTCARE_NAMES[domain]:
                slots[DONTCARE_NAMES[domain][name.strip()]] = "dontcare"
        body = body[:cut]
    body = body.replace(", which ", ", ")  # "..., which has no parking and has internet" -> one piece per phrase
    words = sorted({TEMPLATES[s][0].split(" ")[0] + " " for s in ORDERS[domain]}, key=len, reverse=True)
    pieces = re.split(r"(?:^|(?<=[ ,]))(?=(?:%s))" % "|".join(map(re.escape, words)), body)
    for piece in pieces:
        piece = re.sub(r"(?:,? which| and)?[ ,.]*$", "", piece.strip(" ,"))
        for slot in ORDERS[domain]:
            value = next((v for v, end in _read_value(piece, 0, slot, False, [len(piece)]) if end == len(piece)), None)
            if value is not None and slot not in slots:
                slots[slot] = value
                break
    return slots


def summary_to_state(summary):
    """The dialogue state of a summary: exact for every output of state_to_summary, best effort for anything
    else (never raises; unreadable text gives {})."""
    if not isinstance(summary, str):
        return {}
    reading = _read_exact(summary)
    return dict(reading) if reading is not None else _read_best_effort(summary)


def roundtrip(states):
    """The states that do not survive state -> summary -> state, as (index, state, summary, parsed)."""
    failures = []
    for i, state in enumerate(states):
        summary = state_to_summary(state)
        parsed = summary_to_state(summary)
        if parsed != state:
            failures.append((i, state, summary, parsed))
    return failures


# -----------------------------------------------------------------------------------------------------------------
# Metrics, turn level (TRADE's and DS2's definitions; dontcare is an ordinary value, a missing slot is "none")

def compute_metrics(predictions, golds, slots=SLOTS):
    """JGA, slot accuracy, slot precision/recall/F1 and per-domain JGA of predicted vs gold states, one dict per
    turn, both restricted to `slots` (cross-domain evaluation passes one domain's slots).
    - jga: the fraction of turns whose predicted (slot, value) set equals the gold set (TRADE, DS2).
    - slot_acc: over every (turn, slot): same value, or absent on both sides (DS2's slot_acc).
    - slot_precision / slot_recall / slot_f1: micro-averaged over all (turn, slot, value) pairs; a ratio with
      nothing to count is 1.0 when both sides are empty everywhere, else 0.0.
    - per_domain_jga: JGA on one domain's slots, over the turns whose gold or predicted state mentions that domain
      (per_domain_turns counts them; a domain with no such turn is left out). DS2 instead counts every turn of
      a dialogue labelled with the domain, including turns before the domain comes up, which are trivially right;
      ours does not need dialogue labels and does not count those free turns."""
    if len(predictions) != len(golds) or not golds:
        raise ValueError(f"compute_metrics needs one prediction per gold turn and at least one turn, "
                         f"got {len(predictions)} predictions and {len(golds)} gold states")
    slots = list(slots)
    unknown = [slot for slot in slots if slot not in TEMPLATES]
    if unknown or not slots:
        raise ValueError(f"compute_metrics: unknown slots {unknown} (valid: {', '.join(SLOTS)})")
    domains = [d for d in DOMAINS if any(slot.startswith(d + "-") for slot in slots)]
    joint = slot_hits = tp = fp = fn = 0
    domain_hits, domain_turns = collections.Counter(), collections.Counter()
    for prediction, gold in zip(predictions, golds):
        pred = {slot: prediction[slot] for slot in slots if slot in prediction}
        true = {slot: gold[slot] for slot in slots if slot in gold}
        joint += pred == true
        slot_hits += sum(pred.get(slot) == true.get(slot) for slot in slots)
        tp += len(pred.items() & true.items())
        fp += len(pred.items() - true.items())
        fn += len(true.items() - pred.items())
        for d in domains:
            pred_d = {s: v for s, v in pred.items() if s.startswith(d + "-")}
            true_d = {s: v for s, v in true.items() if s.startswith(d + "-")}
            if pred_d or true_d:
                domain_turns[d] += 1
                domain_hits[d] += pred_d == true_d
    empty = float(tp + fp + fn == 0)
    precision = tp / (tp + fp) if tp + fp else empty
    recall = tp / (tp + fn) if tp + fn else empty
    return {
        "jga": joint / len(golds),
        "slot_acc": slot_hits / (len(golds) * len(slots)),
        "slot_precision": precision,
        "slot_recall": recall,
        "slot_f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "per_domain_jga": {d: domain_hits[d] / domain_turns[d] for d in domains if domain_turns[d]},
        "per_domain_turns": {d: domain_turns[d] for d in domains if domain_turns[d]},
        "n_turns": len(golds),
    }
