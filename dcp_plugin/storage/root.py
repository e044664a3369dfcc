"""One checkpoint root (a local directory or an fsspec URL): its filesystem, paths and URLs, and clear errors
when the storage itself cannot be used."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any, TypeVar

from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from dcp_plugin.errors import CheckpointError, StorageAccessError
from dcp_plugin.storage.names import WORK_DIR

_BUCKET_PROTOCOLS = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "r2"}


class StorageRoot:
    """Paths under a root directory or URL. Internally paths have no protocol (fsspec style); :meth:`url` gives
    what users and DCP see: a plain path for local files, a URL otherwise."""

    def __init__(self, root: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> None:
        text = os.fspath(root)
        if not text:
            raise ValueError("The checkpoint directory is empty; pass a local path or a URL such as s3://bucket/run.")
        self.storage_options = dict(storage_options or {})
        try:
            self.fs, path = url_to_fs(text, **self.storage_options)
        except (ImportError, ValueError) as err:
            raise StorageAccessError(f"Cannot open {text}: {err}") from err
        protocols = {self.fs.protocol} if isinstance(self.fs.protocol, str) else set(self.fs.protocol)
        self.is_local = isinstance(self.fs, LocalFileSystem) and bool(protocols & {"file", "local"})
        self.path = os.path.abspath(path) if self.is_local else path.rstrip("/")
        self.url_root = self.path if self.is_local else self.fs.unstrip_protocol(self.path)
        self.protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def join(self, *parts: str) -> str:
        return "/".join([self.path, *[p for p in parts if p]])

    def work(self, area: str, entry: str = "") -> str:
        return self.join(WORK_DIR, area, entry)

    def url(self, path: str) -> str:
        return path if self.is_local else self.fs.unstrip_protocol(path)

    def relative(self, path: str) -> str:
        return path[len(self.path) + 1 :] if path.startswith(self.path + "/") else path

    def forget_listings(self) -> None:
        """Other processes (ranks, the writer daemon) change the directory: never trust cached listings."""
        if not self.is_local:
            self.fs.invalidate_cache()

    @property
    def bucket(self) -> str | None:
        if self.protocol not in _BUCKET_PROTOCOLS:
            return None
        return self.path.split("/", 1)[0]

    def check_reachable(self) -> None:
        """For object stores: the bucket exists and the credentials work (never creates a bucket)."""
        bucket = self.bucket
        if bucket is None:
            return
        try:
            self.fs.invalidate_cache()
            self.fs.ls(bucket, detail=False)
        except Exception as err:  # noqa: BLE001 - mapped to one clear error below
            raise access_error(err, self.url_root, action="use") from err


def access_error(err: BaseException, url: str, *, action: str) -> StorageAccessError:
    """One clear error for a storage failure: what failed, where, and the likely fix."""
    text = f"{type(err).__name__}: {err}"
    lowered = text.lower()
    if isinstance(err, FileNotFoundError) or "nosuchbucket" in lowered or "does not exist" in lowered:
        hint = "the bucket does not exist; create it first (dcp-plugin never creates buckets) or fix the URL"
    elif isinstance(err, PermissionError) or any(
        word in lowered for word in ("forbidden", "accessdenied", "access denied", "invalidaccesskeyid", "signature")
    ):
        hint = "access was denied; check the credentials (key, secret, profile) and the bucket's permissions"
    elif any(word in lowered for word in ("connect", "timeout", "timed out", "endpoint", "name or service")):
        hint = "the endpoint could not be reached; check endpoint_url, the network and that the service is up"
    else:
        hint = "check the URL, the credentials and the storage_options"
    return StorageAccessError(f"Cannot {action} {url}: {hint} ({' '.join(text.split())[:300]}).")


_F = TypeVar("_F", bound=Callable[..., Any])


def storage_errors(action: str) -> Callable[[_F], _F]:
    """On remote storage, turn the client's own errors (botocore, aiohttp, gcsfs...) into one
    :class:`StorageAccessError` naming the URL and the likely fix. Project errors pass through unchanged.

    Decorates methods of objects with ``is_local`` and ``root_url`` (the storage facade)."""

    def decorate(method: _F) -> _F:
        @functools.wraps(method)
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return method(self, *args, **kwargs)
            except (CheckpointError, ValueError, NotADirectoryError):
                raise
            except Exception as err:
                if self.is_local:
                    raise
                raise access_error(err, self.root_url, action=action) from err

        return wrapper  # type: ignore[return-value]

    return decorate


__all__ = ["StorageRoot", "access_error", "storage_errors"]
