"""Model replicas: one embedder or reranker per replica, concurrent requests merged by ``@serve.batch``.

The ingress has already validated every request, so a batch holds only work the model can do. Model
calls run on dedicated threads, so the replica's event loop keeps accepting requests (and filling the
next batch) meanwhile; ``model_threads`` of them run at once (``max_concurrent_batches``), all fed from
the replica's one request queue and sharing one copy of the weights.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import queue
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from ray import serve
from ray.serve import metrics

from .config import EmbedderSettings, ReplicaSettings, RerankerSettings

logger = logging.getLogger(__name__)

DENSE, SPARSE, COLBERT = "dense", "sparse", "colbert"

_SIZE_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
_MS_BOUNDARIES = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000]


@dataclass
class EmbedJob:
    """One request's work: texts, query or document side, and the outputs wanted."""

    texts: list[str]
    query: bool = False
    modes: tuple[str, ...] = (DENSE,)
    return_tokens: bool = False
    max_floats: int | None = None  # a ColBERT job over this is answered unrun, with its size in ``floats``
    # Over-long inputs: "END" cuts their end (the models' own truncation), "START" their start, "NONE"
    # answers the job unrun with ``too_long`` set.
    truncate: str = "END"
    max_tokens: int | None = None  # token cut below the model's own (special tokens included)
    normalize: bool | None = None  # False: raw (unnormalized) dense vectors; None: the model's setting


@dataclass
class BatchInfo:
    """What the request shared its model call with (sent to clients as X-Batch-* headers)."""

    requests: int
    inputs: int


@dataclass
class EmbedResult:
    dense: np.ndarray | None = None  # float32 [n, dim]
    sparse: list[dict[str, float]] | None = None  # FlagEmbedding's lexical_weights: {str(token_id): weight}
    tokens: list[list[str]] | None = None  # token texts of each sparse entry, when asked
    colbert: list[np.ndarray] | None = None  # float32 [n_tokens - 1, dim] per text
    prompt_tokens: int = 0
    batch: BatchInfo = field(default_factory=lambda: BatchInfo(1, 0))
    floats: int = 0  # numbers in the response (ColBERT: the tokens' vectors)
    too_long: TooLong | None = None  # set (and nothing run) when a job with truncate "NONE" has an input over the cut


@dataclass
class TooLong:
    """The first input of a job over its token cut: its index, its tokens and the cut."""

    index: int
    tokens: int
    limit: int


@dataclass
class RerankJob:
    query: str
    documents: list[str]
    max_tokens_per_doc: int | None = None  # documents cut to this many tokens first (Cohere v2)
    truncate: bool = True  # False: a pair over the model's max_length answers the job unrun, ``too_long`` set


@dataclass
class RerankResult:
    scores: np.ndarray  # raw logits, one per document
    prompt_tokens: int
    batch: BatchInfo
    too_long: TooLong | None = None


def _device(num_gpus: float) -> str:
    import torch

    return "cuda:0" if num_gpus > 0 and torch.cuda.is_available() else "cpu"


