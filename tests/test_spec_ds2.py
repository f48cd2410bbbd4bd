"""ds2.py: the behaviours a fork most easily breaks without any other test noticing, each checked against what T5
(Raffel et al. 2020; Hugging Face's T5 as the public reference, MODELS.md) or the seed's recipe says, with hand-
computed numbers, and without `transformers` (so they also run where it is not installed).

Run: python -m pytest -q tests/test_spec_ds2.py   (CPU, tiny models; the training tests read T5's spiece.model)
"""
import contextlib
import json

import numpy as np
import pytest
import torch
from torch.nn import functional as F

import ds2
from conftest import require_shared
from test_ds2 import random_batch, tiny_t5, write_data_dir

CPU = torch.device("cpu")
NO_AUTOCAST = contextlib.nullcontext()
NO_SCALER = torch.amp.GradScaler("cpu", enabled=False)


def bucket_ids(model, stack, q_len, k_len, past=0):
    """The bucket of each (query, key) as position_bias sees it: head 0 of the stack's bias table holds the bucket
    number itself, so the bias read back is the bucket."""
    with torch.no_grad():
        stack.rel_bias.weight.zero_()
        stack.rel_bias.weight[:, 0] = torch.arange(stack.rel_bias.weight.size(0), dtype=torch.float32)
        return model.position_bias(stack, q_len, k_len, past)[0, 0].round().long()


# ---- T5 relative positions at the call site: the decoder looks back only, the encoder both ways ------------------

# Decoder (unidirectional, 32 buckets, max distance 128): n = query - key; exact for n < 16, else
# 16 + floor(log(n / 16) / log(128 / 16) x 16) = 16 + floor(16/3 x log2(n / 16)), worked by hand:
#   n = 19: 16/3 x 0.248 = 1.32 -> 17;  n = 24: 16/3 x 0.585 = 3.12 -> 19;  n = 32: 16/3 x 1 = 5.33 -> 21;
#   n = 39: 16/3 x 1.286 = 6.86 -> 22.  A key after the query (masked anyway) is bucket 0.
DECODER_BUCKET = {**{n: n for n in range(16)},
                  16: 16, 17: 16, 18: 16, 19: 17, 20: 17, 21: 18, 22: 18, 23: 18, 24: 19, 25: 19, 26: 19, 27: 20,
                  28: 20, 29: 20, 30: 20, 31: 21, 32: 21, 33: 21, 34: 21, 35: 22, 36: 22, 37: 22, 38: 22, 39: 22}
# Encoder (bidirectional): 16 buckets per direction, +16 when the key is right of the query; n = |query - key|,
# exact for n < 8, else 8 + floor(log(n / 8) / log(128 / 8) x 8) = 8 + floor(2 log2(n / 8)):
#   n = 11: 2 x 0.459 = 0.92 -> 8;  n = 12: 2 x 0.585 = 1.17 -> 9;  n = 16: 2 -> 10;  n = 20: 2 x 1.32 = 2.64 -> 10
ENCODER_BUCKET = {**{n: n for n in range(8)},
                  8: 8, 9: 8, 10: 8, 11: 8, 12: 9, 13: 9, 14: 9, 15: 9, 16: 10, 17: 10, 18: 10, 19: 10, 20: 10}


def test_decoder_position_bias_uses_the_unidirectional_buckets():
    model = tiny_t5()
    table = bucket_ids(model, model.decoder, 40, 40)
    expected = [[DECODER_BUCKET[q - k] if k <= q else 0 for k in range(40)] for q in range(40)]
    assert table.tolist() == expected


def test_decoder_position_bias_with_a_cache_puts_the_new_query_at_its_absolute_position():
    model = tiny_t5()
    row = bucket_ids(model, model.decoder, 1, 40, past=39)  # the 40th token, decoded alone against a cache
    assert row[0].tolist() == [DECODER_BUCKET[39 - k] for k in range(40)]


def test_encoder_position_bias_uses_the_bidirectional_buckets():
    model = tiny_t5()
    row = bucket_ids(model, model.encoder, 41, 41)[20]  # query 20 against keys 0..40
    expected = [ENCODER_BUCKET[20 - k] if k <= 20 else 16 + ENCODER_BUCKET[k - 20] for k in range(41)]
    assert row.tolist() == expected


