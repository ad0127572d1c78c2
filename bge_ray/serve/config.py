"""Settings of a Serve application: which models, how they batch and scale, request limits, auth.

The same pydantic models validate the ``args:`` of a Serve config YAML (``serve run`` /
``serve deploy``), the keyword arguments of :func:`bge_ray.serve.app.build_app` and the options of
``jobs/serve.py``, so a typo fails at build time with the field's name.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from bge_ray.models import registry
from bge_ray.models.loading import BUNDLED_MODEL_NAMES

#: Served name of the bundled model (its folder is called ``model``, which says nothing).
BUNDLED_SERVED_NAME = "all-MiniLM-L6-v2"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ReplicaSettings(_Strict):
    """How one model's replicas batch requests and what each asks Ray for."""

    model: str = Field("bundled", description="name, hub id or local folder (``bundled``: all-MiniLM-L6-v2)")
    name: str | None = Field(None, description="name clients send as `model` (default: the folder/model name)")
    model_class: str | None = Field(
        None, description="FlagEmbedding model_class (e.g. encoder-only-base) when the registry cannot tell"
    )
    use_fp16: bool = Field(True, description="half precision on GPU replicas (CPU replicas stay fp32)")
    # CPU defaults (benchmarks/README.md, "Serving"): a model call of several requests cut into
    # length-sorted passes of 16 pads far less than one pass of them all; on a GPU raise both.
    encode_batch_size: int = Field(16, ge=1, description="texts per forward pass inside one model call")
    max_batch_size: int = Field(8, ge=1, description="requests merged into one model call (@serve.batch)")
    batch_wait_timeout_s: float = Field(0.005, ge=0, description="how long a batch waits to fill")
    model_threads: int = Field(
        1, ge=1, description="model calls one replica runs at once, each on its own thread with torch_threads "
        "threads, all fed from the replica's one request queue and sharing one copy of the weights",
    )
    max_ongoing_requests: int | None = Field(
        None, ge=1,
        description="per replica; default 2 x max_batch_size x model_threads (Serve's default of 5 caps the batch)",
    )
    num_replicas: int = Field(1, ge=1, description="fixed replica count (ignored with autoscaling_config)")
    autoscaling_config: dict[str, Any] | None = Field(
        None, description="Serve autoscaling, e.g. {min_replicas: 1, max_replicas: 4, target_ongoing_requests: 16}"
    )
    num_cpus: float = Field(1.0, ge=0, description="Ray CPUs reserved per replica")
    num_gpus: float = Field(0.0, ge=0, description="Ray GPUs per replica (the model goes to cuda when > 0)")
    torch_threads: int | None = Field(
        None, ge=1, description="torch CPU threads per replica (default: num_cpus rounded up, at least 1)"
    )
    max_length: int | None = Field(None, ge=2, description="token cut for passages / pairs (class default)")
    query_max_length: int | None = Field(None, ge=1, description="token cut for queries (class default)")

    @property
    def served_name(self) -> str:
        if self.name:
            return self.name
        if self.model in BUNDLED_MODEL_NAMES:
            return BUNDLED_SERVED_NAME
        return registry.model_key(self.model)

    @property
    def aliases(self) -> set[str]:
        """Every ``model`` string a request may use for this model."""
        names = {self.served_name, self.model, registry.model_key(self.model)}
        if self.model in BUNDLED_MODEL_NAMES:
            names |= set(BUNDLED_MODEL_NAMES)
        return {n for n in names if n}

    @property
    def ongoing_requests(self) -> int:
        # Twice the batches: the next ones fill in the replica's queue while the current ones run.
        return self.max_ongoing_requests or 2 * self.max_batch_size * self.model_threads

    @property
    def threads(self) -> int:
        if self.torch_threads:
            return self.torch_threads
        return max(1, math.ceil(self.num_cpus))

    def deployment_name(self, kind: str) -> str:
        return f"{kind}-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", self.served_name)


class EmbedderSettings(ReplicaSettings):
    """An embedding model (dense; plus lexical weights and ColBERT vectors for BGE-M3)."""

    pooling_method: str | None = Field(None, description="cls / mean / last_token (default: registry)")
    normalize_embeddings: bool = True
    query_instruction: str | None = Field(
        None, description="prepended to queries (input_type=query); default: the registry's prompt"
    )
    query_instruction_format: str | None = Field(None, description='default: the registry\'s, else "{}{}"')
    passage_instruction: str | None = Field(None, description="prepended to documents; default: registry")
    matryoshka: bool = Field(
        False, description="the model was trained for truncation: allow `dimensions` below its width"
    )


class RerankerSettings(ReplicaSettings):
    """A reranking model (cross-encoder or LLM reranker)."""


def is_local_path(name: str) -> bool:
    """Whether a model string is a folder on this machine (never shown to clients)."""
    return os.path.isabs(name) or name.startswith((".", "~")) or os.path.exists(name)


