"""DS2's experiments around ds2.py: the warm-start corpora (DialogSum, SAMSum) read by data_multiwoz.py, stage 1 on
summaries then stage 2 from its checkpoint, the paper's own training settings, and the protocol commands
(multi-domain few-shot, cross-domain) with their results table."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data_multiwoz as dm
import ds2
from conftest import require_shared
from test_ds2 import write_data_dir

ROOT = Path(__file__).resolve().parents[1]
ONE_THREAD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TINY = ["--preset", "smoke", "--max_iters", "2", "--eval_interval", "2", "--max_new_tokens", "4"]



def write_dialogsum(folder, n=(6, 3, 3)):
    folder.mkdir()
    for split, count in zip(("train", "dev", "test"), n):
        key = "summary1" if split == "test" else "summary"  # DialogSum's test has three references
        rows = [{"fname": f"{split}_{i}", "dialogue": f"#Person1#: I need a taxi at {i}.\n#Person2#: Sure, where to?",
                 key: f"#Person1# books a taxi at {i}.", "topic": "taxi"} for i in range(count)]
        (folder / f"dialogsum.{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


# ----------------------------------------------------------------------------------------------------------------
# Warm-start corpora

def test_samsum_csv_keeps_a_quoted_multiline_dialogue_as_one_history(tmp_path):
    (tmp_path / "val.csv").write_text('id,summary,dialogue\n7,"Amy will come.","Amy: Hi Tom!\r\nTom: Come at 5?\r\n'
                                      'Amy: OK, two of us"\n', encoding="utf-8")
    splits, sources = dm.read_summarization("samsum", tmp_path)
    assert sources == [tmp_path / "val.csv"] and splits["train"] == [] and splits["test"] == []
    (ex,) = splits["dev"]
    # normalized as MultiWOZ's utterances are (lower case, spaced punctuation, number words -> digits)
    assert ex["history"] == " amy: hi tom ! tom: come at 5 ? amy: ok , 2 of us"
    assert (ex["dialogue_id"], ex["summary"], ex["state"], ex["domains"]) == ("7", "Amy will come.", {}, [])


def test_a_bad_summarization_record_names_the_file_and_record(tmp_path):
    write_dialogsum(tmp_path / "ds")
    path = tmp_path / "ds" / "dialogsum.dev.jsonl"
    path.write_text(path.read_text() + '{"fname": "x", "dialogue": "A: hi"}\n')
    with pytest.raises(ValueError, match=r"dialogsum.dev.jsonl: record 4 lacks a dialogue, a summary"):
        dm.read_summarization("dialogsum", tmp_path / "ds")
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"dialogsum.dev.jsonl: record 1 is not valid JSON"):
        dm.read_summarization("dialogsum", tmp_path / "ds")
    with pytest.raises(SystemExit, match="2"):  # argparse: --summarization needs the MultiWOZ folder's --spm
        dm.main(["--summarization", "samsum", "--data_dir", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="none of train.csv, val.csv, test.csv found"):
        dm.read_summarization("samsum", tmp_path)


def test_real_dialogsum_and_samsum_files(tmp_path):
    samsum = require_shared("dialogue_summarization/samsum")
    splits, _ = dm.read_summarization("samsum", samsum)
    assert [len(splits[s]) for s in ("train", "dev", "test")] == [0, 818, 819]  # no SAMSum train offline
    assert all("\n" not in ex["history"] and ex["summary"] for ex in splits["dev"] + splits["test"])
    dialogsum = tmp_path / "dialogsum"  # dev and test only: the 12,460 train dialogues take seconds to read
    dialogsum.mkdir()
    for split in ("dev", "test"):
        name = f"dialogsum.{split}.jsonl"
        (dialogsum / name).symlink_to(require_shared(f"dialogue_summarization/dialogsum/{name}"))
    splits, _ = dm.read_summarization("dialogsum", dialogsum)
    assert [len(splits[s]) for s in ("dev", "test")] == [500, 500]
    assert splits["dev"][0]["history"].startswith(" #person1#: hello , how are you doing today ? #person2#: i ve been")
    assert splits["test"][0]["summary"]  # summary1 of the three references


def test_warm_start_on_summaries_then_fine_tune_from_its_best_checkpoint(tmp_path, capsys):
    spm = require_shared("t5/spiece.model")
    write_dialogsum(tmp_path / "raw")
    stage1_data, stage1 = tmp_path / "dialogsum", tmp_path / "stage1"
    assert dm.main(["--summarization", "dialogsum", "--data_dir", str(tmp_path / "raw"), "--spm", str(spm),
                    "--out_dir", str(stage1_data)]) == 0
    meta = json.loads((stage1_data / "meta.json").read_text())
    assert meta["task"] == "summarization" and meta["splits"]["train"]["examples"] == 6
    assert ds2.main(TINY + ["--data_dir", str(stage1_data), "--out_dir", str(stage1)]) == 0
    out = capsys.readouterr().out
    assert "eval step 2 | val loss" in out and "(no states: scored by the loss) | best val loss" in out
    metrics = json.loads((stage1 / "test_metrics.json").read_text())
    assert "jga" not in metrics and metrics["n_turns"] == 3 and metrics["summary_loss"] > 0  # loss-only
    # stage 2: the DST data shares T5's SentencePiece model, so the stage-1 weights load as they are
    write_data_dir(tmp_path / "mwz", spm)
    config = ds2.parse_args(TINY + ["--data_dir", str(tmp_path / "mwz"), "--init_from", str(stage1 / "best.pt")])[1]
    model = ds2.build_model(config, ds2.read_meta(config.data_dir)[0])
    stage1_weights = ds2.load_checkpoint(stage1 / "best.pt")["model"]
    assert all(torch.equal(t, stage1_weights[k]) for k, t in model.state_dict().items())
    assert ds2.main(TINY + ["--data_dir", str(tmp_path / "mwz"), "--init_from", str(stage1 / "best.pt"),
                            "--out_dir", str(tmp_path / "stage2")]) == 0
    assert "jga" in json.loads((tmp_path / "stage2" / "test_metrics.json").read_text())


# ----------------------------------------------------------------------------------------------------------------
# The paper's training settings

def test_paper_preset_is_ds2s_code_and_its_adamw_is_adam():
    _, c = ds2.parse_args(["--preset", "paper"])
    # DS2's code: transformers.AdamW (weight_decay 0.0, eps 1e-6 by default), lr 5e-5 constant, no warmup,
    # clip 1.0, batch 2, up to 100 epochs, patience 10, fp32; generate(min_length=5, max_length=100,
    # early_stopping=True), both counting the start token, greedy on dev and 10 beams on test; pads in the loss
    assert (c.learning_rate, c.weight_decay, c.eps, c.decay_lr, c.warmup_iters, c.grad_clip) == (
        5e-5, 0.0, 1e-6, False, 0, 1.0)
    assert (c.batch_size, c.micro_batch_size, c.epochs, c.patience, c.dtype) == (2, 2, 100, 10, "float32")
    assert (c.num_beams, c.test_num_beams, c.min_new_tokens, c.max_new_tokens, c.early_stopping) == (1, 10, 4, 99, True)
    assert c.loss_on_pad and not ds2.Config().loss_on_pad  # the quirk is off outside the preset
    assert ds2.get_lr(0, 1000, c) == ds2.get_lr(999, 1000, c) == 5e-5
    # with weight_decay 0, configure_optimizers' AdamW takes exactly Adam's steps (the seed's recipe: Adam)
    torch.manual_seed(0)
    model = ds2.T5(ds2.T5Config(vocab_size=16, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_decoder_layers=1,
                                num_heads=2, dropout=0.0))
    twin = ds2.T5(model.config)
    twin.load_state_dict(model.state_dict())
    ours = model.configure_optimizers(c.weight_decay, 1e-2, (c.beta1, c.beta2), c.eps, "cpu")
    adam = torch.optim.Adam(twin.parameters(), lr=1e-2, betas=(c.beta1, c.beta2), eps=c.eps)
    src, labels = torch.tensor([[3, 4, 5, 1]]), torch.tensor([[6, 7, 1]])
    for _ in range(3):
        for m, opt in ((model, ours), (twin, adam)):
            opt.zero_grad()
            m(src, labels)[1].backward()
            opt.step()
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(model.state_dict().values(),
                                                                  twin.state_dict().values()))


# ----------------------------------------------------------------------------------------------------------------
# Protocols

def test_crossdomain_runs_stage_1_without_the_domain_then_stage_2_from_its_checkpoint():
    _, c = ds2.parse_args(["crossdomain", "--domains", "hotel,taxi", "--ratios", "0.01,0.05", "--seeds", "1,2",
                           "--out_dir", "out/cd"])
    runs = ds2.protocol_runs("crossdomain", c)
    assert [name for name, _, _ in runs[:5]] == ["hotel_pretrain", "hotel_0.01_1", "hotel_0.01_2", "hotel_0.05_1",
                                                  "hotel_0.05_2"] and len(runs) == 10
    assert runs[0][2] == {"except_domain": "hotel"} and runs[0][1]["stage"] == 1
    assert runs[6][2] == {"fewshot": 0.01, "fewshot_seed": 1, "seed": 1, "only_domain": "taxi",
                          "init_from": str(Path("out/cd/taxi_pretrain/best.pt"))}
    _, c = ds2.parse_args(["fewshot", "--ratios", "0.01,1.0", "--seeds", "3"])
    assert [(n, f) for n, _, f in ds2.protocol_runs("fewshot", c)] == [
        ("0.01_3", {"fewshot": 0.01, "fewshot_seed": 3, "seed": 3}), ("1_3", {"fewshot": 1.0, "fewshot_seed": 3,
                                                                              "seed": 3})]
    for bad in (["--ratios", "0.01,5"], ["--seeds", "a"], ["--domains", "police"]):
        with pytest.raises(ValueError, match="--ratios"):
            ds2.parse_args(["fewshot", *bad])


def test_report_gives_mean_and_sample_std_over_seeds_and_names_missing_runs(tmp_path):
    _, c = ds2.parse_args(["fewshot", "--ratios", "0.01,0.05", "--seeds", "1,2,3", "--out_dir", str(tmp_path)])
    runs = ds2.protocol_runs("fewshot", c)
    for (name, _, _), jga in zip(runs, (0.30, 0.40, 0.50, 0.45)):  # 0.05_2 and 0.05_3 never ran
        (tmp_path / name).mkdir()
        (tmp_path / name / "test_metrics.json").write_text(json.dumps({"jga": jga, "slot_acc": 0.9, "slot_f1": 0.5,
                                                                      "ds2": {"jga": jga + 0.01, "slot_acc": 0.95}}))
    rows = ds2.protocol_report("fewshot", runs, tmp_path)
    assert [r["run"] for r in rows] == ["0.01_1", "0.01_2", "0.01_3", "0.05_1"]
    table = (tmp_path / "table.md").read_text()
    assert "| jga (trade scoring) | 1% | 5% |" in table  # every table names its scoring
    assert "| all | 40.00 ± 10.00 (3) | 45.00 (1) |" in table  # std of 30, 40, 50 with n - 1: 10
    assert "| jga (ds2 scoring) | 1% | 5% |\n|---|---|---|\n| all | 41.00 ± 10.00 (3) | 46.00 (1) |" in table
    assert "missing runs: 0.05_2, 0.05_3" in table
    assert [json.loads(line)["jga"] for line in (tmp_path / "results.jsonl").read_text().splitlines()] == [
        0.30, 0.40, 0.50, 0.45]


def test_fewshot_command_trains_each_seed_then_report_only_rebuilds_the_table(tmp_path):
    data, out = tmp_path / "data", tmp_path / "fewshot"
    write_data_dir(data, require_shared("t5/spiece.model"))
    base = [sys.executable, "ds2.py", "fewshot", *TINY, "--data_dir", str(data), "--out_dir", str(out),
            "--ratios", "0.5", "--seeds", "1,2", "--test_examples", "5"]
    run = subprocess.run(base, cwd=ROOT, capture_output=True, text=True, env=ONE_THREAD_ENV, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "fewshot 1/2 0.5_1: train --fewshot 0.5 --fewshot_seed 1 --seed 1" in run.stdout
    assert "fewshot 1/2 0.5_1: plan (" in run.stdout  # each run's plan, before it trains
    for seed in (1, 2):
        config = json.loads((out / f"0.5_{seed}" / "test_metrics.json").read_text())["config"]
        assert (config["fewshot"], config["fewshot_seed"], config["seed"], config["d_model"]) == (0.5, seed, seed, 32)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["run"], r["n_turns"]) for r in rows] == [("0.5_1", 5), ("0.5_2", 5)]  # --test_examples 5
    table = (out / "table.md").read_text()
    (out / "table.md").unlink()
    again = subprocess.run(base + ["--report_only"], cwd=ROOT, capture_output=True, text=True, env=ONE_THREAD_ENV,
                           timeout=300)
    assert again.returncode == 0 and "train --" not in again.stdout and (out / "table.md").read_text() == table


def test_a_one_percent_run_reaches_the_peak_lr_and_evaluates_more_than_once(tmp_path):
    # the seed's recipe (1 epoch, 1000 warmup steps) on 1% of the dialogues: 1 step, lr never above 0, one
    # evaluation. The data schedule gives it min_iters steps, 10% of them warmup and evals_per_run evaluations.
    data, out = tmp_path / "data", tmp_path / "out"
    write_data_dir(data, require_shared("t5/spiece.model"), sizes=(("train", 300), ("dev", 14), ("test", 14)))
    _, config = ds2.parse_args(["--fewshot", "0.01", "--batch_size", "8", "--micro_batch_size", "8"])
    assert (config.epochs, config.warmup_iters, config.max_iters) == (1, 1000, 0)  # the seed's recipe
    planned, total, plan = ds2.plan_schedule(3, config)  # 1% of 100 dialogues of 3 turns
    assert (total, planned.warmup_iters, planned.eval_interval) == (100, 10, 20) and "5 evaluations" in plan
    assert ds2.plan_schedule(3, ds2.dataclasses.replace(config, schedule="fixed"))[1] == 1
    run = subprocess.run([sys.executable, "ds2.py", "--preset", "smoke", "--max_iters", "0", "--min_iters", "20",
                          "--warmup_iters", "1000", "--eval_interval", "0", "--fewshot", "0.01", "--data_dir",
                          str(data), "--out_dir", str(out), "--test_examples", "4"],
                         cwd=ROOT, capture_output=True, text=True, env=ONE_THREAD_ENV, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "plan (data schedule): 3 training turns" in run.stdout
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    peak = ds2.parse_args(["--preset", "smoke"])[1].learning_rate
    assert max(r["lr"] for r in log if "lr" in r) == pytest.approx(peak)  # warmup 2 of 20 steps
    assert len([r for r in log if "jga" in r]) == 5  # every 4 steps