class _Replica:
    """Model thread, torch threads, batch parameters and the metrics every model deployment shares."""

    kind = ""

    def __init__(self, settings: ReplicaSettings):
        import torch

        from bge_ray.models.devices import keep_freed_memory

        self.settings = settings
        self.name = settings.served_name
        # Model threads: torch's thread count is per calling thread under OpenMP, so each sets its own
        # (Ray caps OMP_NUM_THREADS at the actor's CPU request).
        self._pool = ThreadPoolExecutor(
            settings.model_threads, thread_name_prefix="bge_ray-model",
            initializer=torch.set_num_threads, initargs=(settings.threads,),
        )
        torch.set_num_threads(settings.threads)
        keep_freed_memory()
        self.torch_threads = self._pool.submit(torch.get_num_threads).result()
        self.device = _device(settings.num_gpus)
        started = time.perf_counter()
        self.model = self._pool.submit(self._load).result()
        logger.info("%s %s loaded on %s in %.1f s", self.kind, self.name, self.device, time.perf_counter() - started)
        # One handle per model thread, taken for the length of a model call.
        self._handles: queue.SimpleQueue = queue.SimpleQueue()
        for h in _thread_handles(self.model, settings.model_threads):
            self._handles.put(h)
        # Per instance, so max_concurrent_batches can follow the settings.
        self._batched = serve.batch(
            max_batch_size=settings.max_batch_size,
            batch_wait_timeout_s=settings.batch_wait_timeout_s,
            max_concurrent_batches=settings.model_threads,
        )(self._batch)
        tags = ("model",)
        self._m_requests = metrics.Counter("bge_ray_model_requests", "requests answered by the model", tags)
        self._m_inputs = metrics.Counter("bge_ray_model_inputs", "texts (or pairs) run through the model", tags)
        self._m_tokens = metrics.Counter("bge_ray_model_tokens", "tokens run through the model", tags)
        self._m_batch = metrics.Histogram(
            "bge_ray_batch_requests", "requests merged into one model call", _SIZE_BOUNDARIES, tags
        )
        self._m_batch_inputs = metrics.Histogram(
            "bge_ray_batch_inputs", "texts (or pairs) in one model call", _SIZE_BOUNDARIES, tags
        )
        self._m_latency = metrics.Histogram("bge_ray_batch_ms", "model call time (ms)", _MS_BOUNDARIES, tags)
        for m in (self._m_requests, self._m_inputs, self._m_tokens, self._m_batch, self._m_batch_inputs, self._m_latency):
            m.set_default_tags({"model": self.name})
        self.reconfigure({})

    def _load(self):
        raise NotImplementedError

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Batch parameters, changeable on a running deployment through ``user_config``."""
        size = int(user_config.get("max_batch_size", self.settings.max_batch_size))
        wait = float(user_config.get("batch_wait_timeout_s", self.settings.batch_wait_timeout_s))
        self._batched.set_max_batch_size(size)
        self._batched.set_batch_wait_timeout_s(wait)

    async def _batch(self, jobs: list) -> list:
        raise NotImplementedError

    def _with_handle(self, fn, jobs: list) -> list:
        model = self._handles.get()
        try:
            return fn(model, jobs)
        finally:
            self._handles.put(model)

    async def _run(self, fn, jobs: list) -> list:
        started = time.perf_counter()
        results = await asyncio.get_running_loop().run_in_executor(self._pool, self._with_handle, fn, jobs)
        n_inputs = sum(len(_items(j)) for j in jobs)
        self._m_latency.observe((time.perf_counter() - started) * 1000)
        self._m_batch.observe(len(jobs))
        self._m_batch_inputs.observe(n_inputs)
        self._m_requests.inc(len(jobs))
        self._m_inputs.inc(n_inputs)
        tokens = sum(r.prompt_tokens for r in results)
        if tokens:  # zero when every job of the batch was answered unrun (Ray's counters take > 0 only)
            self._m_tokens.inc(tokens)
        return results

    def check_health(self) -> None:
        if self.model is None:
            raise RuntimeError(f"{self.kind} {self.name} has no model loaded")


def _items(job) -> list:
    return job.texts if isinstance(job, EmbedJob) else job.documents


def _thread_handles(model, n: int) -> list:
    """``n`` handles on one model for ``n`` threads: the weights are shared (inference only), while
    each handle has its own tokenizer (a fast tokenizer's truncation state is set per call, so two
    threads on one fail with "Already borrowed") and its own per-call fields (``last_token_counts``)."""
    handles = [model]
    for _ in range(n - 1):
        h = copy.copy(model)
        h.__dict__ = dict(model.__dict__)
        h.tokenizer = copy.deepcopy(model.tokenizer)
        handles.append(h)
    return handles


@serve.deployment
class EmbedderReplica(_Replica):
    """An embedder (``FlagAutoModel``); BGE-M3 models also give lexical weights and ColBERT vectors."""

    kind = "embedder"

    def _load(self):
        from bge_ray.models import BGEM3FlagModel, FlagAutoModel, registry

        s: EmbedderSettings = self.settings  # type: ignore[assignment]
        spec = registry.lookup(s.model, registry.EMBEDDER)
        if spec is None and not s.model_class and os.path.isdir(s.model):
            spec = registry.infer_from_checkpoint(s.model, registry.EMBEDDER)
        kwargs: dict[str, Any] = dict(
            model_class=s.model_class,
            normalize_embeddings=s.normalize_embeddings,
            use_fp16=s.use_fp16 and self.device != "cpu",
            devices=self.device,
            pooling_method=s.pooling_method,
            batch_size=s.encode_batch_size,
            # The registry's prompts are applied by the server, so clients need not know them.
            query_instruction_for_retrieval=s.query_instruction
            if s.query_instruction is not None
            else (spec.query_instruction_for_retrieval if spec else None),
            query_instruction_format=s.query_instruction_format
            or (spec.query_instruction_format if spec else None),
        )
        passage = s.passage_instruction if s.passage_instruction is not None else (
            spec.passage_instruction_for_retrieval if spec else None
        )
        if passage is not None:
            kwargs["passage_instruction_for_retrieval"] = passage
        if s.max_length:
            kwargs["passage_max_length"] = s.max_length
        if s.query_max_length or s.max_length:
            kwargs["query_max_length"] = s.query_max_length or s.max_length
        model = FlagAutoModel.from_finetuned(s.model, **kwargs)
        self.is_m3 = isinstance(model, BGEM3FlagModel)
        return model

    def info(self) -> dict[str, Any]:
        """What the ingress needs to validate requests for this model."""
        modes = [DENSE, SPARSE, COLBERT] if self.is_m3 else [DENSE]
        return {
            "kind": self.kind,
            "name": self.name,
            "class": type(self.model).__name__,
            "capabilities": modes,
            "dimensions": int(self.model.dim),
            "matryoshka": bool(self.settings.matryoshka),
            "normalized": bool(self.model.normalize_embeddings),
            "max_length": int(self.model.passage_max_length),
            "query_max_length": int(self.model.query_max_length),
            "query_instruction": self.model.query_instruction_for_retrieval,
            "torch_threads": self.torch_threads,
        }

    async def embed(self, job: EmbedJob) -> EmbedResult:
        return await self._batched(job)

    async def _batch(self, jobs: list[EmbedJob]) -> list[EmbedResult]:
        return await self._run(self._embed_batch, jobs)

    def _embed_batch(self, model, jobs: list[EmbedJob]) -> list[EmbedResult]:
        """Run the batch as one model call per side (queries / documents), outputs split per job."""
        results: list[EmbedResult | None] = [None] * len(jobs)
        info = BatchInfo(len(jobs), sum(len(j.texts) for j in jobs))
        for i, job in enumerate(jobs):
            if COLBERT in job.modes and job.max_floats is not None:
                floats = self._colbert_floats(model, job)
                if floats > job.max_floats:
                    results[i] = EmbedResult(batch=info, floats=floats)  # never run: the ingress answers 413
        inputs: dict[int, list[str]] = {}
        for i, job in enumerate(jobs):
            if results[i] is None:
                texts, too_long = self._fit(model, job)
                if too_long is not None:
                    results[i] = EmbedResult(batch=info, too_long=too_long)
                else:
                    inputs[i] = texts
        # One model call per query side, token cut and normalization.
        keys = sorted({(j.query, self._cut(model, j), j.normalize is False) for i, j in enumerate(jobs) if i in inputs})
        for query, cut, raw in keys:
            group = [i for i in inputs if (jobs[i].query, self._cut(model, jobs[i]), jobs[i].normalize is False)
                     == (query, cut, raw)]
            texts = [t for i in group for t in inputs[i]]
            modes = {m for i in group for m in jobs[i].modes}
            out = self._encode(model, texts, query, modes, cut, raw)
            counts = self._token_counts(model, texts)
            start = 0
            for i in group:
                job = jobs[i]
                stop = start + len(job.texts)
                part = EmbedResult(prompt_tokens=int(counts[start:stop].sum()), batch=info)
                if DENSE in job.modes:
                    part.dense = out[DENSE][start:stop]
                if SPARSE in job.modes:
                    part.sparse = out[SPARSE][start:stop]
                    if job.return_tokens:
                        part.tokens = [self._token_texts(w) for w in part.sparse]
                if COLBERT in job.modes:
                    part.colbert = out[COLBERT][start:stop]
                    part.floats = sum(int(np.size(v)) for v in part.colbert)
                results[i] = part
                start = stop
        return results  # type: ignore[return-value]

    def _cut(self, model, job: EmbedJob) -> int:
        """The token cut of a job's inputs (special tokens and instruction included)."""
        cut = int(model.query_max_length if job.query else model.passage_max_length)
        return min(cut, job.max_tokens) if job.max_tokens else cut

    def _fit(self, model, job: EmbedJob) -> tuple[list[str], TooLong | None]:
        """The job's texts as the model is to get them: as sent for "END" (the model cuts their end), cut
        at the start for "START", or the first one over the cut for "NONE"."""
        if job.truncate == "END":
            return job.texts, None
        cut = self._cut(model, job)
        lengths = _full_lengths(model, job.texts, job.query)
        if job.truncate == "NONE":
            over = next((i for i, n in enumerate(lengths) if n > cut), None)
            return job.texts, None if over is None else TooLong(over, lengths[over], cut)
        return [_cut_start(model.tokenizer, t, n - cut) for t, n in zip(job.texts, lengths, strict=True)], None

    def _encode(self, model, texts: list[str], query: bool, modes: set[str], cut: int | None = None,
                raw: bool = False) -> dict[str, Any]:
        model.last_token_counts = None
        encode = model.encode_queries if query else model.encode_corpus
        normalize = model.normalize_embeddings
        if raw:
            model.normalize_embeddings = False  # this handle is this thread's alone for the call
        try:
            if not self.is_m3:
                return {DENSE: np.asarray(encode(texts, max_length=cut, convert_to_numpy=True), dtype=np.float32)}
            out = encode(
                texts,
                max_length=cut,
                return_dense=DENSE in modes,
                return_sparse=SPARSE in modes,
                return_colbert_vecs=COLBERT in modes,
            )
        finally:
            model.normalize_embeddings = normalize
        return {
            DENSE: None if out["dense_vecs"] is None else np.asarray(out["dense_vecs"], dtype=np.float32),
            SPARSE: out["lexical_weights"],
            COLBERT: out["colbert_vecs"],
        }

    def _colbert_floats(self, model, job: EmbedJob) -> int:
        """The size of a job's ColBERT output from its token counts (one vector per token but the
        first), before the model runs."""
        cut = model.query_max_length if job.query else model.passage_max_length
        ids = model.tokenizer(job.texts, truncation=True, max_length=cut)["input_ids"]
        return sum(max(0, len(x) - 1) for x in ids) * int(model.colbert_dim)

    def _token_counts(self, model, texts: list[str]) -> np.ndarray:
        counts = getattr(model, "last_token_counts", None)
        if counts is not None and len(counts) == len(texts):
            return np.asarray(counts)
        # Classes that do not record counts: count with the tokenizer (instructions not included).
        ids = model.tokenizer(texts, truncation=True, max_length=model.passage_max_length)["input_ids"]
        return np.array([len(x) for x in ids])

    def _token_texts(self, weights: dict[str, float]) -> list[str]:
        return self.model.tokenizer.convert_ids_to_tokens([int(k) for k in weights])


