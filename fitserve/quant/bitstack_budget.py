"""Which BitStack blocks a weight-memory budget loads.

A budget B (bytes of every weight held in memory: embedding, LM head, norms, biases and the
loaded blocks) loads block 0 of every matrix, then the blocks of `block_order` while the
total stays <= B, stopping at the first block that does not fit: the loaded set is always a
prefix of the order, so a larger budget loads a superset, and shrinking then growing back
loads exactly the same blocks.
"""

from __future__ import annotations

from itertools import accumulate


class BudgetError(ValueError):
    """A budget outside [smallest loadable model, full stack]; the message gives the range."""


def budget_range(fixed_bytes: int, block_sizes: dict[str, int], num_blocks: dict[str, int]) -> tuple[int, int]:
    """(smallest loadable model: fixed bytes and block 0 of every matrix, full stack) in bytes."""
    smallest = fixed_bytes + sum(block_sizes.values())
    return smallest, fixed_bytes + sum(block_sizes[p] * num_blocks[p] for p in block_sizes)


def loaded_blocks(block_order: list[str], block_sizes: dict[str, int], fixed_bytes: int, budget: int) -> int:
    """How many entries of `block_order` a budget of `budget` bytes loads (a prefix length)."""
    smallest = fixed_bytes + sum(block_sizes.values())
    if budget < smallest:
        raise BudgetError(f"weight memory {budget / 2**20:.2f} MiB is below the smallest loadable model "
                          f"({smallest / 2**20:.2f} MiB)")
    totals = accumulate((block_sizes[prefix] for prefix in block_order), initial=smallest)
    return sum(1 for total in list(totals)[1:] if total <= budget) if block_order else 0


def depths_for(block_order: list[str], count: int, prefixes: list[str]) -> dict[str, int]:
    """Blocks loaded per matrix when the first `count` entries of the order are loaded."""
    depths = dict.fromkeys(prefixes, 1)
    for prefix in block_order[:count]:
        depths[prefix] += 1
    return depths


def loaded_bytes(block_order: list[str], block_sizes: dict[str, int], fixed_bytes: int, count: int) -> int:
    """Weight bytes held with the first `count` entries of the order loaded."""
    return fixed_bytes + sum(block_sizes.values()) + sum(block_sizes[p] for p in block_order[:count])
