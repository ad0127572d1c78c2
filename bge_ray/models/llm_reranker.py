"""Decoder-only rerankers (FlagEmbedding's ``FlagLLMReranker``, e.g. bge-reranker-v2-gemma).

A prompt asks the language model whether passage B answers query A; the relevance score is the
logit of the 'Yes' token at the prompt's last position. The input layout is shared with the
layerwise and lightweight rerankers, which read the score from per-layer heads instead::

    [bos] "A: {query}" "\\n" "B: {passage}" "\\n" "{prompt}"

Queries are cut at ``query_max_length`` and passages at ``max_length`` tokens; the query and
passage together then get ``max_length`` plus the separator and prompt lengths, with only the
passage side trimmed, and the separator and prompt are appended untouched.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import transformers

from .encode import scatter_rows
from .reranker import BaseReranker, as_pairs, sigmoid
from .tokenize import TOKENIZE_CHUNK, Features

logger = logging.getLogger(__name__)

#: The question bge-reranker-v2-gemma and v2-minicpm-layerwise were trained to answer.
DEFAULT_PROMPT = (
    "Given a query A and a passage B, determine whether the passage contains an answer to the query by "
    "providing a prediction of either 'Yes' or 'No'."
)
SEPARATOR = "\n"

#: Token segments in ``segment_ids``: the lightweight reranker compresses only the passage.
SEGMENT_QUERY, SEGMENT_PASSAGE, SEGMENT_PROMPT = 1, 2, 3

# FlagEmbedding's compute_score accepts these to steer its own worker processes; scores do not
# depend on them, so they are accepted and dropped rather than handed to the tokenizer.
_EXECUTION_ARGS = ("use_dataloader", "num_workers", "device")


# -- prompt inputs (shared by the three decoder-only rerankers) ------------------------------------
def token_ids(tokenizer, texts: Sequence[str], max_length: int | None = None, **kwargs: Any) -> list[list[int]]:
    """Token ids of ``texts`` without special tokens, cut at ``max_length`` when given."""
    ids: list[list[int]] = []
    cut = {"truncation": True, "max_length": max_length} if max_length is not None else {}
    for start in range(0, len(texts), TOKENIZE_CHUNK):
        enc = tokenizer(
            list(texts[start : start + TOKENIZE_CHUNK]),
            add_special_tokens=False,
            return_attention_mask=False,
            **cut,
            **kwargs,
        )
        ids.extend(enc["input_ids"])
    return ids


def first_token_id(tokenizer, text: str) -> int:
    """Id of the first token of ``text`` (the 'Yes' whose logit is the score)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"the tokenizer turns {text!r} into no tokens; cannot read its logit")
    return ids[0]


def wants_bos(tokenizer) -> bool:
    """Gemma-style tokenizers get an explicit bos; none is added where it is missing or doubles as padding."""
    bos = tokenizer.bos_token_id
    return bos is not None and bos != tokenizer.pad_token_id


def trim_second(first: list[int], second: list[int], budget: int, cut_left: bool = False) -> list[int]:
    """``second`` cut so that ``first + second`` fits ``budget`` tokens. Only the passage side is
    trimmed; when even all of it would not suffice the pair is left whole, as transformers'
    "only_second" truncation does (the training and inference prompts both follow it)."""
    excess = len(first) + len(second) - budget
    if 0 < excess < len(second):
        return second[excess:] if cut_left else second[:-excess]
    return second


