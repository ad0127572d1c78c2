"""Parquet shards of embeddings: ``id`` (string) + ``embedding`` (fixed_size_list<float32>)."""

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
