"""
DS2 in one file: dialogue state tracking as dialogue summarization, with a T5 written from scratch in raw PyTorch.

The method (Shin et al., "Dialogue Summaries as Dialogue States", Findings of ACL 2022): the gold state of every
user turn is written as a template summary ("The user is looking for a train to cambridge on monday."), a T5 learns
dialogue history -> summary, and inverse rules read a generated summary back into a state, on which joint goal
accuracy (JGA) is measured. Training follows the seed's recipe: Adam (lr 5e-4), cosine decay after 1000 warmup
steps, 64 x 8 accumulation steps = 512 examples per optimizer step, native AMP, early stopping on dev JGA. The file
reads top to bottom: config -> T5 and its decoding -> templates and inverse rules -> data -> LR schedule ->
checkpoints -> training loop -> evaluation -> main.

Data: the folder data_multiwoz.py writes ({split}.jsonl, {split}.src.bin / .tgt.bin uint16 token ids,
{split}.idx.npy offsets, spm.model, meta.json). Offline there is no MultiWOZ train split; data_multiwoz.py then
carves train out of dev (--train_from_dev).

    python data_multiwoz.py --data_dir ../shared/data/multiwoz/convlab2_mwz21 --spm ../shared/data/t5/spiece.model \
        --out_dir data/mwz21 --train_from_dev 0.9
    python ds2.py --preset cpu --data_dir data/mwz21 --out_dir out/ds2-cpu      # a tiny T5 on CPU
    python ds2.py --data_dir data/mwz21                                        # t5-small, the seed's recipe (GPU)
    python ds2.py --init_from path/to/t5-small --fewshot 0.01                  # public weights, 1% of the dialogues
    python ds2.py --except_domain hotel --out_dir out/no-hotel                 # cross-domain: stage 1, then stage 2
    python ds2.py --init_from out/no-hotel/best.pt --only_domain hotel --fewshot 0.01 --out_dir out/hotel
    python ds2.py evaluate --init_from out/ds2-cpu/best.pt --data_dir data/mwz21 --split test
    python ds2.py roundtrip --data_dir data/mwz21 --split test                 # the templates' own ceiling
    python ds2.py bench --preset cpu      # step time, SDPA + fused AdamW vs plain, KV-cache decoding, beams

Warm start (stage 1 on dialogue summaries; data_multiwoz.py --summarization writes a folder whose meta.json says
"task": "summarization": no states, so evaluation is the loss alone), then stage 2 from its best.pt:
    python ds2.py --preset cpu --data_dir data/dialogsum --out_dir out/stage1
    python ds2.py --preset cpu --data_dir data/mwz21 --init_from out/stage1/best.pt --out_dir out/stage2
The paper's protocols, one command each (runs of `train` in out_dir/<run>, then results.jsonl and table.md):
    python ds2.py fewshot --ratios 0.01,0.05,0.1,1.0 --seeds 1,2,3 --data_dir data/mwz21 --out_dir out/fewshot
    python ds2.py crossdomain --ratios 0.01,0.05,0.1 --seeds 1,2,3 --data_dir data/mwz21 --out_dir out/crossdomain

Every Config field is a flag (--key=value or --key value; a bare --flag means true); --preset NAME is applied
first. A run writes to out_dir: ckpt.pt (latest state; continue with --resume), best.pt (best dev JGA), log.jsonl,
and at the end test_predictions.jsonl and test_metrics.json.
"""
import bisect
import collections
import dataclasses
import datetime
import difflib
import errno
import functools
import hashlib
import inspect
import json
import math
import os
import pickle
import re
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import sentencepiece
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP


# ----------------------------------------------------------------------------------------------------------------
# Configuration

@dataclass
class Config:
    # data: a folder written by data_multiwoz.py
    data_dir: str = "data/mwz21"
    train_split: str = "train"
    val_split: str = "dev"          # early stopping and the best checkpoint use this split's JGA
    test_split: str = "test"        # evaluated once at the end, with the best checkpoint
    split: str = "test"             # the split of the `evaluate` and `roundtrip` commands
    max_src_len: int = 0            # 0 = the data's longest source, at most 1000 (DS2: data_loader.py:154); longer
                                    # histories keep their most recent part, and load_split counts the cut ones
    max_tgt_len: int = 128          # the longest summary of MultiWOZ 2.1 test: 127 T5 tokens with eos (measured)
    fewshot: float = 1.0            # share of the training dialogues (DS2: 0.01, 0.05, 0.1, 1.0)
    fewshot_seed: int = 0
    except_domain: str = ""         # cross-domain stage 1: train and validate without this domain's dialogues
    only_domain: str = ""           # cross-domain stage 2: this domain's dialogues, evaluated on its slots only
    dialogue_filter: str = "min"    # except_domain drops the dialogues whose only goal domain it is ("min", DS2's
                                    # code default, config.py:29) or every dialogue with it ("max")
    # model: t5-small (MODELS.md); a checkpoint's own (--resume, --init_from x.pt or a Hugging Face folder) wins
    d_model: int = 512
    d_ff: int = 2048
    d_kv: int = 64                  # width of one head; heads x d_kv need not equal d_model
    num_layers: int = 6             # encoder blocks
    num_decoder_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    feed_forward_proj: str = "relu"   # original T5; "gated-gelu" for T5 v1.1
    tie_word_embeddings: bool = True  # original T5; false for v1.1 (untied head, no output scaling)
    dropout: float = 0.1            # t5-small's public config: dropout_rate 0.1
    init_from: str = "scratch"      # 'scratch', a ds2.py checkpoint (warm start), or a Hugging Face T5 folder
    # optimizer: seed: Adam, lr 5e-4, betas (0.9, 0.999), eps 1e-8, no weight decay
    learning_rate: float = 5e-4
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0       # AdamW with decay 0 is exactly Adam
    grad_clip: float = 1.0          # the seed names none; its Hugging Face Trainer and DS2's code clip at 1.0
    # LR schedule: seed: cosine decay, 1000 warmup steps
    decay_lr: bool = True           # false: constant after warmup (DS2's code: constant 5e-5, no warmup)
    warmup_iters: int = 1000
    min_lr: float = 0.0             # the cosine ends at 0, as Hugging Face's cosine schedule
    # batch and length of the run
    batch_size: int = 512           # seed: 64 x 8 accumulation steps = 512 examples per optimizer step
    micro_batch_size: int = 64      # seed: batch 64 per forward/backward
    epochs: int = 1                 # seed: 1 epoch in its reported run (DS2's code: up to 100, early stopping)
    max_iters: int = 0              # optimizer steps; 0 = epochs x steps per epoch (schedule "data": at least min_iters)
    # schedule "data" (plan_schedule): a few-shot run of a few steps per epoch gets min_iters steps, warmup_share of
    # them as warmup (at most warmup_iters) and evals_per_run evaluations; "fixed": the values above as given
    schedule: str = "data"
    min_iters: int = 100            # 1% of MultiWOZ (~84 dialogues, ~600 turns) = 2 steps/epoch -> 50 epochs
    warmup_share: float = 0.1       # warmup = min(warmup_iters, 10% of the run): the peak LR is always reached
    evals_per_run: int = 5          # evaluations spread over the run when eval_interval is 0
    # evaluation and early stopping
    eval_interval: int = 0          # evaluate every this many steps; 0 = after every epoch (and always at the end)
    eval_examples: int = 0          # dev turns per evaluation (the first ones); 0 = all
    test_examples: int = 0          # test turns scored at the end (the first ones); 0 = all, the only real test
    eval_batch_size: int = 64       # sequences decoded at once
    patience: int = 10              # stop after this many evaluations without a new best (DS2's code: 10); 0 = off
    num_beams: int = 1              # validation decoding; DS2: greedy (--num_beams 1, config.py:15)
    test_num_beams: int = 0         # the final test decoding; 0 = num_beams (DS2: --test_num_beams 10, config.py:16)
    min_new_tokens: int = 0         # no EOS before this many new tokens (DS2: min_length 5 with the start token = 4)
    early_stopping: bool = False    # beam search stops once num_beams hypotheses are done (DS2: True, DS2.py:68-74)
    length_penalty: float = 1.0     # beam search only, as Hugging Face defines it
    max_new_tokens: int = 128       # DS2: max_length 100 with the start token = 99; 1.0% of our test summaries need
                                    # more (up to 127 with eos, measured)
    shuffle_domains: bool = False   # training targets with their domains in a new random order every epoch, as DS2
                                    # does (state_sum_converter.py:541-542); read back by the phrase reader
    loss_on_pad: bool = False       # DS2's quirk (DS2.py:47-51): training targets padded with pad tokens the loss
                                    # counts; only --preset paper turns it on
    # system
    out_dir: str = "out-ds2"
    resume: bool = False            # continue from out_dir/ckpt.pt
    stop_step: int = 0              # stop after this step with a checkpoint, continue later with --resume; 0 = off
    log_interval: int = 10
    device: str = "auto"            # 'auto' = cuda if available, else cpu; 'cuda' = cuda:0 (under torchrun
                                    # process r uses cuda:LOCAL_RANK); 'cuda:N' = GPU N of a plain run
    dtype: str = "auto"             # 'auto' = bfloat16 on CUDA where supported, else float16; float32 on CPU
    compile: bool = False           # torch.compile the training model (GPU)
    seed: int = 1337
    # protocols (the `fewshot` and `crossdomain` commands): runs of `train`, one folder each in out_dir
    ratios: str = "0.01,0.05,0.1,1.0"  # DS2: 1%, 5%, 10% of the training dialogues (and all of them)
    seeds: str = "1,2,3"               # each ratio with each seed: the few-shot sample and the training seed
    domains: str = "hotel,train,restaurant,attraction,taxi"  # crossdomain: each held out in turn
    report_only: bool = False          # rebuild results.jsonl and table.md from the finished runs; train nothing
    # bench command (random weights and tokens, no data needed): training step, decoding, beam search
    bench_steps: int = 2            # timed steps per variant in each round
    bench_repeats: int = 3          # rounds, variants interleaved in each; figures are medians
    bench_plain: bool = True        # also time plain attention + for-loop AdamW, to show what SDPA and fusing buy
    bench_profile: bool = False     # also print torch.profiler's top operators of one step per variant
    bench_src_len: int = 206        # MultiWOZ 2.1 test means, T5 tokens: 206 source (1,520,336 / 7,368 turns) ...
    bench_tgt_len: int = 44         # ... and 44 target (324,126 / 7,368)
    bench_eval_turns: int = 256     # evaluation decoding: turns of --data_dir's --split (random sources without it)


PRESETS = {
    # A tiny T5 (5M parameters, 4M of them the 32000-piece embedding) for CPU runs: ~4 s a step on one core.
    "cpu": dict(d_model=128, d_ff=512, d_kv=32, num_layers=2, num_decoder_layers=2, num_heads=4, dropout=0.0,
                batch_size=32, micro_batch_size=16, learning_rate=2e-3, warmup_iters=15, max_iters=150,
                eval_interval=50, eval_examples=200, log_interval=10, patience=0),
    # Seconds, for tests and for checking that a data folder works end to end.
    "smoke": dict(d_model=32, d_ff=64, d_kv=8, num_layers=1, num_decoder_layers=1, num_heads=2, dropout=0.0,
                  batch_size=8, micro_batch_size=4, learning_rate=3e-3, warmup_iters=2, max_iters=6,
                  eval_interval=3, eval_examples=16, eval_batch_size=16, max_new_tokens=24, log_interval=1),
    # The full model: the Config's defaults, named.
    "t5-small": dict(d_model=512, d_ff=2048, d_kv=64, num_layers=6, num_decoder_layers=6, num_heads=8),
    # DS2's own training settings (its code), a preset only, to compare with the seed's recipe: AdamW lr 5e-5
    # constant, no warmup, clip 1.0, batch 2, up to 100 epochs, fp32, patience 10; decoding as its generate() call
    # (DS2.py:68-74): min_length 5 and max_length 100 counting the start token, early_stopping, validation greedy,
    # test with 10 beams (config.py:15-16); and the loss counts pad tokens as its code does (DS2.py:47-51).
    # Its optimizer is transformers.AdamW with that class's defaults, weight_decay 0.0 and eps 1e-6: with no decay
    # AdamW is Adam, so only eps differs from the seed's (torch's AdamW with weight_decay 0 is Adam as well).
    "paper": dict(schedule="fixed", learning_rate=5e-5, weight_decay=0.0, eps=1e-6, decay_lr=False, warmup_iters=0,
                  grad_clip=1.0,
                  batch_size=2, micro_batch_size=2, epochs=100, eval_interval=0, patience=10, dtype="float32",
                  num_beams=1, test_num_beams=10, min_new_tokens=4, max_new_tokens=99, early_stopping=True,
                  loss_on_pad=True),
}
COMMANDS = ("train", "evaluate", "roundtrip", "fewshot", "crossdomain", "bench")
BOOL_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def parse_value(key, text, kind):
    if kind is bool:
        if text.lower() not in BOOL_WORDS:
            raise ValueError(f"--{key} expects a bool (true/false/1/0/yes/no), got {text!r}")
        return BOOL_WORDS[text.lower()]
    try:
        return kind(text)
    except ValueError:
        article = "an" if kind is int else "a"
        raise ValueError(f"--{key} expects {article} {kind.__name__}, got {text!r}") from None


def parse_args(argv):
    """[command] then --key=value / --key value / --flag; --preset NAME is applied first. Returns (command, Config)."""
    argv = list(argv)
    command = argv.pop(0) if argv and not argv[0].startswith("--") else "train"
    if command not in COMMANDS:
        raise ValueError(f"unknown command {command!r} (commands: {', '.join(COMMANDS)})")
    types = {f.name: f.type for f in dataclasses.fields(Config)}
    types["preset"] = str
    pairs, i = [], 0
    while i < len(argv):
        if not argv[i].startswith("--"):
            raise ValueError(f"unexpected argument {argv[i]!r}: options look like --key=value or --key value")
        key, has_value, value = argv[i][2:].partition("=")
        if key not in types:
            close = difflib.get_close_matches(key, types, n=1)
            raise ValueError(f"unknown config key --{key}" + (f" (did you mean --{close[0]}?)" if close else ""))
        following = argv[i + 1] if i + 1 < len(argv) else None
        if not has_value and following is not None and not following.startswith("--") \
                and (types[key] is not bool or following.lower() in BOOL_WORDS):
            value, i = following, i + 1
        elif not has_value and types[key] is bool:
            value = "true"                          # a bare --flag means true
        elif not has_value:
            raise ValueError(f"--{key} needs a value (--{key}=VALUE or --{key} VALUE)")
        pairs.append((key, value))
        i += 1
    config = Config()
    for key, value in pairs:
        if key == "preset":
            if value not in PRESETS:
                raise ValueError(f"unknown preset {value!r} (presets: {', '.join(PRESETS)})")
            config = dataclasses.replace(config, **PRESETS[value])
    for key, value in pairs:
        if key != "preset":
            setattr(config, key, parse_value(key, value, types[key]))
    validate(config)
    return command, config


