"""Corpus embedding on Ray Data: the embedding actor stage shared by every job, and the resumable
``embed_corpus`` pipeline (plan shards -> actors read, embed and commit each shard -> manifest ->
faiss index)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bge_ray.io.readers import CorpusSpec
from bge_ray.io.shards import embedding_array, read_embeddings, shard_files
from bge_ray.models.spec import EmbedderSpec, without_query_options

logger = logging.getLogger(__name__)

#: Queries per work item when a job embeds queries beside its shards (a big query set spreads over actors).
QUERIES_PER_ITEM = 4096


@dataclass
class QueryBatch:
    """Queries for an embed job's own actors to embed beside the corpus shards: one model load per actor
    and no second actor pool (whose start-up, on a small CPU node, takes the cores the first one needs).

    ``spec`` is the job's spec plus query-only options (:data:`QUERY_OPTIONS` in ``extra``).
    """

    ids: list[str]
    texts: list[str]
    spec: EmbedderSpec

    def __post_init__(self):
        if len(self.ids) != len(self.texts):
            raise ValueError(f"{len(self.ids)} query ids but {len(self.texts)} query texts")

    def items(self) -> list[dict]:
        """Work items (negative indices, so they never collide with shard numbers)."""
        return [{"index": -1 - k, "query_texts": self.texts[s : s + QUERIES_PER_ITEM]}
                for k, s in enumerate(range(0, len(self.texts), QUERIES_PER_ITEM))]

    def check_matches(self, spec: EmbedderSpec) -> None:
        """The actors load ``self.spec``: it must differ from the corpus spec in query options only."""
        if without_query_options(self.spec) != spec:
            raise ValueError("QueryBatch.spec must be the job's embedder spec plus query options only")


def dense_vectors(model, encode, texts: list[str], batch_size: int) -> np.ndarray:
    """``encode(texts)`` (a model's encode_queries / encode_corpus) as a float32 matrix; for M3 models
    the dense head only (lexical and ColBERT outputs are skipped, not computed and dropped)."""
    kwargs = {"batch_size": batch_size}
    if type(model).__name__ == "BGEM3FlagModel":
        kwargs.update(return_dense=True, return_sparse=False, return_colbert_vecs=False)
    emb = encode(texts, **kwargs)
    emb = emb["dense_vecs"] if isinstance(emb, dict) else emb
    return np.asarray(emb, dtype=np.float32).reshape(len(texts), -1)


class EmbedActor:
    """Ray Data callable class: loads the model once, embeds each incoming batch of rows."""

    def __init__(self, spec: EmbedderSpec, torch_threads: int | None = None):
        from .runtime import actor_device

        self.spec = spec
        self.model = spec.load(devices=actor_device(torch_threads))

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = batch["text"].to_pylist()
        emb = self.model.encode_corpus(texts, batch_size=self.spec.batch_size, max_length=self.spec.max_length)
        n_tokens = self.model.last_token_counts
        return pa.table(
            {
                "id": batch["id"],
                "embedding": embedding_array(emb),
                "n_tokens": pa.array(n_tokens, type=pa.int32()),
            }
        )


def embed_dataset(
    ds,
    spec: EmbedderSpec,
    plan,
    rows_per_call: int = 1024,
    actor_class: type = EmbedActor,
):
    """Ray Data stage: ``{id, text}`` rows -> ``{id, embedding, n_tokens}`` through an actor pool.

    ``plan`` is a :class:`bge_ray.batch.runtime.ActorPlan`; every caller (the embed job, mining,
    evaluation) goes through here so models load once per actor and batches stay model-sized.
    """
    from ray.data import ActorPoolStrategy

    return ds.map_batches(
        actor_class,
        fn_constructor_kwargs={"spec": spec, "torch_threads": plan.torch_threads},
        compute=ActorPoolStrategy(size=plan.num_actors),
        batch_size=rows_per_call,
        batch_format="pyarrow",
        num_cpus=plan.num_cpus,
        num_gpus=plan.num_gpus,
    )


def embed_texts(
    ids: list[str],
    texts: list[str],
    spec: EmbedderSpec,
    num_actors: int | None = None,
    use_gpu: bool | None = None,
    rows_per_call: int = 1024,
) -> np.ndarray:
    """Embed in-memory texts on the Ray actor pool; rows come back in input order."""
    import ray.data

    from bge_ray.io.shards import to_numpy

    from .runtime import call_blocks, plan_actors

    if len(ids) != len(texts):
        raise ValueError(f"{len(ids)} ids but {len(texts)} texts")
    plan = plan_actors(num_actors, use_gpu)
    order = {i: n for n, i in enumerate(ids)}
    if len(order) != len(ids):
        raise ValueError("ids passed to embed_texts must be unique")
    table = pa.table({"id": pa.array(ids, pa.string()), "text": pa.array(texts, pa.string())})
    blocks, plan = call_blocks(table, rows_per_call, plan)
    ds = ray.data.from_arrow(blocks)
    out = None
    for batch in embed_dataset(ds, spec, plan, rows_per_call).iter_batches(batch_format="pyarrow", batch_size=None):
        emb = to_numpy(batch["embedding"])
        if out is None:
            out = np.zeros((len(ids), emb.shape[1]), dtype=np.float32)
        out[[order[i] for i in batch["id"].to_pylist()]] = emb
    return out if out is not None else np.zeros((0, 0), dtype=np.float32)


@dataclass
class EmbedJobResult:
    output: str
    rows: int
    tokens: int
    seconds: float
    manifest: dict
    query_embeddings: np.ndarray | None = None  # the job's QueryBatch, in its order

    def summary(self) -> str:
        m = self.manifest
        embed_s = m.get("embed_seconds") or self.seconds
        rate = m.get("embedded_rows", self.rows) / embed_s if embed_s else float("nan")
        skipped = f", {m['skipped_shards']} shards already done" if m.get("skipped_shards") else ""
        bad = f", {m['bad_records']} bad records skipped" if m.get("bad_records") else ""
        return (
            f"embedded {self.rows} rows ({self.tokens} tokens) in {self.seconds:.1f} s "
            f"(embedding {embed_s:.1f} s: {rate:.1f} docs/s, {m.get('embedded_tokens', self.tokens) / max(embed_s, 1e-9):.0f} "
            f"tokens/s){skipped}{bad} -> {self.output}"
        )


class ShardEmbedActor(EmbedActor):
    """Reads one planned shard, embeds it and commits ``shards/part-NNNNN.parquet`` (temp + rename).

    A retried call (the actor died) rewrites the same name, so every shard lands exactly once.
    A query item (:class:`QueryBatch`) is embedded with ``encode_queries`` and its vectors returned.
    """

    def __init__(self, spec: EmbedderSpec, torch_threads: int | None, output: str, id_field, text_fields,
                 skip_bad: bool, fs=None):
        import psutil

        self.init_started = time.time()
        self.process_started = psutil.Process().create_time()
        super().__init__(spec, torch_threads)
        self.init_seconds = time.time() - self.init_started
        self.output, self.id_field, self.text_fields = output, id_field, text_fields
        self.skip_bad, self.fs = skip_bad, fs

    def __call__(self, batch: pa.Table) -> pa.Table:
        from bge_ray.io.sharding import Shard, read_shard

        out = []
        for d in batch.to_pylist():
            started = time.time()
            t0 = time.perf_counter()
            if d.get("query_texts") is not None:
                out.append(self._embed_queries(d, started, t0))
                continue
            d = {k: v for k, v in d.items() if k != "query_texts"}
            shard = Shard(**d)
            _maybe_inject_fault(self.output, shard.index)
            rows, bad = read_shard(shard, self.id_field, self.text_fields, self.fs, self.skip_bad)
            emb = self.model.encode_corpus(rows["text"].to_pylist(), batch_size=self.spec.batch_size,
                                           max_length=self.spec.max_length)
            dim = self.model.dim if len(rows) == 0 else emb.shape[1]
            emb = np.asarray(emb, dtype=np.float32).reshape(len(rows), dim)
            n_tokens = np.asarray(self.model.last_token_counts, dtype=np.int32)
            table = pa.table({"id": rows["id"], "embedding": embedding_array(emb), "n_tokens": pa.array(n_tokens)})
            write_parquet_atomic(table, os.path.join(self.output, "shards", shard.name))
            out.append(self._record(shard.index, len(rows), int(n_tokens.sum()), dim, started, t0,
                                    bad=json.dumps(bad[:20]), n_bad=len(bad)))
        return pa.Table.from_pylist(out, schema=_RESULT_SCHEMA)

    def _embed_queries(self, item: dict, started: float, t0: float) -> dict:
        texts = item["query_texts"]
        emb = dense_vectors(self.model, self.model.encode_queries, texts, self.spec.batch_size)
        tokens = int(np.sum(self.model.last_token_counts)) if texts else 0
        return self._record(item["index"], len(texts), tokens, emb.shape[1], started, t0,
                            query_embedding=emb.tobytes())

    def _record(self, index, rows, tokens, dim, started, t0, bad="[]", n_bad=0, query_embedding=None) -> dict:
        return {"index": index, "rows": rows, "tokens": tokens, "dim": dim, "bad": bad, "n_bad": n_bad,
                "seconds": time.perf_counter() - t0, "started": started, "init_started": self.init_started,
                "init_seconds": self.init_seconds, "process_started": self.process_started,
                "query_embedding": query_embedding}


# One schema for shard and query results (Ray Data concatenates them).
_RESULT_SCHEMA = pa.schema([
    ("index", pa.int64()), ("rows", pa.int64()), ("tokens", pa.int64()), ("dim", pa.int64()), ("bad", pa.string()),
    ("n_bad", pa.int64()), ("seconds", pa.float64()), ("started", pa.float64()), ("init_started", pa.float64()),
    ("init_seconds", pa.float64()), ("process_started", pa.float64()), ("query_embedding", pa.binary()),
])


def _maybe_inject_fault(output: str, shard_index: int) -> None:
    """Test hook: ``BGE_RAY_FAULT=exit:N`` kills the actor process (once) when it reaches shard N,
    ``raise:N`` raises instead; the marker file makes the fault happen on the first attempt only."""
    spec = os.environ.get("BGE_RAY_FAULT", "")
    if not spec:
        return
    kind, _, n = spec.partition(":")
    if str(shard_index) != n:
        return
    marker = os.path.join(output, f".fault-{shard_index}")
    if os.path.exists(marker):
        return
    open(marker, "w").close()
    if kind == "exit":
        os._exit(1)
    raise RuntimeError(f"injected failure at shard {shard_index}")


def write_parquet_atomic(table: pa.Table, path: str) -> None:
    from bge_ray.io.atomic import atomic_path

    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def plan_job(corpus: CorpusSpec, spec: EmbedderSpec, rows_per_shard: int | None, num_actors: int = 1) -> dict:
    """The job's identity: inputs (with sizes and mtimes), fields, model and shard boundaries.

    ``rows_per_shard=None`` sizes shards from the input and the actor count (``auto_rows_per_shard``).
    """
    import ray

    from bge_ray.io.readers import detect_format, expand_paths
    from bge_ray.io.sharding import approx_rows, auto_rows_per_shard, file_fingerprint, plan_file

    files, fs = expand_paths(corpus.path)
    fmt = detect_format(files, corpus.format)
    if rows_per_shard is None:
        count_remote = ray.remote(num_cpus=0.25)(approx_rows)
        total = sum(ray.get([count_remote.remote(f, fmt, fs) for f in files]))
        rows_per_shard = auto_rows_per_shard(total, num_actors)
    plan_remote = ray.remote(num_cpus=0.25)(plan_file)
    per_file = ray.get([plan_remote.remote(f, fmt, rows_per_shard, fs) for f in files])
    shards = []
    for file_shards in per_file:
        for d in file_shards:
            shards.append({"index": len(shards), "offset": None, "first_line": None, **d})
    if not shards:
        raise ValueError(f"input {corpus.path} holds no rows ({len(files)} file(s), all empty)")
    return {
        "input": corpus.path,
        "files": [file_fingerprint(f, fs) for f in files],
        "format": fmt,
        "id_field": corpus.id_field,
        "text_fields": list(corpus.text_fields) if corpus.text_fields else None,
        "rows_per_shard": rows_per_shard,
        "embedder": asdict(spec),
        # Weights replaced at the same path make this a different job: a rerun refuses to mix vectors.
        "model_fingerprint": spec.model_fingerprint(),
        "shards": shards,
    }


def _plan_changes(old: dict, new: dict) -> str:
    """The parts of a plan that differ, for the error a rerun into another job's output gets."""
    names = {"input": "input", "files": "input files", "format": "format", "id_field": "id field",
             "text_fields": "text fields", "rows_per_shard": "shard size", "embedder": "model settings",
             "model_fingerprint": "model files", "shards": "shard boundaries"}
    changed = [label for key, label in names.items() if old.get(key) != new.get(key)]
    return ", ".join(changed) or "the plan format"


def run_embed_job(
    corpus: CorpusSpec,
    output: str,
    spec: EmbedderSpec,
    num_actors: int | None = None,
    use_gpu: bool | None = None,
    rows_per_shard: int | None = None,
    index_kind: str | None = "flat",
    on_bad_record: str = "fail",
    overwrite: bool = False,
    runtime_env: dict | None = None,
    queries: QueryBatch | None = None,
) -> EmbedJobResult:
    """Embed ``corpus`` into ``output``: ``shards/part-*.parquet``, ``manifest.json``, ``index.faiss``.

    Resumable: ``plan.json`` fixes the shard boundaries; a rerun of the same command embeds only the
    shards not yet committed. ``runtime_env`` goes to the embedding actors (env vars, pip packages).
    ``queries``: also embedded by the job's actors, returned in ``EmbedJobResult.query_embeddings``
    (not written to ``output``: the folder holds the corpus only).
    ``manifest.json`` is written last, after every planned row is
    accounted for and every id is found unique, so its presence means the output is complete.
    """
    import ray

    from bge_ray.io.atomic import write_json
    from bge_ray.io.sharding import plan_digest

    from .runtime import plan_actors

    if on_bad_record not in ("fail", "skip"):
        raise ValueError(f"on_bad_record must be 'fail' or 'skip', got {on_bad_record!r}")
    if queries is not None:
        queries.check_matches(spec)
    if "://" in output:
        raise ValueError("--output must be a local or shared-filesystem path (object-store output is not supported yet)")
    t0 = time.perf_counter()
    shard_dir = os.path.join(output, "shards")
    plan_file = os.path.join(output, "plan.json")
    if overwrite and os.path.isdir(output):
        for name in ("shards", "manifest.json", "plan.json", "index.faiss", "ids.parquet"):
            p = os.path.join(output, name)
            shutil.rmtree(p) if os.path.isdir(p) else os.path.exists(p) and os.unlink(p)
    old = None
    if os.path.exists(plan_file):
        with open(plan_file, encoding="utf-8") as f:
            old = json.load(f)
        # A resumed run keeps the shard size it started with, whatever the actor count now.
        rows_per_shard = rows_per_shard or old.get("rows_per_shard")
    actor_plan = plan_actors(num_actors, use_gpu)
    plan = plan_job(corpus, spec, rows_per_shard, actor_plan.num_actors)
    digest = plan_digest(plan)
    if old is not None:
        if old.get("digest") != digest:
            raise ValueError(
                f"{output} holds the output of a different job ({_plan_changes(old, plan)} changed); pass "
                f"--overwrite to replace it or choose another --output"
            )
    elif os.path.isdir(shard_dir) and os.listdir(shard_dir):
        raise ValueError(f"{shard_dir} holds shards but no plan.json; pass --overwrite or choose another --output")
    os.makedirs(shard_dir, exist_ok=True)
    write_json(plan_file, {"digest": digest, **plan})

    shards = plan["shards"]
    done = {s["index"] for s in shards if os.path.exists(os.path.join(shard_dir, f"part-{s['index']:05d}.parquet"))}
    pending = [s for s in shards if s["index"] not in done]
    logger.info("%d shards planned, %d already committed, %d to embed", len(shards), len(done), len(pending))
    query_items = queries.items() if queries is not None else []
    results: list[dict] = []
    t_embed = time.perf_counter()
    t_embed_wall = time.time()
    n_actors = 0
    if pending or query_items:
        import ray.data
        from ray.data import ActorPoolStrategy

        # Query items are small: they size nothing, they go first and the actor that took them moves on.
        actors = actor_plan.for_blocks(len(pending) or 1)
        n_actors = actors.num_actors
        items = query_items + pending
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        text_fields = tuple(corpus.text_fields) if corpus.text_fields else None
        out = ds.map_batches(
            ShardEmbedActor,
            fn_constructor_kwargs=dict(spec=queries.spec if queries is not None else spec,
                                       torch_threads=actors.torch_threads, output=output,
                                       id_field=corpus.id_field, text_fields=text_fields,
                                       skip_bad=on_bad_record == "skip"),
            # One shard in flight per actor: with Ray Data's default (several) the first actor to
            # start takes every shard of a small job and the others idle.
            compute=ActorPoolStrategy(size=n_actors, max_tasks_in_flight_per_actor=1),
            batch_size=1,
            batch_format="pyarrow",
            num_cpus=actors.num_cpus,
            num_gpus=actors.num_gpus,
            **({"runtime_env": runtime_env} if runtime_env else {}),
        )
        results = out.take_all()
    query_embeddings = _query_vectors(len(query_items), [r for r in results if r["index"] < 0]) if queries else None
    results = [r for r in results if r["index"] >= 0]
    embed_seconds = time.perf_counter() - t_embed
    manifest = _verify_and_describe(plan, output, results)
    manifest.update(
        digest=digest,
        skipped_shards=len(done),
        embedded_shards=len(pending),
        embedded_rows=sum(r["rows"] for r in results),
        embedded_tokens=sum(r["tokens"] for r in results),
        embed_seconds=round(embed_seconds, 3),
        num_actors=n_actors,
        # Where the embed stage's time went: actors busy on shards, and the wait for the first shard
        # to start (actor start-up: process, imports, model load).
        shard_seconds=round(sum(r["seconds"] for r in results), 3),
        first_shard_after_seconds=round(min(r["started"] for r in results) - t_embed_wall, 3) if results else None,
        actor_start_seconds=_actor_start(results, t_embed_wall),
    )
    if index_kind and index_kind != "none":
        t_index = time.perf_counter()
        manifest["index"] = build_shard_index(output, index_kind)
        manifest["index"]["seconds"] = round(time.perf_counter() - t_index, 3)
    seconds = time.perf_counter() - t0
    manifest["seconds"] = round(seconds, 3)
    manifest["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write_json(os.path.join(output, "manifest.json"), manifest)
    del ray
    return EmbedJobResult(output, manifest["rows"], manifest["tokens"], seconds, manifest, query_embeddings)


def _query_vectors(n_items: int, results: list[dict]) -> np.ndarray:
    """The query items' vectors, back in the QueryBatch's order."""
    by_item = {-1 - r["index"]: r for r in results}
    if sorted(by_item) != list(range(n_items)):
        raise RuntimeError(f"query items {sorted(by_item)} came back, expected {n_items}")
    parts = [np.frombuffer(by_item[k]["query_embedding"], dtype=np.float32).reshape(by_item[k]["rows"], by_item[k]["dim"])
             for k in sorted(by_item)]
    return np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)


def _actor_start(results: list[dict], t0: float) -> dict | None:
    """Per actor (told apart by construction time): when its process began the constructor, after the
    embed stage began, and how long the constructor (imports, model load) took."""
    seen = {r["init_started"]: (r["init_seconds"], r["process_started"]) for r in results}
    if not seen:
        return None
    return {"process_began_after": [round(seen[s][1] - t0, 3) for s in sorted(seen)],
            "constructor_began_after": [round(s - t0, 3) for s in sorted(seen)],
            "constructor_seconds": [round(seen[s][0], 3) for s in sorted(seen)]}


def _verify_and_describe(plan: dict, output: str, results: list[dict]) -> dict:
    """Every planned shard committed, row counts add up, ids unique; else raise (no manifest)."""
    bad_by_shard = {r["index"]: (r["n_bad"], json.loads(r["bad"])) for r in results}
    shards, rows, tokens, seen, dim, bad, bad_examples = [], 0, 0, {}, None, 0, []
    for s in plan["shards"]:
        path = os.path.join(output, "shards", f"part-{s['index']:05d}.parquet")
        if not os.path.exists(path):
            raise RuntimeError(f"shard {s['index']} ({s['file']} rows {s['start']}..) was not committed")
        table = pq.read_table(path, columns=["id", "n_tokens"])
        n_bad, examples = bad_by_shard.get(s["index"], (s["rows"] - table.num_rows, []))
        if table.num_rows + n_bad != s["rows"]:
            raise RuntimeError(
                f"shard {s['index']} holds {table.num_rows} rows (+{n_bad} skipped), planned {s['rows']}: "
                f"did {s['file']} change while the job ran?"
            )
        for i in table["id"].to_pylist():
            if i in seen:
                raise ValueError(
                    f"duplicate id {i!r}: in {s['file']} (shard {s['index']}) and shard {seen[i]}; ids must be "
                    f"unique, no manifest was written"
                )
            seen[i] = s["index"]
        dim = dim or pq.read_schema(path).field("embedding").type.list_size
        bad += n_bad
        bad_examples += examples
        rows += table.num_rows
        tokens += int(np.asarray(table["n_tokens"]).sum())
        shards.append({"file": f"shards/{os.path.basename(path)}", "rows": table.num_rows, "input": s["file"],
                       "start": s["start"]})
    spec = plan["embedder"]
    return {
        "input": plan["input"],
        "model": spec["model"] or "bundled:sentence-transformers/all-MiniLM-L6-v2",
        "embedder": spec,
        "dim": dim,
        "normalized": spec["normalize_embeddings"],
        "rows": rows,
        "unique_ids": len(seen),
        "tokens": tokens,
        "bad_records": bad,
        "bad_record_examples": bad_examples[:20],
        "shards": shards,
    }


def build_shard_index(output: str, kind: str = "flat") -> dict:
    """A faiss index over every shard (added shard by shard) plus ``ids.parquet`` (row -> id)."""
    from bge_ray.index.faiss_index import build_index, save_index
    from bge_ray.io.atomic import atomic_path
    from bge_ray.io.shards import to_numpy

    files = shard_files(os.path.join(output, "shards"))
    ids: list[str] = []
    index = None
    if kind in ("flat", "hnsw"):
        for f in files:
            t = pq.read_table(f, columns=["id", "embedding"])
            emb = to_numpy(t["embedding"])
            if index is None:
                index = build_index(emb, kind)
            else:
                index.add(emb)
            ids += t["id"].to_pylist()
    else:
        # IVF variants train on the whole set's distribution, so read it once.
        ids, emb = read_embeddings(os.path.join(output, "shards"))
        index = build_index(emb, kind)
    save_index(index, os.path.join(output, "index.faiss"))
    with atomic_path(os.path.join(output, "ids.parquet")) as tmp:
        pq.write_table(pa.table({"id": pa.array(ids, pa.string())}), tmp)
    return {"kind": kind, "file": "index.faiss", "ids": "ids.parquet", "ntotal": int(index.ntotal)}
