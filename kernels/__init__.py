"""Triton kernels of tq_hf, installed as `tq_hf.kernels` (never as a top-level `kernels`, which is
huggingface's hub-kernels package). Each launcher validates its inputs; the PyTorch reference in
tq_hf.codec / tq_hf.attention is the spec they are tested against."""

from .decode import decode_attention, plan_splits
from .quantize import dequantize, quantize_pack

__all__ = ["decode_attention", "dequantize", "plan_splits", "quantize_pack"]
