"""Evaluation searchers against brute force and FlagEmbedding's score definitions on the tiny M3."""

from __future__ import annotations

import json
from itertools import islice

import numpy as np
import pytest

from bge_ray.eval import searchers as S
from bge_ray.index import faiss_index
from bge_ray.models.m3 import BGEM3FlagModel
from bge_ray.models.reranker import FlagReranker

TOL = 1e-5
N_DOCS, N_QUERIES, TOP_K = 24, 6, 5
SELF_QID = "d3"  # a query whose id (and text) is also a corpus document


def _oracle_lexical(a: dict, b: dict) -> float:
    from FlagEmbedding import BGEM3FlagModel as FlagM3

    return FlagM3.compute_lexical_matching_score(None, a, b)  # does not touch self


def _oracle_colbert(q: np.ndarray, p: np.ndarray) -> float:
    from FlagEmbedding import BGEM3FlagModel as FlagM3

    return float(FlagM3.colbert_score(None, q, p))


@pytest.fixture(scope="module")
def data(shared_data, tiny_m3):
    root = shared_data / "beir" / "msmarco-subset"
    with open(root / "corpus.jsonl", encoding="utf-8") as f:
        docs = {f"d{i}": json.loads(line)["text"][:300] for i, line in enumerate(islice(f, N_DOCS))}
    with open(root / "queries.jsonl", encoding="utf-8") as f:
        queries = {f"q{i}": json.loads(line)["text"] for i, line in enumerate(islice(f, N_QUERIES - 1))}
    queries[SELF_QID] = docs[SELF_QID]
    model = BGEM3FlagModel(str(tiny_m3), use_fp16=False, devices="cpu", batch_size=8)
    kw = dict(return_dense=True, return_sparse=True, return_colbert_vecs=True)
    enc_d = model.encode(list(docs.values()), **kw)
    enc_q = model.encode(list(queries.values()), **kw)
    return dict(
        model=model, docs=docs, queries=queries, doc_ids=list(docs), query_ids=list(queries), d=enc_d, q=enc_q
    )


def _brute_topk(scores: np.ndarray, k: int) -> np.ndarray:
    return np.sort(scores)[::-1][:k]


def _is_sorted(run: dict) -> bool:
    vals = list(run.values())
    return all(a >= b for a, b in zip(vals, vals[1:], strict=False))


def test_dense_search_equals_numpy(data):
    q, d = data["q"]["dense_vecs"], data["d"]["dense_vecs"]
    full = q @ d.T
    from_array = S.dense_search(q, data["query_ids"], d, data["doc_ids"], TOP_K, chunk_size=2)
    from_index = S.dense_search(q, data["query_ids"], faiss_index.build_index(d), data["doc_ids"], TOP_K)
    for i, qid in enumerate(data["query_ids"]):
        for run in (from_array[qid], from_index[qid]):
            assert len(run) == TOP_K and _is_sorted(run)
            np.testing.assert_allclose(list(run.values()), _brute_topk(full[i], TOP_K), atol=TOL)
            for doc, s in run.items():
                assert s == pytest.approx(full[i, data["doc_ids"].index(doc)], abs=TOL)
    assert next(iter(from_array[SELF_QID])) == SELF_QID


def test_sparse_search_equals_lexical_matching_score(data):
    d_w, q_w = data["d"]["lexical_weights"], data["q"]["lexical_weights"]
    index = S.SparseIndex(d_w, data["doc_ids"])
    run = index.search(q_w, data["query_ids"], TOP_K, chunk_size=4)
    for i, qid in enumerate(data["query_ids"]):
        oracle = np.array([_oracle_lexical(q_w[i], w) for w in d_w])
        assert (oracle > 0).sum() >= TOP_K  # the comparison below is over real matches
        got = run[qid]
        assert len(got) == TOP_K and _is_sorted(got)
        for doc, s in got.items():
            assert s == pytest.approx(oracle[data["doc_ids"].index(doc)], rel=TOL, abs=TOL)
        np.testing.assert_allclose(list(got.values()), _brute_topk(oracle, TOP_K), rtol=TOL, atol=TOL)
        rows = np.arange(0, N_DOCS, 3)
        np.testing.assert_allclose(index.score(q_w[i], rows), oracle[rows], rtol=TOL, atol=TOL)
    # The array form of encode_raw builds the same index.
    raw = data["model"].encode_raw(list(data["docs"].values()), return_dense=False, return_colbert_vecs=False)
    same = S.SparseIndex(raw["sparse"], data["doc_ids"], vocab_size=index.vocab_size)
    assert (same.matrix != index.matrix).nnz == 0


