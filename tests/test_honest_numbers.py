"""Numbers that mean what their labels say (gpt_staged.py): the validation set, Experiment 2's samples, resume.

Run: python -m pytest -q tests/test_honest_numbers.py
"""
import numpy as np
import pytest

import gpt_staged as gs
from test_gpt_staged import run_train


# ---- the validation set does not depend on a memory knob -------------------------------------------------------

def test_evaluation_subset_spreads_over_the_whole_file_and_has_its_own_size():
    subset = gs.eval_subset(806_093, 1600)  # the report's validation split: 806,093 samples
    assert len(subset) == len(set(subset.tolist())) == 1600
    assert subset[0] == 0 and subset[-1] > 0.99 * 806_093  # not the first 1,600 samples: the whole file
    assert np.all(np.diff(subset) >= 503)  # evenly spaced
    assert gs.eval_subset(40, 1600).tolist() == list(range(40)) and gs.eval_subset(40, 0).tolist() == list(range(40))


def test_step_0_validation_loss_is_the_same_for_any_micro_batch_size(tmp_path):
    first = {}
    for micro in (2, 4, 8):
        _, rows = run_train(tmp_path, "--micro_batch_size", str(micro), "--max_iters", "5", "--stop_step", "1",
                            out=f"micro{micro}")
        first[micro] = rows[0]
    assert {r["val_samples"] for r in first.values()} == {8}
    assert first[2]["val_loss"] == pytest.approx(first[4]["val_loss"], abs=1e-6)
    assert first[8]["val_loss"] == pytest.approx(first[4]["val_loss"], abs=1e-6)


def test_final_eval_full_scores_every_validation_sample(tmp_path, capsys):
    result, rows = run_train(tmp_path, "--max_iters", "4", "--warmup_iters", "2", "--eval_interval", "2",
                             "--final_eval", "full")
    evals = [r for r in rows if "val_loss" in r]
    assert [r["val_samples"] for r in evals] == [8, 8, 46]  # 3,000 val tokens = 46 samples of 64 + 1
    assert result["val_samples"] == 46 and result["val_loss"] == evals[-1]["val_loss"]
    assert "on 46 of 46 val samples" in capsys.readouterr().out


# ---- Experiment 2 reads what the report's Experiment 2 reads ---------------------------------------------------

def run_reads(plan, seed=7):
    """Sample indices of every step of a plan, as train() reads them."""
    return [gs.batch_indices(plan.sample_step(s), seed, plan.num_samples, plan.batch_size, epoch_steps=plan.epoch_steps)
            for s in range(plan.total_steps)]


@pytest.mark.parametrize("max_iters", [40, 0])  # a shortened run (every CPU report run) and a whole epoch
def test_match_tokens_extra_steps_re_read_the_runs_own_epoch(max_iters):
    plan = gs.make_plan(1003, 16, 0.25, 16, 64, match_tokens=True, max_iters=max_iters)
    reads = run_reads(plan)
    main, extra = np.concatenate(reads[:plan.steps]), np.concatenate(reads[plan.steps:])
    assert len(extra) == 16 * gs.match_tokens_steps(plan.truncated_tokens, 16, 64) > 0
    assert len(set(main.tolist())) == len(main) == plan.steps * 16  # the run's epoch: each sample once
    assert set(extra.tolist()) <= set(main.tolist())  # every extra-step sample was read earlier in the run
    assert len(set(extra.tolist())) == len(extra)      # ... once each, in a new order
    assert extra[:16].tolist() != main[:16].tolist()


def test_a_shortened_run_prints_what_its_epoch_and_extra_steps_read():
    _, config = gs.parse_args(["--stage_frac", "0.25", "--match_tokens", "--max_iters", "40", "--batch_size", "16",
                               "--micro_batch_size", "16", "--block_size", "64", "--stage_len", "16"])
    text = gs.describe_plan(gs.plan_for(config, 1003), config)
    assert "the run's epoch is the first 640 samples of the permutation" in text
    assert "re-reading the run's epoch (640 samples) in a second, differently seeded order" in text


# ---- a resume continues the same run or refuses ----------------------------------------------------------------

RUN = ["--max_iters", "8", "--eval_interval", "4", "--stage_frac", "0.25"]


@pytest.fixture
def stopped_run(tmp_path):
    run_train(tmp_path, *RUN, "--stop_step", "4")
    return tmp_path


