"""Figures of `tq_hf.analysis` results for the notebooks (matplotlib, imported on first use).

Every function takes result rows and returns a `matplotlib.figure.Figure` with labelled axes
(units included) and a legend; `save` writes one to a folder as PNG.
"""

from __future__ import annotations

import math
import os

__all__ = [
    "plot_attention_error",
    "plot_capacity",
    "plot_distortion",
    "plot_inner_product",
    "plot_kernel_bandwidth",
    "plot_kernel_bench",
    "plot_logit_agreement",
    "plot_memory",
    "save",
]

_PRESET_COLORS = {"4bit": "C0", "k4v3": "C1", "3bit": "C2", "k3v2": "C3", "8bit": "C4"}
_DENSE_COLOR = "0.35"


def _plt():
    import matplotlib.pyplot as plt

    return plt


def _color(name: str, i: int) -> str:
    if "DynamicCache" in name or "SDPA" in name or name.startswith("bf16"):
        return _DENSE_COLOR
    for key, c in _PRESET_COLORS.items():
        if name.endswith(key):
            return c
    return f"C{(i + 5) % 10}"


def _env_line(rows) -> str:
    r = rows[0]
    parts = [r.get("gpu", "?")]
    for key, label in (("torch", "torch"), ("triton", "Triton"), ("transformers", "transformers")):
        if r.get(key):
            parts.append(f"{label} {r[key]}")
    if r.get("date"):
        parts.append(str(r["date"])[:10])
    return ", ".join(parts)


def _plain_log_ticks(axis):
    # Log axes spanning less than a decade label minor ticks as 6x10^-1; print plain numbers instead.
    from matplotlib.ticker import FuncFormatter

    def minor(v, _):
        lead = round(v / 10 ** math.floor(math.log10(v))) if v > 0 else 0
        return f"{v:g}" if lead in (2, 5) else ""

    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(FuncFormatter(minor))


def save(fig, folder: str | None, name: str, dpi: int = 110) -> str | None:
    """Write `fig` to `folder/name.png` (folder created) and return the path; no-op if folder is None."""
    if not folder:
        return None
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{name}.png")
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


