"""BEIR-format folders: corpus.jsonl (_id, title, text), queries.jsonl (_id, text), qrels/{split}.tsv."""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass


@dataclass
class BeirDataset:
    corpus: dict[str, dict]  # id -> {"title", "text"}
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]

    def passage_text(self, doc_id: str) -> str:
        """BEIR convention: title + " " + text when a title is present."""
        d = self.corpus[doc_id]
        title, text = (d.get("title") or "").strip(), (d.get("text") or "").strip()
        return f"{title} {text}".strip() if title else text


def _read_jsonl(path: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not valid JSON ({exc.msg})") from exc
    return rows


def read_qrels(path: str) -> dict[str, dict[str, int]]:
    """``query-id corpus-id score`` rows, tab-separated; a header line is optional."""
    qrels: dict[str, dict[str, int]] = {}
    with open(path, encoding="utf-8", newline="") as f:
        for n, row in enumerate(csv.reader(f, delimiter="\t"), 1):
            if not row or not "".join(row).strip():
                continue
            if len(row) < 3:
                raise ValueError(f"{path}:{n}: expected 'query-id<TAB>corpus-id<TAB>score', got {row!r}")
            try:
                score = int(float(row[2]))
            except ValueError:
                if n == 1:
                    continue  # header
                raise ValueError(f"{path}:{n}: score {row[2]!r} is not a number") from None
            qrels.setdefault(row[0], {})[row[1]] = score
    return qrels


def load_beir(folder: str, split: str = "test") -> BeirDataset:
    corpus = {}
    for n, d in enumerate(_read_jsonl(os.path.join(folder, "corpus.jsonl")), 1):
        if "_id" not in d:
            raise ValueError(f"{folder}/corpus.jsonl:{n}: missing '_id'")
        corpus[str(d["_id"])] = d
    queries = {str(q["_id"]): q["text"] for q in _read_jsonl(os.path.join(folder, "queries.jsonl"))}
    qrels = read_qrels(os.path.join(folder, "qrels", f"{split}.tsv"))
    return BeirDataset(corpus, queries, qrels)
