"""
Staged sequence-length training of GPT-2, one epoch, in one file (raw PyTorch, no framework).

The method (seed 002, "How does Staged Sequence Training Interact with One Epoch Training?"): train GPT-2 124M
for one epoch over OpenWebText, 512 sequences per optimizer step. For the first `stage_frac` of the steps every
sequence is cut to its first `stage_len` tokens (128), keeping the number of sequences per step; after that the
full context (1024). Experiment 2 (`--match_tokens`) appends full-context steps until the tokens seen equal the
baseline's. The file reads top to bottom: config -> model -> the staged plan -> data -> LR schedule -> checkpoints
-> training loop -> evaluation -> main.

Data: `data_dir/train.bin`, `val.bin` (uint16 GPT-2 token ids, <|endoftext|> after every document) and
`meta.json`, as written by data_owt.py. Sample i of a bin is tokens [i*block_size, i*block_size + block_size + 1).

    python gpt_staged.py plan --stage_frac 0.25 --num_samples 12574161    # the seed's arithmetic, no data needed
    python gpt_staged.py                                                   # baseline: 1024 all the way
    python gpt_staged.py --stage_frac 0.25                                 # Experiment 1
    python gpt_staged.py --stage_frac 0.25 --match_tokens                  # Experiment 2
    torchrun --standalone --nproc_per_node 8 gpt_staged.py --stage_frac 0.25   # DDP: NCCL on GPUs, gloo on CPU
    python gpt_staged.py --preset cpu --data_dir data/gutenberg --out_dir out/cpu --stage_frac 0.25   # CPU, minutes
    python gpt_staged.py --preset cpu --data_dir data/gutenberg --out_dir out/cpu --stage_frac 0.25 --resume
    python gpt_staged.py --init_from path/to/gpt2 --stage_frac 0.25   # start from a local Hugging Face GPT-2 folder

Beyond the seed: `--stage_mode reshape` (short rows, nothing dropped), `--match_tokens --recycle` (the extra steps
re-read the truncated samples), `--stages 128:0.25,256:0.25`, `--length_warmup` (linear), `--lr_decay_by tokens`:

    python gpt_staged.py sample --ckpt out/cpu/ckpt.pt --bpe_dir ../shared/data/gpt2_bpe --prompt "Call me"  # greedy
    python gpt_staged.py ppl --init_from path/to/gpt2 --bpe_dir ../shared/data/gpt2_bpe --text_file book.txt
    python gpt_staged.py report --preset cpu --data_dir data/gutenberg --extra_val data/wikitext2/val.bin \
        --out_dir out/report      # baseline, 2nd seed, Exp 1, Exp 2 and the variants, then report.md + val_loss.png
    python gpt_staged.py bench --preset cpu --bench_runs 16   # step time per context, the staged saving, decoding

Every Config field is a flag: `--key=value` or `--key value` (a bare `--flag` means true); `--preset NAME` is
applied first. Each run writes to out_dir: ckpt.pt (latest checkpoint), log.jsonl (one row per step and per
evaluation) and results.jsonl (one row per finished run).
"""
import contextlib
import dataclasses
import difflib
import errno
import functools
import hashlib
import inspect
import io
import itertools
import json
import math
import os
import pickle
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP


# ----------------------------------------------------------------------------------------------------------------
# Configuration

@dataclass
class Config:
    # model: GPT-2 124M, the seed's "base" model
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024          # seed: n_ctx 1024
    vocab_size: int = 50304         # GPT-2's 50257 padded to a multiple of 64 for faster matmuls
    dropout: float = 0.0            # seed: no dropout
    bias: bool = True               # GPT-2 has biases in its Linear and LayerNorm layers
    init_from: str = "scratch"      # 'scratch' or a local Hugging Face GPT-2 folder (config.json + weights)
    # data and batch
    data_dir: str = "data/owt"
    batch_size: int = 512           # seed: 512 sequences per optimizer step (all processes, all micro-steps)
    micro_batch_size: int = 16      # sequences per forward/backward on one process
    gradient_accumulation_steps: int = 0  # 0 = derived: batch_size / (micro_batch_size x world_size)
    max_iters: int = 0              # 0 = one epoch: num_samples // batch_size steps (seed: one epoch)
    # the staged method
    stage_frac: float = 0.0         # share of the steps at the short context; 0 = baseline (seed Exp 1: 0.25)
    stage_len: int = 128            # seed: context 128 in the short stage, then block_size
    match_tokens: bool = False      # seed Exp 2: extra full-context steps until tokens seen = baseline's
    stage_mode: str = "truncate"    # 'truncate' (seed: drop each sample's tail) or 'reshape' (cut each sample into
                                    # block_size / context rows: tokens per step constant, nothing dropped)
    recycle: bool = False           # with match_tokens: the extra steps re-read the truncated samples at full
                                    # context (seed question 2); off = a second epoch's samples, the seed's Exp 2
    stages: str = ""                # several short stages, 'context:fraction,...' e.g. '128:0.25,256:0.25'
                                    # (seed: 128 -> 256 over 50% was ~1 PPL worse); replaces stage_frac/stage_len
    length_warmup: bool = False     # context grows linearly from stage_len to block_size over the stage_frac steps
    length_step: int = 8            # ... rounded down to a multiple of this (DeepSpeed: difficulty_step 8)
    lr_decay_by: str = "steps"      # 'steps' (seed) or 'tokens' (DeepSpeed's advice when truncating)
    # optimizer and LR schedule
    learning_rate: float = 6e-4     # peak LR (the seed does not state it; nanoGPT's value for GPT-2 124M)
    min_lr: float = 6e-5            # seed: cosine down to 10% of the peak
    warmup_iters: int = 2000        # seed: warmup from 0 to the peak over the first 2000 batches
    lr_decay_frac: float = 0.9      # seed: cosine over 90% of the remaining steps, the last 10% flat at min_lr
    weight_decay: float = 0.1       # seed: 0.1 on all weights except biases and LayerNorm
    decay_wpe: bool = True          # decay the position table like every other weight (see configure_optimizers)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0          # clip the global gradient norm; 0 = off
    # evaluation, logging, checkpoints
    eval_interval: int = 1000       # evaluate and checkpoint every this many steps (and at the end)
    eval_samples: int = 1600        # validation samples each evaluation scores, spread evenly over val.bin and
                                    # the same for any micro-batch size or process count (nanoGPT: 100 x 16)
    final_eval: str = "subset"      # 'subset' or 'full': the last evaluation scores every sample of val.bin
    log_interval: int = 10
    out_dir: str = "out"
    run_name: str = ""              # '' = derived from the stage settings
    resume: bool = False            # continue from out_dir/ckpt.pt
    stop_step: int = 0              # stop after this step with a checkpoint, continue later with --resume; 0 = off
    # system
    device: str = "auto"            # 'auto' = cuda if available, else cpu; 'cuda' = cuda:0 (under torchrun
                                    # process r uses cuda:LOCAL_RANK); 'cuda:N' = GPU N of a plain run
    dtype: str = "auto"             # 'auto' = bfloat16 on CUDA where supported, else float16; float32 on CPU
    compile: str = "auto"           # torch.compile: 'auto' = on with CUDA, off on CPU; true / false force it
    peak_flops: float = 0.0         # MFU denominator; 0 = the device's dense bf16/fp16 peak from PEAK_FLOPS
    seed: int = 1337
    num_samples: int = 0            # plan command only: samples in train.bin (0 = count them in data_dir)
    extra_val: str = ""             # a second validation bin (e.g. WikiText-2 test), evaluated beside val.bin
    # sample and ppl commands
    ckpt: str = ""                  # a checkpoint of this script (out/x/ckpt.pt); else --init_from a GPT-2 folder
    bpe_dir: str = ""               # GPT-2 BPE folder (encoder.json + vocab.bpe); '' = tiktoken's cache
    prompt: str = "\n"
    max_new_tokens: int = 100
    temperature: float = 0.0        # 0 = greedy decoding (seed question 3); else sample from softmax(logits / t)
    top_k: int = 0                  # sample among the k most likely tokens; 0 = all
    text_file: str = ""             # ppl: any UTF-8 text, tokenized on the fly
    # report command: named runs one after another, then a table and a plot
    runs: str = "baseline,exp1,exp2,recycle"  # also: reshape, two_stage, linear, tokens_lr (see report_runs)
    seeds: int = 3                  # each run with seeds seed .. seed + seeds - 1, paired across runs (same initial
                                    # weights and data order for the same seed)
    report_jobs: int = 1            # runs trained at once (independent processes; with 2, one thread each)
    report_only: bool = False       # rebuild report.md and val_loss.png from the runs' files, train nothing
    # bench command (random tokens, no data needed): timings per context, variant and decoding mode
    bench_steps: int = 2            # timed steps per variant and context in each round
    bench_repeats: int = 3          # rounds, variants and contexts interleaved in each; figures are medians
    bench_plain: bool = True        # also time plain attention + for-loop AdamW, to show what SDPA and fusing buy
    bench_runs: int = 0             # also time real baseline and staged runs (train()) of this many steps; 0 = off
    bench_decode: bool = True       # also time greedy decoding with and without the KV cache
    bench_profile: bool = False     # also print torch.profiler's top operators of one step per context


