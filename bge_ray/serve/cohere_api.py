"""Cohere API v2 routes (``/v2/embed``, ``/v2/rerank``) over the ingress's models, limits and batching.

Answers are Cohere's shapes: embed ``{id, embeddings: {<type>: [...]}, texts, meta, response_type:
"embeddings_by_type"}``, rerank ``{id, results: [{index, relevance_score}], meta}``; errors
``{"id", "message"}`` with the status Cohere would use. ``meta.billed_units`` counts what the model
ran: embed ``input_tokens`` (special tokens and instruction included), rerank ``search_units`` (a
query with up to 100 documents is one, as Cohere bills).
"""

from __future__ import annotations

import base64
import json
import math
import uuid
from typing import Any

import numpy as np
from fastapi import Request
from fastapi.responses import Response

from .deployments import DENSE
from .limits import ApiError, check_text, check_texts
from .quantize import batch_ranges, quantize, unit_ranges
from .schemas_cohere import EmbedRequestV2, RerankRequestV2

API_VERSION = {"version": "2"}


def error(exc: ApiError) -> Response:
    """Cohere's error body: ``{"id": ..., "message": ...}``."""
    body = {"id": str(uuid.uuid4()), "message": exc.detail.message}
    return Response(json.dumps(body), exc.status, media_type="application/json")


def _answer(body: dict[str, Any], result) -> Response:
    headers = {"X-Batch-Requests": str(result.batch.requests), "X-Batch-Inputs": str(result.batch.inputs)}
    return Response(json.dumps(body), 200, headers, media_type="application/json")


def embeddings_by_type(vecs: np.ndarray, types: list[str], normalized: bool) -> dict[str, list]:
    """``vecs`` (float32 [n, dim]) in each of Cohere's ``embedding_types``; int8 / uint8 calibrated on
    [-1, 1] for normalized vectors, else on this batch (see :mod:`bge_ray.serve.quantize`)."""
    out: dict[str, list] = {}
    ranges = None
    for t in types:
        if t == "float":
            out[t] = vecs.tolist()
        elif t == "base64":
            out[t] = [base64.b64encode(np.ascontiguousarray(v, dtype="<f4").tobytes()).decode("ascii") for v in vecs]
        else:
            if t in ("int8", "uint8") and ranges is None:
                if normalized:
                    ranges = unit_ranges(vecs.shape[1])
                elif len(vecs) < 2:
                    raise ApiError(
                        400, f"embedding_types {t}: this model's vectors are not normalized, so int8 / uint8 are "
                        "calibrated on the request's own inputs, which needs at least two", param="embedding_types",
                    )
                else:
                    ranges = batch_ranges(vecs)
            out[t] = quantize(vecs, t, ranges).tolist()
    return out


async def embed(ingress, request: Request) -> Response:
    req: EmbedRequestV2 = await ingress.parse(request, EmbedRequestV2)
    texts = req.text_list
    check_texts(texts, ingress.limits, "texts" if req.texts is not None else "inputs")
    name = ingress.resolve("embedder", req.model)
    info = await ingress.model_info("embedder", name)
    ingress.check_dims(name, info, req.output_dimension, "output_dimension")
    result = await ingress.embed_texts(
        name, texts, query=req.is_query, mode=DENSE, dims=req.output_dimension,
        param="texts" if req.texts is not None else "inputs", truncate=req.truncate, max_tokens=req.max_tokens,
    )
    body = {
        "id": str(uuid.uuid4()),
        "embeddings": embeddings_by_type(result.dense, req.types, info["normalized"]),
        "texts": texts,
        "meta": {"api_version": API_VERSION, "billed_units": {"input_tokens": result.prompt_tokens}},
        "response_type": "embeddings_by_type",
    }
    return _answer(body, result)


async def rerank(ingress, request: Request) -> Response:
    req: RerankRequestV2 = await ingress.parse(request, RerankRequestV2)
    check_text(req.query, ingress.limits, "query")
    check_texts(req.documents, ingress.limits, "documents")
    name = ingress.resolve("reranker", req.model)
    result = await ingress.rerank_texts(name, req.query, req.documents, max_tokens_per_doc=req.max_tokens_per_doc)
    scores = 1.0 / (1.0 + np.exp(-result.scores))
    order = np.argsort(-scores, kind="stable")[: req.top_n or len(req.documents)]
    body = {
        "id": str(uuid.uuid4()),
        "results": [{"index": int(i), "relevance_score": float(scores[i])} for i in order],
        "meta": {
            "api_version": API_VERSION,
            "billed_units": {"search_units": math.ceil(len(req.documents) / 100)},
            "tokens": {"input_tokens": result.prompt_tokens},
        },
    }
    return _answer(body, result)
