"""Hugging Face text-embeddings-inference routes (``/embed``, ``/embed_sparse``, ``/rerank``) over the
ingress's models, limits and batching.

Answers and errors are TEI's (router/src/http/server.rs): errors ``{"error": str, "error_type": one of
Unhealthy, Backend, Overloaded, Validation, Tokenizer, Empty}`` with TEI's status per type: an empty
batch 400 Empty; a bad field, a batch over the limit or an over-long input with ``truncate: false``
422 Validation; a body over the byte limit 413 Validation; a model that cannot do the route (no
reranker, no sparse output) 424 Backend. A missing or wrong token is a 401 (TEI answers it with no
body; here it carries the message, typed Validation).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from fastapi import Request
from fastapi.responses import Response

from .deployments import DENSE, SPARSE
from .limits import ApiError, check_text, check_texts
from .schemas_tei import EmbedRequestTEI, EmbedSparseRequestTEI, RerankRequestTEI


def error(exc: ApiError) -> Response:
    """``exc`` as TEI answers it: its error type and that type's status."""
    code = exc.detail.code
    if exc.status in (401, 413):
        status, kind = exc.status, "Validation"
    elif exc.status >= 500:
        status, kind = exc.status, "Backend"
    elif code == "empty_input":
        status, kind = 400, "Empty"
    elif code in ("unsupported_output", "model_not_found") and exc.detail.param == "model":
        status, kind = 424, "Backend"
    else:
        status, kind = 422, "Validation"
    message = exc.detail.message if kind != "Validation" or exc.status == 401 else f"Input validation error: {exc.detail.message}"
    return Response(json.dumps({"error": message, "error_type": kind}), status, media_type="application/json")


def _answer(body: Any, result) -> Response:
    headers = {"X-Batch-Requests": str(result.batch.requests), "X-Batch-Inputs": str(result.batch.inputs),
               "X-Compute-Tokens": str(result.prompt_tokens)}
    return Response(json.dumps(body), 200, headers, media_type="application/json")


async def _embedder(ingress, requested: str | None, mode: str) -> tuple[str, dict[str, Any]]:
    if requested is None and mode != DENSE:
        name = await ingress.first_with(mode)
        if name is None:
            raise ApiError(404, f"no model served here has {mode} output (a BGE-M3 model has)", param="model",
                           code="unsupported_output")
    else:
        name = ingress.resolve("embedder", requested)
    info = await ingress.model_info("embedder", name)
    await ingress.check_mode(name, info, mode, "/embed_sparse")
    return name, info


async def embed(ingress, request: Request) -> Response:
    req: EmbedRequestTEI = await ingress.parse(request, EmbedRequestTEI)
    texts = req.texts
    check_texts(texts, ingress.limits, "inputs")
    name, info = await _embedder(ingress, req.model, DENSE)
    ingress.check_dims(name, info, req.dimensions, "dimensions")
    result = await ingress.embed_texts(
        name, texts, query=req.is_query, dims=req.dimensions, param="inputs", truncate=req.truncation,
        normalize=req.normalize,
    )
    vecs = result.dense
    if req.normalize and not info["normalized"]:
        vecs = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
    return _answer(np.asarray(vecs, dtype=np.float32).tolist(), result)


async def embed_sparse(ingress, request: Request) -> Response:
    req: EmbedSparseRequestTEI = await ingress.parse(request, EmbedSparseRequestTEI)
    texts = req.texts
    check_texts(texts, ingress.limits, "inputs")
    name, _ = await _embedder(ingress, req.model, SPARSE)
    result = await ingress.embed_texts(name, texts, query=req.is_query, mode=SPARSE, param="inputs",
                                       truncate=req.truncation)
    body = [
        [{"index": k, "value": float(v)} for k, v in sorted((int(k), v) for k, v in weights.items()) if v != 0]
        for weights in result.sparse
    ]
    return _answer(body, result)


async def rerank(ingress, request: Request) -> Response:
    req: RerankRequestTEI = await ingress.parse(request, RerankRequestTEI)
    check_text(req.query, ingress.limits, "query")
    check_texts(req.texts, ingress.limits, "texts")
    name = ingress.resolve("reranker", req.model)
    result = await ingress.rerank_texts(name, req.query, req.texts, truncate=req.truncate is not False, param="texts")
    scores = result.scores if req.raw_scores else 1.0 / (1.0 + np.exp(-result.scores))
    order = np.argsort(-scores, kind="stable")
    ranks = []
    for i in order:
        rank: dict[str, Any] = {"index": int(i), "score": float(scores[i])}
        if req.return_text:
            rank["text"] = req.texts[i]
        ranks.append(rank)
    return _answer(ranks, result)
