"""A local filesystem that fails or stalls writes on demand, for fault-injection tests.

Behaviour is driven by files next to the data, so it works across processes (DCP's writer daemon too):
``<root>/.fail-writes`` makes every new ``.distcp`` file fail after its first bytes; ``<root>/.slow-writes``
makes each write sleep (holding a save in flight long enough to kill the process mid-write).
"""

from __future__ import annotations

import os
import time

import fsspec
from fsspec.implementations.local import LocalFileOpener, LocalFileSystem


class _FaultyFile(LocalFileOpener):
    def __init__(self, path: str, mode: str, fail: bool, slow: bool, **kwargs) -> None:
        super().__init__(path, mode, **kwargs)
        self._fail = fail
        self._slow = slow

    def write(self, data):
        if self._slow:
            time.sleep(0.5)
        if self._fail:
            super().write(bytes(data)[:16])
            raise OSError(28, "No space left on device (injected)", self.path)
        return super().write(data)


class FaultyFileSystem(LocalFileSystem):
    protocol = "faulty"
    root_marker = "/"

    @classmethod
    def _strip_protocol(cls, path):
        path = (
            fsspec.core.strip_protocol(path) if not str(path).startswith("faulty://") else str(path)[len("faulty://") :]
        )
        return LocalFileSystem._strip_protocol(path)

    def unstrip_protocol(self, name: str) -> str:
        return "faulty://" + name

    def _flag(self, path: str, name: str) -> bool:
        parts = path.split("/")
        return any(os.path.exists("/".join(parts[:i] + [name])) for i in range(2, len(parts)))

    def _open(self, path, mode="rb", **kwargs):
        path = self._strip_protocol(path)
        if "w" in mode and path.endswith(".distcp"):
            return _FaultyFile(
                path,
                mode,
                fail=self._flag(path, ".fail-writes"),
                slow=self._flag(path, ".slow-writes"),
                fs=self,
                **kwargs,
            )
        return super()._open(path, mode, **kwargs)


fsspec.register_implementation("faulty", FaultyFileSystem, clobber=True)
