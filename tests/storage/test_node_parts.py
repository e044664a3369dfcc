"""The part record of a checkpoint written on node-local disks: which node holds which file, validated like the
rest of the manifest; a node's directory verifies by the files it holds."""

from __future__ import annotations

import pytest

from dcp_plugin.errors import CheckpointCorruptError
from dcp_plugin.storage import manifest as manifests
from dcp_plugin.storage.node_parts import part_files, part_record, with_part, without_part

FILES = {
    ".metadata": {"size": 10, "xxh3_128": "a"},
    "__0_0.distcp": {"size": 5, "xxh3_128": "b"},
    "__1_0.distcp": {"size": 5, "xxh3_128": "c"},
    "__2_0.distcp": {"size": 5, "xxh3_128": "d"},
}


def test_each_file_belongs_to_the_node_of_the_rank_that_wrote_it():
    part = part_record(FILES, (0, 0, 1), node=0)
    assert part == {"node": 0, "nodes": 2, "holders": {"__0_0.distcp": 0, "__1_0.distcp": 0, "__2_0.distcp": 1}}
    manifest = {"files": FILES, "part": part}
    assert part_files(manifest) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert part_files(with_part(manifest, 1)) == [".metadata", "__2_0.distcp"]
    assert part_files(without_part(manifest)) == sorted(FILES)  # held whole


@pytest.mark.parametrize(
    "part",
    [
        "node 1",
        {"node": 2, "nodes": 2, "holders": {}},
        {"node": 0, "nodes": 0, "holders": {}},
        {"node": 0, "nodes": 2, "holders": {"__0_0.distcp": 5}},
        {"node": 0, "nodes": 2, "holders": {"__0_0.distcp": True}},
        {"node": 0, "nodes": 2},
    ],
)
def test_a_malformed_part_record_makes_the_manifest_untrusted(part):
    data = manifests.encode({"files": FILES, "save_id": "x", "part": part})
    with pytest.raises(CheckpointCorruptError, match="part"):
        manifests.decode(data, "dcp_plugin.json")
