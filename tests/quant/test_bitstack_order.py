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
    # three times b's, and block 1's value is exactly its measured loss.
    values = bitstack_order.calibrated_values({"a": 0.3, "b": 0.1}, {"a": ENERGIES, "b": ENERGIES})
    assert values["a"] == pytest.approx([0.3, 0.15, 0.05])
    assert values["b"] == pytest.approx([0.1, 0.05, 0.05 / 3])
    # Equal block sizes: a's first two blocks (0.3, 0.15) come before b's first (0.1).
    order = bitstack_order.merge_order(values, {"a": 1, "b": 1})
    assert order[:3] == ["a", "a", "b"] and sorted(order) == ["a"] * 3 + ["b"] * 3
    # The residual proxy alone cannot tell them apart.
    assert bitstack_order.residual_values({"a": ENERGIES})["a"] == pytest.approx([3.0, 1.5, 0.5])


def test_sensitivity_lost_in_noise_takes_the_smallest_positive_one() -> None:
    flat = [10.0, 6.0, 6.0, 5.0]  # block 1 stored as zero factors: no drop to scale by
    values = bitstack_order.calibrated_values({"a": 0.3, "b": 0.2, "noisy": -0.01, "zero_block": 0.0},
                                              {"a": ENERGIES, "b": [20.0, 10.0, 8.0, 7.0], "noisy": ENERGIES,
                                               "zero_block": flat})
    smallest = 0.2 / 2.0  # b: 0.2 nats for 2.0 of energy, below a's 0.3 / 3.0
    assert values["noisy"] == pytest.approx([smallest * 3.0, smallest * 1.5, smallest * 0.5])
    assert values["zero_block"] == pytest.approx([0.0, smallest * 1.0])
    assert all(value > 0 for chain in values.values() for value in chain if value)
    # Nothing positive measured: every matrix weighs 1, the plain residual proxy.
    assert bitstack_order.calibrated_values({"a": -1.0}, {"a": ENERGIES}) == \
        bitstack_order.residual_values({"a": ENERGIES})


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
