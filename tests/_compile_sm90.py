"""Compile every Triton kernel launch of tq_hf for sm_90 (Hopper) on a machine without a GPU.

CI runs the kernels under the Triton interpreter (TRITON_INTERPRET=1), which executes their Python
bodies with NumPy and does not check them the way the compiler does: a name rebound to a tensor of
another shape in one branch runs there and fails to compile on a GPU (it happened on 2026-11-30).
This script must run WITHOUT TRITON_INTERPRET (tests/test_compile_sm90.py starts it in a subprocess).
It swaps the kernel objects for recorders, drives the real launchers on CPU tensors through the
cache and the decode launcher in each code path (presets, head dims, dtypes, mask and softcap, split
codes, QJL keys, window only), and compiles each distinct launch with
`triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`: Triton's own ptxas, no driver.
It also checks each kernel's shared memory against the 227 KB an H100/H200 block can have.

    python tests/_compile_sm90.py   # one line per compiled launch; exit status 1 on any failure
"""

from __future__ import annotations

import os
import sys
import traceback

import torch

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("run without TRITON_INTERPRET: the interpreter replaces the kernels the compiler needs")

import tq_hf.kernels.decode as dec
import tq_hf.kernels.quantize as qnt
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import tq_hf.cache as tq_cache
from tq_hf import TurboQuantCache, TurboQuantConfig

TARGET = GPUTarget("cuda", 90, 32)
MAX_SHARED = 232448  # bytes of shared memory one block may use on sm_90 (227 KB)
LAUNCH_OPTIONS = ("num_warps", "num_stages", "maxnreg")
_PTR = {torch.uint8: "*u8", torch.int8: "*i8", torch.int32: "*i32", torch.int64: "*i64",
        torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}


