"""Parquet shards of embeddings: ``id`` (string), ``embedding`` (fixed_size_list<float32>[dim]) and,
for BGE-M3 jobs, ``sparse`` (map<int32, float32>: token id -> weight, FlagEmbedding's lexical weights)
and ``colbert`` (list<fixed_size_list<float32>[dim]>: one vector per token after the first)."""

from __future__ import annotations

import glob
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def embedding_array(emb: np.ndarray) -> pa.FixedSizeListArray:
    """[n, dim] float array -> Arrow fixed_size_list<float32>[dim] (zero-copy for float32)."""
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1])


def to_numpy(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """fixed_size_list<float32>[dim] column -> [n, dim] float32 array."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    dim = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, dim)


def sparse_array(rows) -> pa.MapArray:
    """Per row ``(token ids, weights)`` -> Arrow map<int32, float32>, keys in the given order."""
    counts = np.fromiter((len(ids) for ids, _ in rows), dtype=np.int64, count=len(rows))
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum(counts, out=offsets[1:])
    keys = np.concatenate([np.asarray(ids, np.int32) for ids, _ in rows]) if len(rows) else np.zeros(0, np.int32)
    vals = np.concatenate([np.asarray(w, np.float32) for _, w in rows]) if len(rows) else np.zeros(0, np.float32)
    return pa.MapArray.from_arrays(pa.array(offsets), pa.array(keys, pa.int32()), pa.array(vals, pa.float32()))


def sparse_rows(column: pa.ChunkedArray | pa.Array) -> list[tuple[np.ndarray, np.ndarray]]:
    """map<int32, float32> column -> per row ``(ids int64, weights float32)`` arrays."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    offsets = column.offsets.to_numpy()
    # .keys / .items are the whole child arrays (slicing not applied) and the offsets index into them.
    keys = column.keys.to_numpy().astype(np.int64)
    vals = column.items.to_numpy().astype(np.float32)
    return [(keys[a:b], vals[a:b]) for a, b in zip(offsets[:-1], offsets[1:], strict=True)]


def colbert_array(rows: list[np.ndarray], dim: int) -> pa.ListArray:
    """Per row a float32 [n_tokens, dim] array -> Arrow list<fixed_size_list<float32>[dim]>."""
    counts = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum(counts, out=offsets[1:])
    flat = np.concatenate([np.asarray(r, np.float32).reshape(-1, dim) for r in rows]) if len(rows) else np.zeros((0, dim), np.float32)
    return pa.ListArray.from_arrays(pa.array(offsets), embedding_array(flat))


def colbert_rows(column: pa.ChunkedArray | pa.Array) -> list[np.ndarray]:
    """list<fixed_size_list<float32>[dim]> column -> per row float32 [n_tokens, dim] arrays."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    offsets = column.offsets.to_numpy()
    flat = to_numpy(column.flatten())
    base = offsets[0]
    return [flat[a - base : b - base] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]


def shard_files(folder: str) -> list[str]:
    return sorted(glob.glob(os.path.join(folder, "*.parquet")))


def read_embeddings(folder: str, columns=("id", "embedding")) -> tuple[list[str], np.ndarray]:
    """All ids and vectors of a shard folder, in shard-name order."""
    files = shard_files(folder)
    if not files:
        raise FileNotFoundError(f"{folder} holds no parquet shards")
    tables = [pq.read_table(f, columns=list(columns)) for f in files]
    ids = [i for t in tables for i in t["id"].to_pylist()]
    emb = np.concatenate([to_numpy(t["embedding"]) for t in tables]) if tables else np.zeros((0, 0), np.float32)
    return ids, emb
