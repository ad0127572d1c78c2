"""Request and response bodies: OpenAI embeddings, Cohere / Jina rerank, and the M3 extensions.

Requests ignore unknown fields (clients send vendor extras); every check that can be made without
the model is made here, with a message that names the field.
"""

from __future__ import annotations

import base64
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

#: ``input_type`` values meaning "apply the model's query instruction" (Cohere's, Voyage's and ours).
QUERY_TYPES = frozenset({"query", "search_query"})
DOCUMENT_TYPES = frozenset({"document", "passage", "search_document"})


def _bad(message: str) -> PydanticCustomError:
    return PydanticCustomError("invalid_value", message)


def _is_token_ids(value: Any) -> bool:
    if isinstance(value, list):
        return bool(value) and all(isinstance(x, int) and not isinstance(x, bool) for x in value)
    return False


class EmbeddingRequest(BaseModel):
    """``POST /v1/embeddings`` (OpenAI's schema) plus ``input_type``.

    ``input_type``: ``"query"`` (or ``"search_query"``) embeds the inputs as search queries, with the
    model's query instruction applied by the server (``encode_queries``); ``"document"`` / ``"passage"``
    / ``"search_document"`` or absent embeds them as documents (``encode_corpus``). With the openai
    client: ``client.embeddings.create(..., extra_body={"input_type": "query"})``.
    """

    model_config = ConfigDict(extra="ignore")

    input: str | list[str]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, gt=0)
    input_type: str | None = None
    user: str | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _check_input(cls, value: Any) -> Any:
        if isinstance(value, str):
            if not value:
                raise _bad("input is an empty string; send at least one character")
            return value
        if not isinstance(value, list):
            raise _bad(f"input is {type(value).__name__}; expected a string or a list of strings")
        if not value:
            raise _bad("input is an empty list; send at least one string")
        if _is_token_ids(value) or any(_is_token_ids(x) for x in value):
            raise _bad("token-id arrays are not supported; send the text (a string or a list of strings)")
        for i, text in enumerate(value):
            if not isinstance(text, str):
                raise _bad(f"input[{i}] is {type(text).__name__}; expected a string")
            if not text:
                raise _bad(f"input[{i}] is an empty string; send at least one character")
        return value

    @field_validator("input_type")
    @classmethod
    def _check_input_type(cls, value: str | None) -> str | None:
        if value is not None and value not in QUERY_TYPES | DOCUMENT_TYPES:
            raise _bad(
                f"input_type {value!r} is not one of {sorted(QUERY_TYPES)} (queries) or {sorted(DOCUMENT_TYPES)} (documents)"
            )
        return value

    @property
    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)

    @property
    def is_query(self) -> bool:
        return self.input_type in QUERY_TYPES


class SparseEmbeddingRequest(EmbeddingRequest):
    """``POST /v1/embeddings/sparse``: BGE-M3 lexical weights; ``return_tokens`` adds the token texts."""

    return_tokens: bool = False


class ColbertEmbeddingRequest(EmbeddingRequest):
    """``POST /v1/embeddings/colbert``: BGE-M3 ColBERT vectors, one [tokens, dim] matrix per input."""


class RerankDocument(BaseModel):
    model_config = ConfigDict(extra="ignore")
    text: str


class RerankRequest(BaseModel):
    """``POST /v1/rerank`` (Cohere / Jina schema).

    ``normalize`` (default true) gives ``relevance_score = sigmoid(logit)`` in (0, 1); false gives the
    raw logit. Results are sorted by score, highest first; ``index`` points into ``documents``.
    """

    model_config = ConfigDict(extra="ignore")

    query: str
    documents: list[str | RerankDocument]
    model: str | None = None
    top_n: int | None = Field(None, ge=1)
    return_documents: bool = False
    normalize: bool = True

    @field_validator("query")
    @classmethod
    def _check_query(cls, value: str) -> str:
        if not value:
            raise _bad("query is an empty string; send at least one character")
        return value

    @field_validator("documents", mode="before")
    @classmethod
    def _check_documents(cls, value: Any) -> Any:
        if not isinstance(value, list):
            raise _bad(f"documents is {type(value).__name__}; expected a list of strings or {{'text': ...}} objects")
        if not value:
            raise _bad("documents is an empty list; send at least one document")
        for i, doc in enumerate(value):
            if isinstance(doc, dict):
                doc = doc.get("text")
                if not isinstance(doc, str):
                    raise _bad(f"documents[{i}] has no string field 'text'")
            elif not isinstance(doc, str):
                raise _bad(f"documents[{i}] is {type(doc).__name__}; expected a string or {{'text': ...}}")
        return value

    @property
    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]


# -- responses ---------------------------------------------------------------------------------


class Usage(BaseModel):
    """Token counts as the model saw them (special tokens included, after truncation)."""

    prompt_tokens: int
    total_tokens: int


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: Usage


class SparseData(BaseModel):
    object: Literal["sparse_embedding"] = "sparse_embedding"
    index: int
    indices: list[int]
    values: list[float]
    tokens: list[str] | None = None


class SparseResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[SparseData]
    model: str
    usage: Usage


class ColbertData(BaseModel):
    """``embedding``: rows of floats, or base64 of the row-major little-endian float32 matrix."""

    object: Literal["colbert_embedding"] = "colbert_embedding"
    index: int
    shape: tuple[int, int]
    embedding: list[list[float]] | str


class ColbertResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[ColbertData]
    model: str
    usage: Usage


class RerankResult(BaseModel):
    index: int
    relevance_score: float
    document: RerankDocument | None = None


class RerankResponse(BaseModel):
    id: str
    model: str
    results: list[RerankResult]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "bge_ray"
    kind: str
    capabilities: list[str]
    dimensions: int | None = None
    aliases: list[str] = Field(default_factory=list)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """OpenAI's error body."""

    error: ErrorDetail


def encode_floats(array: np.ndarray, encoding_format: str) -> list | str:
    """Floats as JSON numbers, or (``base64``) the little-endian float32 bytes, as OpenAI sends them."""
    if encoding_format == "base64":
        return base64.b64encode(np.ascontiguousarray(array, dtype="<f4").tobytes()).decode("ascii")
    return np.asarray(array, dtype=np.float32).tolist()
