"""Kernels against their references: plain torch, the Triton interpreter (CPU) and compiled Triton (GPU)."""
