"""Evaluation on Ray: for each dataset and split, embed the corpus with the resumable embed job (its
output folder is the corpus-embedding cache) with the queries riding along on the job's actors (on an
actor pool of their own when the corpus vectors are reused), search, optionally
rerank the top ``rerank_top_k`` on a reranker actor pool, and score with pytrec_eval.

Output layout under ``output_dir`` (FlagEmbedding's, plus per-split reports)::

    {model}/NoReranker/{dataset}-{split}.json        search results + settings (metrics can be recomputed)
    {model}/{reranker}/{dataset}-{split}.json        reranked results
    {model}/{NoReranker|reranker}/EVAL/eval_results.json   {"{dataset}-{split}": metrics}
    {model}/EVAL/{dataset}-{split}.json / .md        search and rerank metrics side by side, data issues, timings

and a summary of every model / reranker in ``output_dir`` at ``eval_output_path`` (markdown or json).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

from bge_ray.batch.embed import QueryBatch
from bge_ray.io.atomic import atomic_path, write_json
from bge_ray.models.spec import EmbedderSpec, RerankerSpec, without_query_options

from . import datasets as ds
from .metrics import evaluate as ir_metrics
from .metrics import parse_metric, qa_recall, recall_cap

logger = logging.getLogger(__name__)

NO_RERANKER = "NoReranker"
SEARCH_METHODS = ("dense", "sparse", "hybrid")
IR_METRICS = ("ndcg", "recall", "map", "precision", "mrr")
AUTO_INSTRUCTION = "auto"


@dataclass
class EvalArgs:
    """What to evaluate and where results go (FlagEmbedding's evaluation argument names)."""

    eval_name: str = "custom"
    dataset_dir: str | None = None
    dataset_names: Sequence[str] | None = None
    splits: Sequence[str] = ("test",)
    corpus_embd_save_dir: str | None = None
    output_dir: str = "./search_results"
    search_top_k: int = 1000
    rerank_top_k: int = 100
    cache_path: str | None = None
    token: str | None = None
    overwrite: bool = False
    force_redownload: bool = False
    ignore_identical_ids: bool = False
    k_values: Sequence[int] = (1, 3, 5, 10, 100, 1000)
    eval_output_method: str = "markdown"
    eval_output_path: str = "./eval_results.md"
    eval_metrics: Sequence[str] = ("ndcg_at_10", "recall_at_10")
    # Query side (FlagEmbedding's model arguments; "auto" takes the model registry's instruction).
    query_instruction_for_retrieval: str | None = None
    query_instruction_format_for_retrieval: str | None = None
    embedder_query_max_length: int = 512
    use_special_instructions: bool = False  # BEIR: per-dataset instructions
    # bge_ray additions
    search_method: str = "dense"  # M3 models: "sparse" or "hybrid" (dense + sparse) too
    hybrid_weights: Sequence[float] = (1.0, 0.3)  # [w_dense, w_sparse]
    benchmark_version: str = "AIR-Bench_24.05"
    metrics_only: bool = False  # recompute metrics from saved search results; never embed
    # Corpus embed job shard size (part of the cache's identity). None: the job's auto size, one shard
    # per actor for small corpora (each shard is length-sorted on its own, so shards stay >= 1024 rows).
    rows_per_shard: int | None = None


@dataclass
class SplitReport:
    dataset: str
    split: str
    queries: int
    judged_queries: int
    search: dict[str, float]
    rerank: dict[str, float] | None = None
    issues: dict[str, int] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)


@dataclass
class EvalReport:
    model: str
    reranker: str | None
    splits: list[SplitReport]
    timings: dict[str, float]
    corpus_embedding: dict[str, dict] = field(default_factory=dict)  # per dataset: cache dir, cached?, rows
    summary_path: str | None = None

    def metrics(self, dataset: str | None = None, split: str | None = None, stage: str = "search") -> dict:
        for r in self.splits:
            if (dataset is None or r.dataset == dataset) and (split is None or r.split == split):
                return r.search if stage == "search" else (r.rerank or {})
        raise KeyError(f"no report for dataset {dataset!r} split {split!r}")

    def summary(self, metrics: Sequence[str] = ("ndcg_at_10", "recall_at_100", "map_at_10")) -> str:
        lines = []
        for r in self.splits:
            for stage, vals in (("search", r.search), ("rerank", r.rerank)):
                if vals:
                    shown = ", ".join(f"{m} {vals[m]:.4f}" for m in metrics if m in vals)
                    lines.append(f"{r.dataset} {r.split} [{stage}] {r.judged_queries} queries: {shown}")
        t = self.timings
        lines.append("time: " + ", ".join(f"{k} {v:.1f} s" for k, v in t.items()))
        return "\n".join(lines)


