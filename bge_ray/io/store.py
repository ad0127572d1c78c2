"""A job's output location: a local folder or an object-store prefix (``s3://``, ``gs://``, ...),
through pyarrow filesystems, with one set of commit rules for both.

- Local: every file is written to a temp name beside it and renamed, so it appears whole or not at all.
- Object store: every object is written once at its final key (a PUT, or a multipart upload that
  only appears on completion, is whole or absent), and readers trust only what the manifest lists.

S3 settings come from the environment as for any AWS client (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``), so any S3-compatible
store works. A :class:`Store` pickles as its URI, so Ray tasks rebuild the filesystem where they run.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from contextlib import contextmanager

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .atomic import atomic_path


def is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path inside it)`` for a local path or a URI; S3 honours ``AWS_ENDPOINT_URL``."""
    if not is_uri(uri):
        return pafs.LocalFileSystem(), os.path.abspath(uri.removeprefix("file://"))
    scheme = uri.split("://", 1)[0].lower()
    if scheme in ("s3", "s3a"):
        bucket_key = uri.split("://", 1)[1]
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        kwargs = {}
        if endpoint:
            kwargs["endpoint_override"] = endpoint
            if endpoint.startswith("http://"):
                kwargs["scheme"] = "http"
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            kwargs["region"] = region
        return pafs.S3FileSystem(**kwargs), bucket_key.rstrip("/")
    fs, path = pafs.FileSystem.from_uri(uri)
    return fs, path.rstrip("/")


class Store:
    """Files under one root (a folder or a prefix); paths are relative, with ``/``."""

    def __init__(self, uri: str):
        self.uri = uri if is_uri(uri) else os.path.abspath(uri.removeprefix("file://"))
        self.fs, self.root = filesystem(uri)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    def __reduce__(self):
        return (Store, (self.uri,))

    def __repr__(self) -> str:
        return f"Store({self.uri!r})"

    def path(self, rel: str = "") -> str:
        """Path inside the filesystem (local: an absolute path)."""
        return f"{self.root}/{rel}" if rel else self.root

    def url(self, rel: str = "") -> str:
        """What to show a person, or pass to another reader: the URI (or local path) of ``rel``."""
        return f"{self.uri.rstrip('/')}/{rel}" if rel else self.uri

    # -- reading ----------------------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def list(self, rel: str) -> list[str]:
        """Names of the files directly under ``rel`` (empty if it does not exist)."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.path(rel), allow_not_found=True))
        return sorted(os.path.basename(i.path) for i in infos if i.type == pafs.FileType.File)

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def read_json(self, rel: str):
        return json.loads(self.read_bytes(rel))

    def parquet_file(self, rel: str) -> pq.ParquetFile:
        return pq.ParquetFile(self.fs.open_input_file(self.path(rel)))

    def read_parquet(self, rel: str, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(self.path(rel), columns=columns, filesystem=self.fs)

    # -- writing: whole or not at all ----------------------------------------------------------------
    @contextmanager
    def writer(self, rel: str):
        """A binary stream whose content appears at ``rel`` only when the block succeeds."""
        final = self.path(rel)
        if self.local:
            with atomic_path(final) as tmp, open(tmp, "wb") as f:
                yield f
            return
        # Object stores: buffer, then one upload at the final key, so a failure part-way leaves no object.
        buf = io.BytesIO()
        yield buf
        with self.fs.open_output_stream(final) as out:
            out.write(buf.getbuffer())

    def write_bytes(self, rel: str, data: bytes) -> None:
        with self.writer(rel) as f:
            f.write(data)

    def write_json(self, rel: str, obj) -> None:
        self.write_bytes(rel, (json.dumps(obj, indent=2) + "\n").encode())

    def write_parquet(self, rel: str, table: pa.Table) -> None:
        with self.writer(rel) as f:
            pq.write_table(table, f)

    def upload(self, local_file: str, rel: str) -> None:
        """A local file (e.g. a faiss index written by a library that wants a path) to ``rel``."""
        with self.writer(rel) as out, open(local_file, "rb") as f:
            shutil.copyfileobj(f, out, 1 << 24)

    @contextmanager
    def local_copy(self, rel: str):
        """A local path holding ``rel`` (the file itself when local; a temp download otherwise)."""
        if self.local:
            yield self.path(rel)
            return
        with tempfile.TemporaryDirectory(prefix="bge_ray_") as d:
            dst = os.path.join(d, os.path.basename(rel))
            with self.fs.open_input_stream(self.path(rel)) as f, open(dst, "wb") as out:
                shutil.copyfileobj(f, out, 1 << 24)
            yield dst

    def delete(self, rel: str) -> None:
        """Remove a file or a folder under the root; nothing if absent."""
        info = self.fs.get_file_info(self.path(rel))
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path(rel))
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(self.path(rel))

    def makedirs(self, rel: str) -> None:
        if self.local:
            os.makedirs(self.path(rel), exist_ok=True)
