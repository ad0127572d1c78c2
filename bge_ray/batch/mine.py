"""Hard-negative mining (FlagEmbedding's ``scripts/hn_mine.py``) on the Ray embedding path.

Corpus and queries are embedded by the model stage (:func:`bge_ray.batch.stage.embed_rows`), a flat
inner-product faiss index is searched in query chunks, and each line's negatives are sampled from the
candidates ranked ``[start, end)`` that are neither a positive nor the query itself. On top of
FlagEmbedding: a score filter against the best positive (``max_score_ratio`` / ``min_margin``) to
drop likely false negatives, a per-text embedding cache reused across runs, and ``seed``-determinism
that does not depend on chunk sizes or actor counts.

With ``pool_output`` the pool leaves the driver: it is embedded and indexed by the embed job
(:func:`embed_pool`; shards + a flat or cluster-built IVF index in a local, shared or ``s3://``
folder, reused by later runs), and query chunks are searched by searcher actors
(:class:`bge_ray.index.sharded.ClusterIndex`), several chunks in flight.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from bge_ray.batch.stage import PASSAGE, QUERY, embed_rows
from bge_ray.batch.vector_cache import EmbeddingCache, cache_settings, text_hash
from bge_ray.io.training_data import TrainingDataError, read_candidate_pool, read_training_jsonl, write_jsonl
from bge_ray.models.spec import EmbedderSpec

from .cli import actors_for_devices, hf_bool

logger = logging.getLogger(__name__)

#: ``--query_instruction_for_retrieval auto``: take the model registry's default query instruction.
AUTO_INSTRUCTION = "auto"
#: Pools above this size are better embedded and searched on the cluster (``pool_output``).
DRIVER_POOL_ROWS = 2_000_000


# -- embedding: queries and passages in one actor pool, cached -------------------------------------
def embed_roles(ids: Sequence[str], texts: Sequence[str], roles: Sequence[str], spec: EmbedderSpec,
                num_actors: int | None = None, use_gpu: bool | None = None, rows_per_call: int = 1024) -> np.ndarray:
    """Dense vectors of queries and passages (``roles``) from the model stage, in input order;
    ``rows_per_call`` texts per work item."""
    return embed_rows(ids, texts, roles, spec, num_actors, use_gpu, rows_per_item=rows_per_call).dense


@dataclass
class EmbedStats:
    embedded: int = 0
    cached: int = 0


def embed_with_cache(
    groups: dict[str, Sequence[str]],
    spec: EmbedderSpec,
    cache_root: str | None = None,
    embed_fn: Callable[..., np.ndarray] | None = None,
    **embed_kwargs,
) -> tuple[dict[str, np.ndarray], dict[str, EmbedStats]]:
    """Vectors for each role's unique texts (``{"query": [...], "passage": [...]}``), in order.

    Cached vectors are read from ``cache_root``; the rest of every role is embedded in one call of
    ``embed_fn`` (default :func:`embed_roles`: one actor pool, one model load per actor) and cached.
    """
    embed_fn = embed_fn or embed_roles
    found, missing, stats, caches = {}, {}, {}, {}
    for role, texts in groups.items():
        hashes = [text_hash(t) for t in texts]
        caches[role] = EmbeddingCache(cache_root, cache_settings(spec, role)) if cache_root else None
        found[role] = caches[role].get(hashes) if caches[role] else {}
        missing[role] = [(i, hashes[i]) for i in range(len(texts)) if i not in found[role]]
        stats[role] = EmbedStats(embedded=len(missing[role]), cached=len(found[role]))
    todo = [(role, i, h) for role, rows in missing.items() for i, h in rows]
    new = None
    if todo:
        new = embed_fn(
            [f"{role}:{h}" for role, _, h in todo], [groups[role][i] for role, i, _ in todo],
            [role for role, _, _ in todo], spec, **embed_kwargs,
        )
    dims = [new.shape[1]] if new is not None else [next(iter(f.values())).shape[0] for f in found.values() if f]
    out, offset = {}, 0
    for role, texts in groups.items():
        arr = np.empty((len(texts), dims[0] if dims else 0), dtype=np.float32)
        for i, v in found[role].items():
            arr[i] = v
        rows = missing[role]
        if rows:
            block = new[offset : offset + len(rows)]
            arr[[i for i, _ in rows]] = block
            if caches[role]:
                caches[role].put([h for _, h in rows], block)
            offset += len(rows)
        out[role] = arr
    return out, stats


# -- the pool on the cluster: embedded and indexed by the embed job --------------------------------
def embed_pool(passages: Sequence[str], spec: EmbedderSpec, pool_output: str, num_actors: int | None = None,
               use_gpu: bool | None = None, index_kind: str = "auto"):
    """Embed and index ``passages`` (row ``i`` = passage ``i``) with the embed job into
    ``pool_output/<key>``, the key naming the texts, the vector settings and the index kind: a
    complete folder is reused, a partial one (a killed run) resumed. The job's input is written once,
    to ``pool_output/inputs/<key>.jsonl``. Returns ``(store, EmbedStats)``."""
    from bge_ray.batch.embed import run_embed_job
    from bge_ray.io.readers import CorpusSpec
    from bge_ray.io.store import Store
    from bge_ray.models.spec import without_query_options

    # Query options do not change passage vectors: they must not make a resumed pool job "another job".
    spec = without_query_options(spec)
    texts = hashlib.sha256()
    for t in passages:
        texts.update(text_hash(t).encode())
    about = {"texts": texts.hexdigest(), "rows": len(passages), "index": index_kind,
             "settings": cache_settings(spec, PASSAGE)}
    key = hashlib.sha256(json.dumps(about, sort_keys=True, default=str).encode()).hexdigest()[:20]
    root = Store(pool_output)
    job = Store(root.url(key))
    if job.exists("manifest.json") and job.read_json("manifest.json").get("rows") == len(passages):
        logger.info("candidate pool reused from %s (%d rows)", job.uri, len(passages))
        return job, EmbedStats(cached=len(passages))
    source = f"inputs/{key}.jsonl"
    if not root.exists(source):  # content-addressed: never rewritten, so a resumed job sees the same file
        with root.writer(source) as f:
            for i, t in enumerate(passages):
                f.write((json.dumps({"id": str(i), "text": t}, ensure_ascii=False) + "\n").encode())
    result = run_embed_job(CorpusSpec(root.url(source), id_field="id", text_fields=("text",)), job.uri, spec,
                           num_actors=num_actors, use_gpu=use_gpu, index_kind=index_kind)
    if result.rows != len(passages):
        raise RuntimeError(f"pool job {job.uri} embedded {result.rows} rows of {len(passages)}")
    embedded = int(result.manifest.get("embedded_rows", len(passages)))
    return job, EmbedStats(embedded=embedded, cached=len(passages) - embedded)


class _LocalSearch:
    """A faiss index in this process behind :class:`ClusterIndex`'s submit / result / vectors."""

    def __init__(self, index, vectors: np.ndarray):
        self.index, self._vectors = index, vectors

    def submit(self, queries: np.ndarray, k: int):
        return queries

    def result(self, queries: np.ndarray, k: int):
        from bge_ray.index.faiss_index import search

        return search(self.index, queries, k, chunk_size=len(queries))

    def vectors(self, rows) -> np.ndarray:
        return self._vectors[rows]

    def close(self) -> None:
        pass