def validate(config, world_size=1):
    """Cross-field checks that name the key and what to do. Returns the gradient accumulation steps."""
    c = config
    for key in ("d_model", "d_ff", "d_kv", "num_layers", "num_decoder_layers", "num_heads", "batch_size",
                "micro_batch_size", "epochs", "eval_batch_size", "num_beams", "max_new_tokens", "log_interval",
                "relative_attention_num_buckets", "relative_attention_max_distance", "bench_steps", "bench_repeats",
                "bench_src_len", "bench_tgt_len", "bench_eval_turns"):
        if getattr(c, key) <= 0:
            raise ValueError(f"--{key} must be positive, got {getattr(c, key)}")
    for key in ("max_iters", "warmup_iters", "eval_interval", "eval_examples", "patience", "weight_decay",
                "grad_clip", "min_lr", "stop_step", "test_examples"):
        if not getattr(c, key) >= 0:
            raise ValueError(f"--{key} must be >= 0, got {getattr(c, key)}")
    if c.relative_attention_num_buckets % 4:
        raise ValueError(f"--relative_attention_num_buckets must be a multiple of 4 (T5: 32), got "
                         f"{c.relative_attention_num_buckets}")
    if c.batch_size % c.micro_batch_size:
        raise ValueError(f"--batch_size {c.batch_size} is not divisible by --micro_batch_size {c.micro_batch_size}: "
                         f"batch_size must equal micro_batch_size x gradient accumulation steps (seed: 64 x 8 = 512)")
    if c.max_src_len == 1 or c.max_src_len < 0 or c.max_tgt_len < 2:
        raise ValueError(f"--max_src_len (0 = the data's longest source) and --max_tgt_len must be >= 2 (a token and "
                         f"eos), got {c.max_src_len} and {c.max_tgt_len}")
    if c.schedule not in ("data", "fixed") or not 0 < c.warmup_share <= 1 or c.min_iters < 0 or c.evals_per_run < 1:
        raise ValueError(f"need --schedule data or fixed, 0 < --warmup_share <= 1, --min_iters >= 0 and "
                         f"--evals_per_run >= 1, got {c.schedule!r}, {c.warmup_share}, {c.min_iters}, {c.evals_per_run}")
    if c.dialogue_filter not in ("min", "max"):
        raise ValueError(f"--dialogue_filter must be min (DS2's code default) or max, got {c.dialogue_filter!r}")
    if c.test_num_beams < 0 or c.min_new_tokens < 0 or c.min_new_tokens >= c.max_new_tokens:
        raise ValueError(f"need --test_num_beams >= 0 and 0 <= --min_new_tokens < --max_new_tokens, got "
                         f"{c.test_num_beams}, {c.min_new_tokens} and {c.max_new_tokens}")
    if not 0 < c.fewshot <= 1:
        raise ValueError(f"--fewshot is a share of the training dialogues in (0, 1] (DS2: 0.01, 0.05, 0.1), "
                         f"got {c.fewshot}")
    for key in ("except_domain", "only_domain"):
        if getattr(c, key) not in ("", *DOMAINS):
            raise ValueError(f"--{key} must be one of {', '.join(DOMAINS)} (or empty), got {getattr(c, key)!r}")
    if c.except_domain and c.only_domain:
        raise ValueError("give --except_domain (cross-domain stage 1) or --only_domain (stage 2), not both")
    if c.feed_forward_proj not in ("relu", "gated-gelu"):
        raise ValueError(f"--feed_forward_proj must be relu (T5) or gated-gelu (T5 v1.1), got {c.feed_forward_proj!r}")
    if not 0 < c.learning_rate < 1 or c.min_lr > c.learning_rate:
        raise ValueError(f"need 0 < --learning_rate < 1 and --min_lr <= learning_rate, got {c.learning_rate} "
                         f"and {c.min_lr}")
    if not (0 <= c.dropout < 1 and 0 <= c.beta1 < 1 and 0 <= c.beta2 < 1 and c.eps > 0):
        raise ValueError(f"--dropout, --beta1, --beta2 must be in [0, 1) and --eps > 0, got {c.dropout}, "
                         f"{c.beta1}, {c.beta2}, {c.eps}")
    if c.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype must be auto, float32, bfloat16 or float16, got {c.dtype!r}")
    for key in ("data_dir", "out_dir"):
        if not getattr(c, key).strip():
            raise ValueError(f"--{key} is empty: give a folder (an empty path would mean the current folder)")
    if not (c.device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", c.device)):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {c.device!r}")
    protocol_lists(c)
    if c.batch_size % (c.micro_batch_size * world_size):
        raise ValueError(f"--batch_size {c.batch_size} is not divisible by --micro_batch_size {c.micro_batch_size} x "
                         f"{world_size} process(es): batch_size must equal micro_batch_size x gradient accumulation "
                         f"steps x world_size; change --micro_batch_size or --batch_size")
    return c.batch_size // (c.micro_batch_size * world_size)


# ----------------------------------------------------------------------------------------------------------------
# Model: T5 from scratch (MODELS.md). Pre-norm encoder-decoder, RMS norm, no biases, relative position buckets.

PAD_ID, EOS_ID = 0, 1                    # T5's SentencePiece ids; pad 0 is also the decoder's start token
NEG_INF = torch.finfo(torch.float32).min  # additive mask value: a row with every key masked stays finite (no NaN)
T5_SPM_SHA256 = "d60acb128cf7b7f2536e8f38a5b18a05535c9e14c7a355904270e15b0945ea86"  # spiece.model of t5-small/base


@dataclass
class T5Config:
    vocab_size: int = 32128         # 32000 SentencePiece pieces + 100 sentinels, padded to a multiple of 128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout: float = 0.1
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"
    tie_word_embeddings: bool = True


MODEL_KEYS = [f.name for f in dataclasses.fields(T5Config) if f.name not in ("vocab_size", "layer_norm_epsilon")]


class RMSNorm(nn.Module):
    """w * x / sqrt(mean(x^2) + eps): no mean subtraction, no bias, computed in float32 (also under autocast)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)


def relative_position_bucket(relative, bidirectional, num_buckets=32, max_distance=128):
    """T5's bucket of each relative position (key position - query position). The encoder gives each direction
    half of the buckets (+16 when the key is to the right); the causal decoder only looks back. Within a direction
    the first half of the buckets are exact distances (0..7 encoder, 0..15 decoder), the rest grow logarithmically
    up to max_distance (128), and everything farther shares the last bucket."""
    bucket = torch.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (relative > 0).long() * num_buckets
        n = relative.abs()
    else:
        n = (-relative).clamp(min=0)
    max_exact = num_buckets // 2
    # n is clamped to max_exact inside the log only so that log(0) never happens; torch.where keeps small n exact
    log_ratio = torch.log(n.clamp(min=max_exact).float() / max_exact) / math.log(max_distance / max_exact)
    large = (max_exact + (log_ratio * (num_buckets - max_exact)).long()).clamp(max=num_buckets - 1)
    return bucket + torch.where(n < max_exact, n, large)


def compute_dtype(device_type):
    """The dtype matmuls produce here: the autocast dtype inside torch.autocast, else float32. Masks are built in
    it once per stack, so scaled_dot_product_attention takes them without a cast in every block."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else torch.float32


def plain_attention(q, k, v, mask, scale, dropout_p=0.0):
    """softmax(q k^T x scale + mask) v, written out: what scaled_dot_product_attention fuses into one kernel. Kept
    as the benchmark's "plain" variant and as its reference."""
    att = (q @ k.transpose(-2, -1)) * scale + mask
    att = F.dropout(F.softmax(att.float(), dim=-1).to(q.dtype), p=dropout_p)
    return att @ v


class Attention(nn.Module):
    """Multi-head attention without biases and without the 1/sqrt(d_kv) scaling (T5 folds it into the init).
    `mask` is additive, (B or 1, H or 1, T, S), with the relative position bias already folded in."""
    use_sdpa = True  # False: plain_attention instead (bench's "plain" variant); the results are the same

    def __init__(self, config):
        super().__init__()
        inner = config.num_heads * config.d_kv
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)
        self.num_heads, self.d_kv, self.dropout = config.num_heads, config.d_kv, config.dropout

    def split_heads(self, x):  # (B, T, H * d_kv) -> (B, H, T, d_kv)
        return x.view(x.size(0), x.size(1), self.num_heads, self.d_kv).transpose(1, 2)

    def forward(self, x, mask, source=None, cache=None):
        """x (B, T, d_model) attends to itself (source None) or to the encoder output source (B, S, d_model).
        cache (a dict, incremental decoding): self-attention appends the new positions' keys/values to it;
        cross-attention computes the encoder's keys/values on the first step and reuses them after."""
        q = self.split_heads(self.q(x))
        if source is None:
            k, v = self.split_heads(self.k(x)), self.split_heads(self.v(x))
            if cache is not None:
                if "k" in cache:
                    k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
                cache["k"], cache["v"] = k, v
        elif cache is not None and "k" in cache:
            k, v = cache["k"], cache["v"]
        else:
            k, v = self.split_heads(self.k(source)), self.split_heads(self.v(source))
            if cache is not None:
                cache["k"], cache["v"] = k, v
        dropout_p = self.dropout if self.training else 0.0
        if self.use_sdpa:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0, dropout_p=dropout_p)
        else:
            y = plain_attention(q, k, v, mask, 1.0, dropout_p)
        return self.o(y.transpose(1, 2).reshape(x.size(0), x.size(1), -1))


class FeedForward(nn.Module):
    """T5: wo(relu(wi x)). T5 v1.1: wo(gelu_tanh(wi_0 x) * wi_1 x). No biases."""

    def __init__(self, config):
        super().__init__()
        self.gated = config.feed_forward_proj == "gated-gelu"
        if self.gated:
            self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
            self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        else:
            self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x) if self.gated else F.relu(self.wi(x))
        return self.wo(self.dropout(h))


class Block(nn.Module):
    """x = x + sublayer(norm(x)) for self-attention, cross-attention (decoder only), feed-forward."""

    def __init__(self, config, is_decoder):
        super().__init__()
        self.ln_attn = RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.attn = Attention(config)
        if is_decoder:
            self.ln_cross = RMSNorm(config.d_model, config.layer_norm_epsilon)
            self.cross = Attention(config)
        self.ln_ff = RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.ff = FeedForward(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, mask, enc_out=None, cross_mask=None, cache=None):
        x = x + fp16_finite(self.dropout(self.attn(self.ln_attn(x), mask,
                                                   cache=None if cache is None else cache["self"])))
        if enc_out is not None:
            x = x + fp16_finite(self.dropout(self.cross(self.ln_cross(x), cross_mask, source=enc_out,
                                                        cache=None if cache is None else cache["cross"])))
        return fp16_finite(x + fp16_finite(self.dropout(self.ff(self.ln_ff(x)))))


def fp16_finite(x):
    """T5's activations outgrow float16 (max 65,504): its feed-forward outputs of pre-trained checkpoints reach
    inf, and one inf turns the next RMSNorm into NaN. Like the reference implementations (Hugging Face's T5 clamps
    its fp16 hidden states), clamp float16 values to just inside the range; bf16 and fp32 pass unchanged."""
    if x.dtype != torch.float16:
        return x
    limit = torch.finfo(torch.float16).max - 1000
    return x.clamp(-limit, limit)


# Our parameter names -> Hugging Face's (MODELS.md): block i's sublayers and norms sit in `layer.{j}`.
HF_SUBLAYERS = {
    "encoder": {"attn": "layer.0.SelfAttention", "ln_attn": "layer.0.layer_norm",
                "ff": "layer.1.DenseReluDense", "ln_ff": "layer.1.layer_norm"},
    "decoder": {"attn": "layer.0.SelfAttention", "ln_attn": "layer.0.layer_norm",
                "cross": "layer.1.EncDecAttention", "ln_cross": "layer.1.layer_norm",
                "ff": "layer.2.DenseReluDense", "ln_ff": "layer.2.layer_norm"},
}


def hf_name(name):
    """'decoder.blocks.3.cross.q.weight' -> 'decoder.block.3.layer.1.EncDecAttention.q.weight'."""
    stack, _, rest = name.partition(".")
    if rest.startswith("rel_bias"):  # Hugging Face keeps each stack's one bias table in its block 0
        return f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    if rest.startswith("ln_f"):
        return f"{stack}.final_layer_norm.weight"
    if stack not in HF_SUBLAYERS:  # shared.weight, lm_head.weight
        return name
    _, i, part, leaf = rest.split(".", 3)
    return f"{stack}.block.{i}.{HF_SUBLAYERS[stack][part]}.{leaf}"


