"""Does a fine-tuned cross-encoder help? Dense retrieval alone vs dense top-k reranked by a reranker
fine-tuned from the bundled MiniLM encoder, on held-out queries of a query-disjoint split.

    python benchmarks/learn_rerank.py --data ../shared/data/beir/arcd-subset --json benchmarks/results/learn_rerank_arcd.json

Same split, training groups and mining as ``benchmarks/learn_retrieval.py`` (``--ict`` adds
Inverse-Cloze pairs from the corpus); then ``jobs/finetune_reranker.py`` (a new one-logit head on the
MiniLM encoder, 2 Ray Train workers) and ``jobs/evaluate.py --reranker_name_or_path ... --rerank_top_k``
on the held-out queries: search and rerank metrics side by side.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.learn_retrieval import (  # noqa: E402
    METRICS,
    PY,
    REPO,
    doc_text,
    ict_pairs,
    job_env,
    read_beir,
    run,
    split_queries,
    write_jsonl,
)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "beir" / "arcd-subset"))
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--ict", action="store_true")
    p.add_argument("--rerank_top_k", type=int, default=100)
    p.add_argument("--train_group_size", type=int, default=8)
    p.add_argument("--query_max_len", type=int, default=64)
    p.add_argument("--passage_max_len", type=int, default=192)
    p.add_argument("--learning_rate", type=float, default=3e-5)
    p.add_argument("--num_train_epochs", type=float, default=4)
    p.add_argument("--per_device_train_batch_size", type=int, default=4)
    p.add_argument("--work", default=None)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    data = Path(a.data)
    work = Path(a.work or tempfile.mkdtemp(prefix=f"learn_rerank_{data.name}_"))
    work.mkdir(parents=True, exist_ok=True)
    env = job_env()
    docs, queries, qrels = read_beir(data)
    rng = random.Random(a.seed)
    train_q, test_q, held = split_queries(docs, queries, qrels, work, data.name, rng)
    by_id = {d["_id"]: d for d in docs}
    groups = [{"query": queries[q], "pos": [doc_text(by_id[d]) for d, s in qrels[q].items() if s > 0 and d in by_id]}
              for q in train_q]
    if a.ict:
        groups += ict_pairs(docs, rng)
    raw = write_jsonl(work / "train_raw.jsonl", groups)
    pool = write_jsonl(work / "pool.jsonl", [{"text": doc_text(d)} for d in docs])
    mined = work / "train_mined.jsonl"
    print(f"{len(train_q)} train / {len(test_q)} held-out queries, {len(groups)} groups; work folder {work}", flush=True)
    run([PY, REPO / "jobs" / "mine_hard_negatives.py", "--input_file", raw, "--output_file", mined,
         "--candidate_pool", pool, "--range_for_sampling", "2-100", "--negative_number", "15",
         "--embedder_passage_max_length", "256", "--use_fp16", "False"], work / "mine.log", env)
    rr = work / "reranker"
    run([PY, REPO / "jobs" / "finetune_reranker.py", "--train_data", mined, "--output_dir", rr, "--overwrite_output_dir",
         "--train_group_size", str(a.train_group_size), "--query_max_len", str(a.query_max_len),
         "--passage_max_len", str(a.passage_max_len), "--per_device_train_batch_size", str(a.per_device_train_batch_size),
         "--learning_rate", str(a.learning_rate), "--num_train_epochs", str(a.num_train_epochs), "--warmup_ratio", "0.1",
         "--num_workers", "2", "--save_steps", "100000", "--seed", str(a.seed)], work / "finetune.log", env)
    out = work / "eval"
    run([PY, REPO / "jobs" / "evaluate.py", "--eval_name", "custom", "--dataset_dir", held.parent, "--splits", "test",
         "--search_top_k", "100", "--rerank_top_k", str(a.rerank_top_k), "--k_values", "10", "100",
         "--eval_metrics", *METRICS, "--use_fp16", "False", "--embedder_batch_size", "64",
         "--embedder_query_max_length", "256", "--embedder_passage_max_length", "256",
         "--reranker_name_or_path", rr, "--reranker_query_max_length", str(a.query_max_len),
         "--reranker_max_length", str(a.query_max_len + a.passage_max_len), "--output_dir", out,
         "--eval_output_path", work / "eval.md"], work / "eval.log", env)
    report = json.loads(next(out.glob("*/EVAL/*-test.json")).read_text())
    summary = json.loads((rr / "training_summary.json").read_text())
    losses = [h["loss"] for h in summary["log_history"]]
    print(f"\n{data.name}: {len(test_q)} held-out queries; reranker trained {len(losses)} steps "
          f"(loss {losses[0]:.3f} -> {losses[-1]:.3f})")
    print("| stage | nDCG@10 | recall@100 | MAP@10 |\n|---|---|---|---|")
    for stage in ("search", "rerank"):
        r = report[stage]
        print(f"| {stage} | {r['ndcg_at_10']:.4f} | {r['recall_at_100']:.4f} | {r['map_at_10']:.4f} |")
    res = {"data": str(data), "train_queries": len(train_q), "heldout_queries": len(test_q), "groups": len(groups),
           "ict": a.ict, "args": vars(a), "search": report["search"], "rerank": report["rerank"],
           "loss_first": losses[0], "loss_last": losses[-1], "steps": len(losses)}
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2, default=str))
    return res


if __name__ == "__main__":
    main()