# ============================================================================================ codec
def plot_distortion(measured: dict[str, list[dict]]):
    """MSE distortion per bit width: measured curves (`{label: codec_distortion rows}`), the paper's
    values, the 4^-b lower bound and TurboQuant's sqrt(3)*pi/2 * 4^-b upper bound (log scale)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    first = next(iter(measured.values()))
    bits = [r["bits"] for r in first]
    ax.fill_between(bits, [r["lower_bound"] for r in first], [r["upper_bound"] for r in first],
                    color="0.9", label="paper's bounds: 4$^{-b}$ ≤ MSE ≤ $\\frac{\\sqrt{3}\\pi}{2}$4$^{-b}$")
    ax.plot(bits, [r["lower_bound"] for r in first], "k--", lw=1, label="lower bound 4$^{-b}$ (any quantizer)")
    for i, (label, rows) in enumerate(measured.items()):
        ax.plot([r["bits"] for r in rows], [r["mse"] for r in rows], "o-", color=f"C{i}", ms=5, label=label)
    paper = [(r["bits"], r["paper"]) for r in first if r.get("paper") is not None]
    if paper:
        ax.plot(*zip(*paper), "x", color="C3", ms=10, mew=2, label="paper's table (b = 1-4)")
    ax.set_yscale("log")
    ax.set_xlabel("bits per coordinate b")
    ax.set_ylabel("MSE distortion  E‖x − x̂‖²  (unit vectors)")
    ax.set_title(f"TurboQuant_mse distortion, head dim d = {first[0]['dim']}")
    ax.set_xticks(bits)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8.5)
    fig.tight_layout()
    return fig


def plot_inner_product(measured: dict[str, list[dict]]):
    """Inner-product error per bit width (`{label: inner_product_error rows}`): RMS error next to
    sqrt(MSE), and the slope of <y, x^> against <y, x> (1 = unbiased)."""
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (label, rows) in enumerate(measured.items()):
        bits = [r["bits"] for r in rows]
        a.plot(bits, [r["rms"] for r in rows], "o-", color=f"C{i}", ms=5, label=f"RMS error, {label}")
        b.plot(bits, [r["slope"] for r in rows], "o-", color=f"C{i}", ms=5, label=label)
    rows = next(iter(measured.values()))
    bits = [r["bits"] for r in rows]
    a.plot(bits, [math.sqrt(r["mse"]) for r in rows], "k:", lw=1.5, label="√(MSE distortion) of the keys")
    a.set_yscale("log")
    a.set_xlabel("bits per coordinate b")
    a.set_ylabel("RMS of ⟨y, x̂⟩ − ⟨y, x⟩  (units of std ⟨y, x⟩)")
    a.set_title("Inner-product error (query y ~ N(0, I), unit key x)")
    b.axhline(1.0, color="k", lw=1, ls="--", label="unbiased")
    b.axhline(2 / math.pi, color="0.5", lw=1, ls=":", label="2/π (1-bit theory)")
    b.set_xlabel("bits per coordinate b")
    b.set_ylabel("slope of ⟨y, x̂⟩ on ⟨y, x⟩  (1 = unbiased)")
    b.set_title("Bias: TurboQuant_mse shrinks inner products")
    for ax in (a, b):
        ax.set_xticks(bits)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8.5)
    fig.tight_layout()
    return fig


def plot_attention_error(rows: list[dict], bits: int = 3, scenario: str | None = None):
    """Attention-output error on synthetic K/V (`attention_error_table` rows): per scenario at `bits`,
    with and without key mean-centring; and against bit width for `scenario` (default: the last)."""
    plt = _plt()
    scenarios = list(dict.fromkeys(r["scenario"] for r in rows))
    scenario = scenario or scenarios[-1]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.6), gridspec_kw={"width_ratios": [1.4, 1]})
    width = 0.38
    for j, (centred, label) in enumerate(((True, "key mean-centring on (default)"), (False, "centring off"))):
        vals = []
        for s in scenarios:
            match = [r["rel_err"] for r in rows
                     if r["scenario"] == s and r["key_bits"] == bits and r["key_mean_centering"] == centred]
            vals.append(match[0] if match else float("nan"))
        xs = [i + (j - 0.5) * width for i in range(len(scenarios))]
        bars = a.bar(xs, vals, width, color="C0" if centred else "C1", label=label)
        a.bar_label(bars, fmt="%.2f", fontsize=8, padding=2)
    a.set_xticks(range(len(scenarios)))
    a.set_xticklabels(scenarios, rotation=15, ha="right", fontsize=9)
    a.set_ylabel("relative error of attention output  ‖ô − o‖ / ‖o‖")
    a.set_xlabel("K/V structure (each adds to the one on its left)")
    a.set_title(f"{bits}-bit keys and values, per K/V structure")
    a.set_ylim(0, max(r["rel_err"] for r in rows if r["key_bits"] == bits) * 1.25)
    a.grid(True, axis="y", alpha=0.3)
    a.legend(fontsize=9, loc="upper left")
    ref = scenarios[0]
    for name, centred, ls, marker, color, label in (
        (scenario, True, "-", "o", "C0", f"'{scenario}', centring on"),
        (scenario, False, "--", "s", "C1", f"'{scenario}', centring off"),
        (ref, True, ":", "^", "0.4", f"'{ref}' (for reference)"),
    ):
        sel = sorted((r for r in rows if r["scenario"] == name and r["key_mean_centering"] == centred),
                     key=lambda r: r["key_bits"])
        b.plot([r["key_bits"] for r in sel], [r["rel_err"] for r in sel], ls=ls, marker=marker, color=color, ms=5,
               label=label)
    b.set_yscale("log")
    _plain_log_ticks(b.yaxis)
    b.set_xlabel("bits per coordinate (keys = values)")
    b.set_ylabel("relative error of attention output  ‖ô − o‖ / ‖o‖")
    b.set_title("Error against bit width")
    b.set_xticks(sorted({r["key_bits"] for r in rows}))
    b.grid(True, which="both", alpha=0.3)
    b.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_logit_agreement(rows: list[dict], title: str = "", reference: str = "uncompressed DynamicCache"):
    """Per preset (`logit_agreement` rows): relative logit error and KL against the reference
    cache, and teacher-forced top-1 agreement with the greedy prefix written on the bars."""
    plt = _plt()
    names = [r["preset"] for r in rows]
    colors = [_color(n, i) for i, n in enumerate(names)]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    errs = [r["rel_logit_err"] for r in rows]
    bars = a.bar(names, [e if e > 0 else float("nan") for e in errs], color=colors)
    a.bar_label(bars, labels=[f"KL {r['kl']:.1e}" if e > 0 else "" for r, e in zip(rows, errs)], fontsize=8,
                padding=2)
    a.set_yscale("log")
    positive = [e for e in errs if e > 0]
    if positive:
        a.set_ylim(min(positive) / 3, max(positive) * 4)
    for i, e in enumerate(errs):
        if e == 0:  # e.g. k3v2 on a 4-layer model: every layer kept in full precision
            a.text(i, min(positive) / 2.6 if positive else 1, "exact\n(no layer\nquantized)", ha="center",
                   va="bottom", fontsize=8)
    a.set_ylabel("relative logit error  ‖l̂ − l‖ / ‖l − mean l‖")
    a.set_xlabel("preset")
    a.set_title("Logit error per decode step (bar labels: KL in nats)")
    bars = b.bar(names, [100 * r["top1"] for r in rows], color=colors)
    b.bar_label(bars, labels=[f"{r['greedy_prefix']}/{r['n_steps']}" for r in rows], fontsize=8.5, padding=2)
    b.set_ylim(0, 115)
    b.set_ylabel("teacher-forced top-1 agreement (%)")
    b.set_xlabel("preset")
    b.set_title("Next-token agreement (bar labels: identical greedy tokens)")
    for ax in (a, b):
        ax.grid(True, axis="y", which="both", alpha=0.3)
    fig.suptitle(f"TurboQuantCache vs {reference}" + (f": {title}" if title else ""), fontsize=11)
    fig.tight_layout()
    return fig


# ==================================================================================== memory, speed
def _token_ticks(ax, values):
    # Context lengths on a log2 axis, labelled 256, 1K, 16K rather than 2^8.
    from matplotlib.ticker import FixedLocator, NullLocator

    ax.set_xscale("log", base=2)
    ticks = sorted(set(values))
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([f"{t // 1024}K" if t >= 1024 and t % 1024 == 0 else str(t) for t in ticks])


def plot_memory(rows: list[dict], title: str = ""):
    """Cache bytes per token (whole model) against context length, per preset (`cache_memory` rows),
    with each preset's codes-only ideal as a dotted line."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9.5, 4.8))
    names = list(dict.fromkeys(r["preset"] for r in rows))
    for i, name in enumerate(names):
        sel = sorted((r for r in rows if r["preset"] == name), key=lambda r: r["context"])
        xs = [r["context"] for r in sel]
        c = _color(name, i)
        ax.plot(xs, [r["bytes_per_token"] / 1024 for r in sel], "o-", color=c, ms=4, label=name)
        if "DynamicCache" not in name:
            ax.plot(xs, [r["ideal_bytes_per_token"] / 1024 for r in sel], ":", color=c, lw=1.3)
    ax.plot([], [], "k:", lw=1.3, label="ideal: codes + norms only\n(quantized layers)")
    _token_ticks(ax, [r["context"] for r in rows])
    ax.set_ylim(0, max(r["bytes_per_token"] for r in rows) / 1024 * 1.08)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("cache memory per token (KiB, all layers)")
    r0 = rows[0]
    ax.set_title(title or f"Measured cache bytes / tokens: {r0['layers']} layers × {r0['kv_heads']} KV heads × "
                 f"head dim {r0['head_dim']}, batch {r0['batch']}", fontsize=10.5)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8.5, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