PRESETS = {
    # About 5 minutes on 2 busy cores over GPT-2 tokens of Gutenberg books; 256 and 32 keep the seed's 8:1. The
    # GPT-2 vocabulary head (50304 x 128) dominates: ~4.5 s per 256-token step, 0.3-2 s per 32-token step.
    "cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=256, stage_len=32, batch_size=8, micro_batch_size=8,
                max_iters=80, learning_rate=2e-3, min_lr=2e-4, warmup_iters=8, eval_interval=40, eval_samples=32,
                log_interval=5),
    # Seconds, for tests and for checking that a data folder works end to end.
    "smoke": dict(n_layer=2, n_head=2, n_embd=32, block_size=64, stage_len=16, batch_size=8, micro_batch_size=4,
                  max_iters=20, learning_rate=3e-3, min_lr=3e-4, warmup_iters=4, eval_interval=10, eval_samples=8,
                  log_interval=1),
}
COMMANDS = ("train", "plan", "sample", "ppl", "report", "bench")
BOOL_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
MODEL_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias")
AUTO_FLAGS = ("compile",)  # 'auto' or a bool
# Dense tensor-core bf16 (fp16 where the GPU has no bf16) peak FLOP/s by device name, first match wins: NVIDIA's
# data sheets, whose headline figures are "with sparsity", twice these. The MFU denominator (--peak_flops overrides).
PEAK_FLOPS = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("B200", 2250e12),
              ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10", 125e12), ("RTX 4090", 165e12),
              ("V100", 125e12), ("T4", 65e12))


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
        elif not has_value and (types[key] is bool or key in AUTO_FLAGS):
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
    for key in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "batch_size", "micro_batch_size",
                "eval_interval", "eval_samples", "log_interval", "length_step", "max_new_tokens", "bench_steps",
                "bench_repeats", "seeds", "report_jobs"):
        if getattr(c, key) <= 0:
            raise ValueError(f"--{key} must be positive, got {getattr(c, key)}")
    for key in ("max_iters", "warmup_iters", "gradient_accumulation_steps", "stop_step", "num_samples",
                "weight_decay", "grad_clip", "temperature", "top_k", "bench_runs"):
        if not getattr(c, key) >= 0:
            raise ValueError(f"--{key} must be >= 0, got {getattr(c, key)}")
    if c.n_embd % c.n_head:
        raise ValueError(f"--n_embd {c.n_embd} is not divisible by --n_head {c.n_head}: "
                         f"choose n_embd = n_head x head size")
    if not 0 <= c.stage_frac < 1:
        raise ValueError(f"--stage_frac must be in [0, 1) (0 = baseline; the seed's Exp 1 uses 0.25), "
                         f"got {c.stage_frac}")
    if not 0 < c.stage_len <= c.block_size:
        raise ValueError(f"--stage_len must be in 1..block_size ({c.block_size}), got {c.stage_len}")
    for key, allowed in (("stage_mode", ("truncate", "reshape")), ("lr_decay_by", ("steps", "tokens")),
                         ("final_eval", ("subset", "full"))):
        if getattr(c, key) not in allowed:
            raise ValueError(f"--{key} must be {' or '.join(allowed)}, got {getattr(c, key)!r}")
    short = parse_stages(c.stages, c.block_size) or ([(c.stage_len, c.stage_frac)] if c.stage_frac else [])
    if c.stages and c.stage_frac:
        raise ValueError("--stages replaces --stage_frac/--stage_len: give one of them")
    if c.length_warmup and not c.stage_frac:
        raise ValueError("--length_warmup grows the context over the --stage_frac steps: set --stage_frac > 0 "
                         "(not --stages)")
    if c.stage_mode == "reshape" and (c.length_warmup or any(c.block_size % ctx for ctx, _ in short)):
        raise ValueError(f"--stage_mode reshape cuts each sample into block_size / context rows: every short "
                         f"context must divide --block_size {c.block_size} (no --length_warmup)")
    if c.recycle and not c.match_tokens:
        raise ValueError("--recycle chooses the samples of match_tokens' extra steps: add --match_tokens")
    if not 0 < c.learning_rate < 1 or not 0 <= c.min_lr <= c.learning_rate:
        raise ValueError(f"need 0 < --learning_rate < 1 and 0 <= --min_lr <= learning_rate, "
                         f"got {c.learning_rate} and {c.min_lr}")
    if not 0 < c.lr_decay_frac <= 1:
        raise ValueError(f"--lr_decay_frac must be in (0, 1] (seed: 0.9), got {c.lr_decay_frac}")
    if not (0 <= c.dropout < 1 and 0 <= c.beta1 < 1 and 0 <= c.beta2 < 1):
        raise ValueError(f"--dropout, --beta1, --beta2 must be in [0, 1), got {c.dropout}, {c.beta1}, {c.beta2}")
    for key in ("data_dir", "out_dir"):
        if not getattr(c, key).strip():
            raise ValueError(f"--{key} is empty: give a folder (an empty path would mean the current folder)")
    if c.extra_val and not c.extra_val.endswith(".bin"):
        raise ValueError(f"--extra_val {c.extra_val}: takes a token bin made by data_owt.py (e.g. data/wikitext2/"
                         f"val.bin), not a text file; for a text file use the ppl command")
    if c.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype must be auto, float32, bfloat16 or float16, got {c.dtype!r}")
    if not (c.device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", c.device)):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {c.device!r}")
    if not c.peak_flops >= 0:
        raise ValueError(f"--peak_flops must be >= 0 (0 = look the device up in PEAK_FLOPS), got {c.peak_flops}")
    if c.compile.lower() not in ("auto", *BOOL_WORDS):
        raise ValueError(f"--compile must be auto, true or false, got {c.compile!r}")
    per_micro_step = c.micro_batch_size * world_size
    if c.batch_size % per_micro_step:
        raise ValueError(f"--batch_size {c.batch_size} is not divisible by --micro_batch_size {c.micro_batch_size} x "
                         f"{world_size} process(es) = {per_micro_step}: batch_size must equal micro_batch_size x "
                         f"gradient_accumulation_steps x world_size; change --micro_batch_size or --batch_size")
    accum = c.batch_size // per_micro_step
    if c.gradient_accumulation_steps not in (0, accum):
        raise ValueError(f"--gradient_accumulation_steps {c.gradient_accumulation_steps} disagrees with batch_size / "
                         f"(micro_batch_size x world_size) = {c.batch_size} / ({c.micro_batch_size} x {world_size}) = "
                         f"{accum}: leave it at 0 (derived) or change --micro_batch_size")
    return accum


# ----------------------------------------------------------------------------------------------------------------
# Model: GPT-2 from scratch (pre-LN Transformer, learned positions, tied head)

@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True


def plain_attention(q, k, v, mask, scale, dropout_p=0.0):
    """softmax(q k^T x scale + mask) v, written out: what scaled_dot_product_attention fuses into one kernel (which
    never materializes the (T, S) score matrix). Kept as the benchmark's "plain" variant and as its reference."""
    att = (q @ k.transpose(-2, -1)) * scale
    if mask is not None:
        att = att + mask
    att = F.dropout(F.softmax(att.float(), dim=-1).to(q.dtype), p=dropout_p)
    return att @ v


