"""Triton kernels of tq_hf, installed as `tq_hf.kernels` (never as a top-level `kernels`, which is
huggingface's hub-kernels package). Each launcher validates its inputs; the PyTorch reference in
tq_hf.codec / tq_hf.attention is the spec they are tested against.

The launchers load lazily (PEP 562): importing this package imports nothing, so `import tq_hf`
never pulls in Triton, and when the repository root is on sys.path (`python -m ...` from a
checkout) transformers' probe for a top-level `kernels` module finds an inert folder.
"""

import importlib

_LAUNCHERS = {
    "decode_attention": "decode",
    "plan_splits": "decode",
    "dequantize": "quantize",
    "quantize_pack": "quantize",
}
__all__ = ["decode_attention", "dequantize", "plan_splits", "quantize_pack"]


def __getattr__(name):
    if name not in _LAUNCHERS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_LAUNCHERS[name]}", __name__), name)