# -- argument checks ---------------------------------------------------------------------------------
def check_args(args: EvalArgs) -> list[int]:
    """Validate; return the k values metrics are computed at (k_values plus those eval_metrics name)."""
    if args.search_method not in SEARCH_METHODS:
        raise ValueError(f"search_method must be one of {SEARCH_METHODS}, got {args.search_method!r}")
    if args.eval_output_method not in ("json", "markdown"):
        raise ValueError(f"eval_output_method must be 'json' or 'markdown', got {args.eval_output_method!r}")
    for name, v in (("search_top_k", args.search_top_k), ("rerank_top_k", args.rerank_top_k)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if len(args.hybrid_weights) != 2 or sum(args.hybrid_weights) == 0:
        raise ValueError(f"hybrid_weights must be two numbers [w_dense, w_sparse], not both 0; got {list(args.hybrid_weights)}")
    ks = set()
    for k in args.k_values:
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k_values must be positive integers, got {list(args.k_values)}")
        ks.add(k)
    ks |= {parse_metric(m)[1] for m in args.eval_metrics}
    too_deep = sorted(k for k in ks if k > args.search_top_k)
    if too_deep:
        raise ValueError(
            f"metrics asked at k={too_deep} but search_top_k is {args.search_top_k}: a ranking cut at "
            f"{args.search_top_k} cannot give metrics at a deeper k; raise --search_top_k or drop those k "
            f"from --k_values / --eval_metrics"
        )
    return sorted(ks)


def model_name(model: str | None) -> str:
    from bge_ray.models.loading import BUNDLED_MODEL_NAMES

    if model is None or str(model) in BUNDLED_MODEL_NAMES:
        return "all-MiniLM-L6-v2"
    return os.path.basename(os.fspath(model).rstrip("/\\")) or str(model)


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# -- corpus embeddings: the embed job's output folder is the cache --------------------------------
def corpus_cache_dir(root: str, spec: EmbedderSpec, dataset_key: str, outputs: Sequence[str] = ("dense",)) -> str:
    """``root/{model}/{dataset}/{settings}``: one folder per model, dataset, vector-changing settings
    (:func:`bge_ray.batch.vector_cache.cache_settings`) and outputs beyond dense."""
    from bge_ray.batch.stage import PASSAGE
    from bge_ray.batch.vector_cache import cache_settings

    key = cache_settings(spec, PASSAGE)
    if tuple(outputs) != ("dense",):
        key = {**key, "outputs": list(outputs)}
    return os.path.join(root, model_name(spec.model), dataset_key, _digest(key))


def _cache_complete(out: str, corpus_file: str) -> bool:
    """A finished embed job (manifest written) over the very same corpus file (size and mtime)."""
    from bge_ray.io.sharding import file_fingerprint

    plan_file, manifest = os.path.join(out, "plan.json"), os.path.join(out, "manifest.json")
    if not (os.path.isfile(plan_file) and os.path.isfile(manifest)):
        return False
    if not (os.path.isfile(os.path.join(out, "index.faiss")) and os.path.isfile(os.path.join(out, "ids.parquet"))):
        return False
    with open(plan_file, encoding="utf-8") as f:
        files = json.load(f).get("files")
    return files == [file_fingerprint(os.path.abspath(corpus_file), None)]


def embed_corpus_cached(
    corpus_file: str,
    spec: EmbedderSpec,
    out: str,
    num_actors: int | None = None,
    use_gpu: bool | None = None,
    rows_per_shard: int | None = None,
    queries: QueryBatch | None = None,
    outputs: Sequence[str] = ("dense",),
) -> dict:
    """Run (or resume, or reuse) the embed job for ``corpus_file`` into ``out``; return what happened.

    ``queries`` ride along on the job's actors (``"query_vectors"`` in the result, with the same
    ``outputs``); when the corpus vectors are reused they get an actor pool of their own.
    """
    from bge_ray.batch.embed import plan_job, run_embed_job
    from bge_ray.io.readers import CorpusSpec
    from bge_ray.io.sharding import plan_digest

    corpus = CorpusSpec(path=os.path.abspath(corpus_file))
    if _cache_complete(out, corpus_file):
        with open(os.path.join(out, "manifest.json"), encoding="utf-8") as f:
            manifest = json.load(f)
        logger.info("corpus embeddings reused from %s (%d rows)", out, manifest.get("rows", -1))
        info = {"dir": out, "cached": True, "rows": manifest.get("rows"), "embed_seconds": 0.0, "job_seconds": 0.0}
        if queries is not None:
            info["query_vectors"] = embed_queries(queries.ids, queries.texts, queries.spec, num_actors, use_gpu,
                                                  outputs)
        return info
    stale = False
    plan_file = os.path.join(out, "plan.json")
    if os.path.isfile(plan_file):
        with open(plan_file, encoding="utf-8") as f:
            old_plan = json.load(f)
        # Same rule as the job: without an explicit size, a resumed run keeps the stored one.
        size = rows_per_shard or old_plan.get("rows_per_shard")
        stale = old_plan.get("digest") != plan_digest(plan_job(corpus, spec, size, outputs=tuple(outputs)))
        if stale:
            logger.info("corpus embedding cache %s was made by other settings or another corpus file: re-embedding", out)
    t0 = time.perf_counter()
    result = run_embed_job(corpus, out, spec, num_actors=num_actors, use_gpu=use_gpu, rows_per_shard=rows_per_shard,
                           index_kind="flat", overwrite=stale, queries=queries, outputs=tuple(outputs))
    logger.info(result.summary())
    info = {"dir": out, "cached": False, "rows": result.rows, "tokens": result.tokens,
            "embed_seconds": float(result.manifest.get("embed_seconds", 0.0)),
            "job_seconds": time.perf_counter() - t0, "skipped_shards": result.manifest.get("skipped_shards", 0)}
    if queries is not None:
        info["query_vectors"] = result.query_vectors
    return info


def load_corpus_index(out: str):
    """``(doc_ids, index)`` from an embed job's output: its merged faiss index, or its sharded parts."""
    from bge_ray.index.sharded import open_index

    return open_index(out)


# -- query embeddings ---------------------------------------------------------------------------------
def query_spec(spec: EmbedderSpec, args: EvalArgs, instruction: str | None) -> EmbedderSpec:
    """``spec`` with the query options the actors' ``encode_queries`` reads."""
    options = {
        "query_instruction_for_retrieval": instruction,
        "query_instruction_format": args.query_instruction_format_for_retrieval,
        "query_max_length": args.embedder_query_max_length,
    }
    return replace(spec, extra={**spec.extra, **{k: v for k, v in options.items() if v is not None}})


def _instruction(spec: EmbedderSpec, args: EvalArgs, dataset: str | None) -> str | None:
    special = ds.special_instruction(args.eval_name, dataset) if args.use_special_instructions else None
    if special:  # BEIR / BRIGHT per-dataset instructions
        return special
    if args.query_instruction_for_retrieval == AUTO_INSTRUCTION:
        from bge_ray.models import registry

        found = registry.lookup(spec.model or "all-MiniLM-L6-v2", registry.EMBEDDER)
        return found.query_instruction_for_retrieval if found else None
    return args.query_instruction_for_retrieval


def embed_queries(qids: list[str], texts: list[str], spec: EmbedderSpec, num_actors=None, use_gpu=None,
                  outputs: Sequence[str] = ("dense",)):
    """Query outputs (:class:`bge_ray.batch.stage.Vectors`) from the model stage through the model's
    ``encode_queries``, in ``qids`` order (for when no corpus job runs: its actors embed the queries otherwise)."""
    from bge_ray.batch.stage import QUERY, embed_rows

    return embed_rows(qids, texts, [QUERY] * len(qids), spec, num_actors, use_gpu, outputs)


# -- reranking on an actor pool -------------------------------------------------------------------------
class RayReranker:
    """``compute_score(pairs)`` on a Ray actor pool, for :func:`bge_ray.eval.searchers.rerank`."""

    def __init__(self, spec: RerankerSpec, num_actors: int | None = None, use_gpu: bool | None = None):
        self.spec, self.num_actors, self.use_gpu = spec, num_actors, use_gpu

    def compute_score(self, pairs, **_):
        from bge_ray.batch.stage import score_pairs

        return score_pairs(list(pairs), self.spec, self.num_actors, self.use_gpu)


# -- result files ---------------------------------------------------------------------------------------
def save_results(path: str, results: dict, meta: dict) -> None:
    """FlagEmbedding's search-result file (its keys first), written atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump({**meta, "search_results": results}, f)


def load_results(path: str) -> tuple[dict, dict]:
    """``(meta, results)`` from a search-result file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not a valid search-result file ({exc.msg})") from None
    if "search_results" not in data:
        raise ValueError(f"{path}: no 'search_results' key; not a search-result file")
    return data, data.pop("search_results")


def _reusable(path: str, settings: dict, args: EvalArgs) -> dict | None:
    if not os.path.isfile(path) or (args.overwrite and not args.metrics_only):
        return None
    meta, results = load_results(path)
    if meta.get("settings") != settings:
        if args.metrics_only:
            logger.warning("%s was searched with other settings; --metrics_only uses it anyway", path)
            return results
        logger.info("%s was made with other settings: searching again", path)
        return None
    return results


def _update_eval_file(path: str, key: str, metrics: dict) -> None:
    data = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    data[key] = metrics
    write_json(path, data)


def split_markdown(report: SplitReport, model: str, reranker: str | None, metrics: Sequence[str]) -> str:
    """One dataset split: metrics as rows, search (and rerank) as columns."""
    head = f"# {report.dataset} / {report.split}\n\n"
    head += f"{report.queries} queries, {report.judged_queries} judged; embedder {model}"
    head += f", reranker {reranker}\n\n" if reranker else "\n\n"
    cols = ["search"] + (["rerank"] if report.rerank else [])
    lines = [f"| metric | {' | '.join(cols)} |", "| :--- |" + " ---: |" * len(cols)]
    for m in metrics:
        vals = [report.search.get(m)] + ([report.rerank.get(m)] if report.rerank else [])
        lines.append(f"| {m} | " + " | ".join("-" if v is None else f"{v:.4f}" for v in vals) + " |")
    text = head + "\n".join(lines) + "\n"
    if report.issues:
        text += "\nData issues (warned, not fatal): " + ", ".join(f"{k} {v}" for k, v in report.issues.items()) + "\n"
    return text


def write_summary(output_dir: str, path: str, method: str, metrics: Sequence[str]) -> str:
    """Every ``{model}/{reranker}/EVAL/eval_results.json`` under ``output_dir``: FlagEmbedding's tables."""
    table: dict[str, dict[str, dict]] = {}
    for model in sorted(os.listdir(output_dir)) if os.path.isdir(output_dir) else []:
        mdir = os.path.join(output_dir, model)
        for rr in sorted(os.listdir(mdir)) if os.path.isdir(mdir) else []:
            f = os.path.join(mdir, rr, "EVAL", "eval_results.json")
            if os.path.isfile(f):
                with open(f, encoding="utf-8") as fh:
                    table.setdefault(model, {})[rr] = json.load(fh)
    if method == "json":
        write_json(path, table)
        return path
    keys = sorted({k for m in table.values() for r in m.values() for k in r})
    out = []
    for metric in metrics:
        rows = [(m, r, res) for m, rs in table.items() for r, res in rs.items()]
        vals = {(m, r): [res.get(k, {}).get(metric) for k in keys] for m, r, res in rows}
        avg = {mr: (sum(v) / len(v) if v and all(x is not None for x in v) else None) for mr, v in vals.items()}
        cols = ["average", *keys]
        cells = {mr: [avg[mr], *v] for mr, v in vals.items()}
        best = [max((c[i] for c in cells.values() if c[i] is not None), default=None) for i in range(len(cols))]
        out.append(f"## {metric}\n\n| Model | Reranker | {' | '.join(cols)} |\n| :---- | :---- | "
                   + " | ".join(":---:" for _ in cols) + " |")
        for (m, r), c in cells.items():
            shown = ["-" if v is None else (f"**{v * 100:.3f}**" if v == best[i] else f"{v * 100:.3f}")
                     for i, v in enumerate(c)]
            out.append(f"| {m} | {r} | " + " | ".join(shown) + " |")
        out.append("")
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(out) + "\n")
    return path