def build_prompt_inputs(
    tokenizer,
    pairs: Sequence[tuple[str, str]],
    query_max_length: int,
    max_length: int,
    prompt: str | None = None,
    add_bos: bool | None = None,
    with_segments: bool = False,
    **tokenizer_kwargs: Any,
) -> Features:
    """Token ids of every ``(query, passage)`` pair in the reranker prompt layout.

    ``add_bos=None`` follows :func:`wants_bos`; ``True`` always prepends bos (the layerwise and
    lightweight checkpoints). ``with_segments`` adds ``segment_ids`` marking the query part
    (bos, query, separator), the passage and the trailing separator plus prompt.
    """
    if max_length is None or max_length < 1:
        raise ValueError(f"max_length must be a positive number of tokens, got {max_length!r}")
    if query_max_length is None or query_max_length < 1:
        raise ValueError(f"query_max_length must be a positive number of tokens, got {query_max_length!r}")
    prompt = DEFAULT_PROMPT if prompt is None else prompt
    if add_bos is None:
        add_bos = wants_bos(tokenizer)
    head: list[int] = []
    if add_bos:
        if tokenizer.bos_token_id is None:
            raise ValueError(
                f"this reranker starts every input with a bos token, but the tokenizer of "
                f"{getattr(tokenizer, 'name_or_path', '?')} defines none"
            )
        head = [tokenizer.bos_token_id]
    sep = token_ids(tokenizer, [SEPARATOR])[0]
    tail = sep + token_ids(tokenizer, [prompt])[0]
    budget = max_length + len(tail)  # room for query + separator + passage
    cut_left = getattr(tokenizer, "truncation_side", "right") == "left"
    queries = token_ids(tokenizer, [q for q, _ in pairs], query_max_length, **tokenizer_kwargs)
    passages = token_ids(tokenizer, [p for _, p in pairs], max_length, **tokenizer_kwargs)
    columns: dict[str, list[list[int]]] = {"input_ids": []}
    if with_segments:
        columns["segment_ids"] = []
    for q, p in zip(queries, passages, strict=True):
        first = head + q
        second = trim_second(first, sep + p, budget, cut_left)
        ids = first + second + tail
        columns["input_ids"].append(ids)
        if with_segments:
            n_query = min(len(first) + len(sep), len(ids) - len(tail))
            n_passage = len(ids) - n_query - len(tail)
            columns["segment_ids"].append(
                [SEGMENT_QUERY] * n_query + [SEGMENT_PASSAGE] * n_passage + [SEGMENT_PROMPT] * len(tail)
            )
    return Features.from_columns(columns)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of each row's last real token in a right-padded batch."""
    return attention_mask.sum(dim=1) - 1


# -- loading helpers shared with the layerwise / lightweight checkpoints ---------------------------
def read_config_dict(path: str) -> dict:
    """``config.json`` of a checkpoint folder as a dict (custom model types need no remote code)."""
    file = os.path.join(path, "config.json")
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{file}: cannot read the model config ({exc})") from exc


def load_strict(model_class, path: str, config, dtype: torch.dtype, **kwargs):
    """``from_pretrained`` that fails on weights missing from the checkpoint instead of initialising them."""
    model, info = model_class.from_pretrained(path, config=config, dtype=dtype, output_loading_info=True, **kwargs)
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise ValueError(
            f"{path}: the checkpoint lacks {len(missing)} weights that {model_class.__name__} needs ({shown}); "
            f"is it the right model for this reranker class?"
        )
    unexpected = sorted(info.get("unexpected_keys") or [])
    if unexpected:
        logger.warning("%s: ignoring %d unused weights (%s ...)", path, len(unexpected), unexpected[0])
    return model.eval()


def merge_peft(model, peft_path: str):
    """Fold a LoRA / PEFT adapter into the weights, as FlagEmbedding's ``peft_path`` does."""
    try:
        from peft import PeftModel
    except ImportError as exc:
        raise ImportError(f"peft_path={peft_path!r} needs the peft package: pip install peft") from exc
    return PeftModel.from_pretrained(model, peft_path).merge_and_unload().eval()


