"""Deterministic shards of an input corpus, so a job can be resumed shard by shard.

A shard is a fixed row range of one input file. Planning counts rows (jsonl: one pass over the
bytes, remembering where every shard starts; parquet: metadata only; csv: one read); reading a
shard parses only its rows (jsonl: from its byte offset; parquet: the row groups that hold them)
and checks them, naming file and line for every bad record.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs

from .readers import join_text, pick_fields


@dataclass(frozen=True)
class Shard:
    index: int
    file: str
    format: str  # json | parquet | csv
    start: int  # first row (0-based, blank jsonl lines not counted)
    rows: int
    offset: int | None = None  # jsonl: byte offset of the first row
    first_line: int | None = None  # jsonl: 1-based line number of the first row

    @property
    def name(self) -> str:
        return f"part-{self.index:05d}.parquet"


class BadRecordError(ValueError):
    """An input row that cannot be embedded; the message names file and line (or row)."""


INTEGER, STRING = "integer", "string"


def id_kind_of(value) -> str | None:
    """``integer`` or ``string`` for an id value (None for other types, which :func:`_check` rejects)."""
    if isinstance(value, bool):
        return None
    return INTEGER if isinstance(value, int) else STRING if isinstance(value, str) else None


def first_id_kind(path: str, fmt: str, id_field: str | None, fs=None) -> dict | None:
    """The kind of the file's ids (``{"kind", "at"}``) from its schema (parquet) or first record
    (jsonl; csv ids are read as text): a job's ids must be one kind, or ``1`` and ``"1"`` would be one id."""

    def id_column(names) -> str | None:
        return id_field or ("_id" if "_id" in names else "id" if "id" in names else None)

    if fmt == "csv":
        return {"kind": STRING, "at": path}
    if fmt == "parquet":
        import pyarrow.parquet as pq

        with _open(path, fs) as f:
            schema = pq.ParquetFile(f).schema_arrow
        idf = id_column(schema.names)
        if idf not in schema.names:
            return None  # the reader names the missing column
        t = schema.field(idf).type
        kind = INTEGER if pa.types.is_integer(t) else STRING if pa.types.is_string(t) or pa.types.is_large_string(t) else None
        return {"kind": kind, "at": f"{path} (column {idf!r}: {t})"} if kind else None
    with _open_text_stream(path, fs) as f:
        for _, line_no, record in _records(f, False):
            try:
                row = json.loads(record)
                idf = id_column(row)
                kind = id_kind_of(row.get(idf)) if idf else None
            except (json.JSONDecodeError, AttributeError):
                kind = None
            if kind:
                return {"kind": kind, "at": f"{path}:{line_no}"}
            if line_no > 100:  # no usable id near the top: each row's own check reports it
                return None
    return None


def _id_kind_problem(value, idf: str, expected: dict | None) -> str | None:
    kind = id_kind_of(value)
    if expected is None or kind is None or kind == expected["kind"]:
        return None
    return (f"id {value!r} in field {idf!r} is {'an' if kind == INTEGER else 'a'} {kind} but this job's ids are "
            f"{expected['kind']}s (as at {expected['at']}): 1 and \"1\" would be the same id; give every row an id "
            f"of one type")


class _Raw(io.RawIOBase):
    """A pyarrow input file as a Python raw stream, so it buffers and reads lines like ``open``'s."""

    def __init__(self, f):
        self.f = f

    def readable(self):
        return True

    def readinto(self, b):
        data = self.f.read(len(b))
        b[: len(data)] = data
        return len(data)

    def seekable(self):
        return self.f.seekable()

    def seek(self, pos, whence=0):
        return self.f.seek(pos, whence)

    def tell(self):
        return self.f.tell()

    def close(self):
        self.f.close()
        super().close()


def _open(path: str, fs: pafs.FileSystem | None):
    """A buffered binary stream (``readline``, iteration, ``seek``) on a local or object-store file."""
    if fs is None:
        return open(path, "rb")
    return io.BufferedReader(_Raw(fs.open_input_file(path)), 1 << 20)


