"""Corpus encoding throughput: bge_ray's FlagModel / BGEM3FlagModel vs FlagEmbedding's, same run.

CPU, bundled model (the reference setting of ../shared/REFERENCE.md):
    python benchmarks/bench_encode.py --device cpu --batch-size 64 --max-length 256 --eval
GPU, random weights in published shapes:
    python benchmarks/bench_encode.py --arch bge-base-en-v1.5 --device cuda:0 --fp16 --repeat 10
    python benchmarks/bench_encode.py --arch bge-m3 --device cuda:0 --fp16 --repeat 4

Prints docs/s and tokens/s for both, their ratio, model FLOP utilisation against a matmul roofline
measured in the same process, and the largest difference between the two systems' vectors.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (  # noqa: E402
    SHARED,
    build_random_checkpoint,
    matmul_peak_flops,
    model_flops_per_token,
    timed,
)


def dense(out):
    return out["dense_vecs"] if isinstance(out, dict) else out


def make_ours(path, args, m3: bool):
    import bge_ray

    cls = bge_ray.BGEM3FlagModel if m3 else bge_ray.FlagModel
    kw = dict(pooling_method=args.pooling) if not m3 else {}
    return cls(
        path, devices=args.device, use_fp16=args.fp16, use_bf16=args.bf16, batch_size=args.batch_size,
        passage_max_length=args.max_length, query_max_length=args.max_length,
        max_tokens_per_batch=args.max_tokens, **kw,
    )


def make_theirs(path, args, m3: bool):
    import FlagEmbedding

    cls = FlagEmbedding.BGEM3FlagModel if m3 else FlagEmbedding.FlagModel
    kw = dict(pooling_method=args.pooling) if not m3 else {}
    return cls(
        str(path), devices=args.device, use_fp16=args.fp16, use_bf16=args.bf16, batch_size=args.batch_size,
        passage_max_length=args.max_length, query_max_length=args.max_length, **kw,
    )


def run(args) -> dict:
    from transformers import AutoConfig, AutoTokenizer

    from bge_ray.models.loading import bundled_model_path

    texts = []
    from benchmarks.common import load_passages

    texts = load_passages(args.data, args.limit, args.repeat)
    tmp = tempfile.mkdtemp(prefix="bench_encode_")
    if args.arch:
        path = build_random_checkpoint(args.arch, Path(tmp) / args.arch, args.tokenizer)
        m3 = args.arch == "bge-m3"
        if args.pooling == "mean" and not m3:
            args.pooling = "cls"
    else:
        path, m3 = Path(args.model or bundled_model_path()), False
    config = AutoConfig.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    lengths = np.array([len(x) for x in tok(texts, truncation=True, max_length=args.max_length)["input_ids"]])
    n_tokens = int(lengths.sum())
    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 and args.device != "cpu" else torch.float32
    peak = matmul_peak_flops(args.device, dtype)
    flops = model_flops_per_token(config, float(lengths.mean())) * n_tokens
    print(f"{len(texts)} texts, {n_tokens} tokens (mean {lengths.mean():.1f}, max {lengths.max()}), "
          f"device {args.device}, dtype {dtype}, batch {args.batch_size}, max_length {args.max_length}, "
          f"matmul roofline {peak / 1e12:.2f} TFLOP/s", flush=True)

    systems = {"bge_ray": make_ours}
    if not args.no_peer:
        systems["FlagEmbedding"] = make_theirs
    results, vectors = {}, {}
    for rnd in range(args.rounds):
        for name, make in systems.items():
            model = make(path, args, m3)
            model.encode_corpus(texts[: min(len(texts), 2 * args.batch_size)])  # warm-up
            out, secs = timed(lambda m=model: m.encode_corpus(texts), args.device)
            vec = np.asarray(dense(out), dtype=np.float32)
            r = results.setdefault(name, {"seconds": []})
            r["seconds"].append(secs)
            vectors[name] = vec
            print(f"round {rnd}: {name}: {secs:.2f} s, {len(texts) / secs:.1f} docs/s, "
                  f"{n_tokens / secs:.0f} tokens/s, MFU {flops / secs / peak:.1%}", flush=True)
            if hasattr(model, "stop_self_pool"):
                model.stop_self_pool()
            del model
            gc.collect()
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
    for r in results.values():
        best = min(r["seconds"])
        r.update(best_seconds=best, docs_per_s=len(texts) / best, tokens_per_s=n_tokens / best,
                 model_flops_utilisation=flops / best / peak)
    report = {"texts": len(texts), "tokens": n_tokens, "device": args.device, "dtype": str(dtype),
              "arch": args.arch or "all-MiniLM-L6-v2", "batch_size": args.batch_size, "max_length": args.max_length,
              "roofline_tflops": peak / 1e12, "systems": results}
    if "FlagEmbedding" in vectors:
        a, b = vectors["bge_ray"], vectors["FlagEmbedding"]
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        report["max_abs_diff"] = float(np.abs(a - b).max())
        report["min_cosine"] = float(cos.min())
        report["ratio"] = results["bge_ray"]["docs_per_s"] / results["FlagEmbedding"]["docs_per_s"]
        print(f"bge_ray / FlagEmbedding: {report['ratio']:.3f}x docs/s; max |diff| {report['max_abs_diff']:.2e}, "
              f"min cosine {report['min_cosine']:.6f}")
    if args.with_st:
        report["sentence_transformers"] = compare_st(path, texts, vectors["bge_ray"], args)
    if args.eval:
        report["metrics"] = evaluate(args, path, vectors["bge_ray"], m3)
    return report


def compare_st(path, texts, ours, args) -> dict:
    """sentence-transformers' embeddings of the same texts (its own pooling config), timed, vs ours."""
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(path), device=args.device)
    st.max_seq_length = args.max_length
    st.encode(texts[: 2 * args.batch_size], batch_size=args.batch_size)
    theirs, secs = timed(lambda: st.encode(texts, batch_size=args.batch_size, normalize_embeddings=True), args.device)
    cos = (ours * theirs).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1))
    out = {"seconds": secs, "docs_per_s": len(texts) / secs, "min_cosine": float(cos.min()),
           "max_abs_diff": float(np.abs(ours - theirs).max())}
    print(f"sentence-transformers: {secs:.2f} s, {len(texts) / secs:.1f} docs/s; vs bge_ray min cosine "
          f"{out['min_cosine']:.7f}, max |diff| {out['max_abs_diff']:.2e}", flush=True)
    return out


