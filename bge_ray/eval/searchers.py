"""Retrieval for evaluation: dense (faiss), sparse (M3 lexical weights), hybrid, ColBERT re-scoring, rerank.

Every searcher returns ``dict[qid, dict[docid, score]]`` (pytrec_eval's run format), best first.

``ignore_identical_ids`` follows FlagEmbedding's evaluation: a document whose id equals the query id
is dropped (BEIR sets such as ArguAna / Quora hold the queries in the corpus). We drop it *before*
cutting to ``top_k`` (searching ``top_k + 1``), so a query still gets ``top_k`` documents where
FlagEmbedding returns ``top_k - 1``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import scipy.sparse as sp

from bge_ray.index import faiss_index

Results = dict[str, dict[str, float]]
LexicalRow = Mapping[str, float] | tuple[np.ndarray, np.ndarray]
MODES = ("dense", "sparse", "colbert")
# Dense query x corpus score blocks are kept under this many float32 cells (~128 MiB).
_BLOCK_CELLS = 1 << 25
_PAIR_CHUNK = 1 << 16


class FusedResults(NamedTuple):
    """Fused ranking plus each mode's exact score of the very same documents."""

    results: Results
    mode_scores: dict[str, Results]


# -- shared helpers ---------------------------------------------------------------------------------
def _ids(values: Sequence[Any], what: str) -> np.ndarray:
    """Ids as an object array of str; duplicates would silently merge results, so they are refused."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise TypeError(f"{what} must be a sequence of ids, got {type(values).__name__}")
    arr = np.empty(len(values), dtype=object)
    arr[:] = [str(v) for v in values]
    if len(set(arr)) != len(arr):
        seen: set[str] = set()
        dup = next(v for v in arr if v in seen or seen.add(v))
        raise ValueError(f"{what} has duplicate id {dup!r}")
    return arr


def _check_top_k(top_k: int, what: str = "top_k") -> int:
    if not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool) or top_k < 1:
        raise ValueError(f"{what} must be a positive integer, got {top_k!r}")
    return int(top_k)


def _pairs_from_topk(scores: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flatten an [n_q, k] top-k answer into (query index, doc row, score), dropping faiss's -1 fillers."""
    qi = np.repeat(np.arange(rows.shape[0]), rows.shape[1])
    rows, scores = rows.ravel(), scores.ravel()
    keep = rows >= 0
    return qi[keep], rows[keep], scores[keep]


def _rank_pairs(
    qi: np.ndarray,
    rows: np.ndarray,
    score: np.ndarray,
    query_ids: np.ndarray,
    doc_ids: np.ndarray,
    top_k: int,
    ignore_identical_ids: bool,
) -> np.ndarray:
    """Indices of the pairs kept: per query the ``top_k`` best, best first, identical ids dropped first."""
    order = np.arange(len(qi))
    if ignore_identical_ids and len(qi):
        order = order[doc_ids[rows] != query_ids[qi]]
    # Group by query, best score first; ties keep row order.
    order = order[np.lexsort((rows[order], -score[order], qi[order]))]
    grouped = qi[order]
    starts = np.searchsorted(grouped, grouped, side="left")
    return order[np.arange(len(order)) - starts < top_k]


def _to_results(
    keep: np.ndarray,
    qi: np.ndarray,
    rows: np.ndarray,
    columns: Mapping[str, np.ndarray],
    query_ids: np.ndarray,
    doc_ids: np.ndarray,
) -> dict[str, Results]:
    """One run dict per score column, every query present (possibly empty), insertion order = rank."""
    out: dict[str, Results] = {name: {q: {} for q in query_ids} for name in columns}
    q_sel, d_sel = query_ids[qi[keep]], doc_ids[rows[keep]]
    for name, col in columns.items():
        run = out[name]
        for q, d, s in zip(q_sel, d_sel, col[keep].tolist(), strict=True):
            run[q][d] = s
    return out


