"""The corpus embedding job, one streaming Ray Data pipeline: planned shards -> read and tokenise
(CPU tasks) -> the model actor pool (:mod:`bge_ray.batch.stage`) -> commit each shard (CPU tasks,
temp + rename) -> manifest, written last -> faiss index. Resumable shard by shard."""

from __future__ import annotations

import collections
import functools
import json
import logging
import time
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

from bge_ray.io.lease import Lease
from bge_ray.io.readers import CorpusSpec
from bge_ray.io.shards import colbert_array, embedding_array, sparse_array
from bge_ray.io.store import Store, filesystem, is_uri
from bge_ray.models.spec import EmbedderSpec, without_query_options

from .stage import PASSAGE, QUERY, Vectors, item_row, model_stage, parse_outputs, to_table
from .verify import SHARD_META

logger = logging.getLogger(__name__)

#: Queries per work item when a job embeds queries beside its shards (a big query set spreads over actors).
QUERIES_PER_ITEM = 4096

#: Largest automatic shard when ColBERT vectors are written (one float32 vector per token per row).
COLBERT_ROWS_PER_SHARD = 2048
#: Inputs up to this many bytes are planned in the driver rather than by Ray tasks.
LOCAL_PLAN_BYTES = 64 << 20


@dataclass
class QueryBatch:
    """Queries for an embed job's own actors to embed beside the corpus shards: one model load per actor
    and no second actor pool (whose start-up, on a small CPU node, takes the cores the first one needs).

    ``spec`` is the job's spec plus query-only options (:data:`QUERY_OPTIONS` in ``extra``); the
    queries get the job's outputs (dense, sparse, colbert).
    """

    ids: list[str]
    texts: list[str]
    spec: EmbedderSpec

    def __post_init__(self):
        if len(self.ids) != len(self.texts):
            raise ValueError(f"{len(self.ids)} query ids but {len(self.texts)} query texts")

    def items(self) -> list[dict]:
        """Work items (negative numbers, so they never collide with shard numbers)."""
        return [item_row(-1 - k, QUERY, self.ids[s : s + QUERIES_PER_ITEM], self.texts[s : s + QUERIES_PER_ITEM])
                for k, s in enumerate(range(0, len(self.texts), QUERIES_PER_ITEM))]

    def check_matches(self, spec: EmbedderSpec) -> None:
        """The actors load ``self.spec``: it must differ from the corpus spec in query options only."""
        if without_query_options(self.spec) != spec:
            raise ValueError("QueryBatch.spec must be the job's embedder spec plus query options only")


@dataclass
class EmbedJobResult:
    output: str
    rows: int
    tokens: int
    seconds: float
    manifest: dict
    query_vectors: Vectors | None = None  # the job's QueryBatch, in its order

    @property
    def query_embeddings(self) -> np.ndarray | None:
        """The QueryBatch's dense vectors."""
        return None if self.query_vectors is None else self.query_vectors.dense

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


def read_shard_item(meta: dict, id_field, text_fields, skip_bad: bool, input_uri: str = "",
                    id_kind: dict | None = None) -> tuple[list, list, dict]:
    """The prepare stage's reader: one planned shard's ids and texts; bad records in ``meta``.
    ``input_uri``: the job's input, whose filesystem (local or object store) holds the shard's file;
    ``id_kind``: the plan's kind of id (integer or string), which every row's id must have."""
    from bge_ray.io.sharding import Shard, read_shard

    fs = filesystem(input_uri)[0] if is_uri(input_uri) else None
    shard = Shard(**{k: meta[k] for k in ("index", "file", "format", "start", "rows", "offset", "first_line")})
    rows, bad = read_shard(shard, id_field, text_fields, fs, skip_bad, id_kind)
    return rows["id"].to_pylist(), rows["text"].to_pylist(), {**meta, "n_bad": len(bad), "bad": bad[:20]}