# -- selection ----------------------------------------------------------------------------------
def parse_range(text: str) -> tuple[int, int]:
    """``"10-210"`` -> ``(10, 210)``: candidates ranked 10 to 209 (0-based), as FlagEmbedding slices."""
    try:
        start, end = (int(x) for x in str(text).split("-"))
    except ValueError:
        raise ValueError(f"range_for_sampling must look like 'START-END' (e.g. '10-210'), got {text!r}") from None
    if not 0 <= start < end:
        raise ValueError(f"range_for_sampling needs 0 <= START < END, got {text!r}")
    return start, end


@dataclass
class MineConfig:
    """Sampling and filtering options (FlagEmbedding's names where it has them)."""

    range_for_sampling: str = "10-210"
    negative_number: int = 15
    max_score_ratio: float | None = None  # keep a candidate only if score <= ratio * best positive score
    min_margin: float | None = None  # keep a candidate only if score <= best positive score - margin
    random_fill: bool = True  # top up short lines with random corpus passages, as FlagEmbedding does
    search_batch_size: int = 64
    use_gpu_for_searching: bool = False
    seed: int = 42

    def threshold(self, best_pos: float) -> float | None:
        """Highest score a candidate may have, or None when no score filter is set."""
        limits = []
        if self.max_score_ratio is not None:
            limits.append(self.max_score_ratio * best_pos)
        if self.min_margin is not None:
            limits.append(best_pos - self.min_margin)
        return min(limits) if limits else None

    @property
    def filters(self) -> bool:
        return self.max_score_ratio is not None or self.min_margin is not None