class T5(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)  # encoder input, decoder input (and head)
        self.encoder = self.make_stack(config, config.num_layers, is_decoder=False)
        self.decoder = self.make_stack(config, config.num_decoder_layers, is_decoder=True)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.shared.weight
        self.dropout = nn.Dropout(config.dropout)
        for name, p in self.named_parameters():  # a tied head is listed once, as shared.weight
            std = self.init_std(name)
            if std is not None:
                nn.init.normal_(p, mean=0.0, std=std)

    @staticmethod
    def make_stack(config, num_blocks, is_decoder):
        return nn.ModuleDict(dict(
            # one table of per-head biases for the whole stack, computed once and added in every block
            rel_bias=nn.Embedding(config.relative_attention_num_buckets, config.num_heads),
            blocks=nn.ModuleList([Block(config, is_decoder) for _ in range(num_blocks)]),
            ln_f=RMSNorm(config.d_model, config.layer_norm_epsilon),
        ))

    def init_std(self, name):
        """Mesh TensorFlow's initialization (as Hugging Face's T5): std 1 for the embedding, fan-in scaled matrices;
        q is also scaled by d_kv^-0.5, which stands in for the attention's missing 1/sqrt(d_kv). Norms stay 1."""
        c = self.config
        return {"shared": 1.0, "lm_head": 1.0, "rel_bias": c.d_model ** -0.5, "q": (c.d_model * c.d_kv) ** -0.5,
                "k": c.d_model ** -0.5, "v": c.d_model ** -0.5, "o": (c.num_heads * c.d_kv) ** -0.5,
                "wi": c.d_model ** -0.5, "wi_0": c.d_model ** -0.5, "wi_1": c.d_model ** -0.5,
                "wo": c.d_ff ** -0.5}.get(name.split(".")[-2])

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def position_bias(self, stack, q_len, k_len, past=0):
        """(1, H, q_len, k_len): the learned bias of each relative-position bucket, for queries at absolute positions
        past .. past + q_len - 1 (with a KV cache the newest query sits at position `past`, not at 0)."""
        device = stack.rel_bias.weight.device
        query_pos, key_pos = torch.arange(past, past + q_len, device=device), torch.arange(k_len, device=device)
        relative = key_pos[None, :] - query_pos[:, None]
        bucket = relative_position_bucket(relative, bidirectional=stack is self.encoder,
                                          num_buckets=self.config.relative_attention_num_buckets,
                                          max_distance=self.config.relative_attention_max_distance)
        return stack.rel_bias(bucket).permute(2, 0, 1).unsqueeze(0)

    def encode(self, src):
        """Encoder output (B, S, d_model) for source ids (B, S), right-padded with PAD_ID."""
        S = src.size(1)
        padding = (src == PAD_ID)[:, None, None, :]  # padding masks keys only
        mask = torch.where(padding, NEG_INF, self.position_bias(self.encoder, S, S)).to(compute_dtype(src.device.type))
        x = self.dropout(self.shared(src))
        for block in self.encoder.blocks:
            x = block(x, mask)
        return self.dropout(self.encoder.ln_f(x))

    def decode(self, tgt, enc_out, src, cache=None):
        """Logits (B, T, vocab) for decoder inputs tgt (B, T). With a cache (new_cache) tgt holds only the new
        positions; the keys/values of the earlier ones come from the cache."""
        T, dtype = tgt.size(1), compute_dtype(tgt.device.type)
        past = cache[0]["self"]["k"].size(2) if cache is not None and "k" in cache[0]["self"] else 0
        future = torch.ones(T, past + T, dtype=torch.bool, device=tgt.device).triu(past + 1)  # causal
        mask = torch.where(future, NEG_INF, self.position_bias(self.decoder, T, past + T, past)).to(dtype)
        cross_mask = torch.where((src == PAD_ID)[:, None, None, :], NEG_INF, 0.0).to(dtype)  # no bias in cross-attn
        x = self.dropout(self.shared(tgt))
        for i, block in enumerate(self.decoder.blocks):
            x = block(x, mask, enc_out, cross_mask, None if cache is None else cache[i])
        x = self.dropout(self.decoder.ln_f(x))
        if self.config.tie_word_embeddings:  # T5 rescales before the tied head; v1.1 (untied) does not
            x = x * self.config.d_model ** -0.5
        return self.lm_head(x)

    def forward(self, src, labels):
        """Teacher forcing: the decoder reads the labels shifted right behind the start token (0) and predicts each
        label. Loss: mean cross entropy over the labels that are not -100 (padding)."""
        tgt = torch.cat([torch.full_like(labels[:, :1], PAD_ID), labels[:, :-1]], dim=1)
        tgt = tgt.masked_fill(tgt == -100, PAD_ID)  # positions after the target's end read pad (their loss is ignored)
        logits = self.decode(tgt, self.encode(src), src)
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100)

    # ------------------------------------------------------------------------------------------------------------
    # Decoding: greedy and beam search with a KV cache

    def new_cache(self):
        """Per decoder block: the self-attention keys/values so far, and the cross-attention ones (computed once)."""
        return [{"self": {}, "cross": {}} for _ in self.decoder.blocks]

    @staticmethod
    def reorder_cache(cache, rows, cross=True):
        """Take these batch rows of every cached tensor: surviving beams inherit their parent's self-attention
        keys/values. Cross-attention keys/values only change when the beams are first made (cross=True)."""
        for layer in cache:
            for part in ("self", "cross") if cross else ("self",):
                for name in layer[part]:
                    layer[part][name] = layer[part][name].index_select(0, rows)

    def next_logits(self, seqs, enc_out, src, cache):
        """float32 logits (B, vocab) of the token after seqs (B, t). With a cache only the newest token runs through
        the decoder; without one the whole prefix is recomputed (kept for tests and the benchmark)."""
        return self.decode(seqs if cache is None else seqs[:, -1:], enc_out, src, cache)[:, -1].float()

    @torch.no_grad()
    def generate(self, src, max_new_tokens=100, num_beams=1, length_penalty=1.0, use_cache=True, min_new_tokens=0,
                 early_stopping=False, stop_when_done=True):
        """Generated ids (B, <= max_new_tokens) for right-padded sources src (B, S); after a row's EOS come PADs.
        No EOS among the first min_new_tokens (Hugging Face's min_length, which counts the start token too). The
        batch stops as soon as every row has written EOS (stop_when_done false: it runs to max_new_tokens, the
        plain loop the benchmark compares with; the rows are the same up to their EOS)."""
        if num_beams > 1:
            return self.beam_search(src, max_new_tokens, num_beams, length_penalty, use_cache, min_new_tokens,
                                    early_stopping)
        enc_out = self.encode(src)
        cache = self.new_cache() if use_cache else None
        seqs = torch.full((src.size(0), 1), PAD_ID, dtype=torch.long, device=src.device)
        done = torch.zeros(src.size(0), dtype=torch.bool, device=src.device)
        for t in range(max_new_tokens):
            logits = self.next_logits(seqs, enc_out, src, cache)
            if t < min_new_tokens:
                logits[:, EOS_ID] = float("-inf")
            token = logits.argmax(-1).masked_fill(done, PAD_ID)
            seqs = torch.cat([seqs, token[:, None]], dim=1)
            done |= token == EOS_ID
            if stop_when_done and done.all():
                break
        return seqs[:, 1:]

    @torch.no_grad()
    def beam_search(self, src, max_new_tokens, num_beams, length_penalty, use_cache=True, min_new_tokens=0,
                    early_stopping=False):
        """Beam search as Hugging Face's generate() does it (early_stopping False by default). Each step the 2K best
        continuations of the K beams are ranked; those of the best K that end in EOS (or reach max_new_tokens)
        become finished hypotheses scored sum(log p) / length ** length_penalty (length counts EOS, not the start
        token), the K best of the rest keep running. An example is done once it holds K finished hypotheses and its
        best running beam, divided by its current length, cannot beat the worst of them (early_stopping: once it
        holds K, as DS2 decodes). EOS scores -inf among the first min_new_tokens."""
        B, K, device = src.size(0), num_beams, src.device
        enc_out = self.encode(src)  # once per example: the beams share it
        cache = self.new_cache() if use_cache else None
        seqs = torch.full((B, 1), PAD_ID, dtype=torch.long, device=device)
        no_eos = lambda logprobs, t: logprobs.index_fill_(1, torch.tensor([EOS_ID], device=device), float("-inf")) \
            if t < min_new_tokens else logprobs  # after the log-softmax, as Hugging Face's MinLengthLogitsProcessor
        logits = self.next_logits(seqs, enc_out, src, cache)  # step 0 on B rows: all K beams are still the same
        rows = torch.arange(B, device=device).repeat_interleave(K)  # then each example's row is copied K times
        enc_out, src, seqs, logprobs = enc_out[rows], src[rows], seqs[rows], no_eos(F.log_softmax(logits, -1), 0)[rows]
        if cache is not None:
            self.reorder_cache(cache, rows)  # including the cross-attention keys/values: copied, never recomputed
        scores = torch.full((B, K), -1e9, device=device)
        scores[:, 0] = 0.0  # only beam 0 is live at first, so the K beams do not start as K copies
        finished = torch.full((B, K, max_new_tokens + 1), PAD_ID, dtype=torch.long, device=device)
        finished_scores = torch.full((B, K), -1e9, device=device)
        is_finished = torch.zeros(B, K, dtype=torch.bool, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        in_top_k = torch.arange(2 * K, device=device) < K
        for t in range(max_new_tokens):
            V = logprobs.size(-1)
            cand_scores, cand = (logprobs.view(B, K, V) + scores[..., None]).view(B, K * V).topk(2 * K)
            parent = torch.arange(B, device=device)[:, None] * K + cand // V  # (B, 2K) rows of seqs
            cand_seqs = torch.cat([seqs[parent.view(-1)], (cand % V).view(-1, 1)], dim=1).view(B, 2 * K, t + 2)
            ends = ((cand % V) == EOS_ID) | (t == max_new_tokens - 1)
            # finished hypotheses: the ending candidates among the best K, for examples that are not done
            new_finished = ends & in_top_k & ~done[:, None]
            new_scores = (cand_scores / (t + 1) ** length_penalty).masked_fill(~new_finished, float("-inf"))
            pool = torch.cat([finished, F.pad(cand_seqs, (0, max_new_tokens - t - 1), value=PAD_ID)], dim=1)
            finished_scores, keep = torch.cat([finished_scores, new_scores], dim=1).topk(K)
            finished = pool.gather(1, keep[..., None].expand(-1, -1, pool.size(2)))
            is_finished = torch.cat([is_finished, new_finished], dim=1).gather(1, keep)
            # running beams: the K best candidates that did not end
            scores, pick = cand_scores.masked_fill(ends, float("-inf")).topk(K)
            seqs = cand_seqs.gather(1, pick[..., None].expand(-1, -1, t + 2)).view(B * K, t + 2)
            best_possible = scores[:, 0] / (t + 1) ** length_penalty
            done |= is_finished.all(1) & (early_stopping | (best_possible <= finished_scores.min(1).values))
            if done.all() or t == max_new_tokens - 1:
                break
            if cache is not None:
                self.reorder_cache(cache, parent.gather(1, pick).view(-1), cross=False)
            logprobs = no_eos(F.log_softmax(self.next_logits(seqs, enc_out, src, cache), -1), t + 1)
        return finished[:, 0, 1:]

    # ------------------------------------------------------------------------------------------------------------
    # Loading public weights, and the optimizer

    @classmethod
    def from_pretrained(cls, path):
        """Load a local Hugging Face T5 folder (config.json + model.safetensors or pytorch_model.bin) without
        transformers. Accepts the full key set (shared, encoder/decoder.embed_tokens, lm_head) and the minimal one
        (one embedding; no lm_head when tied)."""
        folder = Path(path)
        model = cls(read_hf_config(folder))
        tensors = load_hf_tensors(folder)
        aliases = ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
        # an untied head missing from the file is the embedding (what transformers does then)
        candidates = {"shared.weight": aliases, "lm_head.weight": ("lm_head.weight", *aliases)}
        used = set()
        with torch.no_grad():
            for name, param in model.named_parameters():
                keys = candidates.get(name, (hf_name(name),))
                key = next((k for k in keys if k in tensors), None)
                if key is None:
                    raise ValueError(f"{folder}: no tensor {keys[0]} in the checkpoint: not a T5 of this config.json")
                if tensors[key].shape != param.shape:
                    raise ValueError(f"{folder}: tensor {key} has shape {tuple(tensors[key].shape)}, "
                                     f"expected {tuple(param.shape)} from config.json")
                param.copy_(tensors[key].float())
                used.add(key)
        ignored = sorted(set(tensors) - used - set(aliases) - {"lm_head.weight"})
        if ignored:  # e.g. old t5-small files hold an unused decoder cross-attention bias table
            print(f"from_pretrained: ignored {len(ignored)} tensor(s) of {folder}: {', '.join(ignored[:3])}")
        return model

    def configure_optimizers(self, weight_decay, learning_rate, betas, eps, device_type, fused=True):
        """Adam(W): decay (none in the seed) on the 2-D weights, none on norms. fused: one kernel over all
        parameters (CUDA; CPU since torch 2.4); fused=False is the plain per-tensor loop, the benchmark's baseline."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        available = fused and device_type in ("cuda", "cpu")  # elsewhere torch's default (foreach where it can)
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, fused=available or None,
                                 foreach=None if fused else False)


def require_file(path, what):
    """`path` if it is a regular file; else the one-line error that says what it is instead and what to do."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        raise ValueError(f"{path} is a folder: {what}")
    if path.exists():
        raise ValueError(f"{path} is not a regular file (a FIFO, socket or device): {what}")
    raise FileNotFoundError(f"{path} not found: {what}")


def read_json_object(path, what, remedy):
    """A JSON file that must hold an object, as one-line errors naming the file: read once, where it is used."""
    try:
        value = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); {remedy}") from None
    if what and not isinstance(value, dict):  # what=None: the caller checks the shape itself
        raise ValueError(f"{path}: a JSON {type(value).__name__}, not {what}; {remedy}")
    return value


def read_hf_config(folder):
    """A T5 config.json, checked as the same numbers given as flags would be (validate)."""
    path = require_file(Path(folder) / "config.json", "--init_from expects a ds2.py checkpoint file or a Hugging "
                        "Face T5 folder holding config.json and model.safetensors or pytorch_model.bin")
    hf = read_json_object(path, "a T5 config.json (an object)", "download the folder again")
    missing = [k for k in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads") if k not in hf]
    if missing or hf.get("feed_forward_proj", "relu") not in ("relu", "gated-gelu"):
        raise ValueError(f"{path}: not a T5 config this script implements (missing {missing}, feed_forward_proj "
                         f"{hf.get('feed_forward_proj')!r}; relu and gated-gelu are supported)")
    shape = {k: hf.get(k) for k in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers",
                                    "num_heads", "relative_attention_num_buckets", "relative_attention_max_distance")
             if hf.get(k) is not None}
    for key, value in shape.items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{path}: {key} is {value!r}, not a whole number")
    if shape["vocab_size"] <= 0:
        raise ValueError(f"{path}: vocab_size must be positive, got {shape['vocab_size']}")
    try:
        validate(dataclasses.replace(Config(), **{k: v for k, v in shape.items() if k != "vocab_size"}))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return T5Config(
        vocab_size=hf["vocab_size"], d_model=hf["d_model"], d_kv=hf["d_kv"], d_ff=hf["d_ff"],
        num_layers=hf["num_layers"], num_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"],
        num_heads=hf["num_heads"], relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
        dropout=hf.get("dropout_rate", 0.1), layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-6),
        feed_forward_proj=hf.get("feed_forward_proj", "relu"),
        # transformers 5 writes scale_decoder_outputs (false for v1.1) and always tie_word_embeddings=true
        tie_word_embeddings=hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True)))


def load_hf_tensors(folder):
    """model.safetensors (read by read_safetensors) or pytorch_model.bin (a weights-only torch.load)."""
    if (folder / "model.safetensors").is_file():
        return read_safetensors(folder / "model.safetensors")
    path = folder / "pytorch_model.bin"
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: neither model.safetensors nor pytorch_model.bin found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: refused: it holds objects a weights-only load does not allow "
                         f"(a pickle that could run code): {refusal_reason(e)}") from None


def refusal_reason(error):
    """torch's weights-only error in one line: what was refused, without its advice to retry with
    weights_only=False, which would run the code."""
    lines = [line.strip() for line in str(error).splitlines()
             if line.strip() and not line.startswith(("Weights only load failed", "Check the documentation"))]
    return " ".join(lines) or "objects other than tensors"


SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
SAFETENSORS_MAX_HEADER = 100 * 2**20  # the format's own cap on the JSON header (100 MB)


def safetensors_fault(info, data_size):
    """What is wrong with one tensor's header entry, or None: a known dtype, a shape of non-negative integers and
    integer offsets inside the data that hold exactly that shape."""
    def whole(x):
        return isinstance(x, int) and not isinstance(x, bool) and x >= 0
    if not isinstance(info, dict):
        return f"its entry is {type(info).__name__}, not an object"
    if info.get("dtype") not in SAFETENSORS_DTYPES:
        return f"dtype {info.get('dtype')!r}; only F32, F16 and BF16 are read"
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not all(whole(d) for d in shape):
        return f"shape {shape!r} is not a list of non-negative integers"
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(whole(o) for o in offsets) \
            or not offsets[0] <= offsets[1] <= data_size:
        return f"data_offsets {offsets!r} must be two integers 0 <= begin <= end <= {data_size:,} (the data's size)"
    if offsets[1] - offsets[0] != math.prod(shape) * SAFETENSORS_DTYPES[info["dtype"]].itemsize:
        return f"byte range [{offsets[0]}, {offsets[1]}) does not hold shape {shape} of {info['dtype']}"
    return None


def read_safetensors(path):
    """The safetensors format without the package: 8 bytes little-endian header length N, N bytes of JSON
    {name: {dtype, shape, data_offsets: [begin, end]}} (offsets from the end of the header), then the raw
    little-endian tensor bytes (torch.frombuffer reads native order, little-endian on every machine torch runs on).
    A file from elsewhere is untrusted: the whole header is checked before any tensor is read (size cap, dtypes,
    shapes, in-bounds offsets that match the shapes and do not overlap), and each tensor is read into its own
    buffer, so the file is never held in memory twice."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little") if size >= 8 else 0
        if size < 8 or not 0 < n <= min(SAFETENSORS_MAX_HEADER, size - 8):
            raise ValueError(f"{path}: header length {n:,} does not fit in {size:,} bytes (at most 100 MB): not "
                             f"safetensors, or cut off; download the weights again")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: the header is not JSON ({e}): not safetensors; download it again") from None
        if not isinstance(header, dict):
            raise ValueError(f"{path}: the header is a JSON {type(header).__name__}, not an object: not safetensors")
        entries = []
        for name, info in header.items():
            if name == "__metadata__":
                continue
            fault = safetensors_fault(info, size - 8 - n)
            if fault:
                raise ValueError(f"{path}: tensor {name!r}: {fault}; the file is damaged or not safetensors")
            entries.append((*info["data_offsets"], name, info))
        entries.sort(key=lambda e: e[:2])
        for (_, end, name, _), (begin, _, other, _) in zip(entries, entries[1:]):
            if begin < end:
                raise ValueError(f"{path}: tensors {name!r} and {other!r} overlap in the file; it is damaged")
        tensors = {}
        for begin, end, name, info in entries:
            buf = bytearray(end - begin)
            f.seek(8 + n + begin)
            f.readinto(buf)
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            flat = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)  # refuses an empty one
            tensors[name] = flat.reshape(info["shape"])
    return tensors


# ----------------------------------------------------------------------------------------------------------------
# Templates and inverse rules: dialogue state <-> summary (DS2, Shin et al. 2022, Section 3), and the metrics
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
#      would read another state, or a value holds another phrase (point 4), writes every value in double quotes
#      ('called "x at noon"'); quoted values are read first and cannot be split wrongly. So
#      summary_to_state(state_to_summary(s)) == s for every state; of the real MultiWOZ 2.1 test and dev states
#      4 need quotes (a taxi to "home from home"; tests/test_templates.py measures both splits).
#   4. A model's summary that is not a template output is read sentence by sentence and phrase by phrase (MARKERS,
#      _read_phrases): any phrase or domain order, repeats, slips, cut-off endings, DS2's wordings; a value never
#      holds another phrase's lead or the "does not care" clause, and an unreadable fragment gives no slot. The
#      exact reading wins unless one of its values holds another phrase (_swallows; see summary_to_state).
# ----------------------------------------------------------------------------------------------------------------

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


def _render(state, quoted, order=DOMAINS):
    """The summary: the domains' sentences in DOMAINS order (the empty state has a sentence of its own)."""
    domains = [d for d in order if any(slot.startswith(d + "-") for slot in state)]
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
    if reading is not None and dict(reading) == state and not _swallows(reading):  # summary_to_state's rule
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


