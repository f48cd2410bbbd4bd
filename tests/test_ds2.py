"""ds2.py: the from-scratch T5 (against the formulas of MODELS.md and against transformers as an independent
reference), its decoding, the LR schedule, the training/evaluation commands end to end, and config errors."""
import hashlib
import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ds2
from conftest import require_module, require_shared

ROOT = Path(__file__).resolve().parents[1]
# Tiny models: with several threads on a busy 2-core machine, OpenMP hand-offs cost more than the matmuls.
ONE_THREAD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}



def tiny_t5(vocab_size=64, seed=0, **overrides):
    torch.manual_seed(seed)
    config = dict(vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                  num_heads=4, dropout=0.0)
    return ds2.T5(ds2.T5Config(**{**config, **overrides})).eval()


def random_batch(lengths, vocab_size=64, seed=1, value=ds2.PAD_ID):
    """Right-padded rows of random ids (>= 2: no pad, no eos inside), each ending with EOS."""
    g = torch.Generator().manual_seed(seed)
    rows = [np.append(torch.randint(2, vocab_size, (n - 1,), generator=g).numpy(), ds2.EOS_ID) for n in lengths]
    return ds2.pad(rows, value)


def until_eos(row):
    row = list(row)
    return row[:row.index(ds2.EOS_ID) + 1] if ds2.EOS_ID in row else row


# ----------------------------------------------------------------------------------------------------------------
# Model

def test_relative_position_buckets_at_their_edges():
    # MODELS.md, encoder: 16 buckets per direction (+16 when the key is right of the query); n = |relative|;
    # exact for n < 8, else 8 + floor(log(n / 8) / log(128 / 8) * 8), capped at 15:
    #   7 -> 7; 8 -> 8 + floor(0) = 8; 12 -> 8 + floor(1.17) = 9; 64 -> 8 + floor(6.0) = 14;
    #   127 -> 8 + floor(7.98) = 15; 128 -> 8 + 8 = 16, capped to 15; 200 -> 15
    n = torch.tensor([7, 8, 12, 64, 127, 128, 200])
    assert ds2.relative_position_bucket(-n, bidirectional=True).tolist() == [7, 8, 9, 14, 15, 15, 15]   # key left
    assert ds2.relative_position_bucket(n, bidirectional=True).tolist() == [23, 24, 25, 30, 31, 31, 31]  # right
    assert ds2.relative_position_bucket(torch.tensor([0]), bidirectional=True).tolist() == [0]
    # decoder: n = max(0, -relative); exact for n < 16, else 16 + floor(log(n / 16) / log(128 / 16) * 16), capped
    # at 31: 15 -> 15; 16 -> 16; 20 -> 16 + floor(1.72) = 17; 64 -> 16 + floor(10.67) = 26;
    # 127 -> 16 + floor(15.94) = 31; 128 -> 32, capped to 31; a key in the future (relative > 0) -> 0
    n = torch.tensor([15, 16, 20, 64, 127, 128])
    assert ds2.relative_position_bucket(-n, bidirectional=False).tolist() == [15, 16, 17, 26, 31, 31]
    assert ds2.relative_position_bucket(torch.tensor([1, 5, 300]), bidirectional=False).tolist() == [0, 0, 0]


def test_decoder_is_causal():
    model = tiny_t5()
    src, tgt = random_batch([9, 6]), random_batch([8, 8], seed=2)
    enc = model.encode(src)
    changed = tgt.clone()
    changed[:, 5:] = 3
    with torch.no_grad():
        before, after = model.decode(tgt, enc, src), model.decode(changed, enc, src)
    assert torch.equal(before[:, :5], after[:, :5])          # positions before the change see nothing of it
    assert not torch.allclose(before[:, 5:], after[:, 5:])   # the changed positions themselves do change