def _mode_weights(weights: Mapping[str, float] | Sequence[float], modes: Sequence[str]) -> dict[str, float]:
    """``{"dense": w, ...}`` or a sequence in M3's order ``[w_dense, w_sparse, w_colbert]``."""
    if isinstance(weights, Mapping):
        unknown = set(weights) - set(MODES)
        if unknown:
            raise ValueError(f"weights has unknown modes {sorted(unknown)}; expected keys among {MODES}")
        w = {m: float(weights.get(m, 0.0)) for m in modes}
    else:
        seq = [float(x) for x in weights]
        if len(seq) not in (2, 3):
            raise ValueError(f"weights must be [w_dense, w_sparse(, w_colbert)], got {list(weights)}")
        w = {m: dict(zip(MODES, seq, strict=False)).get(m, 0.0) for m in modes}
    if sum(w.values()) == 0:
        raise ValueError(f"weights {weights!r} give zero weight to every mode in use {list(modes)}")
    return w


# -- dense -------------------------------------------------------------------------------------------
def _as_index(index_or_corpus_emb, n_docs: int):
    if isinstance(index_or_corpus_emb, np.ndarray):
        if index_or_corpus_emb.ndim != 2:
            raise ValueError(
                f"corpus embeddings must be [n_docs, dim], got shape {index_or_corpus_emb.shape}"
            )
        index = faiss_index.build_index(index_or_corpus_emb, kind="flat")
    elif hasattr(index_or_corpus_emb, "ntotal") and hasattr(index_or_corpus_emb, "search"):
        index = index_or_corpus_emb
    else:
        raise TypeError(
            f"index_or_corpus_emb is {type(index_or_corpus_emb).__name__}, expected a faiss index or a "
            "float array [n_docs, dim]"
        )
    if index.ntotal != n_docs:
        raise ValueError(
            f"doc_ids has {n_docs} ids but the index / corpus embeddings hold {index.ntotal} rows"
        )
    return index


def _query_matrix(query_emb, n_queries: int, dim: int | None = None) -> np.ndarray:
    q = np.ascontiguousarray(query_emb, dtype=np.float32)
    if q.ndim != 2 or q.shape[0] != n_queries:
        raise ValueError(
            f"query_emb must be [{n_queries} queries, dim] (one row per query id), got {q.shape}"
        )
    if dim is not None and q.shape[1] != dim:
        raise ValueError(f"query_emb has dim {q.shape[1]} but the corpus embeddings have dim {dim}")
    return q


def _dense_topk(query_emb, query_ids, index_or_corpus_emb, doc_ids, k: int, chunk_size: int):
    index = _as_index(index_or_corpus_emb, len(doc_ids))
    q = _query_matrix(query_emb, len(query_ids), index.d)
    if index.ntotal == 0 or len(q) == 0:
        return index, (np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32))
    scores, rows = faiss_index.search(index, q, k, chunk_size=chunk_size)
    return index, _pairs_from_topk(scores, rows)


def dense_search(
    query_emb: np.ndarray,
    query_ids: Sequence[str],
    index_or_corpus_emb,
    doc_ids: Sequence[str],
    top_k: int,
    ignore_identical_ids: bool = False,
    chunk_size: int = 4096,
) -> Results:
    """Inner-product top-k through the shared faiss code (an array builds an exact flat index)."""
    top_k = _check_top_k(top_k)
    qids, dids = _ids(query_ids, "query_ids"), _ids(doc_ids, "doc_ids")
    _, (qi, rows, score) = _dense_topk(
        query_emb, qids, index_or_corpus_emb, dids, top_k + int(ignore_identical_ids), chunk_size
    )
    keep = _rank_pairs(qi, rows, score, qids, dids, top_k, ignore_identical_ids)
    return _to_results(keep, qi, rows, {"score": score.astype(np.float64)}, qids, dids)["score"]