class Recorder:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **kw)` records the launch's signature,
    constexprs and options instead of running it (the launcher's output buffers stay unwritten). It
    specializes the arguments as the JIT does: an int equal to 1 becomes the constant 1, pointers and ints
    divisible by 16 are marked so (`tt.divisibility`), which changes what the compiler does (a loop
    reduction that compiled without the marks tripped an assertion of Triton 3.6 with them)."""

    def __init__(self, fn):
        self.fn = fn
        self.launches: dict = {}

    def __getitem__(self, grid):
        def launch(*args, **kw):
            sig, ones, aligned = {}, {}, []
            for i, (name, a) in enumerate(zip(self.fn.arg_names, args)):
                if isinstance(a, torch.Tensor):
                    sig[name] = _PTR[a.dtype]
                    if a.data_ptr() % 16 == 0:
                        aligned.append(i)
                elif isinstance(a, bool):
                    sig[name] = "i1"
                elif isinstance(a, int):
                    sig[name] = "i32" if -(2**31) <= a < 2**31 else "i64"
                    if a == 1:
                        ones[name] = 1
                    elif a % 16 == 0:
                        aligned.append(i)
                elif isinstance(a, float):
                    sig[name] = "fp32"
                else:
                    raise TypeError(f"{self.fn.__name__}: argument {name} of type {type(a).__name__}")
            consts = {k: v for k, v in kw.items() if k not in LAUNCH_OPTIONS}
            sig.update(dict.fromkeys(consts, "constexpr"))
            sig.update(dict.fromkeys(ones, "constexpr"))
            consts.update(ones)
            if set(sig) != set(self.fn.arg_names):
                raise TypeError(f"{self.fn.__name__}: parameters not passed: {set(self.fn.arg_names) - set(sig)}")
            opts = {k: kw[k] for k in LAUNCH_OPTIONS if k in kw}
            key = (tuple(sig[n] for n in self.fn.arg_names), tuple(sorted(consts.items())), tuple(sorted(opts.items())),
                   tuple(aligned))
            self.launches.setdefault(key, (sig, consts, opts, {(i,): [["tt.divisibility", 16]] for i in aligned}))

        return launch


RECORDERS = {}
for module, name in ((dec, "_decode_stage1_kernel"), (dec, "_decode_merge_kernel"),
                     (qnt, "_quantize_pack_kernel"), (qnt, "_dequantize_kernel")):
    RECORDERS[name] = Recorder(getattr(module, name))
    setattr(module, name, RECORDERS[name])
# The cache refuses backend="triton" on CPU tensors outside the interpreter; nothing runs here.
tq_cache._resolve_backend = lambda backend, device: "triton"
# Launch what a GPU would: the register lookup's inline PTX compiles here, though the interpreter cannot run it.
dec._runs_ptx = lambda device: True


def drive(preset, D=128, dtype=torch.bfloat16, G=4, softcap=None, mask=False, window_only=False, launch=None,
          sinks=False, **overrides):
    """Every launch one layer makes: quantize on update (prefill, then a flush), decode attention (with the
    `launch` options of `decode_attention`, if given), dequantization of the history."""
    torch.manual_seed(0)
    B, H = 2, 2
    cfg = TurboQuantConfig.from_preset(preset, **overrides).replace(backend="triton")
    cache = TurboQuantCache(cfg)
    T = 8 if window_only else cfg.residual_length + 24
    kv = [torch.randn(B, H, T, D, dtype=dtype) for _ in "kv"]
    cache.update(*kv, 0)
    layer = cache.layers[0]
    total = layer.get_seq_length()
    q = torch.randn(B, H * G, 1, D, dtype=dtype)
    m = torch.ones(B, total, dtype=torch.bool) if mask else None
    s = torch.randn(H * G, dtype=dtype) if sinks else None
    dec.decode_attention(q, layer, m, D**-0.5, softcap, sinks=s, **(launch or {}))
    layer.dequantize_range(0, total)


# Each case is a distinct code path of some kernel (launches that differ only in sizes the kernels read
# at run time compile once); ~1-2 s of compiling per distinct launch.
CASES = [
    {"preset": p} for p in ("4bit", "3bit", "8bit", "2.5bit", "3.5bit")
] + [
    {"preset": "4bit", "key_qjl": True},  # QJL keys, 3-bit codes
    {"preset": "4bit", "dtype": torch.float32}, {"preset": "4bit", "dtype": torch.float16},  # ieee, tf32x3 dots
    {"preset": "4bit", "mask": True, "softcap": 30.0}, {"preset": "3.5bit", "mask": True, "softcap": 30.0},
    {"preset": "4bit", "mask": True, "sinks": True},  # attention sinks (GPT-OSS) in the merge
    {"preset": "3.5bit", "window_only": True},  # split preset before its first flush
    {"preset": "3bit", "D": 96},  # a head dim that is not a power of two: per-code reads
    {"preset": "4bit", "D": 64}, {"preset": "3.5bit", "D": 64}, {"preset": "2.5bit", "D": 64},  # other launch shapes
    {"preset": "4bit", "value_bits": 3}, {"preset": "3bit", "dtype": torch.float16},  # mixed lookups; fp32 tables
    {"preset": "4bit", "D": 256}, {"preset": "3.5bit", "D": 256}, {"preset": "4bit", "D": 256, "key_qjl": True},
    # the launch decode_attention picks for 4-bit codes over long contexts (many more positions than here)
    {"preset": "4bit", "launch": {"block_n": 128, "num_warps": 8, "num_stages": 3}},
    # the merge as a second launch (large problems' default)
    {"preset": "4bit", "launch": {"one_launch": False}}, {"preset": "3.5bit", "launch": {"one_launch": False}},
    {"preset": "4bit", "sinks": True, "launch": {"one_launch": False}},
    {"preset": "4bit", "D": 64, "launch": {"one_launch": False}}, {"preset": "4bit", "D": 256, "launch": {"one_launch": False}},
    {"preset": "3bit", "D": 96, "launch": {"one_launch": False}},
    {"preset": "4bit", "dtype": torch.float32, "launch": {"one_launch": False}},
    {"preset": "4bit", "dtype": torch.float16, "launch": {"one_launch": False}},
    {"preset": "3.5bit", "window_only": True, "launch": {"one_launch": False}},
]


def main() -> int:
    for case in CASES:
        drive(**case)
    failures = 0
    for name, rec in RECORDERS.items():
        for sig, consts, opts, attrs in rec.launches.values():
            what = ", ".join(f"{k}={v}" for k, v in consts.items() if k.isupper()) + f", {opts}"
            try:
                k = triton.compile(ASTSource(rec.fn, sig, consts, attrs), target=TARGET, options=dict(opts))
                shared = k.metadata.shared
                ok = shared <= MAX_SHARED
                print(f"{'ok  ' if ok else 'FAIL'} {name}: shared {shared} B; {what}", flush=True)
                failures += not ok
            except Exception:  # noqa: BLE001 - report every failing launch, then fail
                failures += 1
                print(f"FAIL {name}: {what}\n{traceback.format_exc(limit=1)}", flush=True)
    total = sum(len(r.launches) for r in RECORDERS.values())
    print(f"{total - failures} of {total} launches compile for sm_90 (Triton {triton.__version__})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
