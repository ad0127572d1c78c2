"""IVF indexes built by the cluster: trained on a sample, filled per group of shards by Ray tasks,
searched part by part (locally or by searcher actors) with the merged index's very answer."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from bge_ray.batch.embed import run_embed_job
from bge_ray.index.faiss_index import build_index
from bge_ray.index.sharded import (
    INDEX_DIR,
    ClusterIndex,
    ShardedIndex,
    auto_kind,
    build_ivf_index,
    open_index,
    plan_parts,
)
from bge_ray.io.readers import CorpusSpec
from bge_ray.io.shards import embedding_array
from bge_ray.io.store import Store
from bge_ray.models.spec import EmbedderSpec

pytestmark = [pytest.mark.ray]
DIM, ROWS, SHARD = 32, 4000, 500


def _clustered(n, seed):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(40, DIM))
    x = centers[rng.integers(0, 40, n)] + 0.3 * rng.normal(size=(n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _write_shards(store: Store, x: np.ndarray, per: int) -> list[dict]:
    """An embed job's shard layout over ``x``: shards of ``per`` rows, ids doc-<row>."""
    files = []
    for k, s in enumerate(range(0, len(x), per)):
        f = f"shards/part-{k:05d}.parquet"
        ids = pa.array([f"doc-{i}" for i in range(s, s + per)], pa.string())
        store.write_parquet(f, pa.table({"id": ids, "embedding": embedding_array(x[s : s + per])}))
        files.append({"file": f, "rows": per})
    return files


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """8 shards of 500 rows."""
    store = Store(str(tmp_path_factory.mktemp("ivf") / "out"))
    x = _clustered(ROWS, 0)
    return store, _write_shards(store, x, SHARD), x


def test_plan_parts_groups_whole_shards_in_row_order():
    shards = [{"file": f"s{i}", "rows": r} for i, r in enumerate([5, 5, 5, 12, 1])]
    parts = plan_parts(shards, per_vector=4, part_bytes=40)  # 10 rows per part
    assert [p["files"] for p in parts] == [["s0", "s1"], ["s2"], ["s3"], ["s4"]]
    assert [p["offset"] for p in parts] == [0, 10, 15, 27]
    assert auto_kind(10) == "flat" and auto_kind(5_000_000) == "ivf" and auto_kind(50_000_000) == "ivfpq"


@pytest.mark.parametrize("kind", ["ivf", "ivfpq"])
def test_parts_searched_one_by_one_or_by_actors_give_the_merged_answer(kind, shards, ray_local):
    store, files, x = shards
    store.delete(INDEX_DIR)
    # Parts of 1200 rows: 3 parts of whole shards (1000, 1000, ... rows).
    meta = build_ivf_index(store, kind, files, DIM, part_bytes=1200 * (4 * DIM if kind == "ivf" else 16), pq_m=16)
    assert len(meta["parts"]) == 4 and meta["file"] == "index.faiss"
    assert store.read_json(f"{INDEX_DIR}/index.json")["parts"] == meta["parts"]
    ids, merged = open_index(store)
    assert ids == [f"doc-{i}" for i in range(ROWS)] and merged.ntotal == ROWS
    sharded = ShardedIndex(store)
    assert sharded.ids() == ids
    q = _clustered(50, 1)
    ms, mr = merged.search(q, 10)
    ss, sr = sharded.search(q, 10)
    np.testing.assert_array_equal(sr, mr)
    np.testing.assert_allclose(ss, ms, rtol=1e-6, atol=1e-6)
    for prefer_merged in (False, True):  # parts spread over 2 actors, or the merged index on both
        cluster = ClusterIndex(store, num_searchers=2, prefer_merged=prefer_merged)
        try:
            assert cluster.replicated == prefer_merged
            cs, cr = cluster.search(q, 10)
            np.testing.assert_array_equal(cr, mr)
            # Stored vectors by global row, from whichever actor holds them (PQ: decoded codes).
            rows = np.array([0, 1999, 3999, 1000])
            got = cluster.vectors(rows)
            np.testing.assert_allclose(got, x[rows], atol=1e-6 if kind == "ivf" else 0.5)
            if kind == "ivf":
                continue
            assert np.mean(np.sum(got * x[rows], axis=1)) > 0.8
        finally:
            cluster.close()
    # Approximate, but close to exact search on clustered data.
    _, exact = build_index(x, "flat").search(q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(sr, exact, strict=True)])
    assert recall >= (0.9 if kind == "ivf" else 0.5), recall


def test_without_room_for_a_merged_index_the_parts_serve_alone(shards, ray_local):
    store, files, _ = shards
    store.delete(INDEX_DIR)
    for name in ("index.faiss", "ids.parquet"):
        store.delete(name)
    meta = build_ivf_index(store, "ivf", files, DIM, merge_max_bytes=0)
    assert meta["file"] is None and not store.exists("index.faiss")
    ids, index = open_index(store)
    assert isinstance(index, ShardedIndex) and len(ids) == ROWS == index.ntotal


def test_embed_job_on_s3_writes_ivf_parts_equal_to_exact_search(s3_server, ray_local, sample_corpus):
    """60 rows: one IVF list, so the IVF answer must equal exact search."""
    s3_server.create_bucket(Bucket="ivf")
    spec = EmbedderSpec(max_length=32, batch_size=16)
    res = run_embed_job(CorpusSpec(str(sample_corpus)), "s3://ivf/job", spec, rows_per_shard=10, index_kind="ivf")
    meta = res.manifest["index"]
    assert meta["kind"] == "ivf" and meta["ntotal"] == 60 and meta["nlist"] == 1
    store = Store("s3://ivf/job")
    for p in meta["parts"]:
        assert store.exists(p["file"]) and store.exists(p["ids"])
    ids, index = open_index("s3://ivf/job")
    shard_tables = [store.read_parquet(s["file"]) for s in res.manifest["shards"]]
    emb = np.concatenate([np.stack(t["embedding"].to_numpy(zero_copy_only=False)) for t in shard_tables])
    assert ids == [i for t in shard_tables for i in t["id"].to_pylist()]
    _, exact = build_index(emb, "flat").search(emb[:5], 5)
    _, got = index.search(emb[:5], 5)
    np.testing.assert_array_equal(got, exact)


def test_many_lists_use_an_hnsw_quantizer_with_the_same_merged_answer(tmp_path, ray_local):
    """From 1024 lists the coarse quantizer is an HNSW graph (list assignment ~log nlist, not nlist)."""
    import faiss

    n, per = 40_960, 10_240
    store = Store(str(tmp_path / "out"))
    x = _clustered(n, 2)
    files = _write_shards(store, x, per)
    meta = build_ivf_index(store, "ivf", files, DIM, nlist=1024, nprobe=32, part_bytes=2 * per * 4 * DIM)
    assert meta["quantizer"] == "hnsw" and len(meta["parts"]) == 2 and meta["file"] == "index.faiss"
    _, merged = open_index(store)
    assert isinstance(faiss.downcast_index(merged.quantizer), faiss.IndexHNSWFlat)
    q = _clustered(50, 3)
    ms, mr = merged.search(q, 10)
    ss, sr = ShardedIndex(store).search(q, 10)
    np.testing.assert_array_equal(sr, mr)
    _, exact = build_index(x, "flat").search(q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(sr, exact, strict=True)])
    assert recall >= 0.8, recall
