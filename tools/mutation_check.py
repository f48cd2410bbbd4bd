"""Mutation check: do the tests catch the bugs a fork introduces? (A script, not part of the CI run.)

Each mutant is one small, realistic bug planted in one of the four scripts (gpt_staged.py, ds2.py, data_owt.py,
data_multiwoz.py): a string replacement that must match the source exactly once (the script stops with an error
naming the mutant when its anchor text is gone, so a refactor cannot silently turn a mutant into a no-op). Each is
applied alone, on a temporary copy of the repository, and the test files related to it run there
(OMP_NUM_THREADS=1, stopping at the first failure). A mutant is caught when a test fails (or the run times out),
survived when every test passes. First the same test files run on the unmutated copy: they must pass, or every
"catch" would mean nothing.

    python tools/mutation_check.py                   # all mutants against this checkout
    python tools/mutation_check.py --repo /tmp/x     # against another tree (e.g. a `git archive HEAD` of main)
    python tools/mutation_check.py --only gpt_wd_biases,ds2_clip_wrong_end --jobs 2
    python tools/mutation_check.py --list            # the mutants, without running anything

Test files named for a mutant but missing from the tree (e.g. tests added later) are left out of its run.
Exit status: 0 when every mutant is caught, 1 when some survived, 2 on a missing anchor or a failing baseline
(--deselect_failing instead leaves the failing tests out of every run, e.g. to measure an older commit).
"""
import argparse
import concurrent.futures
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

GPT = ["tests/test_spec_gpt.py", "tests/test_gpt_staged.py"]
GPT_VARIANTS = ["tests/test_spec_gpt.py", "tests/test_staged_variants.py", "tests/test_gpt_staged.py"]
T5 = ["tests/test_spec_ds2.py", "tests/test_ds2.py"]
TEMPLATES = ["tests/test_templates.py", "tests/test_spec_ds2.py"]
OWT = ["tests/test_data_owt.py"]
MWOZ = ["tests/test_data_multiwoz.py"]


@dataclass
class Mutant:
    name: str
    file: str
    what: str            # the bug, in words
    edits: tuple         # ((old, new), ...): alternatives, the first whose old text occurs exactly once is used
    tests: list


def m(name, file, what, old, new, tests, *alternatives):
    return Mutant(name, file, what, ((old, new),) + alternatives, tests)


