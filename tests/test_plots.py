"""tq_hf.plots: every figure has labelled axes and a legend, from small inputs (Agg backend, CPU)."""

from __future__ import annotations

import os

import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt

from tq_hf import analysis, plots

RESULTS = os.path.join(os.path.dirname(__file__), "..", "notebooks", "results", "kernels_h200.json")


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def check(fig, n_axes, legends=None):
    axes = fig.get_axes()
    assert len(axes) == n_axes
    for ax in axes:
        assert ax.get_xlabel() and ax.get_ylabel(), ax.get_title()
        assert ax.get_title() or fig._suptitle is not None
    for i in legends if legends is not None else range(n_axes):
        assert axes[i].get_legend() is not None, f"axes {i} has no legend"


def test_codec_plots():
    dist = {"a": analysis.codec_distortion(64, (1, 2, 3), n=200)}
    check(plots.plot_distortion(dist), 1)
    ip = {"a": analysis.inner_product_error(64, (1, 2), n=200), "b": analysis.inner_product_error(64, (1, 2), n=200)}
    check(plots.plot_inner_product(ip), 2)


def test_attention_plot():
    rows = analysis.attention_error_table({"plain": {}, "bias": {"key_bias": 4.0}}, bits=(2, 3), n_tokens=64,
                                          n_queries=4, head_dim=32)
    check(plots.plot_attention_error(rows, bits=3), 2)


def test_logit_plot():
    rows = [{"preset": p, "rel_logit_err": e, "kl": e / 10, "top1": 1.0, "greedy_prefix": 3, "n_steps": 4}
            for p, e in (("bf16 K/V", 0.001), ("4bit", 0.04), ("3bit", 0.09))]
    check(plots.plot_logit_agreement(rows, title="t"), 2, legends=())


def test_memory_plots():
    from transformers import LlamaConfig

    cfg = LlamaConfig(num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, hidden_size=128,
                      vocab_size=64)
    rows = analysis.cache_memory(cfg, presets=("4bit",), contexts=(64, 128))
    check(plots.plot_memory(rows), 1)
    check(plots.plot_capacity(analysis.capacity(rows, 2**30), 1), 1, legends=())


def test_kernel_plots(tmp_path):
    rows = analysis.load_results(RESULTS)
    fig = plots.plot_kernel_bench(rows, source="file")
    check(fig, 2)
    assert "NVIDIA H200" in fig._suptitle.get_text()
    fig = plots.plot_kernel_bandwidth(rows, copy_gbps=4200)
    check(fig, 1)
    path = plots.save(fig, str(tmp_path / "figs"), "bw")
    assert path.endswith("bw.png") and os.path.getsize(path) > 1000
    assert plots.save(fig, None, "bw") is None


def test_logit_plot_with_an_exact_row():
    rows = [{"preset": p, "rel_logit_err": e, "kl": e / 10, "top1": 1.0, "greedy_prefix": 3, "n_steps": 4}
            for p, e in (("4bit", 0.04), ("k3v2", 0.0))]
    fig = plots.plot_logit_agreement(rows)
    assert any("exact" in t.get_text() for t in fig.get_axes()[0].texts)