# ---- the output scale: d_model^-0.5 before a tied head (T5, Hugging Face: "Rescale output before projecting on
# vocab"), none before an untied one (T5 v1.1) -----------------------------------------------------------------

def one_layer_t5_with_known_weights(tied):
    """A one-block T5 whose decoder sublayers add nothing (their output projections are zero), so the decoder output
    is RMSNorm(embedding of the input token). Token v's embedding is [v, 0, 0, 0]."""
    model = ds2.T5(ds2.T5Config(vocab_size=8, d_model=4, d_kv=2, d_ff=8, num_layers=1, num_decoder_layers=1,
                                num_heads=2, dropout=0.0, tie_word_embeddings=tied)).eval()
    with torch.no_grad():
        model.shared.weight.zero_()
        model.shared.weight[:, 0] = torch.arange(8, dtype=torch.float32)
        if not tied:
            model.lm_head.weight.copy_(model.shared.weight)
        block = model.decoder.blocks[0]
        for linear in (block.attn.o, block.cross.o, block.ff.wo):
            linear.weight.zero_()
    return model


@pytest.mark.parametrize("tied, scale", [(True, 4 ** -0.5), (False, 1.0)])
def test_decoder_output_is_scaled_by_d_model_rsqrt_before_a_tied_head_only(tied, scale):
    model = one_layer_t5_with_known_weights(tied)
    src = torch.tensor([[3, 5, ds2.EOS_ID]])
    tgt = torch.tensor([[2]])  # embedding [2, 0, 0, 0]: mean square 1, so RMSNorm gives [2, 0, 0, 0] (eps 1e-6)
    with torch.no_grad():
        logits = model.decode(tgt, model.encode(src), src)[0, 0]
    rms = (1 + 1e-6) ** 0.5
    expected = [2 * scale * v / rms for v in range(8)]  # logit v = <[2 x scale, 0, 0, 0], [v, 0, 0, 0]>
    assert logits.tolist() == pytest.approx(expected, rel=1e-6, abs=1e-7)  # tied: 0, 1, ..., 7; untied: 0, 2, ..., 14


# ---- data at the call site: a source keeps its most recent tokens, a target its first ones ---------------------

def memory_split(sources, targets):
    """A split as load_split returns it, held in memory: token arrays, the (N, 4) index, all rows."""
    src_lens, tgt_lens = [len(s) for s in sources], [len(t) for t in targets]
    idx = np.stack([np.cumsum(src_lens) - src_lens, src_lens, np.cumsum(tgt_lens) - tgt_lens, tgt_lens], axis=1)
    return dict(src=np.concatenate(sources).astype(np.uint16), tgt=np.concatenate(targets).astype(np.uint16),
                idx=idx, rows=np.arange(len(sources)), examples=[{}] * len(sources), task="dst")


def test_get_batch_clips_sources_to_their_most_recent_tokens_and_targets_to_their_first():
    # The history is written oldest turn first (" system: ... user: ..."), so its end holds the newest user turn,
    # where the current state is decided: a source longer than max_src_len (DS2 at 512) loses its oldest tokens
    # and the "Summarize this dialogue:" prefix. A summary longer than max_tgt_len keeps its start. Both end in EOS.
    data = memory_split([np.r_[100:110, ds2.EOS_ID], np.r_[50:52, ds2.EOS_ID]],
                        [np.r_[200:210, ds2.EOS_ID], np.r_[60:62, ds2.EOS_ID]])
    config = ds2.Config(max_src_len=4, max_tgt_len=5)
    src, labels = ds2.get_batch(data, np.array([0, 1]), config, CPU)
    assert src.tolist() == [[107, 108, 109, ds2.EOS_ID], [50, 51, ds2.EOS_ID, ds2.PAD_ID]]
    assert labels.tolist() == [[200, 201, 202, 203, ds2.EOS_ID], [60, 61, ds2.EOS_ID, -100, -100]]
    assert ds2.token_counts(data, np.array([0, 1]), config) == (4 + 3, 5 + 3)  # tokens after clipping, no padding


# ---- losses: means over target tokens, however the rows are batched -------------------------------------------