class Limits(_Strict):
    """Per-request limits; exceeding one gets a 400 (or a 413 for sizes in bytes or floats) that names it."""

    max_inputs_per_request: int = Field(512, ge=1, description="texts per embeddings request / documents per rerank")
    max_chars_per_input: int = Field(32768, ge=1, description="characters per text, query or document")
    # 512 inputs of 32768 ASCII characters fit, with JSON's quoting.
    max_body_bytes: int = Field(
        32 * 1024 * 1024, ge=1024, description="bytes per request body; a larger one is refused (413) before it is read"
    )
    # 2**24 floats: 64 MiB as float32, several times that as JSON numbers.
    max_response_floats: int = Field(
        1 << 24, ge=1, description="floats in one response (ColBERT: tokens x dim per input, summed); more is a 413"
    )


class AppSettings(_Strict):
    """One Serve application: an ingress in front of embedder and reranker deployments."""

    embedders: list[EmbedderSettings] = Field(default_factory=lambda: [EmbedderSettings()])
    rerankers: list[RerankerSettings] = Field(default_factory=list)
    limits: Limits = Field(default_factory=Limits)
    api_key_env: str = Field(
        "BGE_RAY_API_KEY",
        description="environment variable (read by the ingress replica) holding the bearer token; unset = no auth",
    )
    ingress_num_cpus: float = Field(0.0, ge=0, description="Ray CPUs for the ingress (it only parses JSON)")
    ingress_num_replicas: int = Field(1, ge=1)
    ingress_ray_actor_options: dict[str, Any] = Field(
        default_factory=dict, description="extra ray_actor_options for the ingress, e.g. a runtime_env"
    )
    colocate: bool | None = Field(
        None,
        description="load the model inside the ingress replicas (no model deployment, one process hop fewer per "
        "request; the model's replica settings then size the ingress and ingress_num_cpus / ingress_num_replicas "
        "do not apply); default: on when the app serves exactly one model",
    )

    @property
    def colocated(self) -> bool:
        n_models = len(self.embedders) + len(self.rerankers)
        return n_models == 1 if self.colocate is None else self.colocate

    @model_validator(mode="after")
    def _check(self) -> AppSettings:
        if not self.embedders and not self.rerankers:
            raise ValueError("serve at least one model: embedders and rerankers are both empty")
        if self.colocate and len(self.embedders) + len(self.rerankers) > 1:
            raise ValueError("colocate: true needs exactly one model (each model has its own replica settings)")
        for kind, group in (("embedder", self.embedders), ("reranker", self.rerankers)):
            seen: dict[str, str] = {}
            for s in group:
                for alias in s.aliases:
                    if alias in seen and seen[alias] != s.model:
                        raise ValueError(
                            f"two {kind}s answer to the name {alias!r} ({seen[alias]!r} and {s.model!r}); "
                            f"give them distinct `name`s"
                        )
                    seen[alias] = s.model
        return self

    def with_cpu_plan(self, cpus: float) -> AppSettings:
        """Size CPU-only models for a machine with ``cpus`` cores: one replica per model whose replicas,
        threads and CPUs were left unset, running one single-threaded model call per core from its one
        request queue, a request per call (unless ``max_batch_size`` was given).

        Why: it gave more passages/s at a lower p99 than two single-threaded replicas with merged
        batches (Serve's router can put two requests on one replica while the other idles, and a merged
        batch runs on one thread) and than Infinity; multi-threaded torch lost more, its threads waiting
        on each other at every op whenever one is descheduled (benchmarks/README.md, "Serving").
        """
        sizing = {"num_replicas", "torch_threads", "model_threads", "num_cpus", "autoscaling_config"}
        models = [*self.embedders, *self.rerankers]
        auto = {id(m) for m in models if m.num_gpus == 0 and not (m.model_fields_set & sizing)}
        if not auto:
            return self
        fixed = sum(m.num_cpus * (1 if m.autoscaling_config else m.num_replicas) for m in models if id(m) not in auto)
        calls = max(1, int(cpus))
        share = max(0.1, (cpus - fixed) / len(auto))

        def plan(m):
            update = {"num_replicas": 1, "model_threads": calls, "torch_threads": 1, "num_cpus": round(share, 3)}
            if "max_batch_size" not in m.model_fields_set:
                update["max_batch_size"] = 1
            return m.model_copy(update=update)

        def sized(group):
            return [plan(m) if id(m) in auto else m for m in group]

        return self.model_copy(update={"embedders": sized(self.embedders), "rerankers": sized(self.rerankers)})

    @classmethod
    def from_args(cls, args: dict[str, Any] | None = None, **overrides: Any) -> AppSettings:
        """Validate builder args, accepting the shorthand ``model=`` / ``reranker=`` (what ``serve run
        bge_ray.serve.app:build_app model=PATH reranker=PATH`` passes)."""
        data = dict(args or {})
        data.update(overrides)
        model = data.pop("model", None)
        reranker = data.pop("reranker", None)
        if model:
            data.setdefault("embedders", [{"model": model}])
        if reranker:
            data.setdefault("rerankers", [{"model": reranker}])
        return cls.model_validate(data)


def api_key_from_env(env_name: str) -> str | None:
    """The bearer token the ingress expects, or ``None`` for no auth (empty counts as unset)."""
    return os.environ.get(env_name) or None

