"""Host-memory blocks for swapped-out KV (`--preemption-mode swap`): ids only, no tensors.

Allocation hands out runs of consecutive ids where it can, so that a request's host blocks
line up with its (mostly consecutive) device blocks and one copy moves a whole group of
blocks (FastSwitch's block groups) instead of one copy per 16-token block.
"""

from __future__ import annotations

import bisect


class HostBlockPool:
    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free: list[int] = list(range(num_blocks))  # kept sorted, so runs are easy to find

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def allocate(self, count: int, prefer_after: int | None = None) -> list[int]:
        """`count` free ids, continuing the run after `prefer_after` where those ids are free,
        else from the longest run of free ids; the caller checked there are enough."""
        if count > len(self._free):
            raise RuntimeError(f"asked for {count} host blocks with only {len(self._free)} free")
        taken: list[int] = []
        while len(taken) < count:
            start = self._run_start(prefer_after + 1 if prefer_after is not None else None)
            index = bisect.bisect_left(self._free, start)
            run_end = index
            while (run_end < len(self._free) and run_end - index < count - len(taken)
                   and self._free[run_end] == start + (run_end - index)):
                run_end += 1
            taken.extend(self._free[index:run_end])
            del self._free[index:run_end]
            prefer_after = taken[-1]
        return taken

    def _run_start(self, wanted: int | None) -> int:
        """`wanted` if it is free, else the first id of the longest run of free ids."""
        free = self._free
        if wanted is not None:
            index = bisect.bisect_left(free, wanted)
            if index < len(free) and free[index] == wanted:
                return wanted
        best_start, best_length, start, length = free[0], 0, free[0], 0
        for position, block_id in enumerate(free):
            if position and block_id == free[position - 1] + 1:
                length += 1
            else:
                start, length = block_id, 1
            if length > best_length:
                best_start, best_length = start, length
        return best_start

    def free(self, block_ids: list[int]) -> None:
        for block_id in block_ids:
            index = bisect.bisect_left(self._free, block_id)
            if index < len(self._free) and self._free[index] == block_id:
                raise RuntimeError(f"host block {block_id} freed while already free")
            self._free.insert(index, block_id)