def shard_table(v: Vectors, outputs: tuple[str, ...], colbert_dim: int | None) -> pa.Table:
    """One shard's parquet table: ``id``, the asked outputs, ``n_tokens``."""
    cols: dict = {"id": pa.array(v.ids, pa.string())}
    if "dense" in outputs:
        cols["embedding"] = embedding_array(v.dense)
    if "sparse" in outputs:
        cols["sparse"] = sparse_array(v.sparse)
    if "colbert" in outputs:
        cols["colbert"] = colbert_array(v.colbert, colbert_dim)
    cols["n_tokens"] = pa.array(v.n_tokens, pa.int32())
    return pa.table(cols)


def commit_items(batch: pa.Table, store: Store, outputs: tuple[str, ...]) -> pa.Table:
    """Ray Data task, the commit stage: write each shard item as ``shards/part-NNNNN.parquet`` (whole or
    not at all: :meth:`Store.writer`, so a retried or rerun shard lands once) and pass on its record
    without vectors; query items pass through with their vectors."""
    rows = batch.to_pylist()
    for row in rows:
        if row["role"] != PASSAGE:
            continue
        t0 = time.perf_counter()
        meta = json.loads(row["meta"])
        v = Vectors.from_result(row)
        table = shard_table(v, outputs, row["colbert_dim"])
        # The shard describes itself: a rerun (whatever its --on-bad-record) counts its skipped rows right.
        table = table.replace_schema_metadata({SHARD_META: json.dumps({"n_bad": meta["n_bad"], "bad": meta["bad"]})})
        store.write_parquet(shard_name(row["item"]), table)
        meta.update(committed_rows=len(v.ids), tokens=int(v.n_tokens.sum()) if len(v.ids) else 0,
                    commit_seconds=round(time.perf_counter() - t0, 4))
        row.update(meta=json.dumps(meta), ids=[], dense=None, sparse_ids=None, sparse_weights=None,
                   sparse_counts=None, colbert=None, colbert_counts=None, n_tokens=None)
    return to_table(rows)


class Progress:
    """One log line per committed shard: rows and tokens done, rows/s, ETA (driver-side, per shard)."""

    def __init__(self, planned_rows: int, shards: int, done_rows: int = 0):
        self.total, self.shards, self.rows, self.tokens, self.done = planned_rows, shards, done_rows, 0, 0
        self.start_rows, self.t0 = done_rows, time.perf_counter()

    def add(self, index: int, rows: int, tokens: int) -> str:
        self.done += 1
        self.rows += rows
        self.tokens += tokens
        elapsed = time.perf_counter() - self.t0
        rate = (self.rows - self.start_rows) / elapsed if elapsed > 0 else 0.0
        left = max(0, self.total - self.rows)
        eta = f"{left / rate:.0f} s" if rate > 0 else "?"
        line = (f"shard {index} committed ({self.done}/{self.shards} this run): {self.rows}/{self.total} rows, "
                f"{self.tokens} tokens, {rate:.1f} rows/s, ETA {eta}")
        logger.info(line)
        return line


def shard_name(index: int) -> str:
    return f"shards/part-{index:05d}.parquet"


def _unusable_shards(store: Store, shards: list[dict], committed: set[str]) -> dict[int, str]:
    """Committed shards that cannot count as done, with why: unreadable (zero-length, cut short,
    corrupt) or holding other than their planned rows. Footers only, read in parallel."""
    from concurrent.futures import ThreadPoolExecutor

    from .verify import shard_bad_records

    def problem(s: dict) -> str | None:
        try:
            md = store.parquet_file(shard_name(s["index"])).metadata
            n_bad = shard_bad_records(md.metadata)[0]
        except Exception as exc:  # noqa: BLE001 - any unreadable file is redone, the reason logged
            return f"unreadable ({type(exc).__name__}: {str(exc)[:200]})"
        if md.num_rows + n_bad != s["rows"]:
            return f"holds {md.num_rows} rows (+{n_bad} skipped), planned {s['rows']}"
        return None

    todo = [s for s in shards if shard_name(s["index"]).removeprefix("shards/") in committed]
    with ThreadPoolExecutor(16) as pool:
        found = dict(zip((s["index"] for s in todo), pool.map(problem, todo), strict=True))
    return {i: p for i, p in found.items() if p}


