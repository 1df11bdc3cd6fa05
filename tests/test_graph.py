"""SecAgg+ neighbour graph: regular, symmetric, seed-determined, connected; typed refusals."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from secagg.errors import ConfigError
from secagg.graph import _shuffled
from secagg.graph import default_neighbours
from secagg.graph import neighbour_graph

FAST = settings(max_examples=80, deadline=None)
seeds = st.binary(min_size=32, max_size=32)


def as_edges(graph: dict[int, frozenset[int]]) -> frozenset[frozenset[int]]:
    return frozenset(frozenset((u, v)) for u, vs in graph.items() for v in vs)


def is_connected(graph: dict[int, frozenset[int]]) -> bool:
    start = next(iter(graph))
    seen, frontier = {start}, [start]
    while frontier:
        for v in graph[frontier.pop()]:
            if v not in seen:
                seen.add(v)
                frontier.append(v)
    return len(seen) == len(graph)


@st.composite
def configs(draw):
    """(ids, k) for which a k-regular graph exists: 2..60 distinct ids, odd k only for even n."""
    ids = draw(st.lists(st.integers(0, 10**6), min_size=2, max_size=60, unique=True))
    n = len(ids)
    k = draw(st.integers(1, n - 1))
    if k % 2 == 1 and n % 2 == 1:
        k += 1 if k < n - 1 else -1
    return ids, k


@FAST
@given(configs(), seeds)
def test_graph_is_k_regular_symmetric_and_loop_free(config, seed):
    ids, k = config
    graph = neighbour_graph(ids, k, seed)
    assert set(graph) == set(ids)
    for u, neighbours in graph.items():
        assert len(neighbours) == k
        assert u not in neighbours
        assert neighbours <= set(ids)
        for v in neighbours:
            assert u in graph[v]


@FAST
@given(configs(), seeds, st.data())
def test_graph_is_determined_by_seed_not_by_id_order(config, seed, data):
    ids, k = config
    shuffled = data.draw(st.permutations(ids))
    assert neighbour_graph(shuffled, k, seed) == neighbour_graph(ids, k, seed)
    assert list(neighbour_graph(shuffled, k, seed)) == sorted(ids)


@FAST
@given(configs(), seeds)
def test_graph_is_connected_from_two_neighbours(config, seed):
    ids, k = config
    if k >= 2 or len(ids) == 2:
        assert is_connected(neighbour_graph(ids, k, seed))


@FAST
@given(st.integers(2, 60), seeds)
def test_n_minus_one_neighbours_is_the_complete_graph(n, seed):
    graph = neighbour_graph(range(n), n - 1, seed)
    assert graph == {u: frozenset(range(n)) - {u} for u in range(n)}


def test_one_neighbour_is_a_perfect_matching():
    graph = neighbour_graph(range(10), 1, bytes(32))
    partners = {u: next(iter(vs)) for u, vs in graph.items()}
    assert all(partners[partners[u]] == u != partners[u] for u in partners)


@pytest.mark.parametrize(("n", "k", "min_distinct"), [(6, 2, 12), (10, 4, 19), (40, 6, 20)])
def test_different_seeds_give_different_graphs(n, k, min_distinct):
    # Deterministic: fixed seeds. A 6-cycle has 60 labelings, so 20 seeds collide a few times.
    graphs = {as_edges(neighbour_graph(range(n), k, bytes([i]) * 32)) for i in range(20)}
    assert len(graphs) >= min_distinct


def test_each_ring_on_four_clients_is_about_equally_likely():
    # The 3 distinct 4-cycles on {0,1,2,3} each arise from 8 of the 24 orderings; a biased or
    # identity shuffle would favour one. Fixed seeds, so the test is deterministic.
    counts = Counter(as_edges(neighbour_graph(range(4), 2, bytes([i, 7]) * 16)) for i in range(240))
    assert len(counts) == 3
    assert all(55 <= c <= 105 for c in counts.values()), counts


def test_shuffle_reaches_every_ordering_about_equally():
    # 600 fixed seeds over the 6 orderings of 3 items: each should appear about 100 times.
    counts = Counter(tuple(_shuffled([0, 1, 2], i.to_bytes(32, "big"))) for i in range(600))
    assert len(counts) == 6
    assert all(65 <= c <= 135 for c in counts.values()), counts


@pytest.mark.parametrize(
    ("ids", "k", "seed", "match"),
    [
        (range(5), 0, bytes(32), r"neighbours must be in \[1, 4\]"),
        (range(5), 5, bytes(32), r"neighbours must be in \[1, 4\]"),
        (range(5), 3, bytes(32), "choose an even number of neighbours"),
        (range(7), 1, bytes(32), "choose an even number of neighbours"),
        ([0, 1, 2, 2], 2, bytes(32), "distinct"),
        ([0], 1, bytes(32), "at least 2 clients"),
        ([], 1, bytes(32), "at least 2 clients"),
        (range(4), 2, bytes(31), "seed must be 32 bytes"),
        (range(4), 2, bytes(33), "seed must be 32 bytes"),
        (range(4), 2, "x" * 32, "seed must be 32 bytes"),
        ([0, 1, "2", 3], 2, bytes(32), "integers"),
        (range(4), True, bytes(32), "neighbours"),
    ],
)
def test_invalid_configurations_are_refused(ids, k, seed, match):
    with pytest.raises(ConfigError, match=match):
        neighbour_graph(ids, k, seed)


@pytest.mark.parametrize(
    ("n", "k"), [(2, 1), (3, 2), (4, 3), (5, 4), (10, 8), (100, 14), (1000, 20), (10**6, 40)]
)
def test_default_neighbours_known_values(n, k):
    assert default_neighbours(n) == k


def test_default_neighbours_always_gives_a_graph():
    for n in range(2, 300):
        k = default_neighbours(n)
        assert 1 <= k <= n - 1
        assert not (k % 2 == 1 and n % 2 == 1)
        assert k <= 2 * (n - 1).bit_length()
        graph = neighbour_graph(range(n), k, bytes(32))
        assert all(len(vs) == k for vs in graph.values())


@pytest.mark.parametrize("n", [1, 0, -3, True])
def test_default_neighbours_refuses_fewer_than_two_clients(n):
    with pytest.raises(ConfigError, match="at least 2 clients"):
        default_neighbours(n)
