"""Hugging Face text-embeddings-inference (TEI) request bodies: ``/embed``, ``/embed_sparse``, ``/rerank``.

Field names, types and defaults are TEI's (router/src/http/types.rs): ``truncate`` absent means true
(TEI's ``--auto-truncate`` default), ``truncation_direction`` Right / Left (either case), ``normalize``
true. Beyond TEI: an optional ``model`` picks one of the served models (TEI serves one). Not supported:
token-id inputs and ``prompt_name`` values other than the query / document sides.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from .schemas import _bad

#: ``prompt_name`` values for each side: the model's query instruction, or the document side.
QUERY_PROMPTS = frozenset({"query", "search_query"})
DOCUMENT_PROMPTS = frozenset({"document", "passage", "corpus", "search_document"})


def _empty(message: str) -> PydanticCustomError:
    """An empty batch: TEI's ``Empty`` error (400) rather than ``Validation`` (422)."""
    return PydanticCustomError("empty", message)


def _direction(value: Any) -> Any:
    if isinstance(value, str) and value.lower() in ("left", "right"):
        return value.capitalize()
    return value


class _TeiInputs(BaseModel):
    model_config = ConfigDict(extra="ignore")

    inputs: str | list[str]
    truncate: bool | None = None
    truncation_direction: Literal["Left", "Right"] = "Right"
    prompt_name: str | None = None
    model: str | None = None

    @field_validator("inputs", mode="before")
    @classmethod
    def _check_inputs(cls, value: Any) -> Any:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list):
            raise _bad(f"inputs is {type(value).__name__}; expected a string or a list of strings")
        if not items:
            raise _empty("`inputs` cannot be empty")
        for i, text in enumerate(items):
            if isinstance(text, list) and all(isinstance(x, int) for x in text):
                raise _bad(f"inputs[{i}] is a list of token ids; this server takes text only")
            if not isinstance(text, str):
                raise _bad(f"inputs[{i}] is {type(text).__name__}; expected a string")
            if not text:
                raise _bad(f"inputs[{i}] is an empty string; send at least one character")
        return value

    @field_validator("truncation_direction", mode="before")
    @classmethod
    def _check_direction(cls, value: Any) -> Any:
        return _direction(value)

    @field_validator("prompt_name")
    @classmethod
    def _check_prompt(cls, value: str | None) -> str | None:
        if value is not None and value not in QUERY_PROMPTS | DOCUMENT_PROMPTS:
            raise _bad(
                f"prompt_name {value!r} is not one of {sorted(QUERY_PROMPTS)} (the model's query instruction) "
                f"or {sorted(DOCUMENT_PROMPTS)} (documents)"
            )
        return value

    @property
    def texts(self) -> list[str]:
        return [self.inputs] if isinstance(self.inputs, str) else list(self.inputs)

    @property
    def is_query(self) -> bool:
        return self.prompt_name in QUERY_PROMPTS

    @property
    def truncation(self) -> str:
        """As an EmbedJob's ``truncate``: NONE, or which end is cut."""
        if self.truncate is False:
            return "NONE"
        return "START" if self.truncation_direction == "Left" else "END"


class EmbedRequestTEI(_TeiInputs):
    """``POST /embed``: one vector per input; ``normalize`` false gives the raw pooled vectors."""

    normalize: bool = True
    dimensions: int | None = Field(None, gt=0)


class EmbedSparseRequestTEI(_TeiInputs):
    """``POST /embed_sparse`` (BGE-M3): per input, ``[{index: token id, value: weight}]``."""


class RerankRequestTEI(BaseModel):
    """``POST /rerank``: ``texts`` scored against ``query``, sigmoid scores unless ``raw_scores``.

    ``truncation_direction`` is accepted; a pair is cut as the model cuts it (the query to its share,
    then the text's end)."""

    model_config = ConfigDict(extra="ignore")

    query: str
    texts: list[str]
    truncate: bool | None = None
    truncation_direction: Literal["Left", "Right"] = "Right"
    raw_scores: bool = False
    return_text: bool = False
    model: str | None = None

    @field_validator("truncation_direction", mode="before")
    @classmethod
    def _check_direction(cls, value: Any) -> Any:
        return _direction(value)

    @field_validator("query")
    @classmethod
    def _check_query(cls, value: str) -> str:
        if not value:
            raise _bad("query is an empty string; send at least one character")
        return value

    @field_validator("texts", mode="before")
    @classmethod
    def _check_texts(cls, value: Any) -> Any:
        if not isinstance(value, list):
            raise _bad(f"texts is {type(value).__name__}; expected a list of strings")
        if not value:
            raise _empty("`texts` cannot be empty")
        for i, text in enumerate(value):
            if not isinstance(text, str):
                raise _bad(f"texts[{i}] is {type(text).__name__}; expected a string")
            if not text:
                raise _bad(f"texts[{i}] is an empty string; send at least one character")
        return value
