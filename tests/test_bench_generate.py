"""`tq_hf.bench.bench_generate` end to end at a tiny size on the CPU (the GPU run uses the same code).

One real run (2-layer model, contexts 32 and 160, batches 1 and 2, every system) checks the files it
writes and that its rows are sane; cheaper tests check the OOM / time-budget bookkeeping (with a
stubbed measurement), the command-line wiring and the capacity arithmetic.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json

import pytest
import torch

from tq_hf import bench

TINY = {"layers": 2, "hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 512}
CONTEXTS, BATCHES, PRESETS = (32, 160), (1, 2), ("4bit", "3bit")
STEPS, WARMUP = 2, 1
HAS_MPL = importlib.util.find_spec("matplotlib") is not None


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    # Tiny matmuls: one thread is fastest, and keeps the run quick on a busy machine (spinning OpenMP
    # workers of a multi-threaded run slow it down 50x when the cores are shared).
    torch.set_num_threads(1)
    try:
        result = bench.bench_generate(CONTEXTS, BATCHES, PRESETS, device="cpu", steps=STEPS, warmup=WARMUP,
                                      attn_steps=1, warmup_context=16, out_dir=str(out), name="gen",
                                      progress=False, **TINY)
    finally:
        torch.set_num_threads(threads)
    return result, out


def test_files_written(run):
    result, out = run
    for name in ("gen.json", "gen.csv", "gen_capacity.csv"):
        assert (out / name).stat().st_size > 0, name
    if HAS_MPL:
        png = (out / "gen.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    saved = json.loads((out / "gen.json").read_text())
    assert len(saved["rows"]) == len(result["rows"]) == len(CONTEXTS) * len(BATCHES) * (3 + len(PRESETS))
    with open(out / "gen.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(saved["rows"])
    for col in ("gpu", "torch", "triton", "transformers", "date", "system", "batch", "context", "status",
                "ttft_s", "decode_tokens_per_s", "cache_bytes", "cpu"):
        assert col in rows[0], col
    env = saved["environment"]
    assert env["device"] == "cpu" and env["gpu"].startswith("none (CPU run")
    assert saved["notes"][0].startswith("CPU RUN")


def test_rows_sane(run):
    result, _ = run
    rows = result["rows"]
    by = {(r["system"], r["batch"], r["context"]): r for r in rows}
    systems = list(dict.fromkeys(r["system"] for r in rows))
    assert systems[:2] == ["DynamicCache fp32 + SDPA", "DynamicCache fp32 + SDPA flash"]
    assert systems[2].startswith("HF QuantizedCache")
    assert systems[3:] == [f"TurboQuant {p}" for p in PRESETS]
    hf = [r for r in rows if r["system"] == systems[2]]
    # transformers 5.17 has no installable backend here (quanto/hqq not installed, no fp8): a row says why.
    assert all(r["status"] == "ok" for r in hf) or all(r["status"].startswith("unavailable: ") for r in hf)
    for r in rows:
        assert r["cpu"] is True and r["timer"] == "perf_counter" and r.get("peak_mem_bytes") is None
        if r["status"] != "ok":
            continue
        assert r["ttft_s"] > 0 and r["decode_step_ms"] > 0 and r["decode_steps"] == STEPS
        assert r["decode_tokens_per_s"] == pytest.approx(r["batch"] / (r["decode_step_ms"] / 1e3))
        assert r["cache_tokens"] == r["context"] + WARMUP + STEPS
        assert r["cache_bytes"] > 0 and 0 < r["attn_share"] <= 1 and 0 <= r["update_share"] <= 1
    for b in BATCHES:
        dense = by[(systems[0], b, max(CONTEXTS))]
        assert dense["status"] == "ok"
        # fp32 DynamicCache: exactly 2x the bf16 bytes of the same tokens
        assert dense["cache_vs_bf16"] == pytest.approx(2.0)
        for p in PRESETS:
            tq = by[(f"TurboQuant {p}", b, max(CONTEXTS))]
            assert tq["status"] == "ok", tq["status"]
            assert tq["cache_bytes"] < dense["cache_bytes"]
            assert tq["decode_speedup_vs_dense"] > 0 and tq["ttft_vs_dense"] > 0
            flash = by[(systems[1], b, max(CONTEXTS))]
            assert flash["status"] == "ok" and flash["cache_bytes"] == dense["cache_bytes"]
            assert tq["decode_speedup_vs_flash"] == pytest.approx(tq["decode_tokens_per_s"] / flash["decode_tokens_per_s"])
    cap = {e["system"]: e for e in result["capacity"]}
    assert cap[systems[0]]["capacity_tokens"] > 0 and cap[systems[0]]["capacity_vs_dense"] == 1.0
    for p in PRESETS:
        e = cap[f"TurboQuant {p}"]
        assert e["status"] == "ok" and e["capacity_vs_dense"] > 1
        assert e["max_batch"][str(max(CONTEXTS))] == e["capacity_tokens"] // max(CONTEXTS)
        assert e["method"].startswith("CPU:")


def test_print_and_plot_only(run, capsys, tmp_path):
    result, out = run
    bench.print_generate(result)
    text = capsys.readouterr().out
    assert "TurboQuant 4bit" in text and "capacity in a" in text
    if HAS_MPL:
        assert bench.main_generate(["--plot-only", str(out / "gen.json")]) == 0
        assert (out / "gen.png").exists()


def _fake_measure(model, system, batch, context, opts, device, generator):
    if system.name == "TurboQuant 4bit" and batch * context >= 64:
        err = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        err._phase = "prefill"
        raise err
    if system.name == "TurboQuant 3bit" and context == 32 and batch == 2:
        raise RuntimeError("boom")
    return {"ttft_s": 0.1, "decode_step_ms": 10.0, "decode_tokens_per_s": 100.0 * batch,
            "cache_bytes": 1000 * batch * (context + 3), "cache_tokens": context + 3, "peak_mem_decode_bytes": None}


def test_oom_error_and_time_budget_bookkeeping(monkeypatch):
    from tq_hf.models import tiny_llama

    model, _ = tiny_llama(num_hidden_layers=1, hidden_size=128, head_dim=64, num_attention_heads=2)
    monkeypatch.setattr(bench, "_measure", _fake_measure)
    res = bench.bench_generate((32, 64), (1, 2), PRESETS, model=model, device="cpu", hf_backend="none",
                               progress=False)
    st = {(r["system"], r["batch"], r["context"]): r["status"] for r in res["rows"]}
    assert st[("TurboQuant 4bit", 1, 32)] == "ok"
    assert st[("TurboQuant 4bit", 2, 32)] == "oom (prefill)"
    assert st[("TurboQuant 4bit", 1, 64)] == "oom (prefill)"
    # larger shapes than one that ran out of memory are not tried
    assert st[("TurboQuant 4bit", 2, 64)].startswith("skipped: oom at batch")
    assert st[("TurboQuant 3bit", 2, 32)] == "error (warm-up): RuntimeError: boom"
    assert st[("TurboQuant 3bit", 2, 64)] == "ok"
    res = bench.bench_generate((32,), (1,), ("4bit",), model=model, device="cpu", hf_backend="none",
                               time_budget_s=0, progress=False)
    assert all(r["status"].startswith("skipped: time budget") for r in res["rows"])
    assert res["capacity"][0]["status"].startswith("no successful row")


def test_command_line_wiring(capsys):
    p = bench.add_generate_arguments(argparse.ArgumentParser())
    a = p.parse_args([])
    assert a.contexts == [4096, 16384, 32768, 65536] and a.batches == [1, 8] and a.presets == ["4bit", "3bit"]
    assert a.device == "auto" and a.dtype == "auto" and a.model is None and a.layers is None
    a = p.parse_args(["--contexts", "4K", "16k", "100", "--layers", "4", "--time-budget", "480"])
    assert a.contexts == [4096, 16384, 100] and a.layers == 4 and a.time_budget == 480
    with pytest.raises(SystemExit):
        p.parse_args(["--contexts", "lots"])
    k = bench.add_kernels_arguments(argparse.ArgumentParser()).parse_args(["--contexts", "1K"])
    assert k.contexts == [1024] and k.batches == [1, 8, 32]
    assert callable(bench.run_generate) and callable(bench.run_kernels)
    if not torch.cuda.is_available():
        assert bench.main_kernels([]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err
        assert bench.main_generate(["--device", "cuda"]) == 2
    assert bench.main_generate(["--layers", "0"]) == 2
    assert bench.main_generate(["--gpus", "0"]) == 2
    for bad in (["--warmup", "-1"], ["--attn-steps", "-1"], ["--head-dim", "0"], ["--plot-only", "/nonexistent.json"]):
        assert bench.main_generate(bad) == 2
    assert bench.main([]) == 2
    if torch.cuda.device_count() < 2:  # a split over more GPUs than there are is refused before any work
        with pytest.raises(ValueError, match="needs 2 CUDA devices"):
            bench.bench_generate([32], [1], ["4bit"], device="cpu", gpus=2, progress=False, **TINY)


def test_tensor_bytes_counts_each_storage_once():
    t = torch.zeros(4, 8)
    assert bench._tensor_bytes([t, t, {"a": t[:2]}, (torch.zeros(3, dtype=torch.uint8), torch.empty(0))]) == 4 * 8 * 4 + 3


def test_capacity_arithmetic():
    rows = [
        {"system": "DynamicCache bf16 + SDPA", "status": "ok", "batch": 1, "context": 100, "cache_tokens": 100,
         "cache_bytes": 100 * 1000, "peak_mem_decode_bytes": 10_000 + 100 * 1000, "cpu": False},
        {"system": "DynamicCache bf16 + SDPA", "status": "ok", "batch": 2, "context": 100, "cache_tokens": 100,
         "cache_bytes": 200 * 1000, "peak_mem_decode_bytes": 10_000 + 200 * 1000, "cpu": False},
        {"system": "TurboQuant 4bit", "status": "ok", "batch": 1, "context": 100, "cache_tokens": 100,
         "cache_bytes": 100 * 250, "peak_mem_decode_bytes": 10_000 + 100 * 250, "cpu": False},
        {"system": "TurboQuant 4bit", "status": "ok", "batch": 2, "context": 100, "cache_tokens": 100,
         "cache_bytes": 200 * 250, "peak_mem_decode_bytes": 10_000 + 200 * 250, "cpu": False},
    ]
    cap = {e["system"]: e for e in bench.capacity(rows, 1_010_000, (100,), {})}
    d, t = cap["DynamicCache bf16 + SDPA"], cap["TurboQuant 4bit"]
    assert d["fixed_bytes"] == t["fixed_bytes"] == 10_000
    assert d["capacity_tokens"] == 1000 and t["capacity_tokens"] == 4000 and t["capacity_vs_dense"] == 4.0
    assert t["max_batch"] == {"100": 40}
    assert t["capacity_tokens_peak_fit"] == 4000 and t["peak_fit_bytes_per_token"] == pytest.approx(250)


def test_local_checkpoint_with_fewer_layers(tmp_path):
    from tq_hf.models import tiny_llama

    model, _ = tiny_llama(num_hidden_layers=3, hidden_size=128, head_dim=64, num_attention_heads=2)
    model.save_pretrained(tmp_path / "ckpt")
    res = bench.bench_generate((80,), (1,), ("4bit",), model_path=str(tmp_path / "ckpt"), layers=2, device="cpu",
                               hf_backend="none", steps=1, warmup=0, attn_steps=0, warmup_context=8, progress=False)
    assert res["model"]["model"] == "ckpt (llama)" and res["model"]["layers"] == 2
    assert [r["status"] for r in res["rows"]] == ["ok", "ok", "ok"]
    with pytest.raises(ValueError, match="not a folder"):
        bench.bench_generate((16,), (1,), model_path=str(tmp_path / "missing"), device="cpu", progress=False)


def test_sdpa_backend_calls_match_sdpa():
    """The forced-backend SDPA baselines of `bench kernels`: each backend that can run the inputs gives SDPA's
    result; those that cannot are reported, not timed (on a CPU: flash runs, cuDNN and efficient do not)."""
    import torch.nn.functional as F

    qs = [torch.randn(2, 8, 1, 64) for _ in range(2)]
    kvs = [(torch.randn(2, 2, 100, 64), torch.randn(2, 2, 100, 64)) for _ in range(2)]
    said = []
    calls = bench.sdpa_backend_calls(qs, kvs, log=said.append)
    assert "flash" in calls and len(calls) + len(said) == 3
    for fns in calls.values():
        for f, q, (k, v) in zip(fns, qs, kvs):
            torch.testing.assert_close(f(), F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
    assert all("cannot run" in s for s in said)