# -- the run ----------------------------------------------------------------------------------------------
class _Clock:
    def __init__(self):
        self.t: dict[str, float] = {}

    def add(self, key: str, since: float) -> float:
        now = time.perf_counter()
        self.t[key] = self.t.get(key, 0.0) + now - since
        return now


def compute_metrics(data: ds.SplitData, results: dict, ks: Sequence[int], corpus: dict[str, str]) -> dict[str, float]:
    """IR metrics over the split's qrels (pytrec_eval) and, with answers (MKQA), qa_recall."""
    out: dict[str, float] = {}
    if data.qrels:
        out.update(ir_metrics(data.qrels, results, ks, IR_METRICS))
        out.update(recall_cap(data.qrels, results, ks))
    if data.answers:
        out.update(qa_recall(data.answers, results, corpus.__getitem__, ks))
    return out


def run_evaluation(
    args: EvalArgs,
    embedder: EmbedderSpec | None = None,
    reranker: RerankerSpec | None = None,
    num_actors: int | None = None,
    use_gpu: bool | None = None,
    address: str | None = None,
) -> EvalReport:
    """Evaluate ``embedder`` (and ``reranker``) on every dataset and split ``args`` names.

    Joins the Ray cluster at ``address`` (or ``RAY_ADDRESS``), else starts a private local one,
    unless Ray is already initialised; ``metrics_only`` runs need no Ray.
    """
    clock = _Clock()
    t = time.perf_counter()
    embedder = embedder or EmbedderSpec()
    ks = check_args(args)
    if args.search_method != "dense":
        from .m3_embed import is_m3

        if not is_m3(embedder):
            raise ValueError(
                f"search_method {args.search_method!r} needs an M3 model (BGEM3FlagModel: lexical weights); "
                f"{embedder.model or 'the bundled model'} is not one (pass --embedder_model_class encoder-only-m3 "
                f"if it is)")
    if reranker is not None and args.rerank_top_k > args.search_top_k:
        logger.warning("rerank_top_k %d > search_top_k %d: reranking all %d results",
                       args.rerank_top_k, args.search_top_k, args.search_top_k)
    extra = {"benchmark_version": args.benchmark_version} if args.eval_name == "air_bench" else {}
    bench = ds.get_benchmark(args.eval_name, args.dataset_dir, cache_dir=args.cache_path, token=args.token,
                             force_redownload=args.force_redownload, **extra)
    names = ds.resolve_names(bench, args.dataset_names)
    plan = [(n, bench.ensure(n, args.splits)) for n in names]  # every name and split checked before any work
    t = clock.add("load_data", t)
    if not args.metrics_only:
        import ray

        from bge_ray.batch.runtime import init_ray

        if not ray.is_initialized():
            init_ray(address)
        t = clock.add("ray_init", t)
    model = model_name(embedder.model)
    rname = model_name(reranker.model) if reranker else None
    report = EvalReport(model, rname, [], clock.t)
    for name, splits in plan:
        _run_dataset(args, bench, name, splits, embedder, reranker, ks, num_actors, use_gpu, clock, report)
    t = time.perf_counter()
    os.makedirs(os.path.dirname(os.path.abspath(args.eval_output_path)), exist_ok=True)
    report.summary_path = write_summary(args.output_dir, args.eval_output_path, args.eval_output_method,
                                        args.eval_metrics)
    clock.add("io", t)
    return report


