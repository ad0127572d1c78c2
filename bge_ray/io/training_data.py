"""FlagEmbedding's training data format: ``{"query", "pos": [..], "neg": [..], "pos_scores",
"neg_scores", "prompt", "type"}`` per jsonl line, read with errors naming file and line, written
atomically. Shared by mining, teacher scoring and the training loops."""

from __future__ import annotations

import json
from collections.abc import Sequence

from .atomic import atomic_path
from .jsonl import json_lines as _json_lines


class TrainingDataError(ValueError):
    """A malformed input line; the message starts with ``file:line:``."""


def _check_str_list(path: str, lineno: int, rec: dict, key: str, non_empty: bool) -> None:
    value = rec[key]
    if isinstance(value, str) or not isinstance(value, list):
        raise TrainingDataError(f"{path}:{lineno}: {key!r} must be a list of strings, got {type(value).__name__}")
    if non_empty and not value:
        raise TrainingDataError(f"{path}:{lineno}: {key!r} is empty; expected at least one passage")
    for j, p in enumerate(value):
        if not isinstance(p, str):
            raise TrainingDataError(
                f"{path}:{lineno}: {key}[{j}] must be a string, got {type(p).__name__} ({json.dumps(p)[:60]})"
            )


def json_lines(path: str):
    """(line number, parsed object) for each non-blank line; errors name file and line."""
    return _json_lines(path, TrainingDataError)


def read_training_jsonl(path: str, with_line_numbers: bool = False) -> list[dict]:
    """FlagEmbedding training lines ``{"query": str, "pos": [str, ...], "neg": [str, ...], ...}``.

    ``query`` and a non-empty ``pos`` are required, ``neg`` is optional; other fields are kept as
    they are. Blank lines are skipped. ``with_line_numbers`` adds ``"__line__"`` to each record.
    """
    records = []
    for lineno, rec in json_lines(path):
        for key in ("query", "pos"):
            if key not in rec:
                raise TrainingDataError(f"{path}:{lineno}: missing {key!r} (fields: {sorted(rec)})")
        if not isinstance(rec["query"], str):
            raise TrainingDataError(f"{path}:{lineno}: 'query' must be a string, got {type(rec['query']).__name__}")
        _check_str_list(path, lineno, rec, "pos", non_empty=True)
        if "neg" in rec:
            _check_str_list(path, lineno, rec, "neg", non_empty=False)
        if with_line_numbers:
            rec["__line__"] = lineno
        records.append(rec)
    if not records:
        raise TrainingDataError(f"{path}: no training lines")
    return records


def read_candidate_pool(path: str) -> list[str]:
    """``{"text": str}`` per line (other fields ignored), as FlagEmbedding's ``--candidate_pool``."""
    texts = []
    for lineno, rec in json_lines(path):
        if "text" not in rec:
            raise TrainingDataError(f"{path}:{lineno}: missing 'text' (fields: {sorted(rec)})")
        if not isinstance(rec["text"], str):
            raise TrainingDataError(f"{path}:{lineno}: 'text' must be a string, got {type(rec['text']).__name__}")
        texts.append(rec["text"])
    if not texts:
        raise TrainingDataError(f"{path}: empty candidate pool")
    return texts


def write_jsonl(path: str, records: Sequence[dict]) -> None:
    """One JSON object per line (UTF-8, not ASCII-escaped), written to a temp name then renamed."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
