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
