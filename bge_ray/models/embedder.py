"""Dense embedders with FlagEmbedding 1.4's API: ``FlagModel`` (encoder) and ``FlagLLMModel`` (decoder)."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .base import InferenceModel, as_list, format_instruction
from .encode import scatter_rows
from .pooling import check_pooling, pool
from .tokenize import Features, check_texts, tokenize

logger = logging.getLogger(__name__)

# Tokenizer options FlagEmbedding forwards from encode(**kwargs); the rest are ours or errors.
_COLLATE_KWARGS = ("pad_to_multiple_of",)


class BaseEmbedder(InferenceModel):
    """Shared encode / encode_queries / encode_corpus for dense embedders."""

    DEFAULT_POOLING_METHOD = "cls"
    DEFAULT_QUERY_INSTRUCTION_FORMAT = "{}{}"

    def __init__(
        self,
        model_name_or_path: str | None = None,
        normalize_embeddings: bool = True,
        use_fp16: bool = True,
        use_bf16: bool = False,
        query_instruction_for_retrieval: str | None = None,
        query_instruction_format: str | None = None,
        devices: str | int | list | None = None,
        pooling_method: str | None = None,
        trust_remote_code: bool = False,
        cache_dir: str | None = None,
        batch_size: int = 256,
        query_max_length: int = 512,
        passage_max_length: int = 512,
        convert_to_numpy: bool = True,
        truncate_dim: int | None = None,
        passage_instruction_for_retrieval: str | None = None,
        passage_instruction_format: str = "{}{}",
        max_tokens_per_batch: int | None = None,
        **kwargs: Any,
    ):
        self.normalize_embeddings = normalize_embeddings
        self.query_instruction_for_retrieval = query_instruction_for_retrieval
        self.query_instruction_format = query_instruction_format or self.DEFAULT_QUERY_INSTRUCTION_FORMAT
        self.passage_instruction_for_retrieval = passage_instruction_for_retrieval
        self.passage_instruction_format = passage_instruction_format
        self.pooling_method = check_pooling(pooling_method or self.DEFAULT_POOLING_METHOD)
        self.query_max_length = query_max_length
        self.passage_max_length = passage_max_length
        self.convert_to_numpy = convert_to_numpy
        if truncate_dim is not None and truncate_dim < 1:
            raise ValueError(f"truncate_dim must be a positive int, got {truncate_dim}")
        self.truncate_dim = truncate_dim
        load_kwargs = {k: kwargs.pop(k) for k in ("revision", "load_weights") if k in kwargs}
        if kwargs:
            logger.warning("%s ignores unknown arguments: %s", type(self).__name__, sorted(kwargs))
        self.kwargs = kwargs
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

    # -- public API -----------------------------------------------------------------------------
    def encode_queries(self, queries, batch_size=None, max_length=None, convert_to_numpy=None, **kwargs):
        """Encode queries, applying ``query_instruction_for_retrieval`` through its format."""
        return self.encode(
            queries,
            batch_size=batch_size,
            max_length=max_length or self.query_max_length,
            convert_to_numpy=convert_to_numpy,
            instruction=self.query_instruction_for_retrieval,
            instruction_format=self.query_instruction_format,
            **kwargs,
        )

    def encode_corpus(self, corpus, batch_size=None, max_length=None, convert_to_numpy=None, **kwargs):
        """Encode passages (``passage_instruction_for_retrieval`` applied when set)."""
        return self.encode(
            corpus,
            batch_size=batch_size,
            max_length=max_length or self.passage_max_length,
            convert_to_numpy=convert_to_numpy,
            instruction=self.passage_instruction_for_retrieval,
            instruction_format=self.passage_instruction_format,
            **kwargs,
        )

    def encode(
        self,
        sentences,
        batch_size: int | None = None,
        max_length: int | None = None,
        convert_to_numpy: bool | None = None,
        instruction: str | None = None,
        instruction_format: str | None = None,
        **kwargs: Any,
    ) -> np.ndarray | torch.Tensor:
        """Embed ``sentences``: [n, dim] for a list, [dim] for a single string."""
        texts, single = as_list(sentences)
        check_texts(texts)
        if instruction is not None:
            fmt = instruction_format or "{}{}"
            texts = [format_instruction(fmt, instruction, t) for t in texts]
        emb = self._embed(
            texts,
            batch_size=batch_size or self.batch_size,
            max_length=max_length or self.passage_max_length,
            **kwargs,
        )
        if convert_to_numpy if convert_to_numpy is not None else self.convert_to_numpy:
            emb = emb.numpy()
        return emb[0] if single else emb

    @property
    def dim(self) -> int:
        """Width of the output vectors."""
        hidden = self.model.config.hidden_size
        return min(hidden, self.truncate_dim) if self.truncate_dim else hidden

    # -- pre-tokenised passages (batch jobs tokenise on CPU workers, the model runs elsewhere) ----
    def corpus_features(self, corpus: list[str], max_length: int | None = None) -> Features:
        """The token ids ``encode_corpus`` would feed the model (passage instruction applied); needs
        only the tokenizer, so it runs on an instance loaded with ``load_weights=False``."""
        check_texts(corpus)
        if self.passage_instruction_for_retrieval is not None:
            fmt = self.passage_instruction_format or "{}{}"
            corpus = [format_instruction(fmt, self.passage_instruction_for_retrieval, t) for t in corpus]
        return self._prepare(list(corpus), max_length or self.passage_max_length)

    def encode_features(self, features: Features, outputs: tuple[str, ...] = ("dense",),
                        batch_size: int | None = None) -> dict[str, Any]:
        """Run the model on :meth:`corpus_features`: ``{"dense": float32 [n, dim]}`` (M3 adds
        ``sparse`` and ``colbert``); sets ``last_token_counts`` as ``encode`` does."""
        unknown = set(outputs) - {"dense"}
        if unknown:
            raise ValueError(f"{type(self).__name__} has a dense output only, not {sorted(unknown)} (BGE-M3 has all three)")
        self.last_token_counts = features.lengths
        return {"dense": self._embed_features(features, batch_size or self.batch_size).numpy()}

    # -- internals ------------------------------------------------------------------------------
    def _prepare(self, texts: list[str], max_length: int, **kwargs):
        return tokenize(self.tokenizer, texts, max_length, **kwargs)

    def _embed_features(self, features: Features, batch_size: int, **collate_kw) -> torch.Tensor:
        if len(features) == 0:
            return torch.empty((0, self.dim), dtype=torch.float32)
        results = self._run(features, self._dense_forward, batch_size, padding_side=self.tokenizer.padding_side,
                            desc="Inference Embeddings", **collate_kw)
        return scatter_rows(results, len(features))

    def _dense_forward(self, model, device):
        def forward(batch):
            hidden = model(**batch, return_dict=True).last_hidden_state
            emb = pool(hidden, batch["attention_mask"], self.pooling_method)
            if self.truncate_dim:
                emb = emb[:, : self.truncate_dim]
            if self.normalize_embeddings:
                emb = F.normalize(emb.float(), dim=-1)
            return emb

        return forward

    def _embed(self, texts: list[str], batch_size: int, max_length: int, **kwargs) -> torch.Tensor:
        collate_kw = {k: kwargs.pop(k) for k in _COLLATE_KWARGS if k in kwargs}
        if not texts:
            self.last_token_counts = np.zeros(0, dtype=np.int64)
            return torch.empty((0, self.dim), dtype=torch.float32)

        results, lengths = self._run_items(
            texts,
            lambda chunk: self._prepare(chunk, max_length, **kwargs),
            self._dense_forward,
            batch_size,
            padding_side=self.tokenizer.padding_side,
            desc="Inference Embeddings",
            **collate_kw,
        )
        # Token counts of the last call, for throughput reporting by batch jobs.
        self.last_token_counts = lengths
        return scatter_rows(results, len(texts))


class FlagModel(BaseEmbedder):
    """Encoder-only embedder (BGE v1/v1.5, E5, GTE, ...): cls or mean pooling."""

    DEFAULT_POOLING_METHOD = "cls"


class FlagLLMModel(BaseEmbedder):
    """Decoder-only embedder (bge-multilingual-gemma2, e5-mistral, Qwen3-Embedding): last-token pooling."""

    DEFAULT_POOLING_METHOD = "last_token"
    DEFAULT_QUERY_INSTRUCTION_FORMAT = "Instruct: {}\nQuery: {}"

    def __init__(self, model_name_or_path: str | None = None, *args, **kwargs):
        if kwargs.get("pooling_method", "last_token") != "last_token":
            raise ValueError("pooling_method must be 'last_token' for decoder-only (LLM) embedders")
        super().__init__(model_name_or_path, *args, **kwargs)