MUTANTS = [
    # ---- gpt_staged.py: model ------------------------------------------------------------------------------
    m("gpt_wd_biases", "gpt_staged.py", "weight decay also on biases and LayerNorm weights",
      "p.dim() >= 2 and (decay_wpe", "p.dim() >= 1 and (decay_wpe", GPT + ["tests/test_bench.py"]),
    m("gpt_wd_wpe_flag", "gpt_staged.py", "decay_wpe inverted: the position table is never decayed",
      '(decay_wpe or n != "transformer.wpe.weight")', '(decay_wpe and n != "transformer.wpe.weight")', GPT),
    m("gpt_clip_never", "gpt_staged.py", "gradient clipping that never clips",
      "torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)",
      'torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))', GPT),
    m("gpt_init_no_residual_scale", "gpt_staged.py", "GPT-2's 1/sqrt(2 n_layer) residual init scaling removed",
      "nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))",
      "nn.init.normal_(p, mean=0.0, std=0.02)", GPT),
    m("gpt_init_residual_n_layer", "gpt_staged.py", "residual init scaled by 1/sqrt(n_layer), not 1/sqrt(2 n_layer)",
      "std=0.02 / math.sqrt(2 * config.n_layer)", "std=0.02 / math.sqrt(config.n_layer)", GPT),
    m("gpt_untied_head", "gpt_staged.py", "token table and output head not tied",
      "self.transformer.wte.weight = self.lm_head.weight", "pass", GPT),
    m("gpt_gelu_exact", "gpt_staged.py", "exact GELU instead of GPT-2's tanh approximation",
      'nn.GELU(approximate="tanh")', "nn.GELU()", GPT),
    m("gpt_not_causal", "gpt_staged.py", "training attention is not causal",
      "is_causal=kv is None or T > 1", "is_causal=kv is not None and T > 1", GPT),
    m("gpt_cache_positions", "gpt_staged.py", "decoding with a cache restarts the positions at 0",
      "pos = torch.arange(start, T, dtype=torch.long, device=idx.device)",
      "pos = torch.arange(0, T - start, dtype=torch.long, device=idx.device)", GPT_VARIANTS),
    m("gpt_hf_transpose", "gpt_staged.py", "from_pretrained forgets to transpose the square attn.c_proj",
      '("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight"', '("attn.c_attn.weight", "mlp.c_fc.weight"',
      GPT),
    m("gpt_mfu_block_size", "gpt_staged.py", "MFU counts block_size tokens instead of the step's context",
      "flops_per_token * sequences * context / dt", "flops_per_token * sequences * self.config.block_size / dt",
      GPT + ["tests/test_bench.py"]),
    m("gpt_mfu_call_site", "gpt_staged.py", "the training loop reports MFU at block_size, not the step's context",
      "raw_model.estimate_mfu(per_gpu, context, dt", "raw_model.estimate_mfu(per_gpu, config.block_size, dt", GPT,
      ("raw_model.estimate_mfu(config.batch_size * rows // world_size, context, dt",
       "raw_model.estimate_mfu(config.batch_size * rows // world_size, config.block_size, dt")),
    # ---- gpt_staged.py: the staged plan, data, LR schedule, evaluation, resume -------------------------------
    m("gpt_plan_round_down", "gpt_staged.py", "short steps rounded down (0.25 x 24,558 = 6,139.5 -> 6,139, seed 6,140)",
      "end = int(share * steps + 0.5)", "end = int(share * steps)", GPT_VARIANTS),
    m("gpt_match_tokens_floor", "gpt_staged.py", "match_tokens extra steps rounded down: fewer tokens than baseline",
      "return math.ceil(truncated_tokens / (batch_size * block_size))",
      "return truncated_tokens // (batch_size * block_size)", GPT_VARIANTS),
    m("gpt_partial_batch", "gpt_staged.py", "the partial last batch of the epoch is kept",
      "epoch_steps = num_samples // batch_size", "epoch_steps = -(-num_samples // batch_size)", GPT_VARIANTS),
    m("gpt_truncate_tail", "gpt_staged.py", "the short stage reads the tail of each sample, not its head",
      "data[i * block_size:i * block_size + context + 1]",
      "data[i * block_size + block_size - context:i * block_size + block_size + 1]", GPT_VARIANTS),
    m("gpt_targets_unshifted", "gpt_staged.py", "targets are the inputs, not the next tokens",
      "xy[:, 1:].reshape(-1, context // rows)", "xy[:, :-1].reshape(-1, context // rows)", GPT_VARIANTS),
    m("gpt_sampler_same_epochs", "gpt_staged.py", "every epoch visits the samples in the same order",
      "np.random.default_rng([seed, epoch])", "np.random.default_rng([seed, 0])", GPT_VARIANTS),
    m("gpt_sampler_rank_slice", "gpt_staged.py", "DDP ranks read overlapping slices of the batch",
      "batch[rank * per_rank:(rank + 1) * per_rank]", "batch[rank:rank + per_rank]", GPT),
    m("gpt_lr_warmup_off_by_one", "gpt_staged.py", "warmup starts above 0 (step + 1)",
      "return config.learning_rate * step / config.warmup_iters\n    done",
      "return config.learning_rate * (step + 1) / config.warmup_iters\n    done", GPT_VARIANTS),
    m("gpt_lr_cosine_all_steps", "gpt_staged.py", "cosine over all remaining steps, not 90% of them",
      "progress = done / (config.lr_decay_frac * total)", "progress = done / total", GPT_VARIANTS),
    m("gpt_lr_floor_zero", "gpt_staged.py", "cosine down to 0 instead of min_lr (10% of the peak)",
      "return config.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (config.learning_rate - config.min_lr)",
      "return 0.5 * (1 + math.cos(math.pi * progress)) * config.learning_rate", GPT_VARIANTS),
    m("gpt_tokens_clock_full", "gpt_staged.py", "the tokens clock counts every step at block_size",
      "seen += min(max(step, 0), stage.steps) * self.step_tokens(stage)",
      "seen += min(max(step, 0), stage.steps) * self.batch_size * self.block_size", GPT_VARIANTS),
    m("gpt_recycle_new_samples", "gpt_staged.py", "recycled extra steps read new samples, not the truncated ones",
      "return step - self.steps", "return step", GPT_VARIANTS),
    m("gpt_linear_warmup_unrounded", "gpt_staged.py", "linear length warmup not rounded to multiples of 8",
      "max(stage_len, c - c % length_step)", "max(stage_len, c)", GPT_VARIANTS),
    m("gpt_val_loss_batch_means", "gpt_staged.py", "validation loss averages micro-batch means, not tokens",
      "torch.stack([loss.float() * y.numel(), torch.tensor(float(y.numel()), device=device)])",
      "torch.stack([loss.float(), torch.tensor(1.0, device=device)])", GPT),
    m("gpt_resume_no_rng", "gpt_staged.py", "resume does not restore the random state (dropout masks differ)",
      'torch.set_rng_state(states[rank]["cpu"])', "pass", GPT,
      ('torch.set_rng_state(checkpoint["rng_cpu"])', "pass")),
    m("gpt_count_samples", "gpt_staged.py", "samples counted without keeping the last one's target token",
      "samples = (size // 2 - 1) // block_size", "samples = size // 2 // block_size", GPT_VARIANTS),
    m("gpt_reshape_flag_lost", "gpt_staged.py", "stage_mode reshape is ignored: short steps truncate",
      'Stage(n, c, "short", stage_mode == "reshape")', 'Stage(n, c, "short")', GPT_VARIANTS),
    m("gpt_plain_mask_offset", "gpt_staged.py", "the written-out attention's causal mask hides the diagonal",
      ".triu(S - T + 1)", ".triu(S - T)", ["tests/test_bench.py"]),
    m("gpt_pack_unequal", "gpt_staged.py", "short-stage packing makes micro-batches of unequal size",
      "if accum % d == 0)", ")", GPT + ["tests/test_gpu_path.py"]),
    m("gpt_eval_subset_head", "gpt_staged.py", "the validation subset is the first samples, not spread over val.bin",
      "return np.arange(n, dtype=np.int64) * num_val // n", "return np.arange(n, dtype=np.int64)",
      GPT + ["tests/test_honest_numbers.py"]),
    # ---- ds2.py: T5 --------------------------------------------------------------------------------------------
    m("t5_decoder_bidirectional", "ds2.py", "the decoder uses the encoder's bidirectional buckets",
      "bidirectional=stack is self.encoder", "bidirectional=True", T5),
    m("t5_bucket_direction", "ds2.py", "keys left of the query get the +16 buckets instead of keys to the right",
      "(relative > 0).long() * num_buckets", "(relative < 0).long() * num_buckets", T5),
    m("t5_decoder_looks_ahead", "ds2.py", "the decoder's distance counts keys ahead, not behind",
      "n = (-relative).clamp(min=0)", "n = relative.clamp(min=0)", T5),
    m("t5_exact_buckets", "ds2.py", "a quarter, not half, of the buckets are exact distances",
      "max_exact = num_buckets // 2", "max_exact = num_buckets // 4", T5),
    m("t5_no_output_scale", "ds2.py", "the d_model^-0.5 output scaling before the tied head is dropped",
      "x = x * self.config.d_model ** -0.5", "x = x", T5),
    m("t5_scale_untied_too", "ds2.py", "the output scaling is applied before an untied (v1.1) head too",
      "if self.config.tie_word_embeddings:  # T5 rescales", "if True:  # T5 rescales", T5),
    m("t5_causal_mask_shift", "ds2.py", "the decoder's causal mask lets each position see the next one",
      ".triu(past + 1)", ".triu(past + 2)", T5),
    m("t5_cross_mask_dropped", "ds2.py", "cross-attention attends to the source's padding",
      "cross_mask = torch.where((src == PAD_ID)[:, None, None, :], NEG_INF, 0.0)",
      "cross_mask = torch.where((src < 0)[:, None, None, :], NEG_INF, 0.0)", T5),
    m("t5_encoder_mask_dropped", "ds2.py", "the encoder attends to padding",
      "padding = (src == PAD_ID)[:, None, None, :]", "padding = (src < 0)[:, None, None, :]", T5),
    m("t5_adamw_no_decay_group", "ds2.py", "configure_optimizers never decays (the 2-D weights' group gets 0)",
      '[p for p in params if p.dim() >= 2], "weight_decay": weight_decay}',
      '[p for p in params if p.dim() >= 2], "weight_decay": 0.0}', ["tests/test_bench.py"] + T5),
    # ---- ds2.py: data, losses, LR, training ------------------------------------------------------------------
    m("ds2_clip_wrong_end", "ds2.py", "sources clipped from the wrong end: the newest turns are cut",
      'clip(data["src"][o:o + n], config.max_src_len, keep_end=True)',
      'clip(data["src"][o:o + n], config.max_src_len, keep_end=False)', T5),
    m("ds2_clip_keeps_eos_twice", "ds2.py", "a clipped source keeps its EOS inside and appends another",
      "ids[-max_len:-1] if keep_end", "ids[-max_len + 1:] if keep_end", T5),
    m("ds2_token_counts_unclipped", "ds2.py", "token counts ignore the clipping",
      "np.minimum(idx[:, 3], config.max_tgt_len).sum()", "idx[:, 3].sum()", T5),
    m("ds2_micro_equal_weights", "ds2.py", "micro-batches weighted equally, not by their share of target tokens",
      "token_counts(train_data, m, config)[1] / tgt_tokens", "len(m) / len(batch)", T5,
      ("token_counts(train_data, micro, config)[1] / tgt_tokens", "len(micro) / len(batch)")),
    m("ds2_val_loss_batch_means", "ds2.py", "validation loss averages batch means, not tokens",
      "total, count = total + loss.item() * n, count + n", "total, count = total + loss.item(), count + 1", T5),
    m("ds2_fewshot_on_eval_splits", "ds2.py", "the few-shot sample is also drawn from dev and test",
      "fewshot=config.fewshot if train else 1.0", "fewshot=config.fewshot", T5),
    m("ds2_epoch_drops_last_batch", "ds2.py", "the smaller last batch of an epoch is dropped",
      "epoch, position = divmod(step, math.ceil(len(rows) / batch_size))",
      "epoch, position = divmod(step, len(rows) // batch_size)", T5),
    m("ds2_lr_cosine_from_zero", "ds2.py", "the cosine runs over all steps, warmup included",
      "progress = min(1.0, (step - config.warmup_iters) / max(1, total_steps - config.warmup_iters))",
      "progress = min(1.0, step / max(1, total_steps))", T5),
    m("ds2_constant_lr_ignored", "ds2.py", "decay_lr false (DS2's constant LR) is ignored",
      "    if not config.decay_lr:\n        return config.learning_rate\n", "",
      T5),
    m("ds2_clip_never", "ds2.py", "gradient clipping that never clips",
      "torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)",
      'torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))', T5),
    m("ds2_resume_no_rng", "ds2.py", "resume does not restore the random state (dropout masks differ)",
      'torch.set_rng_state(states[rank]["cpu"])', "pass", T5,
      ('torch.set_rng_state(checkpoint["rng_cpu"])', "pass")),
    # ---- ds2.py: templates, inverse rules, metrics -------------------------------------------------------------
    m("tpl_every_sentence_first", "ds2.py", "every domain sentence opens with 'The user is looking for'",
      "domain_sentence(d, state, first=i == 0, quoted=quoted)", "domain_sentence(d, state, first=True, quoted=quoted)",
      TEMPLATES),
    m("tpl_plural_for_one", "ds2.py", "'for 1 people': the plural does not agree with the value",
      'else value == "1"]', 'else value != "1"]', TEMPLATES),
    m("tpl_listing_no_oxford_comma", "ds2.py", "the does-not-care list loses its serial comma",
      'return ", ".join(phrases[:-1]) + ", and " + phrases[-1]', 'return ", ".join(phrases[:-1]) + " and " + phrases[-1]',
      TEMPLATES),
    m("tpl_which_joined_by_comma", "ds2.py", "'which' phrases joined by commas instead of 'and'",
      'text += ", which " + " and ".join(which)', 'text += ", which " + ", ".join(which)', TEMPLATES),
    m("tpl_food_word_dropped", "ds2.py", "the food phrase loses its word 'food' (the paper's template)",
      '"restaurant-food": ("serves {x} food", "the food")', '"restaurant-food": ("serves {x}", "the food")', TEMPLATES),
    m("tpl_longest_reading", "ds2.py", "the inverse rule keeps the longest reading, not the shortest",
      "return min(options, key=lambda option: option[0]) if options else None",
      "return max(options, key=lambda option: option[0]) if options else None", TEMPLATES),
    m("tpl_no_generate_and_check", "ds2.py", "the exact reader skips its generate-and-check",
      "if state is not None and _render(state, quoted) == summary:", "if state is not None:", TEMPLATES),
    m("tpl_never_quote", "ds2.py", "an ambiguous state is written without quotes",
      "return _render(state, quoted=True)", "return plain", TEMPLATES),
    m("metric_jga_subset", "ds2.py", "JGA counts a turn right when its predicted slots are a subset of the gold",
      "joint += pred == true", "joint += pred.items() <= true.items()", TEMPLATES),
    m("metric_slot_acc_all_slots", "ds2.py", "slot accuracy divides by all 30 slots, also for one domain's",
      "slot_hits / (len(golds) * len(slots))", "slot_hits / (len(golds) * len(SLOTS))", TEMPLATES),
    m("metric_domain_turns_gold_only", "ds2.py", "per-domain JGA counts only turns whose gold mentions the domain",
      "            if pred_d or true_d:\n                domain_turns[d] += 1",
      "            if true_d:\n                domain_turns[d] += 1", TEMPLATES),
    m("metric_empty_is_zero", "ds2.py", "precision/recall of empty states on both sides is 0, not 1",
      "empty = float(tp + fp + fn == 0)", "empty = 0.0", TEMPLATES),
    # ---- data_owt.py ---------------------------------------------------------------------------------------
    m("owt_no_eot", "data_owt.py", "no <|endoftext|> after each document",
      "np.array(encoding.encode_ordinary(text) + [EOT], dtype=np.uint16)",
      "np.array(encoding.encode_ordinary(text), dtype=np.uint16)", OWT,
      ("np.array(_ENCODING.encode_ordinary(text) + [EOT], dtype=np.uint16)",
       "np.array(_ENCODING.encode_ordinary(text), dtype=np.uint16)")),
    m("owt_samples_count", "data_owt.py", "samples counted as tokens // n_ctx (the last one lacks its target)",
      "return max(tokens - 1, 0) // n_ctx", "return tokens // n_ctx", OWT),
    m("owt_split_unsalted", "data_owt.py", "the split ignores the seed",
      'hashlib.blake2b(f"{seed}/".encode(), digest_size=8)', 'hashlib.blake2b(b"/", digest_size=8)', OWT,
      ('f"{seed}/{doc_id}".encode("utf-8")', 'f"{doc_id}".encode("utf-8")')),
    m("owt_gutenberg_header_kept", "data_owt.py", "Project Gutenberg's header is kept",
      "return text[start.end():start.end() + end.start()]", "return text[:start.end() + end.start()]", OWT),
    m("owt_move_to_val_offset", "data_owt.py", "moving a document to validation shifts train by a wrong offset",
      "src, dst = 2 * (offset + length), 2 * offset", "src, dst = 2 * (offset + length), 2 * offset + 2", OWT),
    # ---- data_multiwoz.py ----------------------------------------------------------------------------------
    m("mwoz_history_next_system", "data_multiwoz.py", "the history takes the system turn after the user, not before",
      'system = texts[2 * turn - 1] if turn > 0 else "none"', 'system = texts[2 * turn + 1] if turn > 0 else "none"',
      MWOZ),
    m("mwoz_dontcare_variant", "data_multiwoz.py", "'do not care' is not read as dontcare",
      'DONTCARE = ("dont care", "dontcare", "don\'t care", "do not care")',
      'DONTCARE = ("dont care", "dontcare", "don\'t care")', MWOZ),
    m("mwoz_or_values_kept", "data_multiwoz.py", "train/dev turns with several values ('|') are kept",
      'if not any("|" in value for value in ex["state"].values())', 'if not any("||" in value for value in ex["state"].values())',
      MWOZ),
    m("mwoz_fewshot_plus_one", "data_multiwoz.py", "few-shot samples one dialogue more than int(N x ratio)",
      "random.Random(seed).sample(ids, int(len(ids) * fewshot))",
      "random.Random(seed).sample(ids, int(len(ids) * fewshot) + 1)", MWOZ),
    m("mwoz_except_domain_min", "data_multiwoz.py", "except_domain drops only single-domain dialogues ('min')",
      'in_dialogue = (except_domain in ex["domains"] if dialogue_filter == "max"',
      'in_dialogue = (ex["domains"] == [except_domain] if dialogue_filter == "max"', MWOZ),
    m("mwoz_bnb", "data_multiwoz.py", "'b&b' is not normalized to 'bed and breakfast'",
      'text = re.sub(r"b&b|b and b", "bed and breakfast", text)', "text = text", MWOZ),
    m("mwoz_no_eos", "data_multiwoz.py", "token sequences without EOS",
      "ids.extend(seq + [sp.eos_id()] for seq in", "ids.extend(seq for seq in", MWOZ),
    m("mwoz_offsets_cumsum", "data_multiwoz.py", "index offsets point at the end of each sequence, not its start",
      "offsets = np.cumsum(lens, axis=0) - lens", "offsets = np.cumsum(lens, axis=0)", MWOZ),
]


