"""Kernels and their references: ``reference`` (plain PyTorch), ``predict`` and ``attention`` (Triton)."""
