"""Compiled kernels for hot paths that plain PyTorch runs slowly (built on first use)."""
