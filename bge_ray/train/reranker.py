"""Cross-encoder reranker training (FlagEmbedding's reranker encoder_only.base): each query with one
positive and ``train_group_size - 1`` negatives scored as pairs, a softmax cross-entropy over the
group (positive first), plus an optional distillation term from teacher scores.

Pairs are built as FlagEmbedding builds them: query ids cut to ``query_max_len + passage_max_len // 4``,
passage ids to ``passage_max_len + query_max_len // 2``, then the pair (with special tokens) cut to
``query_max_len + passage_max_len`` from the passage side. The saved folder loads into
:class:`bge_ray.models.FlagReranker`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .arguments import GroupDataArgs, ModelArgs, TrainArgs
from .data import GroupOptions, build_groups
from .losses import LossOutput, kl_div_loss, mean_across_ranks


@dataclass
class RerankerDataArgs(GroupDataArgs):
    """FlagEmbedding's reranker DataArgs (encoder-only and LLM)."""

    query_instruction_for_rerank: str | None = None
    passage_instruction_for_rerank: str | None = None
    sep_token: str = field(default="\n", metadata={"help": "LLM rerankers: separator between query, passage "
                                                           "and prompt"})
    max_len: int = field(default=512, metadata={"help": "accepted for FlagEmbedding compatibility; pairs are cut "
                                                        "to query_max_len + passage_max_len as it does"})

    def __post_init__(self):
        super().__post_init__()
        self.sep_token = self.sep_token.replace("\\n", "\n")


def group_loss(logits: torch.Tensor, group_size: int, teacher_scores: torch.Tensor | None = None) -> torch.Tensor:
    """FlagEmbedding's reranker loss: cross-entropy with the positive (column 0) as the target over
    each query's group of logits, plus ``-mean(sum(log_softmax(logits) * softmax(teacher)))``."""
    grouped = logits.view(-1, group_size).float()
    loss = F.cross_entropy(grouped, torch.zeros(grouped.size(0), dtype=torch.long, device=grouped.device))
    if teacher_scores is not None:
        loss = loss + kl_div_loss(torch.softmax(teacher_scores.detach().float(), dim=-1), grouped)
    return loss


class PairBuilder:
    """Token ids of (query, passage) pairs with FlagEmbedding's truncation, padded into a batch."""

    def __init__(self, tokenizer, query_max_len: int, passage_max_len: int, pad_to_multiple_of: int | None = None):
        from bge_ray.models.reranker import Template

        self.tok = tokenizer
        self.template = Template.of(tokenizer, pair=True)
        self.query_max_len, self.passage_max_len = query_max_len, passage_max_len
        self.pad_to_multiple_of = pad_to_multiple_of

    def _ids(self, texts: list[str], max_length: int) -> list[list[int]]:
        return self.tok(texts, add_special_tokens=False, truncation=True, max_length=max_length,
                        return_attention_mask=False, return_token_type_ids=False)["input_ids"]

    def __call__(self, queries: list[str], passages: list[str], device) -> dict:
        from bge_ray.models.reranker import fit_pair

        qml, pml = self.query_max_len, self.passage_max_len
        q_ids = self._ids(queries, qml + pml // 4)
        p_ids = self._ids(passages, pml + qml // 2)
        budget = qml + pml - self.template.num_special
        left = self.tok.truncation_side == "left"
        rows = [self.template.build(*fit_pair(q, p, budget, left)[:2]) for q, p in zip(q_ids, p_ids, strict=True)]
        width = max(len(ids) for ids, _ in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        types = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        right = self.tok.padding_side != "left"
        for i, (row, row_types) in enumerate(rows):
            span = slice(0, len(row)) if right else slice(width - len(row), width)
            ids[i, span] = torch.tensor(row)
            types[i, span] = torch.tensor(row_types)
            mask[i, span] = 1
        out = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self.tok.model_input_names:
            out["token_type_ids"] = types
        return {k: v.to(device) for k, v in out.items()}


@dataclass
class RerankerTask:
    """Fine-tuning a cross-encoder (``*ForSequenceClassification`` with one label)."""

    model: ModelArgs
    data: RerankerDataArgs
    train: TrainArgs

    def group_options(self) -> GroupOptions:
        d = self.data
        return GroupOptions(d.train_group_size, d.query_instruction_for_rerank, d.query_instruction_format,
                            d.passage_instruction_for_rerank, d.passage_instruction_format,
                            d.knowledge_distillation, d.shuffle_ratio, self.train.seed,
                            query_prompt_field="query_prompt", passage_prompt_field="passage_prompt")

    def build(self):
        import transformers

        from .embedder import load_backbone

        model, tokenizer = load_backbone(self.model, auto_class=transformers.AutoModelForSequenceClassification,
                                         num_labels=1)
        self.tokenizer = tokenizer
        self.pairs = PairBuilder(tokenizer, self.data.query_max_len, self.data.passage_max_len,
                                 self.data.pad_to_multiple_of)
        return model, tokenizer

    def step(self, model, rows, batch, device) -> LossOutput:
        queries, passages, teacher = build_groups(rows, batch, self.group_options())
        group = len(passages) // len(queries)
        features = self.pairs([q for q in queries for _ in range(group)], passages, device)
        logits = model(**features, return_dict=True).logits.view(-1)
        t = None if teacher is None else torch.tensor(teacher, dtype=torch.float32, device=device)
        loss = group_loss(logits, group, t)
        return LossOutput(loss, mean_across_ranks(loss))

    def save(self, model, tokenizer, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)

    def load(self, model, folder: str) -> None:
        from .embedder import load_backbone_weights

        load_backbone_weights(model, folder)
