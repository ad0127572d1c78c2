"""The embed job's per-actor work without Ray: plan shards, then read -> embed -> commit each shard,
exactly as one ``ShardEmbedActor`` does, timed against FlagEmbedding's ``encode_corpus`` on the same
texts. For machines where Ray cannot be installed (the lent GPU machines); with Ray, time the real
job with benchmarks/bench_embed_job.py.

    python benchmarks/bench_shard_actor.py --arch bge-base-en-v1.5 --device cuda:0 --fp16 --repeat 10
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (  # noqa: E402
    SHARED,
    build_random_checkpoint,
    matmul_peak_flops,
    model_flops_per_token,
    timed,
)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(SHARED / "beir" / "msmarco-subset"))
    p.add_argument("--arch", default="bge-base-en-v1.5")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--fp16", action="store_true")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--rows-per-shard", type=int, default=10_000)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    from transformers import AutoConfig

    from bge_ray.batch.embed import ShardEmbedActor
    from bge_ray.io.sharding import plan_file
    from bge_ray.models.spec import EmbedderSpec

    tmp = Path(tempfile.mkdtemp(prefix="bench_shard_"))
    model_dir = build_random_checkpoint(args.arch, tmp / args.arch, args.tokenizer)
    rows = [json.loads(line) for line in open(Path(args.data) / "corpus.jsonl", encoding="utf-8")] * args.repeat
    corpus = tmp / "corpus.jsonl"
    with open(corpus, "w", encoding="utf-8") as f:
        for n, r in enumerate(rows):
            f.write(json.dumps({"_id": f"{r['_id']}-{n}", "title": r.get("title", ""), "text": r["text"]}) + "\n")
    texts = [f"{r.get('title', '')} {r['text']}".strip() if r.get("title") else r["text"] for r in rows]

    spec = EmbedderSpec(model=str(model_dir), model_class="encoder-only-base", pooling_method="cls",
                        use_fp16=args.fp16, max_length=args.max_length, batch_size=args.batch_size,
                        max_tokens_per_batch=args.max_tokens)
    actor = ShardEmbedActor(spec, None, str(tmp / "out"), None, None, skip_bad=False)
    actor.model.encode_corpus(texts[:4096])
    shards = [{"index": i, "offset": None, "first_line": None, **d}
              for i, d in enumerate(plan_file(str(corpus), "json", args.rows_per_shard))]
    import pyarrow as pa

    def run_shards():
        t_plan = time.perf_counter()
        plan_file(str(corpus), "json", args.rows_per_shard)
        plan_s = time.perf_counter() - t_plan
        out = [actor(pa.Table.from_pylist([s])) for s in shards]
        return plan_s, out

    config = AutoConfig.from_pretrained(model_dir)
    (plan_s, results), ours = timed(run_shards, args.device)
    (_, results), ours = timed(run_shards, args.device)  # second pass: warm kernels, as a long job runs
    tokens = sum(r["tokens"].to_pylist()[0] for r in results)
    import FlagEmbedding

    fe = FlagEmbedding.FlagModel(str(model_dir), pooling_method="cls", use_fp16=args.fp16, devices=args.device,
                                 batch_size=args.batch_size, passage_max_length=args.max_length)
    fe.encode_corpus(texts[:4096])
    _, theirs = timed(lambda: fe.encode_corpus(texts), args.device)
    _, theirs = timed(lambda: fe.encode_corpus(texts), args.device)
    dtype = torch.float16 if args.fp16 else torch.float32
    peak = matmul_peak_flops(args.device, dtype)
    flops = model_flops_per_token(config, tokens / len(texts)) * tokens
    report = {
        "rows": len(texts), "tokens": tokens, "shards": len(shards), "plan_seconds": plan_s,
        "bge_ray_shard_actor": {"seconds": ours, "docs_per_s": len(texts) / ours, "tokens_per_s": tokens / ours,
                                "mfu": flops / ours / peak},
        "flagembedding_encode_corpus": {"seconds": theirs, "docs_per_s": len(texts) / theirs},
        "ratio": theirs / ours, "roofline_tflops": peak / 1e12,
    }
    print(f"{len(texts)} rows, {tokens} tokens, {len(shards)} shards (planning {plan_s:.2f} s)")
    print(f"bge_ray shard actor (read+embed+commit): {ours:.2f} s, {len(texts) / ours:.0f} docs/s, "
          f"{tokens / ours:.0f} tokens/s, MFU {flops / ours / peak:.1%}")
    print(f"FlagEmbedding encode_corpus (embed only): {theirs:.2f} s, {len(texts) / theirs:.0f} docs/s")
    print(f"ratio {theirs / ours:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
