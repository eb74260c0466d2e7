"""Compute kernels for the NemotronH forward, each a pure-PyTorch ``*_ref`` oracle.

Triton versions land beside each reference; the engine picks the kernel on CUDA
and the reference on CPU.
"""