@dataclass
class Selection:
    ids: list[int]
    from_range: int  # how many of ids came from the rank range (the rest are random fill)
    dropped_by_score: int


def select_negatives(
    ranked: Sequence[int],
    scores: Sequence[float],
    *,
    start: int,
    n: int,
    exclude: set[int],
    threshold: float | None,
    rng: random.Random,
    corpus_size: int,
    score_of: Callable[[int], float] | None = None,
    random_fill: bool = True,
) -> Selection:
    """Sample ``n`` corpus ids for one line from ``ranked[start:]`` (the search's top ``end``).

    As FlagEmbedding: a ``-1`` id ends the list; excluded ids (positives, the query) are skipped;
    more than ``n`` survivors -> ``rng.sample`` of them, else all in rank order, then random fill.
    Unlike FlagEmbedding's fill, ours never repeats a negative, never takes the query, a positive or a
    passage ranked above ``start``, and applies the score filter (``score_of`` gives fill scores).
    """
    cands, dropped = [], 0
    for idx, score in zip(ranked[start:], scores[start:], strict=True):
        if idx < 0:
            break
        if idx in exclude:
            continue
        if threshold is not None and score > threshold:
            dropped += 1
            continue
        cands.append(int(idx))
    chosen = rng.sample(cands, n) if len(cands) > n else cands
    from_range = len(chosen)
    if random_fill and len(chosen) < n:
        blocked = set(exclude) | set(chosen) | {int(i) for i in ranked[:start] if i >= 0}

        def ok(j: int) -> bool:
            if j in blocked:
                return False
            blocked.add(j)
            return threshold is None or score_of is None or score_of(j) <= threshold

        # Rejection sampling keeps a fill O(n) on a large corpus; a tiny corpus falls back to a scan.
        for _ in range(20 * (n - len(chosen)) + 100):
            if len(chosen) == n:
                break
            j = rng.randrange(corpus_size)
            if ok(j):
                chosen.append(j)
        if len(chosen) < n and corpus_size <= 100_000:
            rest = [j for j in range(corpus_size) if j not in blocked]
            rng.shuffle(rest)
            for j in rest:
                if len(chosen) == n:
                    break
                if ok(j):
                    chosen.append(j)
    return Selection(chosen, from_range, dropped)


# -- the job ------------------------------------------------------------------------------------
@dataclass
class MineResult:
    output: str
    lines: int
    corpus_size: int
    negatives: int
    short_lines: int  # lines whose rank range gave fewer than negative_number (topped up when random_fill)
    filled: int  # negatives drawn at random outside the range
    dropped_by_score: int
    passages: EmbedStats = field(default_factory=EmbedStats)
    queries: EmbedStats = field(default_factory=EmbedStats)
    seconds: float = 0.0
    stale_scores_dropped: int = 0  # lines whose input neg_scores were removed with their old negatives

    def summary(self) -> str:
        return (
            f"mined {self.negatives} negatives for {self.lines} lines from a corpus of {self.corpus_size} "
            f"({self.short_lines} lines short of range candidates, {self.filled} random fills, "
            f"{self.dropped_by_score} dropped by score; passages embedded {self.passages.embedded} / cached "
            f"{self.passages.cached}, queries embedded {self.queries.embedded} / cached {self.queries.cached}) "
            f"in {self.seconds:.1f} s -> {self.output}"
            + (f"; dropped stale neg_scores on {self.stale_scores_dropped} lines (re-run teacher scoring)"
               if self.stale_scores_dropped else "")
        )


def _unique(texts) -> list[str]:
    return list(dict.fromkeys(texts))