# The reading of text that is no template output (point 4): phrase by phrase. A model's summary is rarely a
# template word for word: it reorders phrases ("located in the north with a cheap price"), repeats one ("for 2
# people for 2 people"), slips on a number or an article ("ranked 1 stars", "with a expensive price"), stops at the
# length limit ("..., which leaves at 10:00 and arrives by"), writes "in the north" for "located in the north", or
# uses DS2's own wordings ("he looks for a taxi", "serves chinese", "does not care about the food type"). Each slot
# has a lead (MARKERS); a free value ("called x", "from x") runs to the next lead of its domain, the "which" or
# "does not care" clause, or the sentence end, so it never holds another phrase. Leads that are common words inside
# values ("for", "on", "at", "in the") only count with the value they announce ("for 2 people", "on monday",
# "at 12:00", "in the north"). A lead without a readable value (cut off) gives no slot, never a wrong one.
NUMBER_WORDS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_NUM = r"(\d+|%s)" % "|".join(NUMBER_WORDS)
_DAY = r"(monday|tuesday|wednesday|thursday|friday|saturday|sunday)"
_TIME = r"(\d{1,2}[:.]\d{2}(?: ?[ap]\.?m\.?)?|\d{1,2} ?[ap]\.?m\.?)"
_AREA = r"(north|south|east|west|centre|center)"
_FREE = None  # a free value: it runs to the next lead
# slot: [(lead regex, value: a regex group for a typed value or _FREE, tail regex stripped from a free value)]
MARKERS = {
    "type": [(r"which is (?:an? |the )?", _FREE, "")],
    "name": [(r"called ", _FREE, "")],
    "stars": [(r"ranked %s ?stars?\b" % _NUM, 1, ""), (r"ranked ", _FREE, r" stars?")],
    "pricerange": [(r"with (?:an? )?(\w+) price(?: range)?\b", 1, ""), (r"in the (\w+) price range\b", 1, "")],
    "area": [(r"located in (?:the )?", _FREE, ""), (r"in the %s\b" % _AREA, 1, "")],
    "book people": [(r"for %s (?:people|persons?)\b" % _NUM, 1, "")],
    "book stay": [(r"for %s (?:days?|nights?)\b" % _NUM, 1, "")],
    "book day": [(r"on %s\b" % _DAY, 1, "")],
    "day": [(r"on %s\b" % _DAY, 1, "")],
    "book time": [(r"at %s" % _TIME, 1, "")],
    "parking": [(r"(?:has|with) (no |free )?parking\b", 1, "")],
    "internet": [(r"(?:has|with) (no |free )?(?:internet|wifi)\b", 1, "")],
    "departure": [(r"from ", _FREE, "")],
    "destination": [(r"to ", _FREE, "")],
    "leaveat": [(r"(?:leaves|leaving|departs) (?:at|after) ", _FREE, "")],
    "arriveby": [(r"(?:arrives|arriving|arrive) (?:by|at|before) ", _FREE, "")],
    "food": [(r"serves ", _FREE, r" (?:food|cuisine)")],
}
# DS2's converter names some slots otherwise in its "does not care about" clause (state_sum_converter.py)
DS2_DONTCARE_NAMES = {"restaurant-food": "the food type", "hotel-type": "the hotel type", "hotel-stars": "the hotel stars",
                      "hotel-book stay": "the stay", "train-day": "the departure date",
                      "attraction-name": "the name of the attraction", "attraction-type": "the type of the attraction"}
_DONTCARE_NAMES = {d: {**names, **{name: slot for slot, name in DS2_DONTCARE_NAMES.items() if slot.startswith(d + "-")}}
                   for d, names in DONTCARE_NAMES.items()}
_LEADS = {d: re.compile("|".join(r"(?P<m%d_%d>%s)" % (k, n, lead) for k, slot in enumerate(ORDERS[d])
                                 for n, (lead, _, _) in enumerate(MARKERS[slot.split("-", 1)[1]])))
          for d in DOMAINS}
_CLAUSE = re.compile(r",? (?:and )?(?:he|the user) (?:also )?(?:does not|doesn't|do not) care about\b|"
                     r"(?:^|, | )(?:and )?(?:does not|doesn't) care about\b", re.I)
_ANY_OPENER = re.compile(r"(?:(?:the user|he|she|they)\s+)?(?:is looking for|is searching for|looks for|searches for|"
                         r"wants|is also looking for|also wants|needs) (%s)\b" % "|".join(DOMAIN_PHRASE.values()), re.I)
_JOINERS = re.compile(r"(?:[\s,.;]|\b(?:and|which|also|he|the user)\b)*$", re.I)  # left at the end of a value


def _markers(domain, body):
    """The leads in one domain's sentence body as (start, end, slot, typed value or None), left to right; a lead
    starts the body or follows a space or a comma."""
    found = []
    for m in _LEADS[domain].finditer(body):
        if m.start() and body[m.start() - 1] not in " ,":
            continue
        k, n = map(int, m.lastgroup[1:].split("_"))
        slot = ORDERS[domain][k]
        _, group, _ = MARKERS[slot.split("-", 1)[1]][n]
        typed = None if group is _FREE else m.group(m.re.groupindex[m.lastgroup] + group) or ""
        found.append((m.start(), m.end(), slot, n, typed))
    return found


def _typed_value(slot, raw):
    """A typed value as the templates write it: "two" -> "2", "free" parking -> "free", "has parking" -> "yes"."""
    raw = (raw or "").strip().lower()
    if slot in YES_NO_SLOTS:
        return {"no": "no", "free": "free", "": "yes"}[raw]
    return NUMBER_WORDS.get(raw, "centre" if raw == "center" else raw)


def _read_phrases(domain, body):
    """One domain's sentence body (the text after "a train"), read phrase by phrase: {slot: value}. The first
    reading of a slot wins (a repeated phrase says it again); a lead with nothing readable after it gives nothing."""
    slots, cut = {}, _CLAUSE.search(body)
    if cut:  # the "does not care" clause: the names it lists, ours or DS2's, in any order
        listed = re.split(r",? and |, |,", body[cut.end():])
        for name in listed:
            slot = _DONTCARE_NAMES[domain].get(name.strip(" .,").lower())
            if slot:
                slots[slot] = "dontcare"
        body = body[:cut.start()]
    body += " "  # a lead cut off at the end ("and arrives by") is still a lead
    marks = _markers(domain, body)
    for i, (start, end, slot, n, typed) in enumerate(marks):
        if i and start < marks[i - 1][1]:
            continue  # inside the previous lead (its typed value)
        if typed is not None:
            value = _typed_value(slot, typed)
        else:
            stop = next((s for s, *_ in marks[i + 1:] if s >= end), len(body))
            value = _NOT_PLAIN.split(body[end:stop])[0]  # nor another sentence's start ("also, he ...")
            value = value[:_JOINERS.search(value).start()]  # ", which", " and", a full stop: not the value's
            tail = MARKERS[slot.split("-", 1)[1]][n][2]
            value = re.sub(r"(?:%s)$" % tail, "", value) if tail else value
            value = value.strip(" ,.")
        if value and value != "dontcare" and slot not in slots and not re.search(r'["\\]', value):
            slots[slot] = value  # (quotes and backslashes are no model's words: an unreadable fragment)
    return slots


_LEAD_WORDS = {d: {part.strip() for s in ORDERS[d] for part in _SPELLINGS[s][0] if part.strip()} | {"in the"}
               for d in DOMAINS}  # "called", "with a", "on", ...: what a phrase starts with
_BARE_LEADS = {d: re.compile(r"(?:^|\s)(?:%s)$" % "|".join(map(re.escape, sorted(words, key=len, reverse=True))))
               for d, words in _LEAD_WORDS.items()}  # a value ending in one ("monday at") swallowed a cut-off lead


def _swallows(reading):
    """True when a value of an exact reading holds another phrase: a lead of its domain with what it announces,
    the "does not care" clause, or a "which" clause. The exact reading then only fits the text by accident (the
    phrases came in another order, twice, or cut off), and the phrase-by-phrase reading is taken instead."""
    for slot, value in reading:
        if _CLAUSE.search(" " + value + " ") or re.search(r"(?:^|[ ,])which |care about", value):
            return True
        phrase = slot_phrase(slot, value) + " "  # "for 2 people for 2 people": the value "2 people for 2"
        if any(start > 0 for start, *_ in _markers(slot.split("-")[0], phrase)):
            return True
        if _BARE_LEADS[slot.split("-")[0]].search(value):
            return True
    return False


def _read_best_effort(text):
    """A summary that is no template output, read sentence by sentence: each domain sentence found (any order,
    DS2's verbs too, up to the next opener or a full stop) is read exactly if it is a template sentence whose values
    hold no other phrase, else phrase by phrase. The first sentence of a domain wins over a repeated one."""
    text = " ".join(text.split())
    text = re.sub(r"\. (?:he|the user) (?=(?:also )?(?:does not|doesn't) care about )", ", and he ", text, flags=re.I)
    state, openers = {}, list(_ANY_OPENER.finditer(text))
    for m, after in zip(openers, openers[1:] + [None]):
        domain = next(d for d, phrase in DOMAIN_PHRASE.items() if phrase == m.group(1).lower())
        body = text[m.end():after.start() if after else len(text)].split(". ")[0]  # junk after a full stop
        body = re.sub(r"(?:[.,]?\s+(?:also,?\s+)?(?:the user|he))?[\s.,]*$", "", body, flags=re.I)
        exact = _read_exact(FIRST_OPENER + DOMAIN_PHRASE[domain] + body + ".")
        trusted = exact is not None and ('"' in body or not _swallows(exact))  # quoted values: what they say
        reading = exact if trusted else _read_phrases(domain, body).items()
        for slot, value in reading:
            state.setdefault(slot, value)
    return state


def summary_to_state(summary):
    """The dialogue state of a summary: exact for every output of state_to_summary, phrase by phrase for anything
    else (never raises; unreadable text gives {}). Which reading wins: the exact one (generate-and-check: it renders
    back to the very text), unless one of its values holds another phrase (_swallows). A value holding "with a cheap
    price" or "and arrives by" is how the exact reader explains a phrase out of order, a repeat or a cut-off ending,
    which a model writes often; such values are rare in real states (4 of the 14,737 MultiWOZ 2.1 test and dev
    states: a taxi to the hotel "home from home"), and state_to_summary writes those quoted, so the phrase reading
    is the likelier one for plain text and the round trip stays exact."""
    if not isinstance(summary, str):
        return {}
    reading = _read_exact(summary)
    if reading is not None and ('"' in summary or not _swallows(reading)):  # quoted values are what they say
        return dict(reading)
    return _read_best_effort(summary)


def roundtrip(states):
    """The states that do not survive state -> summary -> state, as (index, state, summary, parsed)."""
    failures = []
    for i, state in enumerate(states):
        summary = state_to_summary(state)
        parsed = summary_to_state(summary)
        if parsed != state:
            failures.append((i, state, summary, parsed))
    return failures


# ----------------------------------------------------------------------------------------------------------------
# Metrics, turn level; dontcare is an ordinary value, a missing slot is "none". Two scorings, always named:
#   trade: every evaluated slot on every turn (all 30 unless cross-domain), as TRADE scores; the stricter one.
#   ds2:   per turn only the evaluated slots of the dialogue's goal domains, as DS2's code scores (data_loader.py:109,
#          evaluate.py:107-159); the one to set beside the paper's tables. On real systems' test predictions its
#          JGA is 0.2-0.6 points higher (DS2.md). Its slot accuracy counts only the goal domains' cells, fewer of
#          them trivially empty, so it is no number to compare with the 30-slot one.
SCORING = {"trade": "trade: every evaluated slot on every turn (TRADE's scoring)",
           "ds2": "ds2: per turn only the evaluated slots of the dialogue's goal domains (DS2's evaluate.py)"}


