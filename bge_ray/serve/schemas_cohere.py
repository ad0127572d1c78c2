"""Cohere API v2 request bodies: ``POST /v2/embed`` and ``POST /v2/rerank`` (what ``cohere.ClientV2`` sends).

Fields Cohere defines that a text model here cannot honour (``images``, image content) are refused
with a message naming them; ``priority`` and ``relevant_spans`` are accepted and ignored (no spans are
returned, as Cohere does when it finds none).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .schemas import _bad

#: input_type values that embed the texts as search queries (the model's query instruction applied).
QUERY_INPUT_TYPES = frozenset({"search_query"})
#: The rest embed them as documents (``encode_corpus``).
DOCUMENT_INPUT_TYPES = frozenset({"search_document", "classification", "clustering"})
EMBEDDING_TYPES = ("float", "int8", "uint8", "binary", "ubinary", "base64")


def _check_strings(value: Any, field: str, what: str) -> Any:
    if not isinstance(value, list):
        raise _bad(f"{field} is {type(value).__name__}; expected a list of {what}")
    if not value:
        raise _bad(f"{field} is an empty list; send at least one {what.rstrip('s')}")
    for i, text in enumerate(value):
        if not isinstance(text, str):
            raise _bad(f"{field}[{i}] is {type(text).__name__}; expected a string")
        if not text:
            raise _bad(f"{field}[{i}] is an empty string; send at least one character")
    return value


class EmbedRequestV2(BaseModel):
    """``POST /v2/embed``: ``texts`` or ``inputs`` (objects whose ``content`` holds ``{"type": "text",
    "text": ...}`` parts, joined by a newline), ``input_type``, ``embedding_types`` (default float),
    ``truncate`` (END default; START; NONE: an over-long input is an error), ``max_tokens``,
    ``output_dimension`` (Matryoshka models only)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    texts: list[str] | None = None
    inputs: list[dict[str, Any]] | None = None
    images: list[Any] | None = None
    input_type: str | None = None
    embedding_types: list[str] | None = None
    truncate: Literal["NONE", "START", "END"] = "END"
    max_tokens: int | None = Field(None, ge=1)
    output_dimension: int | None = Field(None, gt=0)
    priority: int | None = None

    @field_validator("texts", mode="before")
    @classmethod
    def _check_texts(cls, value: Any) -> Any:
        return None if value is None else _check_strings(value, "texts", "strings")

    @field_validator("inputs", mode="before")
    @classmethod
    def _check_inputs(cls, value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, list) or not value:
            raise _bad("inputs must be a non-empty list of {'content': [{'type': 'text', 'text': ...}]} objects")
        for i, item in enumerate(value):
            content = item.get("content") if isinstance(item, dict) else None
            if not isinstance(content, list) or not content:
                raise _bad(f"inputs[{i}] has no non-empty list 'content'")
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "image_url":
                    raise _bad(f"inputs[{i}].content[{j}] is an image; the models served here embed text only")
                if kind != "text" or not isinstance(part.get("text"), str) or not part["text"]:
                    raise _bad(f"inputs[{i}].content[{j}] is not a {{'type': 'text', 'text': <non-empty string>}} part")
        return value

    @field_validator("images", mode="before")
    @classmethod
    def _no_images(cls, value: Any) -> Any:
        if value:
            raise _bad("images are not supported: the models served here embed text only")
        return None

    @field_validator("input_type")
    @classmethod
    def _check_input_type(cls, value: str | None) -> str | None:
        if value is not None and value not in QUERY_INPUT_TYPES | DOCUMENT_INPUT_TYPES:
            hint = "; image inputs are not supported" if value == "image" else ""
            raise _bad(f"input_type {value!r} is not one of {sorted(QUERY_INPUT_TYPES | DOCUMENT_INPUT_TYPES)}{hint}")
        return value

    @field_validator("embedding_types", mode="before")
    @classmethod
    def _check_types(cls, value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, list) or not value:
            raise _bad(f"embedding_types must be a non-empty list of {list(EMBEDDING_TYPES)}")
        for i, t in enumerate(value):
            if t not in EMBEDDING_TYPES:
                raise _bad(f"embedding_types[{i}] is {t!r}; expected one of {list(EMBEDDING_TYPES)}")
        return list(dict.fromkeys(value))

    @model_validator(mode="after")
    def _one_source(self) -> EmbedRequestV2:
        if (self.texts is None) == (self.inputs is None):
            raise _bad("send exactly one of texts or inputs" + (" (both were given)" if self.texts else ""))
        return self

    @property
    def text_list(self) -> list[str]:
        if self.texts is not None:
            return list(self.texts)
        return ["\n".join(part["text"] for part in item["content"]) for item in self.inputs or []]

    @property
    def is_query(self) -> bool:
        return self.input_type in QUERY_INPUT_TYPES

    @property
    def types(self) -> list[str]:
        return self.embedding_types or ["float"]


class RerankRequestV2(BaseModel):
    """``POST /v2/rerank``: ``query``, ``documents`` (strings), ``top_n``, ``max_tokens_per_doc``
    (documents cut to that many tokens before scoring; Cohere's default 4096)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    query: str
    documents: list[str]
    top_n: int | None = Field(None, ge=1)
    max_tokens_per_doc: int = Field(4096, ge=1)
    priority: int | None = None

    @field_validator("query")
    @classmethod
    def _check_query(cls, value: str) -> str:
        if not value:
            raise _bad("query is an empty string; send at least one character")
        return value

    @field_validator("documents", mode="before")
    @classmethod
    def _check_documents(cls, value: Any) -> Any:
        return _check_strings(value, "documents", "strings")