def apply(mutant, root):
    """Plant the mutant in root/<file>; returns the (old, new) used. Raises SystemExit naming a missing anchor."""
    path = root / mutant.file
    text = path.read_text()
    for old, new in mutant.edits:
        if text.count(old) == 1:
            path.write_text(text.replace(old, new))
            return old, new
    counts = ", ".join(f"{text.count(old)}x {old[:50]!r}" for old, _ in mutant.edits)
    raise SystemExit(f"error: mutant {mutant.name}: its anchor must occur exactly once in {path}, found {counts}; "
                     f"update the mutant in {Path(__file__).name}")


def copy_tree(repo, dest):
    shutil.copytree(repo, dest, ignore=shutil.ignore_patterns(".git", "__pycache__", ".pytest_cache", ".benchmarks",
                                                              "data", "out*", "*.pt"))


def run_tests(root, tests, timeout, shared, deselect=(), first_failure=True):
    """(passed, failing tests (the first only with first_failure) or the reason, seconds)."""
    present = [t for t in tests if (root / t).is_file()]
    if not present:
        return True, "no related test file in this tree", 0.0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SHARED_DATA": str(shared), "CI": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    start = time.time()
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *(["-x"] if first_failure else []),
               *present, *(f"--deselect={node}" for node in deselect if node.split("::")[0] in present)]
    try:
        out = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"timeout after {timeout} s", time.time() - start
    failed = re.findall(r"^(?:FAILED|ERROR) (.+?)(?: - .*)?$", out.stdout, re.M)  # ids may hold spaces
    if out.returncode in (0, 5):  # 5: every test of the files deselected
        return True, "", time.time() - start
    if not failed:
        return False, f"pytest exit {out.returncode}: {out.stdout.strip()[-200:]}", time.time() - start
    return False, failed[0] if first_failure else "\n".join(failed), time.time() - start


