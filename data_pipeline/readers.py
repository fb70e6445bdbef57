"""Byte-range access to the files of a prepared data folder, local or remote.

`data_dir` is a local folder, a `file://` URL, an `http(s)://` URL, or any other URL that
`webdataset.gopen` opens (`pipe:CMD`, `gs://`, ...). A `{}` in it stands for the file name
(`pipe:aws s3 cp s3://bucket/data/{} -`); otherwise names are appended after a `/`.

How each kind reads a sample (the global order needs random access):
- local: `os.pread` on cached file descriptors; the page cache does the rest.
- http(s): HTTP range requests on one persistent connection per worker. A server that ignores
  `Range` is an error (serving whole files per sample would be unusable).
- other URLs: webdataset cannot seek, so a shard is streamed whole through `webdataset.gopen` into a
  small in-memory LRU cache (`max_cached_shards`). Correct, but each cache miss reads a whole shard,
  and a shuffled batch touches many shards: use it for small data or tests, and copy real data to local
  disk or serve it over HTTP.
"""

from __future__ import annotations

import collections
import hashlib
import http.client
import os
import urllib.parse
from typing import BinaryIO, Protocol

from data_pipeline.errors import ShardError

MAX_OPEN_FILES = 64
HASH_CHUNK = 1 << 22


def file_url(data_dir: str, name: str) -> str:
    """The path or URL of file `name` of `data_dir`."""
    if "{}" in data_dir:
        return data_dir.replace("{}", name)
    if data_dir.startswith("file://"):
        data_dir = data_dir[len("file://") :]
    if "://" in data_dir or data_dir.startswith("pipe:"):
        return data_dir.rstrip("/") + "/" + name
    return os.path.join(data_dir, name)


def is_local(data_dir: str) -> bool:
    """Whether `data_dir` is a local folder (or a file:// URL)."""
    return data_dir.startswith("file://") or ("://" not in data_dir and not data_dir.startswith("pipe:"))


class RangeReader(Protocol):
    """Reads byte ranges of the files of one data folder."""

    def read(self, name: str, offset: int, size: int) -> bytes: ...


class LocalReader:
    """`os.pread` on at most MAX_OPEN_FILES cached descriptors."""

    def __init__(self, data_dir: str):
        self.data_dir = data_dir
        self.fds: collections.OrderedDict[str, int] = collections.OrderedDict()

    def read(self, name: str, offset: int, size: int) -> bytes:
        fd = self.fds.get(name)
        if fd is None:
            path = file_url(self.data_dir, name)
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as err:
                raise ShardError(f"shard {path} cannot be opened: {err}") from err
            self.fds[name] = fd
            if len(self.fds) > MAX_OPEN_FILES:
                os.close(self.fds.popitem(last=False)[1])
        self.fds.move_to_end(name)
        return os.pread(fd, size, offset)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def __del__(self) -> None:
        self.close()


class HttpReader:
    """HTTP range requests on one keep-alive connection per host."""

    def __init__(self, data_dir: str):
        self.data_dir = data_dir
        self.connections: dict[tuple[str, str], http.client.HTTPConnection] = {}

    def read(self, name: str, offset: int, size: int) -> bytes:
        url = urllib.parse.urlsplit(file_url(self.data_dir, name))
        headers = {"Range": f"bytes={offset}-{offset + size - 1}"}
        for attempt in range(2):
            connection = self._connection(url.scheme, url.netloc)
            try:
                connection.request("GET", url.path + (f"?{url.query}" if url.query else ""), headers=headers)
                response = connection.getresponse()
                body = response.read()
                break
            except (http.client.HTTPException, OSError) as err:
                self.connections.pop((url.scheme, url.netloc)).close()
                if attempt == 1:
                    raise ShardError(f"{url.geturl()}: range read failed: {err}") from err
        if response.status == 416:
            return b""
        if response.status != 206:
            raise ShardError(
                f"{url.geturl()}: HTTP {response.status} to a range request (expected 206); the server must "
                "support Range requests, or copy the data to local disk"
            )
        return body

    def _connection(self, scheme: str, netloc: str) -> http.client.HTTPConnection:
        key = (scheme, netloc)
        if key not in self.connections:
            cls = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
            self.connections[key] = cls(netloc, timeout=60)
        return self.connections[key]


class StreamReader:
    """Whole-shard reads through webdataset.gopen into an LRU cache of `max_cached_shards` shards."""

    def __init__(self, data_dir: str, max_cached_shards: int = 2):
        self.data_dir = data_dir
        self.max_cached_shards = max_cached_shards
        self.cache: collections.OrderedDict[str, bytes] = collections.OrderedDict()

    def read(self, name: str, offset: int, size: int) -> bytes:
        if name not in self.cache:
            self.cache[name] = read_file(self.data_dir, name)
            if len(self.cache) > self.max_cached_shards:
                self.cache.popitem(last=False)
        self.cache.move_to_end(name)
        return self.cache[name][offset : offset + size]


def make_reader(data_dir: str, max_cached_shards: int = 2) -> RangeReader:
    """The reader for `data_dir`'s kind of location."""
    if is_local(data_dir):
        return LocalReader(data_dir)
    if data_dir.startswith(("http://", "https://")) and "{}" not in data_dir:
        return HttpReader(data_dir)
    return StreamReader(data_dir, max_cached_shards)


def open_file(data_dir: str, name: str) -> BinaryIO:
    """A stream over file `name` of `data_dir` (local open, or webdataset.gopen for URLs)."""
    url = file_url(data_dir, name)
    if is_local(data_dir):
        return open(url, "rb")
    import webdataset

    return webdataset.gopen(url, "rb")


def read_file(data_dir: str, name: str) -> bytes:
    """All bytes of file `name` of `data_dir`."""
    try:
        with open_file(data_dir, name) as stream:
            return stream.read()
    except OSError as err:
        raise ShardError(f"{file_url(data_dir, name)} cannot be read: {err}") from err


def file_sha256(data_dir: str, name: str) -> tuple[str, int]:
    """(sha256 hex digest, size in bytes) of file `name` of `data_dir`, streamed."""
    digest, size = hashlib.sha256(), 0
    with open_file(data_dir, name) as stream:
        while chunk := stream.read(HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size
