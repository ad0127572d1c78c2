"""Add reranker (teacher) scores to training data for distillation (FlagEmbedding's add_reranker_score.py).

    python jobs/score_teacher.py --input_file train_minedHN.jsonl --output_file train_scored.jsonl \\
        --reranker_name_or_path BAAI/bge-reranker-v2-m3 --reranker_max_length 1024
    ray job submit --working-dir . -- python jobs/score_teacher.py ... --num_actors 8 --use_gpu
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bge_ray.batch.cli import actors_for_devices, hf_bool  # noqa: E402
from bge_ray.batch.runtime import init_ray  # noqa: E402
from bge_ray.batch.teacher import add_teacher_scores  # noqa: E402
from bge_ray.models.registry import RERANKER_CLASSES  # noqa: E402
from bge_ray.models.spec import RerankerSpec  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    flag = {"type": hf_bool, "nargs": "?", "const": True}
    p.add_argument("--input_file", required=True, help="training jsonl: query, pos, neg")
    p.add_argument("--output_file", required=True)
    p.add_argument("--reranker_name_or_path", required=True)
    p.add_argument("--reranker_model_class", default=None, choices=sorted(RERANKER_CLASSES))
    p.add_argument("--use_fp16", default=True, **flag, help="fp16 on GPU (CPU runs fp32)")
    p.add_argument("--use_bf16", default=False, **flag)
    p.add_argument("--trust_remote_code", default=False, **flag)
    p.add_argument("--cache_dir", default=None, help="model download cache")
    p.add_argument("--devices", nargs="+", default=None, help="e.g. cuda:0 cuda:1: one scoring actor per device")
    p.add_argument("--query_instruction_for_rerank", default=None)
    p.add_argument("--query_instruction_format_for_rerank", default="{}{}")
    p.add_argument("--passage_instruction_for_rerank", default=None)
    p.add_argument("--passage_instruction_format_for_rerank", default="{}{}")
    p.add_argument("--reranker_batch_size", type=int, default=128, help="pairs per forward pass")
    p.add_argument("--reranker_query_max_length", type=int, default=None)
    p.add_argument("--reranker_max_length", type=int, default=512)
    p.add_argument("--normalize", default=False, **flag, help="sigmoid the scores")
    p.add_argument("--prompt", default=None, help="LLM rerankers' prompt")
    p.add_argument("--cutoff_layers", type=int, nargs="+", default=None, help="layerwise / lightweight rerankers")
    p.add_argument("--compress_ratio", type=int, default=None, help="lightweight reranker")
    p.add_argument("--compress_layers", type=int, nargs="+", default=None, help="lightweight reranker")
    p.add_argument("--num_actors", type=int, default=None, help="scoring actors (default: one per GPU, else one single-threaded actor per core, up to 8)")
    p.add_argument("--use_gpu", default=None, **flag, help="score on GPUs (default: if the cluster has them)")
    p.add_argument("--rows_per_call", type=int, default=1024, help="pairs handed to an actor at a time")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a new local Ray)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    num_actors, use_gpu = actors_for_devices(args.devices)
    init_ray(args.address)
    spec = RerankerSpec(
        model=args.reranker_name_or_path,
        model_class=args.reranker_model_class,
        use_fp16=args.use_fp16,
        use_bf16=args.use_bf16,
        trust_remote_code=args.trust_remote_code,
        batch_size=args.reranker_batch_size,
        query_max_length=args.reranker_query_max_length,
        max_length=args.reranker_max_length,
        normalize=args.normalize,
        query_instruction_for_rerank=args.query_instruction_for_rerank,
        query_instruction_format=args.query_instruction_format_for_rerank,
        passage_instruction_for_rerank=args.passage_instruction_for_rerank,
        passage_instruction_format=args.passage_instruction_format_for_rerank,
        extra={
            "cache_dir": args.cache_dir, "prompt": args.prompt, "cutoff_layers": args.cutoff_layers,
            "compress_ratio": args.compress_ratio, "compress_layers": args.compress_layers,
        },
    )
    result = add_teacher_scores(
        args.input_file, args.output_file, spec,
        num_actors=args.num_actors or num_actors,
        use_gpu=args.use_gpu if args.use_gpu is not None else use_gpu,
        rows_per_call=args.rows_per_call,
    )
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
