"""What a job's actors load: one spec per model kind, shared by every job, the evaluation and the caches.

A spec is plain data (it travels to Ray actors by pickling) and knows how to load its model and how to
identify the model's files (:meth:`EmbedderSpec.model_fingerprint`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

#: EmbedderSpec.extra keys that only change query vectors.
QUERY_OPTIONS = ("query_instruction_for_retrieval", "query_instruction_format", "query_max_length")


@dataclass
class EmbedderSpec:
    """What each actor loads: a model name or folder plus FlagModel-style options."""

    model: str | None = None  # None: the bundled all-MiniLM-L6-v2
    model_class: str | None = None  # FlagAutoModel model_class; None: from the registry / checkpoint
    pooling_method: str | None = None
    normalize_embeddings: bool = True
    use_fp16: bool = True
    max_length: int = 512
    batch_size: int = 256
    max_tokens_per_batch: int | None = None
    passage_instruction: str | None = None
    extra: dict = field(default_factory=dict)

    def model_fingerprint(self) -> str:
        """The model's files as they are now (:func:`bge_ray.models.fingerprint.model_fingerprint`)."""
        from bge_ray.models.fingerprint import model_fingerprint

        return model_fingerprint(self.model, self.extra.get("cache_dir"), self.extra.get("revision"))

    def load(self, devices=None, load_weights: bool = True):
        """The model; ``load_weights=False`` gives its tokenizer side only (for CPU tokenising tasks)."""
        from bge_ray.models.auto import FlagAutoModel

        return FlagAutoModel.from_finetuned(
            self.model,
            model_class=self.model_class,
            pooling_method=self.pooling_method,
            normalize_embeddings=self.normalize_embeddings,
            use_fp16=self.use_fp16,
            devices=devices,
            batch_size=self.batch_size,
            passage_max_length=self.max_length,
            max_tokens_per_batch=self.max_tokens_per_batch,
            passage_instruction_for_retrieval=self.passage_instruction,
            **({} if load_weights else {"load_weights": False}),
            **self.extra,
        )


def without_query_options(spec: EmbedderSpec) -> EmbedderSpec:
    """``spec`` less its query-only options: what corpus vectors (and their cache key) depend on."""
    return replace(spec, extra={k: v for k, v in spec.extra.items() if k not in QUERY_OPTIONS})


@dataclass
class RerankerSpec:
    """What each scoring actor loads: a reranker name or folder plus FlagAutoReranker options."""

    model: str
    model_class: str | None = None  # FlagAutoReranker model_class; None: from the registry / checkpoint
    use_fp16: bool = True
    use_bf16: bool = False
    batch_size: int = 128
    query_max_length: int | None = None
    max_length: int = 512
    normalize: bool = False
    query_instruction_for_rerank: str | None = None
    query_instruction_format: str = "{}{}"
    passage_instruction_for_rerank: str | None = None
    passage_instruction_format: str = "{}{}"
    trust_remote_code: bool | None = None
    # Family options (prompt, cutoff_layers, compress_ratio, compress_layers, cache_dir, ...), only set ones.
    extra: dict = field(default_factory=dict)

    def load(self, devices=None):
        from bge_ray.models.auto import FlagAutoReranker

        return FlagAutoReranker.from_finetuned(
            self.model,
            model_class=self.model_class,
            use_fp16=self.use_fp16,
            use_bf16=self.use_bf16,
            trust_remote_code=self.trust_remote_code,
            devices=devices,
            batch_size=self.batch_size,
            query_max_length=self.query_max_length,
            max_length=self.max_length,
            normalize=self.normalize,
            query_instruction_for_rerank=self.query_instruction_for_rerank,
            query_instruction_format=self.query_instruction_format,
            passage_instruction_for_rerank=self.passage_instruction_for_rerank,
            passage_instruction_format=self.passage_instruction_format,
            **{k: v for k, v in self.extra.items() if v is not None},
        )