def compute_metrics(predictions, golds, slots=SLOTS):
    """The trade scoring: JGA, slot accuracy, slot precision/recall/F1 and per-domain JGA of predicted vs gold
    states, one dict per turn, both restricted to `slots` (cross-domain evaluation passes one domain's slots).
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
        "scoring": SCORING["trade"],
    }


def compute_metrics_ds2(predictions, golds, goal_domains, slots=SLOTS):
    """The ds2 scoring, as DS2's get_acc (evaluate.py:95-170) computes it. Turn i is scored on the slots of `slots`
    whose domain is one of goal_domains[i] (its dialogue's goal domains; DS2's eval_slots, data_loader.py:109):
    - jga: the fraction of turns whose predicted and gold (slot, value) sets agree on those slots;
    - slot_acc: right (turn, slot) cells over all scored cells (the turns' slot counts summed);
    - per_domain_jga: JGA on a domain's slots over every turn of a dialogue with that goal domain, also the turns
      before the domain comes up (evaluate.py:133-159); per_domain_turns counts them.
    A gold slot outside the goal domains is not scored (DS2 does not see it either). DS2 reports no F1."""
    if not len(predictions) == len(golds) == len(goal_domains) or not golds:
        raise ValueError(f"compute_metrics_ds2 needs one prediction and one goal-domain list per gold turn, got "
                         f"{len(predictions)}, {len(goal_domains)} and {len(golds)} gold states")
    joint = hits = cells = 0
    domain_hits, domain_turns = collections.Counter(), collections.Counter()
    for prediction, gold, domains in zip(predictions, golds, goal_domains):
        scored = [slot for slot in slots if slot.split("-")[0] in domains]
        joint += all(prediction.get(slot) == gold.get(slot) for slot in scored)
        hits += sum(prediction.get(slot) == gold.get(slot) for slot in scored)
        cells += len(scored)
        for d in dict.fromkeys(slot.split("-")[0] for slot in scored):
            domain_turns[d] += 1
            domain_hits[d] += all(prediction.get(s) == gold.get(s) for s in scored if s.startswith(d + "-"))
    return {
        "jga": joint / len(golds),
        "slot_acc": hits / cells if cells else 0.0,  # DS2's safe division
        "per_domain_jga": {d: domain_hits[d] / domain_turns[d] for d in DOMAINS if domain_turns[d]},
        "per_domain_turns": {d: domain_turns[d] for d in DOMAINS if domain_turns[d]},
        "n_turns": len(golds),
        "n_slots_scored": cells,
        "scoring": SCORING["ds2"],
    }


# ----------------------------------------------------------------------------------------------------------------
# Data: examples and token bins from data_multiwoz.py; batches padded to their own longest sequence

def read_meta(data_dir):
    """meta.json of data_multiwoz.py, and the SentencePiece model of the bins (to turn generated ids into text)."""
    if Path(data_dir).exists() and not Path(data_dir).is_dir():
        raise ValueError(f"{data_dir} is a file: --data_dir takes the folder data_multiwoz.py wrote")
    path = require_file(Path(data_dir) / "meta.json", "make the data folder with data_multiwoz.py (it writes "
                        "meta.json last, so a folder without it is incomplete), or point --data_dir at one")
    meta = read_json_object(path, None, "re-run data_multiwoz.py")
    if not isinstance(meta, dict) or not isinstance(meta.get("spm"), dict) or not isinstance(
            meta.get("vocab_size"), int) or isinstance(meta.get("vocab_size"), bool) or meta["vocab_size"] <= 0:
        raise ValueError(f"{path}: not a meta.json of data_multiwoz.py (an object with a whole vocab_size and an "
                         f"spm entry); re-run data_multiwoz.py")
    if not {"vocab_size", "pad_id", "eos_id", "spm"} <= meta.keys() or (meta["pad_id"], meta["eos_id"]) != (0, 1):
        raise ValueError(f"{path}: not a meta.json of data_multiwoz.py with T5's pad 0 and eos 1; re-run it")
    spm_path = Path(data_dir) / meta["spm"].get("file", "spm.model")
    model = spm_path.read_bytes() if spm_path.is_file() else b""
    if hashlib.sha256(model).hexdigest() != meta["spm"]["sha256"]:
        raise ValueError(f"{spm_path} is missing or not the SentencePiece model meta.json names (sha256 differs): "
                         f"re-run data_multiwoz.py")
    return meta, sentencepiece.SentencePieceProcessor(model_proto=model)


EXAMPLE_FIELDS = {"dialogue_id": str, "turn": int, "state": dict, "summary": str}  # + domains (list) for states


def read_examples(path, task="dst"):
    """A split's examples, each checked when read (not after decoding the whole split): a JSON object with the
    fields ds2.py reads, of the right types."""
    require_file(path, f"no such split in {path.parent} (check --data_dir and the split names, e.g. "
                       f"--train_split, --val_split, --split)")
    fields = {**EXAMPLE_FIELDS, **({"domains": list} if task == "dst" else {})}
    examples = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            try:
                example = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{path} line {line_no}: not valid JSON ({e}); re-run data_multiwoz.py") from None
            wrong = [k for k, kind in fields.items() if not isinstance(example, dict)
                     or not isinstance(example.get(k), kind) or isinstance(example.get(k), bool)]
            if wrong:
                what = "not a JSON object" if not isinstance(example, dict) else f"no valid {', '.join(wrong)}"
                raise ValueError(f"{path} line {line_no}: {what} (each line is an example of data_multiwoz.py with "
                                 f"{', '.join(fields)}); re-run data_multiwoz.py")
            examples.append(example)
    return examples


def open_bin(path):
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: re-run data_multiwoz.py")
    size = path.stat().st_size
    if size == 0 or size % 2:
        raise ValueError(f"{path}: {size:,} bytes, not a file of uint16 tokens (empty or cut off?); "
                         f"re-run data_multiwoz.py")
    return np.memmap(path, dtype=np.uint16, mode="r")


def load_split(config, split, meta, train=False):
    """One split: examples ({split}.jsonl), token memmaps, the (N, 4) index (src_offset, src_len, tgt_offset,
    tgt_len) and the rows this run uses. The few-shot sample is drawn from the training split only; the
    cross-domain filters apply to every split (DS2 evaluates a held-out domain on its own dialogues)."""
    folder = Path(config.data_dir)
    examples = read_examples(folder / f"{split}.jsonl", meta.get("task", "dst"))
    idx_path = folder / f"{split}.idx.npy"
    if not idx_path.is_file():
        raise FileNotFoundError(f"{idx_path} not found: re-run data_multiwoz.py")
    idx = np.load(idx_path)
    src, tgt = open_bin(folder / f"{split}.src.bin"), open_bin(folder / f"{split}.tgt.bin")
    if idx.shape != (len(examples), 4):
        raise ValueError(f"{idx_path} has shape {idx.shape}, expected ({len(examples)}, 4), one row per line of "
                         f"{split}.jsonl: the files are from different runs; re-run data_multiwoz.py")
    for name, bin_, offset, length in (("src", src, idx[:, 0], idx[:, 1]), ("tgt", tgt, idx[:, 2], idx[:, 3])):
        if len(idx) and ((offset + length).max() > len(bin_) or length.min() < 1):
            raise ValueError(f"{folder / f'{split}.{name}.bin'} holds {len(bin_):,} tokens, not what {idx_path.name} "
                             f"says (cut off?); re-run data_multiwoz.py")
        if bin_.max() >= meta["vocab_size"]:
            raise ValueError(f"{folder / f'{split}.{name}.bin'}: token id {bin_.max()} >= vocab_size "
                             f"{meta['vocab_size']} of meta.json: made with another tokenizer; re-run data_multiwoz.py")
    rows = np.arange(len(examples))
    if (train and config.fewshot < 1) or config.except_domain or config.only_domain:
        from data_multiwoz import select_examples  # DS2's few-shot and cross-domain selection, by dialogue
        rows = np.array(select_examples(examples, fewshot=config.fewshot if train else 1.0, seed=config.fewshot_seed,
                                        except_domain=config.except_domain, only_domain=config.only_domain,
                                        dialogue_filter=config.dialogue_filter), dtype=np.int64)
    if len(rows) == 0:
        raise ValueError(f"{folder / f'{split}.jsonl'}: no example left (--except_domain {config.except_domain!r}, "
                         f"--only_domain {config.only_domain!r}); check the split and the domain")
    if not config.max_src_len:  # no silent truncation: the longest source of the folder, up to DS2's 1000 tokens
        longest = [s.get("max_src_len", 0) for s in meta.get("splits", {}).values()] + [int(idx[:, 1].max())]
        config.max_src_len = min(MAX_SOURCE_TOKENS, max(longest))
    cut = int((idx[rows, 1] > config.max_src_len).sum())
    print(f"{split}: {len(rows):,} turns; {cut:,} sources longer than --max_src_len {config.max_src_len} "
          f"(longest {int(idx[rows, 1].max())}) lose their oldest tokens" if cut else
          f"{split}: {len(rows):,} turns; no source is cut (longest {int(idx[rows, 1].max())} <= --max_src_len "
          f"{config.max_src_len})")
    data = dict(split=split, examples=examples, idx=idx, src=src, tgt=tgt, rows=rows, task=meta.get("task", "dst"),
                train=train, sources_cut=cut)
    if train and config.shuffle_domains:  # targets are written anew every epoch: the tokenizer is needed
        data["sp"] = read_meta(config.data_dir)[1]
    return data


MAX_SOURCE_TOKENS = 1000  # DS2's tokenizer limit (data_loader.py:154); no MultiWOZ 2.1 turn reaches it


def clip(ids, max_len, keep_end):
    """ids (ending in EOS) cut to at most max_len tokens, still ending in EOS. A source keeps its end (keep_end):
    the most recent turns, where the current state is decided; the oldest turns and the "Summarize this dialogue:"
    prefix go first. A target keeps its start."""
    if len(ids) <= max_len:
        return ids
    return np.append(ids[-max_len:-1] if keep_end else ids[:max_len - 1], EOS_ID)


def pad(seqs, value):
    out = np.full((len(seqs), max(len(s) for s in seqs)), value, dtype=np.int64)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = s
    return torch.from_numpy(out)


def token_counts(data, rows, config):
    """(source tokens, target tokens) of these rows after clipping, without padding."""
    idx = data["idx"][rows]
    return int(np.minimum(idx[:, 1], config.max_src_len).sum()), int(np.minimum(idx[:, 3], config.max_tgt_len).sum())


def get_batch(data, rows, config, device):
    """Sources (B, S) padded with PAD_ID and labels (B, T) padded with -100 (ignored by the loss) for these example
    rows, each only as long as its longest sequence (dynamic padding). With --loss_on_pad (DS2's quirk, --preset
    paper) training labels are padded with PAD_ID instead, so the loss also learns to write pads after EOS."""
    idx = data["idx"][rows]
    src = pad([clip(data["src"][o:o + n], config.max_src_len, keep_end=True) for o, n in idx[:, :2]], PAD_ID)
    label_pad = PAD_ID if config.loss_on_pad and data.get("train") else -100
    targets = [data["tgt"][o:o + n] for o, n in idx[:, 2:]]
    if config.shuffle_domains and data.get("train") and data["task"] == "dst":
        targets = [shuffled_target(data, row, config.seed) for row in rows]
    labels = pad([clip(ids, config.max_tgt_len, keep_end=False) for ids in targets], label_pad)
    if device.type == "cuda":  # pinned memory lets the copy run asynchronously with the GPU's work
        return src.pin_memory().to(device, non_blocking=True), labels.pin_memory().to(device, non_blocking=True)
    return src, labels


def shuffled_target(data, row, seed):
    """--shuffle_domains: the target of `row` with its domains in an order drawn from (seed, epoch, row), so a resumed
    run draws the same orders; DS2 reshuffles on every call (state_sum_converter.py:541-542). Token ids with EOS."""
    state = data["examples"][row]["state"]
    order = np.random.default_rng([seed, data.get("epoch", 0), int(row)]).permutation(DOMAINS).tolist()
    quoted = '"' in state_to_summary(state) if state else False
    summary = _render(state, quoted, order) if state else EMPTY_SUMMARY
    return np.array(data["sp"].encode(summary) + [EOS_ID], dtype=np.int64)


def batch_rows(step, seed, rows, batch_size):
    """The example rows of optimizer step `step`: a pure function of (seed, step), so a resumed run reads exactly
    the batches an uninterrupted one would. Every epoch visits all rows in a fresh seeded order; the last batch of
    an epoch may be smaller."""
    epoch, position = divmod(step, math.ceil(len(rows) / batch_size))
    order = np.random.default_rng([seed, epoch]).permutation(len(rows))
    return rows[order[position * batch_size:(position + 1) * batch_size]]


# ----------------------------------------------------------------------------------------------------------------
# Learning-rate schedule (the seed's: warmup, then cosine)

def get_lr(step, total_steps, config):
    """Linear warmup from 0 over warmup_iters (step 0 has lr 0, as in Hugging Face's schedule, which the seed's run
    used), then cosine from the peak down to min_lr at total_steps. decay_lr false: the peak stays (DS2's code)."""
    if step < config.warmup_iters:
        return config.learning_rate * step / config.warmup_iters
    if not config.decay_lr:
        return config.learning_rate
    progress = min(1.0, (step - config.warmup_iters) / max(1, total_steps - config.warmup_iters))
    return config.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (config.learning_rate - config.min_lr)


def plan_schedule(n_rows, config):
    """(config, total steps, plan line) of a run on n_rows training turns. The seed's recipe (1 epoch, 1000 warmup
    steps, 512 turns a step) is made for the full training set; on a 1% sample it is 2 steps that never leave the
    warmup and one evaluation. Schedule "data" (unless --max_iters is given) therefore derives the run from the
    data: max(epochs x steps per epoch, min_iters) steps, warmup min(warmup_iters, warmup_share of the run), and
    with eval_interval 0 evals_per_run evaluations spread over it (early stopping needs several). On the full set
    (111 steps/epoch) that is the seed's single epoch with 12 warmup steps. Schedule "fixed": as given."""
    per_epoch = math.ceil(n_rows / config.batch_size)
    if config.schedule == "data" and not config.max_iters:
        total = max(config.epochs * per_epoch, config.min_iters)
        config = dataclasses.replace(config, warmup_iters=min(config.warmup_iters, math.ceil(config.warmup_share * total)),
                                     eval_interval=config.eval_interval or math.ceil(total / config.evals_per_run))
    else:
        total = config.max_iters or config.epochs * per_epoch
    every = config.eval_interval or per_epoch
    evals = total // every + (total % every > 0)
    plan = (f"plan ({config.schedule} schedule): {n_rows:,} training turns, {per_epoch} steps/epoch x "
            f"{total / per_epoch:.1f} epochs = {total:,} steps; warmup {config.warmup_iters} steps to lr "
            f"{config.learning_rate:g}; {evals} evaluations (every {every} steps)")
    return config, total, plan


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints and outputs: written atomically, loaded weights-only

def atomic_write(path, write):
    """write(f) into a temporary file in the same folder, fsync, then rename: a crash leaves the old file intact."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(path, checkpoint):
    atomic_write(path, lambda f: torch.save(checkpoint, f))


def write_text(path, text):
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def load_checkpoint(path, resume=False):
    """A ds2.py checkpoint: tensors and plain values only (weights_only), so a pickle that would run code is refused."""
    path = require_file(path, "--resume reads out_dir/ckpt.pt; --init_from takes a ds2.py checkpoint file or a "
                              "Hugging Face T5 folder")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: refused: it holds objects a weights-only load does not allow (a pickle that "
                         f"could run code, or not a checkpoint of this script): {refusal_reason(e)}") from None
    except (RuntimeError, EOFError, OSError) as e:  # a cut-off zip fails in torch's reader with EINVAL
        raise ValueError(f"{path}: unreadable checkpoint ({e}); is it cut off? Use another copy, or start again "
                         f"in a new --out_dir") from None
    weights = checkpoint.get("model") if isinstance(checkpoint, dict) else None
    if isinstance(weights, dict) and "transformer.wte.weight" in weights:
        raise ValueError(f"{path} is a gpt_staged.py checkpoint (a GPT-2), not ds2.py's: use it with gpt_staged.py")
    if not isinstance(weights, dict) or not isinstance(checkpoint.get("model_config"), dict):
        raise ValueError(f"{path}: not a ds2.py checkpoint (no model / model_config)")
    if resume and not {"optimizer", "scaler", "state"} <= checkpoint.keys():
        raise ValueError(f"{path} holds weights without the optimizer and training state (a best.pt?): it can be "
                         f"evaluated or warm-started from (--init_from {path.name}), not resumed; start a new run in "
                         f"another --out_dir")
    return checkpoint


# What defines a run: a resume that changed any of these would silently continue another run (other examples,
# model or LR curve). The rest (eval_interval, log_interval, stop_step, micro_batch_size, device, dtype, decoding
# settings, ...) may change between a stop and a resume.
RUN_KEYS = {"model configuration": tuple(MODEL_KEYS),
            "data order": ("seed", "batch_size", "train_split", "max_src_len", "max_tgt_len", "fewshot", "fewshot_seed",
                           "except_domain", "only_domain", "dialogue_filter", "loss_on_pad",
                           "shuffle_domains"),
            "LR schedule or optimizer": ("learning_rate", "min_lr", "warmup_iters", "decay_lr", "epochs", "max_iters",
                                         "schedule", "min_iters", "warmup_share", "weight_decay", "beta1", "beta2",
                                         "eps", "grad_clip"),
            "validation set": ("val_split", "eval_examples")}


def fingerprint(path):
    """A file's size and a hash of its first and last MiB: tells re-prepared data in milliseconds at any size."""
    size, digest = path.stat().st_size, hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(2**20))
        f.seek(max(0, size - 2**20))
        digest.update(f.read(2**20))
    return f"{size} bytes, sha256 {digest.hexdigest()[:16]}"


def check_resume(checkpoint, config, data, path):
    """The checkpoint to resume, after checking that it is this run's: the same RUN_KEYS and the same data
    (keys missing from an older checkpoint cannot be checked). Flags are never silently replaced by the
    checkpoint's: a different architecture is refused like any other change."""
    saved = checkpoint.get("config", {})
    for what, keys in RUN_KEYS.items():
        changed = [f"{k} {saved[k]} (checkpoint) vs {getattr(config, k)} (now)"
                   for k in keys if k in saved and hasattr(config, k) and saved[k] != getattr(config, k)]
        if changed:
            raise ValueError(f"{path} is from another {what}: {', '.join(changed)}; resume with the run's own "
                             f"settings or use another --out_dir")
    for name, now in data.items():
        before = checkpoint.get("data", {}).get(name, now)
        if before != now:
            raise ValueError(f"{path} was trained on other data: {name} was {before}, now {now} (prepared again, "
                             f"or another folder); point --data_dir at the run's data or use another --out_dir")
    return checkpoint


def rng_states(device, world_size):
    """Every process's random state (dropout draws from it), gathered for rank 0 to save: one entry per rank."""
    state = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda"
             else torch.empty(0, dtype=torch.uint8)}
    if world_size == 1:
        return [state]
    states = [None] * world_size
    dist.all_gather_object(states, state)
    return states


