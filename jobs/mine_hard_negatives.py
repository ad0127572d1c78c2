"""Mine hard negatives for embedder fine-tuning (FlagEmbedding's hn_mine.py arguments), on Ray.

    python jobs/mine_hard_negatives.py --input_file train.jsonl --output_file train_minedHN.jsonl \\
        --range_for_sampling 2-200 --negative_number 15 --candidate_pool pool.jsonl \\
        --embedder_name_or_path BAAI/bge-base-en-v1.5 \\
        --query_instruction_for_retrieval "Represent this sentence for searching relevant passages: "
    python jobs/mine_hard_negatives.py ... --min_margin 0.05 --embedding_cache cache/emb   # our additions
    ray job submit --working-dir . -- python jobs/mine_hard_negatives.py ...
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bge_ray.batch.cli import MAX_TOKENS_HELP, actors_for_devices, hf_bool  # noqa: E402
from bge_ray.batch.mine import AUTO_INSTRUCTION, MineConfig, mine_hard_negatives  # noqa: E402
from bge_ray.batch.runtime import init_ray  # noqa: E402
from bge_ray.models.registry import EMBEDDER_CLASSES  # noqa: E402
from bge_ray.models.spec import EmbedderSpec  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    flag = {"type": hf_bool, "nargs": "?", "const": True}
    d = p.add_argument_group("data (FlagEmbedding DataArgs)")
    d.add_argument("--input_file", required=True, help="training jsonl: query, pos (and neg, replaced)")
    d.add_argument("--output_file", required=True)
    d.add_argument("--candidate_pool", default=None, help='jsonl of {"text": ...}; default: all pos + neg of the input')
    d.add_argument("--range_for_sampling", default="10-210", help="sample from candidates ranked START..END-1")
    d.add_argument("--negative_number", type=int, default=15)
    d.add_argument("--use_gpu_for_searching", default=False, **flag, help="faiss index on all GPUs")
    d.add_argument("--search_batch_size", type=int, default=64, help="queries searched at a time")
    m = p.add_argument_group("embedder (FlagEmbedding ModelArgs)")
    m.add_argument("--embedder_name_or_path", default=None, help="default: the bundled all-MiniLM-L6-v2")
    m.add_argument("--embedder_model_class", default=None, choices=sorted(EMBEDDER_CLASSES))
    m.add_argument("--normalize_embeddings", default=True, **flag)
    m.add_argument("--pooling_method", default=None, choices=["cls", "mean", "last_token"],
                   help="default: from the model registry / checkpoint (FlagEmbedding defaults to cls)")
    m.add_argument("--use_fp16", default=True, **flag, help="fp16 on GPU (CPU runs fp32)")
    m.add_argument("--devices", nargs="+", default=None, help="e.g. cuda:0 cuda:1: one embedding actor per device")
    m.add_argument("--query_instruction_for_retrieval", default=None,
                   help=f"prepended to queries; '{AUTO_INSTRUCTION}' takes the model registry's default")
    m.add_argument("--query_instruction_format_for_retrieval", "--query_instruction_format",
                   dest="query_instruction_format", default=None, help="default: the registry's, else {}{}")
    m.add_argument("--trust_remote_code", default=False, **flag)
    m.add_argument("--cache_dir", default=None, help="model download cache")
    m.add_argument("--batch_size", type=int, default=256, help="texts per forward pass")
    m.add_argument("--max_tokens_per_batch", type=int, default=None, help=MAX_TOKENS_HELP)
    m.add_argument("--embedder_query_max_length", "--max_query_length", dest="max_query_length", type=int, default=512)
    m.add_argument("--embedder_passage_max_length", "--max_passage_length", dest="max_passage_length",
                   type=int, default=512)
    x = p.add_argument_group("bge_ray additions")
    x.add_argument("--max_score_ratio", type=float, default=None,
                   help="drop candidates scoring above RATIO x the best positive's score (e.g. 0.95)")
    x.add_argument("--min_margin", type=float, default=None,
                   help="drop candidates scoring above the best positive's score minus MARGIN (e.g. 0.05)")
    x.add_argument("--random_fill", default=True, **flag,
                   help="top up lines short of candidates with random corpus passages (FlagEmbedding does)")
    x.add_argument("--embedding_cache", default=None, help="folder of embeddings reused across runs")
    x.add_argument("--pool_output", default=None,
                   help="folder (local, shared or s3://) where the embed job embeds and indexes the pool, "
                        "searched by the cluster and reused by later runs: for pools too big for one process")
    x.add_argument("--pool_index", default="auto", choices=["auto", "flat", "hnsw", "ivf", "ivfpq"],
                   help="the pool's index with --pool_output (auto: flat up to 1M passages, then IVF)")
    x.add_argument("--num_searchers", type=int, default=None, help="searcher actors with --pool_output")
    x.add_argument("--seed", type=int, default=42)
    x.add_argument("--num_actors", type=int, default=None, help="embedding actors (default: one per GPU, else one single-threaded actor per core, up to 8)")
    x.add_argument("--use_gpu", default=None, **flag, help="embed on GPUs (default: if the cluster has them)")
    x.add_argument("--rows_per_call", type=int, default=1024, help="texts handed to an actor at a time")
    x.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a new local Ray)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    num_actors, use_gpu = actors_for_devices(args.devices)
    init_ray(args.address)
    extra = {"trust_remote_code": args.trust_remote_code}
    if args.cache_dir:
        extra["cache_dir"] = args.cache_dir
    spec = EmbedderSpec(
        model=args.embedder_name_or_path,
        model_class=args.embedder_model_class,
        pooling_method=args.pooling_method,
        normalize_embeddings=args.normalize_embeddings,
        use_fp16=args.use_fp16,
        max_length=args.max_passage_length,
        batch_size=args.batch_size,
        max_tokens_per_batch=args.max_tokens_per_batch,
        extra=extra,
    )
    config = MineConfig(
        range_for_sampling=args.range_for_sampling,
        negative_number=args.negative_number,
        max_score_ratio=args.max_score_ratio,
        min_margin=args.min_margin,
        random_fill=args.random_fill,
        search_batch_size=args.search_batch_size,
        use_gpu_for_searching=args.use_gpu_for_searching,
        seed=args.seed,
    )
    result = mine_hard_negatives(
        args.input_file, args.output_file, spec, config,
        candidate_pool=args.candidate_pool,
        query_instruction_for_retrieval=args.query_instruction_for_retrieval,
        query_instruction_format=args.query_instruction_format,
        query_max_length=args.max_query_length,
        embedding_cache=args.embedding_cache,
        pool_output=args.pool_output,
        pool_index=args.pool_index,
        num_searchers=args.num_searchers,
        num_actors=args.num_actors or num_actors,
        use_gpu=args.use_gpu if args.use_gpu is not None else use_gpu,
        rows_per_call=args.rows_per_call,
    )
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
