"""Retrieval evaluation end to end: ``jobs/evaluate.py`` (Ray) vs FlagEmbedding's own evaluation of the
same folder, same model, same run.

    python benchmarks/bench_evaluate.py --json benchmarks/results/cpu_evaluate_msmarco.json   # full set
    python benchmarks/bench_evaluate.py --rounds 3 --json ...    # paired rounds, alternating order, median
    python benchmarks/bench_evaluate.py --limit 100                                           # smoke run

Both sides evaluate msmarco-subset with the bundled all-MiniLM-L6-v2 (mean pooling, fp32, batch 64,
max length 256 for queries and passages, exact inner-product search, top 100) from a cold start: each
is a fresh subprocess with no corpus-embedding cache, so the wall time includes interpreter start,
imports, model loading (and for us Ray start-up and actor start-up).

(a) ``python -m FlagEmbedding.evaluation.custom`` on the folder converted to its custom layout
    (corpus.jsonl {id, title, text}, test_queries.jsonl with the judged queries, test_qrels.jsonl);
(b) ``python jobs/evaluate.py`` on the BEIR folder as it is.

Prints both wall times, their ratio, our time broken into embedding (corpus job + query pool) and
the rest (Ray start-up, data loading, search, metrics, I/O), and nDCG@10 / recall@100 / MAP@10 from
both beside the figures of ../shared/REFERENCE.md (full set only).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import REPO, SHARED, job_env  # noqa: E402

METRICS = ("ndcg_at_10", "recall_at_100", "map_at_10")
REFERENCE = {"ndcg_at_10": 0.797664, "recall_at_100": 0.803202, "map_at_10": 0.218871}  # ../shared/REFERENCE.md


def read_beir(folder: Path, limit: int | None):
    """Corpus rows, queries and qrels; with ``limit``, the judged passages first, then others, up to it."""
    docs = [json.loads(line) for line in open(folder / "corpus.jsonl", encoding="utf-8") if line.strip()]
    qrels: dict[str, dict[str, int]] = {}
    for line in open(folder / "qrels" / "test.tsv", encoding="utf-8"):
        parts = line.rstrip("\n").split("\t")
        if len(parts) == 3 and parts[2].lstrip("-").isdigit():
            qrels.setdefault(parts[0], {})[parts[1]] = int(parts[2])
    queries = {json.loads(x)["_id"]: json.loads(x)["text"] for x in open(folder / "queries.jsonl") if x.strip()}
    if limit:
        judged = {d for r in qrels.values() for d, s in r.items() if s > 0}
        keep = [d for d in docs if d["_id"] in judged][: limit // 2]
        keep += [d for d in docs if d["_id"] not in judged][: limit - len(keep)]
        ids = {d["_id"] for d in keep}
        docs = keep
        qrels = {q: {d: s for d, s in r.items() if d in ids} for q, r in qrels.items()}
        qrels = {q: r for q, r in qrels.items() if r}
    return docs, queries, qrels


def write_beir(out: Path, docs, queries, qrels) -> Path:
    (out / "qrels").mkdir(parents=True, exist_ok=True)
    with open(out / "corpus.jsonl", "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    with open(out / "queries.jsonl", "w", encoding="utf-8") as f:
        for q, t in queries.items():
            f.write(json.dumps({"_id": q, "text": t}, ensure_ascii=False) + "\n")
    with open(out / "qrels" / "test.tsv", "w", encoding="utf-8") as f:
        for q, r in qrels.items():
            for d, s in r.items():
                f.write(f"{q}\t{d}\t{s}\n")
    return out


def write_flag_layout(out: Path, docs, queries, qrels) -> Path:
    """FlagEmbedding's custom layout (REFERENCE.md): judged queries only."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "corpus.jsonl", "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"id": d["_id"], "title": d.get("title", ""), "text": d["text"]}, ensure_ascii=False) + "\n")
    with open(out / "test_queries.jsonl", "w", encoding="utf-8") as f:
        for q in qrels:
            if q in queries:
                f.write(json.dumps({"id": q, "text": queries[q]}, ensure_ascii=False) + "\n")
    with open(out / "test_qrels.jsonl", "w", encoding="utf-8") as f:
        for q, r in qrels.items():
            for d, s in r.items():
                f.write(json.dumps({"qid": q, "docid": d, "relevance": s}) + "\n")
    return out


