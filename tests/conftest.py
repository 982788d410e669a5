"""Run the Triton kernels in Triton's CPU interpreter when there is no GPU.

Triton decides between compiling and interpreting when a kernel is decorated, i.e. when a
module with Triton kernels (`fitserve.attention.triton_*`, `fitserve.kernels.triton_ops`) is
first imported, so the variable must be set before any test module imports them: this root
conftest runs before every test directory's. On a CUDA machine the real kernels are tested.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