def plan_job(corpus: CorpusSpec, spec: EmbedderSpec, rows_per_shard: int | None, num_actors: int = 1,
             outputs: tuple[str, ...] = ("dense",)) -> dict:
    """The job's identity: inputs (with sizes and mtimes), fields, model, outputs and shard boundaries.

    ``rows_per_shard=None`` sizes shards from the input and the actor count (``auto_rows_per_shard``).
    """
    import ray

    from bge_ray.io.readers import detect_format, expand_paths
    from bge_ray.io.sharding import (
        approx_rows,
        auto_rows_per_shard,
        file_fingerprint,
        first_id_kind,
        plan_file,
    )

    outputs = parse_outputs(outputs)
    files, fs = expand_paths(corpus.path)
    fmt = detect_format(files, corpus.format)
    fingerprints = [file_fingerprint(f, fs) for f in files]
    if sum(fp["size"] or 0 for fp in fingerprints) <= LOCAL_PLAN_BYTES:
        # A small input is planned here: fresh worker processes for the tasks cost more than the scan.
        def run(fn, *args):
            return [fn(f, *args) for f in files]
    else:
        def run(fn, *args):
            task = ray.remote(num_cpus=0.25)(fn)
            return ray.get([task.remote(f, *args) for f in files])
    if rows_per_shard is None:
        total = sum(run(approx_rows, fmt, fs))
        # ColBERT keeps a vector per token: smaller shards bound what one item holds in memory.
        high = COLBERT_ROWS_PER_SHARD if "colbert" in outputs else 50_000
        rows_per_shard = auto_rows_per_shard(total, num_actors, low=min(1024, high), high=high)
    per_file = run(plan_file, fmt, rows_per_shard, fs)
    shards = []
    for file_shards in per_file:
        for d in file_shards:
            shards.append({"index": len(shards), "offset": None, "first_line": None, **d})
    if not shards:
        raise ValueError(f"input {corpus.path} holds no rows ({len(files)} file(s), all empty)")
    return {
        "input": corpus.path,
        "files": fingerprints,
        "format": fmt,
        "id_field": corpus.id_field,
        "text_fields": list(corpus.text_fields) if corpus.text_fields else None,
        # Every row's id must be of this kind (integer or string): checked as the rows are read.
        "id_kind": first_id_kind(files[0], fmt, corpus.id_field, fs),
        "rows_per_shard": rows_per_shard,
        "embedder": asdict(spec),
        # Weights replaced at the same path make this a different job: a rerun refuses to mix vectors.
        "model_fingerprint": spec.model_fingerprint(),
        "outputs": list(outputs),
        "shards": shards,
    }