def common_args(model: str, a) -> list[str]:
    return ["--splits", "test", "--search_top_k", str(a.search_top_k), "--k_values", "10", "100",
            "--eval_metrics", *METRICS, "--embedder_name_or_path", model, "--pooling_method", "mean",
            "--normalize_embeddings", "True", "--use_fp16", "False", "--embedder_batch_size", str(a.batch_size),
            "--embedder_query_max_length", str(a.max_length), "--embedder_passage_max_length", str(a.max_length)]


def run(cmd: list[str], log: Path, env: dict) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    secs = time.perf_counter() - t0
    if proc.returncode:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}); log {log}:\n{tail}")
    return secs


def flag_side(model: str, data: Path, work: Path, a, env) -> dict:
    out = work / "fe_out"
    cmd = [sys.executable, "-m", "FlagEmbedding.evaluation.custom", "--eval_name", data.name, "--dataset_dir", str(data),
           *common_args(model, a), "--embedder_model_class", "encoder-only-base", "--devices", "cpu",
           "--output_dir", str(out), "--eval_output_path", str(work / "fe_results.md"),
           "--corpus_embd_save_dir", str(work / "fe_emb")]
    secs = run(cmd, work / "flagembedding.log", env)
    found = list(out.glob("*/NoReranker/EVAL/eval_results.json"))
    metrics = next(iter(json.loads(found[0].read_text()).values()))
    return {"seconds": secs, "metrics": {m: metrics[m] for m in METRICS}}


