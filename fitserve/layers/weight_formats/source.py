"""Where a format that `reads_own_tensors` reads its checkpoint tensors from, a slice at a time."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import torch


class TensorSource:
    """Reads single entries along the first dimension of checkpoint tensors, by tensor name.

    Safetensors files are memory-mapped; `get_slice(name)[i]` touches only entry i's bytes,
    which are copied into an allocation of their own, so a model that uses a few blocks of a
    stacked tensor never reads (nor keeps resident) the rest, and dropping a block frees it. File handles stay open for later reads; a lock serialises reads, which may come
    from the loading thread and from one background thread that grows a model.
    """

    def __init__(self, files: dict[str, Path]) -> None:
        self._files = files
        self._handles: dict[Path, Any] = {}
        self._lock = threading.Lock()

    def read(self, name: str, index: int) -> torch.Tensor:
        """Entry `index` of tensor `name` (its first dimension), as an owned contiguous tensor."""
        from safetensors import safe_open

        path = self._files[name]
        with self._lock:
            handle = self._handles.get(path)
            if handle is None:
                handle = self._handles[path] = safe_open(str(path), framework="pt", device="cpu")
            # safetensors hands back a view of its private file mapping: copy it into memory
            # of our own, so the mapping can be closed and a dropped block is really freed.
            return handle.get_slice(name)[index].clone(memory_format=torch.contiguous_format)

    def close(self) -> None:
        """Unmap the files (reopened at the next read): the pages read through the mapping
        would otherwise stay resident beside the copies, so memory given back by dropping
        blocks would not show as a smaller resident set."""
        with self._lock:
            self._handles.clear()


class InMemorySource(TensorSource):
    """Entries of tensors already in memory (a model converted in-process, tests)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__({})
        self._tensors = tensors

    def read(self, name: str, index: int) -> torch.Tensor:
        return self._tensors[name][index].clone()

    def close(self) -> None:
        pass
