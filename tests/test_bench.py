"""The performance work of both scripts: the plain attention and optimizer the benchmark compares against compute
the same thing as the fast ones (and AdamW groups its parameters as an independently grouped AdamW), and the bench
commands run end to end and write their JSON. The step timings run on a fake clock, so the tables must show each
variant's own times, in ms, and ratios of those times.

Run: python -m pytest -q tests/test_bench.py   (CPU, smoke-size models, random tokens)
"""
import json
import time
import types

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


def grouped_by_module_type(model, weight_decay, norms):
    """AdamW parameter groups written from the modules, independently of configure_optimizers: the weights of Linear
    and Embedding layers decay (GPT-2: "all weights except biases and LayerNorm"; T5: AdamW's decay on the 2-D
    weights only, never on the RMSNorm gains), everything else does not."""
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:  # a tied head is the token table: one parameter
                continue
            seen.add(id(p))
            matrix = isinstance(module, (torch.nn.Linear, torch.nn.Embedding)) and name == "weight"
            assert matrix or isinstance(module, norms) or name == "bias", (type(module), name)
            (decay if matrix else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@pytest.mark.parametrize("script", ["gpt", "t5"])
def test_fused_and_for_loop_adamw_take_the_step_of_an_independently_grouped_adamw(script):
    """configure_optimizers(fused=True) and (fused=False) against torch's AdamW on groups built by hand: a wrong
    group (decay on a bias or a norm gain, or none on a matrix) moves those parameters differently."""
    def one_step(how):
        torch.manual_seed(0)
        if script == "gpt":
            model = gs.GPT(gs.GPTConfig(block_size=16, vocab_size=32, n_layer=1, n_head=2, n_embd=8))
            loss = model(torch.randint(32, (2, 16)), torch.randint(32, (2, 16)))[1]
            norms, betas, eps = torch.nn.LayerNorm, (0.9, 0.95), 1e-8
            configure = lambda fused: model.configure_optimizers(0.1, 1e-2, betas, "cpu", fused=fused)
        else:
            model = ds2.T5(ds2.T5Config(vocab_size=32, d_model=8, d_ff=16, d_kv=4, num_layers=1,
                                        num_decoder_layers=1, num_heads=2, dropout=0.0))
            loss = model(torch.randint(2, 32, (2, 6)), torch.randint(2, 32, (2, 4)))[1]
            norms, betas, eps = ds2.RMSNorm, (0.9, 0.999), 1e-6
            configure = lambda fused: model.configure_optimizers(0.1, 1e-2, betas, eps, "cpu", fused=fused)
        if how == "by hand":
            optimizer = torch.optim.AdamW(grouped_by_module_type(model, 0.1, norms), lr=1e-2, betas=betas, eps=eps,
                                          foreach=False)
        else:
            optimizer = configure(how == "fused")
            assert optimizer.defaults["fused"] is (True if how == "fused" else None)
            assert optimizer.defaults["foreach"] is (None if how == "fused" else False)
        loss.backward()
        with torch.no_grad():  # gains and biases away from their init (1 and 0), so decay on them would show
            for p in model.parameters():
                if p.dim() < 2:
                    p.add_(1.0)
        optimizer.step()
        return [p.detach().clone() for p in model.parameters()]

    reference = one_step("by hand")
    for how in ("fused", "for-loop"):
        for name_p, ours, theirs in zip(range(len(reference)), one_step(how), reference):
            torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5, msg=f"{how}: parameter {name_p}")


# A fake clock for the benchmarks: each variant's steps "take" a known time, so the tables must show exactly these
# figures, in ms, in the rows of the right variant, and the ratios must be the quotients of the rows' times.
def fake_gpt_seconds(sdpa, fused, context, micro_steps):
    """(forward + backward, update) seconds: plain attention 3x slower, the for-loop update 5x slower."""
    return 1e-4 * context * (1 if sdpa else 3) + 1e-3 * micro_steps, 1e-3 * (1 if fused else 5)