def test_hybrid_is_the_weighted_sum_of_exact_mode_scores(data):
    q, d = data["q"]["dense_vecs"], data["d"]["dense_vecs"]
    q_w, d_w = data["q"]["lexical_weights"], data["d"]["lexical_weights"]
    index = S.SparseIndex(d_w, data["doc_ids"])
    w = {"dense": 0.7, "sparse": 0.3}
    fused, modes = S.hybrid_search(
        data["query_ids"], data["doc_ids"], TOP_K, q, d, q_w, index, weights=w, candidate_k=3
    )
    dense_run = S.dense_search(q, data["query_ids"], d, data["doc_ids"], 3)
    sparse_run = index.search(q_w, data["query_ids"], 3)
    for i, qid in enumerate(data["query_ids"]):
        assert _is_sorted(fused[qid]) and 3 <= len(fused[qid]) <= TOP_K
        assert set(fused[qid]) <= set(dense_run[qid]) | set(sparse_run[qid])
        assert set(modes["dense"][qid]) == set(modes["sparse"][qid]) == set(fused[qid])
        for doc, s in fused[qid].items():
            j = data["doc_ids"].index(doc)
            dense, sparse = modes["dense"][qid][doc], modes["sparse"][qid][doc]
            assert s == pytest.approx(w["dense"] * dense + w["sparse"] * sparse, abs=1e-9)
            assert dense == pytest.approx(float(q[i] @ d[j]), abs=TOL)  # exact even when sparse found it
            assert sparse == pytest.approx(_oracle_lexical(q_w[i], d_w[j]), rel=TOL, abs=TOL)
    # With every document a candidate the fused top-k is the brute-force one.
    full, _ = S.hybrid_search(
        data["query_ids"],
        data["doc_ids"],
        TOP_K,
        q,
        faiss_index.build_index(d),
        q_w,
        index,
        weights=[0.7, 0.3],
        candidate_k=N_DOCS,
    )
    for i, qid in enumerate(data["query_ids"]):
        brute = 0.7 * (d @ q[i]) + 0.3 * np.array([_oracle_lexical(q_w[i], x) for x in d_w])
        np.testing.assert_allclose(list(full[qid].values()), _brute_topk(brute, TOP_K), atol=TOL)


def test_colbert_rescore_equals_colbert_score_and_m3_fusion(data):
    q, d = data["q"]["dense_vecs"], data["d"]["dense_vecs"]
    q_w, d_w = data["q"]["lexical_weights"], data["d"]["lexical_weights"]
    q_c, d_c = data["q"]["colbert_vecs"], data["d"]["colbert_vecs"]
    index = S.SparseIndex(d_w, data["doc_ids"])
    cand = S.hybrid_search(data["query_ids"], data["doc_ids"], 8, q, d, q_w, index)
    lookup = dict(zip(data["doc_ids"], d_c, strict=True))
    only, per = S.colbert_rescore(q_c, lookup, cand.results, query_ids=data["query_ids"])
    for i, qid in enumerate(data["query_ids"]):
        assert set(only[qid]) == set(cand.results[qid]) and _is_sorted(only[qid])
        for doc, s in only[qid].items():
            assert s == pytest.approx(_oracle_colbert(q_c[i], lookup[doc]), abs=TOL)
            assert per["colbert"][qid][doc] == s
    weights = [0.4, 0.2, 0.4]
    fused, per = S.colbert_rescore(
        dict(zip(data["query_ids"], q_c, strict=True)),
        lookup.__getitem__,
        cand.results,
        mode_scores=cand.mode_scores,
        weights=weights,
        normalize_weights=True,
        top_k=3,
    )
    pairs, got = [], []
    for qid in data["query_ids"]:
        assert len(fused[qid]) == 3 and _is_sorted(fused[qid])
        for doc, s in fused[qid].items():
            pairs.append((data["queries"][qid], data["docs"][doc]))
            got.append(s)
            parts = [per[m][qid][doc] for m in ("dense", "sparse", "colbert")]
            assert s == pytest.approx(np.dot(weights, parts) / sum(weights), abs=1e-9)
    want = data["model"].compute_score(pairs, weights_for_different_modes=weights)["colbert+sparse+dense"]
    np.testing.assert_allclose(got, want, atol=TOL)