def _run_dataset(args, bench, name, splits, embedder, reranker, ks, num_actors, use_gpu, clock, report):
    t = time.perf_counter()
    corpus_file = bench.corpus_file(name)
    corpus = ds.read_corpus(corpus_file)
    data = {s: bench.load(name, s, corpus) for s in splits}
    display = next(iter(data.values())).dataset
    t = clock.add("load_data", t)

    model, rname = report.model, report.reranker
    instruction = _instruction(embedder, args, name)
    qspec = query_spec(embedder, args, instruction)
    from bge_ray.batch.stage import PASSAGE, QUERY
    from bge_ray.batch.vector_cache import cache_settings

    settings = {
        "corpus": os.path.abspath(corpus_file), "corpus_size": os.path.getsize(corpus_file),
        "corpus_mtime_ns": os.stat(corpus_file).st_mtime_ns,
        "passage": _digest(cache_settings(without_query_options(embedder), PASSAGE)),
        "query": _digest(cache_settings(qspec, QUERY)), "search_top_k": args.search_top_k,
        "ignore_identical_ids": args.ignore_identical_ids, "search_method": args.search_method,
        "hybrid_weights": list(args.hybrid_weights) if args.search_method == "hybrid" else None,
    }
    meta = {"eval_name": args.eval_name, "model_name": model, "reranker_name": NO_RERANKER, "dataset_name": display}
    search_dir = os.path.join(args.output_dir, model, NO_RERANKER)
    paths = {s: os.path.join(search_dir, f"{display.replace('/', '_')}-{s}.json") for s in splits}
    results: dict[str, dict] = {}
    for s in splits:
        got = _reusable(paths[s], settings, args)
        if got is not None:
            results[s] = got
    todo = [s for s in splits if s not in results]
    t = clock.add("io", t)
    if todo and args.metrics_only:
        raise FileNotFoundError(f"--metrics_only: no saved search results for {display} splits {todo} "
                                f"(expected {[paths[s] for s in todo]})")
    if todo:
        run, mode_scores = _search(args, bench, name, display, corpus_file, corpus, data, todo, embedder, qspec,
                                   num_actors, use_gpu, clock, report)
        t = time.perf_counter()
        for s in todo:
            results[s] = ds.drop_excluded(data[s], {q: run[q] for q in data[s].queries})  # BRIGHT excluded_ids
            extra = {}
            if mode_scores:  # hybrid: each mode's score of the same documents
                extra["mode_scores"] = {m: {q: r[q] for q in data[s].queries} for m, r in mode_scores.items()}
                extra["hybrid_weights"] = dict(zip(("dense", "sparse"), map(float, args.hybrid_weights), strict=False))
            save_results(paths[s], results[s], {**meta, "split": s, "settings": settings, **extra})
        t = clock.add("io", t)

    reranked: dict[str, dict] = {}
    if reranker is not None:
        rsettings = {**settings, "reranker": _digest({k: v for k, v in asdict(reranker).items() if k != "batch_size"}),
                     "rerank_top_k": args.rerank_top_k}
        rdir = os.path.join(args.output_dir, model, rname)
        rpaths = {s: os.path.join(rdir, os.path.basename(paths[s])) for s in splits}
        for s in splits:
            got = _reusable(rpaths[s], rsettings, args)
            if got is not None:
                reranked[s] = got
        rtodo = [s for s in splits if s not in reranked]
        t = clock.add("io", t)
        if rtodo and args.metrics_only:
            raise FileNotFoundError(f"--metrics_only: no saved rerank results for {display} splits {rtodo}")
        if rtodo:
            from .searchers import rerank

            union = {q: r for s in rtodo for q, r in results[s].items()}
            queries = {q: x for s in rtodo for q, x in data[s].queries.items()}
            out = rerank(RayReranker(reranker, num_actors, use_gpu), queries, corpus, union,
                         top_k=args.rerank_top_k, ignore_identical_ids=args.ignore_identical_ids)
            t = clock.add("rerank", t)
            for s in rtodo:
                reranked[s] = {q: out[q] for q in data[s].queries}
                save_results(rpaths[s], reranked[s], {**meta, "reranker_name": rname, "split": s,
                                                      "settings": rsettings})
            t = clock.add("io", t)

    for s in splits:
        t = time.perf_counter()
        d = data[s]
        m_search = compute_metrics(d, results[s], ks, corpus)
        m_rerank = compute_metrics(d, reranked[s], ks, corpus) if s in reranked else None
        t = clock.add("metrics", t)
        key = f"{display}-{s}"
        judged = sum(q in d.queries for q in (d.qrels or d.answers or {}))
        rep = SplitReport(display, s, len(d.queries), judged, m_search, m_rerank, dict(d.issues))
        _update_eval_file(os.path.join(search_dir, "EVAL", "eval_results.json"), key, m_search)
        if m_rerank is not None:
            _update_eval_file(os.path.join(args.output_dir, model, rname, "EVAL", "eval_results.json"), key, m_rerank)
        base = os.path.join(args.output_dir, model, "EVAL", key.replace("/", "_"))
        shown = list(dict.fromkeys([*args.eval_metrics, *sorted(m_search, key=_metric_order)]))
        write_json(base + ".json", {
            "dataset": display, "split": s, "model": model, "reranker": rname, "queries": rep.queries,
            "judged_queries": judged, "search": m_search, "rerank": m_rerank, "issues": d.issues,
            "issue_examples": d.issue_examples, "settings": settings,
            "corpus_embedding": report.corpus_embedding.get(display), "timings_so_far": dict(clock.t),
        })
        with atomic_path(base + ".md") as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.write(split_markdown(rep, model, rname, shown))
        rep.files = {"search_results": paths[s], "metrics_json": base + ".json", "metrics_md": base + ".md"}
        report.splits.append(rep)
        clock.add("io", t)


