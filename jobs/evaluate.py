"""Evaluate an embedder (and optionally a reranker) on retrieval datasets, on Ray; FlagEmbedding's
evaluation arguments.

    python jobs/evaluate.py --eval_name custom --dataset_dir ../shared/data/beir/msmarco-subset \\
        --splits test --search_top_k 100 --k_values 10 100 \\
        --eval_metrics ndcg_at_10 recall_at_100 map_at_10 --pooling_method mean \\
        --embedder_query_max_length 256 --embedder_passage_max_length 256 --embedder_batch_size 64 \\
        --corpus_embd_save_dir cache/corpus_emb --output_dir eval_out --eval_output_path eval_out/results.md
    python jobs/evaluate.py --eval_name beir --dataset_dir data/beir --dataset_names scifact nfcorpus \\
        --embedder_name_or_path BAAI/bge-base-en-v1.5 --query_instruction_for_retrieval auto \\
        --reranker_name_or_path BAAI/bge-reranker-base --rerank_top_k 100 --devices cuda:0 cuda:1
    ray job submit --working-dir . -- python jobs/evaluate.py ...

Without --embedder_name_or_path the bundled all-MiniLM-L6-v2 is evaluated. --eval_name picks the
dataset family: custom (local folders, BEIR or FlagEmbedding layout), beir, msmarco, miracl, mkqa,
mldr, air_bench, bright (these download what is missing into --dataset_dir where a hub is reachable),
or mteb (MTEB / C-MTEB tasks by --tasks / --languages / --task_types, through the mteb package).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bge_ray.batch.cli import MAX_TOKENS_HELP, actors_for_devices, hf_bool  # noqa: E402
from bge_ray.eval.datasets import BENCHMARKS, DatasetError, get_benchmark  # noqa: E402
from bge_ray.eval.runner import SEARCH_METHODS, EvalArgs, run_evaluation  # noqa: E402
from bge_ray.models.registry import EMBEDDER_CLASSES, RERANKER_CLASSES  # noqa: E402
from bge_ray.models.spec import (
    EmbedderSpec,  # noqa: E402
    RerankerSpec,  # noqa: E402
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    flag = {"type": hf_bool, "nargs": "?", "const": True}
    e = p.add_argument_group("evaluation (FlagEmbedding AbsEvalArgs)")
    e.add_argument("--eval_name", default="custom", choices=sorted([*BENCHMARKS, *EXTRA_EVAL_NAMES]))
    e.add_argument("--dataset_dir", default=None, help="local datasets (or where downloads are saved)")
    e.add_argument("--dataset_names", nargs="+", default=None, help="default: every dataset there")
    e.add_argument("--splits", nargs="+", default=None, help="default: test (bright: examples; air_bench: dev test)")
    e.add_argument("--corpus_embd_save_dir", default=None, help="corpus embedding cache (reused across runs)")
    e.add_argument("--output_dir", default="./search_results")
    e.add_argument("--search_top_k", type=int, default=1000)
    e.add_argument("--rerank_top_k", type=int, default=100)
    e.add_argument("--cache_path", default=None, help="download cache")
    e.add_argument("--token", default=os.environ.get("HF_TOKEN"))
    e.add_argument("--overwrite", default=False, **flag, help="search again even where results are saved")
    e.add_argument("--force_redownload", default=False, **flag)
    e.add_argument("--ignore_identical_ids", default=False, **flag)
    e.add_argument("--k_values", type=int, nargs="+", default=[1, 3, 5, 10, 100, 1000])
    e.add_argument("--eval_output_method", default="markdown", choices=["json", "markdown"])
    e.add_argument("--eval_output_path", default="./eval_results.md")
    e.add_argument("--eval_metrics", nargs="+", default=["ndcg_at_10", "recall_at_10"])
    e.add_argument("--use_special_instructions", default=None, **flag,
                   help="per-dataset / per-task instructions (beir, bright, mteb); default: on for bright only")
    e.add_argument("--benchmark_version", default="AIR-Bench_24.05", help="air_bench only")
    b = p.add_argument_group("task selection (FlagEmbedding's MTEB, BRIGHT and AIR-Bench arguments)")
    b.add_argument("--languages", nargs="+", default=None, help="mteb: e.g. eng, zho (C-MTEB); air_bench: en zh ...")
    b.add_argument("--tasks", nargs="+", default=None, help="mteb task names, e.g. NFCorpus SciDocsRR T2Retrieval")
    b.add_argument("--task_types", nargs="+", default=None, help="mteb: Retrieval STS ...; air_bench: qa long-doc")
    b.add_argument("--domains", nargs="+", default=None, help="air_bench: wiki web arxiv ...")
    b.add_argument("--task_type", default="short", choices=["short", "long"], help="bright: short or long documents")
    b.add_argument("--examples_path", default=None, help="mteb: folder of {task}.json / {task}.csv few-shot examples")
    m = p.add_argument_group("models (FlagEmbedding AbsEvalModelArgs)")
    m.add_argument("--embedder_name_or_path", default=None, help="default: the bundled all-MiniLM-L6-v2")
    m.add_argument("--embedder_model_class", default=None, choices=sorted(EMBEDDER_CLASSES))
    m.add_argument("--normalize_embeddings", default=True, **flag)
    m.add_argument("--pooling_method", default=None, choices=["cls", "mean", "last_token"],
                   help="default: from the model registry / checkpoint")
    m.add_argument("--use_fp16", default=True, **flag, help="fp16 on GPU (CPU runs fp32)")
    m.add_argument("--use_bf16", default=False, **flag)
    m.add_argument("--devices", nargs="+", default=None, help="e.g. cuda:0 cuda:1: one actor per device")
    m.add_argument("--query_instruction_for_retrieval", default=None,
                   help="prepended to queries; 'auto' takes the model registry's default")
    m.add_argument("--query_instruction_format_for_retrieval", default=None, help="default: registry's, else {}{}")
    m.add_argument("--examples_for_task", default=None, help="ICL embedders: few-shot examples")
    m.add_argument("--examples_instruction_format", default=None)
    m.add_argument("--trust_remote_code", default=False, **flag)
    m.add_argument("--cache_dir", default=None, help="model download cache")
    m.add_argument("--embedder_batch_size", type=int, default=256)
    m.add_argument("--max_tokens_per_batch", type=int, default=None, help=MAX_TOKENS_HELP)
    m.add_argument("--embedder_query_max_length", type=int, default=512)
    m.add_argument("--embedder_passage_max_length", type=int, default=512)
    m.add_argument("--truncate_dim", type=int, default=None)
    m.add_argument("--reranker_name_or_path", default=None)
    m.add_argument("--reranker_model_class", default=None, choices=sorted(RERANKER_CLASSES))
    m.add_argument("--reranker_batch_size", type=int, default=128)
    m.add_argument("--reranker_query_max_length", type=int, default=None)
    m.add_argument("--reranker_max_length", type=int, default=512)
    m.add_argument("--normalize", default=False, **flag, help="sigmoid on reranker scores")
    m.add_argument("--query_instruction_for_rerank", default=None)
    m.add_argument("--query_instruction_format_for_rerank", default="{}{}")
    m.add_argument("--passage_instruction_for_rerank", default=None)
    m.add_argument("--passage_instruction_format_for_rerank", default="{}{}")
    m.add_argument("--prompt", default=None, help="LLM rerankers")
    m.add_argument("--cutoff_layers", type=int, nargs="+", default=None)
    m.add_argument("--compress_ratio", type=int, default=None)
    m.add_argument("--compress_layers", type=int, nargs="+", default=None)
    x = p.add_argument_group("bge_ray additions")
    x.add_argument("--search_method", default="dense", choices=SEARCH_METHODS, help="sparse / hybrid: M3 models")
    x.add_argument("--hybrid_weights", type=float, nargs="+", default=[1.0, 0.3], help="w_dense w_sparse")
    x.add_argument("--metrics_only", default=False, **flag, help="recompute metrics from saved search results")
    x.add_argument("--rows_per_shard", type=int, default=0,
                   help="corpus embedding job shard size (default 0: the job's auto size, a shard per actor "
                        "for small corpora, 50,000-row shards for large ones)")
    x.add_argument("--num_actors", type=int, default=None, help="embedding / reranking actors (default: one per GPU, else one single-threaded actor per core, up to 8)")
    x.add_argument("--use_gpu", default=None, **flag, help="default: if the cluster has GPUs")
    x.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a new local Ray)")
    return p.parse_args(argv)


EXTRA_EVAL_NAMES = ("mteb", "bright")  # bright: bright_short / bright_long by --task_type


def _resolve_selection(a) -> None:
    """Per-eval_name defaults and selections: bright's variant, splits, instructions, AIR-Bench datasets."""
    if a.eval_name == "bright":
        a.eval_name = f"bright_{a.task_type}"
    if a.use_special_instructions is None:
        a.use_special_instructions = a.eval_name.startswith("bright_")
    if a.splits is None:
        a.splits = {"air_bench": ["dev", "test"]}.get(a.eval_name, ["examples"] if a.eval_name.startswith("bright_")
                                                          else ["test"])
    if a.eval_name == "air_bench" and (a.task_types or a.domains or a.languages):
        bench = get_benchmark("air_bench", a.dataset_dir, benchmark_version=a.benchmark_version)
        chosen = bench.select(a.task_types, a.domains, a.languages, a.splits)
        a.dataset_names = [n for n in chosen if not a.dataset_names or n in a.dataset_names]
        if not a.dataset_names:
            raise DatasetError(f"no {a.benchmark_version} dataset matches task_types={a.task_types} domains={a.domains} "
                               f"languages={a.languages} splits={a.splits}")


