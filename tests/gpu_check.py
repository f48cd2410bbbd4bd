"""GPU acceptance run: what users run, at the real defaults except the number of steps, checked end to end.

    python tests/gpu_check.py          # on a machine with CUDA (under 8 minutes on one H100); exit 1 on any failure
    python tests/gpu_check.py --cpu    # the same sequence at smoke size on CPU: what tests/test_gpu_check.py runs

gpt_staged.py at its defaults (GPT-2 124M, batch 512 = 16 x 32 micro-steps, block 1024, eval_iters 100, dtype auto =
bf16, compile auto = on) for 30 steps on a synthetic bin, the first 8 at context 128: one run under `torchrun
--nproc_per_node 1`, the same run without torchrun stopped after step 20 and resumed (its losses must match), and
on a machine with two GPUs or more a 2-process run; then `bench` at 124M (step time at 128 and 1024, their ratio,
tokens/s, MFU, peak memory, packed vs unpacked short micro-batches); then ds2.py with the t5-small architecture
(random weights, a SentencePiece model trained here): 20 steps in bf16, greedy decoding of 64 dev turns and 4-beam
decoding of 64 test turns. It prints one table and every command's output tail where a check fails.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROFILES = {
    # the defaults except the number of steps (and warmup, so that 30 steps reach the peak LR)
    "gpu": dict(gpt=["--stage_frac", "0.25", "--max_iters", "30", "--warmup_iters", "5", "--eval_interval", "20",
                     "--log_interval", "1"],
                block=1024, batch=512, vocab=50257, stop=20, short_steps=8, timeout=420, loss_drop=1.0,
                bench=["--bench_steps", "2", "--bench_repeats", "1", "--bench_decode", "false"],
                ds2=["--preset", "t5-small", "--max_iters", "20", "--eval_interval", "20", "--warmup_iters", "2",
                     "--batch_size", "32", "--micro_batch_size", "32", "--eval_examples", "64", "--test_examples",
                     "64", "--eval_batch_size", "64", "--num_beams", "1", "--test_num_beams", "4", "--log_interval",
                     "5"],
                ds2_turns=(512, 64, 64), spm_vocab=2000),
    # the same sequence in seconds on a CPU: smoke-size models, float32, no compile
    "cpu": dict(gpt=["--preset", "smoke", "--vocab_size", "128", "--stage_frac", "0.25", "--max_iters", "12",
                     "--warmup_iters", "2", "--eval_interval", "8", "--device", "cpu"],
                block=64, batch=8, vocab=100, stop=8, short_steps=3, timeout=300, loss_drop=0.05,
                bench=["--preset", "smoke", "--vocab_size", "128", "--bench_steps", "1", "--bench_repeats", "1",
                       "--bench_decode", "false", "--bench_plain", "false", "--device", "cpu"],
                ds2=["--preset", "smoke", "--max_iters", "4", "--eval_interval", "4", "--eval_examples", "8",
                     "--test_examples", "8", "--num_beams", "1", "--test_num_beams", "4", "--device", "cpu"],
                ds2_turns=(32, 8, 8), spm_vocab=300),
}


# ---- data made here: a learnable token stream, and a small DS2 folder ------------------------------------------

def make_token_bins(folder, profile):
    """train.bin / val.bin of a repeating 997-token pattern (a model learns to continue it: the loss must fall),
    enough for every step of the run and the evaluation subset."""
    folder.mkdir(parents=True, exist_ok=True)
    steps = int(profile["gpt"][profile["gpt"].index("--max_iters") + 1])
    sizes = {"train": steps * profile["batch"] * profile["block"] + 1,
             "val": 1600 * profile["block"] + 1}  # eval_iters 100 x micro_batch_size 16 samples
    pattern = np.random.default_rng(0).integers(0, profile["vocab"], size=997)
    for split, n in sizes.items():
        np.resize(pattern, n).astype(np.uint16).tofile(folder / f"{split}.bin")
    (folder / "meta.json").write_text(json.dumps({"vocab_size": profile["vocab"], "eot": profile["vocab"] - 1,
                                                  **{f"{k}_tokens": n for k, n in sizes.items()}}))
    return folder


def make_ds2_folder(folder, profile):
    """A DS2 data folder in data_multiwoz.py's layout from template states, with a SentencePiece model trained
    here (T5's pad 0, eos 1, unk 2), so the check needs no download and no shared data."""
    import sentencepiece
    from test_ds2 import STATES, write_data_dir
    import ds2
    folder.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"summarize this dialogue: system: none user: i need {' and '.join(s.values()) or 'nothing'} please"
             for s in STATES] + [ds2.state_to_summary(s) for s in STATES]
    lines += [f"{word} {i}" for i in range(200) for word in ("user", "system", "the", "at", "people")]
    spm = folder.parent / "check.model"
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(lines * 4), model_prefix=str(spm.with_suffix("")),
                                             vocab_size=profile["spm_vocab"], pad_id=0, eos_id=1, unk_id=2,
                                             bos_id=-1, hard_vocab_limit=False, minloglevel=2)
    write_data_dir(folder, spm, sizes=tuple(zip(("train", "dev", "test"), profile["ds2_turns"])))
    return folder


