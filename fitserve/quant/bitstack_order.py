"""The global load order of BitStack's blocks: what each block is worth per byte.

Block 0 of every matrix is always loaded (the smallest loadable model); every later block
b >= 1 of matrix m gets a value per byte, and the stacks are merged into one order that loads
the most valuable bytes first while keeping each matrix's blocks in sequence (block b is a
correction of the residual left by blocks < b, useless without them).

Three ways to value a block:

- calibrated (the default): the residual proxy below, scaled per matrix by how much the
  calibration loss cares about that matrix, measured at the first two levels only. At level
  d (every matrix holding blocks 0..d) the loss rise g_m(d) when matrix m gives up block d is
  measured, as BitStack does, and divided by the residual energy drop e_m(d) of that block:
  the matrix's sensitivity s_m(d), loss per unit of energy. Block 1 is worth s_m(1) e_m(1)
  (its measured loss); every deeper block d is worth s'_m e_m(d), with the deep sensitivity
  s'_m = s_m(2) bounded to [SATURATION_FLOOR s_m(1), s_m(1)]. Why:
  * Deeper measured values are loss differences of 1e-4 nats, below the noise of a few
    thousand calibration tokens, and are measured with every matrix at the same depth, a
    context no budget loads: sorting on them (`measured`) ordered the late blocks by noise
    (the curve rose by up to 0.5%) and made the 2-bit end depend on the calibration sample.
  * The residual proxy alone is noiseless but blind to how the loss weighs each matrix: on
    the bundled model it is far worse at ~2 bits (34.2 vs 17.6 on the card's subset).
  * One sensitivity from level 1 for all depths (tried first) over-values deep blocks of
    matrices whose loss saturates: on the bundled model the first layer's attention
    projections gain 0.1 nats from block 1, but their level-2 blocks only 0.01-0.3x what level
    1's sensitivity predicts (the MLPs ~0.5-1x); loading their blocks 2-5 early starved the
    other matrices at ~2 bits (21.8 on the card's subset with 1024 calibration tokens, worse
    than 2-bit round-to-nearest's 20.0). The level-2 sensitivity sees the saturation; the
    bounds keep its noise (small matrices' level-2 differences are ~1e-4 nats, some negative)
    from sinking or inflating a whole chain: the loss is concave in the error here (summed
    over matrices, level 2 measures 0.4-0.5x what level 1 predicts), so a deep sensitivity
    above level 1's is noise, and the floor keeps a noisy matrix's deep blocks within 4x.
  A first-level sensitivity lost in noise (g_m(1) <= 0) takes the smallest positive one.
  Measuring bottom-up instead (every matrix at block 0, adding one block 1) was tried and is
  much worse: at the smallest model the broken first layer dominates, and half the later
  matrices' block 1 measured as raising the loss. Cost: 2 (matrices + 1) forward passes over
  the calibration windows, (blocks - 1) / 2 times fewer than `measured`.
- measured (BitStack's level-wise sort): at each depth d, with every matrix holding blocks
  0..d, the calibration loss rises by L(m without block d) - L(all) when matrix m gives up its
  block d. Cost: (matrices + 1) forward passes over the calibration windows per depth.
- residual (a proxy for big models, no forward passes): the drop of the activation-weighted
  residual energy ||(W - W_d) diag(mean |x|)||^2 that block d brings, i.e. how much the block
  shrinks the expected output error of its layer.

Merging: a chain's values are made non-increasing first (cut into runs that each gain the
most per block, every block taking its run's mean: the classic rule for scheduling chains),
then a greedy merge takes the next block of the chain with the highest value per byte. A
block worth little that unlocks a valuable one is thus loaded with it instead of being left
behind.
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


CALIBRATED_LEVELS = 2
"""Levels of BitStack's level-wise measurement the calibrated order takes (measured_values'
`levels`): level 1 for each matrix's sensitivity, level 2 for its saturation."""
SATURATION_FLOOR = 0.25
"""The calibrated order's deep sensitivity is at least this fraction of the first level's."""


def calibrated_values(first_levels: dict[str, list[float]], energies: dict[str, list[float]]) -> dict[str, list[float]]:
    """The calibrated proxy (module docstring): block 1 of matrix m is worth s_m(1) e_m(1) and
    block d >= 2 s'_m e_m(d), e_m(d) its residual energy drop. `first_levels[m]` holds the
    measured loss of giving up block 1 and, for a stack of 3 or more blocks, block 2
    (measured_values with levels=2); s_m(d) = first_levels[m][d-1] / e_m(d) and s'_m = s_m(2)
    bounded to [SATURATION_FLOOR s_m(1), s_m(1)]. First-level sensitivities that are not
    positive (noise, or a block 1 stored as zero) take the smallest positive one (1 when none
    is positive)."""
    drops = residual_values(energies)
    first = {prefix: first_levels[prefix][0] / chain[0] for prefix, chain in drops.items()
             if chain and chain[0] > 0 and first_levels.get(prefix) and first_levels[prefix][0] > 0}
    floor = min(first.values(), default=1.0)
    values = {}
    for prefix, chain in drops.items():
        sensitivity = first.get(prefix, floor)
        measured = first_levels.get(prefix, [])
        deep = measured[1] / chain[1] if len(measured) > 1 and len(chain) > 1 and chain[1] > 0 else sensitivity
        deep = min(sensitivity, max(SATURATION_FLOOR * sensitivity, deep))
        values[prefix] = [sensitivity * chain[0], *(deep * drop for drop in chain[1:])] if chain else []
    return values


def measured_values(stand_in: StandIn, windows: list[list[int]],
                    progress: Callable[[Iterable[int]], Iterable[int]] | None = None,
                    levels: int | None = None) -> dict[str, list[float]]:
    """Per matrix, the calibration loss (mean NLL per token) that giving up each block d >= 1
    costs when every matrix holds blocks 0..d (BitStack's level-wise measurement); only the
    first `levels` depths when given (calibrated_values needs the first two)."""
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
