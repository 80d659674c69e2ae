"""Triton backend (GPU kernels for dialect ops behind torch.compile).

Not built yet: see issue 7. ``modelfold.export(..., backend="triton")`` raises a clear error.
"""
