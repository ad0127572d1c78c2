"""Optional: let the ``mteb`` package evaluate a bge_ray embedder (mteb 2's encoder protocol).

    import mteb
    from bge_ray.eval.mteb_adapter import MtebEncoder
    encoder = MtebEncoder.from_pretrained("BAAI/bge-base-en-v1.5", use_fp16=True)
    mteb.evaluate(encoder, mteb.get_tasks(tasks=["SciFact"]))

Queries go through the model's ``encode_queries`` (its query instruction), everything else through
``encode_corpus``. ``use_task_instructions`` puts mteb's per-task instruction in place of the model's
query instruction (as FlagEmbedding's mteb evaluation does for instruction-tuned models);
``instruction`` is a fixed one (FlagEmbedding's per-task table, see :mod:`bge_ray.eval.mteb_runner`).
``untyped_as_queries`` sends texts mteb gives no prompt type (STS, classification, clustering) through
the query side, instruction included, as FlagEmbedding's MTEB retriever does. With ``ray=True`` each
``encode`` call runs on a Ray actor pool (:func:`bge_ray.batch.stage.embed_rows`) instead of in this process.

Needs ``pip install mteb``; bge_ray imports this module only on request. Real mteb tasks download
their data from the Hugging Face hub when run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

try:
    from mteb.models.abs_encoder import AbsEncoder
    from mteb.models.model_meta import ModelMeta, ScoringFunction
    from mteb.types import PromptType
except ImportError as exc:  # pragma: no cover - exercised only without the optional package
    raise ImportError("bge_ray.eval.mteb_adapter needs the optional package mteb (pip install mteb)") from exc

from bge_ray.models.spec import EmbedderSpec


class MtebEncoder(AbsEncoder):
    """A bge_ray embedder behind mteb's ``EncoderProtocol``."""

    def __init__(self, spec: EmbedderSpec | None = None, model=None, name: str | None = None,
                 use_task_instructions: bool = False, ray: bool = False, num_actors: int | None = None,
                 devices=None, instruction: str | None = None, untyped_as_queries: bool = False,
                 use_gpu: bool | None = None):
        from .runner import model_name

        self.spec = spec or EmbedderSpec()
        self.use_task_instructions = use_task_instructions
        self.ray, self.num_actors, self.use_gpu = ray, num_actors, use_gpu
        self.instruction, self.untyped_as_queries = instruction, untyped_as_queries
        self.model = model if model is not None or ray else self.spec.load(devices=devices)
        dim = getattr(self.model, "dim", None) if self.model is not None else None
        self.mteb_model_meta = ModelMeta.create_empty(overwrites={
            "name": f"bge_ray/{name or model_name(self.spec.model)}", "revision": "local",
            "framework": ["PyTorch"], "similarity_fn_name": ScoringFunction.COSINE if self.spec.normalize_embeddings
            else ScoringFunction.DOT_PRODUCT,
            "embed_dim": dim, "max_tokens": self.spec.max_length, "use_instructions": use_task_instructions,
            "open_weights": True, "model_type": ["dense"], "modalities": ["text"],
        })

    @classmethod
    def from_pretrained(cls, model: str | None = None, **kwargs: Any) -> MtebEncoder:
        """Build from a model name or folder; ``kwargs`` split between EmbedderSpec fields and ours."""
        own = {k: kwargs.pop(k) for k in ("name", "use_task_instructions", "ray", "num_actors", "devices", "instruction",
                                          "untyped_as_queries", "use_gpu") if k in kwargs}
        fields = set(EmbedderSpec.__dataclass_fields__)
        spec = EmbedderSpec(model=model, **{k: v for k, v in kwargs.items() if k in fields},
                            extra={k: v for k, v in kwargs.items() if k not in fields})
        return cls(spec, **own)

    def _as_query(self, prompt_type) -> bool:
        return prompt_type == PromptType.query or (prompt_type is None and self.untyped_as_queries)

    def _instruction(self, task_metadata, prompt_type) -> str | None:
        if not self._as_query(prompt_type):
            return None
        if self.use_task_instructions:
            return self.get_instruction(task_metadata, prompt_type) or self.instruction
        return self.instruction

    def _encode(self, texts: list[str], query: bool, instruction: str | None) -> np.ndarray:
        if self.ray:
            from dataclasses import replace

            from bge_ray.batch.stage import PASSAGE, QUERY, embed_rows

            spec = self.spec
            if query and instruction:
                spec = replace(spec, extra={**spec.extra, "query_instruction_for_retrieval": instruction})
            ids = [str(i) for i in range(len(texts))]
            return embed_rows(ids, texts, [QUERY if query else PASSAGE] * len(texts), spec, self.num_actors,
                              self.use_gpu).dense
        if query:
            kwargs = {}
            if instruction:
                kwargs = {"instruction": instruction,
                          "instruction_format": getattr(self.model, "query_instruction_format", "{}{}")}
                out = self.model.encode(texts, max_length=getattr(self.model, "query_max_length", None), **kwargs)
            else:
                out = self.model.encode_queries(texts)
        else:
            out = self.model.encode_corpus(texts)
        return np.asarray(out["dense_vecs"] if isinstance(out, dict) else out, dtype=np.float32)

    def encode(self, inputs, *, task_metadata, hf_split: str, hf_subset: str, prompt_type=None, **kwargs) -> np.ndarray:
        """Embed every text of the DataLoader ``inputs`` (its batches carry a ``text`` list)."""
        texts: list[str] = []
        for batch in inputs:
            got: Sequence[str] = batch["text"]
            texts.extend(str(t) for t in got)
        if not texts:
            return np.zeros((0, self.mteb_model_meta.embed_dim or 0), dtype=np.float32)
        return self._encode(texts, self._as_query(prompt_type), self._instruction(task_metadata, prompt_type))
