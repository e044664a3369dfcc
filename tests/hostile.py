"""Hostile checkpoints: what an attacker (not a failing disk) could hand a user, built from a real one.

Every builder takes a committed checkpoint directory and the path of a sentinel file *outside* it that holds
a valid copy of the checkpoint's first data file (so a reader that follows a path out of the checkpoint
would load it without noticing), and turns the checkpoint hostile. Builders that change data files or
``.metadata`` also forge the manifest's sizes and checksums, so only the reader's other defences remain.

``python -m tests.hostile CASES.json`` runs ``dcp_plugin.cli.main`` for a list of argument lists in one
process and prints JSON results (exit code, stdout, stderr with any uncaught traceback, seconds), so a whole
matrix of CLI calls costs one interpreter start instead of one per call.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import io
import json
import os
import pickle
import shlex
import signal
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from dcp_plugin.format import encoding
from tests.forge import forge_manifest, read_manifest, write_manifest

SKELETON = "__dcp_plugin__/skeleton/rank0"
DATA = "__0_0.distcp"
MARKER = "pwned"
"""A payload creates this file next to the sentinel; it must never exist."""


class Exploit:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


def marker_of(outside: str) -> str:
    return os.path.join(os.path.dirname(outside), MARKER)


# -- editing DCP metadata the way an attacker would (with plain pickle) ------------------------------------
def load_metadata(directory: str) -> Metadata:
    with open(os.path.join(directory, ".metadata"), "rb") as handle:
        return pickle.load(handle)


def save_metadata(directory: str, metadata: Any) -> None:
    with open(os.path.join(directory, ".metadata"), "wb") as handle:
        pickle.dump(metadata, handle)
    forge_manifest(directory)


def _index_of(metadata: Metadata, fqn: str) -> Any:
    return next(index for index in metadata.storage_data if index.fqn == fqn)


def _retarget(directory: str, fqn: str, payload: bytes) -> None:
    """Append ``payload`` to the first data file and point item ``fqn`` at it."""
    path = os.path.join(directory, DATA)
    offset = os.path.getsize(path)
    with open(path, "ab") as handle:
        handle.write(payload)
    metadata = load_metadata(directory)
    index = _index_of(metadata, fqn)
    metadata.storage_data[index] = dataclasses.replace(
        metadata.storage_data[index], relative_path=DATA, offset=offset, length=len(payload)
    )
    save_metadata(directory, metadata)


def _torch_saved(value: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _point_data_file_at(directory: str, relative: str) -> None:
    metadata = load_metadata(directory)
    for index, info in list(metadata.storage_data.items()):
        if info.relative_path == DATA:
            metadata.storage_data[index] = dataclasses.replace(info, relative_path=relative)
    save_metadata(directory, metadata)


def read_skeleton(directory: str) -> Any:
    """The skeleton document of rank 0, read straight from the data file."""
    info = load_metadata(directory).storage_data[_index_of(load_metadata(directory), SKELETON)]
    with open(os.path.join(directory, info.relative_path), "rb") as handle:
        handle.seek(info.offset)
        raw = handle.read(info.length)
    return encoding.loads(torch.load(io.BytesIO(raw), weights_only=True))


def _weight_fqn(metadata: Metadata) -> str:
    return next(
        fqn
        for fqn, item in sorted(metadata.state_dict_metadata.items())
        if isinstance(item, TensorStorageMetadata) and fqn != SKELETON and len(item.size) == 2
    )


# -- the cases ---------------------------------------------------------------------------------------------
def pickle_in_metadata(directory: str, outside: str) -> None:
    with open(os.path.join(directory, ".metadata"), "wb") as handle:
        pickle.dump(Exploit(marker_of(outside)), handle)
    forge_manifest(directory)


def pickle_in_metadata_field(directory: str, outside: str) -> None:
    """A real Metadata object whose planner data carries the payload."""
    metadata = load_metadata(directory)
    metadata.planner_data = {"x": Exploit(marker_of(outside))}
    save_metadata(directory, metadata)


def pickle_in_skeleton_item(directory: str, outside: str) -> None:
    _retarget(directory, SKELETON, _torch_saved(Exploit(marker_of(outside))))


def pickle_in_weight_item(directory: str, outside: str) -> None:
    _retarget(directory, _weight_fqn(load_metadata(directory)), _torch_saved(Exploit(marker_of(outside))))


def pickle_in_skeleton_value(directory: str, outside: str) -> None:
    """The JSON skeleton itself carries a pickled value (as allow_pickle=True would store one)."""
    document = read_skeleton(directory)
    payload = base64.b64encode(pickle.dumps(Exploit(marker_of(outside)))).decode("ascii")
    for entry in document["entries"].values():
        value = entry["value"]
        if isinstance(value, dict) and encoding.TAG not in value:
            value["pwn"] = {encoding.TAG: "pickle", "v": payload}
    _replace_skeleton(directory, encoding.dumps(document))


def _replace_skeleton(directory: str, skeleton: torch.Tensor) -> None:
    metadata = load_metadata(directory)
    item = metadata.state_dict_metadata[SKELETON]
    item.size = torch.Size([skeleton.numel()])
    item.chunks[0] = dataclasses.replace(item.chunks[0], sizes=torch.Size([skeleton.numel()]))
    save_metadata(directory, metadata)
    _retarget(directory, SKELETON, _torch_saved(skeleton))


def skeleton_not_json(directory: str, outside: str) -> None:
    _replace_skeleton(directory, torch.frombuffer(bytearray(b"\x80not json{"), dtype=torch.uint8))


def skeleton_wrong_types(directory: str, outside: str) -> None:
    document = read_skeleton(directory)
    document["entries"] = {name: 3 for name in document["entries"]}
    _replace_skeleton(directory, encoding.dumps(document))


def checkpoint_dir_symlink(directory: str, outside: str) -> None:
    """The checkpoint directory is a link to a checkpoint outside the root."""
    elsewhere = os.path.join(os.path.dirname(os.path.dirname(outside)), "elsewhere")
    os.rename(directory, elsewhere)
    os.symlink(elsewhere, directory)


def absolute_path(directory: str, outside: str) -> None:
    _point_data_file_at(directory, os.path.abspath(outside))


def dotdot_path(directory: str, outside: str) -> None:
    _point_data_file_at(directory, os.path.relpath(outside, directory))


def symlinked_path(directory: str, outside: str) -> None:
    """.metadata names a plain file name, but that file is a link leading out of the checkpoint."""
    os.symlink(outside, os.path.join(directory, "elsewhere.distcp"))
    _point_data_file_at(directory, "elsewhere.distcp")


def data_file_symlink(directory: str, outside: str) -> None:
    """The data file itself is a link to a byte-identical copy outside: manifest checksums still match."""
    os.remove(os.path.join(directory, DATA))
    os.symlink(outside, os.path.join(directory, DATA))


def data_file_dev_zero(directory: str, outside: str) -> None:
    os.remove(os.path.join(directory, DATA))
    os.symlink("/dev/zero", os.path.join(directory, DATA))


def _fifo(name: str) -> Callable[[str, str], None]:
    def build(directory: str, outside: str) -> None:
        os.remove(os.path.join(directory, name))
        os.mkfifo(os.path.join(directory, name))

    build.__name__ = f"fifo_{name}"
    return build


def _dev_zero(name: str) -> Callable[[str, str], None]:
    def build(directory: str, outside: str) -> None:
        os.remove(os.path.join(directory, name))
        os.symlink("/dev/zero", os.path.join(directory, name))

    return build


def huge_declared_tensor(directory: str, outside: str) -> None:
    metadata = load_metadata(directory)
    fqn = _weight_fqn(metadata)
    item = metadata.state_dict_metadata[fqn]
    item.size = torch.Size([2**20, 2**20])  # 2**40 elements
    item.chunks[0] = dataclasses.replace(item.chunks[0], sizes=torch.Size([2**20, 2**20]))
    save_metadata(directory, metadata)


def huge_declared_skeleton(directory: str, outside: str) -> None:
    """The skeleton is allocated from its declared size before anything else is read."""
    metadata = load_metadata(directory)
    item = metadata.state_dict_metadata[SKELETON]
    item.size = torch.Size([2**40])
    item.chunks[0] = dataclasses.replace(item.chunks[0], sizes=torch.Size([2**40]))
    save_metadata(directory, metadata)


def _manifest_change(**changes: Any) -> Callable[[str, str], None]:
    def build(directory: str, outside: str) -> None:
        manifest = read_manifest(directory)
        manifest.update(changes)
        write_manifest(directory, manifest)

    return build


def manifest_json_list(directory: str, outside: str) -> None:
    manifest = read_manifest(directory)
    with open(os.path.join(directory, "dcp_plugin.json"), "w") as handle:
        json.dump([manifest], handle)


MANIFEST, METADATA, DATA_LEVEL, FORGED_DATA = "manifest", "metadata", "data", "forged-data"
"""Where a case's hostility lies, which decides who must notice it: listing notices a bad manifest; verify and
inspect notice bad metadata; verify notices data that does not match its checksum or is not a regular file;
only a load notices data whose checksums were forged."""

CASES: dict[str, tuple[Callable[[str, str], None], str]] = {
    "pickle-in-metadata": (pickle_in_metadata, METADATA),
    "pickle-in-metadata-field": (pickle_in_metadata_field, METADATA),
    "pickle-in-skeleton-item": (pickle_in_skeleton_item, FORGED_DATA),
    "pickle-in-weight-item": (pickle_in_weight_item, FORGED_DATA),
    "pickle-in-skeleton-value": (pickle_in_skeleton_value, FORGED_DATA),
    "skeleton-not-json": (skeleton_not_json, FORGED_DATA),
    "skeleton-wrong-types": (skeleton_wrong_types, FORGED_DATA),
    "absolute-path": (absolute_path, METADATA),
    "dotdot-path": (dotdot_path, METADATA),
    "symlinked-path": (symlinked_path, METADATA),
    "data-file-symlink": (data_file_symlink, DATA_LEVEL),
    "data-file-dev-zero": (data_file_dev_zero, DATA_LEVEL),
    "checkpoint-dir-symlink": (checkpoint_dir_symlink, MANIFEST),
    "fifo-manifest": (_fifo("dcp_plugin.json"), MANIFEST),
    "fifo-metadata": (_fifo(".metadata"), METADATA),
    "fifo-data-file": (_fifo(DATA), DATA_LEVEL),
    "manifest-dev-zero": (_dev_zero("dcp_plugin.json"), MANIFEST),
    "metadata-dev-zero": (_dev_zero(".metadata"), METADATA),
    "huge-declared-tensor": (huge_declared_tensor, METADATA),
    "huge-declared-skeleton": (huge_declared_skeleton, METADATA),
    "manifest-step-string": (_manifest_change(step="2"), MANIFEST),
    "manifest-json-list": (manifest_json_list, MANIFEST),
    "manifest-created-string": (_manifest_change(created="yesterday"), MANIFEST),
    "manifest-files-list": (_manifest_change(files=[]), MANIFEST),
    "manifest-entries-int": (_manifest_change(entries=3), MANIFEST),
    "manifest-metadata-list": (_manifest_change(metadata=[1]), MANIFEST),
    "manifest-escaping-file-name": (_manifest_change(files={"../outside.bin": {"size": 1, "xxh3_128": "0"}}), MANIFEST),
}


# -- the CLI in a batch ------------------------------------------------------------------------------------
class _Hang(Exception):
    pass


def _on_alarm(signum: int, frame: Any) -> None:
    raise _Hang()


def run_cli(argv: list[str], limit_s: int) -> dict[str, Any]:
    """What ``python -m dcp_plugin.cli ARGV`` would show: exit code, stdout, stderr (uncaught exceptions as the
    interpreter prints them, exit code 1)."""
    from dcp_plugin import cli

    out, err = io.StringIO(), io.StringIO()
    started = time.monotonic()
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(limit_s)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = cli.main(argv)
            except SystemExit as exit_:
                rc = exit_.code if isinstance(exit_.code, int) else 1
            except _Hang:
                rc, err_text = -1, f"HANG: still running after {limit_s} s"
                print(err_text, file=sys.stderr)
            except BaseException:  # noqa: BLE001 - shown exactly as the interpreter would
                traceback.print_exc()
                rc = 1
    finally:
        signal.alarm(0)
    return {
        "argv": argv,
        "rc": rc,
        "stdout": out.getvalue(),
        "stderr": err.getvalue(),
        "seconds": time.monotonic() - started,
    }


def main() -> None:
    with open(sys.argv[1]) as handle:
        calls = json.load(handle)
    results = [run_cli(argv, limit_s=20) for argv in calls]
    print(json.dumps(results))


if __name__ == "__main__":
    main()