@pytest.mark.parametrize("change, message", [
    (["--n_embd", "64"], "another model configuration: n_embd 32 (checkpoint) vs 64 (now)"),
    (["--dropout", "0.1"], "another model configuration: dropout 0.0 (checkpoint) vs 0.1 (now)"),
    (["--seed", "1"], "another data order: seed 1337 (checkpoint) vs 1 (now)"),
    (["--batch_size", "4"], "another data order: batch_size 8 (checkpoint) vs 4 (now)"),
    (["--max_iters", "9"], "another data order: max_iters 8 (checkpoint) vs 9 (now)"),
    (["--stage_frac", "0.5"], "another staged plan: stage_frac 0.25 (checkpoint) vs 0.5 (now)"),
    (["--match_tokens"], "another staged plan: match_tokens False (checkpoint) vs True (now)"),
    (["--learning_rate", "1e-3"], "another LR schedule or optimizer: learning_rate 0.003 (checkpoint) vs 0.001 (now)"),
    (["--warmup_iters", "2"], "another LR schedule or optimizer: warmup_iters 4 (checkpoint) vs 2 (now)"),
    (["--eval_samples", "16"], "another validation set: eval_samples 8 (checkpoint) vs 16 (now)"),
])
def test_resume_refuses_a_change_that_makes_it_another_run(stopped_run, change, message, capsys):
    before = (stopped_run / "out" / "ckpt.pt").read_bytes()
    args = [*gs_args(stopped_run), *RUN, *change, "--resume"]
    assert gs.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "resume with the run's own settings" in err, err
    assert (stopped_run / "out" / "ckpt.pt").read_bytes() == before