def _metric_order(name: str) -> tuple:
    base, k = parse_metric(name)
    order = ["ndcg", "recall", "map", "precision", "mrr", "recall_cap", "qa_recall"]
    return (order.index(base) if base in order else 99, k)


def _search(args, bench, name, display, corpus_file, corpus, data, todo, embedder, qspec, num_actors, use_gpu, clock,
            report):
    """Embed corpus (cached) and the queries of ``todo`` splits, then search: ``(run, mode_scores)``."""
    from .searchers import dense_search

    t = time.perf_counter()
    key = "corpus" if bench.shared_corpus else display.replace("/", "_")
    cspec = without_query_options(embedder)
    from .m3_embed import is_m3

    if is_m3(embedder):
        return _search_m3(args, corpus_file, corpus, key, data, todo, cspec, qspec, num_actors, use_gpu, clock, report,
                          display, t)
    tmp = None
    if args.corpus_embd_save_dir:
        out = corpus_cache_dir(args.corpus_embd_save_dir, cspec, key)
    else:
        tmp = out = tempfile.mkdtemp(prefix="bge_ray_eval_corpus_")
    queries: dict[str, str] = {}
    for s in todo:
        queries.update(data[s].queries)
    qids = list(queries)
    qtexts = [queries[q] for q in qids]
    try:
        info = embed_corpus_cached(corpus_file, cspec, out, num_actors, use_gpu, args.rows_per_shard,
                                   queries=QueryBatch(qids, qtexts, qspec))
        q_emb = info.pop("query_vectors").dense
        # The corpus job's actors embed the queries too; a reused corpus leaves only the queries to embed.
        t = clock.add("query_embed" if info["cached"] else "corpus_embed", t)
        clock.t["corpus_embed_in_actors"] = clock.t.get("corpus_embed_in_actors", 0.0) + info["embed_seconds"]
        report.corpus_embedding[display] = info
        doc_ids, index = load_corpus_index(out)
        t = clock.add("io", t)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    run = dense_search(q_emb, qids, index, doc_ids, args.search_top_k, args.ignore_identical_ids)
    clock.add("search", t)
    return run, None