def test_kv_cache_decoding_equals_full_recomputation():
    model = tiny_t5(vocab_size=48, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    src = random_batch([13, 7, 10], vocab_size=48)
    enc, cache = model.encode(src), model.new_cache()
    seqs = torch.zeros(3, 1, dtype=torch.long)
    with torch.no_grad():
        for _ in range(12):  # the same prefix through both paths; positions up to 12 exercise the causal buckets
            cached = model.next_logits(seqs, enc, src, cache)
            full = model.next_logits(seqs, enc, src, None)
            assert (cached - full).abs().max() < 1e-5
            assert torch.equal(cached.argmax(-1), full.argmax(-1))
            seqs = torch.cat([seqs, cached.argmax(-1, keepdim=True)], dim=1)
    for beams in (1, 3):
        assert torch.equal(model.generate(src, 12, num_beams=beams, use_cache=True),
                           model.generate(src, 12, num_beams=beams, use_cache=False))


def test_beam_size_1_equals_greedy():
    model = tiny_t5(vocab_size=24, feed_forward_proj="gated-gelu", tie_word_embeddings=False, seed=3)
    with torch.no_grad():
        model.lm_head.weight[ds2.EOS_ID] *= 2  # a likelier EOS: rows end at different steps
    src = random_batch([11, 5, 8, 14], vocab_size=24)
    greedy = model.generate(src, 15)
    beam = model.beam_search(src, 15, num_beams=1, length_penalty=1.0)
    assert any(ds2.EOS_ID in row for row in greedy.tolist())  # the EOS handling is exercised, not only max length
    assert [until_eos(r) for r in greedy.tolist()] == [until_eos(r) for r in beam.tolist()]


def test_padding_does_not_change_outputs():
    model = tiny_t5(feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    batch = random_batch([6, 15, 11])
    alone = batch[:1, :6]  # the shortest row, without its 9 pad columns
    labels = random_batch([5, 9, 7], seed=4, value=-100)
    with torch.no_grad():
        logits_batch, _ = model(batch, labels)
        logits_alone, _ = model(alone, labels[:1, :5])
    assert (logits_batch[0, :5] - logits_alone[0]).abs().max() < 1e-5
    assert until_eos(model.generate(batch, 10)[0].tolist()) == until_eos(model.generate(alone, 10)[0].tolist())


def test_beams_share_one_encoder_pass_and_one_cross_projection():
    model = tiny_t5()
    rows_seen = []
    for block in model.decoder.blocks:
        block.cross.k.register_forward_hook(lambda module, args, out: rows_seen.append(args[0].size(0)))
    encodes = []
    model.encode = lambda src, encode=model.encode: encodes.append(1) or encode(src)
    model.generate(random_batch([7, 9]), 6, num_beams=4)
    assert len(encodes) == 1                   # the encoder runs once, not once per beam
    assert rows_seen == [2] * len(model.decoder.blocks)  # cross keys on the 2 examples, once; beams get copies


def save_reference(hf_model, folder, fmt, keys):
    """A transformers T5 saved by save_pretrained (safetensors, the minimal key set in transformers 5), rewritten as
    pytorch_model.bin and/or with the full key set (embedding aliases and lm_head, as older checkpoints hold)."""
    require_module("safetensors")
    from safetensors.torch import load_file, save_file
    hf_model.save_pretrained(folder)
    tensors = load_file(folder / "model.safetensors")
    if keys == "full":
        for alias in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"):
            tensors.setdefault(alias, tensors["shared.weight"].clone())
    else:
        assert "encoder.embed_tokens.weight" not in tensors
    if fmt == "bin":
        (folder / "model.safetensors").unlink()
        torch.save(tensors, folder / "pytorch_model.bin")
    else:
        save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors",
                  metadata={"format": "pt"})


def reference_t5(variant, num_decoder_layers=3, vocab_size=40):
    transformers = require_module("transformers")
    T5Config, T5ForConditionalGeneration = transformers.T5Config, transformers.T5ForConditionalGeneration
    torch.manual_seed(0)
    ff = dict(original=dict(feed_forward_proj="relu"),
              v1_1=dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False))[variant]
    config = T5Config(vocab_size=vocab_size, d_model=32, d_kv=12, d_ff=48, num_layers=2, num_heads=4,
                      num_decoder_layers=num_decoder_layers, dropout_rate=0.0, decoder_start_token_id=0, **ff)
    model = T5ForConditionalGeneration(config).eval()
    if variant == "v1_1":  # transformers 5 ties every head at init; a v1.1 head is its own matrix
        model.lm_head.weight = torch.nn.Parameter(torch.randn(vocab_size, 32))
    return model


