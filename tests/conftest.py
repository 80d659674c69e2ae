"""Suite-wide set-up.

The Triton kernels are tested in Triton's CPU interpreter: ``TRITON_INTERPRET=1`` must be set
before ``modelfold.kernels`` is imported (Triton fixes the mode when a kernel is defined). On a
GPU machine, run the suite with ``TRITON_INTERPRET=0`` to test the kernels on CUDA instead.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