def restore_rng(checkpoint, rank, world_size, device, fresh_seed, log):
    """Each rank continues its own random stream, so a resumed run draws the dropout masks an uninterrupted one
    would. With another number of processes no stream can continue (the batches are split differently too):
    fresh seeds then. Checkpoints from before per-rank states hold rank 0's CPU state only."""
    states = checkpoint.get("rng") or [{"cpu": checkpoint["rng_cpu"], "cuda": torch.empty(0, dtype=torch.uint8)}]
    if len(states) != world_size:
        log(f"resume: the checkpoint holds the random state of {len(states)} process(es), this run has "
            f"{world_size}: dropout masks continue from fresh seeds")
        torch.manual_seed(fresh_seed)
        return
    torch.set_rng_state(states[rank]["cpu"])
    if device.type == "cuda" and states[rank]["cuda"].numel():
        torch.cuda.set_rng_state(states[rank]["cuda"], device)


def append_jsonl(path, row):
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def trim_log(path, last_step):
    """On resume, drop log rows past the checkpoint (a crashed run may have logged steps it then lost)."""
    if path.is_file():
        lines, rows = path.read_text().splitlines(), []
        for number, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                if number == len(lines):  # the last line, cut short by a crash
                    continue
                raise ValueError(f"{path}:{number}: not a JSON row ({line[:40]!r}); the log is damaged: remove the "
                                 f"line or the file (the checkpoint does not need it)") from None
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError(f"{path}:{number}: a row without a step number ({line[:40]!r}); remove the line or "
                                 f"the file (the checkpoint does not need it)")
            if row["step"] <= last_step:
                rows.append(line)
        write_text(path, "".join(line + "\n" for line in rows))


def build_model(config, meta, checkpoint=None, where=""):
    """The T5 of a run: from a ds2.py checkpoint (resume; warm start with --init_from x.pt, e.g. stage 1), from a
    Hugging Face T5 folder (--init_from path/to/t5-small), or from scratch with the Config's architecture."""
    if checkpoint is None and config.init_from != "scratch" and not Path(config.init_from).is_dir():
        checkpoint, where = load_checkpoint(config.init_from), config.init_from
    if checkpoint is not None:
        if checkpoint.get("spm_sha256") != meta["spm"]["sha256"]:
            raise ValueError(f"{where} was trained on token ids of another SentencePiece model than "
                             f"{Path(config.data_dir) / 'spm.model'}: prepare the data with the same --spm")
        model = T5(T5Config(**checkpoint["model_config"]))
        model.load_state_dict(checkpoint["model"])
    elif config.init_from != "scratch":
        model = T5.from_pretrained(config.init_from)
        if meta["spm"]["sha256"] != T5_SPM_SHA256:  # every public T5 checkpoint reads ids of T5's spiece.model
            print(f"warning: {config.data_dir} was tokenized with another SentencePiece model than T5's: the "
                  f"pretrained embeddings of {config.init_from} do not match its ids (data_multiwoz.py --spm)")
    else:
        vocab_size = -(-meta["vocab_size"] // 128) * 128  # padded to a multiple of 128, like t5-small's 32128
        model = T5(T5Config(vocab_size=vocab_size, **{k: getattr(config, k) for k in MODEL_KEYS}))
    if meta["vocab_size"] > model.config.vocab_size:
        raise ValueError(f"the data's vocabulary ({meta['vocab_size']} pieces) does not fit the model's "
                         f"{model.config.vocab_size} embeddings ({config.init_from}): use data made with its --spm")
    return model


# ----------------------------------------------------------------------------------------------------------------
# Training loop

def choose_device(requested, env, cuda_count):
    """The device name one process trains on, a pure function of (--device, environment, GPUs visible).
    torchrun sets RANK, LOCAL_RANK and WORLD_SIZE: process r of a node takes GPU LOCAL_RANK. A plain run takes
    GPU 0, or the index given. torch.cuda.set_device refuses a bare 'cuda', so the index is always explicit."""
    name = requested if requested != "auto" else "cuda" if cuda_count else "cpu"
    if name == "cpu":
        return "cpu"
    if not cuda_count:
        raise ValueError(f"--device {requested}: CUDA is not available here; use --device cpu (or auto)")
    given = name.partition(":")[2]
    if "RANK" in env and given:
        raise ValueError(f"--device {name} under torchrun would put every process on GPU {given}: use --device cuda "
                         f"(process r takes GPU LOCAL_RANK); choose the GPUs with CUDA_VISIBLE_DEVICES")
    index = int(env.get("LOCAL_RANK", 0)) if "RANK" in env else int(given or 0)
    if index >= cuda_count:
        what = f"LOCAL_RANK {index}" if "RANK" in env else f"--device {name}"
        raise ValueError(f"{what}: only {cuda_count} GPU(s) visible (cuda:0..cuda:{cuda_count - 1}); "
                         f"start fewer processes or give another index")
    return f"cuda:{index}"


def setup_device(config):
    """(rank, world_size, device). torchrun sets RANK/LOCAL_RANK/WORLD_SIZE; a plain run is rank 0 of 1. The
    process group waits up to 2 hours: only rank 0 decodes the dev set, while the others wait at a barrier."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device = torch.device(choose_device(config.device, os.environ, cuda_count))
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for any float32 matmul left outside autocast
        torch.backends.cudnn.allow_tf32 = True
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=2))
    return rank, world_size, device


def pick_dtype(config, device):
    """bf16 autocast on CUDA where supported, else fp16 (with a GradScaler, and T5's fp16 clamp); fp32 on CPU."""
    if config.dtype != "auto":
        return getattr(torch, config.dtype)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def setup(config):
    """(device, dtype, autocast) of a single-process command (evaluate, bench)."""
    _, _, device = setup_device(config)
    dtype = pick_dtype(config, device)
    return device, dtype, torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def human(n):
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n:,}"


def forward_backward(model, micro_batches, autocast, scaler, micro_steps=0, world_size=1):
    """The gradient-accumulation half of a step: forward and backward of each (src, labels, weight) micro-batch,
    its loss times its weight (the weights sum to 1), so the summed gradients are those of the whole batch.
    Under DDP (micro_steps of this rank given) the gradients are all-reduced only on the last micro-step.
    Returns the step's loss as a tensor (reading it waits for the device)."""
    loss_sum = 0.0
    for micro_step, (src, labels, weight) in enumerate(micro_batches):
        if world_size > 1:
            model.require_backward_grad_sync = micro_step == micro_steps - 1
        with autocast:
            _, loss = model(src, labels)
            loss = loss * weight
        loss_sum = loss_sum + loss.detach()
        scaler.scale(loss).backward()
    return loss_sum


def optimizer_step(model, optimizer, scaler, grad_clip):
    """The other half: clip the global gradient norm, update, clear the gradients."""
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)  # in fp16 the scaler skips a step whose gradients overflowed, then lowers its scale
    scaler.update()
    optimizer.zero_grad(set_to_none=True)  # None, not zeros: the next backward writes instead of adding


