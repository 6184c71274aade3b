"""Benchmarks (GPU): decode attention from the packed cache against bf16 SDPA on the same shapes.

Every row records the GPU, library versions and date. Timings are `triton.testing.do_bench`
medians after warm-up, on random data, rotating through enough copies of the inputs that the
working set exceeds L2, so they measure memory, not cache.
"""

from __future__ import annotations

import datetime
import json
import platform

import torch
import torch.nn.functional as F

from .cache import TurboQuantCache
from .config import TurboQuantConfig

__all__ = ["bench_kernels", "environment"]

_ROTATE_BYTES = 512 << 20  # > 10x the H100/H200 L2 (50-60 MB)


def environment() -> dict:
    import transformers
    import triton

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    return {
        "gpu": gpu,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _median_us(fn_list, warmup=25, rep=200) -> float:
    import triton.testing

    it = iter(range(1 << 62))
    n = len(fn_list)
    return 1e3 * triton.testing.do_bench(lambda: fn_list[next(it) % n](), warmup=warmup, rep=rep,
                                         return_mode="median")


def copy_bandwidth(nbytes=2 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted)."""
    a = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda").random_()
    b = torch.empty_like(a)
    t = _median_us([lambda: b.copy_(a)]) * 1e-6
    return 2 * a.numel() / t


def _tq_layer(cfg, B, Hkv, ctx, D, dtype):
    cache = TurboQuantCache(cfg.replace(residual_length=0))
    k = torch.randn(B, Hkv, ctx, D, dtype=dtype, device="cuda")
    v = torch.randn_like(k)
    cache.update(k, v, 0)
    layer = cache.layers[0]
    layer.claim()
    return layer


def bench_kernels(batches=(1, 8, 32), contexts=(1024, 4096, 16384, 65536), presets=("4bit", "3bit"),
                  hq=32, hkv=8, d=128, dtype=torch.bfloat16, progress=True) -> list[dict]:
    """Decode-attention time of each preset vs bf16 SDPA (enable_gqa) on the same shape."""
    from tqdm.auto import tqdm

    from .kernels import decode_attention, quantize_pack

    env = environment()
    rows = []
    combos = [(b, c) for b in batches for c in contexts]
    for B, ctx in tqdm(combos, disable=not progress, desc="bench kernels"):
        dense_bytes = 2 * B * hkv * ctx * d * 2
        copies = max(1, min(16, -(-_ROTATE_BYTES // dense_bytes)))
        try:
            qs = [torch.randn(B, hq, 1, d, dtype=dtype, device="cuda") for _ in range(copies)]
            kvs = [(torch.randn(B, hkv, ctx, d, dtype=dtype, device="cuda"),
                    torch.randn(B, hkv, ctx, d, dtype=dtype, device="cuda")) for _ in range(copies)]
        except torch.OutOfMemoryError:
            continue
        sdpa = [lambda q=q, kv=kv: F.scaled_dot_product_attention(q, kv[0], kv[1], enable_gqa=True)
                for q, kv in zip(qs, kvs)]
        t_sdpa = _median_us(sdpa)
        del kvs
        rows.append({**env, "system": "bf16 SDPA", "batch": B, "context": ctx, "us": t_sdpa,
                     "bytes": dense_bytes, "GBps": dense_bytes / t_sdpa / 1e3, "speedup": 1.0})
        for preset in presets:
            cfg = TurboQuantConfig.from_preset(preset)
            layer0 = _tq_layer(cfg, B, hkv, ctx, d, dtype)
            read = sum(t.numel() * t.element_size() for t in (layer0.k_codes, layer0.k_norms,
                                                              layer0.v_codes, layer0.v_norms))
            n_copies = max(1, min(16, -(-_ROTATE_BYTES // read)))
            layers = [layer0] + [_tq_layer(cfg, B, hkv, ctx, d, dtype) for _ in range(n_copies - 1)]
            fns = [lambda q=q, layer=layer: decode_attention(q, layer, None, d**-0.5)
                   for q, layer in zip(qs * n_copies, layers)]
            t = _median_us(fns)
            # quantize-on-update cost of one new token for all heads of the batch
            k1 = torch.randn(B, hkv, 1, d, dtype=dtype, device="cuda")
            qt = _median_us([lambda k1=k1, L=layer0: quantize_pack(k1, L.key_quantizer, L.k_codes, L.k_norms, 0,
                                                                   mean=L.k_mean)])
            rows.append({**env, "system": f"turboquant {preset}", "batch": B, "context": ctx, "us": t,
                         "bytes": read, "GBps": read / t / 1e3, "speedup": t_sdpa / t,
                         "quantize_token_us": 2 * qt})
            del layers, layer0, fns
        del qs
        torch.cuda.empty_cache()
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'system':<18} {'B':>3} {'ctx':>6} {'us':>9} {'GB/s':>7} {'x bf16':>7}")
    for r in rows:
        print(f"{r['system']:<18} {r['batch']:>3} {r['context']:>6} {r['us']:>9.1f} {r['GBps']:>7.0f} "
              f"{r['speedup']:>7.2f}")


def save(rows: list[dict], path: str) -> None:
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)
