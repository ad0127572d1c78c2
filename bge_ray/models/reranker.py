"""Rerankers with FlagEmbedding 1.4's API. ``BaseReranker`` holds what every family shares;
``FlagReranker`` is the cross-encoder (bge-reranker-base / large / v2-m3)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import transformers

from .base import InferenceModel, format_instruction
from .encode import scatter_rows
from .tokenize import Features, check_texts

logger = logging.getLogger(__name__)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def as_pairs(sentence_pairs) -> tuple[list[tuple[str, str]], bool]:
    """Accept one ``(query, passage)`` pair or a list of them; validate every element."""
    if sentence_pairs is None:
        raise TypeError("sentence_pairs is None, expected a (query, passage) pair or a list of them")
    single = len(sentence_pairs) == 2 and all(isinstance(x, str) for x in sentence_pairs)
    pairs = [tuple(sentence_pairs)] if single else list(sentence_pairs)
    for i, p in enumerate(pairs):
        if isinstance(p, str) or not isinstance(p, Sequence) or len(p) != 2:
            raise TypeError(f"sentence_pairs[{i}] is {p!r:.60}, expected a (query, passage) pair of strings")
        check_texts(p, what=f"sentence_pairs[{i}]")
    return [(p[0], p[1]) for p in pairs], single


class BaseReranker(InferenceModel):
    """Shared constructor and ``compute_score`` contract; subclasses implement :meth:`_score`."""

    def __init__(
        self,
        model_name_or_path: str,
        use_fp16: bool = False,
        use_bf16: bool = False,
        query_instruction_for_rerank: str | None = None,
        query_instruction_format: str = "{}{}",
        passage_instruction_for_rerank: str | None = None,
        passage_instruction_format: str = "{}{}",
        trust_remote_code: bool = False,
        cache_dir: str | None = None,
        devices: str | int | list | None = None,
        batch_size: int = 128,
        query_max_length: int | None = None,
        max_length: int = 512,
        normalize: bool = False,
        max_tokens_per_batch: int | None = None,
        **kwargs: Any,
    ):
        self.query_instruction_for_rerank = query_instruction_for_rerank
        self.query_instruction_format = query_instruction_format
        self.passage_instruction_for_rerank = passage_instruction_for_rerank
        self.passage_instruction_format = passage_instruction_format
        self.query_max_length = query_max_length
        self.max_length = max_length
        self.normalize = normalize
        load_kwargs = {k: kwargs.pop(k) for k in ("revision",) if k in kwargs}
        self.kwargs = kwargs
        self._init_family(kwargs)
        if self.kwargs:
            logger.warning("%s ignores unknown arguments: %s", type(self).__name__, sorted(self.kwargs))
        super().__init__(
            model_name_or_path,
            use_fp16=use_fp16,
            use_bf16=use_bf16,
            devices=devices,
            trust_remote_code=trust_remote_code,
            cache_dir=cache_dir,
            batch_size=batch_size,
            max_tokens_per_batch=max_tokens_per_batch,
            **load_kwargs,
        )

    def _init_family(self, kwargs: dict) -> None:
        """Pop family-specific constructor arguments from ``kwargs`` before loading."""

    def _with_instructions(self, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        q_ins, p_ins = self.query_instruction_for_rerank, self.passage_instruction_for_rerank
        if q_ins is None and p_ins is None:
            return pairs
        return [
            (
                format_instruction(self.query_instruction_format, q_ins, q) if q_ins is not None else q,
                format_instruction(self.passage_instruction_format, p_ins, p) if p_ins is not None else p,
            )
            for q, p in pairs
        ]

    def compute_score(
        self,
        sentence_pairs,
        batch_size: int | None = None,
        query_max_length: int | None = None,
        max_length: int | None = None,
        normalize: bool | None = None,
        **kwargs: Any,
    ):
        """Score ``(query, passage)`` pairs: a list of floats (sigmoid-squashed when ``normalize``)."""
        pairs, single = as_pairs(sentence_pairs)
        if not pairs:
            return []
        pairs = self._with_instructions(pairs)
        max_length = max_length or self.max_length
        query_max_length = query_max_length or self.query_max_length or max_length * 3 // 4
        scores = self._score(pairs, batch_size or self.batch_size, query_max_length, max_length, **kwargs)
        if normalize if normalize is not None else self.normalize:
            scores = sigmoid(scores)
        out = scores.tolist()
        return out[0] if single else out

    def _score(self, pairs, batch_size, query_max_length, max_length, **kwargs) -> np.ndarray:
        raise NotImplementedError


class FlagReranker(BaseReranker):
    """Cross-encoder reranker: ``[CLS] query [SEP] passage [SEP]`` -> one logit."""

    auto_class = transformers.AutoModelForSequenceClassification

    def _pair_features(self, pairs, query_max_length: int, max_length: int) -> Features:
        tok = self.tokenizer
        q_ids = tok([q for q, _ in pairs], add_special_tokens=False, truncation=True, max_length=query_max_length)[
            "input_ids"
        ]
        p_ids = tok([p for _, p in pairs], add_special_tokens=False, truncation=True, max_length=max_length)[
            "input_ids"
        ]
        columns: dict[str, list[list[int]]] = {}
        for q, p in zip(q_ids, p_ids, strict=True):
            item = tok.prepare_for_model(q, p, truncation="only_second", max_length=max_length, padding=False)
            for key, value in item.items():
                columns.setdefault(key, []).append(value)
        return Features.from_columns(columns)

    def _score(self, pairs, batch_size, query_max_length, max_length, **kwargs) -> np.ndarray:
        features = self._pair_features(pairs, query_max_length, max_length)

        def make_forward(model, device):
            def forward(batch):
                return model(**batch, return_dict=True).logits.view(-1).float()

            return forward

        results = self._run(features, make_forward, batch_size, padding_side=self.tokenizer.padding_side,
                            desc="Compute Scores")
        return scatter_rows(results, len(features)).numpy().astype(np.float64)


# torch is imported for subclasses that build heads; keep the name referenced for linters.
_ = torch
