"""Kernels: the lukv:: custom ops (ops.py), their PyTorch reference (reference.py) and Triton kernels."""
