"""The GPU acceptance run (tests/gpu_check.py): its CPU-side logic here, the run itself where there is a GPU.

Run: python -m pytest -q tests/test_gpu_check.py      (on a GPU machine the `gpu` test runs the full check)
"""
import math
import subprocess
import sys

import pytest
import torch

import gpu_check
from test_reliability import ENV, ROOT


def test_the_table_marks_a_failed_check_and_keeps_its_output():
    table = gpu_check.Table()
    assert table.check("a", True, "1 s | 2 tok/s")
    assert not table.check("b", False, "x", output="line 1\nTraceback: boom")
    text = table.render()
    assert "| a | ok | 1 s; 2 tok/s |" in text and "| b | FAIL | x |" in text  # no stray | inside a cell
    assert table.failed == ["b"] and "--- b ---\nline 1\nTraceback: boom" in text


def test_losses_compare_within_the_tolerance_and_only_when_every_step_is_there():
    a, b = {1: 5.0, 2: 4.0}, {1: 5.0, 2: 4.01}
    assert gpu_check.compare(a, b, [1, 2], 0.02) == (pytest.approx(0.01), True)
    assert gpu_check.compare(a, b, [1, 2], 0.001)[1] is False
    assert gpu_check.compare(a, {1: 5.0}, [1, 2], 1.0) == (math.inf, False)


def test_the_gpu_profile_runs_the_defaults_except_the_number_of_steps():
    gpu = gpu_check.PROFILES["gpu"]
    overridden = {arg.removeprefix("--") for arg in gpu["gpt"] if arg.startswith("--")}
    # not the model, batch, micro-batch, block, eval_iters, dtype or compile: the run is the users' default run
    assert overridden == {"stage_frac", "max_iters", "warmup_iters", "eval_interval", "log_interval"}
    assert (gpu["batch"], gpu["block"]) == (512, 1024) and "t5-small" in gpu["ds2"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the gpu test below runs the real check")
def test_without_cuda_the_gpu_run_says_so_and_exits_2(capsys):
    assert gpu_check.main([]) == 2
    assert "no CUDA device here" in capsys.readouterr().out


@pytest.mark.slow
def test_the_whole_sequence_passes_at_smoke_size_on_cpu(tmp_path):
    run = subprocess.run([sys.executable, "tests/gpu_check.py", "--cpu", "--work_dir", str(tmp_path / "check")],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "14/14 checks passed" in run.stdout and "FAIL" not in run.stdout
    for check in ("resume reproduces the losses", "packed short micro-batches", "4-beam decoding of the test turns"):
        assert f"| gpt: {check}" in run.stdout or f"| bench: {check}" in run.stdout or f"| ds2: {check}" in run.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU acceptance run: needs CUDA (python tests/gpu_check.py)")
def test_gpu_acceptance_run(tmp_path):
    run = subprocess.run([sys.executable, "tests/gpu_check.py", "--work_dir", str(tmp_path / "check")], cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    print(run.stdout)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
