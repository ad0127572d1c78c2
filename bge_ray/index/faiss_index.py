"""Faiss indexes over inner product (cosine for normalised vectors), GPU when faiss-gpu is present."""

from __future__ import annotations

import logging
import math

import numpy as np

from bge_ray.io.atomic import atomic_path

logger = logging.getLogger(__name__)

INDEX_KINDS = ("flat", "ivf", "hnsw", "ivfpq")


def _faiss():
    import faiss

    return faiss


def gpu_available() -> bool:
    faiss = _faiss()
    return hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


def build_index(emb: np.ndarray, kind: str = "flat", nlist: int | None = None, hnsw_m: int = 32, pq_m: int = 16):
    """An inner-product index holding ``emb`` (row i gets faiss id i)."""
    faiss = _faiss()
    if kind not in INDEX_KINDS:
        raise ValueError(f"index kind must be one of {INDEX_KINDS}, got {kind!r}")
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    n, dim = emb.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
    else:
        # sqrt(n) lists is the usual starting point; faiss wants ~39 training points per list.
        nlist = nlist or max(1, min(int(4 * math.sqrt(n)), n // 39 or 1))
        quantizer = faiss.IndexFlatIP(dim)
        if kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            if dim % pq_m:
                raise ValueError(f"ivfpq needs dim ({dim}) divisible by pq_m ({pq_m})")
            index = faiss.IndexIVFPQ(quantizer, dim, nlist, pq_m, 8, faiss.METRIC_INNER_PRODUCT)
        index.train(emb)
        index.nprobe = min(nlist, 16)
    index.add(emb)
    return index


def save_index(index, path: str) -> None:
    faiss = _faiss()
    if hasattr(faiss, "index_gpu_to_cpu") and "Gpu" in type(index).__name__:
        index = faiss.index_gpu_to_cpu(index)
    with atomic_path(path) as tmp:
        faiss.write_index(index, tmp)


def store_index(store, index, rel: str) -> None:
    """Write ``index`` to ``rel`` of a :class:`bge_ray.io.store.Store` (local or object store)."""
    import os
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bge_ray_index_") as d:
        save_index(index, os.path.join(d, "index.faiss"))
        store.upload(os.path.join(d, "index.faiss"), rel)


def load_index(path: str, use_gpu: bool | None = None):
    faiss = _faiss()
    index = faiss.read_index(path)
    if (use_gpu is None and gpu_available()) or use_gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    return index


def search(index, queries: np.ndarray, top_k: int, chunk_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Top-k scores and row ids, in query chunks so memory never holds a full query x corpus matrix."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    top_k = min(top_k, index.ntotal)
    scores = np.empty((len(queries), top_k), dtype=np.float32)
    ids = np.empty((len(queries), top_k), dtype=np.int64)
    for start in range(0, len(queries), chunk_size):
        s, i = index.search(queries[start : start + chunk_size], top_k)
        scores[start : start + chunk_size], ids[start : start + chunk_size] = s, i
    return scores, ids
