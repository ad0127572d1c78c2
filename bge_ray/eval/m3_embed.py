"""M3 vectors for evaluation: which specs load BGE-M3, and dense vectors plus lexical weights in a
fixed id order, read from the embed job's shards (``--outputs dense,sparse``) or its query results."""

from __future__ import annotations

import os

import numpy as np

from bge_ray.models.spec import EmbedderSpec


def is_m3(spec: EmbedderSpec) -> bool:
    """Whether ``spec`` loads a BGEM3FlagModel (by model_class, registry name or checkpoint files)."""
    from bge_ray.models import registry

    if spec.model_class is not None:
        return registry.class_name_for(spec.model_class) == "BGEM3FlagModel"
    found = registry.lookup(spec.model or "all-MiniLM-L6-v2", registry.EMBEDDER)
    if found is None and spec.model and os.path.isdir(spec.model):
        found = registry.infer_from_checkpoint(spec.model, registry.EMBEDDER)
    return found is not None and found.class_name == "BGEM3FlagModel"


class M3Vectors:
    """Dense vectors [n, dim] and lexical weights (per row ``(ids int64, weights float64)``) by id."""

    def __init__(self, ids: list[str], dense: np.ndarray, lexical: list[tuple[np.ndarray, np.ndarray]]):
        self.ids, self.dense, self.lexical = ids, dense, lexical

    @classmethod
    def from_vectors(cls, v) -> M3Vectors:
        """From the model stage's :class:`bge_ray.batch.stage.Vectors` (dense and sparse outputs)."""
        return cls(list(v.ids), v.dense, [(i, w.astype(np.float64)) for i, w in v.sparse])

    @classmethod
    def from_shards(cls, output: str, order: list[str]) -> M3Vectors:
        """An embed job's ``embedding`` and ``sparse`` columns, in ``order`` (every id must be there)."""
        import pyarrow.parquet as pq

        from bge_ray.batch.stage import Vectors
        from bge_ray.io.shards import shard_files, sparse_rows, to_numpy

        parts = []
        for f in shard_files(os.path.join(output, "shards")):
            t = pq.read_table(f, columns=["id", "embedding", "sparse"])
            parts.append(Vectors(t["id"].to_pylist(), dense=to_numpy(t["embedding"]), sparse=sparse_rows(t["sparse"])))
        return cls.from_vectors(Vectors.concat(parts).take(order))
