"""Does fine-tuning help? Base model vs fine-tuned on a query-disjoint split, measured with the jobs.

    python benchmarks/learn_retrieval.py --data ../shared/data/beir/arcd-subset --json benchmarks/results/learn_arcd.json
    python benchmarks/learn_retrieval.py --data ../shared/data/beir/msmarco-subset --json benchmarks/results/learn_msmarco.json

Steps, each through the job a user would run (subprocesses, the bundled all-MiniLM-L6-v2 as base):
1. split the judged queries in two by a seeded shuffle: train / held-out (no query in both);
2. training groups for the train queries: positives from the qrels (relevance >= --min_rel),
   negatives mined from the corpus with ``jobs/mine_hard_negatives.py`` (ranks --range_for_sampling);
   with ``--ict``, also Inverse-Cloze pairs from the corpus itself (a sentence as the query, its
   passage without that sentence as the positive, negatives mined the same way): unsupervised
   domain adaptation that never looks at held-out query text;
3. ``jobs/finetune_embedder.py`` on Ray Train (2 workers, cross-worker negatives);
4. ``jobs/evaluate.py`` on the held-out queries (full corpus) for the base and the fine-tuned model.
Prints nDCG@10 / recall@100 / MAP@10 side by side.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import REPO, job_env  # noqa: E402

PY = sys.executable
METRICS = ("ndcg_at_10", "recall_at_100", "map_at_10")


def read_beir(folder: Path):
    docs = [json.loads(x) for x in open(folder / "corpus.jsonl", encoding="utf-8") if x.strip()]
    queries = {json.loads(x)["_id"]: json.loads(x)["text"] for x in open(folder / "queries.jsonl", encoding="utf-8")
               if x.strip()}
    qrels: dict[str, dict[str, int]] = {}
    for line in open(folder / "qrels" / "test.tsv", encoding="utf-8"):
        parts = line.rstrip("\n").split("\t")
        if len(parts) == 3 and parts[2].lstrip("-").isdigit() and parts[0] in queries:
            qrels.setdefault(parts[0], {})[parts[1]] = int(parts[2])
    return docs, queries, qrels


def doc_text(d: dict) -> str:
    return (d.get("title", "") + " " + d["text"]).strip()


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def ict_pairs(docs, rng: random.Random, min_words: int = 5):
    """A sentence of each passage as a pseudo-query; the rest of the passage as its positive."""
    out = []
    for d in docs:
        sentences = [s.strip() for s in re.split(r"(?<=[.!?\u061f\u06d4])\s+", doc_text(d)) if s.strip()]
        choices = [i for i, s in enumerate(sentences) if len(s.split()) >= min_words]
        if len(sentences) < 2 or not choices:
            continue
        i = rng.choice(choices)
        rest = " ".join(s for j, s in enumerate(sentences) if j != i)
        out.append({"query": sentences[i], "pos": [rest]})
    return out


def split_queries(docs, queries, qrels, work: Path, name: str, rng: random.Random, train_fraction: float = 0.5,
                  min_rel: int = 1):
    """Judged queries split in two by a seeded shuffle (no query in both); the held-out half is
    written as a BEIR folder with the whole corpus. Returns (train ids, held-out ids, folder)."""
    judged = sorted(q for q, r in qrels.items() if any(s >= min_rel for s in r.values()))
    rng.shuffle(judged)
    cut = int(round(len(judged) * train_fraction))
    train_q, test_q = sorted(judged[:cut]), sorted(judged[cut:])
    assert not set(train_q) & set(test_q)
    held = work / "heldout" / name
    write_jsonl(held / "corpus.jsonl", docs)
    write_jsonl(held / "queries.jsonl", [{"_id": q, "text": queries[q]} for q in test_q])
    (held / "qrels").mkdir(parents=True, exist_ok=True)
    with open(held / "qrels" / "test.tsv", "w", encoding="utf-8") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for q in test_q:
            for d, s in qrels[q].items():
                f.write(f"{q}\t{d}\t{s}\n")
    return train_q, test_q, held


def run(cmd, log: Path, env) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    if proc.returncode:
        raise SystemExit(f"{cmd[1]} failed ({proc.returncode}); log {log}:\n{log.read_text()[-3000:]}")
    return time.perf_counter() - t0


def evaluate(model: str | None, beir_dir: Path, work: Path, tag: str, env, max_length: int) -> dict:
    out = work / f"eval_{tag}"
    cmd = [PY, REPO / "jobs" / "evaluate.py", "--eval_name", "custom", "--dataset_dir", beir_dir, "--splits", "test",
           "--search_top_k", "100", "--k_values", "10", "100", "--eval_metrics", *METRICS,
           "--use_fp16", "False", "--embedder_batch_size", "64", "--embedder_query_max_length", str(max_length),
           "--embedder_passage_max_length", str(max_length), "--output_dir", out,
           "--eval_output_path", work / f"eval_{tag}.md"]
    if model:
        cmd += ["--embedder_name_or_path", model]
    secs = run(cmd, work / f"eval_{tag}.log", env)
    report = json.loads(next(out.glob("*/EVAL/*-test.json")).read_text())
    return {"seconds": round(secs, 1), **{m: report["search"][m] for m in METRICS}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "beir" / "arcd-subset"))
    p.add_argument("--train_fraction", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--min_rel", type=int, default=1)
    p.add_argument("--ict", action="store_true", help="add Inverse-Cloze pairs from the corpus")
    p.add_argument("--range_for_sampling", default="2-100")
    p.add_argument("--negative_number", type=int, default=15)
    p.add_argument("--train_group_size", type=int, default=4)
    p.add_argument("--per_device_train_batch_size", type=int, default=4)
    p.add_argument("--num_workers", type=int, default=2)
    p.add_argument("--learning_rate", type=float, default=5e-5)
    p.add_argument("--num_train_epochs", type=float, default=5)
    p.add_argument("--temperature", type=float, default=0.02)
    p.add_argument("--query_max_len", type=int, default=64)
    p.add_argument("--passage_max_len", type=int, default=128)
    p.add_argument("--eval_max_length", type=int, default=256)
    p.add_argument("--work", default=None)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)

    data = Path(a.data)
    work = Path(a.work or tempfile.mkdtemp(prefix=f"learn_{data.name}_"))
    work.mkdir(parents=True, exist_ok=True)
    env = job_env()
    docs, queries, qrels = read_beir(data)
    rng = random.Random(a.seed)  # shuffles the split, then samples ICT sentences (as the recorded runs did)
    train_q, test_q, held = split_queries(docs, queries, qrels, work, data.name, rng, a.train_fraction, a.min_rel)
    by_id = {d["_id"]: d for d in docs}

    groups = [{"query": queries[q], "pos": [doc_text(by_id[d]) for d, s in qrels[q].items() if s >= a.min_rel and d in by_id]}
              for q in train_q]
    if a.ict:
        groups += ict_pairs(docs, rng)
    raw = write_jsonl(work / "train_raw.jsonl", groups)
    pool = write_jsonl(work / "pool.jsonl", [{"text": doc_text(d)} for d in docs])
    mined = work / "train_mined.jsonl"
    timings = {}
    print(f"{len(train_q)} train queries, {len(test_q)} held-out queries, {len(groups)} training groups"
          f"{' (with ICT)' if a.ict else ''}; work folder {work}", flush=True)
    timings["mine"] = run([PY, REPO / "jobs" / "mine_hard_negatives.py", "--input_file", raw, "--output_file", mined,
                           "--candidate_pool", pool, "--range_for_sampling", a.range_for_sampling,
                           "--negative_number", str(a.negative_number), "--embedder_passage_max_length",
                           str(a.eval_max_length), "--use_fp16", "False"], work / "mine.log", env)
    ft = work / "finetuned"
    timings["finetune"] = run([PY, REPO / "jobs" / "finetune_embedder.py", "--train_data", mined, "--output_dir", ft,
                               "--overwrite_output_dir", "--train_group_size", str(a.train_group_size),
                               "--query_max_len", str(a.query_max_len), "--passage_max_len", str(a.passage_max_len),
                               "--per_device_train_batch_size", str(a.per_device_train_batch_size),
                               "--learning_rate", str(a.learning_rate), "--num_train_epochs", str(a.num_train_epochs),
                               "--temperature", str(a.temperature), "--warmup_ratio", "0.1",
                               "--negatives_cross_device", "--num_workers", str(a.num_workers),
                               "--save_steps", "100000", "--seed", str(a.seed)], work / "finetune.log", env)
    print(f"mined in {timings['mine']:.0f} s, fine-tuned in {timings['finetune']:.0f} s", flush=True)
    base = evaluate(None, held.parent, work, "base", env, a.eval_max_length)
    tuned = evaluate(str(ft), held.parent, work, "finetuned", env, a.eval_max_length)
    summary = json.loads((ft / "training_summary.json").read_text())
    losses = [h["loss"] for h in summary["log_history"]]
    print(f"\n{data.name}: {len(test_q)} held-out queries (disjoint from {len(train_q)} train queries)")
    print("| model | nDCG@10 | recall@100 | MAP@10 |\n|---|---|---|---|")
    for name, r in (("base all-MiniLM-L6-v2", base), ("fine-tuned", tuned)):
        print(f"| {name} | {r['ndcg_at_10']:.4f} | {r['recall_at_100']:.4f} | {r['map_at_10']:.4f} |")
    print(f"nDCG@10 {base['ndcg_at_10']:.4f} -> {tuned['ndcg_at_10']:.4f} "
          f"({tuned['ndcg_at_10'] - base['ndcg_at_10']:+.4f}); training loss {losses[0]:.3f} -> {losses[-1]:.3f} "
          f"over {len(losses)} steps, {summary['final_metrics'].get('groups_per_s', 0):.2f} groups/s")
    report = {"data": str(data), "train_queries": len(train_q), "heldout_queries": len(test_q),
              "training_groups": len(groups), "ict": a.ict, "args": vars(a), "base": base, "finetuned": tuned,
              "loss_first": losses[0], "loss_last": losses[-1], "steps": len(losses), "timings": timings,
              "groups_per_s": summary["final_metrics"].get("groups_per_s")}
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