def _run_mteb(a, embedder, num_actors, use_gpu) -> int:
    from bge_ray.eval.mteb_runner import MtebArgs, run_mteb

    args = MtebArgs(
        languages=a.languages, tasks=a.tasks, task_types=a.task_types,
        use_special_instructions=bool(a.use_special_instructions),
        examples_path=a.examples_path, output_dir=a.output_dir, eval_output_method=a.eval_output_method,
        eval_output_path=a.eval_output_path, overwrite=a.overwrite,
        query_instruction_for_retrieval=a.query_instruction_for_retrieval,
        query_instruction_format_for_retrieval=_unescape(a.query_instruction_format_for_retrieval),
        embedder_query_max_length=a.embedder_query_max_length,
    )
    try:
        report = run_mteb(args, embedder, num_actors=num_actors, use_gpu=use_gpu, address=a.address)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report.text())
    print(f"mteb results: {report.results_dir}; summary: {report.summary_path}")
    return 0


def _unescape(text: str | None) -> str | None:
    return text.replace("\\n", "\n") if text else text


def main(argv=None) -> int:
    a = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    num_actors, use_gpu = actors_for_devices(a.devices)
    num_actors = a.num_actors or num_actors
    use_gpu = a.use_gpu if a.use_gpu is not None else use_gpu
    extra = {"trust_remote_code": a.trust_remote_code}
    if a.use_bf16:
        extra["use_bf16"] = True
    for key in ("cache_dir", "truncate_dim", "examples_for_task"):
        if getattr(a, key) is not None:
            extra[key] = getattr(a, key)
    if a.examples_instruction_format:
        extra["examples_instruction_format"] = _unescape(a.examples_instruction_format)
    embedder = EmbedderSpec(
        model=a.embedder_name_or_path, model_class=a.embedder_model_class, pooling_method=a.pooling_method,
        normalize_embeddings=a.normalize_embeddings, use_fp16=a.use_fp16, max_length=a.embedder_passage_max_length,
        batch_size=a.embedder_batch_size, max_tokens_per_batch=a.max_tokens_per_batch, extra=extra,
    )
    reranker = None
    if a.reranker_name_or_path:
        rextra = {k: getattr(a, k) for k in ("prompt", "cutoff_layers", "compress_ratio", "compress_layers", "cache_dir")
                  if getattr(a, k) is not None}
        reranker = RerankerSpec(
            model=a.reranker_name_or_path, model_class=a.reranker_model_class, use_fp16=a.use_fp16,
            use_bf16=a.use_bf16, batch_size=a.reranker_batch_size, query_max_length=a.reranker_query_max_length,
            max_length=a.reranker_max_length, normalize=a.normalize,
            query_instruction_for_rerank=a.query_instruction_for_rerank,
            query_instruction_format=_unescape(a.query_instruction_format_for_rerank),
            passage_instruction_for_rerank=a.passage_instruction_for_rerank,
            passage_instruction_format=_unescape(a.passage_instruction_format_for_rerank),
            trust_remote_code=a.trust_remote_code, extra=rextra,
        )
    if a.eval_name == "mteb":
        return _run_mteb(a, embedder, num_actors, use_gpu)
    try:
        _resolve_selection(a)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args = EvalArgs(
        eval_name=a.eval_name, dataset_dir=a.dataset_dir, dataset_names=a.dataset_names, splits=a.splits,
        corpus_embd_save_dir=a.corpus_embd_save_dir, output_dir=a.output_dir, search_top_k=a.search_top_k,
        rerank_top_k=a.rerank_top_k, cache_path=a.cache_path, token=a.token, overwrite=a.overwrite,
        force_redownload=a.force_redownload, ignore_identical_ids=a.ignore_identical_ids, k_values=a.k_values,
        eval_output_method=a.eval_output_method, eval_output_path=a.eval_output_path, eval_metrics=a.eval_metrics,
        query_instruction_for_retrieval=a.query_instruction_for_retrieval,
        query_instruction_format_for_retrieval=_unescape(a.query_instruction_format_for_retrieval),
        embedder_query_max_length=a.embedder_query_max_length, use_special_instructions=a.use_special_instructions,
        search_method=a.search_method, hybrid_weights=a.hybrid_weights, benchmark_version=a.benchmark_version,
        metrics_only=a.metrics_only, rows_per_shard=a.rows_per_shard or None,
    )
    try:
        report = run_evaluation(args, embedder, reranker, num_actors=num_actors, use_gpu=use_gpu, address=a.address)
    except (ValueError, FileNotFoundError) as exc:  # bad input: say what, without a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report.summary(a.eval_metrics))
    print(f"results: {a.output_dir}; summary: {report.summary_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