@pytest.mark.parametrize("variant", ["original", "v1_1"])
@pytest.mark.parametrize("fmt,keys", [("safetensors", "minimal"), ("bin", "full"), ("safetensors", "full"),
                                      ("bin", "minimal")])
def test_from_pretrained_reproduces_transformers_logits(tmp_path, variant, fmt, keys):
    hf = reference_t5(variant)  # d_kv 12 x 4 heads = 48 != d_model 32; 2 encoder vs 3 decoder blocks
    save_reference(hf, tmp_path, fmt, keys)
    model = ds2.T5.from_pretrained(tmp_path).eval()
    assert model.config.tie_word_embeddings == (variant == "original")
    src = random_batch([150, 90, 140], vocab_size=40)  # past 128: the farthest position buckets
    labels = random_batch([140, 30, 60], vocab_size=40, seed=5, value=-100)
    with torch.no_grad():
        ref = hf(input_ids=src, attention_mask=(src != 0).long(), labels=labels)
        logits, loss = model(src, labels)
    assert (logits - ref.logits).abs().max() <= 1e-5 * ref.logits.abs().max()
    assert abs(loss.item() - ref.loss.item()) <= 1e-5 * ref.loss.item()


def test_beam_search_and_greedy_match_transformers_generate(tmp_path):
    hf = reference_t5("v1_1", num_decoder_layers=2, vocab_size=30)  # a random v1.1 head emits EOS now and then
    hf.save_pretrained(tmp_path)
    model = ds2.T5.from_pretrained(tmp_path).eval()
    src = random_batch([20, 12, 17, 9], vocab_size=30, seed=7)
    mask = (src != 0).long()
    ours = model.generate(src, 20)
    theirs = hf.generate(input_ids=src, attention_mask=mask, max_new_tokens=20, do_sample=False)
    assert [until_eos(r) for r in ours.tolist()] == [until_eos(r[1:]) for r in theirs.tolist()]
    for beams, penalty in ((4, 1.0), (3, 0.6), (4, 2.0)):
        ours = model.generate(src, 20, num_beams=beams, length_penalty=penalty)
        theirs = hf.generate(input_ids=src, attention_mask=mask, max_new_tokens=20, num_beams=beams,
                             length_penalty=penalty, do_sample=False)
        assert [until_eos(r) for r in ours.tolist()] == [until_eos(r[1:]) for r in theirs.tolist()]


def test_ds2_decoding_settings_match_transformers_generate(tmp_path):
    # DS2.py:68-74: generate(min_length=5, max_length=100, early_stopping=True); both lengths count the start
    # token, so --preset paper decodes with min_new_tokens 4 and max_new_tokens 99 (here max_length 21 -> 20)
    hf = reference_t5("v1_1", num_decoder_layers=2, vocab_size=30)
    hf.save_pretrained(tmp_path)
    model = ds2.T5.from_pretrained(tmp_path).eval()
    with torch.no_grad():  # make EOS likely, so that min_length has something to stop
        for m in (model.lm_head, hf.lm_head):
            m.weight[ds2.EOS_ID] *= 3
    src = random_batch([20, 12, 17, 9, 14, 6], vocab_size=30, seed=7)
    mask = (src != 0).long()
    for beams in (1, 4, 10):
        ours = model.generate(src, 20, num_beams=beams, min_new_tokens=4, early_stopping=True)
        theirs = hf.generate(input_ids=src, attention_mask=mask, min_length=5, max_length=21, num_beams=beams,
                             early_stopping=True, do_sample=False)
        rows = [until_eos(r) for r in ours.tolist()]
        assert rows == [until_eos(r[1:]) for r in theirs.tolist()], beams
        assert all(ds2.EOS_ID not in r[:4] for r in rows)
    assert any(ds2.EOS_ID in r[:4] for r in model.generate(src, 20).tolist())  # without min_new_tokens


