"""Which ranks share a node: from torchrun's GROUP_RANK, from a local world size (as Accelerate reads it), or from
the host name; every rank agrees through one all-gather."""

from __future__ import annotations

import socket

import pytest

from dcp_plugin import ConfigError
from dcp_plugin.engine.nodes import detect_layout, node_key


def agree(environs: list[dict[str, str]]):
    """The layouts every rank computes when each rank has its own environment."""
    keys = [node_key(rank, env) for rank, env in enumerate(environs)]
    return [detect_layout(rank, lambda _mine: keys, env) for rank, env in enumerate(environs)]


def test_torchrun_group_ranks_number_the_nodes():
    layouts = agree([{"GROUP_RANK": g} for g in ("0", "0", "1", "1")])
    assert layouts[0].node_of_rank == (0, 0, 1, 1) and layouts[0].nodes == 2
    assert [layout.is_leader for layout in layouts] == [True, False, True, False]
    assert layouts[3].node == 1 and layouts[3].leader_of(1) == 2 and layouts[0].leaders == [0, 2]


def test_a_local_world_size_places_ranks_in_blocks_as_accelerate_reads_it():
    for variable in ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"):
        layouts = agree([{variable: "2"} for _ in range(6)])
        assert layouts[0].node_of_rank == (0, 0, 1, 1, 2, 2)


def test_the_host_name_is_the_fallback(monkeypatch):
    hosts = iter(["b", "a", "b"])
    keys = [(1, next(hosts)) for _ in range(3)]
    layout = detect_layout(1, lambda _mine: keys, {})
    assert layout.node_of_rank == (0, 1, 0)  # nodes numbered in the order their first rank appears
    assert node_key(0, {}) == (1, socket.gethostname())


def test_ranks_that_disagree_on_how_they_know_their_node_are_an_error():
    keys = [(0, "0"), (1, "host")]
    with pytest.raises(ConfigError, match="same launcher"):
        detect_layout(0, lambda _mine: keys, {})


def test_peers_form_a_ring_and_never_include_the_node_itself():
    layout = agree([{"GROUP_RANK": str(g)} for g in range(4)])[0]
    assert layout.peers(3, 1) == [0] and layout.peers(1, 2) == [2, 3]
    assert layout.peers(0, 9) == [1, 2, 3]  # at most every other node
    single = agree([{"GROUP_RANK": "0"}])[0]
    assert single.peers(0, 1) == []
