"""Model weights in 2 MiB transparent huge pages on the CPU.

Why: a CPU decode step streams every weight from memory once. With 4 KiB pages that is a
TLB miss every 4 KiB and a hardware prefetch stream that restarts at every page boundary;
with 2 MiB pages the single-row weight kernel reads 8-12% faster on a Zen 4 server
(`python benchmarks/cpu_kernels.py --section pages`). Linux gives an anonymous mapping huge
pages only where they were asked for with madvise(MADV_HUGEPAGE) before its pages are
first touched (transparent_hugepage mode "madvise", the common default); memory from the
ordinary allocator never gets them. So the loader lays all parameters out in one arena
mapped that way and copies the checkpoint into it, and the integer formats' tensors (w8, w4,
MixLLM and the int8 embedding) in another; the CPU kernels repack those in place.

Where the kernel has no transparent huge pages (mode "never", not Linux), `arena_views`
returns None and parameters keep ordinary memory; nothing else changes.
"""

from __future__ import annotations

import logging
import math
import mmap
from pathlib import Path

import torch

logger = logging.getLogger("fitserve")

HUGE_PAGE_BYTES = 2 << 20
_ALIGNMENT = 64  # each tensor starts on a cache line
_THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def transparent_huge_pages_mode() -> str | None:
    """The kernel's THP mode ("always", "madvise" or "never"), or None where there is none."""
    try:
        text = _THP_SETTING.read_text()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def huge_pages_available() -> bool:
    """Whether an madvise'd anonymous mapping can get transparent huge pages here."""
    return hasattr(mmap, "MADV_HUGEPAGE") and transparent_huge_pages_mode() in ("always", "madvise")


def huge_page_buffer(num_bytes: int) -> torch.Tensor:
    """A uint8 CPU tensor of num_bytes starting on a 2 MiB boundary, in a private anonymous
    mapping advised to use huge pages. The mapping lives as long as any view of the tensor
    (torch.frombuffer keeps it referenced) and is unmapped with the last one."""
    mapping = mmap.mmap(-1, num_bytes + HUGE_PAGE_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mapping.madvise(mmap.MADV_HUGEPAGE)
    whole = torch.frombuffer(mapping, dtype=torch.uint8)
    offset = -whole.data_ptr() % HUGE_PAGE_BYTES
    return whole[offset:offset + num_bytes]


def arena_views(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
    """One empty contiguous tensor per name, all carved from one huge-page buffer; None where
    huge pages are not available (callers then allocate as usual)."""
    return arena_tensors({name: (shape, dtype) for name, shape in shapes.items()})


def arena_tensors(specs: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> dict[str, torch.Tensor] | None:
    """`arena_views` for tensors of any dtypes: name -> (shape, dtype)."""
    if not specs or not huge_pages_available():
        return None
    offsets, total = {}, 0
    for name, (shape, dtype) in specs.items():
        offsets[name] = total
        total += -(-math.prod(shape) * _element_size(dtype) // _ALIGNMENT) * _ALIGNMENT
    try:
        buffer = huge_page_buffer(max(total, 1))
    except OSError as error:  # mapping refused (memory limits) or madvise unsupported
        logger.info("weights stay in ordinary memory: no huge-page mapping of %d bytes (%s)", total, error)
        return None
    views = {}
    for name, (shape, dtype) in specs.items():
        size = math.prod(shape) * _element_size(dtype)
        views[name] = buffer[offsets[name]:offsets[name] + size].view(dtype).view(shape)
    return views


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
