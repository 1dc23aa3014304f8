"""Kernels: the lukv:: custom ops (ops.py), the PyTorch kernels on the ragged layout (reference.py, the CPU
path) and the Triton kernels (CUDA)."""