@serve.deployment
class RerankerReplica(_Replica):
    """A reranker (``FlagAutoReranker``): raw scores per (query, document) pair."""

    kind = "reranker"

    def _load(self):
        from bge_ray.models import FlagAutoReranker

        s: RerankerSettings = self.settings  # type: ignore[assignment]
        kwargs: dict[str, Any] = dict(
            model_class=s.model_class,
            use_fp16=s.use_fp16 and self.device != "cpu",
            devices=self.device,
            batch_size=s.encode_batch_size,
        )
        if s.max_length:
            kwargs["max_length"] = s.max_length
        if s.query_max_length:
            kwargs["query_max_length"] = s.query_max_length
        return FlagAutoReranker.from_finetuned(s.model, **kwargs)

    def info(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "class": type(self.model).__name__,
            "capabilities": ["rerank"],
            "dimensions": None,
            "max_length": int(self.model.max_length),
            "matryoshka": False,
            "torch_threads": self.torch_threads,
        }

    async def rerank(self, job: RerankJob) -> RerankResult:
        return await self._batched(job)

    async def _batch(self, jobs: list[RerankJob]) -> list[RerankResult]:
        return await self._run(self._rerank_batch, jobs)

    def _rerank_batch(self, model, jobs: list[RerankJob]) -> list[RerankResult]:
        info = BatchInfo(len(jobs), sum(len(j.documents) for j in jobs))
        out: list[RerankResult | None] = [None] * len(jobs)
        docs: dict[int, list[str]] = {}
        for i, job in enumerate(jobs):
            texts = job.documents
            if job.max_tokens_per_doc:
                texts = [_cut_end(model.tokenizer, d, job.max_tokens_per_doc) for d in texts]
            if not job.truncate:
                lengths = [len(x) for x in model.tokenizer([job.query] * len(texts), texts)["input_ids"]]
                over = next((k for k, n in enumerate(lengths) if n > model.max_length), None)
                if over is not None:
                    out[i] = RerankResult(np.zeros(0), 0, info, TooLong(over, lengths[over], int(model.max_length)))
                    continue
            docs[i] = texts
        run = [i for i in range(len(jobs)) if i in docs]
        if not run:
            return out  # type: ignore[return-value]
        pairs = [(jobs[i].query, d) for i in run for d in docs[i]]
        model.last_token_counts = None
        scores = np.asarray(model.compute_score(pairs, normalize=False), dtype=np.float64)
        counts = getattr(model, "last_token_counts", None)
        if counts is None or len(counts) != len(pairs):
            # Rerankers that do not record counts: query plus document tokens.
            tok = model.tokenizer
            counts = np.array([len(tok(q)["input_ids"]) + len(tok(d)["input_ids"]) for q, d in pairs])
        start = 0
        for i in run:
            stop = start + len(docs[i])
            out[i] = RerankResult(scores[start:stop], int(np.sum(counts[start:stop])), info)
            start = stop
        return out  # type: ignore[return-value]


