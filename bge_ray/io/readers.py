"""Locate corpus files (files, folders, globs, BEIR folders, object-store URIs), detect their format
and map their fields to ``id`` + ``text`` (BEIR: title + text). Rows are read per shard by
:mod:`bge_ray.io.sharding`."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from .store import filesystem, is_uri

FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".tsv": "csv"}


@dataclass(frozen=True)
class CorpusSpec:
    """Where a corpus is and which fields make up its rows."""

    path: str
    id_field: str | None = None  # None: "_id" if present, else "id"
    text_fields: tuple[str, ...] | None = None  # None: BEIR's title + text if present, else text
    format: str | None = None  # None: from the file extension


def expand_paths(path: str) -> tuple[list[str], pafs.FileSystem | None]:
    """Files behind ``path``: one file, a glob, a folder of files, or a BEIR folder (its corpus.jsonl)."""
    if is_uri(path):
        fs, root = filesystem(path)
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.Directory:
            beir = f"{root.rstrip('/')}/corpus.jsonl"
            if fs.get_file_info(beir).type == pafs.FileType.File:
                return [beir], fs
            infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
            files = sorted(i.path for i in infos if i.type == pafs.FileType.File and _ext(i.path) in FORMATS)
        elif info.type == pafs.FileType.File:
            files = [root]
        else:
            raise FileNotFoundError(f"input {path} does not exist")
        if not files:
            raise FileNotFoundError(f"input {path} holds no {'/'.join(FORMATS)} files")
        return files, fs
    path = path.removeprefix("file://")
    if any(ch in path for ch in "*?["):
        files = sorted(glob.glob(path, recursive=True))
    elif os.path.isdir(path):
        beir = os.path.join(path, "corpus.jsonl")
        if os.path.isfile(beir):
            return [os.path.abspath(beir)], None
        files = sorted(
            os.path.join(d, f) for d, _, fs_ in os.walk(path) for f in fs_ if _ext(f) in FORMATS
        )
    elif os.path.isfile(path):
        files = [path]
    else:
        raise FileNotFoundError(f"input {path} does not exist")
    files = [os.path.abspath(f) for f in files if _ext(f) in FORMATS]
    if not files:
        raise FileNotFoundError(f"input {path} matches no {'/'.join(FORMATS)} files")
    return files, None


def _ext(path: str) -> str:
    name = path.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    return os.path.splitext(name)[1]


def detect_format(files: list[str], declared: str | None) -> str:
    if declared:
        if declared not in set(FORMATS.values()):
            raise ValueError(f"format must be one of {sorted(set(FORMATS.values()))}, got {declared!r}")
        return declared
    kinds = {FORMATS[_ext(f)] for f in files}
    if len(kinds) != 1:
        raise ValueError(f"input mixes formats {sorted(kinds)}; pass one format or one kind of file")
    return kinds.pop()


def pick_fields(columns: list[str], id_field: str | None, text_fields: tuple[str, ...] | None, where: str):
    """Resolve the id column and text columns against a file's schema, with a clear error."""
    if id_field is None:
        id_field = "_id" if "_id" in columns else "id" if "id" in columns else None
        if id_field is None:
            raise ValueError(f"{where}: no id field ('_id' or 'id') among columns {columns}; pass --id-field")
    elif id_field not in columns:
        raise ValueError(f"{where}: id field {id_field!r} not among columns {columns}")
    if text_fields is None:
        text_fields = ("title", "text") if "title" in columns and "text" in columns else ("text",)
    missing = [f for f in text_fields if f not in columns]
    if missing:
        raise ValueError(f"{where}: text field(s) {missing} not among columns {columns}; pass --text-fields")
    return id_field, tuple(text_fields)


def join_text(table: pa.Table, text_fields: tuple[str, ...]) -> pa.Array:
    """BEIR convention: fields joined by one space, empty / null fields skipped (title + text)."""
    cols = [pc.utf8_trim_whitespace(pc.fill_null(table[f].cast(pa.string()), "")) for f in text_fields]
    if len(cols) == 1:
        return cols[0]
    out = cols[0]
    for c in cols[1:]:
        sep = pc.if_else(pc.and_(pc.greater(pc.utf8_length(out), 0), pc.greater(pc.utf8_length(c), 0)), " ", "")
        out = pc.binary_join_element_wise(out, sep, c, "")
    return out