# ---- running the scripts ---------------------------------------------------------------------------------------

def run(command, timeout, env=None):
    """(exit status, seconds, stdout + stderr) of one command in the repository root."""
    start = time.time()
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})})
        return done.returncode, time.time() - start, done.stdout + done.stderr
    except subprocess.TimeoutExpired as e:
        return 124, time.time() - start, f"timed out after {timeout} s\n{e.stdout or ''}{e.stderr or ''}"


def step_losses(out_dir):
    """{step: loss} of a gpt_staged.py or ds2.py log.jsonl."""
    path = Path(out_dir) / "log.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


class Table:
    """The summary: one row per check, with its figure; failed checks keep the tail of their command's output."""

    def __init__(self):
        self.rows, self.tails = [], []

    def check(self, name, ok, figure="", output=""):
        self.rows.append((name, "ok" if ok else "FAIL", figure.replace(" | ", "; ").replace("|", "/")))
        if not ok and output:
            self.tails.append(f"--- {name} ---\n{output[-3000:]}")
        return ok

    @property
    def failed(self):
        return [name for name, status, _ in self.rows if status != "ok"]

    def render(self):
        lines = ["| check | result | figures |", "|---|---|---|"]
        lines += [f"| {name} | {status} | {figure} |" for name, status, figure in self.rows]
        return "\n".join(lines + [""] + self.tails)


def compare(a, b, steps, tolerance):
    """Largest |loss a - loss b| over the steps, and whether every step is in both and within the tolerance."""
    if not all(s in a and s in b for s in steps):
        return math.inf, False
    worst = max(abs(a[s] - b[s]) for s in steps)
    return worst, worst <= tolerance


def check_gpt(table, work, profile, gpus):
    """Train under torchrun (1 process), then plain with a stop and a resume: same losses, both stages, a falling
    loss; a 2-process run where there are two GPUs."""
    data = make_token_bins(work / "owt", profile)
    base = [*profile["gpt"], "--data_dir", str(data)]
    steps = int(profile["gpt"][profile["gpt"].index("--max_iters") + 1])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    code, seconds, out = run([*torchrun, "--nproc_per_node", "1", "gpt_staged.py", *base, "--out_dir",
                              str(work / "torchrun1")], profile["timeout"])
    whole = step_losses(work / "torchrun1")
    short = profile["short_steps"]
    contexts = [line for line in out.splitlines() if line.startswith("throughput at ctx")]
    table.check("gpt: torchrun --nproc_per_node 1, 30 steps" if steps == 30 else f"gpt: torchrun 1 process, {steps} "
                "steps", code == 0 and len(whole) == steps and len(contexts) == 2,
                f"{seconds:.0f} s; " + "; ".join(c.removeprefix("throughput at ") for c in contexts), out)
    falls = bool(whole) and whole[max(whole)] < whole[1] - profile["loss_drop"]
    table.check("gpt: loss falls, stage switch", falls and f"stage: context" in out and f"after {short} steps" in out,
                f"loss {whole.get(1, math.nan):.3f} -> {whole.get(steps, math.nan):.3f}; switch after {short} steps",
                out)
    code, seconds, out = run([sys.executable, "gpt_staged.py", *base, "--out_dir", str(work / "plain"),
                              "--stop_step", str(profile["stop"])], profile["timeout"])
    evaluated = "val loss" in out and (work / "plain" / "ckpt.pt").is_file()
    table.check(f"gpt: plain run, evaluation, checkpoint at step {profile['stop']}", code == 0 and evaluated,
                f"{seconds:.0f} s", out)
    code, seconds, out = run([sys.executable, "gpt_staged.py", *base, "--out_dir", str(work / "plain"), "--resume"],
                             profile["timeout"])
    resumed = step_losses(work / "plain")
    tolerance = 0.02 if profile is PROFILES["gpu"] else 1e-5  # GPU kernels may reduce in another order
    worst, same = compare(resumed, whole, range(1, steps + 1), tolerance)
    table.check("gpt: resume reproduces the losses (plain vs torchrun run)", code == 0 and same,
                f"max |diff| {worst:.2e} over {steps} steps (tolerance {tolerance:g}); {seconds:.0f} s", out)
    if gpus >= 2:
        code, seconds, out = run([*torchrun, "--nproc_per_node", "2", "gpt_staged.py", *base, "--out_dir",
                                  str(work / "torchrun2"), "--stop_step", "10"], profile["timeout"])
        worst, same = compare(step_losses(work / "torchrun2"), whole, range(1, 11), 0.05)
        table.check("gpt: torchrun --nproc_per_node 2, 10 steps", code == 0 and same,
                    f"max |diff| to 1 process {worst:.2e}; {seconds:.0f} s", out)


