"""The global load order of BitStack's blocks: what each block is worth per byte.

Block 0 of every matrix is always loaded (the smallest loadable model); every later block
b >= 1 of matrix m gets a value per byte, and the stacks are merged into one order that loads
the most valuable bytes first while keeping each matrix's blocks in sequence (block b is a
correction of the residual left by blocks < b, useless without them).

Two ways to value a block:

- measured (BitStack's level-wise sort, the default): at each depth d, with every matrix
  holding blocks 0..d, the calibration loss rises by L(m without block d) - L(all) when matrix
  m gives up its block d. Cost: (matrices + 1) forward passes over the calibration windows per
  depth, fine for small models.
- residual (a fast proxy for big models, no forward passes): the drop of the
  activation-weighted residual energy ||(W - W_d) diag(mean |x|)||^2 that block d brings,
  i.e. how much the block shrinks the expected output error of its layer.

Merging: a chain's value is made non-increasing first (each block takes the best mean value
of any run of blocks starting at it, the classic rule for scheduling chains), then a greedy
merge takes the next block of the chain with the highest value per byte. A block worth little
that unlocks a valuable one is thus loaded with it instead of being left behind.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable

import torch

from fitserve.quant.bitstack import residual_energies
from fitserve.quant.bitstack_standin import Stack, StandIn
from fitserve.quant.methods import BITSTACK_ORDERINGS as ORDERINGS



def chain_values(values: list[float]) -> list[float]:
    """values[i] replaced by max over j >= i of mean(values[i..j]) (blocks of one matrix have
    equal sizes, so means of values are means of values per byte): non-increasing, and
    loading a chain by these values is optimal for a chain by the exchange argument."""
    out = [0.0] * len(values)
    for start in range(len(values)):
        best, total = float("-inf"), 0.0
        for end in range(start, len(values)):
            total += values[end]
            best = max(best, total / (end - start + 1))
        out[start] = best
    return out


def merge_order(values: dict[str, list[float]], block_sizes: dict[str, int]) -> list[str]:
    """The load order of blocks 1..n-1 of every matrix (each listed by its prefix: its i-th
    occurrence is block i), by value per byte; `values[prefix][i]` is the value of block i+1."""
    chains = {prefix: chain_values(list(chain)) for prefix, chain in values.items()}
    heap = [(-chain[0] / block_sizes[prefix], index, prefix, 0)
            for index, (prefix, chain) in enumerate(chains.items()) if chain]
    heapq.heapify(heap)
    order: list[str] = []
    while heap:
        _, index, prefix, position = heapq.heappop(heap)
        order.append(prefix)
        chain = chains[prefix]
        if position + 1 < len(chain):
            heapq.heappush(heap, (-chain[position + 1] / block_sizes[prefix], index, prefix, position + 1))
    return order


def residual_values(weights: dict[str, torch.Tensor], stacks: dict[str, Stack],
                    magnitudes: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """Per matrix, the drop of ||(W - W_d) diag(mean |x|)||^2 that each block d >= 1 brings."""
    values = {}
    for prefix, stack in stacks.items():
        energies = residual_energies(weights[prefix], stack.signs, stack.u, stack.v, magnitudes[prefix].float())
        values[prefix] = [energies[d] - energies[d + 1] for d in range(1, stack.num_blocks)]
    return values


def measured_values(stand_in: StandIn, windows: list[list[int]],
                    progress: Callable[[Iterable[int]], Iterable[int]] | None = None) -> dict[str, list[float]]:
    """Per matrix, the calibration loss (mean NLL per token) that giving up each block d >= 1
    costs when every matrix holds blocks 0..d (BitStack's level-wise measurement)."""
    prefixes = list(stand_in.stacks)
    num_blocks = max(stack.num_blocks for stack in stand_in.stacks.values())
    values: dict[str, list[float]] = {prefix: [] for prefix in prefixes}
    depths = range(1, num_blocks)
    for depth in progress(depths) if progress else depths:
        active = [prefix for prefix in prefixes if stand_in.stacks[prefix].num_blocks > depth]
        stand_in.set_depths({prefix: depth + 1 for prefix in active})
        full = stand_in.loss(windows)
        for prefix in active:
            with stand_in.without_last_block(prefix):
                values[prefix].append(stand_in.loss(windows) - full)
    return values
