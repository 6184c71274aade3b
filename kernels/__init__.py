"""Triton kernels of tq_hf, installed as `tq_hf.kernels` (never as a top-level `kernels`)."""
