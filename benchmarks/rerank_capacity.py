"""Why a cross-encoder fine-tuned from the bundled MiniLM does not beat dense retrieval on arcd-subset:
what the model sees of the text, and whether the training path can fit the groups at all.

    python benchmarks/rerank_capacity.py --train_file WORK/train_mined.jsonl \\
        --json benchmarks/results/rerank_capacity_arcd.json

``--train_file`` is the mined training file ``benchmarks/learn_rerank.py`` writes in its work folder.
Prints (1) tokens per passage / query, the [UNK] share and the number of distinct token ids under the
MiniLM (English WordPiece) tokenizer, and (2) the training loss of the reranker task on the first
``--groups`` groups repeated for ``--rounds`` rounds, in process (no Ray): if it falls towards 0 the
loss, model and optimisation work and the held-out result is a matter of data and steps.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bge_ray.models.loading import load_tokenizer, resolve_model_path  # noqa: E402
from bge_ray.train.arguments import ModelArgs, TrainArgs  # noqa: E402
from bge_ray.train.reranker import RerankerDataArgs, RerankerTask  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "beir" / "arcd-subset"


def token_stats(tok, texts: list[str]) -> dict:
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    total = sum(len(x) for x in ids)
    return {"texts": len(texts), "tokens_per_text": total / len(ids),
            "unk_share": sum(x.count(tok.unk_token_id) for x in ids) / total,
            "distinct_ids": len(collections.Counter(t for x in ids for t in x))}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(SHARED))
    p.add_argument("--train_file", required=True)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--rounds", type=int, default=25)
    p.add_argument("--learning_rate", type=float, default=1e-4)
    p.add_argument("--query_max_len", type=int, default=64)
    p.add_argument("--passage_max_len", type=int, default=192)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    tok = load_tokenizer(resolve_model_path(None))
    data = Path(a.data)
    docs = [json.loads(x) for x in (data / "corpus.jsonl").read_text(encoding="utf-8").splitlines()]
    queries = [json.loads(x) for x in (data / "queries.jsonl").read_text(encoding="utf-8").splitlines()]
    stats = {"passages": token_stats(tok, [(d.get("title", "") + " " + d["text"]).strip() for d in docs[:500]]),
             "queries": token_stats(tok, [q["text"] for q in queries])}
    sample = tok.convert_ids_to_tokens(tok(queries[0]["text"])["input_ids"])
    print(json.dumps(stats, indent=1))
    print("a query as the model sees it:", " ".join(sample))

    torch.manual_seed(0)
    rows = [json.loads(x) for x in Path(a.train_file).read_text(encoding="utf-8").splitlines()][:a.groups]
    for i, r in enumerate(rows):
        r.update(slot=i, file=a.train_file, line=i + 1, epoch=0)
    task = RerankerTask(ModelArgs(), RerankerDataArgs(train_group_size=8, query_max_len=a.query_max_len,
                                                      passage_max_len=a.passage_max_len),
                        TrainArgs(output_dir="unused"))
    model, _ = task.build()
    model.train()
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=a.learning_rate)
    half, curve, t0 = max(len(rows) // 2, 1), [], time.perf_counter()
    for step in range(a.rounds):
        for b in range(0, len(rows), half):
            out = task.step(model, rows[b:b + half], 0, torch.device("cpu"))
            out.backward.backward()
            opt.step()
            opt.zero_grad()
        curve.append(round(float(out.value), 4))
        print(f"round {step}: loss {curve[-1]:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    res = {"tokens": stats, "query_tokens": sample, "memorise": {"groups": len(rows), "group_size": 8,
                                                                 "learning_rate": a.learning_rate, "loss": curve}}
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2, ensure_ascii=False))
    return res


if __name__ == "__main__":
    main()
