"""BGE-M3 with FlagEmbedding 1.4's ``BGEM3FlagModel`` API: dense, lexical (sparse) and ColBERT outputs.

One forward pass over the XLM-R backbone feeds three heads:

- dense: the pooled hidden state (``cls`` by default), L2-normalised;
- lexical weights: ``relu(sparse_linear(h))`` per token, the max kept per distinct token id, special
  tokens (cls / eos / pad / unk) and zero weights dropped;
- ColBERT: ``colbert_linear(h[:, 1:])`` per token after the first, padding removed, L2-normalised.

Per-token post-processing runs as tensor operations on the whole batch; Python only builds the
output dicts FlagEmbedding's API promises.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .base import as_list, format_instruction
from .embedder import BaseEmbedder
from .encode import scatter_items, scatter_rows
from .loading import load_hf_model, load_linear_head
from .pooling import pool
from .tokenize import Features, check_texts, tokenize

logger = logging.getLogger(__name__)

COLBERT_HEAD = "colbert_linear.pt"
SPARSE_HEAD = "sparse_linear.pt"
SCORE_KEYS = ("colbert", "sparse", "dense", "sparse+dense", "colbert+sparse+dense")
_COLLATE_KWARGS = ("pad_to_multiple_of",)

SparseRow = tuple[np.ndarray, np.ndarray]  # (token ids int64, weights float32), first-occurrence order


class M3Module(torch.nn.Module):
    """The backbone plus both heads, so replicas move and cast as one module."""

    def __init__(
        self, backbone: torch.nn.Module, colbert_linear: torch.nn.Linear, sparse_linear: torch.nn.Linear
    ):
        super().__init__()
        self.backbone = backbone
        self.colbert_linear = colbert_linear
        self.sparse_linear = sparse_linear

    @property
    def config(self):
        return self.backbone.config

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        return self.backbone(**batch, return_dict=True).last_hidden_state


def lexical_rows(input_ids: torch.Tensor, weights: torch.Tensor, keep: torch.Tensor) -> list[SparseRow]:
    """Per row, the distinct token ids where ``keep`` holds and each id's largest weight.

    Ids come out in order of first occurrence (FlagEmbedding's dict order). Vectorised: one
    ``unique`` over ``row * vocab + id`` keys and two scatter reductions for the whole batch.
    """
    n_rows, width = input_ids.shape
    rows, pos = keep.nonzero(as_tuple=True)
    tok = input_ids[rows, pos]
    w = weights[rows, pos].float()
    span = int(input_ids.max()) + 1 if input_ids.numel() else 1
    keys, inverse = torch.unique(rows * span + tok, return_inverse=True)
    best = torch.zeros(len(keys), dtype=w.dtype, device=w.device).scatter_reduce(0, inverse, w, "amax")
    first = torch.full((len(keys),), width, dtype=pos.dtype, device=pos.device).scatter_reduce(
        0, inverse, pos, "amin"
    )
    key_rows = keys // span
    order = torch.argsort(key_rows * width + first)
    key_rows = key_rows[order].cpu()
    ids = (keys[order] % span).cpu().numpy()
    best = best[order].cpu().numpy()
    counts = torch.bincount(key_rows, minlength=n_rows).numpy()
    bounds = np.cumsum(counts)[:-1]
    return list(zip(np.split(ids, bounds), np.split(best, bounds), strict=True))


def sparse_dot(a: SparseRow, b: SparseRow) -> float:
    """Inner product of two lexical rows over their shared token ids."""
    _, ia, ib = np.intersect1d(a[0], b[0], assume_unique=True, return_indices=True)
    return float(np.dot(a[1][ia].astype(np.float64), b[1][ib]))


def maxsim(q: np.ndarray | torch.Tensor, p: np.ndarray | torch.Tensor) -> torch.Tensor:
    """ColBERT late interaction: mean over query vectors of their best inner product with the passage."""
    q, p = torch.as_tensor(q), torch.as_tensor(p)
    if q.shape[0] == 0 or p.shape[0] == 0:
        return torch.zeros((), dtype=q.dtype)
    return (q @ p.T).max(dim=-1).values.sum() / q.shape[0]


class BGEM3FlagModel(BaseEmbedder):
    """BGE-M3 embedder: ``encode`` returns ``{'dense_vecs', 'lexical_weights', 'colbert_vecs'}``.

    Needs ``colbert_linear.pt`` and ``sparse_linear.pt`` beside the backbone (bge-m3's layout) and
    refuses to start without them, where FlagEmbedding would silently use random heads.
    """

    DEFAULT_POOLING_METHOD = "cls"

    def __init__(
        self,
        model_name_or_path: str | None = None,
        normalize_embeddings: bool = True,
        use_fp16: bool = True,
        use_bf16: bool = False,
        query_instruction_for_retrieval: str | None = None,
        query_instruction_format: str = "{}{}",
        devices: str | int | list | None = None,
        pooling_method: str = "cls",
        trust_remote_code: bool = False,
        cache_dir: str | None = None,
        colbert_dim: int = -1,
        batch_size: int = 256,
        query_max_length: int = 512,
        passage_max_length: int = 512,
        return_dense: bool = True,
        return_sparse: bool = False,
        return_colbert_vecs: bool = False,
        truncate_dim: int | None = None,
        **kwargs: Any,
    ):
        # Read by _load_model, which the base constructor calls.
        self._colbert_dim_arg = colbert_dim
        self.return_dense = return_dense
        self.return_sparse = return_sparse
        self.return_colbert_vecs = return_colbert_vecs
        super().__init__(
            model_name_or_path,
            normalize_embeddings=normalize_embeddings,
            use_fp16=use_fp16,
            use_bf16=use_bf16,
            query_instruction_for_retrieval=query_instruction_for_retrieval,
            query_instruction_format=query_instruction_format,
            devices=devices,
            pooling_method=pooling_method,
            trust_remote_code=trust_remote_code,
            cache_dir=cache_dir,
            batch_size=batch_size,
            query_max_length=query_max_length,
            passage_max_length=passage_max_length,
            truncate_dim=truncate_dim,
            **kwargs,
        )
        tok = self.tokenizer
        self.special_token_ids = sorted(
            {
                i
                for i in (tok.cls_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id)
                if i is not None
            }
        )

    # -- loading --------------------------------------------------------------------------------
    def _load_model(self, **kwargs) -> M3Module:
        heads = {name: os.path.join(self.model_path, name) for name in (COLBERT_HEAD, SPARSE_HEAD)}
        missing = [name for name, path in heads.items() if not os.path.isfile(path)]
        if missing:
            raise FileNotFoundError(
                f"BGE-M3 checkpoint {self.model_path} lacks {' and '.join(missing)}: BGEM3FlagModel needs both "
                f"{COLBERT_HEAD} and {SPARSE_HEAD} beside the model weights (FlagEmbedding would silently use "
                f"random heads). Copy them from the original bge-m3 checkpoint, or use FlagModel for dense only."
            )
        backbone = load_hf_model(
            self.model_path, dtype=self.dtype, trust_remote_code=self.trust_remote_code, **kwargs
        )
        hidden = backbone.config.hidden_size
        colbert_out = self._colbert_dim_arg if self._colbert_dim_arg and self._colbert_dim_arg > 0 else None
        colbert = load_linear_head(heads[COLBERT_HEAD], hidden, colbert_out)
        sparse = load_linear_head(heads[SPARSE_HEAD], hidden, 1)
        return M3Module(backbone, colbert, sparse).to(self.dtype).eval()

    # -- sizes ----------------------------------------------------------------------------------
    @property
    def colbert_dim(self) -> int:
        """Width of each ColBERT token vector (after ``truncate_dim``, as ``encode`` returns them)."""
        out = self.model.colbert_linear.out_features
        return min(out, self.truncate_dim) if self.truncate_dim else out

    @property
    def vocab_size(self) -> int:
        """Upper bound (exclusive) of the token ids used as lexical-weight keys."""
        return self.model.config.vocab_size

    # -- public API -----------------------------------------------------------------------------
    def encode_queries(
        self,
        queries: str | Sequence[str],
        batch_size: int | None = None,
        max_length: int | None = None,
        return_dense: bool | None = None,
        return_sparse: bool | None = None,
        return_colbert_vecs: bool | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Encode queries with ``query_instruction_for_retrieval`` applied (``query_max_length``)."""
        return self.encode(
            queries,
            batch_size=batch_size,
            max_length=max_length or self.query_max_length,
            return_dense=return_dense,
            return_sparse=return_sparse,
            return_colbert_vecs=return_colbert_vecs,
            instruction=self.query_instruction_for_retrieval,
            instruction_format=self.query_instruction_format,
            **kwargs,
        )

    def encode_corpus(
        self,
        corpus: str | Sequence[str],
        batch_size: int | None = None,
        max_length: int | None = None,
        return_dense: bool | None = None,
        return_sparse: bool | None = None,
        return_colbert_vecs: bool | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Encode passages (``passage_instruction_for_retrieval`` applied when set, ``passage_max_length``)."""
        return self.encode(
            corpus,
            batch_size=batch_size,
            max_length=max_length or self.passage_max_length,
            return_dense=return_dense,
            return_sparse=return_sparse,
            return_colbert_vecs=return_colbert_vecs,
            instruction=self.passage_instruction_for_retrieval,
            instruction_format=self.passage_instruction_format,
            **kwargs,
        )

    def encode(
        self,
        sentences: str | Sequence[str],
        batch_size: int | None = None,
        max_length: int | None = None,
        return_dense: bool | None = None,
        return_sparse: bool | None = None,
        return_colbert_vecs: bool | None = None,
        instruction: str | None = None,
        instruction_format: str | None = None,
        convert_to_numpy: bool | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Encode ``sentences`` into FlagEmbedding's M3 dict.

        ``dense_vecs``: array [n, dim]; ``lexical_weights``: per text ``{str(token_id): weight}``;
        ``colbert_vecs``: per text an array [n_tokens - 1, colbert_dim]. Modes not asked for are
        ``None``; a single string gives unbatched entries. Dense vectors are always numpy, as in
        FlagEmbedding (``convert_to_numpy`` is accepted and ignored).
        """
        del convert_to_numpy
        texts, single = as_list(sentences)
        check_texts(texts)
        if instruction is not None:
            fmt = instruction_format or "{}{}"
            texts = [format_instruction(fmt, instruction, t) for t in texts]
        raw = self.encode_raw(
            texts,
            batch_size=batch_size,
            max_length=max_length or self.passage_max_length,
            return_dense=self.return_dense if return_dense is None else return_dense,
            return_sparse=self.return_sparse if return_sparse is None else return_sparse,
            return_colbert_vecs=self.return_colbert_vecs
            if return_colbert_vecs is None
            else return_colbert_vecs,
            **kwargs,
        )
        dense = raw["dense_vecs"].numpy() if raw["dense_vecs"] is not None else None
        lexical = None
        if raw["sparse"] is not None:
            lexical = [dict(zip(map(str, ids.tolist()), w.tolist(), strict=True)) for ids, w in raw["sparse"]]
        colbert = raw["colbert_vecs"]
        if single:
            dense = dense[0] if dense is not None else None
            lexical = lexical[0] if lexical is not None else None
            colbert = colbert[0] if colbert is not None else None
        return {"dense_vecs": dense, "lexical_weights": lexical, "colbert_vecs": colbert}

    def encode_raw(
        self,
        texts: list[str],
        batch_size: int | None = None,
        max_length: int | None = None,
        return_dense: bool = True,
        return_sparse: bool = True,
        return_colbert_vecs: bool = True,
        truncate: bool = True,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Array form of :meth:`encode` for batch jobs: no instructions, no dicts.

        Returns ``dense_vecs`` (float32 tensor [n, dim]), ``sparse`` (per text ``(ids int64,
        weights float32)`` arrays) and ``colbert_vecs`` (per text float32 arrays); ``None`` for
        modes not asked. ``truncate=False`` ignores ``truncate_dim`` (as ``compute_score`` does).
        """
        if not (return_dense or return_sparse or return_colbert_vecs):
            raise ValueError("choose at least one of return_dense, return_sparse, return_colbert_vecs")
        check_texts(texts)
        batch_size = batch_size or self.batch_size
        max_length = max_length or self.passage_max_length
        collate_kw = {k: kwargs.pop(k) for k in _COLLATE_KWARGS if k in kwargs}
        features = tokenize(self.tokenizer, texts, max_length, **kwargs)
        return self._encode_raw_features(features, batch_size, return_dense, return_sparse, return_colbert_vecs,
                                         truncate, collate_kw)

    def encode_features(self, features: Features, outputs: tuple[str, ...] = ("dense",),
                        batch_size: int | None = None) -> dict[str, Any]:
        """Run the model on :meth:`corpus_features`: ``dense`` (float32 [n, dim]), ``sparse`` (per row
        ``(ids, weights)``) and ``colbert`` (per row float32 [n_tokens - 1, colbert_dim]), as asked."""
        unknown = set(outputs) - {"dense", "sparse", "colbert"}
        if unknown or not outputs:
            raise ValueError(f"outputs must be a non-empty subset of dense, sparse, colbert, got {list(outputs)}")
        raw = self._encode_raw_features(features, batch_size or self.batch_size, "dense" in outputs,
                                        "sparse" in outputs, "colbert" in outputs, True, {})
        out = {"dense": raw["dense_vecs"].numpy() if raw["dense_vecs"] is not None else None,
               "sparse": raw["sparse"], "colbert": raw["colbert_vecs"]}
        return {k: v for k, v in out.items() if k in outputs}

    def _encode_raw_features(self, features: Features, batch_size: int, return_dense: bool, return_sparse: bool,
                             return_colbert_vecs: bool, truncate: bool, collate_kw: dict) -> dict[str, Any]:
        # Token counts of the last call, for throughput reporting by batch jobs (as BaseEmbedder).
        self.last_token_counts = features.lengths
        cut = self.truncate_dim if truncate else None
        if len(features) == 0:
            width = min(self.model.config.hidden_size, cut) if cut else self.model.config.hidden_size
            return {
                "dense_vecs": torch.empty((0, width)) if return_dense else None,
                "sparse": [] if return_sparse else None,
                "colbert_vecs": [] if return_colbert_vecs else None,
            }

        def make_forward(model: M3Module, device: str):
            special = torch.tensor(self.special_token_ids, dtype=torch.long, device=device)

            def forward(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
                mask = batch["attention_mask"]
                hidden = model(**batch)
                out: dict[str, Any] = {}
                if return_dense:
                    dense = pool(hidden, mask, self.pooling_method)
                    if cut:
                        dense = dense[:, :cut]
                    out["dense"] = (
                        F.normalize(dense.float(), dim=-1) if self.normalize_embeddings else dense.float()
                    )
                if return_sparse:
                    ids = batch["input_ids"]
                    weights = torch.relu(model.sparse_linear(hidden)).squeeze(-1)
                    keep = mask.bool() & (weights > 0) & ~torch.isin(ids, special)
                    out["sparse"] = lexical_rows(ids, weights, keep)
                if return_colbert_vecs:
                    # Token 0 (cls) is left out; padding is zeroed before normalising, as in training.
                    vecs = model.colbert_linear(hidden[:, 1:]) * mask[:, 1:, None].to(hidden.dtype)
                    if cut:
                        vecs = vecs[..., :cut]
                    vecs = F.normalize(vecs.float(), dim=-1) if self.normalize_embeddings else vecs.float()
                    vecs = vecs.cpu().numpy()
                    counts = (mask.sum(dim=1) - 1).tolist()
                    out["colbert"] = [vecs[i, :n] for i, n in enumerate(counts)]
                return out

            return forward

        # Right padding always: the cls token must sit at position 0 for pooling and ColBERT.
        results = self._run(
            features,
            make_forward,
            batch_size,
            padding_side="right",
            desc="Inference Embeddings",
            **collate_kw,
        )
        n = len(features)
        return {
            "dense_vecs": scatter_rows([(r, o["dense"]) for r, o in results], n) if return_dense else None,
            "sparse": scatter_items([(r, o["sparse"]) for r, o in results], n) if return_sparse else None,
            "colbert_vecs": scatter_items([(r, o["colbert"]) for r, o in results], n)
            if return_colbert_vecs
            else None,
        }

    def convert_id_to_token(self, lexical_weights: dict | list[dict]) -> dict | list[dict]:
        """Re-key lexical weights by decoded token text instead of token id.

        A dict gives a dict and a list a list (FlagEmbedding also turns a one-element list into a dict).
        """
        if isinstance(lexical_weights, dict):
            return self._ids_to_tokens(lexical_weights, "lexical_weights")
        if not isinstance(lexical_weights, (list, tuple)):
            raise TypeError(
                f"lexical_weights is {type(lexical_weights).__name__}, expected a dict or a list of dicts"
            )
        return [self._ids_to_tokens(lw, f"lexical_weights[{i}]") for i, lw in enumerate(lexical_weights)]

    def _ids_to_tokens(self, weights: dict, what: str) -> dict:
        if not isinstance(weights, dict):
            raise TypeError(f"{what} is {type(weights).__name__}, expected a dict {{token_id: weight}}")
        try:
            ids = [[int(k)] for k in weights]
        except ValueError as exc:
            raise ValueError(f"{what} has a key that is not a token id: {exc}") from exc
        tokens = self.tokenizer.batch_decode(ids)
        return dict(zip(tokens, weights.values(), strict=True))

    def compute_lexical_matching_score(
        self,
        lexical_weights_1: dict[str, float] | list[dict[str, float]],
        lexical_weights_2: dict[str, float] | list[dict[str, float]],
    ) -> float | np.ndarray:
        """Sum of weight products over shared tokens; two lists give the [len1, len2] matrix."""
        if isinstance(lexical_weights_1, dict) and isinstance(lexical_weights_2, dict):
            return _lexical_dot(lexical_weights_1, lexical_weights_2)
        if isinstance(lexical_weights_1, list) and isinstance(lexical_weights_2, list):
            return np.array([[_lexical_dot(a, b) for b in lexical_weights_2] for a in lexical_weights_1])
        raise ValueError(
            "compute_lexical_matching_score takes two dicts or two lists of dicts, got "
            f"{type(lexical_weights_1).__name__} and {type(lexical_weights_2).__name__}"
        )

    def colbert_score(
        self, q_reps: np.ndarray | torch.Tensor, p_reps: np.ndarray | torch.Tensor
    ) -> torch.Tensor:
        """ColBERT score of one query's token vectors [m, d] against one passage's [n, d] (a 0-d tensor)."""
        return maxsim(q_reps, p_reps)

    def compute_score(
        self,
        sentence_pairs: Sequence[tuple[str, str]] | tuple[str, str],
        batch_size: int | None = None,
        max_query_length: int | None = None,
        max_passage_length: int | None = None,
        weights_for_different_modes: Sequence[float] | None = None,
        **kwargs: Any,
    ) -> dict[str, list[float] | float]:
        """Score (query, passage) pairs in every mode.

        Keys: ``dense``, ``sparse``, ``colbert``, ``sparse+dense`` (weighted mean of the two) and
        ``colbert+sparse+dense`` (weighted mean of all three); weights are ``[w_dense, w_sparse,
        w_colbert]``, default all 1. One pair gives floats, a list of pairs lists.
        """
        pairs, single = _as_pairs(sentence_pairs)
        if weights_for_different_modes is None:
            weights = (1.0, 1.0, 1.0)
        else:
            weights = tuple(float(w) for w in weights_for_different_modes)
            if len(weights) != 3:
                raise ValueError(
                    "weights_for_different_modes must be [w_dense, w_sparse, w_colbert], got "
                    f"{list(weights_for_different_modes)}"
                )
        if not pairs:
            return {k: [] for k in SCORE_KEYS}
        # Each distinct text is encoded once: reranking lists repeat the query on every pair.
        queries = list(dict.fromkeys(q for q, _ in pairs))
        passages = list(dict.fromkeys(p for _, p in pairs))
        enc_q = self.encode_raw(
            queries, batch_size, max_query_length or self.query_max_length, truncate=False, **kwargs
        )
        enc_p = self.encode_raw(
            passages, batch_size, max_passage_length or self.passage_max_length, truncate=False, **kwargs
        )
        q_index = {t: i for i, t in enumerate(queries)}
        p_index = {t: i for i, t in enumerate(passages)}
        qi = [q_index[q] for q, _ in pairs]
        pi = [p_index[p] for _, p in pairs]

        dense = (enc_q["dense_vecs"][qi] * enc_p["dense_vecs"][pi]).sum(dim=-1).numpy().astype(np.float64)
        sparse = np.array(
            [sparse_dot(enc_q["sparse"][a], enc_p["sparse"][b]) for a, b in zip(qi, pi, strict=True)]
        )
        colbert = np.array(
            [
                float(maxsim(enc_q["colbert_vecs"][a], enc_p["colbert_vecs"][b]))
                for a, b in zip(qi, pi, strict=True)
            ]
        )
        w_dense, w_sparse, w_colbert = weights
        scores = {
            "colbert": colbert,
            "sparse": sparse,
            "dense": dense,
            "sparse+dense": (sparse * w_sparse + dense * w_dense) / (w_sparse + w_dense),
            "colbert+sparse+dense": (colbert * w_colbert + sparse * w_sparse + dense * w_dense)
            / sum(weights),
        }
        if single:
            return {k: float(v[0]) for k, v in scores.items()}
        return {k: v.tolist() for k, v in scores.items()}


def _lexical_dot(a: dict, b: dict) -> float:
    if len(a) > len(b):
        a, b = b, a
    return float(sum(w * b[t] for t, w in a.items() if t in b))


def _as_pairs(sentence_pairs) -> tuple[list[tuple[str, str]], bool]:
    """Accept one (query, passage) pair or a list of them; check every entry."""
    if sentence_pairs is None:
        raise TypeError("sentence_pairs is None, expected a (query, passage) pair or a list of them")
    pairs = list(sentence_pairs)
    single = len(pairs) > 0 and isinstance(pairs[0], str)
    if single:
        pairs = [tuple(pairs)]
    for i, pair in enumerate(pairs):
        if isinstance(pair, str) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise ValueError(f"sentence_pairs[{i}] is {pair!r:.60}, expected a (query, passage) pair")
        for j, text in enumerate(pair):
            if not isinstance(text, str):
                raise TypeError(
                    f"sentence_pairs[{i}][{j}] is {type(text).__name__} ({text!r:.40}), expected str"
                )
    return [tuple(p) for p in pairs], single