def check_mutant(mutant, repo, timeout, shared, deselect=()):
    with tempfile.TemporaryDirectory(prefix=f"mut_{mutant.name}_") as tmp:
        root = Path(tmp) / "repo"
        copy_tree(repo, root)
        apply(mutant, root)
        passed, why, seconds = run_tests(root, mutant.tests, timeout, shared, deselect)
    return mutant, ("survived" if passed else "caught"), why, seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", default=str(ROOT), help="the tree to mutate (default: this checkout)")
    parser.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"),
                        help="the shared/data folder the real-data tests read (SHARED_DATA)")
    parser.add_argument("--only", default="", help="comma-separated mutant names (default: all)")
    parser.add_argument("--jobs", type=int, default=1, help="mutants run at once (default 1)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per test run; a timeout counts as caught")
    parser.add_argument("--no_baseline", action="store_true", help="skip the run on the unmutated copy")
    parser.add_argument("--deselect_failing", action="store_true",
                        help="tests that fail on the unmutated copy are left out of every mutant's run (they can "
                             "catch nothing), instead of stopping the check")
    parser.add_argument("--list", action="store_true", help="print the mutants and exit")
    args = parser.parse_args(argv)
    repo, shared = Path(args.repo).resolve(), Path(args.shared).resolve()
    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - {mu.name for mu in MUTANTS})
    if unknown:
        print(f"error: --only: unknown mutant(s) {unknown}", file=sys.stderr)
        return 2
    mutants = [mu for mu in MUTANTS if not names or mu.name in names]
    if args.list:
        for mu in mutants:
            print(f"{mu.name:32} {mu.file:18} {mu.what}")
        print(f"{len(mutants)} mutants")
        return 0
    for mu in mutants:  # every anchor first: a stale one stops the check before anything runs
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copy(repo / mu.file, Path(tmp) / mu.file)
            apply(mu, Path(tmp))
    load = os.getloadavg()
    print(f"mutation check of {repo}: {len(mutants)} mutants, {args.jobs} at a time, OMP_NUM_THREADS=1, "
          f"load average {load[0]:.2f}", flush=True)
    started, deselect = time.time(), []
    if not args.no_baseline:
        tests = list(dict.fromkeys(t for mu in mutants for t in mu.tests))
        with tempfile.TemporaryDirectory(prefix="mut_baseline_") as tmp:
            copy_tree(repo, Path(tmp) / "repo")
            passed, why, seconds = run_tests(Path(tmp) / "repo", tests, args.timeout, shared, first_failure=False)
        print(f"baseline (unmutated, {len(tests)} test files): {'pass' if passed else 'FAIL ' + why.replace(chr(10), ', ')} "
              f"({seconds:.0f} s)", flush=True)
        if not passed and not (args.deselect_failing and "::" in why):
            print("error: the tests fail without any mutant; fix that first (or --deselect_failing)", file=sys.stderr)
            return 2
        deselect = why.split("\n") if not passed else []
        if deselect:
            print(f"left out of every run: {len(deselect)} test(s) failing without a mutant", flush=True)
    results = []
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        for mutant, verdict, why, seconds in pool.map(
                lambda mu: check_mutant(mu, repo, args.timeout, shared, deselect), mutants):
            results.append((mutant, verdict, why, seconds))
            print(f"  {verdict:8} {mutant.name} ({seconds:.0f} s) {why}", flush=True)
    caught = sum(verdict == "caught" for _, verdict, _, _ in results)
    print("\n| # | file | mutant | the bug | result | first failing test |\n|---|---|---|---|---|---|")
    for i, (mutant, verdict, why, _) in enumerate(results, 1):
        print(f"| {i} | {mutant.file} | {mutant.name} | {mutant.what} | {verdict} | {why} |")
    load = os.getloadavg()
    print(f"\ncaught {caught} of {len(results)} mutants ({len(results) - caught} survived) in "
          f"{time.time() - started:.0f} s, load average at the end {load[0]:.2f}")
    return 0 if caught == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
