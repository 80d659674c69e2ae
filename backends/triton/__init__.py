"""Triton backend: ``modelfold.compile(result, backend="triton")`` (see ``compile``)."""
