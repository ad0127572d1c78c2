"""Indexes built by the cluster: an IVF (flat or PQ) index trained on a sample of the shards, then
filled by Ray tasks, one index part per group of shards, written beside its id mapping.

Layout under the job's output::

    index/trained.faiss          the empty trained index (coarse quantizer, PQ codebooks)
    index/part-NNNNN.faiss       rows [offset, offset + rows) of the shard order, faiss ids = row numbers
    index/part-NNNNN.ids.parquet the ``id`` of each of those rows
    index/index.json             written last: kind, parts, nprobe, merged file if any
    index.faiss + ids.parquet    the merged index, when it fits ``merge_max_bytes``

All parts share one quantizer, so searching every part with the same ``nprobe`` and keeping the best
``k`` gives exactly the merged index's answer (:func:`merge_topk`).
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import pyarrow as pa

from bge_ray.io.store import Store

from .faiss_index import store_index

logger = logging.getLogger(__name__)

INDEX_DIR = "index"
#: ``--index auto``: exact flat search up to this many rows, IVF-flat up to IVF_MAX_ROWS, IVF-PQ above.
FLAT_MAX_ROWS = 1_000_000
IVF_MAX_ROWS = 10_000_000
#: Largest index part (bytes of stored vectors or codes) one fill task builds and one searcher loads.
PART_BYTES = 1 << 30
#: The merged ``index.faiss`` is written when the whole index is at most this big.
MERGE_MAX_BYTES = 4 << 30
#: Upper bound on IVF lists: k-means cost grows with lists x training rows.
MAX_NLIST = 16384
#: From this many lists the coarse quantizer is an HNSW graph over the centroids, so assigning a vector
#: to its list costs about log(nlist) rather than nlist (flat): fill time per row stays flat as the
#: corpus (and with it nlist ~ sqrt(rows)) grows.
HNSW_QUANTIZER_MIN_NLIST = 1024
FILL_EF_SEARCH = 16
#: Parts are at least this big (bytes of vectors or codes) when they are split to keep every CPU busy.
MIN_PART_BYTES = 64 << 20


def auto_kind(rows: int) -> str:
    return "flat" if rows <= FLAT_MAX_ROWS else "ivf" if rows <= IVF_MAX_ROWS else "ivfpq"


def default_nlist(rows: int) -> int:
    """About 4 sqrt(n) lists, at least 39 training rows per list (faiss's minimum), at most MAX_NLIST."""
    return max(1, min(int(4 * math.sqrt(rows)), rows // 39 or 1, MAX_NLIST))


def default_pq_m(dim: int) -> int:
    """Sub-quantizers for IVF-PQ: the most of 64, 48, 32, ... that divide ``dim`` (8 bits each)."""
    return next(m for m in (64, 48, 32, 24, 16, 12, 8, 4, 2, 1) if dim % m == 0)


def bytes_per_vector(kind: str, dim: int, pq_m: int) -> int:
    return pq_m if kind == "ivfpq" else 4 * dim


def plan_parts(shards: list[dict], per_vector: int, part_bytes: int = PART_BYTES) -> list[dict]:
    """Group consecutive shards into parts of at most ``part_bytes`` (a shard is never split)."""
    parts, cur, offset = [], None, 0
    cap = max(1, part_bytes // max(1, per_vector))
    for s in shards:
        if cur is None or (cur["rows"] + s["rows"] > cap and cur["rows"]):
            cur = {"part": len(parts), "files": [], "offset": offset, "rows": 0}
            parts.append(cur)
        cur["files"].append(s["file"])
        cur["rows"] += s["rows"]
        offset += s["rows"]
    return parts


def part_names(part: int) -> tuple[str, str]:
    return f"{INDEX_DIR}/part-{part:05d}.faiss", f"{INDEX_DIR}/part-{part:05d}.ids.parquet"


# -- tasks --------------------------------------------------------------------------------------------
def _embeddings(store: Store, file: str, with_ids: bool = True) -> tuple[pa.Array | None, np.ndarray]:
    from bge_ray.io.shards import to_numpy

    t = store.read_parquet(file, columns=["id", "embedding"] if with_ids else ["embedding"])
    ids = t["id"] if with_ids else None
    return ids, np.ascontiguousarray(to_numpy(t["embedding"]), dtype=np.float32)


def sample_shard(store: Store, file: str, k: int, seed: int) -> np.ndarray:
    """``k`` rows of one shard, drawn without replacement (seeded by the shard's name)."""
    _, emb = _embeddings(store, file, with_ids=False)
    rng = np.random.default_rng([seed, int.from_bytes(file.encode()[-8:].rjust(8, b"\0"), "little")])
    return emb[np.sort(rng.choice(len(emb), size=min(k, len(emb)), replace=False))]


def quantizer_kind(nlist: int) -> str:
    return "hnsw" if nlist >= HNSW_QUANTIZER_MIN_NLIST else "flat"


def set_search_params(index, nprobe: int | None) -> None:
    """``nprobe`` lists per query; an HNSW coarse quantizer searches wide enough to find them."""
    import faiss

    if nprobe is None or not isinstance(faiss.downcast_index(index), faiss.IndexIVF):
        return
    index.nprobe = nprobe
    quantizer = faiss.downcast_index(index.quantizer)
    if isinstance(quantizer, faiss.IndexHNSW):
        quantizer.hnsw.efSearch = max(64, 4 * nprobe)


def train_index(kind: str, nlist: int, pq_m: int, threads: int, *sample: np.ndarray) -> tuple[np.ndarray, int]:
    """Ray task: the trained empty index, serialised (a uint8 array, cheap in the object store), and
    the number of training rows."""
    import faiss

    faiss.omp_set_num_threads(threads)
    x = np.concatenate(sample)
    dim = x.shape[1]
    hnsw = quantizer_kind(nlist) == "hnsw"
    quantizer = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT) if hnsw else faiss.IndexFlatIP(dim)
    if kind == "ivf":
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    else:
        index = faiss.IndexIVFPQ(quantizer, dim, nlist, pq_m, 8, faiss.METRIC_INNER_PRODUCT)
    clustering = faiss.IndexFlatIP(dim)  # kept alive here: faiss holds only a pointer
    if hnsw:
        # Filling assigns each vector to its one nearest list: a short graph search is enough
        # (searches widen it, :func:`set_search_params`). k-means stays exact (BLAS over the sample).
        quantizer.hnsw.efSearch = FILL_EF_SEARCH
        index.clustering_index = clustering
    index.train(x)
    return faiss.serialize_index(index), len(x)


def fill_part(store: Store, trained: np.ndarray, part: dict) -> dict:
    """Ray task: add one part's shards to a copy of the trained index; write the part and its ids."""
    import faiss

    faiss.omp_set_num_threads(1)
    t0 = time.perf_counter()
    index = faiss.deserialize_index(trained)
    ids, offset = [], part["offset"]
    for f in part["files"]:
        shard_ids, emb = _embeddings(store, f)
        index.add_with_ids(emb, np.arange(offset, offset + len(emb), dtype=np.int64))
        offset += len(emb)
        ids.append(shard_ids)
    if offset - part["offset"] != part["rows"]:
        raise RuntimeError(f"index part {part['part']}: shards hold {offset - part['offset']} rows, the manifest "
                           f"says {part['rows']}")
    index_file, ids_file = part_names(part["part"])
    store_index(store, index, index_file)
    store.write_parquet(ids_file, pa.table({"id": pa.chunked_array(ids, pa.string())}))
    return {"part": part["part"], "file": index_file, "ids": ids_file, "offset": part["offset"],
            "rows": part["rows"], "seconds": round(time.perf_counter() - t0, 3)}


def merge_parts(store: Store, trained: np.ndarray, parts: list[dict]) -> None:
    """Ray task: ``index.faiss`` + ``ids.parquet`` from the parts (only called when they fit)."""
    import faiss

    merged = faiss.deserialize_index(trained)
    for p in parts:
        with store.local_copy(p["file"]) as f:
            merged.merge_from(faiss.read_index(f), 0)
    store_index(store, merged, "index.faiss")
    ids = [store.read_parquet(p["ids"], columns=["id"])["id"] for p in parts]
    store.write_parquet("ids.parquet", pa.table({"id": pa.chunked_array([c for a in ids for c in a.chunks],
                                                                       pa.string())}))


def build_ivf_index(store: Store, kind: str, shards: list[dict], dim: int, nlist: int | None = None,
                    pq_m: int | None = None, nprobe: int | None = None, train_rows: int | None = None,
                    part_bytes: int = PART_BYTES, merge_max_bytes: int = MERGE_MAX_BYTES, task_cpus: float = 1.0,
                    seed: int = 0) -> dict:
    """Train on a sample (rows drawn from up to 256 evenly spread shards), fill parts in Ray tasks,
    merge when small enough, write ``index/index.json`` last. ``shards``: the manifest's
    ``[{"file", "rows"}]`` in row order. Returns the index description (also in the manifest)."""
    import ray

    if kind not in ("ivf", "ivfpq"):
        raise ValueError(f"sharded index kind must be ivf or ivfpq, got {kind!r}")
    t0 = time.perf_counter()
    rows = sum(s["rows"] for s in shards)
    nlist = nlist or default_nlist(rows)
    pq_m = pq_m or default_pq_m(dim)
    if dim % pq_m:
        raise ValueError(f"ivfpq needs dim ({dim}) divisible by pq_m ({pq_m})")
    # faiss warns under 39 rows per centroid; PQ's 256 codes per sub-quantizer need as many.
    want = train_rows or min(rows, max(64 * nlist, 256 * 39 if kind == "ivfpq" else 0))
    picked = [shards[int(i)] for i in np.unique(np.linspace(0, len(shards) - 1, min(len(shards), 256)).astype(int))]
    picked_rows = sum(s["rows"] for s in picked)
    sample_task = ray.remote(num_cpus=task_cpus)(sample_shard)
    refs = [sample_task.remote(store, s["file"], math.ceil(want * s["rows"] / picked_rows), seed)
            for s in picked if s["rows"]]
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    nprobe = nprobe or min(nlist, 16)
    trained, n_train = ray.get(ray.remote(num_cpus=1)(train_index).remote(kind, nlist, pq_m, cpus, *refs))
    t_train = time.perf_counter() - t0
    trained_ref = ray.put(trained)
    store.write_bytes(f"{INDEX_DIR}/trained.faiss", np.asarray(trained).tobytes())
    per_vector = bytes_per_vector(kind, dim, pq_m)
    # Split into at least as many parts as the cluster has CPUs (fill tasks run one thread each), but
    # no smaller than MIN_PART_BYTES: each part costs a search one more quantizer lookup.
    total = rows * per_vector
    parts = plan_parts(shards, per_vector, min(part_bytes, max(MIN_PART_BYTES, -(-total // cpus))))
    fill = ray.remote(num_cpus=task_cpus)(fill_part)
    done = ray.get([fill.remote(store, trained_ref, p) for p in parts])
    merged = rows * per_vector <= merge_max_bytes
    if merged:
        ray.get(ray.remote(num_cpus=task_cpus)(merge_parts).remote(store, trained_ref, done))
    meta = {"kind": kind, "layout": "sharded", "dim": dim, "ntotal": rows, "nlist": nlist,
            "pq_m": pq_m if kind == "ivfpq" else None, "nprobe": nprobe, "quantizer": quantizer_kind(nlist),
            "train_rows": n_train,
            "trained": f"{INDEX_DIR}/trained.faiss", "parts": done,
            "file": "index.faiss" if merged else None, "ids": "ids.parquet" if merged else None,
            "train_seconds": round(t_train, 3), "fill_seconds": round(sum(p["seconds"] for p in done), 3)}
    store.write_json(f"{INDEX_DIR}/index.json", meta)
    logger.info("%s index: %d rows, %d lists, %d parts%s, trained on %s rows in %.1f s", kind, rows, nlist,
                len(done), " + merged index.faiss" if merged else "", meta["train_rows"], t_train)
    return meta


# -- search -------------------------------------------------------------------------------------------
def merge_topk(answers: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` per query over several parts' ``(scores, rows)``; faiss's ``-1`` fillers sort last."""
    scores = np.concatenate([a[0] for a in answers], axis=1)
    rows = np.concatenate([a[1] for a in answers], axis=1)
    scores = np.where(rows < 0, -np.inf, scores)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    top_s, top_r = np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)
    return np.where(top_r < 0, -np.finfo(np.float32).max, top_s).astype(np.float32), top_r


def index_layout(store: Store, prefer_merged: bool = True) -> tuple[dict, list[dict], bool]:
    """``(meta, parts, merged)`` of an embed job's index. ``merged``: one file holds the whole index
    (a flat / HNSW index, or the merged IVF index, unless ``prefer_merged`` is off), as one part."""
    meta = store.read_json(f"{INDEX_DIR}/index.json") if store.exists(f"{INDEX_DIR}/index.json") else None
    if (prefer_merged or meta is None) and store.exists("index.faiss") and store.exists("ids.parquet"):
        if meta is None:
            manifest = store.read_json("manifest.json") if store.exists("manifest.json") else {}
            about = manifest.get("index") or {}
            meta = {"kind": about.get("kind", "flat"), "dim": manifest.get("dim"), "nprobe": None, "pq_m": None,
                    "ntotal": about.get("ntotal", manifest.get("rows"))}
        whole = {"part": 0, "file": "index.faiss", "ids": "ids.parquet", "offset": 0, "rows": meta["ntotal"]}
        return meta, [whole], True
    if meta is None:
        raise FileNotFoundError(f"{store.url()} holds no index (index.faiss or {INDEX_DIR}/index.json)")
    return meta, meta["parts"], False


class ShardedIndex:
    """The parts of a sharded index behind faiss's ``search`` / ``ntotal`` / ``d`` (rows are global row
    numbers, as in the merged index). Parts are loaded once and kept when they fit ``max_bytes``,
    else read again for each search call (memory: one part)."""

    def __init__(self, store: Store, meta: dict | None = None, parts: list[dict] | None = None,
                 max_bytes: int = MERGE_MAX_BYTES):
        self.store = store
        self.meta = meta or store.read_json(f"{INDEX_DIR}/index.json")
        self.parts = self.meta["parts"] if parts is None else parts
        self.ntotal = sum(p["rows"] for p in self.parts)
        self.d = self.meta["dim"]
        self.nprobe = self.meta.get("nprobe")
        per = bytes_per_vector(self.meta["kind"], self.d or 1, self.meta.get("pq_m") or 1)
        self._cache = {} if self.ntotal * per <= max_bytes else None

    def _part(self, p: dict):
        import faiss

        if self._cache is not None and p["part"] in self._cache:
            return self._cache[p["part"]]
        with self.store.local_copy(p["file"]) as f:
            index = faiss.read_index(f)
        set_search_params(index, self.nprobe)
        if self._cache is not None:
            self._cache[p["part"]] = index
        return index

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        return merge_topk([self._part(p).search(queries, k) for p in self.parts], k)

    def vectors(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(found, vectors)``: which of ``rows`` these parts hold, and their stored vectors (decoded
        codes for IVF-PQ). IVF parts build their id -> list map on first use."""
        import faiss

        rows = np.asarray(rows, dtype=np.int64)
        found = np.zeros(len(rows), dtype=bool)
        out = np.zeros((len(rows), self.d or 0), dtype=np.float32)
        for p in self.parts:
            inside = (rows >= p["offset"]) & (rows < p["offset"] + p["rows"])
            if not inside.any():
                continue
            index = self._part(p)
            if isinstance(faiss.downcast_index(index), faiss.IndexIVF) and index.direct_map.type == 0:
                index.set_direct_map_type(faiss.DirectMap.Hashtable)
            vecs = np.stack([index.reconstruct(int(r)) for r in rows[inside]])
            if out.shape[1] != vecs.shape[1]:
                out = np.zeros((len(rows), vecs.shape[1]), dtype=np.float32)
            out[inside], found[inside] = vecs, True
        return found, out

    def ids(self) -> list[str]:
        return [i for p in self.parts for i in self.store.read_parquet(p["ids"], columns=["id"])["id"].to_pylist()]


class PartSearcher:
    """Ray actor holding some parts of a sharded index (or the whole merged one): one chunk of queries
    in, its parts' top-k out."""

    def __init__(self, store_uri: str, meta: dict, parts: list[dict], threads: int = 1):
        import faiss

        faiss.omp_set_num_threads(threads)
        self.index = ShardedIndex(Store(store_uri), meta=meta, parts=parts, max_bytes=1 << 62)
        for p in parts:
            self.index._part(p)  # load now: the first query chunk should not pay for it

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(queries, k)

    def vectors(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.index.vectors(rows)


class ClusterIndex:
    """An embed job's index searched by the cluster, behind faiss's ``search`` / ``ntotal`` / ``d``.
    Sharded parts are spread over ``num_searchers`` actors, each query chunk goes to all of them and
    their top-k are merged; a merged index is loaded by every searcher and each chunk goes to one.
    :meth:`submit` / :meth:`result` keep several chunks in flight."""

    def __init__(self, store: Store, num_searchers: int | None = None, cpus_per_searcher: float = 1.0,
                 prefer_merged: bool = True):
        import ray

        self.meta, parts, self.replicated = index_layout(store, prefer_merged)
        n = max(1, num_searchers or (1 if self.replicated else len(parts)))
        groups = [parts] * n if self.replicated else [g for g in (parts[i::n] for i in range(n)) if g]
        # A searcher lost with its node comes back (its parts re-read from the store) and the chunks it
        # held are retried: searches are read-only.
        actor = ray.remote(num_cpus=cpus_per_searcher, max_restarts=3, max_task_retries=3)(PartSearcher)
        self.actors = [actor.remote(store.uri, self.meta, g, max(1, int(cpus_per_searcher))) for g in groups]
        self.ntotal, self.d = sum(p["rows"] for p in parts), self.meta["dim"]
        self._turn = 0

    def submit(self, queries: np.ndarray, k: int) -> list:
        import ray

        ref = ray.put(np.ascontiguousarray(queries, dtype=np.float32))
        if self.replicated:
            self._turn += 1
            return [self.actors[self._turn % len(self.actors)].search.remote(ref, k)]
        return [a.search.remote(ref, k) for a in self.actors]

    def result(self, refs: list, k: int) -> tuple[np.ndarray, np.ndarray]:
        import ray

        return merge_topk(ray.get(refs), k)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.result(self.submit(queries, k), k)

    def vectors(self, rows) -> np.ndarray:
        """The stored vectors of global ``rows``."""
        import ray

        rows = np.asarray(rows, dtype=np.int64)
        actors = self.actors[:1] if self.replicated else self.actors
        out = None
        for found, vecs in ray.get([a.vectors.remote(rows) for a in actors]):
            out = vecs if out is None else np.where(found[:, None], vecs, out)
        return out

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []


def open_index(store: Store | str, use_gpu: bool | None = None):
    """``(doc_ids, index)`` of an embed job's output: the merged ``index.faiss`` when there is one,
    else the sharded parts (:class:`ShardedIndex`)."""
    from .faiss_index import load_index

    store = Store(store) if isinstance(store, str) else store
    if store.exists("index.faiss") and store.exists("ids.parquet"):
        ids = store.read_parquet("ids.parquet", columns=["id"])["id"].to_pylist()
        with store.local_copy("index.faiss") as f:
            index = load_index(f, use_gpu)
        if store.exists(f"{INDEX_DIR}/index.json"):
            set_search_params(index, store.read_json(f"{INDEX_DIR}/index.json")["nprobe"])
        return ids, index
    index = ShardedIndex(store)
    return index.ids(), index