def _plan_changes(old: dict, new: dict) -> str:
    """The parts of a plan that differ, for the error a rerun into another job's output gets."""
    names = {"input": "input", "files": "input files", "format": "format", "id_field": "id field",
             "text_fields": "text fields", "id_kind": "id type", "rows_per_shard": "shard size", "embedder": "model settings",
             "model_fingerprint": "model files", "outputs": "outputs", "shards": "shard boundaries"}
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
    outputs: str | tuple[str, ...] = ("dense",),
    split_stages: bool | None = None,
) -> EmbedJobResult:
    """Embed ``corpus`` into ``output``: ``shards/part-*.parquet``, ``manifest.json``, ``index.faiss``.

    ``outputs``: any of ``dense`` (column ``embedding``), ``sparse`` and ``colbert`` (BGE-M3).
    Resumable: ``plan.json`` fixes the shard boundaries; a rerun of the same command embeds only the
    shards not yet committed. ``runtime_env`` goes to the pipeline's workers (env vars, pip packages).
    ``queries``: also embedded by the job's actors, returned in ``EmbedJobResult.query_vectors``
    (not written to ``output``: the folder holds the corpus only).
    ``manifest.json`` is written last, after every planned row is accounted for and every id is
    found unique, so its presence means the output is complete. The index needs the dense output.
    ``split_stages``: read + tokenise and commit in CPU tasks of their own, the actors running only
    the model (default: when the actors have GPUs; :func:`bge_ray.batch.stage.model_stage`).
    """
    import ray

    from bge_ray.io.sharding import plan_digest

    from .runtime import plan_actors

    outputs = parse_outputs(outputs)
    if on_bad_record not in ("fail", "skip"):
        raise ValueError(f"on_bad_record must be 'fail' or 'skip', got {on_bad_record!r}")
    if queries is not None:
        queries.check_matches(spec)
    t0 = time.perf_counter()
    store = Store(output)
    # The first write: an unwritable output fails here, and a second run into it is refused.
    lease = Lease(store).acquire()
    try:
        if overwrite:
            for name in ("manifest.json", "shards", "plan.json", "index.faiss", "ids.parquet", "index"):
                store.delete(name)
        old = store.read_json("plan.json") if store.exists("plan.json") else None
        if old is not None:
            # A resumed run keeps the shard size it started with, whatever the actor count now.
            rows_per_shard = rows_per_shard or old.get("rows_per_shard")
        actor_plan = plan_actors(num_actors, use_gpu)
        t_plan = time.perf_counter()
        plan = plan_job(corpus, spec, rows_per_shard, actor_plan.num_actors, outputs)
        plan_seconds = time.perf_counter() - t_plan
        digest = plan_digest(plan)
        committed = set(store.list("shards"))
        if old is not None:
            if old.get("digest") != digest:
                raise ValueError(
                    f"{store.url()} holds the output of a different job ({_plan_changes(old, plan)} changed); pass "
                    f"--overwrite to replace it or choose another --output"
                )
        elif committed:
            raise ValueError(f"{store.url('shards')} holds shards but no plan.json; pass --overwrite or choose another "
                             f"--output")
        else:
            store.makedirs("shards")
            store.write_json("plan.json", {"digest": digest, **plan})

        shards = plan["shards"]
        for index, why in _unusable_shards(store, shards, committed).items() if committed else ():
            logger.warning("shard %d (%s) is %s: embedding it again", index, shard_name(index), why)
            store.delete(shard_name(index))
            committed.discard(shard_name(index).removeprefix("shards/"))
        done = {s["index"] for s in shards if shard_name(s["index"]).removeprefix("shards/") in committed}
        pending = [s for s in shards if s["index"] not in done]
        logger.info("%d shards planned, %d already committed, %d to embed", len(shards), len(done), len(pending))
        query_items = queries.items() if queries is not None else []
        results: list[dict] = []
        t_embed = time.perf_counter()
        t_embed_wall = time.time()
        n_actors = 0
        if pending or query_items:
            results = _run_pipeline(corpus, store, spec if queries is None else queries.spec, outputs,
                                    actor_plan.for_blocks(len(pending) or 1), query_items, pending, shards,
                                    on_bad_record == "skip", runtime_env, split_stages, plan.get("id_kind"))
            n_actors = actor_plan.for_blocks(len(pending) or 1).num_actors
        query_vectors = _query_vectors(len(query_items), [r for r in results if r["item"] < 0]) if queries else None
        results = [r for r in results if r["item"] >= 0]
        embed_seconds = time.perf_counter() - t_embed
        t_verify = time.perf_counter()
        manifest = _verify_and_describe(plan, store, actor_plan.read_cpus)
        manifest["verify_seconds"] = round(time.perf_counter() - t_verify, 3)
        metas = [json.loads(r["meta"]) for r in results]
        manifest.update(
            digest=digest,
            plan_seconds=round(plan_seconds, 3),
            skipped_shards=len(done),
            embedded_shards=len(pending),
            embedded_rows=sum(m["committed_rows"] for m in metas),
            embedded_tokens=sum(m["tokens"] for m in metas),
            embed_seconds=round(embed_seconds, 3),
            num_actors=n_actors,
            # Where the embed stage's time went: actors busy on shards, and the wait for the first shard
            # to start (actor start-up: process, imports, model load).
            shard_seconds=round(sum(r["model_seconds"] for r in results), 3),
            commit_seconds=round(sum(m["commit_seconds"] for m in metas), 3),
            first_shard_after_seconds=round(min(r["started"] for r in results) - t_embed_wall, 3) if results else None,
            actor_start_seconds=_actor_start(results, t_embed_wall),
            shards_by_node=dict(collections.Counter(r["node"] for r in results)),
        )
        if index_kind and index_kind != "none":
            if "dense" in outputs:
                t_index = time.perf_counter()
                manifest["index"] = build_job_index(store, index_kind, manifest, actor_plan.read_cpus)
                manifest["index"]["seconds"] = round(time.perf_counter() - t_index, 3)
            else:
                logger.info("no faiss index: the job writes no dense vectors (outputs %s)", ",".join(outputs))
        seconds = time.perf_counter() - t0
        manifest["seconds"] = round(seconds, 3)
        manifest["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        store.write_json("manifest.json", manifest)
        del ray
        return EmbedJobResult(store.url(), manifest["rows"], manifest["tokens"], seconds, manifest, query_vectors)
    finally:
        lease.release()


def _run_pipeline(corpus, store, spec, outputs, actors, query_items, pending, shards, skip_bad, runtime_env,
                  split_stages, id_kind=None):
    """Query items and pending shards through read + tokenise -> model -> commit; one record per item."""
    import ray.data

    text_fields = tuple(corpus.text_fields) if corpus.text_fields else None
    reader = functools.partial(read_shard_item, id_field=corpus.id_field, text_fields=text_fields, skip_bad=skip_bad,
                               input_uri=corpus.path, id_kind=id_kind)
    # Query items are small: they go first and the actor that took them moves on.
    items = query_items + [item_row(s["index"], PASSAGE, [], None, meta=s) for s in pending]
    ds = ray.data.from_arrow([to_table([r]) for r in items])
    commit = functools.partial(commit_items, store=store, outputs=outputs)
    committed = model_stage(ds, spec, actors, outputs, reader=reader, commit=commit,
                            fault_dir=store.path() if store.local else None, runtime_env=runtime_env,
                            n_items=len(items), split=split_stages)
    planned = sum(s["rows"] for s in shards)
    progress = Progress(planned, len(pending), done_rows=planned - sum(s["rows"] for s in pending))
    results = []
    for row in committed.iter_rows():
        if row["item"] >= 0:
            meta = json.loads(row["meta"])
            progress.add(row["item"], meta["rows"], meta["tokens"])
        results.append(row)
    return results


def _query_vectors(n_items: int, results: list[dict]) -> Vectors:
    """The query items' outputs, back in the QueryBatch's order."""
    by_item = {-1 - r["item"]: r for r in results}
    if sorted(by_item) != list(range(n_items)):
        raise RuntimeError(f"query items {sorted(by_item)} came back, expected {n_items}")
    return Vectors.concat([Vectors.from_result(by_item[k]) for k in sorted(by_item)]) if by_item else Vectors([])


def _actor_start(results: list[dict], t0: float) -> dict | None:
    """Per actor (told apart by construction time): when its process began the constructor, after the
    embed stage began, how long the constructor (imports, model load) took, and its Ray node."""
    seen = {r["init_started"]: (r["init_seconds"], r["process_started"], r["node"]) for r in results}
    if not seen:
        return None
    return {"process_began_after": [round(seen[s][1] - t0, 3) for s in sorted(seen)],
            "constructor_began_after": [round(s - t0, 3) for s in sorted(seen)],
            "constructor_seconds": [round(seen[s][0], 3) for s in sorted(seen)],
            "nodes": [seen[s][2] for s in sorted(seen)]}


def _verify_and_describe(plan: dict, store: Store, task_cpus: float) -> dict:
    """Every planned shard committed, row counts add up, ids unique (checked by cluster tasks,
    :mod:`bge_ray.batch.verify`); else raise (no manifest). The manifest from per-shard statistics."""
    from .verify import verify_shards

    planned = {s["index"]: s for s in plan["shards"]}
    stats, n_dups, dup_examples = verify_shards(store, sorted(planned), sum(s["rows"] for s in planned.values()),
                                                num_cpus=task_cpus)
    shards, rows, tokens, dim, colbert_dim, bad, bad_examples = [], 0, 0, None, None, 0, []
    for index, st in zip(sorted(planned), stats, strict=True):
        s = planned[index]
        if st is None:
            raise RuntimeError(f"shard {index} ({s['file']} rows {s['start']}..) was not committed")
        n_bad, examples = st.n_bad, st.bad
        if st.rows + n_bad != s["rows"]:
            raise RuntimeError(
                f"shard {index} holds {st.rows} rows (+{n_bad} skipped), planned {s['rows']}: "
                f"did {s['file']} change while the job ran?"
            )
        dim = dim or st.dim
        colbert_dim = colbert_dim or st.colbert_dim
        bad += n_bad
        bad_examples += examples
        rows += st.rows
        tokens += st.tokens
        shards.append({"file": shard_name(index), "rows": st.rows, "input": s["file"], "start": s["start"]})
    if n_dups:
        i, a, b = dup_examples[0]
        raise ValueError(
            f"duplicate id {i!r}: in {planned[b]['file']} (shard {b}) and shard {a}; {n_dups} id(s) occur more "
            f"than once, ids must be unique, no manifest was written"
        )
    spec = plan["embedder"]
    return {
        "input": plan["input"],
        "model": spec["model"] or "bundled:sentence-transformers/all-MiniLM-L6-v2",
        "embedder": spec,
        "outputs": plan.get("outputs", ["dense"]),
        "dim": dim,
        "colbert_dim": colbert_dim,
        "normalized": spec["normalize_embeddings"],
        "rows": rows,
        "unique_ids": rows,
        "tokens": tokens,
        "bad_records": bad,
        "bad_record_examples": bad_examples[:20],
        "shards": shards,
    }


def build_job_index(store: Store, kind: str, manifest: dict, task_cpus: float = 1.0) -> dict:
    """The job's index, built off the driver: ``auto`` picks by row count
    (:func:`bge_ray.index.sharded.auto_kind`); flat / HNSW in one Ray task (small corpora), IVF and
    IVF-PQ trained on a sample and filled per group of shards by Ray tasks (:mod:`bge_ray.index.sharded`)."""
    import ray

    from bge_ray.index.sharded import auto_kind, build_ivf_index

    if kind == "auto":
        kind = auto_kind(manifest["rows"])
    if kind in ("ivf", "ivfpq"):
        return build_ivf_index(store, kind, manifest["shards"], manifest["dim"], task_cpus=task_cpus)
    task = ray.remote(num_cpus=1)(build_shard_index)
    return ray.get(task.remote(store, kind, [s["file"] for s in manifest["shards"]]))


def build_shard_index(store: Store | str, kind: str = "flat", files: list[str] | None = None) -> dict:
    """A flat or HNSW faiss index over the shards ``files`` (default: every ``shards/*.parquet``),
    added shard by shard, plus ``ids.parquet`` (row -> id)."""
    from bge_ray.index.faiss_index import build_index, store_index
    from bge_ray.io.shards import to_numpy

    store = Store(store) if isinstance(store, str) else store
    if files is None:
        files = [f"shards/{name}" for name in store.list("shards") if name.endswith(".parquet")]
    if kind not in ("flat", "hnsw"):
        raise ValueError(f"build_shard_index builds flat or hnsw indexes; {kind!r} is built by the cluster "
                         f"(bge_ray.index.sharded.build_ivf_index)")
    ids: list[str] = []
    index = None
    for f in files:
        t = store.read_parquet(f, columns=["id", "embedding"])
        emb = to_numpy(t["embedding"])
        if index is None:
            index = build_index(emb, kind)
        else:
            index.add(emb)
        ids += t["id"].to_pylist()
    store_index(store, index, "index.faiss")
    store.write_parquet("ids.parquet", pa.table({"id": pa.array(ids, pa.string())}))
    return {"kind": kind, "file": "index.faiss", "ids": "ids.parquet", "ntotal": int(index.ntotal)}