def test_gpt_bench_reports_each_variants_own_times_in_ms_and_ratios_of_those_times(tmp_path, monkeypatch, capsys):
    def fake_time_step(model, optimizer, scaler, micro_batch, micro_steps, *rest):
        assert micro_batch[0].size(0) * micro_steps == 8  # every variant: the step's 8 sequences
        return fake_gpt_seconds(gs.CausalSelfAttention.use_sdpa, optimizer.defaults["fused"] is True,
                                micro_batch[0].size(1), micro_steps)
    monkeypatch.setattr(gs, "time_step", fake_time_step)
    assert gs.main(["bench", "--preset", "smoke", "--vocab_size", "128", "--bench_steps", "1", "--bench_repeats", "1",
                    "--bench_runs", "4", "--out_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "bench_gpt.json").read_text())
    # smoke: 8 sequences per step, micro-batches of 4: 2 micro-steps; train() packs a 16-token step into 1
    sdpa, unpacked, plain = "sdpa + fused AdamW", "sdpa + fused AdamW, unpacked short micro-batches", \
        "plain attention + for-loop AdamW"
    expected = {(sdpa, 16): (True, True, 1), (sdpa, 64): (True, True, 2), (unpacked, 16): (True, True, 2),
                (plain, 16): (False, False, 2), (plain, 64): (False, False, 2)}
    rows = {(r["variant"], r["context"]): r for r in result["steps"]}
    assert rows.keys() == expected.keys()
    for key, (use_sdpa, fused, micro_steps) in expected.items():
        fwd_bwd, update = fake_gpt_seconds(use_sdpa, fused, key[1], micro_steps)
        row = rows[key]
        assert row["micro_steps"] == micro_steps and row["samples"] == 1
        assert row["fwd_bwd_ms"] == pytest.approx(fwd_bwd * 1e3) and row["update_ms"] == pytest.approx(update * 1e3)
        assert row["step_ms"] == pytest.approx((fwd_bwd + update) * 1e3)
        assert row["tokens_per_s"] == pytest.approx(8 * key[1] / (fwd_bwd + update))
        n = model_params_without_positions()  # PaLM: (6N + 12 L d T) FLOPs per token
        assert row["model_tflops"] == pytest.approx((6 * n + 12 * 2 * 32 * key[1]) * 8 * key[1]
                                                    / (fwd_bwd + update) / 1e12)
        assert f"| {key[0]} | {key[1]} |" in out
    for name in (sdpa, plain):  # the short step's time over the full step's, both as measured
        ratio = rows[(name, 16)]["step_ms"] / rows[(name, 64)]["step_ms"]
        ratios = result["ratios"][name]
        assert ratios["step_time_ratio"] == pytest.approx(ratio) and ratios["ideal"] == 16 / 64
        assert ratios["projected_staged_saving"] == pytest.approx(0.25 * (1 - ratio))
    assert result["packing"]["speedup"] == pytest.approx(rows[(unpacked, 16)]["step_ms"] / rows[(sdpa, 16)]["step_ms"])
    runs = result["runs"]  # real runs of train(): the saving is the quotient of the two measured medians
    assert runs["steps"] == 4 and [len(s) for s in runs["seconds"].values()] == [1, 1]
    (base,), (staged,) = runs["seconds"].values()
    assert runs["measured_saving"] == pytest.approx(1 - staged / base)
    decode = result["decode"]
    assert decode["new_tokens"] == 64 and decode["batch"] == 8
    assert decode["speedup"] == pytest.approx(decode["recompute_ms_per_token"] / decode["cache_ms_per_token"])


def model_params_without_positions():
    torch.manual_seed(0)
    model = gs.GPT(gs.GPTConfig(block_size=64, vocab_size=128, n_layer=2, n_head=2, n_embd=32))
    return sum(p.numel() for name, p in model.named_parameters() if name != "transformer.wpe.weight")


def test_time_step_runs_one_training_step_and_clears_the_gradients():
    torch.manual_seed(0)
    model = gs.GPT(gs.GPTConfig(block_size=16, vocab_size=32, n_layer=1, n_head=2, n_embd=8))
    optimizer = model.configure_optimizers(0.1, 1e-2, (0.9, 0.95), "cpu")
    before = [p.detach().clone() for p in model.parameters()]
    batch = tuple(torch.randint(32, (2, 16)) for _ in "xy")
    config = gs.Config(grad_clip=1.0)
    fwd_bwd, update = gs.time_step(model, optimizer, torch.amp.GradScaler("cpu", enabled=False), batch, 2,
                                   torch.autocast("cpu", enabled=False), config, torch.device("cpu"))
    assert isinstance(fwd_bwd, float) and isinstance(update, float)
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))  # every parameter moved
    assert all(p.grad is None for p in model.parameters())