def test_safetensors_reader_reads_f32_f16_bf16_and_rejects_a_cut_file(tmp_path):
    require_module("safetensors")
    from safetensors.torch import save_file
    tensors = {"a": torch.randn(3, 4), "b": torch.randn(5).half(), "c": torch.randn(2, 2).bfloat16()}
    save_file(tensors, tmp_path / "x.safetensors")
    read = ds2.read_safetensors(tmp_path / "x.safetensors")
    assert all(torch.equal(read[k], v) and read[k].dtype == v.dtype for k, v in tensors.items())
    data = (tmp_path / "x.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-10])
    with pytest.raises(ValueError, match=r"data_offsets \[56, 66\] must be two integers 0 <= begin <= end <= 56"):
        ds2.read_safetensors(tmp_path / "cut.safetensors")


def test_tiny_t5_overfits_four_targets():
    model = tiny_t5(d_model=64, d_kv=16, d_ff=128).train()
    src = random_batch([13, 18, 10, 21])
    labels = random_batch([9, 12, 7, 11], seed=2, value=-100)  # padding -100: must not count in the loss
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(400):
        _, loss = model(src, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 0.01:
            break
    assert loss.item() < 0.05
    out = model.eval().generate(src, 16)
    assert [until_eos(r) for r in out.tolist()] == [[t for t in r if t != -100] for r in labels.tolist()]


def test_lr_schedule_at_its_boundaries():
    config = ds2.Config()  # seed: warmup from 0 over 1000 steps to 5e-4, then cosine to 0
    assert ds2.get_lr(0, 5000, config) == 0.0
    assert ds2.get_lr(500, 5000, config) == pytest.approx(2.5e-4)
    assert ds2.get_lr(1000, 5000, config) == pytest.approx(5e-4)
    assert ds2.get_lr(3000, 5000, config) == pytest.approx(2.5e-4)    # half way down the cosine
    assert ds2.get_lr(5000, 5000, config) == pytest.approx(0.0, abs=1e-12)
    assert ds2.get_lr(1001, 5000, config) < 5e-4
    _, paper = ds2.parse_args(["--preset", "paper"])  # DS2's code: constant 5e-5, no warmup
    assert {ds2.get_lr(s, 100, paper) for s in (0, 50, 99)} == {5e-5}


def test_batch_order_is_a_pure_function_of_seed_and_step():
    rows = np.arange(10, 30)
    epoch = [ds2.batch_rows(step, 7, rows, 8) for step in range(3)]  # 20 rows: batches of 8, 8, 4
    assert [len(b) for b in epoch] == [8, 8, 4] and sorted(np.concatenate(epoch).tolist()) == list(range(10, 30))
    assert np.array_equal(ds2.batch_rows(1, 7, rows, 8), epoch[1])
    assert not np.array_equal(ds2.batch_rows(3, 7, rows, 8), epoch[0])  # the next epoch has its own order


def test_sources_keep_their_most_recent_tokens():
    ids = np.array([5, 6, 7, 8, 9, ds2.EOS_ID])
    assert ds2.clip(ids, 4, keep_end=True).tolist() == [7, 8, 9, ds2.EOS_ID]
    assert ds2.clip(ids, 4, keep_end=False).tolist() == [5, 6, 7, ds2.EOS_ID]
    assert ds2.clip(ids, 6, keep_end=True).tolist() == ids.tolist()


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this ran",))
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"model": Payload(), "model_config": {}}, protocol=2))
    with pytest.raises(ValueError, match="refused"):
        ds2.load_checkpoint(path)


