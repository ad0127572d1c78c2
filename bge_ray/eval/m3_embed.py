"""M3 embeddings for evaluation: dense vectors and lexical weights of corpus and queries from one Ray
actor pool, the corpus part cached (``m3.parquet`` + ``meta.json``) for the next run with the model."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bge_ray.batch.embed import EmbedActor
from bge_ray.io.atomic import atomic_path, write_json
from bge_ray.models.spec import EmbedderSpec

logger = logging.getLogger(__name__)

QUERY, PASSAGE = "query", "passage"


def is_m3(spec: EmbedderSpec) -> bool:
    """Whether ``spec`` loads a BGEM3FlagModel (by model_class, registry name or checkpoint files)."""
    from bge_ray.models import registry

    if spec.model_class is not None:
        return registry.class_name_for(spec.model_class) == "BGEM3FlagModel"
    found = registry.lookup(spec.model or "all-MiniLM-L6-v2", registry.EMBEDDER)
    if found is None and spec.model and os.path.isdir(spec.model):
        found = registry.infer_from_checkpoint(spec.model, registry.EMBEDDER)
    return found is not None and found.class_name == "BGEM3FlagModel"


class M3EvalActor(EmbedActor):
    """Ray Data callable class: ``{id, text, role}`` rows -> dense vector + lexical weights per row."""

    def __init__(self, spec: EmbedderSpec, torch_threads: int | None = None, sparse: bool = True):
        super().__init__(spec, torch_threads)
        self.sparse = sparse

    def __call__(self, batch: pa.Table) -> pa.Table:
        from bge_ray.io.shards import embedding_array

        roles = np.asarray(batch["role"].to_pylist())
        ids, dense, tok, wts = [], [], [], []
        for role, encode in ((QUERY, self.model.encode_queries), (PASSAGE, self.model.encode_corpus)):
            rows = np.flatnonzero(roles == role)
            if not len(rows):
                continue
            part = batch.take(pa.array(rows))
            out = encode(part["text"].to_pylist(), batch_size=self.spec.batch_size, return_dense=True,
                         return_sparse=self.sparse, return_colbert_vecs=False)
            ids += part["id"].to_pylist()
            dense.append(np.asarray(out["dense_vecs"], dtype=np.float32))
            for lw in out["lexical_weights"] or [{}] * len(rows):
                tok.append([int(k) for k in lw])
                wts.append([float(v) for v in lw.values()])
        return pa.table({
            "id": pa.array(ids, pa.string()),
            "embedding": embedding_array(np.concatenate(dense)),
            "sparse_ids": pa.array(tok, pa.list_(pa.int64())),
            "sparse_weights": pa.array(wts, pa.list_(pa.float32())),
        })


def _embed(ids, texts, roles, spec, sparse, num_actors, use_gpu, rows_per_call=1024) -> pa.Table:
    import ray.data
    from ray.data import ActorPoolStrategy

    from bge_ray.batch.runtime import call_blocks, plan_actors

    plan = plan_actors(num_actors, use_gpu)
    table = pa.table({"id": pa.array(ids, pa.string()), "text": pa.array(texts, pa.string()),
                      "role": pa.array(roles, pa.string())})
    blocks, plan = call_blocks(table, rows_per_call, plan)
    out = ray.data.from_arrow(blocks).map_batches(
        M3EvalActor,
        fn_constructor_kwargs={"spec": spec, "torch_threads": plan.torch_threads, "sparse": sparse},
        compute=ActorPoolStrategy(size=plan.num_actors),
        batch_size=rows_per_call, batch_format="pyarrow", num_cpus=plan.num_cpus, num_gpus=plan.num_gpus,
    )
    parts = list(out.iter_batches(batch_format="pyarrow", batch_size=None))
    return pa.concat_tables(parts) if parts else table.select(["id"]).slice(0, 0)


class M3Vectors:
    """Dense vectors and lexical weights in a fixed id order."""

    def __init__(self, table: pa.Table, order: list[str]):
        from bge_ray.io.shards import to_numpy

        pos = {i: n for n, i in enumerate(table["id"].to_pylist())}
        missing = [i for i in order if i not in pos]
        if missing:
            raise RuntimeError(f"{len(missing)} texts came back without M3 vectors, e.g. {missing[:3]}")
        take = pa.array([pos[i] for i in order], pa.int64())
        t = table.take(take)
        self.ids = order
        self.dense = to_numpy(t["embedding"])
        tok, wts = t["sparse_ids"].to_pylist(), t["sparse_weights"].to_pylist()
        self.lexical = [(np.asarray(a, np.int64), np.asarray(b, np.float64)) for a, b in zip(tok, wts, strict=True)]


def embed_m3(
    corpus: dict[str, str],
    queries: dict[str, str],
    spec: EmbedderSpec,
    query_spec: EmbedderSpec,
    cache_dir: str | None,
    fingerprint: dict,
    sparse: bool = True,
    num_actors: int | None = None,
    use_gpu: bool | None = None,
) -> tuple[M3Vectors, M3Vectors, dict]:
    """Corpus and query M3 vectors; the corpus part comes from / goes to ``cache_dir`` when given.

    Queries and passages share one actor pool (one model load per actor); the query options of
    ``query_spec`` differ from ``spec`` only in ``extra`` and reach the actors through it.
    """
    import pyarrow.parquet as pq

    doc_ids, qids = list(corpus), list(queries)
    cached = None
    meta_file = os.path.join(cache_dir, "meta.json") if cache_dir else None
    if meta_file and os.path.isfile(meta_file):
        with open(meta_file, encoding="utf-8") as f:
            meta = json.load(f)
        if meta.get("fingerprint") == fingerprint and (meta.get("sparse") or not sparse):
            cached = pq.read_table(os.path.join(cache_dir, "m3.parquet"))
            logger.info("M3 corpus vectors reused from %s (%d rows)", cache_dir, cached.num_rows)
    t0 = time.perf_counter()
    # One pool for both roles: the queries' options ride in the spec's extra (encode_queries reads them).
    ids = [f"q:{q}" for q in qids] + ([] if cached is not None else [f"d:{d}" for d in doc_ids])
    texts = [queries[q] for q in qids] + ([] if cached is not None else [corpus[d] for d in doc_ids])
    roles = [QUERY] * len(qids) + ([] if cached is not None else [PASSAGE] * len(doc_ids))
    got = _embed(ids, texts, roles, query_spec, sparse, num_actors, use_gpu)
    seconds = time.perf_counter() - t0
    id_col = got["id"].to_pylist()
    is_q = pa.array([i.startswith("q:") for i in id_col])
    q_table = got.filter(is_q).set_column(0, "id", pa.array([i[2:] for i in id_col if i.startswith("q:")], pa.string()))
    if cached is None:
        d_table = got.filter(pc.invert(is_q))
        d_table = d_table.set_column(0, "id", pa.array([i[2:] for i in d_table["id"].to_pylist()], pa.string()))
        if cache_dir:
            os.makedirs(cache_dir, exist_ok=True)
            with atomic_path(os.path.join(cache_dir, "m3.parquet")) as tmp:
                pq.write_table(d_table, tmp)
            write_json(meta_file, {"fingerprint": fingerprint, "sparse": sparse, "rows": d_table.num_rows,
                                   "embedder": asdict(spec)})
    else:
        d_table = cached
    info = {"dir": cache_dir, "cached": cached is not None, "rows": len(doc_ids), "embed_seconds": seconds}
    return M3Vectors(d_table, doc_ids), M3Vectors(q_table, qids), info
