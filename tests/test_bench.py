"""The performance work of both scripts: the plain attention and optimizer the benchmark compares against compute
the same thing as the fast ones, and the bench commands run end to end and write their JSON.

Run: python -m pytest -q tests/test_bench.py   (CPU, smoke-size models, random tokens)
"""
import json

import pytest
import torch

import ds2
import gpt_staged as gs


@pytest.fixture
def plain_attention():
    """Switch both scripts' attention to the written-out version for one test, and back."""
    yield
    gs.CausalSelfAttention.use_sdpa = ds2.Attention.use_sdpa = True


def test_gpt_plain_attention_equals_sdpa_in_training_and_cached_decoding(plain_attention):
    torch.manual_seed(0)
    model = gs.GPT(gs.GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=16)).eval()
    idx = torch.randint(64, (3, 20))
    fast, _ = model(idx)
    fast_tokens, _ = model.generate(idx[:, :5], 10)
    gs.CausalSelfAttention.use_sdpa = False
    plain, _ = model(idx)
    plain_tokens, _ = model.generate(idx[:, :5], 10)  # one query against a cache: the mask's offset matters
    torch.testing.assert_close(plain, fast, atol=1e-5, rtol=1e-5)
    assert torch.equal(plain_tokens, fast_tokens)


def test_t5_plain_attention_equals_sdpa_with_padding_and_position_bias(plain_attention):
    torch.manual_seed(0)
    model = ds2.T5(ds2.T5Config(vocab_size=64, d_model=16, d_ff=32, d_kv=8, num_layers=2, num_decoder_layers=2,
                                num_heads=2, dropout=0.0)).eval()
    src = torch.randint(2, 64, (3, 12))
    src[0, 7:] = ds2.PAD_ID  # a padded row: the mask must hide its padding in both versions
    labels = torch.randint(2, 64, (3, 6))
    fast_logits, fast_loss = model(src, labels)
    fast_out = model.generate(src, 8)
    ds2.Attention.use_sdpa = False
    plain_logits, plain_loss = model(src, labels)
    torch.testing.assert_close(plain_logits, fast_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plain_loss, fast_loss)
    assert torch.equal(model.generate(src, 8), fast_out)


@pytest.mark.parametrize("script", ["gpt", "t5"])
def test_fused_adamw_and_the_for_loop_version_take_the_same_step(script):
    def one_step(fused):
        torch.manual_seed(0)
        if script == "gpt":
            model = gs.GPT(gs.GPTConfig(block_size=16, vocab_size=32, n_layer=1, n_head=2, n_embd=8))
            optimizer = model.configure_optimizers(0.1, 1e-2, (0.9, 0.95), "cpu", fused=fused)
            loss = model(torch.randint(32, (2, 16)), torch.randint(32, (2, 16)))[1]
        else:
            model = ds2.T5(ds2.T5Config(vocab_size=32, d_model=8, d_ff=16, d_kv=4, num_layers=1,
                                        num_decoder_layers=1, num_heads=2, dropout=0.0))
            optimizer = model.configure_optimizers(0.0, 1e-2, (0.9, 0.999), 1e-8, "cpu", fused=fused)
            loss = model(torch.randint(2, 32, (2, 6)), torch.randint(2, 32, (2, 4)))[1]
        assert optimizer.defaults["fused"] is (True if fused else None)
        assert optimizer.defaults["foreach"] is (None if fused else False)
        loss.backward()
        optimizer.step()
        return [p.detach().clone() for p in model.parameters()]

    for fused, plain in zip(one_step(True), one_step(False)):
        torch.testing.assert_close(fused, plain, atol=1e-6, rtol=1e-5)


