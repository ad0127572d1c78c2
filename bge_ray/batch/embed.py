"""The corpus embedding pipeline: read (Ray Data) -> embed (actor pool) -> parquet shards,
manifest and faiss index, committed to the output folder only when complete."""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bge_ray.io.atomic import write_json
from bge_ray.io.readers import CorpusSpec, read_corpus
from bge_ray.io.shards import embedding_array, read_embeddings, shard_files

logger = logging.getLogger(__name__)


@dataclass
class EmbedderSpec:
    """What each actor loads: a model name or folder plus FlagModel-style options."""

    model: str | None = None  # None: the bundled all-MiniLM-L6-v2
    model_class: str | None = None  # FlagAutoModel model_class; None: from the registry / checkpoint
    pooling_method: str | None = None
    normalize_embeddings: bool = True
    use_fp16: bool = True
    max_length: int = 512
    batch_size: int = 256
    max_tokens_per_batch: int | None = None
    passage_instruction: str | None = None
    extra: dict = field(default_factory=dict)

    def load(self, devices=None):
        from bge_ray.models.auto import FlagAutoModel

        return FlagAutoModel.from_finetuned(
            self.model,
            model_class=self.model_class,
            pooling_method=self.pooling_method,
            normalize_embeddings=self.normalize_embeddings,
            use_fp16=self.use_fp16,
            devices=devices,
            batch_size=self.batch_size,
            passage_max_length=self.max_length,
            max_tokens_per_batch=self.max_tokens_per_batch,
            passage_instruction_for_retrieval=self.passage_instruction,
            **self.extra,
        )


class EmbedActor:
    """Ray Data callable class: loads the model once, embeds each incoming batch of rows."""

    def __init__(self, spec: EmbedderSpec, torch_threads: int | None = None):
        import torch

        if torch_threads:
            torch.set_num_threads(torch_threads)
        devices = "cuda:0" if torch.cuda.is_available() else "cpu"
        self.spec = spec
        self.model = spec.load(devices=devices)

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = batch["text"].to_pylist()
        emb = self.model.encode_corpus(texts, batch_size=self.spec.batch_size, max_length=self.spec.max_length)
        n_tokens = self.model.last_token_counts
        return pa.table(
            {
                "id": batch["id"],
                "embedding": embedding_array(emb),
                "n_tokens": pa.array(n_tokens, type=pa.int32()),
            }
        )


def embed_dataset(
    ds,
    spec: EmbedderSpec,
    plan,
    rows_per_call: int = 1024,
    actor_class: type = EmbedActor,
):
    """Ray Data stage: ``{id, text}`` rows -> ``{id, embedding, n_tokens}`` through an actor pool.

    ``plan`` is a :class:`bge_ray.batch.runtime.ActorPlan`; every caller (the embed job, mining,
    evaluation) goes through here so models load once per actor and batches stay model-sized.
    """
    from ray.data import ActorPoolStrategy

    return ds.map_batches(
        actor_class,
        fn_constructor_kwargs={"spec": spec, "torch_threads": plan.torch_threads},
        compute=ActorPoolStrategy(size=plan.num_actors),
        batch_size=rows_per_call,
        batch_format="pyarrow",
        num_cpus=plan.num_cpus,
        num_gpus=plan.num_gpus,
    )


def embed_texts(
    ids: list[str],
    texts: list[str],
    spec: EmbedderSpec,
    num_actors: int | None = None,
    use_gpu: bool | None = None,
    rows_per_call: int = 1024,
) -> np.ndarray:
    """Embed in-memory texts on the Ray actor pool; rows come back in input order."""
    import ray.data

    from bge_ray.io.shards import to_numpy

    from .runtime import plan_actors

    if len(ids) != len(texts):
        raise ValueError(f"{len(ids)} ids but {len(texts)} texts")
    plan = plan_actors(num_actors, use_gpu)
    order = {i: n for n, i in enumerate(ids)}
    if len(order) != len(ids):
        raise ValueError("ids passed to embed_texts must be unique")
    ds = ray.data.from_arrow(pa.table({"id": pa.array(ids, pa.string()), "text": pa.array(texts, pa.string())}))
    out = None
    for batch in embed_dataset(ds, spec, plan, rows_per_call).iter_batches(batch_format="pyarrow", batch_size=None):
        emb = to_numpy(batch["embedding"])
        if out is None:
            out = np.zeros((len(ids), emb.shape[1]), dtype=np.float32)
        out[[order[i] for i in batch["id"].to_pylist()]] = emb
    return out if out is not None else np.zeros((0, 0), dtype=np.float32)