def _search_m3(args, corpus_file, corpus, key, data, todo, cspec, qspec, num_actors, use_gpu, clock, report, display, t):
    """M3: the embed job writes dense vectors and lexical weights (its folder is the cache) with the
    queries riding along, then dense, sparse or hybrid search; hybrid also returns each mode's score
    of the returned documents."""
    from .m3_embed import M3Vectors
    from .searchers import SparseIndex, dense_search, hybrid_search

    outputs = ("dense", "sparse")
    queries: dict[str, str] = {}
    for s in todo:
        queries.update(data[s].queries)
    qids = list(queries)
    tmp = None
    if args.corpus_embd_save_dir:
        out = corpus_cache_dir(args.corpus_embd_save_dir, cspec, key, outputs)
    else:
        tmp = out = tempfile.mkdtemp(prefix="bge_ray_eval_corpus_")
    try:
        info = embed_corpus_cached(corpus_file, cspec, out, num_actors, use_gpu, args.rows_per_shard,
                                   queries=QueryBatch(qids, [queries[q] for q in qids], qspec), outputs=outputs)
        qs = M3Vectors.from_vectors(info.pop("query_vectors"))
        docs = M3Vectors.from_shards(out, list(corpus))
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    report.corpus_embedding[display] = info
    t = clock.add("corpus_embed", t)  # corpus and queries embed together here
    top_k, same = args.search_top_k, args.ignore_identical_ids
    mode_scores = None
    if args.search_method == "dense":
        run = dense_search(qs.dense, qs.ids, docs.dense, docs.ids, top_k, same)
    elif args.search_method == "sparse":
        run = SparseIndex(docs.lexical, docs.ids).search(qs.lexical, qs.ids, top_k, same)
    else:
        fused = hybrid_search(qs.ids, docs.ids, top_k, query_emb=qs.dense, index_or_corpus_emb=docs.dense,
                              query_weights=qs.lexical, sparse_index=SparseIndex(docs.lexical, docs.ids),
                              weights=list(args.hybrid_weights), ignore_identical_ids=same)
        run, mode_scores = fused.results, fused.mode_scores
    clock.add("search", t)
    return run, mode_scores