def evaluate(args, path, corpus_vecs, m3) -> dict:
    """Exact inner-product search over the corpus vectors; pytrec_eval metrics on the qrels."""
    from bge_ray.eval.beir import load_beir
    from bge_ray.eval.metrics import evaluate as metrics
    from bge_ray.index.faiss_index import build_index, search

    ds = load_beir(args.data)
    doc_ids = list(ds.corpus)
    if len(doc_ids) != len(corpus_vecs):
        raise SystemExit("--eval needs the whole corpus once (no --limit / --repeat)")
    qids = [q for q in ds.queries if q in ds.qrels]
    model = make_ours(path, args, m3)
    q = np.asarray(dense(model.encode_queries([ds.queries[x] for x in qids])))
    scores, idx = search(build_index(corpus_vecs, "flat"), q, 100)
    run = {qid: {doc_ids[j]: float(s) for s, j in zip(scores[i], idx[i], strict=True)} for i, qid in enumerate(qids)}
    m = metrics(ds.qrels, run, k_values=[10, 100], metrics=("ndcg", "recall", "map"))
    out = {"ndcg_at_10": m["ndcg_at_10"], "recall_at_100": m["recall_at_100"], "map_at_10": m["map_at_10"],
           "queries": len(qids)}
    print("retrieval: " + ", ".join(f"{k} {v:.6f}" if isinstance(v, float) else f"{k} {v}" for k, v in out.items()))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(SHARED / "beir" / "msmarco-subset"))
    p.add_argument("--model", default=None, help="model folder (default: the bundled all-MiniLM-L6-v2)")
    p.add_argument("--arch", default=None, choices=["bge-base-en-v1.5", "bge-small-en-v1.5", "bge-m3"],
                   help="random weights in this published shape instead of --model")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder for --arch (default: the bundled one)")
    p.add_argument("--pooling", default="mean")
    p.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    p.add_argument("--fp16", action="store_true")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=None, help="bge_ray token budget per batch")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--no-peer", action="store_true")
    p.add_argument("--with-st", action="store_true", help="also time sentence-transformers and compare vectors")
    p.add_argument("--eval", action="store_true", help="also report nDCG@10 / recall@100 / MAP@10")
    p.add_argument("--json", default=None, help="write the report here")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    report = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