def _doc_vectors(index_or_corpus_emb, rows: np.ndarray) -> np.ndarray:
    """Corpus vectors of ``rows``: from the array, or reconstructed from the faiss index."""
    if isinstance(index_or_corpus_emb, np.ndarray):
        return np.asarray(index_or_corpus_emb[rows], dtype=np.float32)
    index = index_or_corpus_emb
    try:
        return index.reconstruct_batch(rows.astype(np.int64))
    except RuntimeError:
        if not hasattr(index, "make_direct_map"):
            raise ValueError(
                f"cannot read vectors back from {type(index).__name__} for exact dense scores; "
                "pass the corpus embeddings array instead"
            ) from None
    index.make_direct_map()  # IVF indexes keep no id -> vector map until asked
    return index.reconstruct_batch(rows.astype(np.int64))


def dense_pair_scores(
    query_emb: np.ndarray, index_or_corpus_emb, qi: np.ndarray, rows: np.ndarray
) -> np.ndarray:
    """Exact inner products of query ``qi[j]`` with corpus row ``rows[j]``, in pair chunks."""
    q = np.asarray(query_emb, dtype=np.float32)
    out = np.empty(len(qi), dtype=np.float64)
    for s in range(0, len(qi), _PAIR_CHUNK):
        d = _doc_vectors(index_or_corpus_emb, rows[s : s + _PAIR_CHUNK])
        out[s : s + _PAIR_CHUNK] = np.einsum("ij,ij->i", q[qi[s : s + _PAIR_CHUNK]], d)
    return out


# -- sparse ------------------------------------------------------------------------------------------
def lexical_matrix(
    weights: Sequence[LexicalRow],
    vocab_size: int | None = None,
    what: str = "lexical weights",
    dtype=np.float32,
) -> sp.csr_matrix:
    """CSR [n, vocab] from M3 lexical weights: dicts ``{str(token_id): w}`` or ``(ids, weights)`` arrays.

    Token ids at or above ``vocab_size`` are dropped (they cannot match any document).
    """
    ids_parts, w_parts, counts = [], [], np.empty(len(weights), dtype=np.int64)
    for i, row in enumerate(weights):
        if isinstance(row, Mapping):
            try:
                ids = np.fromiter(map(int, row.keys()), dtype=np.int64, count=len(row))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{what}[{i}] has a key that is not a token id ({exc})") from exc
            w = np.fromiter(row.values(), dtype=np.float64, count=len(row))
        elif isinstance(row, tuple) and len(row) == 2:
            ids, w = np.asarray(row[0], dtype=np.int64), np.asarray(row[1], dtype=np.float64)
            if ids.shape != w.shape or ids.ndim != 1:
                raise ValueError(
                    f"{what}[{i}]: token ids {ids.shape} and weights {w.shape} must be equal 1-D"
                )
        else:
            raise TypeError(
                f"{what}[{i}] is {type(row).__name__}, expected a dict {{token_id: weight}} or (ids, weights)"
            )
        if len(ids) and ids.min() < 0:
            raise ValueError(f"{what}[{i}] has a negative token id {int(ids.min())}")
        ids_parts.append(ids)
        w_parts.append(w)
        counts[i] = len(ids)
    ids = np.concatenate(ids_parts) if ids_parts else np.empty(0, np.int64)
    w = np.concatenate(w_parts) if w_parts else np.empty(0)
    row_of = np.repeat(np.arange(len(weights)), counts)
    if vocab_size is None:
        vocab_size = int(ids.max()) + 1 if len(ids) else 1
    keep = ids < vocab_size
    m = sp.csr_matrix(
        (w[keep].astype(dtype), (row_of[keep], ids[keep])), shape=(len(weights), vocab_size), dtype=dtype
    )
    m.sum_duplicates()
    return m