def file_fingerprint(path: str, fs: pafs.FileSystem | None) -> dict:
    if fs is None:
        st = os.stat(path)
        return {"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    info = fs.get_file_info(path)
    return {"path": path, "size": info.size, "mtime_ns": info.mtime_ns}


def approx_rows(path: str, fmt: str, fs: pafs.FileSystem | None = None) -> int:
    """Cheap row estimate used to size shards: parquet metadata, else a newline count (of the
    decompressed stream for ``.gz``)."""
    if fmt == "parquet":
        return _parquet_rows(path, fs)
    n = 0
    with _open_text_stream(path, fs) as f:
        while chunk := f.read(1 << 24):
            n += chunk.count(b"\n")
    return n


def auto_rows_per_shard(total_rows: int, num_actors: int, low: int = 1024, high: int = 50_000) -> int:
    """One shard per actor for small inputs, ``high``-row shards for large ones.

    Each shard is length-sorted on its own, so smaller shards pad more (on msmarco-subset at batch
    64: 1.8% padding for one sort over 5000 rows, 3.6% at 2500-row shards, 6.9% at 1250, 32% at
    256). ``high`` bounds what a retry redoes and what an actor holds in memory.
    """
    return int(min(high, max(low, -(-total_rows // max(1, num_actors)))))


def plan_file(path: str, fmt: str, rows_per_shard: int, fs: pafs.FileSystem | None = None) -> list[dict]:
    """Shard boundaries of one file, as dicts (``Shard`` fields without ``index``).

    Parquet from its metadata; jsonl and csv from one streamed pass over the records, remembering
    where each shard starts (byte offset and line; for ``.gz``, whose stream cannot seek, the line).
    """
    if fmt == "parquet":
        n = _parquet_rows(path, fs)
        return [{"file": path, "format": fmt, "start": s, "rows": min(rows_per_shard, n - s)}
                for s in range(0, n, rows_per_shard)]
    gz = path.endswith(".gz")
    shards, current = [], None
    with _open_text_stream(path, fs) as f:
        records = _records(f, fmt == "csv")
        if fmt == "csv":
            next(records, None)  # the header
        for n, (offset, line_no, _) in enumerate(records):
            if n % rows_per_shard == 0:
                current = {"file": path, "format": fmt, "start": n, "rows": 0, "offset": None if gz else offset,
                           "first_line": line_no}
                shards.append(current)
            current["rows"] += 1
    return shards


def _open_text_stream(path: str, fs):
    """A binary stream of the file's bytes, decompressed for ``.gz``."""
    f = _open(path, fs)
    if path.endswith(".gz"):
        import gzip

        return gzip.GzipFile(fileobj=f, mode="rb")
    return f


def _records(f, csv: bool):
    """``(byte offset, first line number, bytes)`` of every non-blank record from ``f``'s position.

    jsonl: one record per line. csv: a record ends at a line end outside double quotes (RFC 4180
    quoting, where an escaped quote is two quotes, so quote parity decides), so quoted newlines stay
    inside their record.
    """
    offset, line_no = f.tell() if hasattr(f, "tell") else 0, 0
    pending, pending_offset, pending_line, in_quotes = [], 0, 0, False
    for line in f:
        line_no += 1
        if not pending:
            pending_offset, pending_line = offset, line_no
        offset += len(line)
        if csv:
            pending.append(line)
            if line.count(b'"') % 2:
                in_quotes = not in_quotes
            if in_quotes:
                continue
            record, pending = b"".join(pending), []
        else:
            record = line
        if record.strip():
            yield pending_offset, pending_line, record
    if pending and b"".join(pending).strip():
        yield pending_offset, pending_line, b"".join(pending)


def _parquet_rows(path: str, fs) -> int:
    import pyarrow.parquet as pq

    with _open(path, fs) as f:
        return pq.ParquetFile(f).metadata.num_rows


def _shard_records(shard: Shard, fs):
    """The shard's records as ``(line number, bytes)``, and the csv header record (or None)."""
    header = None
    if shard.format == "csv":
        with _open_text_stream(shard.file, fs) as f:
            first = next(_records(f, True), None)
        header = first[2] if first else b""
    with _open_text_stream(shard.file, fs) as f:
        if shard.offset is not None:
            f.seek(shard.offset)
        else:  # a .gz stream cannot seek: read forward to the shard's first line
            for _ in range(shard.first_line - 1):
                if not f.readline():
                    break
        out = []
        for _, line_no, record in _records(f, shard.format == "csv"):
            if len(out) == shard.rows:
                break
            out.append((shard.first_line - 1 + line_no, record))
    if len(out) < shard.rows:
        raise BadRecordError(f"{shard.file}: ended after {len(out)} of the shard's {shard.rows} rows from line "
                             f"{shard.first_line}; did the file change since planning?")
    return out, header


def _read_csv_shard(shard: Shard, fs) -> pa.Table:
    """Header + the shard's records, parsed by pyarrow's csv reader; rows must match the plan."""
    import pyarrow.csv as pacsv

    records, header = _shard_records(shard, fs)
    delim = "\t" if shard.file.lower().removesuffix(".gz").endswith(".tsv") else ","
    body = header + b"".join(r if r.endswith(b"\n") else r + b"\n" for _, r in records)
    # Every column as text: type inference would turn id 007 into 7.
    names = next(csv.reader([header.decode("utf-8", "replace")], delimiter=delim), [])
    try:
        table = pacsv.read_csv(io.BytesIO(body), parse_options=pacsv.ParseOptions(delimiter=delim),
                               convert_options=pacsv.ConvertOptions(strings_can_be_null=False,
                                                                    column_types={n: pa.string() for n in names}))
    except pa.ArrowInvalid as exc:
        lines = f"{records[0][0]}-{records[-1][0]}" if records else "?"
        raise BadRecordError(f"{shard.file}: lines {lines}: malformed CSV ({exc})") from None
    if table.num_rows != shard.rows:
        raise BadRecordError(f"{shard.file}: lines {records[0][0]}-{records[-1][0]} hold {table.num_rows} CSV rows, "
                             f"planned {shard.rows}")
    return table


def _parse_json(line: bytes, path: str, line_no: int) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise BadRecordError(f"{path}:{line_no}: malformed JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(row, dict):
        raise BadRecordError(f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}")
    return row


def read_shard(
    shard: Shard,
    id_field: str | None,
    text_fields: tuple[str, ...] | None,
    fs: pafs.FileSystem | None = None,
    skip_bad: bool = False,
    id_kind: dict | None = None,
) -> tuple[pa.Table, list[str]]:
    """The shard's ``{id, text}`` rows and, with ``skip_bad``, where each skipped bad record was.
    ``id_kind`` (:func:`first_id_kind`): the job's kind of id; a row of another kind is a bad record."""
    if shard.format == "json":
        return _read_jsonl_shard(shard, id_field, text_fields, fs, skip_bad, id_kind)
    if shard.format == "parquet":
        table, idf, tf = _read_parquet_rows(shard, id_field, text_fields, fs)
        t = table.schema.field(idf).type
        kind = INTEGER if pa.types.is_integer(t) else STRING
        if id_kind is not None and kind != id_kind["kind"]:
            # One type per parquet column: the whole file disagrees, not a row.
            raise BadRecordError(f"{shard.file}: id column {idf!r} is {t} ({kind}s) but this job's ids are "
                                 f"{id_kind['kind']}s (as at {id_kind['at']}): 1 and \"1\" would be the same id")
    else:
        table = _read_csv_shard(shard, fs)
        idf, tf = pick_fields(table.column_names, id_field, text_fields, shard.file)
    ids, texts, bad = [], [], []
    for k, (i, row) in enumerate(zip(table[idf].to_pylist(), table.select(list(tf)).to_pylist(), strict=True)):
        where = f"{shard.file}: row {shard.start + k + 1}"
        problem = _check(i, row, idf, tf)
        if problem:
            if not skip_bad:
                raise BadRecordError(f"{where}: {problem}")
            bad.append(f"{where}: {problem}")
            continue
        ids.append(str(i))
        texts.append(row)
    return _rows_table(ids, texts, tf), bad


def _read_parquet_rows(shard: Shard, id_field, text_fields, fs):
    """The shard's rows of the needed columns, from the row groups that hold them only."""
    import pyarrow.parquet as pq

    with _open(shard.file, fs) as f:
        pf = pq.ParquetFile(f)
        idf, tf = pick_fields(pf.schema_arrow.names, id_field, text_fields, shard.file)
        groups, first, row = [], None, 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if row + n > shard.start and row < shard.start + shard.rows:
                groups.append(g)
                first = row if first is None else first
            row += n
        columns = list(dict.fromkeys([idf, *tf]))
        if not groups:
            return pa.table({c: pa.array([], pa.string()) for c in columns}), idf, tf
        table = pf.read_row_groups(groups, columns=columns)
    return table.slice(shard.start - first, shard.rows), idf, tf


def _read_jsonl_shard(shard, id_field, text_fields, fs, skip_bad, id_kind=None):
    ids, rows, bad = [], [], []
    idf = tf = None
    records, _ = _shard_records(shard, fs)
    for line_no, line in records:
        where = f"{shard.file}:{line_no}"
        try:
            row = _parse_json(line, shard.file, line_no)
            if idf is None:
                idf, tf = pick_fields(list(row), id_field, text_fields, where)
                if text_fields is None and tf == ("text",):
                    tf = ("title", "text")  # BEIR: rows may have a title where this first one has none
            problem = _check(row.get(idf), row, idf, tf) or _id_kind_problem(row.get(idf), idf, id_kind)
        except (BadRecordError, ValueError) as exc:
            problem = str(exc).removeprefix(f"{where}: ")
            row = None
        if problem:
            if not skip_bad:
                raise BadRecordError(f"{where}: {problem}")
            bad.append(f"{where}: {problem}")
            continue
        ids.append(str(row[idf]))
        rows.append({k: row.get(k) for k in tf})
    return _rows_table(ids, rows, tf or ("text",)), bad


def _check(id_value, row: dict, idf: str, tf: tuple[str, ...]) -> str | None:
    if id_value is None or (isinstance(id_value, str) and not id_value.strip()):
        return f"missing id field {idf!r}"
    if isinstance(id_value, (dict, list, float)):
        return f"id field {idf!r} must be a string or integer, got {type(id_value).__name__}"
    present = [f for f in tf if row.get(f) is not None]
    if not present:
        return f"missing text field(s) {list(tf)}"
    for f in present:
        if not isinstance(row[f], str):
            return f"text field {f!r} must be a string, got {type(row[f]).__name__}"
    return None


def _rows_table(ids: list[str], rows: list[dict], tf: tuple[str, ...]) -> pa.Table:
    cols = {f: pa.array([r.get(f) for r in rows], pa.string()) for f in tf}
    text = join_text(pa.table(cols), tf) if rows else pa.array([], pa.string())
    return pa.table({"id": pa.array(ids, pa.string()), "text": text})


def plan_digest(plan: dict) -> str:
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]