def rows_of_unequal_lengths(n=5, seed=0):
    g = np.random.default_rng(seed)
    sources = [np.append(g.integers(2, 64, size=k), ds2.EOS_ID) for k in (9, 4, 12, 6, 7)[:n]]
    targets = [np.append(g.integers(2, 64, size=k), ds2.EOS_ID) for k in (2, 11, 5, 8, 3)[:n]]
    return memory_split(sources, targets)


def summed_token_loss(model, data, rows):
    """Sum of the per-token cross entropies of these rows and their number of target tokens, one row at a time."""
    total, count = 0.0, 0
    for row in rows:
        src, labels = ds2.get_batch(data, np.array([row]), ds2.Config(), CPU)
        logits, _ = model(src, labels)
        total += F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum").item()
        count += labels.numel()
    return total, count


def test_validation_loss_is_the_mean_over_target_tokens_not_over_batches():
    model = tiny_t5()
    data = rows_of_unequal_lengths()
    config = ds2.Config(eval_batch_size=2)  # batches of rows (0, 1), (2, 3), (4,): 2 + 11, 5 + 8, 3 targets
    with torch.no_grad():
        total, count = summed_token_loss(model, data, range(5))
    assert count == 3 + 12 + 6 + 9 + 4
    assert ds2.estimate_loss(model, data, config, NO_AUTOCAST, CPU) == pytest.approx(total / count, rel=1e-5)


def test_forward_backward_with_token_share_weights_gives_the_whole_batch_gradient():
    model = tiny_t5().train()
    data = rows_of_unequal_lengths()
    config = ds2.Config()
    src, labels = ds2.get_batch(data, np.arange(5), config, CPU)
    model(src, labels)[1].backward()  # the whole batch: the mean over all its target tokens
    full = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    total = ds2.token_counts(data, np.arange(5), config)[1]
    micro = [(*ds2.get_batch(data, rows, config, CPU), ds2.token_counts(data, rows, config)[1] / total)
             for rows in (np.array([0, 1]), np.array([2, 3]), np.array([4]))]
    loss = ds2.forward_backward(model, micro, NO_AUTOCAST, NO_SCALER)
    assert [round(w * total) for *_, w in micro] == [3 + 12, 6 + 9, 4]
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, full[name], atol=1e-6, rtol=1e-5, msg=name)
    assert float(loss) == pytest.approx(ds2.estimate_loss(model, data, ds2.Config(eval_batch_size=8), NO_AUTOCAST,
                                                          CPU), rel=1e-5)


class RecordingSGD(torch.optim.SGD):
    """SGD that keeps a copy of the gradients it is given: what the update used, after any clipping."""

    def step(self, closure=None):
        self.used = [p.grad.clone() for group in self.param_groups for p in group["params"]]
        return super().step(closure)


def test_optimizer_step_clips_the_global_gradient_norm_to_grad_clip():
    for scale, clipped in ((1e3, True), (1e-3, False)):
        model = tiny_t5().train()
        (model(random_batch([7, 5]), random_batch([4, 6], seed=2, value=-100))[1] * scale).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        norm = torch.cat([g.flatten() for g in grads]).norm().item()
        assert (norm > 1.0) == clipped
        sgd = RecordingSGD(model.parameters(), lr=1e-3)
        ds2.optimizer_step(model, sgd, NO_SCALER, grad_clip=1.0)  # seed / DS2's code: clip at 1.0
        used_norm = torch.cat([g.flatten() for g in sgd.used]).norm().item()
        assert used_norm == pytest.approx(1.0 if clipped else norm, rel=1e-5)
        for used, grad in zip(sgd.used, grads):
            torch.testing.assert_close(used, grad * min(1.0, 1.0 / norm), rtol=1e-5, atol=1e-12)


# ---- training runs: micro-batching does not change a step; a resume continues the random stream -----------------

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ds2spec") / "data"
    write_data_dir(folder, require_shared("t5/spiece.model"), sizes=(("train", 16), ("dev", 4), ("test", 2)))
    return folder