@dataclass
class EmbedJobResult:
    output: str
    rows: int
    tokens: int
    seconds: float
    manifest: dict

    def summary(self) -> str:
        rate = self.rows / self.seconds if self.seconds else float("nan")
        return (
            f"embedded {self.rows} rows ({self.tokens} tokens) in {self.seconds:.1f} s: "
            f"{rate:.1f} docs/s, {self.tokens / max(self.seconds, 1e-9):.0f} tokens/s -> {self.output}"
        )


def run_embed_job(
    corpus: CorpusSpec,
    output: str,
    spec: EmbedderSpec,
    num_actors: int | None = None,
    use_gpu: bool | None = None,
    rows_per_call: int = 1024,
    index_kind: str | None = "flat",
) -> EmbedJobResult:
    """Embed ``corpus`` into ``output``/shards/*.parquet + manifest.json (+ index.faiss, ids.parquet).

    Results land in a temp folder and are renamed into place after every row is accounted for, so an
    interrupted run never leaves output that looks complete.
    """
    import ray

    from .runtime import plan_actors

    t0 = time.perf_counter()
    plan = plan_actors(num_actors, use_gpu)
    ds = read_corpus(corpus, num_cpus=plan.read_cpus)
    embedded = embed_dataset(ds, spec, plan, rows_per_call)
    os.makedirs(output, exist_ok=True)
    tmp = os.path.join(output, f".shards.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    embedded.write_parquet(tmp, min_rows_per_file=rows_per_call, ray_remote_args={"num_cpus": plan.read_cpus})
    ray_seconds = time.perf_counter() - t0

    files = shard_files(tmp)
    shards, rows, tokens, seen = [], 0, 0, set()
    dim = None
    for i, f in enumerate(files):
        table = pq.read_table(f, columns=["id", "n_tokens", "embedding"])
        ids = table["id"].to_pylist()
        dup = next((x for x in ids if x in seen), None) if len(seen.intersection(ids)) else None
        if dup is not None or len(set(ids)) != len(ids):
            shutil.rmtree(tmp, ignore_errors=True)
            raise ValueError(f"{corpus.path}: duplicate id {dup or _first_dup(ids)!r}: ids must be unique")
        seen.update(ids)
        dim = table.schema.field("embedding").type.list_size
        name = f"part-{i:05d}.parquet"
        os.replace(f, os.path.join(tmp, name))
        shards.append({"file": f"shards/{name}", "rows": table.num_rows})
        rows += table.num_rows
        tokens += int(np.asarray(table["n_tokens"]).sum())
    final = os.path.join(output, "shards")
    if os.path.isdir(final):
        shutil.rmtree(final)
    os.replace(tmp, final)

    manifest = {
        "input": corpus.path,
        "model": spec.model or "bundled:sentence-transformers/all-MiniLM-L6-v2",
        "embedder": asdict(spec),
        "dim": dim,
        "normalized": spec.normalize_embeddings,
        "rows": rows,
        "unique_ids": len(seen),
        "tokens": tokens,
        "shards": shards,
        "num_actors": plan.num_actors,
        "embed_seconds": round(ray_seconds, 3),
    }
    if index_kind and index_kind != "none" and rows:
        from bge_ray.index.faiss_index import build_index, save_index

        ids, emb = read_embeddings(final)
        save_index(build_index(emb, index_kind), os.path.join(output, "index.faiss"))
        pq.write_table(pa.table({"id": ids}), os.path.join(output, "ids.parquet"))
        manifest["index"] = {"kind": index_kind, "file": "index.faiss", "ids": "ids.parquet"}
    seconds = time.perf_counter() - t0
    manifest["seconds"] = round(seconds, 3)
    manifest["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write_json(os.path.join(output, "manifest.json"), manifest)
    del ray
    return EmbedJobResult(output, rows, tokens, seconds, manifest)


def _first_dup(ids: list[str]) -> str | None:
    seen = set()
    for x in ids:
        if x in seen:
            return x
        seen.add(x)
    return None
