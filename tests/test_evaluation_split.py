"""The real set's train / held-out split of ``guidegen evaluate`` (fast: no network training)."""

from __future__ import annotations

import pytest

from guidegen.evaluation.runner import MIN_SPLIT_CASES, split_real


def test_split_is_deterministic_for_a_seed_and_partitions_the_set():
    for n in (4, 5, 8, 37, 100):
        train, held = split_real(n, 0.25, seed=0)
        assert (train, held) == split_real(n, 0.25, seed=0)
        assert sorted(train + held) == list(range(n)) and not set(train) & set(held)
        assert train == sorted(train) and held == sorted(held)
        assert len(held) == min(max(2, round(n * 0.25)), n - 2) and len(train) >= 2


def test_split_is_random_not_the_sorted_tail():
    n = 100
    tails = 0
    helds = set()
    for seed in range(10):
        _, held = split_real(n, 0.25, seed=seed)
        assert len(held) == 25
        tails += held == list(range(n - 25, n))
        helds.add(tuple(held))
        assert held != list(range(held[0], held[0] + 25))  # not one contiguous run of ids either
        assert min(held) < n // 2 < max(held)  # drawn from both halves of the sorted ids
    assert tails == 0 and len(helds) == 10  # a different seed, a different split
    assert split_real(8, 0.25, seed=0)[1] != [6, 7]


def test_split_sizes_at_the_edges():
    for n in range(MIN_SPLIT_CASES):
        assert split_real(n, 0.25) == (list(range(n)), [])  # too small: nothing held out (in-sample fallback)
    assert len(split_real(4, 0.25)[1]) == 2 and len(split_real(4, 0.9)[0]) == 2  # at least 2 on each side
    assert len(split_real(1000, 0.1, seed=3)[1]) == 100


@pytest.mark.parametrize("seed", [0, 1, 2024])
def test_split_depends_only_on_n_fraction_and_seed(seed):
    a = split_real(50, 0.3, seed)
    b = split_real(50, 0.3, seed)
    assert a == b and len(a[1]) == 15