def train(config):
    """One run: data, model, the AMP + gradient-accumulation loop, evaluations with early stopping on dev JGA,
    and a final test evaluation of the best checkpoint."""
    rank, world_size, device = setup_device(config)
    master = rank == 0                      # only rank 0 logs, writes files and evaluates
    log = print if master else (lambda *args, **kwargs: None)
    accum = validate(config, world_size)
    dtype = pick_dtype(config, device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # fp16 only: bf16 has fp32's range
    torch.manual_seed(config.seed)          # the same initial weights on every rank (DDP broadcasts rank 0's too)
    out_dir = Path(config.out_dir)
    meta, sp = read_meta(config.data_dir)
    train_data = load_split(config, config.train_split, meta, train=True)
    val_data = load_split(config, config.val_split, meta)
    if config.eval_examples:
        val_data["rows"] = val_data["rows"][:config.eval_examples]
    rows, slots = train_data["rows"], eval_slots(config)
    steps_per_epoch = math.ceil(len(rows) / config.batch_size)
    config, total_steps, plan = plan_schedule(len(rows), config)  # the run's length, warmup and evaluations
    log(plan)
    log(f"data: {len(rows):,} training turns of {config.train_split} ({steps_per_epoch} steps per epoch), "
        f"{len(val_data['rows']):,} turns of {config.val_split} per evaluation, {len(slots)} slots scored")
    if config.warmup_iters >= total_steps:  # e.g. the seed's 1 epoch on a small training set
        log(f"note: --warmup_iters {config.warmup_iters} >= the run's {total_steps} steps: the LR never reaches "
            f"--learning_rate {config.learning_rate}")

    folder = Path(config.data_dir)
    data = {name: fingerprint(folder / name) for name in (f"{config.train_split}.src.bin",
                                                          f"{config.train_split}.tgt.bin")}
    checkpoint = None
    if config.resume:
        checkpoint = check_resume(load_checkpoint(out_dir / "ckpt.pt", resume=True), config, data, out_dir / "ckpt.pt")
    elif (out_dir / "ckpt.pt").exists():
        raise ValueError(f"{out_dir / 'ckpt.pt'} exists from an earlier run: continue it with --resume, or choose "
                         f"another --out_dir (nothing is overwritten)")
    model = build_model(config, meta, checkpoint, out_dir / "ckpt.pt").to(device)
    torch.manual_seed(config.seed + rank)   # dropout masks differ between ranks (as nanoGPT)
    optimizer = model.configure_optimizers(config.weight_decay, config.learning_rate, (config.beta1, config.beta2),
                                           config.eps, device.type)
    state = dict(step=0, tokens_seen=0, train_time_s=0.0, best_jga=-1.0, best_val_loss=math.inf, best_step=0,
                 bad_evals=0, stopped=False)
    if master:
        out_dir.mkdir(parents=True, exist_ok=True)
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        if checkpoint["scaler"]:  # empty from a run without fp16: --dtype float16 now starts a fresh scale
            scaler.load_state_dict(checkpoint["scaler"])
        state.update(checkpoint["state"])
        restore_rng(checkpoint, rank, world_size, device, config.seed + rank + state["step"], log)
        if master:
            trim_log(out_dir / "log.jsonl", state["step"])
        log(f"resumed from {out_dir / 'ckpt.pt'} at step {state['step']:,} (best dev JGA so far "
            f"{state['best_jga']:.2%}, {state['bad_evals']} evaluation(s) without improvement)")
    elif master:
        write_text(out_dir / "log.jsonl", "")
    train_model = torch.compile(model, dynamic=True) if config.compile else model  # batches vary in length
    if world_size > 1:
        train_model = DDP(train_model, device_ids=[device.index] if device.type == "cuda" else None)
    log(f"model: T5 {model.num_params() / 1e6:.2f}M parameters, {asdict(model.config)}")
    log(f"batch: {config.batch_size} examples = {config.micro_batch_size} (micro-batch) x {accum} (accumulation) x "
        f"{world_size} (processes); {total_steps:,} steps; device {device}, dtype {str(dtype).removeprefix('torch.')}")

    while state["step"] < total_steps and not state["stopped"]:
        step = state["step"]
        lr = get_lr(step, total_steps, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        t0 = time.time()
        batch = batch_rows(step, config.seed, rows, config.batch_size)
        train_data["epoch"] = step // steps_per_epoch  # --shuffle_domains: each epoch its own domain orders
        src_tokens, tgt_tokens = token_counts(train_data, batch, config)
        train_model.train()
        # each micro-batch weighted by its share of the step's target tokens: the step's loss is the mean over all
        # its target tokens, however the batch is cut (the seed's "loss / accumulation steps" for equal-sized ones)
        # Under DDP rank r takes the r-th contiguous slice; DDP averages the ranks' gradients, so the weights are
        # multiplied by world_size. A rank left without rows (a short last batch) runs one row at weight 0, so that
        # every rank meets the gradient all-reduce.
        mine = batch[rank * len(batch) // world_size:(rank + 1) * len(batch) // world_size]
        micros = [(m, token_counts(train_data, m, config)[1] / tgt_tokens * world_size)
                  for m in (mine[i:i + config.micro_batch_size] for i in range(0, len(mine), config.micro_batch_size))]
        micros = micros or [(batch[:1], 0.0)]
        micro_batches = ((*get_batch(train_data, micro, config, device), weight) for micro, weight in micros)
        loss = forward_backward(train_model, micro_batches, autocast, scaler, len(micros), world_size)
        if world_size > 1:  # the logged loss is the batch's (gloo has no AVG: SUM, then divide)
            dist.all_reduce(loss)
            loss /= world_size
        lossf = loss.item()
        if not math.isfinite(lossf):
            raise FloatingPointError(f"loss is {lossf} at step {step:,} (lr {lr:.2e}): stopped before updating; the "
                                     f"last good checkpoint {out_dir / 'ckpt.pt'} is kept. Resume it with a lower "
                                     f"--learning_rate or another --dtype")
        optimizer_step(model, optimizer, scaler, config.grad_clip)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.time() - t0
        state["step"] = step = step + 1
        state["tokens_seen"] += src_tokens + tgt_tokens
        state["train_time_s"] += dt
        if master:
            append_jsonl(out_dir / "log.jsonl", {"step": step, "loss": lossf, "lr": lr,
                                                 "tokens": state["tokens_seen"], "dt": dt})
        if step % config.log_interval == 0 or step in (1, total_steps):
            log(f"step {step:,}/{total_steps:,} | epoch {(step - 1) // steps_per_epoch} | loss {lossf:.4f} | "
                f"lr {lr:.2e} | tokens {human(state['tokens_seen'])} | {dt * 1000:.1f} ms | "
                f"{(src_tokens + tgt_tokens) / dt:,.0f} tok/s")
        due = step % config.eval_interval == 0 if config.eval_interval else step % steps_per_epoch == 0
        run = {"model_config": asdict(model.config), "config": asdict(config), "spm_sha256": meta["spm"]["sha256"]}
        if due or step == total_steps:
            if master:  # the others wait at the broadcast of the outcome
                val_loss = estimate_loss(model, val_data, config, autocast, device)
                if not math.isfinite(val_loss):  # the last update broke the weights: save neither best.pt nor ckpt
                    raise FloatingPointError(f"validation loss is {val_loss} after step {step:,}: the weights "
                                             f"diverged; the last good checkpoint {out_dir / 'ckpt.pt'} is kept. "
                                             f"Resume it with a lower --learning_rate or another --dtype")
                metrics, records = evaluate(model, val_data, config, sp, autocast, device, slots,
                                            f"eval {config.val_split}", val_loss)
                # best = highest dev JGA; between equal JGAs (all 0 early on; always for summaries) the lower loss
                improved = (metrics.get("jga", 0.0), -val_loss) > (state["best_jga"], -state["best_val_loss"])
                if improved:
                    state.update(best_jga=metrics.get("jga", 0.0), best_val_loss=val_loss, best_step=step,
                                 bad_evals=0)
                else:
                    state["bad_evals"] += 1
                state["stopped"] = config.patience > 0 and state["bad_evals"] >= config.patience
                best = (f"trade jga {state['best_jga']:.2%}" if "jga" in metrics
                        else f"val loss {state['best_val_loss']:.4f}")
                log(f"eval step {step:,} | val loss {val_loss:.4f} | {format_metrics(metrics)} | best {best} "
                    f"(step {state['best_step']:,})")
                for r in records[:3]:
                    log(f"  gold: {r['gold_summary']}\n  pred: {r['gen_summary']}")
                append_jsonl(out_dir / "log.jsonl", {"step": step, "val_loss": val_loss, **metrics})
                if improved:  # best.pt first: a crash before ckpt.pt is rewritten replays this evaluation
                    save_checkpoint(out_dir / "best.pt", {"model": model.state_dict(), "step": step,
                                                          "metrics": metrics, "val_loss": val_loss, **run})
                if state["stopped"]:
                    log(f"early stop: no better dev score in {config.patience} evaluations")
            if world_size > 1:  # the best score, the patience count and the early stop, the same on every rank
                shared = [state]
                dist.broadcast_object_list(shared, src=0)
                state.update(shared[0])
        if due or step in (total_steps, config.stop_step):
            rng = rng_states(device, world_size)  # every rank takes part; rank 0 writes
        if master and (due or step in (total_steps, config.stop_step)):
            save_checkpoint(out_dir / "ckpt.pt", {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "state": dict(state),  # step (the data position too: epoch, batch = divmod(step, steps per epoch)),
                "epoch": step // steps_per_epoch, "position": step % steps_per_epoch,  # best JGA, patience count
                "rng": rng, "data": data, **run})
        if step == config.stop_step and step < total_steps:
            log(f"stopped at --stop_step {step}; continue with --resume")
            if world_size > 1:  # every rank leaves together: gloo aborts a process whose peer tears down early
                dist.barrier()
            return None

    if not master:  # rank 0 tests the best checkpoint; the others wait for it, then all leave together
        dist.barrier()
        return None
    best = load_checkpoint(out_dir / "best.pt")
    model.load_state_dict(best["model"])
    test_data = load_split(config, config.test_split, meta)
    if config.test_examples:
        test_data["rows"] = test_data["rows"][:config.test_examples]
    metrics, records = evaluate(model, test_data, config, sp, autocast, device, slots, f"test {config.test_split}")
    write_results(out_dir, config.test_split, metrics, records,
                  {"checkpoint": str(out_dir / "best.pt"), "step": best["step"], "val_jga": best["metrics"].get("jga"),
                   "val_loss": best["val_loss"], "train_time_s": state["train_time_s"], "config": asdict(config)})
    log(f"test {config.test_split} (best.pt, step {best['step']:,}, dev val loss {best['val_loss']:.4f}): "
        f"{format_metrics(metrics)}")
    if world_size > 1:
        dist.barrier()
    return metrics


# ----------------------------------------------------------------------------------------------------------------
# Evaluation: validation loss; decode -> summary -> state (inverse rules) -> JGA

def eval_slots(config):
    """The slots scored: a held-out domain's own in cross-domain fine-tuning (only_domain), all others when
    pre-training without it (except_domain), else all 30."""
    if config.only_domain:
        return [s for s in SLOTS if s.startswith(config.only_domain + "-")]
    return [s for s in SLOTS if not (config.except_domain and s.startswith(config.except_domain + "-"))]


@torch.no_grad()
def estimate_loss(model, data, config, autocast, device):
    """Mean loss per target token over the evaluated rows, with teacher forcing as in training."""
    model.eval()
    rows, total, count = data["rows"], 0.0, 0
    for i in range(0, len(rows), config.eval_batch_size):
        src, labels = get_batch(data, rows[i:i + config.eval_batch_size], config, device)
        with autocast:
            _, loss = model(src, labels)
        n = int((labels != -100).sum())
        total, count = total + loss.item() * n, count + n
    return total / count


def decode_summary(sp, ids):
    """The text of generated ids up to EOS; ids outside the SentencePiece vocabulary (T5's padding rows) drop out."""
    ids = ids[:ids.index(EOS_ID)] if EOS_ID in ids else ids
    return sp.decode([i for i in ids if PAD_ID < i < sp.get_piece_size()])


def progress(label, done, total, start, every=10.0):
    """One line with the rate and ETA, at most every `every` seconds and once at the end."""
    now = time.time()
    if done == total or now - progress.last >= every:
        progress.last, rate = now, done / max(now - start, 1e-9)
        print(f"{label}: {done:,}/{total:,} turns | {rate:,.1f} turns/s | eta {(total - done) / rate:.0f}s")
progress.last = 0.0


@torch.no_grad()
def decode_rows(model, data, rows, config, device, autocast, num_beams, label="", fast=True):
    """{row: generated ids up to and with EOS} for these rows, eval_batch_size at a time. fast: batches of similar
    source lengths (sorted, longest first: little padding), each stopping once all its rows wrote EOS; otherwise
    the plain loop, batches in row order, each decoded to max_new_tokens (bench compares the two; same outputs)."""
    order = rows[np.argsort(-data["idx"][rows, 1], kind="stable")] if fast else rows
    generated, start = {}, time.time()
    for i in range(0, len(order), config.eval_batch_size):
        chunk = order[i:i + config.eval_batch_size]
        src, _ = get_batch(data, chunk, config, device)
        with autocast:
            out = model.generate(src, config.max_new_tokens, num_beams, config.length_penalty,
                                 min_new_tokens=config.min_new_tokens, early_stopping=config.early_stopping,
                                 stop_when_done=fast)
        generated.update((int(row), ids[:ids.index(EOS_ID) + 1] if EOS_ID in ids else ids)
                         for row, ids in zip(chunk, out.tolist()))
        if label:
            progress(label, i + len(chunk), len(order), start)
    return generated


@torch.no_grad()
def evaluate(model, data, config, sp, autocast, device, slots, label, loss=None):
    """Generate a summary for every row, read it back into a state with the inverse rules, and score the states
    against the gold ones. Returns (metrics, records), one record per turn in row order. Summarization data (the
    warm start) has no states: its score is the teacher-forced loss (`loss` when the caller has it already)."""
    model.eval()
    summarize = data["task"] == "summarization"  # no states to score: loss only (ROUGE-free), 3 summaries shown
    rows = data["rows"][:3] if summarize else data["rows"]
    # the test split decodes as DS2 tests (--test_num_beams, 10 in --preset paper), validation with --num_beams
    beams = config.test_num_beams or config.num_beams if data["split"] == config.test_split else config.num_beams
    generated = decode_rows(model, data, rows, config, device, autocast, beams, label)
    summaries = {row: decode_summary(sp, ids) for row, ids in generated.items()}
    records = []
    for row in rows:
        ex, summary = data["examples"][row], summaries[int(row)]
        records.append(dict(dialogue_id=ex["dialogue_id"], turn=ex["turn"], gold_state=ex["state"],
                            pred_state=summary_to_state(summary), gold_summary=ex["summary"], gen_summary=summary))
    if summarize:
        loss = estimate_loss(model, data, config, autocast, device) if loss is None else loss
        return {"summary_loss": loss, "n_turns": len(data["rows"])}, records
    preds, golds = [r["pred_state"] for r in records], [r["gold_state"] for r in records]
    metrics = compute_metrics(preds, golds, slots)  # the trade scoring at the top level (early stopping reads it)
    metrics["ds2"] = compute_metrics_ds2(preds, golds, [data["examples"][row]["domains"] for row in rows], slots)
    metrics["summary_em"] = sum(r["gen_summary"] == r["gold_summary"] for r in records) / len(records)
    return metrics, records


def format_metrics(m):
    if "jga" not in m:
        return f"summary loss {m['summary_loss']:.4f} | {m['n_turns']:,} examples (no states: scored by the loss)"
    domains = ", ".join(f"{d} {v:.1%}" for d, v in m["per_domain_jga"].items())
    line = (f"trade scoring: jga {m['jga']:.2%} | slot acc {m['slot_acc']:.2%} | slot f1 {m['slot_f1']:.2%} | "
            f"per-domain jga: {domains or '-'}")
    if "ds2" in m:
        d2 = m["ds2"]
        domains = ", ".join(f"{d} {v:.1%}" for d, v in d2["per_domain_jga"].items())
        line += (f" || ds2 scoring: jga {d2['jga']:.2%} | slot acc {d2['slot_acc']:.2%} | per-domain jga: "
                 f"{domains or '-'}")
    return line + f" || summary em {m['summary_em']:.2%} | {m['n_turns']:,} turns"


def write_results(out_dir, split, metrics, records, extra):
    """{split}_predictions.jsonl (per turn: ids, gold and predicted state and summary) and {split}_metrics.json."""
    write_text(out_dir / f"{split}_predictions.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    write_text(out_dir / f"{split}_metrics.json", json.dumps({"split": split, **metrics, **extra}, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# Protocols: the paper's experiments as runs of `train` (a subprocess and a folder each), then one table

PROTOCOL_KEYS = ("ratios", "seeds", "domains", "report_only")


def protocol_lists(config):
    """(ratios, seeds, domains) of --ratios, --seeds, --domains, checked."""
    try:
        ratios, seeds = [float(r) for r in config.ratios.split(",")], [int(x) for x in config.seeds.split(",")]
    except ValueError:
        raise ValueError(f"--ratios and --seeds take comma-separated numbers (--ratios 0.01,0.05 --seeds 1,2), got "
                         f"{config.ratios!r} and {config.seeds!r}") from None
    domains = config.domains.split(",")
    if not all(0 < r <= 1 for r in ratios) or not set(domains) <= set(DOMAINS):
        raise ValueError(f"--ratios must lie in (0, 1] (DS2: 0.01,0.05,0.1) and --domains among "
                         f"{','.join(DOMAINS)}, got {config.ratios!r} and {config.domains!r}")
    return ratios, seeds, domains


def protocol_runs(command, config):
    """[(run name, table keys, flags)] in running order. fewshot (multi-domain): every ratio x seed on all
    dialogues, scored on all 30 slots. crossdomain, per domain X: stage 1 on the dialogues without X
    (--except_domain), then every ratio x seed fine-tuned from its best.pt on a sample of X's dialogues, scored on
    X's slots (--only_domain). The few-shot sample and the training seed both follow the run's seed."""
    ratios, seeds, domains = protocol_lists(config)
    grid = [(r, s, {"fewshot": r, "fewshot_seed": s, "seed": s}) for r in ratios for s in seeds]
    if command == "fewshot":
        return [(f"{r:g}_{s}", dict(domain="all", ratio=r, seed=s, stage=2), flags) for r, s, flags in grid]
    runs = []
    for d in domains:
        stage1 = str(Path(config.out_dir) / f"{d}_pretrain" / "best.pt")
        runs.append((f"{d}_pretrain", dict(domain=d, ratio=1.0, seed=config.seed, stage=1), {"except_domain": d}))
        runs += [(f"{d}_{r:g}_{s}", dict(domain=d, ratio=r, seed=s, stage=2),
                  {**flags, "only_domain": d, "init_from": stage1}) for r, s, flags in grid]
    return runs


def protocol_command(command, config):
    """Run the protocol's missing runs (a finished one has test_metrics.json; a started one is resumed), each as
    `python ds2.py train` with this command's config plus the run's flags, then write the report."""
    out, runs = Path(config.out_dir), protocol_runs(command, config)
    base = {k: v for k, v in asdict(config).items() if k not in PROTOCOL_KEYS}
    examples = None if config.report_only else read_examples(Path(config.data_dir) / f"{config.train_split}.jsonl")
    from data_multiwoz import select_examples
    for i, (name, _, flags) in enumerate(runs if not config.report_only else [], 1):
        run_dir = out / name
        if (run_dir / "test_metrics.json").is_file():
            print(f"{command} {i}/{len(runs)} {name}: done, kept")
            continue
        args = {**base, **flags, "out_dir": run_dir, "resume": (run_dir / "ckpt.pt").is_file()}
        run_config = dataclasses.replace(config, **{k: v for k, v in flags.items() if k != "init_from"})
        n_rows = len(select_examples(examples, run_config.fewshot, run_config.fewshot_seed, run_config.except_domain,
                                     run_config.only_domain, run_config.dialogue_filter))
        print(f"{command} {i}/{len(runs)} {name}: {plan_schedule(n_rows, run_config)[2]}")
        print(f"{command} {i}/{len(runs)} {name}: train {' '.join(f'--{k} {v}' for k, v in flags.items())}")
        argv = [sys.executable, str(Path(__file__).resolve()), "train"] + [f"--{k}={v}" for k, v in args.items()]
        if subprocess.run(argv).returncode:
            raise ValueError(f"run {run_dir} failed (its error is above); fix it and run the same command again: "
                             f"finished runs are kept, a started one is resumed")
    return protocol_report(command, runs, out)


def mean_spread(values):
    """'45.38 ± 1.20 (3)': mean and sample standard deviation over seeds, in %, and the number of runs."""
    if not values:
        return "-"
    spread = f" ± {np.std(values, ddof=1):.2f}" if len(values) > 1 else ""
    return f"{np.mean(values):.2f}{spread} ({len(values)})"


def protocol_report(command, runs, out):
    """results.jsonl (a row per finished run) and table.md (DS2's layout: a row per domain, a column per ratio)."""
    if not out.is_dir():
        raise FileNotFoundError(f"{out} not found: no runs of this protocol there (check --out_dir)")
    rows, missing = [], []
    for name, keys, _ in runs:
        path = out / name / "test_metrics.json"
        if not path.is_file():
            missing.append(name)
            continue
        m = json.loads(path.read_text())
        rows.append({"protocol": command, "run": name, **keys, **{k: m.get(k) for k in (
            "jga", "slot_acc", "slot_f1", "per_domain_jga", "n_turns", "step", "val_jga", "train_time_s")},
            **{f"ds2_{k}": m.get("ds2", {}).get(k) for k in ("jga", "slot_acc", "per_domain_jga")}})
    write_text(out / "results.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    stage2 = [row for row in rows if row["stage"] == 2]
    ratios = sorted({row["ratio"] for row in stage2})
    text = (f"# {command}: test metrics (%) of the best dev checkpoint, mean ± std over seeds (runs)\n\n"
            f"Scorings: {SCORING['trade']}; {SCORING['ds2']}.\n")
    for metric in ("jga", "slot_acc", "slot_f1", "ds2_jga", "ds2_slot_acc"):
        title = f"{metric[4:]} (ds2 scoring)" if metric.startswith("ds2_") else f"{metric} (trade scoring)"
        text += f"\n| {title} | " + " | ".join(f"{r * 100:g}%" for r in ratios) + " |\n|---|" + "---|" * len(ratios)
        for domain in dict.fromkeys(row["domain"] for row in stage2):
            cells = [mean_spread([100 * row[metric] for row in stage2 if (row["domain"], row["ratio"]) == (domain, r)
                                  and row[metric] is not None]) for r in ratios]
            text += f"\n| {domain} | " + " | ".join(cells) + " |"
        text += "\n"
    for row in rows:
        if row["stage"] == 1:
            text += (f"\nstage 1 without {row['domain']}: test jga {100 * row['jga']:.2f} (trade scoring) on the "
                     f"other domains' slots")
    text += f"\n\nmissing runs: {', '.join(missing)}\n" if missing else "\n"
    write_text(out / "table.md", text)
    print(text + f"wrote {out / 'results.jsonl'} and {out / 'table.md'}")
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Benchmark: a training step with and without SDPA + fused AdamW, decoding with and without the KV cache, beams

DECODE_BATCH, DECODE_TOKENS = 8, 64


def rss_mib():
    """Resident set size of this process (Linux /proc; nan elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


class PeakMemory:
    """Peak memory (MiB) inside a `with` block: the CUDA allocator's counter on a GPU; on a CPU the process's
    resident set size sampled every 5 ms by a thread (the kernel's ru_maxrss cannot be reset between blocks)."""

    def __init__(self, device):
        self.device, self.peak, self.running = device, 0.0, False

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak, self.running = rss_mib(), True
            self.thread = threading.Thread(target=self.sample, daemon=True)
            self.thread.start()
        return self

    def sample(self):
        while self.running:
            self.peak = max(self.peak, rss_mib())
            time.sleep(0.005)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self.running = False
            self.thread.join()
            self.peak = max(self.peak, rss_mib())


def bench_steps(config, model, device, autocast, scaler, accum):
    """Median training-step time per variant on one fixed micro-batch of bench_src_len / bench_tgt_len tokens
    (accum of them per step), the variants interleaved in every round; round 0 warms up and is not counted."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    args = (config.weight_decay, config.learning_rate, (config.beta1, config.beta2), config.eps, device.type)
    variants = {"sdpa + fused AdamW": (True, model.configure_optimizers(*args, fused=True))}
    if config.bench_plain:
        variants["plain attention + for-loop AdamW"] = (False, model.configure_optimizers(*args, fused=False))
    src = torch.randint(2, model.config.vocab_size, (config.micro_batch_size, config.bench_src_len), device=device)
    labels = torch.randint(2, model.config.vocab_size, (config.micro_batch_size, config.bench_tgt_len), device=device)
    times, peaks, started = {}, {}, time.time()
    model.train()
    for rnd in range(config.bench_repeats + 1):
        for name, (sdpa, optimizer) in variants.items():
            Attention.use_sdpa = sdpa
            with PeakMemory(device) as memory:
                for _ in range(config.bench_steps):
                    t0 = time.perf_counter()
                    forward_backward(model, [(src, labels, 1 / accum)] * accum, autocast, scaler)
                    sync()
                    t1 = time.perf_counter()
                    optimizer_step(model, optimizer, scaler, config.grad_clip)
                    sync()
                    if rnd:
                        times.setdefault(name, []).append((t1 - t0, time.perf_counter() - t1))
            peaks[name] = max(peaks.get(name, 0.0), memory.peak)
        print(f"bench: round {rnd}/{config.bench_repeats} done ({'warm-up, ' if not rnd else ''}"
              f"{time.time() - started:,.0f} s)", flush=True)
    for name, (sdpa, optimizer) in variants.items() if config.bench_profile else ():  # where the time goes
        Attention.use_sdpa = sdpa
        with torch.profiler.profile() as prof:
            forward_backward(model, [(src, labels, 1 / accum)] * accum, autocast, scaler)
            optimizer_step(model, optimizer, scaler, config.grad_clip)
        print(f"\nprofile of one step, {name} (top operators by own time):")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    Attention.use_sdpa = True
    tokens = config.batch_size * (config.bench_src_len + config.bench_tgt_len)
    rows = []
    for name, ts in times.items():
        step = float(np.median([sum(t) for t in ts]))
        rows.append(dict(variant=name, examples=config.batch_size, src_len=config.bench_src_len,
                         tgt_len=config.bench_tgt_len, step_ms=step * 1e3,
                         fwd_bwd_ms=float(np.median([t[0] for t in ts])) * 1e3,
                         update_ms=float(np.median([t[1] for t in ts])) * 1e3, tokens_per_s=tokens / step,
                         peak_mib=peaks[name], samples=len(ts)))
    return rows


@torch.no_grad()
def bench_decode(config, model, device):
    """ms per new token of greedy decoding (batch 8, 64 new tokens, the encoder pass not counted) with the KV cache
    vs recomputing the whole prefix every token: the decoding loop of generate(), run to full length (random
    weights would stop at an early EOS); alternated, medians. Then beam search: ms per token and encoder rows."""
    model.eval()
    src = torch.randint(2, model.config.vocab_size, (DECODE_BATCH, config.bench_src_len), device=device)
    enc_out = model.encode(src)
    times = {True: [], False: []}
    for rnd in range(config.bench_repeats + 1):
        for use_cache in times:
            cache = model.new_cache() if use_cache else None
            seqs = torch.full((DECODE_BATCH, 1), PAD_ID, dtype=torch.long, device=device)
            t0 = time.perf_counter()
            for _ in range(DECODE_TOKENS):
                token = model.next_logits(seqs, enc_out, src, cache).argmax(-1)
                seqs = torch.cat([seqs, token[:, None]], dim=1)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if rnd:
                times[use_cache].append((time.perf_counter() - t0) / DECODE_TOKENS * 1e3)
    cached, recomputed = (float(np.median(times[c])) for c in (True, False))
    encoded = []  # rows through the encoder during beam search: B, not B x beams (the beams share it)
    encode = model.encode
    model.encode = lambda s: (encoded.append(s.size(0)), encode(s))[1]
    t0 = time.perf_counter()
    out = model.generate(src, DECODE_TOKENS, num_beams=4)
    beam_ms = (time.perf_counter() - t0) / max(out.size(1), 1) * 1e3
    del model.encode
    return dict(batch=DECODE_BATCH, src_len=config.bench_src_len, new_tokens=DECODE_TOKENS,
                cache_ms_per_token=cached, recompute_ms_per_token=recomputed, speedup=recomputed / cached,
                beam4_ms_per_token=beam_ms, beam4_tokens=out.size(1), beam4_encoder_rows=sum(encoded))


@torch.no_grad()
def bench_eval(config, model, device, autocast):
    """Evaluation decoding in turns/s: decode_rows' batches sorted by source length that stop once their rows are
    done, vs the plain loop over unsorted batches of the same size (eval_batch_size) run to max_new_tokens. The
    turns are the first bench_eval_turns of --split in --data_dir when it holds a data folder (with the model of
    --init_from, a checkpoint that writes EOS, the stopping counts), else random sources of 20-800 tokens. Greedy
    unless --num_beams; the outputs must be identical (RuntimeError otherwise). Median of bench_repeats rounds."""
    model.eval()
    if (Path(config.data_dir) / "meta.json").is_file():
        meta, _ = read_meta(config.data_dir)
        data = load_split(config, config.split, meta)
        where = f"{config.bench_eval_turns} turns of {Path(config.data_dir) / config.split}"
    else:  # no data: random sources with MultiWOZ's spread of lengths, 2-token targets (labels are not used)
        g = np.random.default_rng(config.seed)
        lengths = g.integers(20, 800, config.bench_eval_turns)
        src = np.concatenate([np.append(g.integers(2, model.config.vocab_size, n - 1), EOS_ID) for n in lengths])
        idx = np.stack([np.cumsum(lengths) - lengths, lengths, 2 * np.arange(len(lengths)), np.full_like(lengths, 2)], 1)
        data = dict(idx=idx, src=src.astype(np.int64), tgt=np.tile([3, EOS_ID], len(lengths)))
        config.max_src_len = config.max_src_len or MAX_SOURCE_TOKENS
        where = f"{config.bench_eval_turns} random sources of 20-800 tokens"
    rows = np.arange(min(config.bench_eval_turns, len(data["idx"])))
    times, outputs = {True: [], False: []}, {}
    for rnd in range(config.bench_repeats + 1):  # round 0 warms up
        for fast in times:
            t0 = time.perf_counter()
            outputs[fast] = decode_rows(model, data, rows, config, device, autocast, config.num_beams, fast=fast)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if rnd:
                times[fast].append(time.perf_counter() - t0)
    if outputs[True] != outputs[False]:
        raise RuntimeError("bench: sorted batches that stop early decoded other tokens than the plain loop")
    fast, plain = (len(rows) / float(np.median(times[f])) for f in (True, False))
    return dict(turns=len(rows), where=where, batch=config.eval_batch_size, num_beams=config.num_beams,
                max_new_tokens=config.max_new_tokens, mean_new_tokens=float(np.mean([len(o) for o in
                outputs[True].values()])), sorted_stop_turns_per_s=fast, plain_turns_per_s=plain,
                speedup=fast / plain, identical=True)


def bench(config):
    """Print the benchmark tables and write out_dir/bench_ds2.json (see README, Performance)."""
    accum = validate(config)
    device, dtype, autocast = setup(config)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    torch.manual_seed(config.seed)
    model = T5(T5Config(**{k: getattr(config, k) for k in MODEL_KEYS})).to(device)
    load = os.getloadavg()
    print(f"bench: T5 {model.num_params() / 1e6:.2f}M, {config.batch_size} examples per step "
          f"({config.micro_batch_size} x {accum}) of {config.bench_src_len} source + {config.bench_tgt_len} target "
          f"tokens, device {device}, dtype {str(dtype).removeprefix('torch.')}, {torch.get_num_threads()} threads, "
          f"load average {load[0]:.2f}", flush=True)
    result = {"device": str(device), "dtype": str(dtype), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "loadavg_start": load, "config": asdict(config),
              "steps": bench_steps(config, model, device, autocast, scaler, accum)}
    print("\n| variant | step ms | fwd+bwd ms | update ms | tokens/s | peak MiB |\n|---|---|---|---|---|---|")
    for r in result["steps"]:
        print(f"| {r['variant']} | {r['step_ms']:,.1f} | {r['fwd_bwd_ms']:,.1f} | {r['update_ms']:,.1f} | "
              f"{r['tokens_per_s']:,.0f} | {r['peak_mib']:,.0f} |")
    if len(result["steps"]) == 2:
        fast, slow = result["steps"]
        print(f"sdpa + fused AdamW is {slow['step_ms'] / fast['step_ms']:.2f}x as fast as the plain version "
              f"(fwd+bwd {slow['fwd_bwd_ms'] / fast['fwd_bwd_ms']:.2f}x, update {slow['update_ms'] / fast['update_ms']:.2f}x)")
    result["decode"] = d = bench_decode(config, model, device)
    print(f"greedy decoding, batch {d['batch']}, {d['new_tokens']} new tokens: {d['cache_ms_per_token']:.2f} ms/token "
          f"with the KV cache, {d['recompute_ms_per_token']:.2f} recomputing ({d['speedup']:.1f}x); beam search (4 "
          f"beams): {d['beam4_ms_per_token']:.2f} ms/token, {d['beam4_encoder_rows']} encoder rows for "
          f"{d['batch']} examples")
    if config.init_from != "scratch":  # a trained model for the evaluation decoding: its EOS makes batches stop
        meta, _ = read_meta(config.data_dir)
        model = build_model(config, meta).to(device)
    result["eval_decode"] = e = bench_eval(config, model, device, autocast)
    print(f"evaluation decoding, {e['where']}, batches of {e['batch']}, {e['num_beams']} beam(s), up to "
          f"{e['max_new_tokens']} new tokens (mean {e['mean_new_tokens']:.1f}): {e['sorted_stop_turns_per_s']:.1f} "
          f"turns/s sorted by length and stopping when done, {e['plain_turns_per_s']:.1f} turns/s in the plain loop "
          f"({e['speedup']:.2f}x), identical outputs")
    result["loadavg_end"] = os.getloadavg()
    out = Path(config.out_dir) / "bench_ds2.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {out} (load average at the end {result['loadavg_end'][0]:.2f})")
    return result


# ----------------------------------------------------------------------------------------------------------------
# Main

def evaluate_command(config):
    """`evaluate`: score --init_from (a ds2.py checkpoint or a Hugging Face folder; default out_dir/best.pt)
    on --split."""
    device, _, autocast = setup(config)
    meta, sp = read_meta(config.data_dir)
    if config.init_from == "scratch":
        config = dataclasses.replace(config, init_from=str(Path(config.out_dir) / "best.pt"))
    model = build_model(config, meta).to(device)
    data = load_split(config, config.split, meta)
    metrics, records = evaluate(model, data, config, sp, autocast, device, eval_slots(config),
                                f"evaluate {config.split}")
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_results(out_dir, config.split, metrics, records, {"checkpoint": config.init_from, "config": asdict(config)})
    print(f"{config.split} ({config.init_from}): {format_metrics(metrics)}")
    return metrics


def roundtrip_command(config):
    """`roundtrip`: the share of a split's gold states that come back exactly from state -> summary -> state: the
    ceiling of any model read through the templates (DS2's own converter: 91.3% on MultiWOZ 2.1 test)."""
    path = Path(config.data_dir) / f"{config.split}.jsonl"
    states = [ex["state"] for ex in read_examples(path)]
    try:
        failures = roundtrip(states)
    except ValueError:  # a state the templates cannot write (an unknown slot, an empty value): name its line
        for line_no, state in enumerate(states, 1):
            try:
                check_state(state)
            except ValueError as e:
                raise ValueError(f"{path} line {line_no}: {e}") from None
        raise
    for i, state, summary, parsed in failures:
        print(f"FAIL example {i}: {json.dumps(state)}\n  summary: {summary}\n  parsed:  {json.dumps(parsed)}")
    exact = len(states) - len(failures)
    print(f"round trip {config.split}: {exact:,}/{len(states):,} states exact = {exact / max(1, len(states)):.3%}")
    return exact / max(1, len(states))


def usage():
    """--help: the commands, every Config key with its default and the comment beside it, the presets."""
    lines, source = [], inspect.getsource(Config).splitlines()[2:]
    for line in source:
        field = re.match(r"\s+(\w+): \w+ = (.+?)(?:\s+# (.*))?$", line)
        if field:
            lines.append(f"  --{field[1]:<24} {field[2]:<14} {field[3] or ''}".rstrip())
        elif line.startswith("    #"):  # a section heading of Config
            lines.append(f"  [{line.strip().lstrip('# ')}]")
        elif line.strip().startswith("#") and lines:  # a comment line of its own: the field it continues
            lines.append(" " * 43 + line.strip().lstrip("# "))
    examples = __doc__.strip().splitlines()[0]
    return "\n".join([examples, "", f"usage: python {Path(__file__).name} [{'|'.join(COMMANDS)}] [--key=value ...]"
                      f" (also --key value; a bare --flag means true; --preset NAME first: "
                      f"{', '.join(PRESETS)})", "", "keys (default, then what it is):", *lines])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        print(usage())
        return 0
    if hasattr(sys.stdout, "reconfigure"):  # log lines appear as they happen, also in a file or a pipe
        sys.stdout.reconfigure(line_buffering=True)
    command = config = None
    try:
        command, config = parse_args(argv)
        if command in ("fewshot", "crossdomain"):
            protocol_command(command, config)
        else:
            {"train": train, "evaluate": evaluate_command, "roundtrip": roundtrip_command,
             "bench": bench}[command](config)
    except BrokenPipeError:             # the reader of our output went away (`... | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (ValueError, OSError) as e:  # the user's input or the file system: one line, no traceback
        print(f"error: {os_error_line(e) if isinstance(e, OSError) else e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:     # the run diverged
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:           # Ctrl-C: say what is intact and how to go on
        print(f"\ninterrupted: {interrupted_line(command, config)}", file=sys.stderr)
        return 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


OS_REMEDIES = {errno.EROFS: "the file system is read-only: choose another --out_dir",
               errno.ENOSPC: "the disk is full: free space, then continue with --resume",
               errno.EDQUOT: "the disk quota is used up: free space, then continue with --resume",
               errno.EACCES: "permission denied: choose a path you can write and read",
               errno.EPERM: "not permitted: choose a path you can write and read",
               errno.EEXIST: "a file stands where a folder is needed: choose another path",
               errno.ENOTDIR: "a file stands where a folder is needed: choose another path",
               errno.EISDIR: "a folder stands where a file is needed: choose another path",
               errno.ENOENT: "not found: check the path"}


def os_error_line(e):
    """An OSError as one line: the path, the cause, what to do (our own messages pass unchanged)."""
    if e.filename is None:
        return str(e)
    path = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 else "")
    return f"{path}: {e.strerror}; {OS_REMEDIES.get(e.errno, 'check the path and the disk')}"


def interrupted_line(command, config):
    """What Ctrl-C left behind: the checkpoint that is intact (read lazily: a memory map, not the weights)."""
    if command in ("fewshot", "crossdomain"):
        return "finished runs are kept and an interrupted one resumes: run the same command again"
    if command != "train" or config is None:
        return "nothing was written"
    path = Path(config.out_dir) / "ckpt.pt"
    try:
        step = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["state"]["step"]
    except Exception:  # no checkpoint yet, or one that cannot be read: say so, never a second traceback
        return f"no checkpoint was written yet ({path}); start the run again"
    return f"{path} (step {step:,}) is intact: continue with the same command and --resume"


if __name__ == "__main__":
    sys.exit(main())
