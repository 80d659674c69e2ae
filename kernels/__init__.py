"""Triton kernels for the dialect ops (``modelfold.kernels``).

- ``linear``: GEMM + GEMV kernels for dense, MatMulNBits-quantized, N:M sparse and N:M sparse
  quantized weights, each with an optional fused LoRA update (``lora_delta`` alone too);
- ``int8``: ``w8a8_linear`` (int8 x int8, dynamic per-token scales) and ``quant_embedding``;
- ``reference``: pure-PyTorch references with the launchers' signatures;
- ``ops``: the ``modelfold_triton::*`` torch.library ops and the CUDA registrations of the
  dialect ops.

Importing this package imports Triton and fixes the execution mode: compiled for the GPU, or
Triton's CPU interpreter when ``TRITON_INTERPRET=1`` is set at that moment.
"""
