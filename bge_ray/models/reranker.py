"""Rerankers with FlagEmbedding 1.4's API. ``BaseReranker`` holds what every family shares;
``FlagReranker`` is the cross-encoder (bge-reranker-base / large / v2-m3)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import transformers

from .base import InferenceModel, format_instruction
from .encode import scatter_rows
from .tokenize import TOKENIZE_CHUNK, Features, check_texts

logger = logging.getLogger(__name__)

# compute_score options that shape the padded batches (FlagEmbedding hands them to tokenizer.pad).
_COLLATE_KWARGS = ("pad_to_multiple_of",)


def sigmoid(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # exp overflow for very negative logits correctly gives 0
        return 1.0 / (1.0 + np.exp(-x))


def as_pairs(sentence_pairs) -> tuple[list[tuple[str, str]], bool]:
    """Accept one ``(query, passage)`` pair or a list of them; validate every element.

    Returns the pairs and whether a single pair came in. As in FlagEmbedding, a sequence whose
    first item is a string is taken as one pair.
    """
    expected = "expected a (query, passage) pair of strings or a list of them"
    if sentence_pairs is None:
        raise TypeError(f"sentence_pairs is None, {expected}")
    if isinstance(sentence_pairs, str):
        raise TypeError(f"sentence_pairs is a str ({sentence_pairs!r:.60}), {expected}")
    if isinstance(sentence_pairs, np.ndarray):
        sentence_pairs = sentence_pairs.tolist()
    elif not isinstance(sentence_pairs, Sequence):
        try:
            sentence_pairs = list(sentence_pairs)
        except TypeError:
            raise TypeError(f"sentence_pairs is {type(sentence_pairs).__name__}, {expected}") from None
    if len(sentence_pairs) and isinstance(sentence_pairs[0], str):
        if len(sentence_pairs) != 2:
            raise TypeError(f"sentence_pairs holds {len(sentence_pairs)} strings, {expected}")
        check_texts(sentence_pairs, what="sentence_pairs")
        return [(sentence_pairs[0], sentence_pairs[1])], True
    pairs = []
    for i, p in enumerate(sentence_pairs):
        if isinstance(p, np.ndarray):
            p = p.tolist()
        if isinstance(p, str) or not isinstance(p, Sequence) or len(p) != 2:
            raise TypeError(
                f"sentence_pairs[{i}] is {type(p).__name__} ({p!r:.60}), expected a (query, passage) pair of strings"
            )
        check_texts(p, what=f"sentence_pairs[{i}]")
        pairs.append((p[0], p[1]))
    return pairs, False


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
    ) -> list[float]:
        """Score ``(query, passage)`` pairs: one float per pair, sigmoid-squashed when ``normalize``.

        Like FlagEmbedding, a single pair also gets a list (of one score). An empty list gets ``[]``
        (FlagEmbedding raises IndexError). ``query_max_length`` defaults to 3/4 of ``max_length``.
        """
        pairs, _ = as_pairs(sentence_pairs)
        if not pairs:
            return []
        pairs = self._with_instructions(pairs)
        if batch_size is None:
            batch_size = self.batch_size
        if max_length is None:
            max_length = self.max_length
        if query_max_length is None:
            query_max_length = (
                self.query_max_length if self.query_max_length is not None else max_length * 3 // 4
            )
        if normalize is None:
            normalize = self.normalize
        scores = self._score(pairs, batch_size, query_max_length, max_length, **kwargs)
        if normalize:
            scores = sigmoid(scores)
        return scores.tolist()

    def _score(self, pairs, batch_size, query_max_length, max_length, **kwargs) -> np.ndarray:
        raise NotImplementedError


@dataclass(frozen=True)
class Template:
    """Special tokens a tokenizer puts around its segments: ``ids[0] A ids[1]`` or ``ids[0] A ids[1] B ids[2]``.

    Read once from the tokenizer so pair inputs are assembled from id lists without a tokenizer
    call per pair.
    """

    ids: tuple[list[int], ...]  # the special tokens before, between and after the segments
    types: tuple[list[int], ...]  # their token type ids
    segment_types: tuple[int, ...]  # token type id of each segment

    @property
    def num_special(self) -> int:
        return sum(len(part) for part in self.ids)

    def build(self, *segments: list[int]) -> tuple[list[int], list[int]]:
        """``input_ids`` and ``token_type_ids`` of one example."""
        ids, types = list(self.ids[0]), list(self.types[0])
        for segment, seg_type, part, part_types in zip(
            segments, self.segment_types, self.ids[1:], self.types[1:], strict=True
        ):
            ids += segment + part
            types += [seg_type] * len(segment) + part_types
        return ids, types

    @classmethod
    def of(cls, tokenizer, pair: bool = True) -> Template:
        """The pair (or single-sequence) template of ``tokenizer``, found by building a probe."""
        n = 2 if pair else 1
        if callable(getattr(tokenizer, "prepare_for_model", None)):
            # Python tokenizers build inputs from ids; sentinels no vocabulary uses mark the segments.
            probe = [[-1], [-2]][:n]
            ids = tokenizer.build_inputs_with_special_tokens(*probe)
            make_types = getattr(tokenizer, "create_token_type_ids_from_sequences", None)
            types = make_types(*probe) if callable(make_types) else [0] * len(ids)
            segments = [-t - 1 if t < 0 else None for t in ids]
        else:
            enc = tokenizer(*["a", "b"][:n], return_token_type_ids=True)
            ids, types, segments = enc["input_ids"], enc["token_type_ids"], enc.sequence_ids(0)
        positions = [[i for i, s in enumerate(segments) if s == k] for k in range(n)]
        ordered = all(p and p == list(range(p[0], p[-1] + 1)) for p in positions) and all(
            a[-1] < b[0] for a, b in zip(positions, positions[1:], strict=False)
        )
        if not ordered:
            raise ValueError(
                f"{type(tokenizer).__name__} builds {'pairs' if pair else 'texts'} as {ids} (segments {segments}); "
                "expected special tokens around contiguous segments"
            )
        bounds = [0] + [b for p in positions for b in (p[0], p[-1] + 1)] + [len(ids)]
        cuts = [slice(bounds[i], bounds[i + 1]) for i in range(0, len(bounds), 2)]
        return cls(
            ids=tuple(list(ids[c]) for c in cuts),
            types=tuple(list(types[c]) for c in cuts),
            segment_types=tuple(types[p[0]] for p in positions),
        )


def _keep(ids: list[int], n: int, left: bool) -> list[int]:
    return ids[len(ids) - n :] if left else ids[:n]


def fit_pair(
    query: list[int], passage: list[int], budget: int, left: bool = False
) -> tuple[list[int], list[int], bool]:
    """Cut ``query + passage`` to ``budget`` tokens the way ``truncation='only_second'`` does.

    Only the passage is cut. Where it cannot absorb the excess, transformers raises (FlagEmbedding
    crashes); we keep one passage token and cut the query instead, and report that with ``True``.
    """
    excess = len(query) + len(passage) - budget
    if excess <= 0:
        return query, passage, False
    if len(passage) > excess:
        return query, _keep(passage, len(passage) - excess, left), False
    keep_p = min(len(passage), 1)
    return _keep(query, budget - keep_p, left), _keep(passage, keep_p, left), True


class FlagReranker(BaseReranker):
    """Cross-encoder reranker: ``[CLS] query [SEP] passage [SEP]`` -> one logit.

    Inputs are built as FlagEmbedding 1.4.2 builds them (same token ids): the query cut to
    ``query_max_length`` tokens, the passage to what is left of ``max_length``.
    """

    auto_class = transformers.AutoModelForSequenceClassification

    @cached_property
    def pair_template(self) -> Template:
        return Template.of(self.tokenizer, pair=True)

    @cached_property
    def single_template(self) -> Template:
        return Template.of(self.tokenizer, pair=False)

    def _token_ids(self, texts: list[str], max_length: int) -> list[list[int]]:
        return self.tokenizer(
            texts,
            add_special_tokens=False,
            truncation=True,
            max_length=max_length,
            return_attention_mask=False,
            return_token_type_ids=False,
        )["input_ids"]

    def _retokenize(self, ids: list[list[int]], max_length: int | None) -> tuple[list[list[int]], list[bool]]:
        """Decode and tokenise again, as FlagEmbedding 1.4.2 does on transformers 5 (fast tokenizers
        lost ``prepare_for_model``). Ids can change (pieces after <unk>, a trailing lone '▁'), so we
        do the same to give the same scores. Also returns which decoded texts are empty."""
        texts = self.tokenizer.batch_decode(
            ids, skip_special_tokens=False, clean_up_tokenization_spaces=False
        )
        new_ids = self.tokenizer(
            texts,
            add_special_tokens=False,
            truncation=max_length is not None,
            max_length=max_length,
            return_attention_mask=False,
            return_token_type_ids=False,
        )["input_ids"]
        return new_ids, [not t for t in texts]

    def pair_features(self, pairs: list[tuple[str, str]], query_max_length: int, max_length: int) -> Features:
        """Tokenised pairs, as FlagEmbedding builds them: query cut to ``query_max_length``, passage
        to ``max_length``, then the passage cut so the whole pair fits ``max_length``."""
        tok = self.tokenizer
        pair, single = self.pair_template, self.single_template
        if max_length < pair.num_special + 2:
            raise ValueError(
                f"max_length={max_length} leaves no room for a query and a passage token beside the "
                f"{pair.num_special} special tokens of a pair; use max_length >= {pair.num_special + 2}"
            )
        if query_max_length < 1:
            raise ValueError(f"query_max_length must be >= 1, got {query_max_length}")
        left = tok.truncation_side == "left"
        round_trip = not callable(getattr(tok, "prepare_for_model", None))
        with_types = "token_type_ids" in tok.model_input_names
        input_ids: list[list[int]] = []
        type_ids: list[list[int]] = []
        query_cut = 0
        for start in range(0, len(pairs), TOKENIZE_CHUNK):
            chunk = pairs[start : start + TOKENIZE_CHUNK]
            q_ids = self._token_ids([q for q, _ in chunk], query_max_length)
            p_ids = self._token_ids([p for _, p in chunk], max_length)
            no_passage = [False] * len(chunk)
            if round_trip:
                # FlagEmbedding never cuts the re-tokenised query, and the passage only from its far
                # end, so cutting the passage at max_length here changes nothing (and bounds memory).
                q_ids, _ = self._retokenize(q_ids, None)
                p_ids, no_passage = self._retokenize(p_ids, max_length)
            for q, p, alone in zip(q_ids, p_ids, no_passage, strict=True):
                if alone:
                    # An empty passage text makes the tokenizer encode the query as a single sequence.
                    q, _, cut = fit_pair(q, [], max_length - single.num_special, left)
                    ids, types = single.build(q)
                else:
                    q, p, cut = fit_pair(q, p, max_length - pair.num_special, left)
                    ids, types = pair.build(q, p)
                query_cut += cut
                input_ids.append(ids)
                if with_types:
                    type_ids.append(types)
        if query_cut:
            logger.warning(
                "%d pair(s) had a query too long for max_length=%d (query_max_length=%d): the query was cut "
                "to keep one passage token (FlagEmbedding raises a truncation error here)",
                query_cut,
                max_length,
                query_max_length,
            )
        columns = {"input_ids": input_ids}
        if with_types:
            columns["token_type_ids"] = type_ids
        return Features.from_columns(columns)

    def _score(self, pairs, batch_size, query_max_length, max_length, **kwargs) -> np.ndarray:
        collate_kw = {k: kwargs.pop(k) for k in _COLLATE_KWARGS if k in kwargs}
        if kwargs:
            logger.warning(
                "%s.compute_score ignores unknown arguments: %s", type(self).__name__, sorted(kwargs)
            )
        num_labels = getattr(self.model.config, "num_labels", 1)
        if num_labels != 1:
            raise ValueError(
                f"{self.model_name_or_path} has a {num_labels}-label head; a FlagReranker needs one logit per pair"
            )
        features = self.pair_features(pairs, query_max_length, max_length)
        # Token counts of the last call, for throughput reporting by batch jobs.
        self.last_token_counts = features.lengths

        def make_forward(model, device):
            def forward(batch):
                return model(**batch, return_dict=True).logits.view(-1).float()

            return forward

        results = self._run(
            features,
            make_forward,
            batch_size,
            padding_side=self.tokenizer.padding_side,
            desc="Compute Scores",
            **collate_kw,
        )
        return scatter_rows(results, len(features)).numpy().astype(np.float64)
