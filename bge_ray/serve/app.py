"""Application builder: settings -> model deployments + ingress, for ``serve run`` / ``serve deploy``.

In a Serve config YAML::

    applications:
      - name: bge_ray
        route_prefix: /
        import_path: bge_ray.serve.app:build_app
        args: {embedders: [{model: bundled, max_batch_size: 16}], rerankers: []}

or from a shell: ``serve run bge_ray.serve.app:build_app model=bundled reranker=/path/to/reranker``.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from .config import AppSettings, ReplicaSettings
from .deployments import EmbedderReplica, RerankerReplica
from .ingress import Ingress


def _replica_options(s: ReplicaSettings, kind: str) -> dict[str, Any]:
    options: dict[str, Any] = dict(
        name=s.deployment_name(kind),
        max_ongoing_requests=s.ongoing_requests,
        ray_actor_options={"num_cpus": s.num_cpus, "num_gpus": s.num_gpus},
        # Batch parameters travel as user_config so `serve deploy` can change them without a restart.
        user_config={"max_batch_size": s.max_batch_size, "batch_wait_timeout_s": s.batch_wait_timeout_s},
        # Loading a large model on a cold node takes minutes; Serve's default health check would kill it.
        health_check_timeout_s=60,
    )
    if s.autoscaling_config:
        options["autoscaling_config"] = s.autoscaling_config
        options["num_replicas"] = "auto"
    else:
        options["num_replicas"] = s.num_replicas
    return options


def build(settings: AppSettings) -> Application:
    """The Serve application for ``settings``: one deployment per model and an ingress in front, or with
    ``settings.colocated`` the ingress alone, loading the model itself and sized by its replica settings."""
    actor_options = {"num_cpus": settings.ingress_num_cpus, **settings.ingress_ray_actor_options}
    ingress_options: dict[str, Any] = dict(num_replicas=settings.ingress_num_replicas, ray_actor_options=actor_options)
    models = [("embedder", s) for s in settings.embedders] + [("reranker", s) for s in settings.rerankers]
    if settings.colocated:
        [(kind, s)] = models
        ingress_options = _replica_options(s, kind)
        del ingress_options["name"]  # stays "Ingress"
        ingress_options["ray_actor_options"] = {**settings.ingress_ray_actor_options, **ingress_options["ray_actor_options"]}
        deployments = {"embedder": {}, "reranker": {}, kind: {s.served_name: s}}  # loaded by the ingress
    else:
        classes = {"embedder": EmbedderReplica, "reranker": RerankerReplica}
        deployments = {"embedder": {}, "reranker": {}}
        for kind, s in models:
            deployments[kind][s.served_name] = classes[kind].options(**_replica_options(s, kind)).bind(s)
    aliases = {
        "embedder": {a: s.served_name for s in settings.embedders for a in s.aliases},
        "reranker": {a: s.served_name for s in settings.rerankers for a in s.aliases},
    }
    ingress = Ingress.options(**ingress_options)
    return ingress.bind(deployments["embedder"], deployments["reranker"], aliases, settings.limits, settings.api_key_env)


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Serve's application builder (``import_path: bge_ray.serve.app:build_app``); ``args`` as in
    :class:`~bge_ray.serve.config.AppSettings`, plus the shorthand ``model`` / ``reranker``."""
    return build(AppSettings.from_args(args))


def start(
    settings: AppSettings,
    host: str = "127.0.0.1",
    port: int = 8000,
    address: str | None = None,
    name: str = "bge_ray",
    route_prefix: str = "/",
) -> str:
    """Start (or join) Ray and Serve, deploy ``settings`` and wait until it answers; returns the URL.

    On a cluster where Serve already runs, its HTTP host and port stay as they are.
    """
    from bge_ray.batch.runtime import init_ray

    init_ray(address)
    from ray import serve

    serve.start(http_options={"host": host, "port": port})
    serve.run(build(settings), name=name, route_prefix=route_prefix)
    return f"http://{host}:{port}{route_prefix.rstrip('/')}"