def _query_instruction(spec: EmbedderSpec, instruction: str | None) -> str | None:
    if instruction != AUTO_INSTRUCTION:
        return instruction
    from bge_ray.models import registry

    found = registry.lookup(spec.model or "all-MiniLM-L6-v2", registry.EMBEDDER)
    return found.query_instruction_for_retrieval if found else None


def _gpu_index(index):
    import faiss

    if not hasattr(faiss, "get_num_gpus") or faiss.get_num_gpus() == 0:
        raise RuntimeError("use_gpu_for_searching was set but faiss sees no GPU (install faiss-gpu)")
    co = faiss.GpuMultipleClonerOptions()
    co.shard, co.useFloat16 = True, True  # as FlagEmbedding: corpus split over all GPUs, fp16 storage
    return faiss.index_cpu_to_all_gpus(index, co=co)


def mine_hard_negatives(
    input_file: str,
    output_file: str,
    spec: EmbedderSpec | None = None,
    config: MineConfig | None = None,
    candidate_pool: str | None = None,
    query_instruction_for_retrieval: str | None = None,
    query_instruction_format: str | None = None,
    query_max_length: int | None = None,
    embedding_cache: str | None = None,
    num_actors: int | None = None,
    use_gpu: bool | None = None,
    rows_per_call: int = 1024,
    embed_fn: Callable[..., np.ndarray] | None = None,
    pool_output: str | None = None,
    pool_index: str = "auto",
    num_searchers: int | None = None,
) -> MineResult:
    """Write ``input_file``'s lines to ``output_file`` with ``neg`` replaced by mined negatives.

    ``spec`` describes the embedder (its ``max_length`` is the passage length); the corpus is
    ``candidate_pool`` if given, else every ``pos`` and ``neg`` passage of the input. Input
    ``neg_scores`` are dropped with the negatives they scored; other fields are kept. Ray must be
    initialised (:func:`bge_ray.batch.runtime.init_ray`).
    """
    from bge_ray.index.faiss_index import build_index

    t0 = time.perf_counter()
    spec = spec or EmbedderSpec()
    config = config or MineConfig()
    start, end = parse_range(config.range_for_sampling)
    n = config.negative_number
    if n < 0:
        raise ValueError(f"negative_number must be >= 0, got {n}")
    if config.max_score_ratio is not None and config.max_score_ratio <= 0:
        raise ValueError(f"max_score_ratio must be > 0, got {config.max_score_ratio}")
    if config.search_batch_size < 1:
        raise ValueError(f"search_batch_size must be >= 1, got {config.search_batch_size}")

    records = read_training_jsonl(input_file)
    if candidate_pool:
        corpus = _unique(read_candidate_pool(candidate_pool))
    else:
        corpus = _unique(p for r in records for p in (*r["pos"], *r.get("neg", [])))
    queries = _unique(r["query"] for r in records)
    # The filter compares with the best positive, so positives outside the pool are embedded too.
    extra_pos = _unique(p for r in records for p in r["pos"]) if config.filters else []
    corpus_set = set(corpus)
    passages = corpus + [p for p in extra_pos if p not in corpus_set]
    logger.info("mining: %d lines, %d queries, corpus %d (+%d positives)", len(records), len(queries),
                len(corpus), len(passages) - len(corpus))

    query_options = {
        "query_instruction_for_retrieval": _query_instruction(spec, query_instruction_for_retrieval),
        "query_instruction_format": query_instruction_format,
        "query_max_length": query_max_length,
    }
    spec = replace(spec, extra={**spec.extra, **{k: v for k, v in query_options.items() if v is not None}})
    embed_kwargs = {"num_actors": num_actors, "use_gpu": use_gpu, "rows_per_call": rows_per_call}
    if pool_output:
        from bge_ray.index.sharded import ClusterIndex

        pool_store, pool_stats = embed_pool(corpus, spec, pool_output, num_actors, use_gpu, pool_index)
        # Positives only for the score filter; queries and positives are small beside the pool.
        positives = _unique(p for r in records for p in r["pos"]) if config.filters else []
        vectors, stats = embed_with_cache({PASSAGE: positives, QUERY: queries}, spec, embedding_cache, embed_fn,
                                          **embed_kwargs)
        stats[PASSAGE] = EmbedStats(pool_stats.embedded + stats[PASSAGE].embedded,
                                    pool_stats.cached + stats[PASSAGE].cached)
        pos_emb, pos_row = vectors[PASSAGE], {t: i for i, t in enumerate(positives)}
        import ray

        searchers = num_searchers or max(1, min(4, int(ray.available_resources().get("CPU", 1))))
        searcher = ClusterIndex(pool_store, num_searchers=searchers)
        in_flight = 2 * len(searcher.actors)
    else:
        if len(corpus) > DRIVER_POOL_ROWS:
            logger.warning("a pool of %d passages is embedded into and searched by this process; pass "
                           "pool_output (--pool_output) to embed and search it on the cluster", len(corpus))
        vectors, stats = embed_with_cache({PASSAGE: passages, QUERY: queries}, spec, embedding_cache, embed_fn,
                                          **embed_kwargs)
        p_emb = vectors[PASSAGE]
        pos_emb, pos_row = p_emb, None
        index = build_index(p_emb[: len(corpus)], "flat")
        if config.use_gpu_for_searching:
            index = _gpu_index(index)
        searcher, in_flight = _LocalSearch(index, p_emb[: len(corpus)]), 1
    q_emb = vectors[QUERY]
    result = MineResult(output_file, len(records), len(corpus), 0, 0, 0, 0, stats[PASSAGE], stats[QUERY])
    text_id = {t: i for i, t in enumerate(passages)}
    pos_row = pos_row or text_id
    query_row = {q: i for i, q in enumerate(queries)}

    def submit(c0: int):
        q_rows = [query_row[r["query"]] for r in records[c0 : c0 + config.search_batch_size]]
        return c0, q_rows, searcher.submit(q_emb[q_rows], end)

    # One chunk of queries x top-`end` at a time (a few in flight on the cluster): memory never holds
    # all queries' results.
    starts = list(range(0, len(records), config.search_batch_size))
    pending = deque(submit(c0) for c0 in starts[:in_flight])
    out = []
    try:
        for nxt in range(in_flight, len(starts) + in_flight):
            c0, q_rows, handle = pending.popleft()
            if nxt < len(starts):
                pending.append(submit(starts[nxt]))
            scores, ids = searcher.result(handle, end)
            for k, rec in enumerate(records[c0 : c0 + config.search_batch_size]):
                qv = q_emb[q_rows[k]]
                exclude = {text_id[p] for p in rec["pos"] if text_id.get(p, len(corpus)) < len(corpus)}
                if text_id.get(rec["query"], len(corpus)) < len(corpus):
                    exclude.add(text_id[rec["query"]])
                threshold = None
                if config.filters:
                    best = float(max(pos_emb[pos_row[p]] @ qv for p in rec["pos"]))
                    threshold = config.threshold(best)
                # Seeded per line (string seeds hash stably), so chunking and actor count never matter.
                rng = random.Random(f"{config.seed}:{c0 + k}")
                sel = select_negatives(
                    ids[k].tolist(), scores[k].tolist(), start=start, n=n, exclude=exclude, threshold=threshold,
                    rng=rng, corpus_size=len(corpus),
                    score_of=lambda j, qv=qv: float(searcher.vectors([j])[0] @ qv),
                    random_fill=config.random_fill,
                )
                new = dict(rec)
                new["neg"] = [corpus[j] for j in sel.ids]
                # Old teacher scores describe the old negatives; keeping them (as FlagEmbedding does)
                # would pair scores with the wrong passages in distillation.
                result.stale_scores_dropped += new.pop("neg_scores", None) is not None
                out.append(new)
                result.negatives += len(sel.ids)
                result.short_lines += sel.from_range < n
                result.filled += len(sel.ids) - sel.from_range
                result.dropped_by_score += sel.dropped_by_score
    finally:
        searcher.close()
    write_jsonl(output_file, out)
    result.seconds = time.perf_counter() - t0
    logger.info(result.summary())
    return result


__all__ = [
    "AUTO_INSTRUCTION", "EmbeddingCache", "embed_pool", "MineConfig", "MineResult", "TrainingDataError",
    "actors_for_devices", "cache_settings", "embed_roles", "embed_with_cache", "hf_bool", "mine_hard_negatives",
    "parse_range", "read_candidate_pool", "read_training_jsonl", "select_negatives", "write_jsonl",
]
