"""The rules that turn BitStack block values into the global load order (bitstack_order), on
made-up values: no model needed."""

from __future__ import annotations

import random

import pytest

from fitserve.quant import bitstack_order

ENERGIES = [10.0, 6.0, 3.0, 1.5, 1.0]
"""One matrix's residual energy at depths 0..4: block d >= 1 drops it by 3.0, 1.5, 0.5."""


def test_calibrated_values_scale_the_residual_drops_by_measured_sensitivity() -> None:
    # Same energies, but the loss cares three times more about "a": all of a's blocks are worth
    # three times b's; block 1's value is exactly its measured loss, and level 2's measurement
    # (on the level-1 sensitivity's line here) carries on to the deeper blocks.
    values = bitstack_order.calibrated_values({"a": [0.3, 0.15], "b": [0.1, 0.05]}, {"a": ENERGIES, "b": ENERGIES})
    assert values["a"] == pytest.approx([0.3, 0.15, 0.05])
    assert values["b"] == pytest.approx([0.1, 0.05, 0.05 / 3])
    # Equal block sizes: a's first two blocks (0.3, 0.15) come before b's first (0.1).
    order = bitstack_order.merge_order(values, {"a": 1, "b": 1})
    assert order[:3] == ["a", "a", "b"] and sorted(order) == ["a"] * 3 + ["b"] * 3
    # The residual proxy alone cannot tell them apart.
    assert bitstack_order.residual_values({"a": ENERGIES})["a"] == pytest.approx([3.0, 1.5, 0.5])


def test_a_saturating_matrix_gives_way_after_its_first_block() -> None:
    # "q" gains the most from block 1, but its level-2 block is worth only 0.1x what level 1's
    # sensitivity predicts (its loss saturates): its deep blocks take the floored sensitivity,
    # a quarter of level 1's, and "mlp"'s block 1 comes before q's block 2.
    values = bitstack_order.calibrated_values({"q": [0.6, 0.02], "mlp": [0.12, 0.06]},
                                              {"q": ENERGIES, "mlp": ENERGIES})
    floor = bitstack_order.SATURATION_FLOOR
    assert values["q"] == pytest.approx([0.6, floor * 0.2 * 1.5, floor * 0.2 * 0.5])
    assert bitstack_order.merge_order(values, {"q": 1, "mlp": 1}) == ["q", "mlp", "q", "mlp", "q", "mlp"]
    # Had q's level 2 been on its level-1 line, its blocks 2 and 3 would all have come first.
    unsaturated = bitstack_order.calibrated_values({"q": [0.6, 0.3], "mlp": [0.12, 0.06]},
                                                   {"q": ENERGIES, "mlp": ENERGIES})
    assert bitstack_order.merge_order(unsaturated, {"q": 1, "mlp": 1})[:2] == ["q", "q"]
    # A level-2 measurement above level 1's sensitivity is noise: capped at level 1's.
    assert bitstack_order.calibrated_values({"m": [0.3, 0.9]}, {"m": ENERGIES})["m"] == pytest.approx([0.3, 0.15, 0.05])


def test_sensitivity_lost_in_noise_takes_the_smallest_positive_one() -> None:
    flat = [10.0, 6.0, 6.0, 5.0]  # block 1 stored as zero factors: no drop to scale by
    values = bitstack_order.calibrated_values(
        {"a": [0.3, 0.15], "b": [0.2, 0.02], "noisy": [-0.01, -0.01], "zero_block": [0.0, 0.0]},
        {"a": ENERGIES, "b": [20.0, 10.0, 8.0, 7.0], "noisy": ENERGIES, "zero_block": flat})
    smallest = 0.2 / 2.0  # b: 0.2 nats for 2.0 of energy, below a's 0.3 / 3.0
    # noisy: level 1 takes the smallest positive sensitivity, level 2 is floored at a quarter.
    assert values["noisy"] == pytest.approx([smallest * 3.0, smallest / 4 * 1.5, smallest / 4 * 0.5])
    assert values["zero_block"] == pytest.approx([0.0, smallest / 4 * 1.0])
    assert all(value > 0 for chain in values.values() for value in chain if value)
    # Nothing positive measured: level 1's sensitivity is 1 (the residual proxy's block 1).
    assert bitstack_order.calibrated_values({"a": [-1.0, -1.0]}, {"a": ENERGIES})["a"] == \
        pytest.approx([3.0, 1.5 / 4, 0.5 / 4])


def test_the_merge_keeps_each_chain_in_sequence_and_takes_value_per_byte_greedily() -> None:
    generator = random.Random(0)
    values = {f"m{i}": [generator.uniform(-0.1, 1.0) for _ in range(6)] for i in range(8)}
    sizes = {prefix: generator.choice((1, 2, 3)) for prefix in values}
    order = bitstack_order.merge_order(values, sizes)
    assert sorted(order) == sorted(prefix for prefix in values for _ in range(6))
    # The i-th occurrence of a prefix is its block i: the chain values taken along the order,
    # per byte, never rise (chains are made non-increasing, then merged greedily).
    chains = {prefix: bitstack_order.chain_values(chain) for prefix, chain in values.items()}
    seen = dict.fromkeys(values, 0)
    taken = []
    for prefix in order:
        taken.append(chains[prefix][seen[prefix]] / sizes[prefix])
        seen[prefix] += 1
    assert all(later <= earlier + 1e-12 for earlier, later in zip(taken, taken[1:]))
    for chain in chains.values():
        assert all(later <= earlier + 1e-12 for earlier, later in zip(chain, chain[1:]))
