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