# ----------------------------------------------------------------------------------------------------------------
# End to end on a data folder the test writes (the format of data_multiwoz.py), with T5's SentencePiece model

STATES = [
    {},
    {"hotel-area": "north", "hotel-pricerange": "cheap"},
    {"train-day": "monday", "train-destination": "cambridge", "train-departure": "london kings cross"},
    {"restaurant-food": "italian", "restaurant-book people": "2", "restaurant-book time": "18:30"},
    {"attraction-type": "museum", "attraction-area": "centre"},
    {"taxi-leaveat": "10:15", "taxi-destination": "pizza hut city centre"},
    {"hotel-parking": "yes", "hotel-stars": "4", "restaurant-area": "dontcare"},
]


def write_data_dir(folder, spm_path, sizes=(("train", 28), ("dev", 14), ("test", 14))):
    import sentencepiece
    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_path))
    folder.mkdir()
    model = spm_path.read_bytes()
    (folder / "spm.model").write_bytes(model)
    for split, n in sizes:
        examples, src, tgt = [], [], []
        for i in range(n):
            state = STATES[i % len(STATES)]
            history = f" system: none user: i need {' and '.join(state.values()) or 'nothing'} please"
            domains = sorted({slot.split("-")[0] for slot in state})
            examples.append(dict(dialogue_id=f"{split}{i // 3}.json", turn=i % 3, domains=domains, history=history,
                                 state=state, summary=ds2.state_to_summary(state)))
            src.append(sp.encode("Summarize this dialogue: " + history) + [1])
            tgt.append(sp.encode(examples[-1]["summary"]) + [1])
        lens = np.array([[len(s), len(t)] for s, t in zip(src, tgt)])
        offsets = np.cumsum(lens, axis=0) - lens
        np.save(folder / f"{split}.idx.npy", np.stack([offsets[:, 0], lens[:, 0], offsets[:, 1], lens[:, 1]], 1))
        np.concatenate([np.array(s, np.uint16) for s in src]).tofile(folder / f"{split}.src.bin")
        np.concatenate([np.array(t, np.uint16) for t in tgt]).tofile(folder / f"{split}.tgt.bin")
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(ex) + "\n" for ex in examples))
    meta = dict(vocab_size=sp.get_piece_size(), pad_id=0, eos_id=1, unk_id=2,
                spm=dict(file="spm.model", sha256=hashlib.sha256(model).hexdigest()), slots=ds2.SLOTS)
    (folder / "meta.json").write_text(json.dumps(meta))


