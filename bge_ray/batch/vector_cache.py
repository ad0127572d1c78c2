"""The vector cache: vectors keyed by text hash under a folder named by everything they depend on
(:func:`cache_settings`: the model's files, not only its path, and the settings that change vectors).
Mining reuses it across runs; evaluation keys its corpus folders (embed-job outputs) on the same
settings."""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict

import numpy as np
import pyarrow as pa

from bge_ray.io.atomic import atomic_path, write_json
from bge_ray.io.shards import embedding_array, shard_files, to_numpy
from bge_ray.models.spec import QUERY_OPTIONS, EmbedderSpec

from .stage import QUERY


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def cache_settings(spec: EmbedderSpec, role: str) -> dict:
    """What the vectors of ``role`` depend on: not batch sizes, download options, or the other role's options."""
    settings = {k: v for k, v in asdict(spec).items() if k not in ("batch_size", "max_tokens_per_batch", "extra")}
    extra = {k: v for k, v in spec.extra.items() if v is not None and k not in ("trust_remote_code", "cache_dir")}
    if role == QUERY:
        settings.pop("max_length")
        settings.pop("passage_instruction")
    else:
        extra = {k: v for k, v in extra.items() if k not in QUERY_OPTIONS}
    settings.update(extra=extra, role=role, model_fingerprint=spec.model_fingerprint())
    return settings


class EmbeddingCache:
    """Vectors keyed by text hash, one folder per hash of :func:`cache_settings`.

    Each run that embeds new texts adds one ``part-*.parquet`` (written to a temp name, then renamed),
    so concurrent runs never corrupt each other; ``settings.json`` says what the folder holds.
    """

    def __init__(self, root: str, settings: dict):
        blob = json.dumps(settings, sort_keys=True, default=str)
        self.key = hashlib.sha256(blob.encode()).hexdigest()[:20]
        self.dir = os.path.join(root, self.key)
        self.settings = settings
        self._index: dict[str, tuple[int, int]] | None = None
        self._parts: list[np.ndarray] = []

    def _load(self) -> dict[str, tuple[int, int]]:
        import pyarrow.parquet as pq

        if self._index is None:
            self._index, self._parts = {}, []
            for f in shard_files(self.dir) if os.path.isdir(self.dir) else []:
                table = pq.read_table(f, columns=["hash", "embedding"])
                part = len(self._parts)
                self._parts.append(to_numpy(table["embedding"]))
                for row, h in enumerate(table["hash"].to_pylist()):
                    self._index.setdefault(h, (part, row))
        return self._index

    def get(self, hashes: Sequence[str]) -> dict[int, np.ndarray]:
        """Cached vectors for the positions of ``hashes`` that are present."""
        index = self._load()
        return {i: self._parts[index[h][0]][index[h][1]] for i, h in enumerate(hashes) if h in index}

    def put(self, hashes: Sequence[str], emb: np.ndarray) -> None:
        import pyarrow.parquet as pq

        if not len(hashes):
            return
        os.makedirs(self.dir, exist_ok=True)
        meta = os.path.join(self.dir, "settings.json")
        if not os.path.exists(meta):
            write_json(meta, self.settings)
        name = f"part-{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:8]}.parquet"
        table = pa.table({"hash": pa.array(list(hashes), pa.string()), "embedding": embedding_array(emb)})
        with atomic_path(os.path.join(self.dir, name)) as tmp:
            pq.write_table(table, tmp)
        self._index = None  # re-read on next get