class SparseIndex:
    """Documents' M3 lexical weights as a CSR doc x vocab matrix; score = sum over shared tokens q_w * d_w.

    That is FlagEmbedding's ``compute_lexical_matching_score``. Documents sharing no token with a
    query (score 0) are never returned, as with an inverted index.
    """

    def __init__(
        self,
        doc_weights: Sequence[LexicalRow] | sp.spmatrix,
        doc_ids: Sequence[str],
        vocab_size: int | None = None,
        dtype=np.float32,
    ):
        if sp.issparse(doc_weights):
            self.matrix = sp.csr_matrix(doc_weights, dtype=dtype)
        else:
            self.matrix = lexical_matrix(doc_weights, vocab_size, "doc_weights", dtype)
        self.doc_ids = _ids(doc_ids, "doc_ids")
        if self.matrix.shape[0] != len(self.doc_ids):
            raise ValueError(
                f"doc_ids has {len(self.doc_ids)} ids but doc_weights has {self.matrix.shape[0]} rows"
            )
        self.dtype = dtype
        self._transposed = self.matrix.T.tocsr()

    @property
    def vocab_size(self) -> int:
        return self.matrix.shape[1]

    def __len__(self) -> int:
        return self.matrix.shape[0]

    def query_matrix(self, query_weights: Sequence[LexicalRow] | sp.spmatrix) -> sp.csr_matrix:
        if sp.issparse(query_weights):
            q = sp.csr_matrix(query_weights, dtype=self.dtype)
            if q.shape[1] != self.vocab_size:
                raise ValueError(
                    f"query matrix has {q.shape[1]} columns, the index vocab is {self.vocab_size}"
                )
            return q
        return lexical_matrix(query_weights, self.vocab_size, "query_weights", self.dtype)

    def _topk(self, q: sp.csr_matrix, k: int, chunk_size: int | None):
        """Per query the ``k`` best rows with a positive score: (query index, row, score) pairs."""
        n_docs = len(self)
        k = min(k, n_docs)
        if k == 0:
            return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, self.dtype)
        chunk = chunk_size or max(1, _BLOCK_CELLS // max(n_docs, 1))
        parts = []
        for s in range(0, q.shape[0], chunk):
            block = (q[s : s + chunk] @ self._transposed).toarray()
            top = (
                np.argpartition(-block, k - 1, axis=1)[:, :k]
                if k < n_docs
                else np.tile(np.arange(n_docs), (len(block), 1))
            )
            sc = np.take_along_axis(block, top, axis=1)
            qi = np.repeat(np.arange(s, s + len(block)), k)
            keep = sc.ravel() > 0
            parts.append((qi[keep], top.ravel()[keep], sc.ravel()[keep]))
        if not parts:
            return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, self.dtype)
        return tuple(np.concatenate(p) for p in zip(*parts, strict=True))

    def search(
        self,
        query_weights: Sequence[LexicalRow] | sp.spmatrix,
        query_ids: Sequence[str],
        top_k: int,
        ignore_identical_ids: bool = False,
        chunk_size: int | None = None,
    ) -> Results:
        """Top-k documents per query by lexical matching score, in query chunks of ``chunk_size``.

        The default chunk keeps each dense query x corpus score block under ~128 MiB.
        """
        top_k = _check_top_k(top_k)
        qids = _ids(query_ids, "query_ids")
        q = self.query_matrix(query_weights)
        if q.shape[0] != len(qids):
            raise ValueError(f"query_ids has {len(qids)} ids but query_weights has {q.shape[0]} rows")
        qi, rows, score = self._topk(q, top_k + int(ignore_identical_ids), chunk_size)
        keep = _rank_pairs(qi, rows, score, qids, self.doc_ids, top_k, ignore_identical_ids)
        return _to_results(keep, qi, rows, {"score": score.astype(np.float64)}, qids, self.doc_ids)["score"]

    def pair_scores(self, q: sp.csr_matrix, qi: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Exact score of query row ``qi[j]`` (of ``q``) with document row ``rows[j]``."""
        out = np.empty(len(qi), dtype=np.float64)
        for s in range(0, len(qi), _PAIR_CHUNK):
            a, b = q[qi[s : s + _PAIR_CHUNK]], self.matrix[rows[s : s + _PAIR_CHUNK]]
            out[s : s + _PAIR_CHUNK] = np.asarray(a.multiply(b).sum(axis=1)).ravel()
        return out

    def score(self, query_weights_i: LexicalRow, doc_rows: Sequence[int]) -> np.ndarray:
        """Scores of one query against the given document rows (candidates)."""
        q = self.query_matrix([query_weights_i])
        rows = np.asarray(doc_rows, dtype=np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"doc_rows must lie in [0, {len(self)}), got {rows.min()}..{rows.max()}")
        return np.asarray((self.matrix[rows] @ q.T).toarray(), dtype=np.float64).ravel()


# -- hybrid ------------------------------------------------------------------------------------------
def hybrid_search(
    query_ids: Sequence[str],
    doc_ids: Sequence[str],
    top_k: int,
    query_emb: np.ndarray | None = None,
    index_or_corpus_emb=None,
    query_weights: Sequence[LexicalRow] | None = None,
    sparse_index: SparseIndex | None = None,
    weights: Mapping[str, float] | Sequence[float] = (1.0, 1.0),
    candidate_k: int | None = None,
    normalize_weights: bool = False,
    ignore_identical_ids: bool = False,
    chunk_size: int = 4096,
) -> FusedResults:
    """Weighted dense + sparse retrieval: ``final = sum_m w_m * score_m`` over the candidate union.

    Candidates are the union of each mode's top ``candidate_k`` (default ``top_k``); every candidate
    is then scored exactly in every mode (a document the other mode did not retrieve still gets its
    true score there, 0 for no shared token). ``weights`` is ``{"dense": w, "sparse": w}`` or
    ``[w_dense, w_sparse]``; ``normalize_weights`` divides by their sum (M3's ``compute_score``
    "sparse+dense"; the ranking is the same). Returns the fused run and each mode's scores of the
    same documents. Pass the corpus embeddings array (or a faiss index that can reconstruct vectors).
    """
    top_k = _check_top_k(top_k)
    depth = _check_top_k(candidate_k, "candidate_k") if candidate_k is not None else top_k
    depth += int(ignore_identical_ids)
    qids, dids = _ids(query_ids, "query_ids"), _ids(doc_ids, "doc_ids")
    modes = []
    if query_emb is not None or index_or_corpus_emb is not None:
        if query_emb is None or index_or_corpus_emb is None:
            raise ValueError("dense mode needs both query_emb and index_or_corpus_emb")
        modes.append("dense")
    if query_weights is not None or sparse_index is not None:
        if query_weights is None or sparse_index is None:
            raise ValueError("sparse mode needs both query_weights and sparse_index")
        if len(sparse_index) != len(dids) or not np.array_equal(sparse_index.doc_ids, dids):
            raise ValueError("sparse_index.doc_ids must equal doc_ids (same documents, same order)")
        modes.append("sparse")
    if not modes:
        raise ValueError(
            "hybrid_search needs at least one mode: query_emb + index_or_corpus_emb, or query_weights + sparse_index"
        )
    w = _mode_weights(weights, modes)

    cand_q, cand_r = [], []
    if "dense" in modes:
        _, (qi, rows, _) = _dense_topk(query_emb, qids, index_or_corpus_emb, dids, depth, chunk_size)
        cand_q.append(qi)
        cand_r.append(rows)
    if "sparse" in modes:
        q_sparse = sparse_index.query_matrix(query_weights)
        if q_sparse.shape[0] != len(qids):
            raise ValueError(f"query_ids has {len(qids)} ids but query_weights has {q_sparse.shape[0]} rows")
        qi, rows, _ = sparse_index._topk(q_sparse, depth, None)
        cand_q.append(qi)
        cand_r.append(rows)
    key = np.unique(np.concatenate(cand_q).astype(np.int64) * len(dids) + np.concatenate(cand_r))
    qi, rows = key // max(len(dids), 1), key % max(len(dids), 1)

    columns: dict[str, np.ndarray] = {}
    if "dense" in modes:
        columns["dense"] = dense_pair_scores(
            _query_matrix(query_emb, len(qids)), index_or_corpus_emb, qi, rows
        )
    if "sparse" in modes:
        columns["sparse"] = sparse_index.pair_scores(q_sparse, qi, rows)
    fused = _fuse(columns, w, normalize_weights)
    keep = _rank_pairs(qi, rows, fused, qids, dids, top_k, ignore_identical_ids)
    runs = _to_results(keep, qi, rows, {"fused": fused, **columns}, qids, dids)
    return FusedResults(runs.pop("fused"), runs)


def _fuse(columns: Mapping[str, np.ndarray], w: Mapping[str, float], normalize: bool) -> np.ndarray:
    total = sum(w[m] * columns[m] for m in columns)
    return total / sum(w[m] for m in columns) if normalize else total


# -- ColBERT -----------------------------------------------------------------------------------------
def colbert_scores(query_vecs: np.ndarray, doc_vecs: Sequence[np.ndarray]) -> np.ndarray:
    """FlagEmbedding's ``colbert_score`` of one query against several documents.

    Mean over query tokens of the best inner product with any document token; an empty side gives 0.
    Documents are padded into one [n_docs, max_len, dim] block and masked.
    """
    q = np.asarray(query_vecs, dtype=np.float32)
    out = np.zeros(len(doc_vecs), dtype=np.float64)
    lengths = np.array([len(d) for d in doc_vecs], dtype=np.int64)
    if q.shape[0] == 0 or not len(doc_vecs) or lengths.max() == 0:
        return out
    block = np.zeros((len(doc_vecs), int(lengths.max()), q.shape[1]), dtype=np.float32)
    for i, d in enumerate(doc_vecs):
        if len(d):
            if d.shape[-1] != q.shape[1]:
                raise ValueError(f"document {i} has ColBERT dim {d.shape[-1]}, the query has {q.shape[1]}")
            block[i, : len(d)] = d
    sim = block @ q.T  # [n_docs, max_len, n_query_tokens]
    sim[np.arange(block.shape[1])[None, :] >= lengths[:, None]] = -np.inf  # padding never wins
    best = sim.max(axis=1).astype(np.float64)
    nonempty = lengths > 0
    out[nonempty] = best[nonempty].sum(axis=1) / q.shape[0]
    return out


def colbert_rescore(
    query_colbert_vecs: Mapping[str, np.ndarray] | Sequence[np.ndarray],
    doc_colbert_lookup: Mapping[str, np.ndarray] | Callable[[str], np.ndarray],
    candidates: Results,
    query_ids: Sequence[str] | None = None,
    mode_scores: Mapping[str, Results] | None = None,
    weights: Mapping[str, float] | Sequence[float] = (1.0, 1.0, 1.0),
    normalize_weights: bool = False,
    top_k: int | None = None,
) -> FusedResults:
    """Re-score each query's candidates with ColBERT (MaxSim), optionally fused with other modes.

    ``query_colbert_vecs``: per query id, or a list aligned with ``query_ids``. ``doc_colbert_lookup``:
    doc id -> [n_tok, dim] array (a dict or a callable, e.g. a reader of stored vectors). With
    ``mode_scores`` (e.g. ``hybrid_search(...).mode_scores``) the final score is
    ``sum_m w_m * score_m`` over dense / sparse / colbert with ``weights`` ``[w_dense, w_sparse,
    w_colbert]`` as in M3's ``compute_score`` (``normalize_weights`` divides by their sum, giving its
    "colbert+sparse+dense"). Results are sorted best first, cut to ``top_k`` when given.
    """
    if not isinstance(query_colbert_vecs, Mapping):
        if query_ids is None:
            raise ValueError("query_colbert_vecs is a list: pass query_ids aligned with it")
        if len(query_ids) != len(query_colbert_vecs):
            raise ValueError(
                f"query_ids has {len(query_ids)} ids but query_colbert_vecs has {len(query_colbert_vecs)}"
            )
        query_colbert_vecs = dict(zip(map(str, query_ids), query_colbert_vecs, strict=True))
    lookup = doc_colbert_lookup if callable(doc_colbert_lookup) else doc_colbert_lookup.__getitem__
    other = dict(mode_scores or {})
    unknown = set(other) - {"dense", "sparse"}
    if unknown:
        raise ValueError(f"mode_scores has unknown modes {sorted(unknown)}; expected dense / sparse")
    modes = [*other, "colbert"]
    w = _mode_weights(weights, modes)
    limit = _check_top_k(top_k) if top_k is not None else None

    fused_run: Results = {}
    per_mode: dict[str, Results] = {m: {} for m in modes}
    for qid, docs in candidates.items():
        if qid not in query_colbert_vecs:
            raise KeyError(f"query {qid!r} of candidates has no entry in query_colbert_vecs")
        doc_list = list(docs)
        vecs = []
        for d in doc_list:
            try:
                vecs.append(np.asarray(lookup(d)))
            except KeyError:
                raise KeyError(
                    f"document {d!r} (candidate of query {qid!r}) is missing from doc_colbert_lookup"
                ) from None
        columns = {"colbert": colbert_scores(query_colbert_vecs[qid], vecs)}
        for m, run in other.items():
            got = run.get(qid, {})
            missing = [d for d in doc_list if d not in got]
            if missing:
                raise KeyError(f"mode_scores[{m!r}][{qid!r}] lacks candidates {missing[:5]}")
            columns[m] = np.array([got[d] for d in doc_list], dtype=np.float64)
        fused = _fuse(columns, w, normalize_weights)
        order = np.argsort(-fused, kind="stable")[:limit]
        fused_run[qid] = {doc_list[i]: float(fused[i]) for i in order}
        for m, col in columns.items():
            per_mode[m][qid] = {doc_list[i]: float(col[i]) for i in order}
    return FusedResults(fused_run, {m: per_mode[m] for m in ("dense", "sparse", "colbert") if m in per_mode})


# -- rerank ------------------------------------------------------------------------------------------
def rerank(
    reranker,
    queries: Mapping[str, str],
    corpus_text: Callable[[str], str] | Mapping[str, str],
    results: Results,
    top_k: int = 100,
    batch_size: int | None = None,
    ignore_identical_ids: bool = False,
    keep_tail: bool = True,
    **score_kwargs: Any,
) -> Results:
    """Re-score each query's ``top_k`` documents with ``reranker.compute_score(pairs)``.

    All pairs go to the reranker in one call (it batches them). Reranked documents carry the
    reranker's own scores. FlagEmbedding's ``EvalReranker`` drops everything below ``top_k``
    (``keep_tail=False`` does the same); by default we keep that tail in its original order below
    the reranked documents with rank-based scores ``min(reranked) - step * (1 + i)``, so metrics
    at cutoffs <= ``top_k`` match FlagEmbedding and deeper cutoffs still see the first-stage run.
    """
    top_k = _check_top_k(top_k)
    text = corpus_text if callable(corpus_text) else corpus_text.__getitem__
    heads: dict[str, list[str]] = {}
    tails: dict[str, list[str]] = {}
    pairs: list[tuple[str, str]] = []
    for qid, docs in results.items():
        if qid not in queries:
            raise KeyError(f"query {qid!r} of results is missing from queries")
        ranked = [d for d, _ in sorted(docs.items(), key=lambda x: x[1], reverse=True)]
        if ignore_identical_ids:
            ranked = [d for d in ranked if d != qid]
        heads[qid], tails[qid] = ranked[:top_k], ranked[top_k:]
        for d in heads[qid]:
            try:
                pairs.append((queries[qid], text(d)))
            except KeyError:
                raise KeyError(
                    f"document {d!r} (result of query {qid!r}) is missing from corpus_text"
                ) from None
    kwargs = dict(score_kwargs)
    if batch_size is not None:
        kwargs["batch_size"] = batch_size
    scores = reranker.compute_score(pairs, **kwargs) if pairs else []
    scores = np.atleast_1d(np.asarray(scores, dtype=np.float64))
    if len(scores) != len(pairs):
        raise ValueError(f"reranker returned {len(scores)} scores for {len(pairs)} pairs")

    out: Results = {}
    pos = 0
    for qid, head in heads.items():
        s = scores[pos : pos + len(head)]
        pos += len(head)
        order = np.argsort(-s, kind="stable")
        run = {head[i]: float(s[i]) for i in order}
        if keep_tail and tails[qid]:
            low = float(s.min()) if len(s) else 0.0
            step = max(1.0, 4 * float(np.spacing(abs(low))))
            for i, d in enumerate(tails[qid]):
                run[d] = low - step * (i + 1)
        out[qid] = run
    return out
