"""Embed a corpus into parquet shards, a manifest and a faiss index, on a local Ray or a cluster.

    python jobs/embed_corpus.py                       # bundled sample corpus + bundled model -> ./outputs
    python jobs/embed_corpus.py --input s3://bucket/corpus/ --output /shared/out --model BAAI/bge-base-en-v1.5
    ray job submit --working-dir . -- python jobs/embed_corpus.py --input ... --output /shared/out

Actors read their shards from --input and commit them under --output themselves: on a multi-node
cluster both must be reachable from every node (object store or shared filesystem for the input,
a shared filesystem for the output). Rerunning the same command resumes: finished shards are kept.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bge_ray.batch.cli import MAX_TOKENS_HELP  # noqa: E402
from bge_ray.batch.embed import run_embed_job  # noqa: E402
from bge_ray.batch.runtime import init_ray  # noqa: E402
from bge_ray.index.faiss_index import INDEX_KINDS  # noqa: E402
from bge_ray.io.readers import CorpusSpec  # noqa: E402
from bge_ray.models.spec import EmbedderSpec  # noqa: E402

SAMPLE_CORPUS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bge_ray", "data", "sample_corpus.jsonl")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", default=SAMPLE_CORPUS, help="jsonl / parquet / csv file, folder, glob, BEIR folder or URI")
    p.add_argument("--output", default="outputs/sample_corpus",
                   help="output folder; a relative path resolves against the job's working directory, which "
                        "under `ray job submit` is a temporary upload: use an absolute, shared path there")
    p.add_argument("--model", default=None, help="model name or folder (default: bundled all-MiniLM-L6-v2)")
    p.add_argument("--model-class", default=None, help="FlagAutoModel model_class, e.g. encoder-only-base")
    p.add_argument("--pooling-method", default=None, choices=["cls", "mean", "last_token"])
    p.add_argument("--num-actors", type=int, default=None, help="embedding actors (default: one per GPU, else one single-threaded actor per core, up to 8)")
    p.add_argument("--use-gpu", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--batch-size", type=int, default=256, help="texts per forward pass")
    p.add_argument("--max-tokens-per-batch", type=int, default=None, help=MAX_TOKENS_HELP)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--rows-per-shard", "--rows-per-call", dest="rows_per_shard", type=int, default=None,
                   help="rows per output shard, the unit of work, retry and resume "
                        "(default: input rows / actors, between 1024 and 50000)")
    p.add_argument("--on-bad-record", choices=["fail", "skip"], default="fail",
                   help="fail at the first bad input row (naming file and line), or skip, count and report them")
    p.add_argument("--overwrite", action="store_true", help="replace output of a different earlier job")
    p.add_argument("--id-field", default=None)
    p.add_argument("--text-fields", default=None, help="comma-separated, joined by a space (default: title,text)")
    p.add_argument("--format", default=None, choices=["json", "parquet", "csv"])
    p.add_argument("--outputs", default="dense",
                   help="comma-separated: dense (column embedding), sparse (token id -> weight) and colbert "
                        "(a vector per token); sparse and colbert need a BGE-M3 model")
    p.add_argument("--index", default="auto", choices=["auto", *INDEX_KINDS, "none"],
                   help="auto: flat up to 1M rows, IVF up to 10M, IVF-PQ above; IVF kinds are trained on a "
                        "sample and filled per group of shards by Ray tasks (index/part-*)")
    p.add_argument("--no-fp16", dest="use_fp16", action="store_false", help="fp32 on GPU")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a new local Ray)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("bge_ray").setLevel(logging.INFO)
    init_ray(args.address)
    args.output = os.path.abspath(args.output)
    corpus = CorpusSpec(
        args.input,
        id_field=args.id_field,
        text_fields=tuple(args.text_fields.split(",")) if args.text_fields else None,
        format=args.format,
    )
    spec = EmbedderSpec(
        model=args.model,
        model_class=args.model_class,
        pooling_method=args.pooling_method,
        use_fp16=args.use_fp16,
        max_length=args.max_length,
        batch_size=args.batch_size,
        max_tokens_per_batch=args.max_tokens_per_batch,
    )
    result = run_embed_job(
        corpus, args.output, spec, num_actors=args.num_actors, use_gpu=args.use_gpu,
        rows_per_shard=args.rows_per_shard, index_kind=args.index, on_bad_record=args.on_bad_record,
        overwrite=args.overwrite, outputs=args.outputs,
    )
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
