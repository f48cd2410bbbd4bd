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