# -- the rerankers ------------------------------------------------------------------------------
class FlagLLMReranker(BaseReranker):
    """Decoder-only reranker with FlagEmbedding 1.4's API: score = 'Yes' logit after the prompt."""

    auto_class = transformers.AutoModelForCausalLM
    #: Prompt used when neither the constructor nor ``compute_score`` gives one.
    default_prompt = DEFAULT_PROMPT
    #: Whether bos is always prepended (layerwise / lightweight) or only where the tokenizer wants it.
    always_bos = False

    def __init__(
        self,
        model_name_or_path: str,
        peft_path: str | None = None,
        use_fp16: bool = False,
        use_bf16: bool = False,
        query_instruction_for_rerank: str | None = "A: ",
        query_instruction_format: str = "{}{}",
        passage_instruction_for_rerank: str | None = "B: ",
        passage_instruction_format: str = "{}{}",
        cache_dir: str | None = None,
        trust_remote_code: bool = False,
        devices: str | int | list | None = None,
        prompt: str | None = None,
        batch_size: int = 128,
        query_max_length: int | None = None,
        max_length: int = 512,
        normalize: bool = False,
        **kwargs: Any,
    ):
        # Read by _load_model, which the base constructor calls.
        self.peft_path = peft_path
        self.prompt = prompt
        super().__init__(
            model_name_or_path,
            use_fp16=use_fp16,
            use_bf16=use_bf16,
            query_instruction_for_rerank=query_instruction_for_rerank,
            query_instruction_format=query_instruction_format,
            passage_instruction_for_rerank=passage_instruction_for_rerank,
            passage_instruction_format=passage_instruction_format,
            trust_remote_code=trust_remote_code,
            cache_dir=cache_dir,
            devices=devices,
            batch_size=batch_size,
            query_max_length=query_max_length,
            max_length=max_length,
            normalize=normalize,
            **kwargs,
        )
        self.yes_loc = first_token_id(self.tokenizer, "Yes")

    def _load_model(self, **kwargs):
        model = self._load_base_model(**kwargs)
        return merge_peft(model, self.peft_path) if self.peft_path else model

    def _load_base_model(self, **kwargs):
        """The checkpoint's weights before any adapter; the layerwise families build their own class."""
        return super()._load_model(**kwargs)

    # -- scoring ----------------------------------------------------------------------------------
    def compute_score(
        self,
        sentence_pairs,
        batch_size: int | None = None,
        query_max_length: int | None = None,
        max_length: int | None = None,
        prompt: str | None = None,
        normalize: bool | None = None,
        **kwargs: Any,
    ):
        """Scores of ``(query, passage)`` pairs as a list of floats, sigmoid-squashed when ``normalize``.

        As in FlagEmbedding 1.4, one pair also gives a one-element list. Rerankers scoring several
        layers return one list per layer (ascending layer order), or a flat list for one layer.
        Other keyword arguments go to the tokenizer.
        """
        pairs, _ = as_pairs(sentence_pairs)
        if not pairs:
            return []
        pairs = self._with_instructions(pairs)
        if max_length is None:
            max_length = self.max_length
        if query_max_length is None:
            query_max_length = self.query_max_length if self.query_max_length is not None else max_length * 3 // 4
        for name in _EXECUTION_ARGS:
            kwargs.pop(name, None)
        scores = self._score(
            pairs,
            batch_size or self.batch_size,
            query_max_length,
            max_length,
            prompt=prompt,
            **kwargs,
        )
        if self.normalize if normalize is None else normalize:
            scores = sigmoid(scores)
        if scores.ndim == 2 and scores.shape[0] == 1:
            scores = scores[0]
        return scores.tolist()

    def _prompt_features(self, pairs, query_max_length, max_length, prompt, with_segments=False, **tok_kwargs):
        return build_prompt_inputs(
            self.tokenizer,
            pairs,
            query_max_length,
            max_length,
            prompt=next((x for x in (prompt, self.prompt) if x is not None), self.default_prompt),
            add_bos=True if self.always_bos else None,
            with_segments=with_segments,
            **tok_kwargs,
        )

    def _score(self, pairs, batch_size, query_max_length, max_length, prompt=None, **kwargs) -> np.ndarray:
        features = self._prompt_features(pairs, query_max_length, max_length, prompt, **kwargs)
        yes = self.yes_loc

        def make_forward(model, device):
            keeps = "logits_to_keep" in inspect.signature(model.forward).parameters

            def forward(batch):
                mask = batch["attention_mask"]
                last = last_token_index(mask)
                rows = torch.arange(len(last), device=last.device)
                if not keeps:
                    logits = model(input_ids=batch["input_ids"], attention_mask=mask).logits
                    return logits[rows, last, yes].float()
                # Project only the positions some row ends at: a full (batch, length, vocab) logits
                # tensor is gigabytes for Gemma's 256k vocabulary.
                ends = torch.unique(last)
                logits = model(input_ids=batch["input_ids"], attention_mask=mask, logits_to_keep=ends).logits
                return logits[rows, torch.searchsorted(ends, last), yes].float()

            return forward

        # Right padding keeps every real token at its unpadded position, whatever the tokenizer's side.
        results = self._run(features, make_forward, batch_size, padding_side="right", desc="Compute Scores")
        return scatter_rows(results, len(features)).numpy().astype(np.float64)