class CausalSelfAttention(nn.Module):
    use_sdpa = True  # False: plain_attention instead (bench's "plain" variant); the results are the same

    def __init__(self, config):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v for all heads at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout

    def forward(self, x, kv=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if kv is not None:  # decoding only: kv = [k, v] of the earlier positions, extended in place
            if kv:
                assert T == 1, "after the prompt, a KV cache takes one token at a time"
                k, v = torch.cat([kv[0], k], dim=2), torch.cat([kv[1], v], dim=2)
            kv[:] = [k, v]
        # flash / memory-efficient kernels where available; is_causal masks future positions for any T (a single
        # new query against a cache attends to every cached position: no mask). `kv is None or` keeps is_causal a
        # plain bool in training, where torch.compile with a dynamic length would otherwise break the graph here
        dropout_p = self.dropout if self.training else 0.0
        if self.use_sdpa:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=kv is None or T > 1)
        else:  # query t (of the last T) sees keys 0 .. S - T + t
            S = k.size(2)
            future = torch.ones(T, S, dtype=torch.bool, device=x.device).triu(S - T + 1)
            mask = torch.zeros(T, S, dtype=q.dtype, device=x.device).masked_fill(future, -math.inf)
            y = plain_attention(q, k, v, mask, 1 / math.sqrt(k.size(-1)), dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's GELU; the exact erf form shifts logits by ~3e-4
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)  # eps 1e-5, as GPT-2
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, kv=None):
        x = x + self.attn(self.ln_1(x), kv)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied input and output embeddings, as GPT-2
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2: residual projections scaled by 1/sqrt(2 x n_layer)
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)  # GPT-2: std 0.02
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding=True):
        """Parameters, without the position table by default (the token table counts: it is also the head)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def forward(self, idx, targets=None, cache=None):
        """idx (B, T) with any T <= block_size, so a short stage simply passes shorter sequences.
        Returns logits (B, T, vocab) and the mean cross entropy against targets (None without targets).
        cache (decoding only): one list per layer, [] at first, holding the keys and values of earlier positions."""
        start = cache[0][0].size(2) if cache and cache[0] else 0
        T = start + idx.size(1)
        assert T <= self.config.block_size, f"sequence of {T} tokens, block_size is {self.config.block_size}"
        pos = torch.arange(start, T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for i, block in enumerate(self.transformer.h):
            x = block(x, cache[i] if cache is not None else None)
        logits = self.lm_head(self.transformer.ln_f(x))
        if targets is None:
            return logits, None
        # no .float() here: under autocast cross_entropy already runs in float32 (it is on autocast's float32
        # list), so a cast would only add a second (B x T, vocab) copy
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=0.0, top_k=0, use_cache=True, vocab_limit=0, generator=None):
        """Append max_new_tokens to idx (B, T): greedy at temperature 0 (seed question 3), else sampled from
        softmax(logits / temperature) over the top_k tokens (0 = all). The KV cache feeds each new token alone
        instead of the whole sequence again; once the sequence fills block_size both paths see the last block_size
        tokens (the cache is rebuilt). vocab_limit masks the padded vocabulary rows (50257..50303).
        Returns (tokens (B, T + new), the logits each new token was chosen from (B, new, vocab))."""
        cache, chosen_from = None, []
        for _ in range(max_new_tokens):
            window = idx[:, -self.config.block_size:]
            if not use_cache:
                logits, _ = self(window)
            elif cache is None or cache[0][0].size(2) >= self.config.block_size:  # the prompt, or a full cache
                cache = [[] for _ in self.transformer.h]
                logits, _ = self(window, cache=cache)
            else:
                logits, _ = self(idx[:, -1:], cache=cache)
            logits = logits[:, -1, :].float()
            if vocab_limit:
                logits[:, vocab_limit:] = -math.inf
            chosen_from.append(logits)
            if temperature == 0:
                token = logits.argmax(dim=-1, keepdim=True)
            else:
                scaled = logits / temperature
                if top_k:
                    kth = torch.topk(scaled, min(top_k, scaled.size(-1))).values[:, -1:]
                    scaled = scaled.masked_fill(scaled < kth, -math.inf)
                token = torch.multinomial(F.softmax(scaled, dim=-1), 1, generator=generator)
            idx = torch.cat([idx, token], dim=1)
        return idx, torch.stack(chosen_from, dim=1)

    @classmethod
    def from_pretrained(cls, path, block_size=0, dropout=0.0):
        """Load a local Hugging Face GPT-2 folder (config.json + model.safetensors or pytorch_model.bin) without
        transformers; the vocabulary is the checkpoint's own (50257 for GPT-2), positions optionally cropped.
        dropout is ours to choose (nanoGPT overrides it too): a resume rebuilds the model with the same value."""
        folder = Path(path)
        config = dataclasses.replace(read_hf_config(folder), dropout=dropout)
        model = cls(config)
        hf = {k.removeprefix("transformer."): v for k, v in load_hf_tensors(folder).items()
              if not k.endswith((".attn.bias", ".attn.masked_bias"))  # causal-mask buffers of old checkpoints
              and k != "lm_head.weight"}                               # tied to wte
        ours = {k.removeprefix("transformer."): v for k, v in model.state_dict().items() if k != "lm_head.weight"}
        if hf.keys() != ours.keys():
            raise ValueError(f"{folder}: not a GPT-2 checkpoint: missing {sorted(ours.keys() - hf.keys())[:5]}, "
                             f"unexpected {sorted(hf.keys() - ours.keys())[:5]}")
        # GPT-2 stores these four as Conv1D (in, out); nn.Linear wants (out, in). attn.c_proj is square, so a
        # missed transpose would raise nothing: the list must be right.
        transposed = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        with torch.no_grad():
            for key, target in ours.items():
                source = hf[key].t() if key.endswith(transposed) else hf[key]
                if source.shape != target.shape:
                    raise ValueError(f"{folder}: tensor {key} has shape {tuple(source.shape)}, "
                                     f"expected {tuple(target.shape)}")
                target.copy_(source.float())
        if block_size and block_size < config.block_size:  # fewer positions: keep the first rows of the table
            model.config = dataclasses.replace(config, block_size=block_size)
            model.transformer.wpe.weight = nn.Parameter(model.transformer.wpe.weight[:block_size].clone())
        return model

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, decay_wpe=True, fused=True):
        """AdamW; decay on the 2-D weights (matmuls, embeddings), none on biases and LayerNorm (seed).

        Position rows during a short stage: rows stage_len..block_size-1 get exactly zero gradient, so Adam moves
        them by nothing, but AdamW's decoupled decay still multiplies them by (1 - lr x weight_decay) every step:
        over the seed's 6,140 short steps to about 0.74 of their value (the plan prints the figure). The seed
        decays "all non-bias and LN weights", so by default wpe is decayed too; --decay_wpe false moves the whole
        position table to the no-decay group instead."""
        params = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        decayed = {n for n, p in params if p.dim() >= 2 and (decay_wpe or n != "transformer.wpe.weight")}
        decay, no_decay = [p for n, p in params if n in decayed], [p for n, p in params if n not in decayed]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        # fused: one kernel over all parameters instead of several small ops per tensor (CUDA; CPU since torch 2.4).
        # fused=False is the plain per-tensor loop (foreach=False), the benchmark's baseline.
        available = fused and device_type in ("cuda", "cpu")  # elsewhere torch's default (foreach where it can)
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=available or None,
                                 foreach=None if fused else False)

    def estimate_mfu(self, sequences, context, dt, peak_flops):
        """Model FLOPs utilization of one step of `sequences` x `context` tokens that took dt seconds.
        FLOPs per token = 6N (weights, forward + backward) + 12 x n_layer x n_embd x T (attention), PaLM appendix
        B. T must be the step's real context: nanoGPT's estimate uses block_size, which in a 128-token stage counts
        8x the tokens that were processed and overstates MFU about 8x."""
        c = self.config
        flops_per_token = 6 * self.num_params() + 12 * c.n_layer * c.n_embd * context
        return flops_per_token * sequences * context / dt / peak_flops


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
    """A GPT-2 config.json, checked as the same numbers given as flags would be (validate)."""
    if Path(folder).is_file():
        raise ValueError(f"--init_from {folder} is a file: give the folder holding config.json and the weights")
    path = require_file(Path(folder) / "config.json", "--init_from expects a Hugging Face GPT-2 folder holding "
                        "config.json and model.safetensors or pytorch_model.bin")
    hf = read_json_object(path, "a GPT-2 config.json", "download the folder again")
    if not {"n_positions", "vocab_size", "n_layer", "n_head", "n_embd"} <= hf.keys():
        raise ValueError(f"{path}: not a GPT-2 config.json (needs n_positions, vocab_size, n_layer, n_head, n_embd)")
    shape = {"block_size": hf["n_positions"], "vocab_size": hf["vocab_size"], "n_layer": hf["n_layer"],
             "n_head": hf["n_head"], "n_embd": hf["n_embd"]}
    for key, value in shape.items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{path}: {key} is {value!r}, not a whole number")
    try:
        validate(dataclasses.replace(Config(), **shape, stage_len=1))
    except ValueError as e:
        raise ValueError(f"{path}: {e} (the names are this script's: n_positions is --block_size)") from None
    allowed = {"activation_function": ("gelu_new", "gelu_pytorch_tanh"), "n_inner": (None, 4 * hf["n_embd"]),
               "layer_norm_epsilon": (1e-5,), "tie_word_embeddings": (True,),
               "scale_attn_by_inverse_layer_idx": (False,), "scale_attn_weights": (True,)}
    differs = [f"{k}={hf[k]!r}" for k, values in allowed.items() if k in hf and hf[k] not in values]
    if differs:
        raise ValueError(f"{path}: {', '.join(differs)} differs from GPT-2, the architecture this script implements")
    return GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                     n_head=hf["n_head"], n_embd=hf["n_embd"], dropout=0.0, bias=True)


def load_hf_tensors(folder):
    """model.safetensors (read by read_safetensors) or pytorch_model.bin (a weights-only torch.load)."""
    folder = Path(folder)
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
# The staged method: which context each step uses, and what that costs in tokens

@dataclass(frozen=True)
class Stage:
    steps: int
    context: int   # input tokens per sequence; targets are the next context tokens
    what: str      # 'short', 'full' or 'extra'
    reshape: bool = False  # stage_mode reshape: each sample is cut into block_size / context rows


@dataclass(frozen=True)
class Plan:
    stages: tuple
    num_samples: int
    batch_size: int
    block_size: int
    steps: int            # the run's main steps (one epoch unless max_iters), before any extra steps
    recycle: bool = False  # the extra steps re-read the short steps' samples

    @property
    def total_steps(self):
        return sum(s.steps for s in self.stages)

    def stage_at(self, step):
        for stage in self.stages:
            if step < stage.steps:
                return stage
            step -= stage.steps
        raise IndexError(f"step {step} is past the plan's {self.total_steps} steps")

    def context_at(self, step):
        """Context length of optimizer step `step` (0-based): this is where 128 switches to 1024."""
        return self.stage_at(step).context

    def step_tokens(self, stage):
        """Tokens per step: batch_size x context when truncating, all batch_size x block_size when reshaping."""
        return self.batch_size * (self.block_size if stage.reshape else stage.context)

    def tokens(self, stage):
        return stage.steps * self.step_tokens(stage)

    def tokens_before(self, step):
        """Tokens seen by the steps before `step`: the clock of --lr_decay_by tokens."""
        seen = 0
        for stage in self.stages:
            seen += min(max(step, 0), stage.steps) * self.step_tokens(stage)
            step -= stage.steps
        return seen

    @property
    def tokens_seen(self):
        return sum(self.tokens(s) for s in self.stages)

    @property
    def truncated_tokens(self):
        """Tokens of the samples cut away by the short stage(s): their tails beyond the context."""
        return sum(s.steps * self.batch_size * (self.block_size - s.context) for s in self.stages if not s.reshape)

    @property
    def short_steps(self):
        """The steps whose samples lost their tails: the first short_steps steps of the run."""
        return sum(s.steps for s in self.stages if s.context < self.block_size and not s.reshape)

    @property
    def epoch_steps(self):
        """Steps of one pass over the run's epoch: the samples it reads, all of train.bin (less the partial last
        batch) or, with a shorter max_iters, the first max_iters x batch_size samples of the permutation."""
        return min(self.steps, self.num_samples // self.batch_size)

    def sample_step(self, step):
        """Which step's samples (batch_indices) step `step` reads. Recycled extra step k re-reads short step k: every
        truncated sample once, at full context, in the short stage's order. Otherwise a step reads its own (steps
        past the run's epoch: that epoch's samples again, in a second, differently seeded order)."""
        if self.recycle and step >= self.steps:
            return step - self.steps
        return step


def match_tokens_steps(truncated_tokens, batch_size, block_size):
    """Full-context steps that see as many tokens as the short stage cut away (seed Exp 2: ~5.25k)."""
    return math.ceil(truncated_tokens / (batch_size * block_size))


def parse_stages(text, block_size):
    """'128:0.25,256:0.25' -> [(128, 0.25), (256, 0.25)]: context 128 for the first 25% of the steps, 256 for the
    next 25%, then block_size (the seed's two-stage try)."""
    stages = []
    for item in filter(None, text.split(",")):
        context, _, frac = item.partition(":")
        try:
            stages.append((int(context), float(frac)))
        except ValueError:
            raise ValueError(f"--stages: {item!r} is not context:fraction (e.g. --stages 128:0.25,256:0.25)") from None
    if not all(0 < c < block_size and f > 0 for c, f in stages) or sum(f for _, f in stages) >= 1:
        raise ValueError(f"--stages {text}: contexts must be in 1..{block_size - 1} and fractions > 0 with a sum < 1")
    return stages


def short_schedule(steps, stage_frac, stage_len, block_size, stages="", length_warmup=False, length_step=8):
    """[(context, steps), ...] of the short stages, in order. Linear warmup (DeepSpeed's fixed_linear seqlen
    curriculum): step t of n has context stage_len + (block_size - stage_len) x t / n, rounded down to a multiple
    of length_step (DeepSpeed: difficulty_step 8, for tensor cores), never below stage_len."""
    if length_warmup:
        n = int(stage_frac * steps + 0.5)
        grow = (stage_len + (block_size - stage_len) * t // n for t in range(n))
        contexts = [max(stage_len, c - c % length_step) for c in grow]
        return [(c, len(list(run))) for c, run in itertools.groupby(contexts)]
    schedule, done, share = [], 0, 0.0
    for context, frac in parse_stages(stages, block_size) or ([(stage_len, stage_frac)] if stage_frac else []):
        share += frac
        end = int(share * steps + 0.5)             # round half up: 0.25 x 24,558 = 6,139.5 -> 6,140 (seed: ~6k)
        schedule.append((context, end - done))
        done = end
    return schedule


def make_plan(num_samples, batch_size, stage_frac, stage_len, block_size, match_tokens=False, max_iters=0,
              stages="", length_warmup=False, length_step=8, stage_mode="truncate", recycle=False):
    """Stages of one epoch: the short stage(s), the rest at block_size, then (with match_tokens) extra full-context
    steps. Truncating keeps the number of sequences per step (seed); reshaping keeps the tokens per step."""
    epoch_steps = num_samples // batch_size        # the partial last batch is dropped
    steps = max_iters or epoch_steps
    short = short_schedule(steps, stage_frac, stage_len, block_size, stages, length_warmup, length_step)
    plan_stages = [Stage(n, c, "short", stage_mode == "reshape") for c, n in short]
    plan_stages.append(Stage(steps - sum(n for _, n in short), block_size, "full"))
    plan = Plan(tuple(s for s in plan_stages if s.steps), num_samples, batch_size, block_size, steps, recycle)
    if match_tokens:  # recycling must revisit every truncated sample: one extra step per short step
        extra = plan.short_steps if recycle else match_tokens_steps(plan.truncated_tokens, batch_size, block_size)
        plan = dataclasses.replace(plan, stages=plan.stages + ((Stage(extra, block_size, "extra"),) if extra else ()))
    return plan


def plan_for(config, num_samples):
    return make_plan(num_samples, config.batch_size, config.stage_frac, config.stage_len, config.block_size,
                     config.match_tokens, config.max_iters, config.stages, config.length_warmup, config.length_step,
                     config.stage_mode, config.recycle)


def describe_plan(plan, config):
    """The plan as printed at the start of a run and by `python gpt_staged.py plan`."""
    n, b, block = plan.num_samples, plan.batch_size, plan.block_size
    epoch_steps = n // b
    lines = [f"plan: {n:,} samples of {block} tokens (+1 target), {b} sequences per step",
             f"  one epoch = {n:,} / {b} = {n / b:,.1f} -> {epoch_steps:,} steps (the partial last batch of "
             f"{n - epoch_steps * b:,} samples is dropped)"]
    if plan.steps < epoch_steps:
        lines.append(f"  --max_iters {plan.steps:,}: the run's epoch is the first {plan.steps * b:,} samples of the "
                     f"permutation ({plan.steps * b / n:.1%} of train.bin), each read once")
    elif plan.steps > epoch_steps:
        lines.append(f"  --max_iters {plan.steps:,}: {plan.steps * b / n:.2f} passes over the samples "
                     f"(each pass a new permutation)")
    first, stages = 0, list(plan.stages)
    warm = [s for s in stages if s.what == "short"]
    if config.length_warmup and not warm:
        lines.append(f"  warmup     : --stage_frac {config.stage_frac} of {plan.steps:,} steps rounds to 0 steps: "
                     f"no short steps")
    elif config.length_warmup:  # one line for the many short stages of a linear warmup
        steps, tokens = sum(s.steps for s in warm), sum(plan.tokens(s) for s in warm)
        lines.append(f"  warmup     : steps 1..{steps:,} at ctx {warm[0].context} growing linearly to "
                     f"{warm[-1].context} (multiples of {config.length_step}), {human(tokens)} tokens")
        first, stages = steps, stages[len(warm):]
    for i, s in enumerate(stages):
        shape = f" as {b * block // s.context:,} rows (reshape)" if s.reshape else ""
        lines.append(f"  stage {i + 1} {s.what:<5}: steps {first + 1:,}..{first + s.steps:,} ({s.steps:,} steps) at "
                     f"ctx {s.context}{shape}, {human(plan.tokens(s))} tokens")
        first += s.steps
    truncated, full = plan.truncated_tokens, plan.steps * b * block
    lines.append(f"  tokens seen {human(plan.tokens_seen)} = {plan.tokens_seen / full:.1%} of full context all the way "
                 f"({human(full)})")
    if config.stage_mode == "reshape":
        lines.append("  reshape: short steps cut every sample into block_size / ctx rows: nothing truncated")
    if truncated:
        state = "in this plan" if config.match_tokens else "off"
        lines += [f"  tokens truncated away by the short stage: {human(truncated)}; at a step time proportional to "
                  f"tokens it saves at most {truncated / full:.1%} of the baseline's time",
                  f"  match_tokens ({state if not config.recycle else 'off'}): "
                  f"{match_tokens_steps(truncated, b, block):,} extra full-context steps ({human(truncated)} / "
                  f"({b} x {block})), re-reading the run's epoch ({plan.epoch_steps * b:,} samples) in a second, "
                  f"differently seeded order",
                  f"  --recycle ({state if config.recycle else 'off'}): {plan.short_steps:,} extra steps re-read the "
                  f"{plan.short_steps * b:,} truncated samples once each, in order, at full context "
                  f"({human(plan.short_steps * b * block)} tokens: the heads twice)",
                  f"  position rows {max(s.context for s in plan.stages if s.what == 'short')}..{block - 1} get no "
                  f"gradient in the short stage; weight decay alone scales them by "
                  f"{unused_position_shrink(plan, config):.3f} (--decay_wpe false: 1)"]
    return "\n".join(lines)


def human(n):
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n:,}"


# ----------------------------------------------------------------------------------------------------------------
# Data: one epoch over fixed samples, read from memmapped uint16 bins

@functools.lru_cache(maxsize=2)
def epoch_permutation(seed, epoch, num_samples):
    """The visiting order of pass `epoch` over the samples: a seeded permutation, each sample exactly once."""
    order = np.random.default_rng([seed, epoch]).permutation(num_samples)
    order.flags.writeable = False
    return order


def batch_indices(step, seed, num_samples, batch_size, world_size=1, rank=0, epoch_steps=0):
    """Sample indices of optimizer step `step` on process `rank`: a pure function of (seed, step), so a resumed
    run reads exactly the batches an uninterrupted one would. Step s takes the next batch_size samples of the
    permutation; rank r takes the r-th contiguous slice of them, which it then cuts into micro-batches.
    The run's epoch is the first epoch_steps x batch_size samples of that permutation (epoch_steps 0: all of
    train.bin, less the partial last batch). Steps past it (match_tokens, a max_iters longer than an epoch) re-read
    the same samples in a new, differently seeded order: a second epoch of the run's own data, never unseen
    samples, whatever max_iters cuts the epoch to."""
    epoch_steps = epoch_steps or num_samples // batch_size
    epoch, position = divmod(step, epoch_steps)
    positions = slice(position * batch_size, (position + 1) * batch_size)
    first = epoch_permutation(seed, 0, num_samples)
    batch = first[positions] if not epoch else first[epoch_permutation(seed, epoch, epoch_steps * batch_size)[positions]]
    per_rank = batch_size // world_size
    return batch[rank * per_rank:(rank + 1) * per_rank]


def read_meta(data_dir):
    """meta.json from data_owt.py, or {} (bins made by nanoGPT's prepare.py carry none)."""
    path = Path(data_dir) / "meta.json"
    if not path.is_file() and path.with_name("meta.json.tmp").is_file():  # data_owt.py stopped while renaming
        raise ValueError(f"{data_dir}: data_owt.py was stopped while writing this folder (meta.json.tmp, no "
                         f"meta.json), so train.bin and val.bin may be from different runs; re-run data_owt.py")
    if not path.is_file():
        return {}
    meta = read_json_object(path, "the object data_owt.py writes", "re-run data_owt.py")
    for key in ("vocab_size", "train_tokens", "val_tokens"):  # the numbers this script reads from it
        if key in meta and not (isinstance(meta[key], int) and not isinstance(meta[key], bool) and meta[key] >= 0):
            raise ValueError(f"{path}: {key} is {meta[key]!r}, not a whole number; re-run data_owt.py")
    return meta


def count_samples(path, block_size, expected_tokens=None):
    """Samples of block_size + 1 tokens in a bin, after checking the file is a whole uint16 array."""
    if path.parent.exists() and not path.parent.is_dir():
        raise ValueError(f"{path.parent} is a file: --data_dir takes the folder holding train.bin and val.bin")
    require_file(path, "make the token bins with data_owt.py, or point --data_dir at a folder holding train.bin "
                 "and val.bin (the plan command also takes --num_samples)")
    size = path.stat().st_size
    if size % 2:
        raise ValueError(f"{path}: {size:,} bytes, an odd count, so not a file of uint16 tokens (cut off?); "
                         f"re-run data_owt.py")
    if expected_tokens is not None and size // 2 != expected_tokens:
        raise ValueError(f"{path} holds {size // 2:,} tokens but meta.json says {expected_tokens:,}: the file is "
                         f"truncated or stale; re-run data_owt.py")
    samples = (size // 2 - 1) // block_size
    if samples < 1:
        raise ValueError(f"{path} holds {size // 2:,} tokens, fewer than one sample of block_size + 1 = "
                         f"{block_size + 1}: use more text or a smaller --block_size")
    return samples


def get_batch(path, indices, context, block_size, vocab_size, device, rows=1):
    """Rows of the given samples cut to `context` (+1 target) tokens: the short stage reads the first
    stage_len + 1 tokens of each sample. Returns int64 inputs x and targets y (B x rows, context / rows): with
    stage_mode reshape each sample of context = block_size tokens becomes `rows` short rows."""
    data = np.memmap(path, dtype=np.uint16, mode="r")  # opened per batch so its pages do not pile up in our RSS
    samples = np.stack([data[i * block_size:i * block_size + context + 1] for i in indices]).astype(np.int64)
    if samples.max() >= vocab_size:  # here, not as a device-side assert deep inside the embedding
        raise ValueError(f"{path}: token id {samples.max()} >= --vocab_size {vocab_size} (in samples "
                         f"{indices[:4].tolist()}...): the bins were made with another tokenizer; re-run data_owt.py")
    xy = torch.from_numpy(samples)
    if device.type == "cuda":  # pinned memory lets the copy run asynchronously with the GPU's work
        xy = xy.pin_memory().to(device, non_blocking=True)
    return xy[:, :-1].reshape(-1, context // rows), xy[:, 1:].reshape(-1, context // rows)


# ----------------------------------------------------------------------------------------------------------------
# Learning-rate schedule (the seed's, exactly)

def get_lr(step, total_steps, config, plan=None):
    """Linear warmup from 0 over warmup_iters (step 0 has lr 0: "from 0"; step warmup_iters has the peak), then
    cosine from the peak to min_lr (10% of peak) over lr_decay_frac (90%) of the remaining steps, then flat.
    --lr_decay_by tokens (given the plan) runs the cosine on tokens seen instead, so that short steps, which see
    fewer tokens, also decay the LR less (DeepSpeed's advice); the floor comes at lr_decay_frac of the planned
    tokens after warmup."""
    if step < config.warmup_iters:
        return config.learning_rate * step / config.warmup_iters
    done, total = step - config.warmup_iters, total_steps - config.warmup_iters
    if plan is not None and config.lr_decay_by == "tokens":
        warm = plan.tokens_before(config.warmup_iters)
        done, total = plan.tokens_before(step) - warm, plan.tokens_seen - warm
    progress = done / (config.lr_decay_frac * total)
    if progress >= 1:
        return config.min_lr
    return config.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (config.learning_rate - config.min_lr)


def unused_position_shrink(plan, config):
    """Factor by which AdamW's decoupled decay alone scales the position rows a short stage never uses:
    prod over the short steps of (1 - lr_t x weight_decay)."""
    if not config.decay_wpe:
        return 1.0
    short_steps = sum(s.steps for s in plan.stages if s.what == "short")
    return math.prod(1 - get_lr(t, plan.total_steps, config, plan) * config.weight_decay for t in range(short_steps))


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: written atomically, loaded weights-only

def save_checkpoint(path, checkpoint):
    """Write to a temporary file in the same folder, fsync, then rename: a crash leaves the old file intact."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(checkpoint, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# What defines a run: a resume that changed any of these would silently continue another run (other samples, plan
# or LR curve). Everything else (eval_interval, log_interval, stop_step, micro_batch_size, device, dtype, ...) may
# change between a stop and a resume.
RUN_KEYS = {"model configuration": (*MODEL_KEYS, "dropout"),
            "data order": ("seed", "batch_size", "max_iters"),
            "staged plan": ("stage_frac", "stage_len", "stages", "match_tokens", "stage_mode", "recycle",
                            "length_warmup", "length_step"),
            "LR schedule or optimizer": ("learning_rate", "min_lr", "warmup_iters", "lr_decay_frac", "lr_decay_by",
                                         "weight_decay", "decay_wpe", "beta1", "beta2", "grad_clip"),
            "validation set": ("eval_samples",)}


def fingerprint(path):
    """A bin's size and a hash of its first and last MiB: tells a re-tokenized or another corpus in milliseconds."""
    size, digest = path.stat().st_size, hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(2**20))
        f.seek(max(0, size - 2**20))
        digest.update(f.read(2**20))
    return f"{size} bytes, sha256 {digest.hexdigest()[:16]}"


def load_checkpoint(path, config, data):
    """The checkpoint to resume, after checking that it is this run's: the same RUN_KEYS and the same data."""
    require_file(path, "start the run without --resume, or set --out_dir to the folder of the run to continue")
    checkpoint = read_checkpoint(path, resume=True)
    saved = checkpoint["config"]
    for what, keys in RUN_KEYS.items():  # keys missing from an older checkpoint cannot be checked
        changed = [f"{k} {saved[k]} (checkpoint) vs {getattr(config, k)} (now)"
                   for k in keys if k in saved and saved[k] != getattr(config, k)]
        if changed:
            raise ValueError(f"{path} is from another {what}: {', '.join(changed)}; resume with the run's own "
                             f"settings or use another --out_dir")
    for name, now in data.items():
        before = checkpoint.get("data", {}).get(name, now)
        if before != now:
            raise ValueError(f"{path} was trained on other data: {name} was {before}, now {now} (re-tokenized, or "
                             f"another corpus); point --data_dir at the run's data or use another --out_dir")
    return checkpoint


def read_checkpoint(path, resume=False):
    """A checkpoint of this script, recognized by what it holds (a GPT-2 config and weights; for a resume also the
    optimizer and the step), loaded weights-only."""
    require_file(path, "give --ckpt the ckpt.pt of a run (out_dir/ckpt.pt)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: refused: it holds objects a weights-only load does not allow (a pickle that "
                         f"could run code, or not a checkpoint of this script): {refusal_reason(e)}") from None
    except (RuntimeError, EOFError, OSError) as e:  # a cut-off zip fails in torch's reader with EINVAL
        raise ValueError(f"{path}: unreadable checkpoint ({e}); is it cut off? Use another copy, or start again "
                         f"in a new --out_dir") from None
    weights = checkpoint.get("model") if isinstance(checkpoint, dict) else None
    if isinstance(checkpoint, dict) and "model_config" in checkpoint:
        raise ValueError(f"{path} is a ds2.py checkpoint (a T5), not gpt_staged.py's: use it with ds2.py")
    if not isinstance(weights, dict) or "transformer.wte.weight" not in weights \
            or not isinstance(checkpoint.get("config"), dict) or not set(MODEL_KEYS) <= checkpoint["config"].keys():
        raise ValueError(f"{path}: not a checkpoint of gpt_staged.py (no GPT-2 config and weights)")
    missing = {"optimizer", "scaler", "step", "tokens_seen", "train_time_s"} - checkpoint.keys()
    if resume and missing:
        raise ValueError(f"{path} holds weights without {', '.join(sorted(missing))}: it can be sampled "
                         f"(sample --ckpt) but not resumed; start a new run in another --out_dir")
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
    """On resume, drop log rows past the checkpoint (a crashed run may have logged steps it then lost, and cut its
    last line short)."""
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
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in rows))
        os.replace(tmp, path)


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
    """(rank, world_size, device). torchrun sets RANK/LOCAL_RANK/WORLD_SIZE; a plain run is rank 0 of 1."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device = torch.device(choose_device(config.device, os.environ, cuda_count))
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for any float32 matmul left outside autocast
        torch.backends.cudnn.allow_tf32 = True
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, device


def peak_flops(config, device):
    """The MFU denominator: --peak_flops, else the device's dense peak from PEAK_FLOPS; 0 = unknown (no MFU)."""
    if config.peak_flops or device.type != "cuda":
        return config.peak_flops
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS if key in name), 0.0)