def _full_lengths(model, texts: list[str], query: bool) -> list[int]:
    """Untruncated token counts of ``texts`` as the model would see them (instruction and special tokens in)."""
    from bge_ray.models.base import format_instruction  # torch: model replicas only

    ins = model.query_instruction_for_retrieval if query else getattr(model, "passage_instruction_for_retrieval", None)
    if ins is not None:
        fmt = (model.query_instruction_format if query else getattr(model, "passage_instruction_format", None))
        texts = [format_instruction(fmt or "{}{}", ins, t) for t in texts]
    return [len(x) for x in model.tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]]


def _cut_start(tokenizer, text: str, drop: int) -> str:
    """``text`` without its first ``drop`` tokens (cut at a token's first character, so re-tokenised it
    may differ by a token at the cut, which the model's own end truncation then absorbs)."""
    if drop <= 0:
        return text
    if getattr(tokenizer, "is_fast", False):
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        return text[offsets[drop][0]:] if drop < len(offsets) else ""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids[drop:])


def _cut_end(tokenizer, text: str, keep: int) -> str:
    """``text`` up to the end of its ``keep``-th token."""
    if getattr(tokenizer, "is_fast", False):
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        return text if len(offsets) <= keep else text[: offsets[keep - 1][1]]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= keep else tokenizer.decode(ids[:keep])


class LocalHandle:
    """A model replica object living in this process (the colocated layout), behind the interface the
    ingress uses on a ``DeploymentHandle``: ``await handle.method.remote(...)``; ``@serve.batch`` still
    merges the concurrent requests of this process."""

    def __init__(self, kind: str, settings: ReplicaSettings):
        cls = {"embedder": EmbedderReplica, "reranker": RerankerReplica}[kind].func_or_class
        self.replica: _Replica = cls(settings)

    def __getattr__(self, method: str) -> _LocalMethod:
        return _LocalMethod(getattr(self.replica, method))


class _LocalMethod:
    def __init__(self, fn):
        self.fn = fn

    async def remote(self, *args: Any, **kwargs: Any) -> Any:
        out = self.fn(*args, **kwargs)
        return await out if asyncio.iscoroutine(out) else out