def run_ds2(*args):
    return subprocess.run([sys.executable, "ds2.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          env=ONE_THREAD_ENV, timeout=300)


def test_train_then_evaluate_end_to_end(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    write_data_dir(data, require_shared("t5/spiece.model"))
    run = run_ds2("--preset", "smoke", "--data_dir", data, "--out_dir", out)
    assert run.returncode == 0, run.stderr
    assert "eval step 3 |" in run.stdout and "test test (best.pt" in run.stdout
    metrics = json.loads((out / "test_metrics.json").read_text())
    for key in ("jga", "slot_acc", "slot_precision", "slot_recall", "slot_f1", "per_domain_jga", "summary_em"):
        assert key in metrics
    assert metrics["n_turns"] == 14
    # both scorings, each named: trade (all 30 slots) at the top level, ds2 (the goal domains' slots) beside it
    assert metrics["scoring"].startswith("trade:") and metrics["ds2"]["scoring"].startswith("ds2:")
    assert metrics["ds2"]["n_turns"] == 14
    assert "trade scoring: jga" in run.stdout and "ds2 scoring: jga" in run.stdout
    rows = [json.loads(line) for line in (out / "test_predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 14
    assert set(rows[0]) == {"dialogue_id", "turn", "gold_state", "pred_state", "gold_summary", "gen_summary"}
    # the scores are those of the written predictions, counted here by hand: a turn is right when its whole state
    # is (trade: all 30 slots; ds2: the slots of the dialogue's goal domains only)
    assert metrics["jga"] == sum(r["pred_state"] == r["gold_state"] for r in rows) / 14
    goals = [json.loads(line)["domains"] for line in (data / "test.jsonl").read_text().splitlines()]
    in_goal = [lambda state, d=d: {k: v for k, v in state.items() if k.split("-")[0] in d} for d in goals]
    assert metrics["ds2"]["jga"] == sum(f(r["pred_state"]) == f(r["gold_state"]) for f, r in zip(in_goal, rows)) / 14
    assert rows[1]["gold_state"] == STATES[1] and rows[1]["gold_summary"] == ds2.state_to_summary(STATES[1])
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in log if "jga" in r] == [3, 6]

    again = run_ds2("evaluate", "--preset", "smoke", "--data_dir", data, "--out_dir", out, "--split", "dev")
    assert again.returncode == 0, again.stderr
    assert json.loads((out / "dev_metrics.json").read_text())["n_turns"] == 14

    # stage 2 of the cross-domain protocol in miniature: warm start from best.pt, half of the dialogues with a
    # train turn, scored on the 6 train slots (the selection is data_multiwoz.select_examples)
    stage2 = run_ds2("--preset", "smoke", "--data_dir", data, "--out_dir", tmp_path / "s2", "--init_from",
                     out / "best.pt", "--only_domain", "train", "--fewshot", 0.5, "--max_iters", 2)
    assert stage2.returncode == 0, stage2.stderr
    assert "data: 2 training turns" in stage2.stdout and "6 slots scored" in stage2.stdout
    assert json.loads((tmp_path / "s2" / "test_metrics.json").read_text())["n_turns"] == 2

    # the same run stopped at step 4 (between evaluations) and resumed: the same log, losses and evaluations alike
    first = run_ds2("--preset", "smoke", "--data_dir", data, "--out_dir", tmp_path / "r", "--stop_step", 4)
    assert first.returncode == 0 and "stopped at --stop_step 4" in first.stdout, first.stderr
    assert not (tmp_path / "r" / "test_metrics.json").exists()
    resumed = run_ds2("--preset", "smoke", "--data_dir", data, "--out_dir", tmp_path / "r", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    resumed_log = [json.loads(line) for line in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    without_time = [[{k: v for k, v in row.items() if k != "dt"} for row in rows] for rows in (resumed_log, log)]
    assert without_time[0] == without_time[1]


def test_config_errors_name_the_key_and_exit_2(capsys):
    for argv, message in [
        (["--batch_sise", "8"], "error: unknown config key --batch_sise (did you mean --batch_size?)"),
        (["--batch_size", "abc"], "error: --batch_size expects an int, got 'abc'"),
        (["--batch_size", "100", "--micro_batch_size", "64"], "error: --batch_size 100 is not divisible by"),
        (["--only_domain", "hospital"], "error: --only_domain must be one of hotel, train, restaurant"),
        (["--preset", "gpu"], "error: unknown preset 'gpu'"),
        (["decode"], "error: unknown command 'decode'"),
    ]:
        assert ds2.main(argv) == 2
        assert capsys.readouterr().err.startswith(message)
    run = run_ds2("--learning_rate", "fast")
    assert run.returncode == 2 and run.stderr == "error: --learning_rate expects a float, got 'fast'\n"


def test_bad_data_gives_one_line_error_naming_the_file(tmp_path, capsys):
    data = tmp_path / "data"
    write_data_dir(data, require_shared("t5/spiece.model"), sizes=(("train", 7), ("dev", 7), ("test", 7)))
    base = ["--preset", "smoke", "--data_dir", str(data), "--out_dir", str(tmp_path / "out")]
    assert ds2.main(base + ["--val_split", "valid"]) == 2
    assert capsys.readouterr().err.startswith(f"error: {data / 'valid.jsonl'} not found")
    cut = (data / "train.src.bin").read_bytes()[:-1]
    (data / "train.src.bin").write_bytes(cut)
    assert ds2.main(base) == 2
    assert capsys.readouterr().err.startswith(f"error: {data / 'train.src.bin'}: {len(cut):,} bytes, not a file of uint16")
    (data / "train.src.bin").write_bytes(cut[:-1])  # even, but shorter than the index says
    assert ds2.main(base) == 2
    assert "holds" in capsys.readouterr().err


def test_a_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    data = tmp_path / "data"
    write_data_dir(data, require_shared("t5/spiece.model"), sizes=(("train", 14), ("dev", 7), ("test", 7)))
    base = ["--preset", "smoke", "--data_dir", str(data), "--out_dir", str(tmp_path / "out")]
    assert ds2.main(base + ["--stop_step", "2"]) == 0
    saved = (tmp_path / "out" / "ckpt.pt").read_bytes()
    forward = ds2.T5.forward

    def diverged(self, src, labels):
        logits, loss = forward(self, src, labels)
        return logits, loss * math.nan
    monkeypatch.setattr(ds2.T5, "forward", diverged)
    assert ds2.main(base + ["--resume"]) == 1
    assert capsys.readouterr().err.startswith("error: loss is nan at step 2")
    assert (tmp_path / "out" / "ckpt.pt").read_bytes() == saved


def test_presets_and_flags_parse():
    command, config = ds2.parse_args(["evaluate", "--preset", "cpu", "--compile", "--seed=3"])
    assert command == "evaluate" and config.compile and config.seed == 3 and config.d_model == 128
    _, default = ds2.parse_args([])
    # the seed's recipe: Adam 5e-4, betas (0.9, 0.999), eps 1e-8, 64 x 8 = 512 per step, 1000 warmup steps
    assert (default.learning_rate, default.beta1, default.beta2, default.eps) == (5e-4, 0.9, 0.999, 1e-8)
    assert (default.micro_batch_size, default.batch_size, default.warmup_iters) == (64, 512, 1000)


def test_no_source_is_cut_silently(tmp_path, capsys):
    # --max_src_len 0 (the default): the longest source of the folder (DS2 allows 1000 tokens); a smaller limit
    # says how many sources it cuts
    data = tmp_path / "data"
    write_data_dir(data, require_shared("t5/spiece.model"))
    meta, _ = ds2.read_meta(data)
    config = ds2.Config(data_dir=str(data))
    assert config.max_src_len == 0
    split = ds2.load_split(config, "dev", meta)
    longest = int(split["idx"][:, 1].max())
    assert config.max_src_len == longest and split["sources_cut"] == 0
    assert f"no source is cut (longest {longest}" in capsys.readouterr().out
    limit = int(np.sort(split["idx"][:, 1])[-4])  # 3 sources are longer than this (or fewer, when tied)
    config = ds2.Config(data_dir=str(data), max_src_len=limit)
    cut = int((split["idx"][:, 1] > limit).sum())
    assert 0 < cut <= 3 and ds2.load_split(config, "dev", meta)["sources_cut"] == cut
    assert f"{cut} sources longer than --max_src_len {limit}" in capsys.readouterr().out


def test_loss_on_pad_is_ds2s_quirk_for_training_batches_only(tmp_path):
    data = tmp_path / "data"
    write_data_dir(data, require_shared("t5/spiece.model"))
    meta, _ = ds2.read_meta(data)
    for loss_on_pad, train_pad in ((False, -100), (True, ds2.PAD_ID)):
        config = ds2.Config(data_dir=str(data), loss_on_pad=loss_on_pad)
        train, dev = ds2.load_split(config, "train", meta, train=True), ds2.load_split(config, "dev", meta)
        rows = np.arange(6)
        lengths = train["idx"][rows, 3]
        assert lengths.min() < lengths.max()  # some rows are padded
        _, labels = ds2.get_batch(train, rows, config, torch.device("cpu"))
        short = int(np.argmin(lengths))
        assert (labels[short, lengths[short]:] == train_pad).all()
        _, labels = ds2.get_batch(dev, rows, config, torch.device("cpu"))
        assert (labels == -100).any()  # validation loss never counts pads


def test_dialogue_filter_is_a_flag_with_ds2s_default():
    assert ds2.Config().dialogue_filter == "min"
    assert ds2.parse_args(["--dialogue_filter", "max"])[1].dialogue_filter == "max"
    with pytest.raises(ValueError, match="--dialogue_filter must be min"):
        ds2.parse_args(["--dialogue_filter", "all"])


def test_sorted_batches_that_stop_when_done_decode_what_the_plain_loop_decodes(tmp_path):
    data = tmp_path / "data"
    write_data_dir(data, require_shared("t5/spiece.model"))
    meta, _ = ds2.read_meta(data)
    config = ds2.Config(data_dir=str(data), eval_batch_size=4, max_new_tokens=12, bench_eval_turns=14,
                        bench_repeats=1, split="test")
    split = ds2.load_split(config, "test", meta)
    model = tiny_t5(vocab_size=meta["vocab_size"], seed=3)
    with torch.no_grad():  # EOS likely: rows end at different steps, so batches stop at different steps
        model.lm_head.weight[ds2.EOS_ID] *= 6
    args = (model, split, split["rows"], config, torch.device("cpu"), ds2.torch.autocast("cpu", enabled=False), 1)
    fast, plain = ds2.decode_rows(*args, fast=True), ds2.decode_rows(*args, fast=False)
    assert fast == plain and len(fast) == 14
    lengths = {len(ids) for ids in fast.values()}
    assert len(lengths) > 1 and min(lengths) < 12  # some rows stop early, not all at the same step
    e = ds2.bench_eval(config, model, torch.device("cpu"), ds2.torch.autocast("cpu", enabled=False))
    assert e["identical"] and e["turns"] == 14 and e["sorted_stop_turns_per_s"] > 0 and e["plain_turns_per_s"] > 0


def test_shuffle_domains_writes_each_epoch_its_own_domain_order(tmp_path):
    data = tmp_path / "data"
    write_data_dir(data, require_shared("t5/spiece.model"))
    meta, sp = ds2.read_meta(data)
    config = ds2.Config(data_dir=str(data), shuffle_domains=True, max_tgt_len=128)
    train = ds2.load_split(config, "train", meta, train=True)
    row = next(i for i, ex in enumerate(train["examples"]) if len({s.split("-")[0] for s in ex["state"]}) > 1)
    texts = set()
    for epoch in range(8):
        train["epoch"] = epoch
        _, labels = ds2.get_batch(train, np.array([row]), config, torch.device("cpu"))
        text = sp.decode([t for t in labels[0].tolist() if t > 1])
        assert ds2.summary_to_state(text) == train["examples"][row]["state"], text
        texts.add(text)
    assert len(texts) == 2  # both orders of its two domains come up
    _, again = ds2.get_batch(train, np.array([row]), config, torch.device("cpu"))  # epoch 7 again: the same draw
    assert again.tolist() == labels.tolist()
    plain = ds2.dataclasses.replace(config, shuffle_domains=False)  # off (the default): the prepared target
    _, labels = ds2.get_batch(train, np.array([row]), plain, torch.device("cpu"))
    assert sp.decode([t for t in labels[0].tolist() if t > 1]) == train["examples"][row]["summary"]
