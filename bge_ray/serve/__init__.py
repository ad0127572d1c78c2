"""Online serving on Ray Serve: OpenAI-compatible embeddings, Cohere/Jina-style rerank, BGE-M3 sparse
and ColBERT outputs, with dynamic batching, autoscaling, limits and optional bearer-token auth.

Modules: ``config`` (settings), ``schemas`` (request / response bodies), ``limits`` (limits, auth,
errors), ``deployments`` (model replicas), ``ingress`` (HTTP routes), ``app`` (builder). Importing
this package does not import Ray; ``build_app`` does.
"""

from __future__ import annotations


def build_app(args=None):
    """See :func:`bge_ray.serve.app.build_app`."""
    from .app import build_app as _build_app

    return _build_app(args)


__all__ = ["build_app"]