def test_rerank_changes_order_only_inside_top_k(data, tiny_xlmr_reranker):
    q, d = data["q"]["dense_vecs"], data["d"]["dense_vecs"]
    first = S.dense_search(q, data["query_ids"], d, data["doc_ids"], 10)
    reranker = FlagReranker(str(tiny_xlmr_reranker), use_fp16=False, devices="cpu")
    k = 4
    out = S.rerank(reranker, data["queries"], data["docs"], first, top_k=k, batch_size=8)
    changed = False
    for qid, run in out.items():
        before, after = list(first[qid]), list(run)
        assert len(after) == 10 and _is_sorted(run)
        assert set(after[:k]) == set(before[:k])
        assert after[k:] == before[k:]  # the tail keeps its order ...
        assert min(list(run.values())[:k]) > max(list(run.values())[k:])  # ... and stays below
        want = reranker.compute_score([(data["queries"][qid], data["docs"][doc]) for doc in after[:k]])
        np.testing.assert_allclose(list(run.values())[:k], want, atol=TOL)  # batch padding differs
        changed |= after[:k] != before[:k]
    assert changed, "the tiny reranker should reorder at least one query's top-k"
    dropped = S.rerank(reranker, data["queries"], data["docs"].__getitem__, first, top_k=k, keep_tail=False)
    assert {qid: list(r) for qid, r in dropped.items()} == {qid: list(r)[:k] for qid, r in out.items()}
    no_self = S.rerank(reranker, data["queries"], data["docs"], first, top_k=k, ignore_identical_ids=True)
    assert SELF_QID not in no_self[SELF_QID] and len(no_self[SELF_QID]) == 9


def test_ignore_identical_ids(data):
    q, d = data["q"]["dense_vecs"], data["d"]["dense_vecs"]
    q_w, d_w = data["q"]["lexical_weights"], data["d"]["lexical_weights"]
    qids, dids = data["query_ids"], data["doc_ids"]
    index = S.SparseIndex(d_w, dids)
    runs = {
        "dense": lambda k, ig: S.dense_search(q, qids, d, dids, k, ignore_identical_ids=ig),
        "sparse": lambda k, ig: index.search(q_w, qids, k, ignore_identical_ids=ig),
        "hybrid": lambda k, ig: (
            S.hybrid_search(
                qids, dids, k, q, d, q_w, index, candidate_k=TOP_K + 1, ignore_identical_ids=ig
            ).results
        ),
    }
    for name, search in runs.items():
        kept, dropped, deeper = search(TOP_K, False), search(TOP_K, True), search(TOP_K + 1, False)
        assert SELF_QID in kept[SELF_QID], name
        # Dropped before the cut: still TOP_K documents, the next one moving up.
        assert list(dropped[SELF_QID]) == [x for x in deeper[SELF_QID] if x != SELF_QID], name
        assert len(dropped[SELF_QID]) == TOP_K, name
        for qid in qids:
            if qid != SELF_QID and qid not in dids:
                assert dropped[qid] == kept[qid], name


def test_errors_name_the_input(data):
    q, d = data["q"]["dense_vecs"], data["d"]["dense_vecs"]
    with pytest.raises(ValueError, match="doc_ids has 3 ids"):
        S.dense_search(q, data["query_ids"], d, data["doc_ids"][:3], 2)
    with pytest.raises(ValueError, match="query_emb"):
        S.dense_search(q[:2], data["query_ids"], d, data["doc_ids"], 2)
    with pytest.raises(ValueError, match="duplicate id 'd0'"):
        S.SparseIndex(data["d"]["lexical_weights"][:2], ["d0", "d0"])
    with pytest.raises(ValueError, match=r"doc_weights\[1\] has a key"):
        S.SparseIndex([{"5": 1.0}, {"tok": 1.0}], ["a", "b"])
    with pytest.raises(KeyError, match="'missing'"):
        S.rerank(None, {"q": "x"}, {}, {"q": {"missing": 1.0}})
    with pytest.raises(ValueError, match="top_k"):
        S.dense_search(q, data["query_ids"], d, data["doc_ids"], 0)