def train_losses(data_dir, out_dir, *args):
    base = ["--preset", "smoke", "--data_dir", str(data_dir), "--out_dir", str(out_dir), "--eval_examples", "4",
            "--max_new_tokens", "4", "--warmup_iters", "1", "--log_interval", "100"]
    assert ds2.main(base + list(args)) == 0
    rows = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def test_step_loss_and_update_do_not_depend_on_how_the_batch_is_cut_into_micro_batches(tmp_path, data_dir):
    # the summaries of the test data differ in length (7 to 40 tokens): an equal weight per micro-batch would give
    # another step loss and another gradient than the mean over the batch's target tokens
    args = ["--max_iters", "2", "--eval_interval", "2", "--batch_size", "8"]
    whole = train_losses(data_dir, tmp_path / "m8", *args, "--micro_batch_size", "8")
    cut = train_losses(data_dir, tmp_path / "m2", *args, "--micro_batch_size", "2")
    assert [s for s, _ in whole] == [1, 2]
    for (step, a), (_, b) in zip(whole, cut):
        assert a == pytest.approx(b, rel=1e-5), step  # step 2 also checks step 1's update


def test_resume_with_dropout_continues_exactly_as_the_uninterrupted_run(tmp_path, data_dir):
    args = ["--dropout", "0.1", "--max_iters", "4", "--eval_interval", "2"]
    whole = train_losses(data_dir, tmp_path / "whole", *args)
    train_losses(data_dir, tmp_path / "split", *args, "--stop_step", "2")
    resumed = train_losses(data_dir, tmp_path / "split", *args, "--resume")
    assert len(whole) == 4 and resumed == whole  # bitwise: the same dropout masks after the resume
    no_dropout = train_losses(data_dir, tmp_path / "plain", *args[2:])
    assert [a for _, a in no_dropout] != [a for _, a in whole]  # dropout does draw here


# ---- the templates' exact text (DS2.md: one sentence per domain, fixed phrases; DS2's converter joins three or more
# "does not care" names as "a, b, and c" and the ", which" phrases with " and ") -------------------------------------

@pytest.mark.parametrize("state, summary", [
    ({"train-departure": "norwich", "train-destination": "cambridge", "train-day": "monday", "train-book people": "3",
      "train-leaveat": "08:00", "train-arriveby": "12:30"},
     "The user is looking for a train from norwich to cambridge on monday for 3 people, which leaves at 08:00 and "
     "arrives by 12:30."),
    ({"restaurant-name": "meze bar", "restaurant-pricerange": "cheap", "restaurant-area": "south",
      "restaurant-book people": "6", "restaurant-book day": "tuesday", "restaurant-book time": "12:00",
      "restaurant-food": "seafood"},
     "The user is looking for a restaurant called meze bar with a cheap price located in the south for 6 people on "
     "tuesday at 12:00, which serves seafood food."),
    ({"attraction-type": "museum", "attraction-name": "nusha", "attraction-area": "centre"},
     "The user is looking for an attraction which is a museum called nusha located in the centre."),
    ({"taxi-departure": "kirkwood house", "taxi-destination": "galleria", "taxi-leaveat": "12:30",
      "taxi-arriveby": "19:15"},
     "The user is looking for a taxi from kirkwood house to galleria, which leaves at 12:30 and arrives by 19:15."),
    ({"hotel-name": "acorn guest house", "hotel-area": "dontcare", "hotel-pricerange": "dontcare",
      "hotel-stars": "dontcare"},
     "The user is looking for a place to stay called acorn guest house, and he does not care about the stars, the "
     "price range, and the location."),
    ({"restaurant-food": "italian", "hotel-area": "north", "taxi-leaveat": "10:00", "train-day": "friday"},
     "The user is looking for a place to stay located in the north. Also, he is searching for a train on friday. "
     "Also, he is searching for a restaurant, which serves italian food. Also, he is searching for a taxi, which "
     "leaves at 10:00."),
], ids=["train", "restaurant", "attraction", "taxi", "three_dontcare", "four_domains"])
def test_summary_text_of_each_domain_is_the_documented_template(state, summary):
    assert ds2.state_to_summary(state) == summary
    assert ds2.summary_to_state(summary) == state


def test_a_reading_must_render_back_to_the_text_it_reads():
    # "at noon" cannot be the booking time when the same sentence says the time does not matter: the only reading
    # that renders back to this text is the area "x at noon" (generate-and-check, ds2.py's point 2)
    text = "The user is looking for a restaurant located in the x at noon, and he does not care about the time."
    assert ds2.summary_to_state(text) == {"restaurant-area": "x at noon", "restaurant-book time": "dontcare"}