def use_compile(config, device):
    """--compile auto: on with CUDA (the kernels pay for the compile time), off on CPU."""
    return device.type == "cuda" if config.compile == "auto" else BOOL_WORDS[config.compile.lower()]


def pick_dtype(config, device):
    if config.dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return getattr(torch, config.dtype)


def forward_backward(model, micro_batches, accum, autocast, scaler, world_size=1):
    """The gradient-accumulation half of a step: forward and backward of each (x, y) micro-batch, its loss divided
    by accum so that the summed gradients are those of the whole batch. Under DDP the gradients are all-reduced
    only on the last micro-step. Returns the step's mean loss as a tensor (reading it waits for the device)."""
    batches = iter(micro_batches)
    x, y = next(batches)
    loss_sum = 0.0
    for micro_step in range(accum):
        if world_size > 1:
            model.require_backward_grad_sync = micro_step == accum - 1
        with autocast:
            _, loss = model(x, y)
            loss = loss / accum
        if micro_step + 1 < accum:  # read the next micro-batch while the GPU runs this forward (as nanoGPT)
            x, y = next(batches)
        loss_sum = loss_sum + loss.detach()
        scaler.scale(loss).backward()
    return loss_sum


def pack_micro_batches(micro_batch_size, accum, context, block_size):
    """(sequences per micro-batch, micro-steps) of a step at `context`: a short-context micro-batch carries about
    the tokens of a full one, micro_batch_size x block_size / context sequences, so a 128-token step runs 1/8 of
    the micro-steps (4 of 16 x 128 sequences) instead of 32 tiny ones that leave a GPU idle. The factor is the
    largest divisor of accum up to block_size / context, so the micro-batches stay equal and their mean losses
    average to the batch's: the sequences per optimizer step (the method) and the gradients do not change."""
    factor = max(d for d in range(1, min(accum, block_size // context) + 1) if accum % d == 0)
    return micro_batch_size * factor, accum // factor


def read_losses(pending, world_size, out_dir):
    """The losses of the steps since the last read, on the host (the one wait for the device), averaged over the
    ranks (gloo has no AVG: SUM, then divide), checked: a NaN or inf stops the run before anything is saved."""
    losses = torch.stack([row["loss"] for row in pending]).float()
    if world_size > 1:
        dist.all_reduce(losses)
        losses /= world_size
    rows = [{**row, "loss": loss} for row, loss in zip(pending, losses.tolist())]
    bad = next((row for row in rows if not math.isfinite(row["loss"])), None)
    if bad:  # every rank sees the same reduced losses, so all stop together
        raise FloatingPointError(f"loss is {bad['loss']} in step {bad['step']:,} (ctx {bad['ctx']}, lr "
                                 f"{bad['lr']:.2e}): stopped; the last good checkpoint {out_dir / 'ckpt.pt'} is "
                                 f"kept. Resume it with a lower --learning_rate or another --dtype")
    return rows


def optimizer_step(model, optimizer, scaler, grad_clip):
    """The other half: clip the global gradient norm, update, clear the gradients. Its cost does not shrink with
    the context, so it is what keeps a 128-token step from costing 1/8 of a 1024-token one."""
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)  # in fp16 the scaler skips a step whose gradients overflowed, then lowers its scale
    scaler.update()
    optimizer.zero_grad(set_to_none=True)  # None, not zeros: the next backward writes instead of adding


def train(config):
    """One run: plan, model, the AMP + gradient-accumulation loop, evaluation, checkpoints, results row."""
    rank, world_size, device = setup_device(config)
    master = rank == 0                      # only rank 0 logs and writes files
    log = print if master else (lambda *args, **kwargs: None)
    accum = validate(config, world_size)
    dtype = pick_dtype(config, device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # fp16 only: bf16 has fp32's range
    torch.manual_seed(config.seed)          # the same initial weights on every rank

    if config.init_from != "scratch":       # the model's shape is the pretrained checkpoint's
        shape = asdict(read_hf_config(Path(config.init_from)))
        shape["block_size"] = min(config.block_size, shape["block_size"])
        config = dataclasses.replace(config, **{k: shape[k] for k in MODEL_KEYS})
    data_dir, out_dir = Path(config.data_dir), Path(config.out_dir)
    if not config.resume and (out_dir / "ckpt.pt").exists():
        raise ValueError(f"{out_dir / 'ckpt.pt'} exists from an earlier run: continue it with --resume, or choose "
                         f"another --out_dir (nothing is overwritten)")
    meta = read_meta(data_dir)
    if meta.get("vocab_size", 0) > config.vocab_size:
        raise ValueError(f"{data_dir / 'meta.json'}: vocab_size {meta['vocab_size']} > --vocab_size "
                         f"{config.vocab_size}: raise --vocab_size")
    train_path, val_path = data_dir / "train.bin", data_dir / "val.bin"
    num_samples = count_samples(train_path, config.block_size, meta.get("train_tokens"))
    num_val = count_samples(val_path, config.block_size, meta.get("val_tokens"))
    extra_path = Path(config.extra_val) if config.extra_val else None
    num_extra = count_samples(extra_path, config.block_size) if extra_path else 0
    if num_samples < config.batch_size:
        raise ValueError(f"{train_path} holds {num_samples:,} samples, fewer than one batch of --batch_size "
                         f"{config.batch_size}: use more text or a smaller batch")
    plan = plan_for(config, num_samples)
    total_steps = plan.total_steps
    if config.warmup_iters >= total_steps:
        raise ValueError(f"--warmup_iters {config.warmup_iters} >= the run's {total_steps} steps: lower it")
    log(describe_plan(plan, config))
    log(f"batch: {config.batch_size} sequences = {config.micro_batch_size} (micro-batch) x {accum} (accumulation) "
        f"x {world_size} (processes); device {device}, dtype {str(dtype).removeprefix('torch.')}")

    data = {"train.bin": fingerprint(train_path), "val.bin": fingerprint(val_path), "train samples": num_samples}
    checkpoint = load_checkpoint(out_dir / "ckpt.pt", config, data) if config.resume else None
    if config.init_from != "scratch" and checkpoint is None:
        model = GPT.from_pretrained(config.init_from, config.block_size, config.dropout)
    else:
        model = GPT(GPTConfig(**{k: getattr(config, k) for k in MODEL_KEYS}, dropout=config.dropout))
    log(f"model: {model.num_params() / 1e6:.2f}M parameters (without the position table)")
    # the initial weights come from --seed on every rank (DDP also broadcasts rank 0's); dropout masks must differ
    # between ranks, or 8 GPUs drop the same units of 8 different batches: seed + rank from here on (as nanoGPT)
    torch.manual_seed(config.seed + rank)
    step, tokens_seen, train_time, best_val = 0, 0, 0.0, math.inf
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
    model.to(device)
    optimizer = model.configure_optimizers(config.weight_decay, config.learning_rate, (config.beta1, config.beta2),
                                           device.type, config.decay_wpe)
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        if checkpoint["scaler"]:  # empty from a run without fp16: --dtype float16 now starts a fresh scale
            scaler.load_state_dict(checkpoint["scaler"])
        step, tokens_seen, train_time = checkpoint["step"], checkpoint["tokens_seen"], checkpoint["train_time_s"]
        best_val = checkpoint["best_val_loss"]
        restore_rng(checkpoint, rank, world_size, device, config.seed + rank + step, log)
        if step >= total_steps:
            raise ValueError(f"{out_dir / 'ckpt.pt'} is at step {step}: the run's {total_steps} steps are done")
        log(f"resumed from {out_dir / 'ckpt.pt'} at step {step:,} ({human(tokens_seen)} tokens seen)")
    raw_model = model
    if use_compile(config, device):
        # Static shapes give the best kernels: with two contexts (128, then 1024) that is one recompile, at the
        # stage switch. A linear length warmup visits many contexts: there the length is dynamic from the start
        # (dynamo would otherwise recompile for each new length up to its cache limit, then fall back to eager).
        model = torch.compile(model, dynamic=len({stage.context for stage in plan.stages}) > 2)
    eval_model = model
    if world_size > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if master:
        out_dir.mkdir(parents=True, exist_ok=True)
        if checkpoint is None:
            (out_dir / "log.jsonl").write_text("")
        else:
            trim_log(out_dir / "log.jsonl", step)

    def evaluate():
        full = config.final_eval == "full" and step == total_steps
        samples = eval_subset(num_val, 0 if full else config.eval_samples)
        val = estimate_loss(eval_model, val_path, samples, config, autocast, device, rank, world_size)
        row = {"step": step, "val_loss": val, "tokens": tokens_seen, "val_samples": len(samples)}
        if extra_path:  # a second validation set, e.g. WikiText-2 test
            extra = eval_subset(num_extra, 0 if full else config.eval_samples)
            row["extra_val_loss"] = estimate_loss(eval_model, extra_path, extra, config, autocast, device, rank,
                                                  world_size)
        log(f"step {step:,}: val loss {val:.4f} | val ppl {ppl_of(val):.2f} on {len(samples):,} of {num_val:,} "
            f"val samples | tokens {human(tokens_seen)}"
            + (f" | {extra_path.parent.name} ppl {ppl_of(row['extra_val_loss']):.2f}" if extra_path else ""))
        if master:
            append_jsonl(out_dir / "log.jsonl", row)
        return row

    last_eval = evaluate() if checkpoint is None else \
        checkpoint.get("last_eval") or {"val_loss": checkpoint["last_val_loss"]}
    flops_peak = peak_flops(config, device)
    context, pending, window_start, per_stage = None, [], time.time(), {}
    while step < total_steps:
        stage = plan.stage_at(step)
        if stage.context != context:  # the stage switch: from here on sequences are this long
            log(f"stage: context {context} -> {stage.context} after {step:,} steps" if context else
                f"stage: context {stage.context}")
        context, rows = stage.context, config.block_size // stage.context if stage.reshape else 1
        lr = get_lr(step, total_steps, config, plan)
        for group in optimizer.param_groups:
            group["lr"] = lr
        indices = batch_indices(plan.sample_step(step), config.seed, num_samples, config.batch_size, world_size, rank,
                                plan.epoch_steps)
        sequences, micro_steps = pack_micro_batches(config.micro_batch_size, accum, context * rows, config.block_size)
        micro_batches = (get_batch(train_path, indices[i:i + sequences], context * rows, config.block_size,
                                   config.vocab_size, device, rows) for i in range(0, len(indices), sequences))
        loss = forward_backward(model, micro_batches, micro_steps, autocast, scaler, world_size)
        optimizer_step(model, optimizer, scaler, config.grad_clip)
        step += 1
        tokens_seen += plan.step_tokens(stage)
        pending.append(dict(step=step, loss=loss, lr=lr, ctx=context, tokens=tokens_seen))
        logging = step % config.log_interval == 0 or step in (1, total_steps)
        evaluating = step % config.eval_interval == 0 or step in (total_steps, config.stop_step)
        switching = plan.stage_at(min(step, total_steps - 1)).context != context
        if logging or evaluating or switching:
            # the losses are read on the host only here (one wait for the device per window, not per step)
            window = read_losses(pending, world_size, out_dir)
            dt = time.time() - window_start
            train_time += dt
            window_tokens = sum(plan.step_tokens(plan.stage_at(r["step"] - 1)) for r in pending)
            seconds, tokens = per_stage.get(context, (0.0, 0))
            per_stage[context] = (seconds + dt, tokens + window_tokens)
            if master:
                for row in window:
                    append_jsonl(out_dir / "log.jsonl", {**row, "dt": dt / len(window)})
            if logging:
                per_gpu = config.batch_size * rows * len(window) // world_size
                mfu = raw_model.estimate_mfu(per_gpu, context, dt, flops_peak or 1)
                log(f"step {step:,}/{total_steps:,} | loss {window[-1]['loss']:.4f} | lr {lr:.2e} | ctx {context} | "
                    f"tokens {human(tokens_seen)} | {dt / len(window) * 1000:.1f} ms/step | "
                    f"{window_tokens / dt:,.0f} tok/s | mfu " + (f"{mfu * 100:.3g}%" if flops_peak else "n/a"))
            pending = []
        if evaluating:
            last_eval = evaluate()
            if not math.isfinite(last_eval["val_loss"]):  # the last update broke the weights: do not save them
                raise FloatingPointError(f"validation loss is {last_eval['val_loss']} after step {step:,}: the "
                                         f"weights diverged; the last good checkpoint {out_dir / 'ckpt.pt'} is kept. "
                                         f"Resume it with a lower --learning_rate or another --dtype")
            best_val = min(best_val, last_eval["val_loss"])
            rng = rng_states(device, world_size)  # every rank takes part; rank 0 writes
            if master:
                save_checkpoint(out_dir / "ckpt.pt", {
                    "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(), "config": asdict(config),
                    "step": step,  # also the data position: step s reads batch_indices(s), a function of (seed, s)
                    "tokens_seen": tokens_seen, "train_time_s": train_time,
                    "best_val_loss": best_val, "last_val_loss": last_eval["val_loss"], "last_eval": last_eval,
                    "rng": rng, "data": data})
        if step == config.stop_step and step < total_steps:
            log(f"stopped at --stop_step {step}; continue with --resume")
            break
        if logging or evaluating or switching:
            window_start = time.time()  # evaluation time is not training time
    for ctx, (seconds, tokens) in per_stage.items():
        mfu = raw_model.estimate_mfu(tokens // ctx // world_size, ctx, seconds, flops_peak or 1)
        log(f"throughput at ctx {ctx}: {tokens / seconds:,.0f} tok/s over {human(tokens)} tokens | mfu "
            + (f"{mfu * 100:.3g}% of {flops_peak / 1e12:g} TFLOP/s" if flops_peak else "n/a (set --peak_flops)"))

    name = (f"staged {config.stages}" if config.stages else f"staged {config.stage_frac:.0%} x {config.stage_len}"
            if config.stage_frac else "baseline") + (" linear" if config.length_warmup else "") \
        + (" reshape" if config.stage_mode == "reshape" else "") + (" + match_tokens" if config.match_tokens else "") \
        + (" recycled" if config.recycle else "")
    result = {"run": config.run_name or name,
              "stage_frac": config.stage_frac,
              "stage_len": config.stage_len, "match_tokens": config.match_tokens, "steps": step,
              "total_steps": total_steps, "tokens_seen": tokens_seen, "val_loss": last_eval["val_loss"],
              "val_ppl": ppl_of(last_eval["val_loss"]), "val_samples": last_eval.get("val_samples"),
              "train_time_s": train_time,
              **({"extra_val_ppl": ppl_of(last_eval["extra_val_loss"])} if "extra_val_loss" in last_eval else {}),
              "tokens_per_s": tokens_seen / train_time if train_time else 0.0, "config": asdict(config)}
    if master and step == total_steps:
        append_jsonl(out_dir / "results.jsonl", result)
        log("| Model/Experiment | Validation PPL | Training Time (hrs) | Tokens Seen (B) |")
        log("|------------------|----------------|---------------------|-----------------|")
        log(results_row(result))
    if world_size > 1:  # every rank leaves together: gloo aborts a process whose peer tears down mid-exchange
        dist.barrier()
    return result


# ----------------------------------------------------------------------------------------------------------------
# Evaluation

def ppl_of(loss):
    """exp(loss), but inf instead of an OverflowError when a diverging run's loss passes ~709 nats."""
    return math.exp(loss) if loss < 709 else float("inf")


def eval_subset(num_val, eval_samples):
    """The validation samples an evaluation scores: eval_samples of them (0 or more than there are: all) spread
    evenly over val.bin, so the set covers the whole file, not its first documents, and is the same whatever the
    micro-batch size, the number of processes or the GPU."""
    n = min(eval_samples or num_val, num_val)
    return np.arange(n, dtype=np.int64) * num_val // n


@torch.no_grad()  # no graph: with autograd on, every micro-batch's activations would be kept until the sum is read
def estimate_loss(model, val_path, samples, config, autocast, device, rank=0, world_size=1):
    """Mean validation loss per token at full context over the given samples (eval_subset), in micro-batches of
    micro_batch_size (a memory knob only). Under DDP the ranks split the micro-batches and sum; the result does
    not depend on the rank count."""
    chunks = [samples[i:i + config.micro_batch_size] for i in range(0, len(samples), config.micro_batch_size)]
    total = torch.zeros(2, device=device)  # sum of token losses, number of tokens
    model.eval()
    for chunk in chunks[rank::world_size]:
        x, y = get_batch(val_path, chunk, config.block_size, config.block_size, config.vocab_size, device)
        with autocast:
            _, loss = model(x, y)
        total += torch.stack([loss.float() * y.numel(), torch.tensor(float(y.numel()), device=device)])
    model.train()
    if world_size > 1:
        dist.all_reduce(total)
    return (total[0] / total[1]).item()


def results_row(result):
    """A row of the seed's table: | Model/Experiment | Validation PPL | Training Time (hrs) | Tokens Seen (B) |."""
    return (f"| {result['run']} | {result['val_ppl']:.3f} | {result['train_time_s'] / 3600:.2f} | "
            f"{result['tokens_seen'] / 1e9:.3g} |")


# ----------------------------------------------------------------------------------------------------------------
# Decoding (seed question 3) and the perplexity of any text file

def load_model(config, device):
    """The model of a checkpoint of this script (--ckpt) or of a local Hugging Face GPT-2 folder (--init_from)."""
    if config.ckpt:
        checkpoint = read_checkpoint(Path(config.ckpt))
        model = GPT(GPTConfig(**{k: checkpoint["config"][k] for k in MODEL_KEYS}))
        model.load_state_dict(checkpoint["model"])
    elif config.init_from != "scratch":
        model = GPT.from_pretrained(config.init_from)
    else:
        raise ValueError("this command needs a model: --ckpt out/x/ckpt.pt or --init_from path/to/gpt2-folder")
    return model.to(device).eval()


def check_ids(largest, model, what):
    """Token ids must index the model's embedding: here, not as an IndexError deep inside it."""
    if largest >= model.config.vocab_size:
        raise ValueError(f"{what}: token id {largest} >= the model's vocabulary of {model.config.vocab_size}: the "
                         f"model was trained with another tokenizer than GPT-2's; use a model with GPT-2's vocabulary")


def load_tokenizer(config):
    from data_owt import get_encoding  # lazy: only decoding and ppl need the tokenizer
    return get_encoding(config.bpe_dir or None)


def sample(config):
    """Continue --prompt by --max_new_tokens tokens: greedy (--temperature 0) or sampled, with the KV cache."""
    _, _, device = setup_device(config)
    model, enc = load_model(config, device), load_tokenizer(config)  # the model's errors first: no download
    prompt = enc.encode(config.prompt, allowed_special={"<|endoftext|>"}) or [enc.eot_token]
    check_ids(max(prompt), model, "--prompt")
    generator = torch.Generator(device=device).manual_seed(config.seed)
    t0 = time.time()
    tokens, _ = model.generate(torch.tensor([prompt], device=device), config.max_new_tokens, config.temperature,
                               config.top_k, vocab_limit=enc.n_vocab, generator=generator)
    dt = time.time() - t0
    print(enc.decode(tokens[0].tolist()))
    how = "greedy" if config.temperature == 0 else f"temperature {config.temperature}, top_k {config.top_k or 'all'}"
    print(f"({config.max_new_tokens} tokens, {how}, KV cache: {dt:.2f} s, {config.max_new_tokens / dt:.1f} tok/s)",
          file=sys.stderr)
    return tokens[0, len(prompt):].tolist()


@torch.no_grad()
def perplexity(config):
    """Perplexity of --text_file, tokenized on the fly (no <|endoftext|> added). Non-overlapping windows of
    block_size tokens, as val.bin is evaluated: every token is predicted once, from the tokens before it in its
    window (a sliding window would give later tokens more context and a lower figure)."""
    path = require_file(config.text_file, "--text_file takes a UTF-8 text file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e}); convert it first") from None
    _, _, device = setup_device(config)
    model, enc = load_model(config, device), load_tokenizer(config)  # the model's errors first: no download
    tokens = torch.tensor(enc.encode_ordinary(text), dtype=torch.long)
    if len(tokens) < 2:
        raise ValueError(f"{path}: {len(tokens)} token(s); perplexity needs at least 2")
    check_ids(tokens.max().item(), model, f"{path}")
    dtype = pick_dtype(config, device)
    T, starts, total, t0 = model.config.block_size, range(0, len(tokens) - 1, model.config.block_size), 0.0, time.time()
    for i, start in enumerate(starts):
        window = tokens[start:start + T + 1].to(device)  # T inputs and their T next tokens
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            _, loss = model(window[None, :-1], window[None, 1:])
        total += loss.item() * (len(window) - 1)
        if (i + 1) % 50 == 0 or i + 1 == len(starts):
            rate = (i + 1) / (time.time() - t0)
            print(f"ppl: window {i + 1:,}/{len(starts):,} | {rate * T:,.0f} tok/s | ETA "
                  f"{(len(starts) - i - 1) / rate:.0f} s", file=sys.stderr)
    loss = total / (len(tokens) - 1)
    print(f"{path}: {len(tokens) - 1:,} tokens predicted in {len(starts):,} non-overlapping windows of up to {T}: "
          f"loss {loss:.4f} | ppl {ppl_of(loss):.3f}")
    return ppl_of(loss)


# ----------------------------------------------------------------------------------------------------------------
# The report: the seed's runs and the variants, one after another, then the seed's table and figure

def report_runs(config, names=()):
    """name -> (what it is, its overrides). The seed's three runs, a second baseline seed (the noise), the variants;
    NAME_seedN is run NAME with seed + N - 1 (e.g. exp1_seed2, baseline_seed3)."""
    frac, short = config.stage_frac or 0.25, config.stage_len
    staged = dict(stage_frac=frac)
    known = {"baseline": ("full context all the way", {}),
            "baseline_seed2": ("baseline, another seed (init and data order)", dict(seed=config.seed + 1)),
            "exp1": (f"seed Exp 1: {frac:.0%} of steps at ctx {short}", staged),
            "exp2": ("seed Exp 2: Exp 1 + match_tokens (a 2nd epoch)", dict(staged, match_tokens=True)),
            "reshape": (f"Exp 1 as reshape: {config.block_size // short} rows per sample",
                        dict(staged, stage_mode="reshape")),
            "recycle": ("Exp 2, recycling the truncated samples", dict(staged, match_tokens=True, recycle=True)),
            "two_stage": (f"ctx {short} for 25%, {2 * short} for 25%", dict(stages=f"{short}:0.25,{2 * short}:0.25")),
            "linear": (f"linear {short} -> {config.block_size} over {frac:.0%}", dict(staged, length_warmup=True)),
            "tokens_lr": ("Exp 1, LR decayed by tokens", dict(staged, lr_decay_by="tokens"))}
    for name in names:
        base, _, n = name.rpartition("_seed")
        if name not in known and base in known and n.isdigit() and int(n) > 0:
            seed = config.seed + int(n) - 1
            known[name] = (f"{known[base][0]}; seed {seed}", dict(known[base][1], seed=seed))
    return known


REPORT_KEYS = ("stage_frac", "stages", "match_tokens", "recycle", "length_warmup", "stage_mode", "lr_decay_by", "seed",
               "out_dir", "run_name", "runs", "report_only", "resume", "seeds", "report_jobs")
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def report_jobs(config, names):
    """(name, run folder name, overrides) of every run of the report: each named run once per seed, the k-th seed
    in folder NAME_seedk (NAME for the first): runs of the same seed start from the same weights and data order."""
    known = report_runs(config, names)
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(f"--runs: unknown run(s) {unknown} (known: {', '.join(known)})")
    jobs = []
    for k in range(1, config.seeds + 1):
        for name in names:
            overrides = dict(known[name][1])
            overrides["seed"] = overrides.get("seed", config.seed) + k - 1
            jobs.append((name, name if k == 1 else f"{name}_seed{k}", overrides))
    return known, jobs


def report(config):
    """Train each of --runs over --seeds as subprocesses in out_dir/NAME[_seedk] (--report_jobs at a time; a
    finished run is kept, an interrupted one resumed), time a step of every shape the runs use (interleaved), then
    write out_dir/report.md and out_dir/val_loss.png."""
    names = [n for n in config.runs.split(",") if n]
    known, jobs = report_jobs(config, names)
    out_dir = Path(config.out_dir)
    defaults = Config()
    shared = [f"--{k}={v}" for k, v in asdict(config).items() if k not in REPORT_KEYS and v != getattr(defaults, k)]
    env = {**os.environ, **({"OMP_NUM_THREADS": "1"} if config.report_jobs > 1 else {})}
    todo = [job for job in jobs if not (out_dir / job[1] / "results.jsonl").is_file()] if not config.report_only else []
    started, running, done = time.time(), [], len(jobs) - len(todo)
    while todo or running:
        while todo and len(running) < config.report_jobs:
            name, folder, overrides = todo.pop(0)
            run_dir = out_dir / folder
            command = [sys.executable, str(Path(__file__).resolve()), "train", *shared, f"--out_dir={run_dir}",
                       f"--run_name={folder}", *(f"--{k}={v}" for k, v in overrides.items()),
                       *(["--resume"] if (run_dir / "ckpt.pt").is_file() else [])]
            run_dir.mkdir(parents=True, exist_ok=True)
            log = open(run_dir / "train.log", "a")
            running.append((folder, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env), log))
            print(f"report: started {folder} ({known[name][0]}, seed {overrides['seed']}), log {run_dir / 'train.log'}"
                  f" | {done}/{len(jobs)} done, {time.time() - started:,.0f} s", flush=True)
        time.sleep(0.2)
        for item in [r for r in running if r[1].poll() is not None]:
            folder, process, log = item
            running.remove(item)
            log.close()
            done += 1
            if process.returncode:
                for _, other, other_log in running:
                    other.terminate()
                    other.wait()
                    other_log.close()
                raise ValueError(f"report: run {folder} failed (exit {process.returncode}); see "
                                 f"{out_dir / folder / 'train.log'}, then re-run the report: finished runs are kept")
    table = write_report(out_dir, config, names, {n: known[n][0] for n in names})
    print(table)


def mean_sd(values):
    mean = sum(values) / len(values)
    return mean, (math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0)


def interval(values):
    """mean, sd and the half-width of a 95% confidence interval (Student's t, n - 1 degrees of freedom)."""
    mean, sd = mean_sd(values)
    n = len(values)
    return mean, sd, (T_975.get(n - 1, 1.96) * sd / math.sqrt(n) if n > 1 else math.inf)


def timing_setup(config):
    """(device, accum, dtype, autocast, scaler, model) for timing steps: the training loop's, random weights."""
    _, _, device = setup_device(config)
    accum = validate(config)
    dtype = pick_dtype(config, device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    torch.manual_seed(config.seed)
    model = GPT(GPTConfig(**{k: getattr(config, k) for k in MODEL_KEYS}, dropout=config.dropout)).to(device)
    return device, accum, dtype, autocast, scaler, model


def step_times(config, shapes):
    """Median seconds of one training step per (sequences, context) shape, the shapes interleaved in every round
    (round 0 warms up), on random tokens, at the report's model and batch settings: a shared machine's drift hits
    them all alike, and no wall clock of a run enters a figure."""
    device, accum, _, autocast, scaler, model = timing_setup(config)
    optimizer = model.configure_optimizers(config.weight_decay, config.learning_rate, (config.beta1, config.beta2),
                                           device.type, config.decay_wpe)
    times = {shape: [] for shape in shapes}
    for rnd in range(config.bench_repeats + 1):
        for sequences, context in shapes:
            n, micro_steps = pack_micro_batches(config.micro_batch_size, accum, context, config.block_size)
            n = n * sequences // config.batch_size  # reshaped rows: more, shorter sequences
            batch = tuple(torch.randint(config.vocab_size, (n, context), device=device) for _ in "xy")
            for _ in range(config.bench_steps):
                t = sum(time_step(model, optimizer, scaler, batch, micro_steps, autocast, config, device))
                if rnd:
                    times[(sequences, context)].append(t)
    return {shape: float(np.median(ts)) for shape, ts in times.items()}


def modeled_seconds(plan, seconds):
    """A run's training time from the measured step time of each of its stages' shapes."""
    return sum(stage.steps * seconds[stage_shape(plan, stage)] for stage in plan.stages)


def stage_shape(plan, stage):
    rows = plan.block_size // stage.context if stage.reshape else 1
    return plan.batch_size * rows, stage.context


def duration(seconds):
    """Seconds in the unit that fits: '2.41 h', '13.2 min', '45.0 s'."""
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min" if seconds >= 60 \
        else f"{seconds:.1f} s"


def write_report(out_dir, config, names, descriptions=None):
    """report.md from every run's results.jsonl: per configuration the mean +- sd over seeds, the paired
    difference to the baseline (same seed) with its sd and 95% interval, tokens seen and the training time
    modeled from measured step times; val_loss.png from the runs' log.jsonl."""
    known, jobs = report_jobs(config, names)
    results = {}
    for name, folder, _ in jobs:
        path = out_dir / folder / "results.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run {folder} has not finished; run the report without "
                                    f"--report_only, or drop {name} from --runs")
        results.setdefault(name, []).append(json.loads(path.read_text().splitlines()[-1]))
    timing_path = out_dir / "step_times.json"
    shapes = sorted({stage_shape(plan_of(r), s) for rs in results.values() for r in rs for s in plan_of(r).stages})
    timing = json.loads(timing_path.read_text()) if timing_path.is_file() else {}
    if sorted(tuple(t["shape"]) for t in timing.get("steps", [])) != shapes:
        measured = step_times(config, shapes)
        timing = {"threads": torch.get_num_threads(), "loadavg": os.getloadavg(),
                  "steps": [{"shape": list(k), "seconds": v} for k, v in measured.items()]}
        write_text_atomic(timing_path, json.dumps(timing, indent=1) + "\n")
    seconds = {tuple(t["shape"]): t["seconds"] for t in timing["steps"]}
    base = results.get("baseline")
    n = len(next(iter(results.values())))
    lines = [f"Validation PPL over {n} seed(s) (mean +- sd); the difference to the baseline is paired by seed (same "
             f"initial weights and data order), with its 95% interval (Student's t). Each PPL is scored on "
             f"{results[names[0]][0].get('val_samples') or '?'} validation samples. Training time: the runs' plans "
             f"times the median step time of each shape, measured interleaved ({timing['threads']} thread(s), load "
             f"average {timing['loadavg'][0]:.2f}).", "",
             "| run | val PPL | vs baseline (PPL) | vs baseline (%) | training time | time vs baseline | tokens seen |",
             "|---|---|---|---|---|---|---|"]
    base_time = modeled_seconds(plan_of(base[0]), seconds) if base else None
    summary = {}
    for name, rs in results.items():
        ppl_mean, ppl_sd = mean_sd([r["val_ppl"] for r in rs])
        time_s = modeled_seconds(plan_of(rs[0]), seconds)
        row = dict(ppl_mean=ppl_mean, ppl_sd=ppl_sd, seconds=time_s, tokens=rs[0]["tokens_seen"],
                   ppl=[r["val_ppl"] for r in rs], seeds=[r["config"]["seed"] for r in rs])
        diff = pct = "-"
        if base and name != "baseline":
            d = [r["val_ppl"] - b["val_ppl"] for r, b in zip(rs, base)]
            p = [100 * (r["val_ppl"] / b["val_ppl"] - 1) for r, b in zip(rs, base)]
            row["diff"], row["pct"] = interval(d), interval(p)
            diff = "{:+.3f} +- {:.3f} [{:+.3f}, {:+.3f}]".format(row["diff"][0], row["diff"][1],
                                                                  row["diff"][0] - row["diff"][2],
                                                                  row["diff"][0] + row["diff"][2])
            pct = "{:+.2f}% [{:+.2f}, {:+.2f}]".format(row["pct"][0], row["pct"][0] - row["pct"][2],
                                                       row["pct"][0] + row["pct"][2])
        saved = f"{100 * (time_s / base_time - 1):+.1f}%" if base_time else "-"
        what = f" ({descriptions[name]})" if descriptions and name in descriptions else ""
        lines.append(f"| {name}{what} | {ppl_mean:.3f} +- {ppl_sd:.3f} | {diff} | {pct} | {duration(time_s)} | "
                     f"{saved} | {human(rs[0]['tokens_seen'])} |")
        summary[name] = row
    table = "\n".join(lines) + "\n"
    write_text_atomic(out_dir / "report.md", table)
    write_text_atomic(out_dir / "report.json", json.dumps({"runs": summary, "timing": timing}, indent=1) + "\n")
    plot_val_loss(out_dir, {name: [folder for n, folder, _ in jobs if n == name] for name in names})
    return table


def plan_of(result):
    """The plan of a finished run, from its results row's config."""
    c = Config(**{k: v for k, v in result["config"].items() if k in {f.name for f in dataclasses.fields(Config)}})
    steps = c.max_iters or result["total_steps"]
    return plan_for(dataclasses.replace(c, max_iters=steps), steps * c.batch_size)


def plot_val_loss(out_dir, runs):
    """Validation loss against tokens seen, like the report's figure: per configuration the mean over its seeds
    (runs: name -> run folders) and a band from the lowest to the highest seed (needs matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("report: matplotlib is not installed, so no val_loss.png (pip install matplotlib); report.md is written")
        return
    fig, ax = plt.subplots(figsize=(7, 4.4))
    for name, folders in runs.items():
        curves = []
        for folder in folders:
            rows = [json.loads(line) for line in (out_dir / folder / "log.jsonl").read_text().splitlines()]
            curves.append({r["tokens"]: r["val_loss"] for r in rows if "val_loss" in r and r["tokens"]})
        tokens = sorted(set.intersection(*(set(c) for c in curves)))  # step 0 (ln vocab) left out
        values = np.array([[c[t] for t in tokens] for c in curves])
        x = np.array(tokens) / 1e6
        line, = ax.plot(x, values.mean(axis=0), marker=".", label=f"{name} ({len(curves)} seeds)")
        if len(curves) > 1:
            ax.fill_between(x, values.min(axis=0), values.max(axis=0), color=line.get_color(), alpha=0.2)
    ax.set(xlabel="tokens seen (M)", ylabel="validation loss (mean over seeds; band: min..max)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = out_dir / "val_loss.tmp.png"
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, out_dir / "val_loss.png")


def write_text_atomic(path, text):
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------
# Benchmark: what a step costs at each context, what the staged run saves, what SDPA and fused AdamW buy

DECODE_BATCH, DECODE_PROMPT, DECODE_TOKENS = 8, 16, 64
SDPA_FUSED, UNPACKED, PLAIN = ("sdpa + fused AdamW", "sdpa + fused AdamW, unpacked short micro-batches",
                               "plain attention + for-loop AdamW")


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


def time_step(model, optimizer, scaler, micro_batch, accum, autocast, config, device):
    """Seconds of one training step on a fixed micro-batch: (forward + backward of accum micro-batches, update)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    forward_backward(model, [micro_batch] * accum, accum, autocast, scaler)
    sync()
    t1 = time.perf_counter()
    optimizer_step(model, optimizer, scaler, config.grad_clip)
    sync()
    return t1 - t0, time.perf_counter() - t1


def bench_steps(config, model, device, autocast, scaler, accum):
    """Median step time per (variant, context), same sequences per step, the variants and contexts interleaved in
    every round (round 0 warms up and is not counted): a shared machine's drift hits them all alike."""
    short, full = config.stage_len, config.block_size
    betas = (config.beta1, config.beta2)
    fused = model.configure_optimizers(config.weight_decay, config.learning_rate, betas, device.type,
                                       config.decay_wpe, fused=True)
    # (variant, context) -> (sdpa, optimizer, (sequences per micro-batch, micro-steps)): what train() runs, and
    # at the short context also the micro-batches of micro_batch_size sequences it ran before packing them
    cases = {(SDPA_FUSED, ctx): (True, fused, pack_micro_batches(config.micro_batch_size, accum, ctx, full))
             for ctx in sorted({short, full})}
    if short < full:
        cases[(UNPACKED, short)] = (True, fused, (config.micro_batch_size, accum))
    if config.bench_plain and not use_compile(config, device):  # what SDPA and fused AdamW gain over plain ones
        loop = model.configure_optimizers(config.weight_decay, config.learning_rate, betas, device.type,
                                          config.decay_wpe, fused=False)
        cases.update({(PLAIN, ctx): (False, loop, (config.micro_batch_size, accum)) for ctx in sorted({short, full})})
    step_model = torch.compile(model, dynamic=False) if use_compile(config, device) else model
    batches = {(n, ctx): tuple(torch.randint(config.vocab_size, (n, ctx), device=device) for _ in "xy")
               for (_, ctx), (_, _, (n, _)) in cases.items()}
    times, peaks, started = {}, {}, time.time()
    for rnd in range(config.bench_repeats + 1):
        for key, (sdpa, optimizer, (n, micro_steps)) in cases.items():
            CausalSelfAttention.use_sdpa = sdpa
            with PeakMemory(device) as memory:
                for _ in range(config.bench_steps):
                    t = time_step(step_model, optimizer, scaler, batches[(n, key[1])], micro_steps, autocast,
                                  config, device)
                    if rnd:
                        times.setdefault(key, []).append(t)
            peaks[key] = max(peaks.get(key, 0.0), memory.peak)
        print(f"bench: round {rnd}/{config.bench_repeats} done ({'warm-up, ' if not rnd else ''}"
              f"{time.time() - started:,.0f} s)", flush=True)
    CausalSelfAttention.use_sdpa = True
    rows = []
    for (name, ctx), ts in times.items():
        fwd_bwd, update = (float(np.median([t[i] for t in ts])) for i in (0, 1))
        step = float(np.median([sum(t) for t in ts]))
        flops = model.estimate_mfu(config.batch_size, ctx, step, 1.0)  # with peak 1: model FLOP/s
        n, micro_steps = cases[(name, ctx)][2]
        rows.append(dict(variant=name, context=ctx, sequences=config.batch_size, micro_batch=n, micro_steps=micro_steps,
                         step_ms=step * 1e3, fwd_bwd_ms=fwd_bwd * 1e3, update_ms=update * 1e3,
                         tokens_per_s=config.batch_size * ctx / step, model_tflops=flops / 1e12,
                         mfu=flops / peak if (peak := peak_flops(config, device)) else None,
                         peak_mib=peaks[(name, ctx)], samples=len(ts)))
    return rows


def bench_runs(config, steps):
    """Wall-clock of real runs (the train() loop, data reads included) of `steps` steps on random tokens: the
    baseline and the staged plan (stage_frac, 0.25 if unset), alternated bench_repeats times. Returns seconds."""
    frac = config.stage_frac or 0.25
    seconds = {"baseline": [], f"staged {frac:.0%} x {config.stage_len}": []}
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(config.seed)
        sizes = {"train": steps * config.batch_size * config.block_size + 1,
                 "val": config.micro_batch_size * config.block_size + 1}
        for split, n in sizes.items():
            rng.integers(0, config.vocab_size, n, dtype=np.uint16).tofile(Path(tmp) / f"{split}.bin")
        (Path(tmp) / "meta.json").write_text(json.dumps({"vocab_size": config.vocab_size,
                                                         **{f"{k}_tokens": n for k, n in sizes.items()}}))
        for rnd in range(config.bench_repeats):
            for name, stage_frac in zip(seconds, (0.0, frac)):
                run = dataclasses.replace(config, data_dir=tmp, out_dir=f"{tmp}/{name}{rnd}", stage_frac=stage_frac,
                                          max_iters=steps, warmup_iters=min(config.warmup_iters, steps - 1),
                                          eval_samples=config.micro_batch_size, eval_interval=steps, log_interval=steps, stages="",
                                          match_tokens=False, length_warmup=False, stop_step=0, extra_val="",
                                          resume=False)
                with contextlib.redirect_stdout(io.StringIO()):
                    seconds[name].append(train(run)["train_time_s"])
            print(f"bench: runs round {rnd + 1}/{config.bench_repeats}: " + ", ".join(
                f"{name} {s[-1]:.1f} s" for name, s in seconds.items()), flush=True)
    return seconds


def bench_decode(config, model, device):
    """ms per new token of greedy decoding, batch 8, 64 new tokens after a 16-token prompt: with the KV cache vs
    recomputing the whole prefix for every token; alternated, medians."""
    model.eval()
    prompt = torch.randint(config.vocab_size, (DECODE_BATCH, DECODE_PROMPT), device=device)
    times = {True: [], False: []}
    for rnd in range(config.bench_repeats + 1):
        for use_cache in times:
            t0 = time.perf_counter()
            model.generate(prompt, DECODE_TOKENS, use_cache=use_cache)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if rnd:
                times[use_cache].append((time.perf_counter() - t0) / DECODE_TOKENS * 1e3)
    model.train()
    cached, recomputed = (float(np.median(times[c])) for c in (True, False))
    return dict(batch=DECODE_BATCH, prompt=DECODE_PROMPT, new_tokens=DECODE_TOKENS, cache_ms_per_token=cached,
                recompute_ms_per_token=recomputed, speedup=recomputed / cached)


def bench(config):
    """Print the benchmark tables and write out_dir/bench_gpt.json (see README, Performance)."""
    device, accum, dtype, autocast, scaler, model = timing_setup(config)
    load = os.getloadavg()
    print(f"bench: GPT {model.num_params() / 1e6:.2f}M, {config.batch_size} sequences per step "
          f"({config.micro_batch_size} x {accum}), device {device}, dtype {str(dtype).removeprefix('torch.')}, "
          f"{torch.get_num_threads()} threads, load average {load[0]:.2f}", flush=True)
    result = {"device": str(device), "dtype": str(dtype), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "loadavg_start": load, "config": asdict(config),
              "steps": bench_steps(config, model, device, autocast, scaler, accum)}
    rows = {(r["variant"], r["context"]): r for r in result["steps"]}
    print("\n| variant | context | micro-batch x steps | step ms | fwd+bwd ms | update ms | tokens/s | model TFLOP/s "
          "| MFU | peak MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in result["steps"]:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        print(f"| {r['variant']} | {r['context']} | {r['micro_batch']} x {r['micro_steps']} | {r['step_ms']:,.1f} | "
              f"{r['fwd_bwd_ms']:,.1f} | {r['update_ms']:,.1f} | {r['tokens_per_s']:,.0f} | {r['model_tflops']:.3g} "
              f"| {mfu} | {r['peak_mib']:,.0f} |")
    short, full, frac = config.stage_len, config.block_size, config.stage_frac or 0.25
    result["ratios"] = {}
    for name in dict.fromkeys(r["variant"] for r in result["steps"] if (r["variant"], full) in rows):
        a, b = rows[(name, short)], rows[(name, full)]
        ratio = a["step_ms"] / b["step_ms"]
        result["ratios"][name] = dict(step_time_ratio=ratio, fwd_bwd_ratio=a["fwd_bwd_ms"] / b["fwd_bwd_ms"],
                                      ideal=short / full, projected_staged_saving=frac * (1 - ratio))
        print(f"{name}: step at {short} / step at {full} = {ratio:.3f} (ideal {short / full:.3f}; fwd+bwd alone "
              f"{a['fwd_bwd_ms'] / b['fwd_bwd_ms']:.3f}) -> a run with {frac:.0%} of its steps at {short} saves "
              f"{frac * (1 - ratio):.1%} of the wall-clock (ideal {frac * (1 - short / full):.1%})")
    if (UNPACKED, short) in rows:  # the same sequences per step, in fewer, larger micro-batches
        packed, unpacked = rows[(SDPA_FUSED, short)], rows[(UNPACKED, short)]
        result["packing"] = dict(context=short, packed_ms=packed["step_ms"], unpacked_ms=unpacked["step_ms"],
                                 speedup=unpacked["step_ms"] / packed["step_ms"])
        print(f"short stage (context {short}): {packed['micro_batch']} x {packed['micro_steps']} micro-steps take "
              f"{packed['step_ms']:,.1f} ms a step, {unpacked['micro_batch']} x {unpacked['micro_steps']} take "
              f"{unpacked['step_ms']:,.1f} ms: packed is {result['packing']['speedup']:.2f}x as fast")
    if (PLAIN, full) in rows:
        for ctx in sorted({short, full}):
            fast, slow = rows[(SDPA_FUSED, ctx)], rows[(PLAIN, ctx)]
            print(f"context {ctx}: sdpa + fused AdamW is {slow['step_ms'] / fast['step_ms']:.2f}x as fast as "
                  f"the plain version (update {slow['update_ms'] / fast['update_ms']:.2f}x)")
    if config.bench_profile:  # where a step's time goes: what does not shrink with the context shows up here
        optimizer = model.configure_optimizers(config.weight_decay, config.learning_rate, (config.beta1, config.beta2),
                                               device.type, config.decay_wpe)
        for ctx in sorted({short, full}):
            batch = tuple(torch.randint(config.vocab_size, (config.micro_batch_size, ctx), device=device) for _ in "xy")
            with torch.profiler.profile() as prof:
                time_step(model, optimizer, scaler, batch, accum, autocast, config, device)
            print(f"\nprofile of one step at context {ctx} (top operators by own time):")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    if config.bench_runs:
        seconds = bench_runs(config, config.bench_runs)
        (base, base_s), (staged, staged_s) = seconds.items()
        saving = 1 - np.median(staged_s) / np.median(base_s)
        result["runs"] = dict(steps=config.bench_runs, seconds=seconds, measured_saving=saving)
        print(f"real runs of {config.bench_runs} steps: {base} {np.median(base_s):.1f} s, {staged} "
              f"{np.median(staged_s):.1f} s (medians of {config.bench_repeats}): {saving:.1%} less wall-clock")
    if config.bench_decode:
        result["decode"] = d = bench_decode(config, model, device)
        print(f"greedy decoding, batch {d['batch']}, {d['new_tokens']} new tokens: {d['cache_ms_per_token']:.2f} "
              f"ms/token with the KV cache, {d['recompute_ms_per_token']:.2f} recomputing ({d['speedup']:.1f}x)")
    result["loadavg_end"] = os.getloadavg()
    out = Path(config.out_dir) / "bench_gpt.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {out} (load average at the end {result['loadavg_end'][0]:.2f})")
    return result


# ----------------------------------------------------------------------------------------------------------------
# Main

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
    command = config = None
    try:
        command, config = parse_args(argv)
        if command == "plan":
            num_samples = config.num_samples or count_samples(
                Path(config.data_dir) / "train.bin", config.block_size, read_meta(config.data_dir).get("train_tokens"))
            print(describe_plan(plan_for(config, num_samples), config))
        elif command == "sample":
            sample(config)
        elif command == "ppl":
            perplexity(config)
        elif command == "report":
            report(config)
        elif command == "bench":
            bench(config)
        else:
            train(config)
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
    if command == "report":
        return "finished runs are kept and an interrupted one resumes: run the same report command again"
    if command != "train" or config is None:
        return "nothing was written"
    path = Path(config.out_dir) / "ckpt.pt"
    try:
        step = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"]
    except Exception:  # no checkpoint yet, or one that cannot be read: say so, never a second traceback
        return f"no checkpoint was written yet ({path}); start the run again"
    return f"{path} (step {step:,}) is intact: continue with the same command and --resume"


if __name__ == "__main__":
    sys.exit(main())
