"""The global load order of BitStack's blocks: what each block is worth per byte.

Block 0 of every matrix is always loaded (the smallest loadable model); every later block
b >= 1 of matrix m gets a value per byte, and the stacks are merged into one order that loads
the most valuable bytes first while keeping each matrix's blocks in sequence (block b is a
correction of the residual left by blocks < b, useless without them).

Three ways to value a block:

- calibrated (the default): the residual proxy below, scaled per matrix by how much the
  calibration loss cares about that matrix. At the first level (every matrix holding blocks
  0 and 1) the loss rise g_m when matrix m gives up its block 1 is measured, as BitStack does;
  the matrix's sensitivity is s_m = g_m / e_m(1), the loss per unit of the residual energy
  drop e_m(1) that block 1 brings, and block d is worth s_m * e_m(d). Block 1's value is thus
  exactly its measured loss, and deeper blocks follow the noiseless proxy in the units of the
  loss. Why: deeper measured values are loss differences of a few 1e-4 nats, below the noise of
  a few thousand calibration tokens, and they are measured with every matrix at the same depth,
  a context no budget loads; sorting on them ordered the late blocks by noise (the curve rose by
  up to 0.5%) and made the 2-bit end depend on the calibration sample. The residual proxy alone
  is noiseless but blind to how the loss weighs each matrix (on the bundled model it loads the
  wrong blocks first and is far worse at ~2 bits). The first level's differences are large
  (1e-2 to 1e-1 nats on the bundled model), so they rank the matrices reliably. A sensitivity
  lost in noise (g_m <= 0) is replaced by the smallest positive one measured. Cost: matrices + 1
  forward passes over the calibration windows, (blocks - 1) times fewer than `measured`.
  Measuring level 1 bottom-up instead (every matrix at block 0, adding one block 1) was
  tried and is much worse: at the smallest model the broken first layers dominate, and half
  the later matrices' block 1 measured as raising the loss.
- measured (BitStack's level-wise sort): at each depth d, with every matrix holding blocks
  0..d, the calibration loss rises by L(m without block d) - L(all) when matrix m gives up its
  block d. Cost: (matrices + 1) forward passes over the calibration windows per depth.
- residual (a proxy for big models, no forward passes): the drop of the activation-weighted
  residual energy ||(W - W_d) diag(mean |x|)||^2 that block d brings, i.e. how much the block
  shrinks the expected output error of its layer.

Merging: a chain's values are made non-increasing first (cut into runs that each gain the
most per block, every block taking its run's mean: the classic rule for scheduling chains), then a greedy
merge takes the next block of the chain with the highest value per byte. A block worth little
that unlocks a valuable one is thus loaded with it instead of being left behind.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable

import torch

from fitserve.quant.bitstack import residual_energies
from fitserve.quant.bitstack_standin import Stack, StandIn



def chain_values(values: list[float]) -> list[float]:
    """The chain cut into runs, each the longest-gaining prefix of what is left (the run from the
    first block left with the highest mean value; the shortest such run on ties), and every block
    given its run's mean. Blocks of one matrix have equal sizes, so means of values are means of
    values per byte. The result is non-increasing (a later run with a higher mean would have
    made a longer first run gain more), and merging chains greedily by these values is optimal
    for chains by the exchange argument (Sidney's decomposition)."""
    out: list[float] = []
    start = 0
    while start < len(values):
        best, best_end, total = float("-inf"), start, 0.0
        for end in range(start, len(values)):
            total += values[end]
            if total / (end - start + 1) > best:
                best, best_end = total / (end - start + 1), end
        out.extend([best] * (best_end - start + 1))
        start = best_end + 1
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


def residual_values(energies: dict[str, list[float]]) -> dict[str, list[float]]:
    """Per matrix, the drop of ||(W - W_d) diag(mean |x|)||^2 that each block d >= 1 brings;
    `energies[prefix]` is bitstack.residual_energies of the matrix (depths 0..n)."""
    return {prefix: [chain[d] - chain[d + 1] for d in range(1, len(chain) - 1)] for prefix, chain in energies.items()}


def stack_energies(weight: torch.Tensor, stack: Stack, magnitudes: torch.Tensor) -> list[float]:
    """bitstack.residual_energies of one matrix's stored stack, weighted by its input magnitudes."""
    return residual_energies(weight, stack.signs, stack.u, stack.v, magnitudes.float())


def calibrated_values(first_level: dict[str, float], energies: dict[str, list[float]]) -> dict[str, list[float]]:
    """The calibrated proxy (module docstring): block d of matrix m is worth s_m * e_m(d),
    e_m(d) its residual energy drop and s_m = first_level[m] / e_m(1) the loss per unit of
    energy, `first_level[m]` the measured loss of giving up block 1 (measured_values' first
    depth). Sensitivities that are not positive (noise, or a block 1 stored as zero) take
    the smallest positive one; with none positive every matrix gets 1 (the residual proxy)."""
    drops = residual_values(energies)
    sensitivities = {prefix: first_level[prefix] / chain[0] for prefix, chain in drops.items()
                     if chain and chain[0] > 0 and first_level.get(prefix, 0.0) > 0}
    floor = min(sensitivities.values(), default=1.0)
    return {prefix: [sensitivities.get(prefix, floor) * drop for drop in chain] for prefix, chain in drops.items()}


def measured_values(stand_in: StandIn, windows: list[list[int]],
                    progress: Callable[[Iterable[int]], Iterable[int]] | None = None,
                    levels: int | None = None) -> dict[str, list[float]]:
    """Per matrix, the calibration loss (mean NLL per token) that giving up each block d >= 1
    costs when every matrix holds blocks 0..d (BitStack's level-wise measurement); only the
    first `levels` depths when given (calibrated_values needs the first)."""
    prefixes = list(stand_in.stacks)
    num_blocks = max(stack.num_blocks for stack in stand_in.stacks.values())
    values: dict[str, list[float]] = {prefix: [] for prefix in prefixes}
    depths = range(1, num_blocks if levels is None else min(num_blocks, levels + 1))
    for depth in progress(depths) if progress else depths:
        active = [prefix for prefix in prefixes if stand_in.stacks[prefix].num_blocks > depth]
        stand_in.set_depths({prefix: depth + 1 for prefix in active})
        full = stand_in.loss(windows)
        for prefix in active:
            with stand_in.without_last_block(prefix):
                values[prefix].append(stand_in.loss(windows) - full)
    return values
