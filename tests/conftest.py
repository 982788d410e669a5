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



def pytest_sessionstart(session) -> None:
    """Compile the CPU kernels up front when this machine has no build yet: the build logs a
    line before and after itself, where otherwise the first test that runs a model would sit
    silent (its output captured) for a minute or two."""
    from fitserve.kernels import cpu

    if cpu.cpu_supports_kernels() and not cpu.is_cached():
        cpu.get()