def check_bench(table, work, profile):
    code, seconds, out = run([sys.executable, "gpt_staged.py", "bench", *profile["bench"], "--out_dir",
                              str(work / "bench")], profile["timeout"])
    path = work / "bench" / "bench_gpt.json"
    if not table.check("gpt: bench runs", code == 0 and path.is_file(), f"{seconds:.0f} s", out):
        return
    result = json.loads(path.read_text())
    for r in result["steps"]:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        table.check(f"bench: {r['variant']}, ctx {r['context']}", r["step_ms"] > 0,
                    f"{r['micro_batch']} x {r['micro_steps']} micro-steps, {r['step_ms']:,.0f} ms/step, "
                    f"{r['tokens_per_s']:,.0f} tok/s, MFU {mfu}, peak {r['peak_mib']:,.0f} MiB")
    for name, ratio in result["ratios"].items():
        table.check(f"bench: step time 128 / 1024 ({name})" if profile is PROFILES["gpu"] else
                    f"bench: step time ratio ({name})", ratio["step_time_ratio"] < 1,
                    f"{ratio['step_time_ratio']:.3f} (ideal {ratio['ideal']:.3f}); projected staged saving "
                    f"{ratio['projected_staged_saving']:.1%}")
    if "packing" in result:
        p = result["packing"]
        table.check("bench: packed short micro-batches", True,
                    f"{p['packed_ms']:,.0f} vs {p['unpacked_ms']:,.0f} ms/step unpacked: {p['speedup']:.2f}x")


def check_ds2(table, work, profile):
    data = make_ds2_folder(work / "ds2data", profile)
    code, seconds, out = run([sys.executable, "ds2.py", *profile["ds2"], "--data_dir", str(data), "--out_dir",
                              str(work / "ds2")], profile["timeout"])
    losses = step_losses(work / "ds2")
    steps = int(profile["ds2"][profile["ds2"].index("--max_iters") + 1])
    table.check(f"ds2: {steps} training steps", code == 0 and len(losses) == steps
                and all(math.isfinite(v) for v in losses.values()),
                f"loss {losses.get(1, math.nan):.3f} -> {losses.get(steps, math.nan):.3f}; {seconds:.0f} s in all", out)
    evals = [line for line in out.splitlines() if line.startswith("eval step")]
    tests = [line for line in out.splitlines() if line.startswith("test ")]
    table.check("ds2: greedy decoding of the dev turns", code == 0 and bool(evals), evals[-1][:90] if evals else "",
                out)
    table.check("ds2: 4-beam decoding of the test turns", code == 0 and bool(tests)
                and (work / "ds2" / "test_metrics.json").is_file(), tests[-1][:90] if tests else "", out)
    params = [line for line in out.splitlines() if line.startswith("model: T5")]
    table.check("ds2: model", bool(params), params[0][:60] if params else "", out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="the same sequence at smoke size on CPU")
    parser.add_argument("--work_dir", default="out/gpu_check", help="data and runs go here (default: %(default)s)")
    args = parser.parse_args(argv)
    import torch
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not args.cpu and not gpus:
        print("gpu_check: no CUDA device here; run it on a GPU machine, or --cpu for the smoke-size sequence")
        return 2
    profile = PROFILES["cpu" if args.cpu else "gpu"]
    work = Path(args.work_dir)
    if work.exists() and any(work.iterdir()):
        print(f"gpu_check: {work} is not empty; remove it or give another --work_dir")
        return 2
    work.mkdir(parents=True, exist_ok=True)
    device = "CPU" if args.cpu else f"{gpus} x {torch.cuda.get_device_name(0)}"
    print(f"gpu_check: {device}, torch {torch.__version__}, work dir {work}", flush=True)
    table, start = Table(), time.time()
    for part in (lambda: check_gpt(table, work, profile, 0 if args.cpu else gpus),
                 lambda: check_bench(table, work, profile), lambda: check_ds2(table, work, profile)):
        part()
        print(f"gpu_check: {len(table.rows)} checks done, {time.time() - start:.0f} s", flush=True)
    print(f"\n{device}, torch {torch.__version__}: {len(table.rows) - len(table.failed)}/{len(table.rows)} checks "
          f"passed in {time.time() - start:.0f} s\n")
    print(table.render())
    return 1 if table.failed else 0


if __name__ == "__main__":
    sys.exit(main())