def our_side(data: Path, work: Path, a, env) -> dict:
    out = work / "ours_out"
    cmd = [sys.executable, str(REPO / "jobs" / "evaluate.py"), "--eval_name", "custom", "--dataset_dir", str(data),
           *common_args("bundled", a), "--output_dir", str(out), "--eval_output_path", str(work / "ours_results.md"),
           "--corpus_embd_save_dir", str(work / "ours_emb")]
    if a.num_actors:
        cmd += ["--num_actors", str(a.num_actors)]
    secs = run(cmd, work / "ours.log", env)
    report = json.loads(next(out.glob("*/EVAL/*-test.json")).read_text())
    t = report["timings_so_far"]
    embedding = t.get("corpus_embed", 0.0) + t.get("query_embed", 0.0)
    rest = {k: v for k, v in t.items() if k not in ("corpus_embed", "query_embed", "corpus_embed_in_actors")}
    return {"seconds": secs, "metrics": {m: report["search"][m] for m in METRICS}, "timings": t,
            "embedding_seconds": embedding, "in_process_other_seconds": sum(rest.values()),
            "process_overhead_seconds": secs - sum(v for k, v in t.items() if k != "corpus_embed_in_actors"),
            "corpus_embedding": report.get("corpus_embedding")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(SHARED / "beir" / "msmarco-subset"))
    p.add_argument("--limit", type=int, default=None, help="evaluate on this many passages (smoke runs)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--search-top-k", type=int, default=100)
    p.add_argument("--num-actors", type=int, default=None)
    p.add_argument("--order", choices=["flag-first", "ours-first"], default="flag-first")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat both sides (order alternating, fresh folders); ratio per round, median")
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs, outputs)")
    p.add_argument("--json", default=None, help="write the report here")
    a = p.parse_args(argv)

    from bge_ray.models.loading import bundled_model_path

    model = bundled_model_path()
    work = Path(tempfile.mkdtemp(prefix="bench_evaluate_"))
    env = job_env(work)
    docs, queries, qrels = read_beir(Path(a.data), a.limit)
    name = Path(a.data).name + (f"-{a.limit}" if a.limit else "")
    beir_dir = write_beir(work / "beir" / name, docs, queries, qrels)
    flag_dir = write_flag_layout(work / "flag" / name, docs, queries, qrels)
    print(f"{len(docs)} passages, {sum(q in queries for q in qrels)} judged queries; work folder {work}", flush=True)

    rounds = []
    for rnd in range(a.rounds):
        # Each round in fresh folders (no embedding cache from an earlier round), and the order alternates
        # so neither side always runs in the VM's earlier, possibly faster, minutes.
        rwork = work / f"round{rnd + 1}"
        rwork.mkdir()
        sides = [("FlagEmbedding", lambda w=rwork: flag_side(model, flag_dir, w, a, env)),
                 ("bge_ray", lambda w=rwork: our_side(beir_dir, w, a, env))]
        if (a.order == "ours-first") != (rnd % 2 == 1):
            sides.reverse()
        res = {"order": [label for label, _ in sides]}
        for label, fn in sides:
            res[label] = fn()
            print(f"round {rnd + 1}/{a.rounds}: {label}: {res[label]['seconds']:.1f} s end to end", flush=True)
        res["ratio_flag_over_ours"] = res["FlagEmbedding"]["seconds"] / res["bge_ray"]["seconds"]
        rounds.append(res)
    ratios = [r["ratio_flag_over_ours"] for r in rounds]
    ratio = statistics.median(ratios)
    res = min(rounds, key=lambda r: abs(r["ratio_flag_over_ours"] - ratio))  # the median round, described below
    ours, fe = res["bge_ray"], res["FlagEmbedding"]
    emb = ours["embedding_seconds"]
    t = ours["timings"]
    if a.rounds > 1:
        print("\nFlagEmbedding / bge_ray wall time by round: " + ", ".join(f"{x:.3f}" for x in ratios)
              + f"; median {ratio:.3f}; the median round:")
    print(f"\nwall time: bge_ray {ours['seconds']:.1f} s, FlagEmbedding {fe['seconds']:.1f} s -> "
          f"FlagEmbedding / bge_ray = {res['ratio_flag_over_ours']:.3f} "
          f"({'faster' if res['ratio_flag_over_ours'] >= 1 else 'slower'})")
    print(f"bge_ray breakdown: embedding {emb:.1f} s (corpus job {t.get('corpus_embed', 0):.1f} s, of which "
          f"in actors {t.get('corpus_embed_in_actors', 0):.1f} s; queries {t.get('query_embed', 0):.1f} s); "
          + ", ".join(f"{k} {v:.2f} s" for k, v in t.items() if k not in ("corpus_embed", "query_embed",
                                                                             "corpus_embed_in_actors"))
          + f"; process start / imports / exit {ours['process_overhead_seconds']:.1f} s")
    search_io = sum(t.get(k, 0.0) for k in ("search", "metrics", "io", "load_data"))
    print(f"search + metrics + I/O + data loading = {search_io:.2f} s = {100 * search_io / max(emb, 1e-9):.1f}% "
          f"of embedding; Ray start-up {t.get('ray_init', 0):.1f} s")
    print("\n| metric | bge_ray | FlagEmbedding | REFERENCE.md |\n|---|---|---|---|")
    for m in METRICS:
        ref = f"{REFERENCE[m]:.4f}" if not a.limit else "-"
        print(f"| {m} | {ours['metrics'][m]:.6f} | {fe['metrics'][m]:.5f} | {ref} |")
    same = all(abs(r["bge_ray"]["metrics"][m] - r["FlagEmbedding"]["metrics"][m]) <= 1e-5
               for r in rounds for m in METRICS)
    print(f"metrics identical (to FlagEmbedding's 5-place rounding), every round: {same}")
    if not a.limit:
        print("equal to REFERENCE.md to 4 decimals: "
              f"{all(round(ours['metrics'][m], 4) == round(REFERENCE[m], 4) for m in METRICS)}")
    report = {"passages": len(docs), "judged_queries": sum(q in queries for q in qrels), "limit": a.limit,
              "batch_size": a.batch_size, "max_length": a.max_length, "search_top_k": a.search_top_k,
              "order": a.order, "bge_ray": ours, "FlagEmbedding": fe, "ratio_flag_over_ours": ratio,
              "ratios_by_round": ratios, "rounds": rounds if a.rounds > 1 else None,
              "search_metrics_io_share_of_embedding": search_io / max(emb, 1e-9), "metrics_identical": same}
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2))
    if a.keep:
        print(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
