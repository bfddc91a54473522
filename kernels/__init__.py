"""Triton kernels, one op per file; installed as ``imbsam_fast.kernels``."""