def test_gpt_bench_prints_the_table_and_writes_json(tmp_path, capsys):
    assert gs.main(["bench", "--preset", "smoke", "--vocab_size", "128", "--bench_steps", "1", "--bench_repeats", "1",
                    "--bench_runs", "4", "--out_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| sdpa + fused AdamW | 16 |" in out and "| plain attention + for-loop AdamW | 64 |" in out
    result = json.loads((tmp_path / "bench_gpt.json").read_text())
    assert {(r["variant"], r["context"]) for r in result["steps"]} == {
        (v, c) for v in ("sdpa + fused AdamW", "plain attention + for-loop AdamW") for c in (16, 64)}
    for row in result["steps"]:
        assert row["step_ms"] > 0 and row["tokens_per_s"] > 0 and row["peak_mib"] > 0 and row["samples"] == 1
        assert row["step_ms"] == pytest.approx(row["fwd_bwd_ms"] + row["update_ms"], rel=0.5)
    ratios = result["ratios"]["sdpa + fused AdamW"]
    assert ratios["ideal"] == 0.25 and 0 < ratios["step_time_ratio"]
    assert ratios["projected_staged_saving"] == pytest.approx(0.25 * (1 - ratios["step_time_ratio"]))
    runs = result["runs"]
    assert runs["steps"] == 4 and [len(s) for s in runs["seconds"].values()] == [1, 1]
    assert result["decode"]["new_tokens"] == 64 and result["decode"]["speedup"] > 0


def test_t5_bench_prints_the_table_and_shares_the_encoder_across_beams(tmp_path, capsys):
    assert ds2.main(["bench", "--preset", "smoke", "--bench_steps", "1", "--bench_repeats", "1",
                     "--bench_src_len", "24", "--bench_tgt_len", "8", "--out_dir", str(tmp_path)]) == 0
    assert "| plain attention + for-loop AdamW |" in capsys.readouterr().out
    result = json.loads((tmp_path / "bench_ds2.json").read_text())
    assert [r["variant"] for r in result["steps"]] == ["sdpa + fused AdamW", "plain attention + for-loop AdamW"]
    decode = result["decode"]
    assert decode["beam4_encoder_rows"] == decode["batch"] == 8  # once per example, not once per beam
    assert decode["cache_ms_per_token"] > 0 and decode["recompute_ms_per_token"] > 0


@pytest.mark.parametrize("main, key", [(gs.main, "bench_repeats"), (ds2.main, "bench_steps")])
def test_bench_settings_are_checked(main, key, capsys):
    assert main(["bench", f"--{key}", "0"]) == 2
    assert f"--{key} must be positive" in capsys.readouterr().err


@pytest.mark.parametrize("dynamic, graphs", [(False, 2), (True, 1)])
def test_gpt_compiles_without_graph_breaks_once_per_context_or_once_dynamic(dynamic, graphs):
    """train() --compile: static shapes for a two-context plan (one recompile at the stage switch), a dynamic length
    for --length_warmup. Dynamo alone (backend eager) shows the graphs and breaks in seconds, without a compiler."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = gs.GPT(gs.GPTConfig(block_size=64, vocab_size=64, n_layer=2, n_head=2, n_embd=16))
    compiled = torch.compile(model, backend="eager", dynamic=dynamic)
    for context in (16, 64, 16, 64) if not dynamic else (16, 24, 32, 64):
        idx = torch.randint(64, (2, context))
        compiled(idx, idx)[1].backward()
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == graphs
    torch._dynamo.reset()


def test_t5_compiles_dynamic_to_one_graph_for_batches_of_any_length():
    import torch._dynamo
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = ds2.T5(ds2.T5Config(vocab_size=64, d_model=16, d_ff=32, d_kv=8, num_layers=1, num_decoder_layers=1,
                                num_heads=2, dropout=0.1))
    compiled = torch.compile(model, backend="eager", dynamic=True)  # as ds2.py --compile
    for S, T in ((30, 8), (50, 12), (41, 9)):
        src = torch.randint(2, 64, (3, S))
        src[0, S // 2:] = ds2.PAD_ID
        compiled(src, torch.randint(2, 64, (3, T)))[1].backward()
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()
