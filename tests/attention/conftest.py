"""Run the Triton kernels in Triton's CPU interpreter when there is no GPU.

Triton decides between compiling and interpreting when a kernel is decorated, i.e. when
`fitserve.attention.triton_*` is first imported, so the variable must be set before any test
module here imports them. On a CUDA machine the real kernels are tested instead.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
