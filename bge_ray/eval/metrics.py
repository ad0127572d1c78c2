"""Retrieval metrics through pytrec_eval, averaged over queries that have qrels (its convention)."""

from __future__ import annotations

import numpy as np

_MEASURES = {"ndcg": "ndcg_cut", "recall": "recall", "map": "map_cut", "precision": "P", "mrr": "recip_rank"}


def evaluate(
    qrels: dict[str, dict[str, int]],
    results: dict[str, dict[str, float]],
    k_values: list[int] = (1, 3, 5, 10, 100, 1000),
    metrics: tuple[str, ...] = ("ndcg", "recall", "map", "precision", "mrr"),
) -> dict[str, float]:
    """``{"ndcg_at_10": ..., "recall_at_100": ..., "mrr_at_10": ...}`` over queries with qrels."""
    import pytrec_eval

    unknown = set(metrics) - set(_MEASURES)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {sorted(_MEASURES)}")
    ks = ",".join(str(k) for k in k_values)
    measures = {f"{_MEASURES[m]}.{ks}" for m in metrics if m != "mrr"}
    qrels = {q: d for q, d in qrels.items() if d}
    runs = {q: {d: float(s) for d, s in results.get(q, {}).items()} for q in qrels}
    out: dict[str, float] = {}
    if measures:
        per_query = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(runs)
        for m in metrics:
            if m == "mrr":
                continue
            for k in k_values:
                key = f"{_MEASURES[m]}_{k}"
                out[f"{m}_at_{k}"] = float(np.mean([v[key] for v in per_query.values()])) if per_query else 0.0
    if "mrr" in metrics:
        # MRR@k: recip_rank on the run truncated to its top k.
        for k in k_values:
            cut = {q: dict(sorted(r.items(), key=lambda x: -x[1])[:k]) for q, r in runs.items()}
            per_query = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(cut)
            out[f"mrr_at_{k}"] = float(np.mean([v["recip_rank"] for v in per_query.values()])) if per_query else 0.0
    return out


def parse_metric(name: str) -> tuple[str, int]:
    """``"ndcg_at_10"`` -> ``("ndcg", 10)``; errors list the known metrics."""
    base, sep, k = name.rpartition("_at_")
    known = sorted({*_MEASURES, "qa_recall", "recall_cap"})
    if not sep or base not in known or not k.isdigit() or int(k) < 1:
        raise ValueError(f"metric {name!r} should look like NAME_at_K with NAME one of {known} and K >= 1 "
                         f"(e.g. ndcg_at_10)")
    return base, int(k)


def recall_cap(qrels: dict[str, dict[str, int]], results: dict[str, dict[str, float]],
               k_values=(1, 3, 5, 10, 100, 1000)) -> dict[str, float]:
    """Capped recall (BEIR): relevant docs in the top k / min(k, relevant docs), over queries with qrels."""
    judged = {q: {d for d, r in docs.items() if r > 0} for q, docs in qrels.items() if docs}
    out = {}
    for k in k_values:
        vals = []
        for q, rel in judged.items():
            top = sorted(results.get(q, {}).items(), key=lambda x: -x[1])[:k]
            vals.append(sum(d in rel for d, _ in top) / min(k, len(rel)) if rel else 0.0)
        out[f"recall_cap_at_{k}"] = float(np.mean(vals)) if vals else 0.0
    return out


# -- MKQA: a hit is a top-k passage containing an answer (token sequence match, as in DPR / Contriever)
_TOKEN_RE = None


def _tokens(text: str) -> list[str]:
    global _TOKEN_RE
    import unicodedata

    if _TOKEN_RE is None:
        import regex

        _TOKEN_RE = regex.compile(r"[\p{L}\p{N}\p{M}]+|[^\p{Z}\p{C}]", flags=regex.IGNORECASE | regex.UNICODE)
    return [m.group().lower() for m in _TOKEN_RE.finditer(unicodedata.normalize("NFD", text))]


def has_answer(answers: list[str], text: str) -> bool:
    """Whether ``text`` contains one of ``answers`` as a token sequence (case- and accent-form-insensitive)."""
    words = _tokens(text)
    for answer in answers:
        a = _tokens(answer)
        if a and any(words[i : i + len(a)] == a for i in range(len(words) - len(a) + 1)):
            return True
    return False


def qa_recall(
    answers: dict[str, list[str]],
    results: dict[str, dict[str, float]],
    passage_text,
    k_values=(1, 3, 5, 10, 100, 1000),
) -> dict[str, float]:
    """MKQA's ``qa_recall_at_k``: share of queries with an answer-bearing passage in their top k.

    ``passage_text(doc_id) -> str``. Averaged over the searched queries that have answers, as
    FlagEmbedding does; k is capped at the number of results returned (its convention too).
    """
    queries = [q for q in results if q in answers]
    if not queries:
        return {f"qa_recall_at_{k}": 0.0 for k in k_values}
    top_k = max(k_values)
    depth = min(top_k, max(len(results[q]) for q in queries))
    first_hit = []
    for q in queries:
        ranked = sorted(results[q].items(), key=lambda x: -x[1])[:top_k]
        first_hit.append(next((i for i, (d, _) in enumerate(ranked) if has_answer(answers[q], passage_text(d))), None))
    out = {}
    for k in k_values:
        kk = min(k, depth)
        out[f"qa_recall_at_{k}"] = sum(h is not None and h < kk for h in first_hit) / len(queries)
    return out