def test_resume_refuses_retokenized_training_data(stopped_run, capsys):
    train = stopped_run / "data" / "train.bin"
    tokens = np.fromfile(train, dtype=np.uint16)
    np.concatenate([tokens[64:], tokens[:64]]).tofile(train)  # the same size and vocabulary, other order
    assert gs.main([*gs_args(stopped_run), *RUN, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "was trained on other data: train.bin was" in err and "point --data_dir at the run's data" in err


def test_resume_allows_what_does_not_change_the_run(stopped_run, tmp_path):
    moved = tmp_path / "moved"
    (stopped_run / "data").rename(moved)  # the same data in another folder
    result = gs.train(gs.parse_args([*SMOKE_ARGS, "--data_dir", str(moved), "--out_dir", str(stopped_run / "out"),
                                     *RUN, "--resume", "--eval_interval", "2", "--log_interval", "3",
                                     "--micro_batch_size", "2", "--final_eval", "full"])[1])
    assert result["steps"] == 8


def gs_args(folder):
    return [*SMOKE_ARGS, "--data_dir", str(folder / "data"), "--out_dir", str(folder / "out")]


SMOKE_ARGS = ["--preset", "smoke", "--vocab_size", "128"]


# ---- ds2.py: the same rule ---------------------------------------------------------------------------------------

import shutil  # noqa: E402

import ds2  # noqa: E402
from conftest import require_shared  # noqa: E402


@pytest.fixture(scope="module")
def ds2_stopped(tmp_path_factory):
    from test_ds2 import write_data_dir
    folder = tmp_path_factory.mktemp("ds2resume")
    write_data_dir(folder / "data", require_shared("t5/spiece.model"))
    assert ds2.main(["--preset", "smoke", "--data_dir", str(folder / "data"), "--out_dir", str(folder / "out"),
                     "--stop_step", "3"]) == 0
    return folder


def ds2_resume(folder, tmp_path, *extra):
    shutil.copytree(folder, tmp_path / "run")
    return ds2.main(["--preset", "smoke", "--data_dir", str(tmp_path / "run" / "data"), "--out_dir",
                     str(tmp_path / "run" / "out"), "--resume", *extra])


@pytest.mark.parametrize("change, message", [
    (["--d_model", "64"], "another model configuration: d_model 32 (checkpoint) vs 64 (now)"),  # was taken silently
    (["--seed", "2"], "another data order: seed 1337 (checkpoint) vs 2 (now)"),
    (["--learning_rate", "1e-3"], "another LR schedule or optimizer: learning_rate 0.003 (checkpoint) vs 0.001"),
    (["--eval_examples", "8"], "another validation set: eval_examples 16 (checkpoint) vs 8 (now)"),
])
def test_ds2_resume_refuses_a_change_that_makes_it_another_run(ds2_stopped, tmp_path, change, message, capsys):
    assert ds2_resume(ds2_stopped, tmp_path, *change) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_ds2_resume_refuses_data_prepared_again(ds2_stopped, tmp_path, capsys):
    shutil.copytree(ds2_stopped, tmp_path / "run")
    src = tmp_path / "run" / "data" / "train.src.bin"
    src.write_bytes(src.read_bytes()[2:] + src.read_bytes()[:2])
    assert ds2.main(["--preset", "smoke", "--data_dir", str(tmp_path / "run" / "data"), "--out_dir",
                     str(tmp_path / "run" / "out"), "--resume"]) == 2
    assert "was trained on other data: train.src.bin was" in capsys.readouterr().err


def test_ds2_resume_allows_what_does_not_change_the_run(ds2_stopped, tmp_path):
    assert ds2_resume(ds2_stopped, tmp_path, "--log_interval", "2", "--micro_batch_size", "2") == 0


# ---- weight files from elsewhere are untrusted input -----------------------------------------------------------

import json  # noqa: E402
import struct  # noqa: E402

import torch  # noqa: E402


def safetensors_file(path, header, data=b"\0" * 64, length=None):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


GOOD = {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "b": {"dtype": "F16", "shape": [4], "data_offsets": [16, 24]}}
CRAFTED = {  # case: (header or raw bytes, data, header length to claim, what the one line must say)
    "negative_begin": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, b"\0" * 8, None,
                       "data_offsets [-8, 0] must be two integers 0 <= begin <= end"),
    "past_the_end": ({"a": {"dtype": "F32", "shape": [32], "data_offsets": [0, 128]}}, b"\0" * 64, None,
                     "data_offsets [0, 128] must be two integers 0 <= begin <= end <= 64"),
    "overlapping": ({**GOOD, "c": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, b"\0" * 64, None,
                    "tensors 'a' and 'c' overlap"),
    "no_data_offsets": ({"a": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, None, "data_offsets None must be"),
    "float_offsets": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8.0]}}, b"\0" * 8, None,
                      "data_offsets [0.0, 8.0] must be two integers"),
    "header_is_a_list": ([1, 2], b"", None, "the header is a JSON list, not an object"),
    "entry_is_a_string": ({"a": "F32"}, b"", None, "tensor 'a': its entry is str, not an object"),
    "shape_negative": ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}, b"", None,
                       "shape [-1] is not a list of non-negative integers"),
    "unknown_dtype": ({"a": {"dtype": "F64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8, None,
                      "dtype 'F64'; only F32, F16 and BF16 are read"),
    "size_mismatch": ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, None,
                      "byte range [0, 8) does not hold shape [3] of F32"),
    "not_json": (b"{not json", b"", None, "the header is not JSON"),
    "huge_header_length": (b"{}", b"", 2**40, "header length 1,099,511,627,776 does not fit"),
}


@pytest.mark.parametrize("case", CRAFTED)
@pytest.mark.parametrize("module", [gs, ds2], ids=["gpt_staged", "ds2"])
def test_crafted_safetensors_headers_are_refused_with_the_fault(tmp_path, module, case):
    header, data, length, message = CRAFTED[case]
    path = safetensors_file(tmp_path / "model.safetensors", header, data, length)
    with pytest.raises(ValueError, match="model.safetensors: ") as error:
        module.read_safetensors(path)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("module", [gs, ds2], ids=["gpt_staged", "ds2"])
def test_a_valid_safetensors_file_reads_its_tensors(tmp_path, module):
    data = torch.arange(4, dtype=torch.float32).numpy().tobytes() + torch.ones(4, dtype=torch.float16).numpy().tobytes()
    tensors = module.read_safetensors(safetensors_file(tmp_path / "m.safetensors", {**GOOD, "__metadata__": {}},
                                                       data + b"\0" * 40))
    assert tensors["a"].tolist() == [[0, 1], [2, 3]] and tensors["b"].dtype == torch.float16


def test_a_crafted_weight_file_ends_gpt_staged_with_one_line(tmp_path, capsys):
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"n_positions": 64, "vocab_size": 128, "n_layer": 1,
                                                    "n_head": 2, "n_embd": 32}))
    safetensors_file(folder / "model.safetensors", CRAFTED["negative_begin"][0], b"\0" * 8)
    assert gs.main(["sample", "--init_from", str(folder), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "data_offsets [-8, 0]" in err