def plot_capacity(cap_rows: list[dict], budget_gib: float, title: str = ""):
    """Tokens that fit in a KV budget of `budget_gib` GiB, per preset (`capacity` rows)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.2))
    names = [r["preset"] for r in cap_rows]
    vals = [r["tokens"] / 1e6 for r in cap_rows]
    bars = ax.bar(names, vals, color=[_color(n, i) for i, n in enumerate(names)])
    ax.bar_label(bars, labels=[f"{r['tokens'] / 1e6:.2f}M ({r['vs_first']:.2f}x)" for r in cap_rows],
                 fontsize=8.5, padding=2)
    ax.set_ylabel(f"tokens that fit in {budget_gib:g} GiB of KV cache (millions)")
    ax.set_xlabel("cache")
    ax.set_ylim(0, max(vals) * 1.18)
    ax.set_title(title or f"KV capacity at the bytes per token measured at {cap_rows[0]['context']} tokens")
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def _by_system_batch(rows):
    systems = list(dict.fromkeys(r["system"] for r in rows))
    batches = sorted({r["batch"] for r in rows})
    return systems, batches


def _kernel_systems(rows):
    """`bench_kernels` rows without those of SDPA forced to one backend (`bf16 SDPA flash`, ...): SDPA's own
    choice is the baseline. Returns (rows, systems, batches, style): `style(system)` is solid for SDPA and
    one of four other line styles per TurboQuant preset."""
    rows = [r for r in rows if "SDPA" not in r["system"] or r["system"] == "bf16 SDPA"]
    systems, batches = _by_system_batch(rows)
    tq_styles = ["--", "-.", ":", (0, (5, 1, 1, 1, 1, 1))]
    tq = [x for x in systems if "SDPA" not in x]
    return rows, systems, batches, lambda x: "-" if "SDPA" in x else tq_styles[tq.index(x) % len(tq_styles)]


def plot_kernel_bench(rows: list[dict], source: str = ""):
    """Decode-attention kernel benchmark (`tq_hf.bench.bench_kernels` rows): latency per call against
    context length per batch size, and speed relative to bf16 SDPA (above 1 = faster than bf16); SDPA
    forced to one backend is left out (`_kernel_systems`)."""
    plt = _plt()
    rows, systems, batches, style = _kernel_systems(rows)
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.6))
    for bi, B in enumerate(batches):
        for system in systems:
            sel = sorted((r for r in rows if r["batch"] == B and r["system"] == system), key=lambda r: r["context"])
            if not sel:
                continue
            xs = [r["context"] for r in sel]
            a.plot(xs, [r["us"] for r in sel], linestyle=style(system), marker="o", ms=4, color=f"C{bi}",
                   label=f"{system}, batch {B}")
            if "SDPA" not in system:
                b.plot(xs, [r["speedup"] for r in sel], linestyle=style(system), marker="o", ms=5, color=f"C{bi}",
                       label=f"{system}, batch {B}")
    _token_ticks(a, [r["context"] for r in rows])
    a.set_yscale("log")
    a.set_xlabel("context length (tokens)")
    a.set_ylabel("time per decode-attention call (µs, median)")
    a.set_title("Latency: solid = bf16 SDPA, other styles = TurboQuant presets")
    a.legend(fontsize=7.5, ncol=2)
    b.axhline(1.0, color="k", lw=1.2, ls="--", label="bf16 SDPA (break-even)")
    _token_ticks(b, [r["context"] for r in rows])
    top = max(1.15, max(r["speedup"] for r in rows if "SDPA" not in r["system"]) * 1.15)
    b.set_ylim(0, top)
    b.set_xlabel("context length (tokens)")
    b.set_ylabel("speed relative to bf16 SDPA  (SDPA time / kernel time)")
    b.set_title("TurboQuant decode speed vs bf16 (> 1 = faster)")
    b.legend(fontsize=8)
    for ax in (a, b):
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"Decode attention, one layer: {_env_line(rows)}" + (f"  [{source}]" if source else ""),
                 fontsize=10)
    fig.tight_layout()
    return fig


def plot_kernel_bandwidth(rows: list[dict], copy_gbps: float | None = None, source: str = ""):
    """Effective bandwidth (bytes each side must read / time) per system and batch against context
    length, with the measured device copy bandwidth `copy_gbps` (GB/s) as a ceiling if given; SDPA forced to one
    backend is left out (`_kernel_systems`)."""
    plt = _plt()
    rows, systems, batches, style = _kernel_systems(rows)
    fig, ax = plt.subplots(figsize=(8, 4.6))
    for bi, B in enumerate(batches):
        for system in systems:
            sel = sorted((r for r in rows if r["batch"] == B and r["system"] == system), key=lambda r: r["context"])
            if sel:
                ax.plot([r["context"] for r in sel], [r["GBps"] for r in sel], linestyle=style(system), marker="o",
                        ms=4, color=f"C{bi}", label=f"{system}, batch {B}")
    if copy_gbps:
        ax.axhline(copy_gbps, color="k", lw=1.2, ls=":", label=f"measured copy bandwidth ({copy_gbps / 1000:.1f} TB/s)")
    _token_ticks(ax, [r["context"] for r in rows])
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("effective bandwidth (GB/s of K/V bytes read)")
    ax.set_title("Effective bandwidth of decode attention: solid = bf16 SDPA, other styles = TurboQuant presets\n"
                 + _env_line(rows) + (f"  [{source}]" if source else ""), fontsize=9.5)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7.5, ncol=2)
    fig.tight_layout()
    return fig
