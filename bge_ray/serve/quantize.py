"""Scalar (int8 / uint8) and binary (binary / ubinary) embeddings, as Cohere's ``embedding_types`` name them.

The arithmetic is sentence-transformers' ``quantize_embeddings`` (the format its users index with):

- ``uint8``: per dimension, the range ``[lo, hi]`` is cut into 255 steps; a value becomes
  ``clip(floor((x - lo) / step), 0, 255)``; ``int8`` is that minus 128.
- ``binary`` / ``ubinary``: one bit per dimension (``x > 0``), packed 8 to a byte (big-endian bit order,
  the last byte zero-padded); ``ubinary`` is the byte as 0..255, ``binary`` the byte minus 128.

Calibration (the ranges) is where a server must choose. Without a calibration set, sentence-transformers
takes each dimension's min and max over the batch it is given, so a vector's int8 code would depend on
which other texts shared its request (and a single text could not be quantized at all): codes from two
requests could not be compared. The server therefore uses a **fixed range of [-1, 1] in every dimension
for normalized embeddings** (:func:`unit_ranges`): every coordinate of a unit vector lies in it, so
nothing is clipped and a text gets the same code in any request. Only for a model served with
``normalize_embeddings: false`` (unbounded coordinates) does it fall back to sentence-transformers'
per-request ranges, which need at least two inputs.
"""

from __future__ import annotations

import numpy as np

PRECISIONS = ("int8", "uint8", "binary", "ubinary")


def unit_ranges(dim: int) -> np.ndarray:
    """The fixed calibration for unit-norm vectors: ``[[-1] * dim, [1] * dim]`` (float32, shape (2, dim))."""
    return np.stack([np.full(dim, -1.0, np.float32), np.full(dim, 1.0, np.float32)])


def batch_ranges(embeddings: np.ndarray) -> np.ndarray:
    """Per-dimension min and max over the rows of ``embeddings`` (sentence-transformers' default)."""
    embeddings = np.asarray(embeddings)
    if embeddings.ndim != 2 or embeddings.shape[0] < 2:
        raise ValueError(
            f"per-batch int8 ranges need at least two embeddings (got shape {embeddings.shape}); "
            "pass fixed ranges instead"
        )
    return np.stack([embeddings.min(axis=0), embeddings.max(axis=0)])


def quantize(embeddings: np.ndarray, precision: str, ranges: np.ndarray | None = None) -> np.ndarray:
    """``embeddings`` (float, [n, dim]) in ``precision``: int8 / uint8 codes [n, dim] (``ranges`` (2, dim):
    per-dimension min and max; default :func:`batch_ranges`), or binary / ubinary bytes [n, ceil(dim / 8)]."""
    x = np.asarray(embeddings)
    if x.dtype.kind != "f":
        raise TypeError(f"embeddings to quantize must be floats, not {x.dtype}")
    if precision in ("int8", "uint8"):
        r = (batch_ranges(x) if ranges is None else np.asarray(ranges)).astype(np.float32, copy=False)
        if r.shape != (2, x.shape[-1]):
            raise ValueError(f"ranges has shape {r.shape}; expected (2, {x.shape[-1]})")
        lo = r[0]
        step = (r[1] - lo) / 255
        step = np.where(step == 0, 1, step)  # a constant dimension: every value in the first bucket
        codes = np.clip(np.floor((x - lo) / step), 0, 255)
        return codes.astype(np.uint8) if precision == "uint8" else (codes - 128).astype(np.int8)
    if precision in ("binary", "ubinary"):
        packed = np.packbits(x > 0, axis=-1)
        return packed if precision == "ubinary" else (packed.astype(np.int16) - 128).astype(np.int8)
    raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")
