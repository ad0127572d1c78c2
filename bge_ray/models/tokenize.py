"""Tokenised inputs kept as id lists, padded per batch into tensors.

Tokenising once up front (the Rust tokenizer, whole lists at a time) and padding with numpy avoids
``tokenizer.pad`` and per-example dicts, which cost more than the model itself on a fast GPU.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

logger = logging.getLogger(__name__)

#: Chunk size for tokenizer calls: large enough to amortise the call, small enough to bound memory.
TOKENIZE_CHUNK = 8192


@dataclass
class Features:
    """Per-example token id lists (``input_ids`` plus e.g. ``token_type_ids``) and their lengths."""

    columns: dict[str, list[list[int]]]
    lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.lengths)

    @classmethod
    def from_columns(cls, columns: dict[str, list[list[int]]]) -> Features:
        columns = {k: v for k, v in columns.items() if k != "attention_mask"}
        lengths = np.fromiter((len(x) for x in columns["input_ids"]), dtype=np.int64, count=len(columns["input_ids"]))
        return cls(columns, lengths)


def check_texts(texts: Sequence, what: str = "sentences") -> None:
    """Reject None and non-strings with the offending position, before any work is done."""
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"{what}[{i}] is {type(t).__name__} ({t!r:.40}), expected str")


class _RustPath:
    """Token ids straight from the Rust tokenizer behind a fast HF tokenizer.

    The HF call spends most of its time building Python dicts while holding the GIL, which stalls the
    thread feeding the GPU; ``encode_batch`` releases the GIL and ``Encoding.ids`` is cheap. The path
    is used for a given ``max_length`` only after it reproduced the HF call's ids on a probe.
    """

    PROBE = 32

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.lock = threading.Lock()
        self.backends: dict[int, object | None] = {}

    def backend(self, texts: Sequence[str], max_length: int):
        with self.lock:
            if max_length not in self.backends:
                self.backends[max_length] = self._build(texts, max_length)
            return self.backends[max_length]

    def _build(self, texts: Sequence[str], max_length: int):
        hf = self.tokenizer
        try:
            backend = copy.deepcopy(hf.backend_tokenizer)
            backend.no_padding()
            backend.enable_truncation(max_length, direction=getattr(hf, "truncation_side", "right"))
            probe = list(texts[: self.PROBE]) + ["", " ".join(["word"] * (max_length + 8))]
            want = hf(probe, truncation=True, max_length=max_length, return_attention_mask=False)["input_ids"]
            got = [e.ids for e in backend.encode_batch(probe, add_special_tokens=True)]
        except Exception as exc:  # noqa: BLE001 - any surprise means: keep the HF path
            logger.debug("fast tokenisation path unavailable: %s", exc)
            return None
        return backend if got == want else None


def _rust_path(tokenizer) -> _RustPath | None:
    if not getattr(tokenizer, "is_fast", False):
        return None
    path = tokenizer.__dict__.get("_bge_ray_rust")
    if path is None:
        path = _RustPath(tokenizer)
        tokenizer.__dict__["_bge_ray_rust"] = path
    return path


def tokenize(tokenizer, texts: Sequence[str], max_length: int, **kwargs) -> Features:
    """Tokenise single texts with truncation at ``max_length``; no padding.

    Without extra tokenizer options the Rust fast path is used (see :class:`_RustPath`); single
    sequences need no ``token_type_ids`` (models default them to zeros).
    """
    rust = None if kwargs else _rust_path(tokenizer)
    backend = rust.backend(texts, max_length) if rust is not None and len(texts) else None
    if backend is not None:
        ids = [e.ids for e in backend.encode_batch(list(texts), add_special_tokens=True)]
        return Features.from_columns({"input_ids": ids})
    columns: dict[str, list[list[int]]] = {}
    for start in range(0, len(texts), TOKENIZE_CHUNK):
        enc = tokenizer(
            list(texts[start : start + TOKENIZE_CHUNK]),
            truncation=True,
            max_length=max_length,
            padding=False,
            return_attention_mask=False,
            **kwargs,
        )
        for key, value in enc.items():
            columns.setdefault(key, []).extend(value)
    if not columns:
        columns = {"input_ids": []}
    return Features.from_columns(columns)


def pad_values(tokenizer) -> dict[str, int]:
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return {"input_ids": pad_id, "token_type_ids": getattr(tokenizer, "pad_token_type_id", 0)}


def collate(
    features: Features,
    rows: np.ndarray,
    pad: dict[str, int],
    padding_side: str = "right",
    pad_to_multiple_of: int | None = None,
    pin_memory: bool = False,
) -> dict[str, torch.Tensor]:
    """Pad the selected rows into int64 tensors plus ``attention_mask``."""
    lengths = features.lengths[rows]
    width = int(lengths.max()) if len(rows) else 0
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    mask = np.zeros((len(rows), width), dtype=np.int64)
    out = {}
    left = padding_side == "left"
    for key, column in features.columns.items():
        arr = np.full((len(rows), width), pad.get(key, 0), dtype=np.int64)
        for j, r in enumerate(rows):
            ids = column[r]
            if left:
                arr[j, width - len(ids) :] = ids
            else:
                arr[j, : len(ids)] = ids
        out[key] = arr
    for j, n in enumerate(lengths):
        if left:
            mask[j, width - n :] = 1
        else:
            mask[j, :n] = 1
    out["attention_mask"] = mask
    tensors = {k: torch.from_numpy(v) for k, v in out.items()}
    if pin_memory:
        tensors = {k: v.pin_memory() for k, v in tensors.items()}
    return tensors