def test_t5_bench_reports_each_variants_own_times_and_shares_the_encoder_across_beams(tmp_path, monkeypatch,
                                                                                      capsys):
    clock = [0.0]
    forward_backward, optimizer_step, next_logits = ds2.forward_backward, ds2.optimizer_step, ds2.T5.next_logits

    def timed_forward_backward(model, micro_batches, *args):
        loss = forward_backward(model, micro_batches, *args)
        clock[0] += 0.010 if ds2.Attention.use_sdpa else 0.030  # plain attention: 3x
        return loss

    def timed_optimizer_step(model, optimizer, *args):
        optimizer_step(model, optimizer, *args)
        clock[0] += 0.002 if optimizer.defaults["fused"] else 0.010  # the for-loop update: 5x

    def timed_next_logits(self, seqs, enc_out, src, cache):
        clock[0] += 1e-4 if cache is not None else 1e-3  # with the KV cache 10x faster per token
        return next_logits(self, seqs, enc_out, src, cache)

    def perf_counter():
        return clock[0]
    monkeypatch.setattr(ds2, "forward_backward", timed_forward_backward)
    monkeypatch.setattr(ds2, "optimizer_step", timed_optimizer_step)
    monkeypatch.setattr(ds2.T5, "next_logits", timed_next_logits)
    monkeypatch.setattr(ds2, "time", types.SimpleNamespace(perf_counter=perf_counter, time=time.time,
                                                         sleep=time.sleep))  # ds2's clock only
    assert ds2.main(["bench", "--preset", "smoke", "--bench_steps", "1", "--bench_repeats", "1",
                     "--bench_src_len", "24", "--bench_tgt_len", "8", "--out_dir", str(tmp_path)]) == 0
    assert "| plain attention + for-loop AdamW |" in capsys.readouterr().out
    result = json.loads((tmp_path / "bench_ds2.json").read_text())
    fast, plain = result["steps"]
    assert (fast["variant"], plain["variant"]) == ("sdpa + fused AdamW", "plain attention + for-loop AdamW")
    for row, (fwd_bwd_ms, update_ms) in ((fast, (10, 2)), (plain, (30, 10))):  # smoke: one forward_backward call
        assert row["fwd_bwd_ms"] == pytest.approx(fwd_bwd_ms) and row["update_ms"] == pytest.approx(update_ms)
        assert row["step_ms"] == pytest.approx(fwd_bwd_ms + update_ms)
        assert row["tokens_per_s"] == pytest.approx(8 * (24 + 8) / ((fwd_bwd_ms + update_ms) / 1e3))
    decode = result["decode"]
    assert decode["cache_ms_per_token"] == pytest.approx(0.1) and decode["recompute_ms_per_token"] == pytest.approx(1)
    assert decode["speedup"] == pytest.approx(10)
    assert decode["beam4_encoder_rows"] == decode["batch"] == 8  # once per example, not once per beam


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
