"""In-context-learning embedder (bge-en-icl): few-shot examples written in front of every query.

Queries become ``prefix + instructed query + suffix`` where the prefix joins the formatted examples
with blank lines. Only the query part is truncated (to ``max_length`` less the room for BOS, the
suffix and EOS), so the examples and the suffix always survive. Passages are encoded exactly as
:class:`~bge_ray.models.embedder.FlagLLMModel` does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .embedder import FlagLLMModel
from .tokenize import TOKENIZE_CHUNK, Features, tokenize


class FlagICLModel(FlagLLMModel):
    """Decoder-only embedder with a few-shot prefix on queries; last-token pooling.

    ``examples_for_task`` is a list of dicts with keys ``instruct`` (defaults to
    ``query_instruction_for_retrieval``), ``query`` and ``response``, each rendered through
    ``examples_instruction_format``.
    """

    DEFAULT_QUERY_INSTRUCTION_FORMAT = "<instruct>{}\n<query>{}"

    def __init__(
        self,
        model_name_or_path: str | None = None,
        normalize_embeddings: bool = True,
        use_fp16: bool = True,
        use_bf16: bool = False,
        query_instruction_for_retrieval: str | None = None,
        query_instruction_format: str = "<instruct>{}\n<query>{}",
        suffix: str = "\n<response>",
        devices: str | int | list | None = None,
        examples_for_task: list[dict] | None = None,
        examples_instruction_format: str = "<instruct>{}\n<query>{}\n<response>{}",
        trust_remote_code: bool = False,
        cache_dir: str | None = None,
        batch_size: int = 256,
        query_max_length: int = 512,
        passage_max_length: int = 512,
        convert_to_numpy: bool = True,
        truncate_dim: int | None = None,
        **kwargs: Any,
    ):
        # Check the examples before the (slow) model load so a bad one fails at once.
        _check_examples(examples_for_task, "examples_for_task")
        self.examples_for_task = examples_for_task
        self.examples_instruction_format = examples_instruction_format.replace("\\n", "\n")
        self.suffix = suffix
        super().__init__(
            model_name_or_path,
            normalize_embeddings=normalize_embeddings,
            use_fp16=use_fp16,
            use_bf16=use_bf16,
            query_instruction_for_retrieval=query_instruction_for_retrieval,
            query_instruction_format=(query_instruction_format or "").replace("\\n", "\n") or None,
            devices=devices,
            trust_remote_code=trust_remote_code,
            cache_dir=cache_dir,
            batch_size=batch_size,
            query_max_length=query_max_length,
            passage_max_length=passage_max_length,
            convert_to_numpy=convert_to_numpy,
            truncate_dim=truncate_dim,
            **kwargs,
        )
        self.set_examples()

    # -- few-shot prefix ------------------------------------------------------------------------
    def set_examples(self, examples_for_task: list[dict] | None = None) -> None:
        """Rebuild the query prefix from ``examples_for_task``, or from the constructor's examples.

        As in FlagEmbedding, the argument is used for the prefix but not stored: a later
        ``set_examples()`` returns to the constructor's examples.
        """
        _check_examples(examples_for_task, "examples_for_task")
        examples = examples_for_task if examples_for_task is not None else self.examples_for_task
        if examples is None:
            self.prefix = ""
            return
        rendered = [
            self.get_detailed_example(
                self.examples_instruction_format,
                ex.get("instruct", self.query_instruction_for_retrieval),
                ex.get("query", ""),
                ex.get("response", ""),
            )
            for ex in examples
        ]
        self.prefix = "\n\n".join(rendered) + "\n\n"

    @staticmethod
    def get_detailed_example(instruction_format: str, instruction: str, query: str, response: str) -> str:
        """One example rendered through ``instruction_format`` (a literal ``\\n`` means newline)."""
        return instruction_format.replace("\\n", "\n").format(instruction, query, response)

    # -- encoding -------------------------------------------------------------------------------
    def encode_queries(self, queries, batch_size=None, max_length=None, convert_to_numpy=None, **kwargs):
        """Encode queries as ``prefix + instruction-formatted query (truncated) + suffix``."""
        return self.encode(
            queries,
            batch_size=batch_size,
            max_length=max_length or self.query_max_length,
            convert_to_numpy=convert_to_numpy,
            instruction=self.query_instruction_for_retrieval,
            instruction_format=self.query_instruction_format,
            _icl_query=True,
            **kwargs,
        )

    def stop_self_query_pool(self) -> None:
        """FlagEmbedding API: queries share the corpus replicas here, so this is :meth:`stop_self_pool`."""
        self.stop_self_pool()

    def _prepare(self, texts: list[str], max_length: int, _icl_query: bool = False, **kwargs) -> Features:
        if not _icl_query:
            return super()._prepare(texts, max_length, **kwargs)
        tok = self.tokenizer

        def n_tokens(text: str) -> int:
            return len(tok(text, add_special_tokens=False)["input_ids"])

        # Room kept for the BOS the template adds and for suffix + EOS after the query.
        query_budget = max_length - n_tokens("<s>") - n_tokens(f"{self.suffix}</s>")
        if query_budget < 1:
            raise ValueError(
                f"max_length={max_length} leaves no room for the query after the suffix {self.suffix!r}; "
                f"use a larger max_length"
            )
        # The prefix and suffix are never cut: the final limit covers them plus the query budget,
        # rounded up to a multiple of 8 with slack (the bound FlagEmbedding uses).
        full_max = (n_tokens(self.prefix) + n_tokens(self.suffix) + max_length + 8) // 8 * 8 + 8
        wrapped: list[str] = []
        for start in range(0, len(texts), TOKENIZE_CHUNK):
            ids = tok(
                list(texts[start : start + TOKENIZE_CHUNK]),
                truncation=True,
                max_length=query_budget,
                add_special_tokens=False,
                **kwargs,
            )["input_ids"]
            # Decode the truncated ids back to text so the query is cut at a token boundary.
            wrapped.extend(self.prefix + q + self.suffix for q in tok.batch_decode(ids))
        return tokenize(tok, wrapped, full_max, **kwargs)


def _check_examples(examples: Any, what: str) -> None:
    if examples is None:
        return
    if isinstance(examples, (str, Mapping)) or not isinstance(examples, Sequence):
        raise TypeError(f"{what} must be a list of dicts with 'instruct' / 'query' / 'response', got {examples!r:.60}")
    for i, ex in enumerate(examples):
        if not isinstance(ex, Mapping):
            raise TypeError(f"{what}[{i}] is {type(ex).__name__} ({ex!r:.40}), expected a dict")
        for key in ("instruct", "query", "response"):
            value = ex.get(key)
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{what}[{i}][{key!r}] is {type(value).__name__}, expected str")
