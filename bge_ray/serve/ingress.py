"""The HTTP front: OpenAI, Cohere (v1 rerank, v2 embed / rerank) and TEI routes over the model deployments.

Bodies are read and validated here, in this order: bearer token, body size (from Content-Length, then
while it streams in), JSON syntax, schema, limits (including text that is not valid Unicode), model
name, model capabilities; only valid work reaches a model replica, so one bad request never fails a
batch it would have shared. Every error answers in OpenAI's shape; a server error's body names a
request id for the log, never the exception.
"""

# No ``from __future__ import annotations`` here: Serve ships the route methods to the replica by value,
# with only the globals their bodies use, so FastAPI could not resolve string annotations such as
# "Request" there and would take ``request`` for a required query parameter.

import asyncio
import json
import logging
import time
import uuid
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.serve import metrics
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import cohere_api, schemas, tei_api
from .config import Limits, ReplicaSettings, api_key_from_env, is_local_path
from .deployments import COLBERT, DENSE, SPARSE, EmbedJob, EmbedResult, LocalHandle, RerankJob, RerankResult
from .limits import ApiError, check_bearer, check_text, check_texts

logger = logging.getLogger(__name__)

api = FastAPI(
    title="bge_ray",
    description="BGE / FlagEmbedding embedders and rerankers on Ray Serve (OpenAI and Cohere compatible).",
    # Served by routes of the ingress below, behind the bearer token like every route but /health.
    docs_url=None,
    redoc_url=None,
    openapi_url=None,
)


def _json(model: BaseModel, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(model.model_dump_json(exclude_none=True), status, headers, media_type="application/json")


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> Response:
    return Response(exc.body(), exc.status, media_type="application/json")


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    err = ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=str(exc.status_code))
    return Response(err.body(), exc.status_code, getattr(exc, "headers", None), media_type="application/json")


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    return await _api_error(request, _schema_error(exc.errors()))


def _schema_error(errors: list[dict[str, Any]]) -> ApiError:
    first = errors[0]
    loc = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body",))
    # Union members add their type name to the location (input.str, input.list[str]): drop them.
    param = loc.split(".")[0] if loc else None
    msg = first.get("msg", "invalid value")
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    text = msg if param and msg.startswith(param) else f"{param}: {msg}" if param else msg
    # "empty": an empty batch, which TEI answers apart (400 Empty rather than 422 Validation).
    code = "empty_input" if first.get("type") == "empty" else "invalid_value"
    return ApiError(400, text + more, param=param, code=code)


def openai_error(exc: ApiError) -> Response:
    return Response(exc.body(), exc.status, media_type="application/json")


def _too_large(size: str, limit: int) -> ApiError:
    return ApiError(
        413, f"the request body has {size} bytes; this server accepts at most {limit} bytes per request "
        "(limit max_body_bytes)", param=None, code="body_too_large",
    )


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) from its Content-Length before any of it is read, or as soon as a body
    without one streams past ``limit``."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise ApiError(400, f"Content-Length {declared[:40]!r} is not a byte count", code="invalid_request")
        if int(declared) > limit:
            raise _too_large(declared.strip(), limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(f"more than {limit}", limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def _parse(request: Request, schema: type[BaseModel], limits: Limits) -> Any:
    raw = await _read_body(request, limits.max_body_bytes)
    if not raw.strip():
        raise ApiError(400, "the request body is empty; expected a JSON object", code="invalid_json")
    try:
        data = json.loads(raw)
    except RecursionError:
        raise ApiError(400, "the JSON in the request body is nested too deeply", code="invalid_json") from None
    except (ValueError, UnicodeDecodeError) as exc:
        # ValueError: JSONDecodeError, and integers past Python's digit limit.
        raise ApiError(400, f"malformed JSON in the request body: {exc}"[:500], code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(
            400, f"the request body is a JSON {type(data).__name__}; expected a JSON object", code="invalid_json"
        )
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise _schema_error(exc.errors()) from None


async def _openapi(request: Request) -> Response:
    return Response(json.dumps(request.app.openapi()), media_type="application/json")


async def _docs(request: Request) -> Response:
    return get_swagger_ui_html(openapi_url=request.scope.get("root_path", "") + "/openapi.json", title="bge_ray")


def _batch_headers(batch) -> dict[str, str]:
    return {"X-Batch-Requests": str(batch.requests), "X-Batch-Inputs": str(batch.inputs)}


@serve.deployment(max_ongoing_requests=256)
@serve.ingress(api)
class Ingress:
    """Routes requests to the model deployments by the request's ``model`` (first of its kind if absent).

    A model given by its settings instead of a handle (the colocated layout) is loaded in this replica
    and called in-process through a :class:`LocalHandle`; this deployment then takes the model's
    ``user_config`` (batch parameters) and health check.
    """

    def __init__(
        self,
        embedders: dict[str, Any],
        rerankers: dict[str, Any],
        aliases: dict[str, dict[str, str]],
        limits: Limits,
        api_key_env: str,
    ):
        self.handles = {
            kind: {n: LocalHandle(kind, h) if isinstance(h, ReplicaSettings) else h for n, h in handles.items()}
            for kind, handles in (("embedder", embedders), ("reranker", rerankers))
        }
        self._local = [h.replica for hs in self.handles.values() for h in hs.values() if isinstance(h, LocalHandle)]
        self.aliases = aliases  # kind -> {alias: served name}
        self.limits = limits
        self.api_key_env = api_key_env
        self.api_key = api_key_from_env(api_key_env)
        self._info: dict[tuple[str, str], dict[str, Any]] = {}
        self._created = int(time.time())
        self._m_requests = metrics.Counter(
            "bge_ray_http_requests", "HTTP requests by route and status", ("route", "status")
        )
        if self.api_key:
            logger.info("bearer-token auth on (key from $%s)", api_key_env)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Colocated models' batch parameters (Serve calls this only when the deployment has a user_config)."""
        for replica in self._local:
            replica.reconfigure(user_config)

    def check_health(self) -> None:
        for replica in self._local:
            replica.check_health()

    # -- helpers ------------------------------------------------------------------------------
    def _auth(self, request: Request) -> None:
        check_bearer(request.headers.get("authorization"), self.api_key)

    def resolve(self, kind: str, requested: str | None) -> str:
        names = list(self.handles[kind])
        if not names:
            raise ApiError(
                404, f"this server has no {kind} loaded", param="model", code="model_not_found"
            )
        if not requested:
            return names[0]
        name = self.aliases[kind].get(requested)
        if name is None:
            raise ApiError(
                404,
                f"model {requested!r} is not served as an {kind} here; served {kind}s: {', '.join(names)}",
                param="model",
                code="model_not_found",
            )
        return name

    async def model_info(self, kind: str, name: str) -> dict[str, Any]:
        key = (kind, name)
        if key not in self._info:
            self._info[key] = await self.handles[kind][name].info.remote()
        return self._info[key]

    def _count(self, route: str, status: int) -> None:
        self._m_requests.inc(tags={"route": route, "status": str(status)})

    async def _guard(self, route: str, request: Request, handler, errors=openai_error) -> Response:
        """Auth then ``handler``; counts the outcome. Errors are answered by ``errors`` (the API's error
        shape: OpenAI's by default); Ray errors become a 500 naming a request id."""
        try:
            self._auth(request)
            response = await handler()
        except ApiError as exc:
            response = errors(exc)
        except Exception:  # noqa: BLE001 - the client gets a request id, the log the trace
            request_id = uuid.uuid4().hex[:16]
            logger.exception("%s failed (request id %s)", route, request_id)
            err = ApiError(500, f"internal error (request id {request_id}; the server log has the details)",
                           type="server_error", code="internal_error")
            response = errors(err)
        self._count(route, response.status_code)
        return response

    async def parse(self, request: Request, schema: type[BaseModel]) -> Any:
        """The request's body validated against ``schema`` (size, JSON and schema errors raise ApiError)."""
        return await _parse(request, schema, self.limits)

    async def check_mode(self, name: str, info: dict[str, Any], mode: str, route: str) -> None:
        if mode in info["capabilities"]:
            return
        names = list(self.handles["embedder"])
        infos = await asyncio.gather(*(self.model_info("embedder", n) for n in names))
        m3 = [n for n, i in zip(names, infos, strict=True) if mode in i["capabilities"]]
        hint = f"; served models with it: {', '.join(m3)}" if m3 else ""
        raise ApiError(
            400,
            f"model {name!r} ({info['class']}) has no {mode} output: {route} needs a BGE-M3 "
            f"model (BGEM3FlagModel){hint}",
            param="model",
            code="unsupported_output",
        )

    async def first_with(self, mode: str) -> str | None:
        """The first served embedder with ``mode`` output (None when there is none)."""
        names = list(self.handles["embedder"])
        infos = await asyncio.gather(*(self.model_info("embedder", n) for n in names))
        return next((n for n, i in zip(names, infos, strict=True) if mode in i["capabilities"]), None)

    def check_dims(self, name: str, info: dict[str, Any], dims: int | None, param: str) -> None:
        if dims is None:
            return
        full = info["dimensions"]
        if dims > full:
            raise ApiError(400, f"{param}={dims} is more than model {name!r} gives ({full})", param=param)
        if dims != full and not info["matryoshka"]:
            raise ApiError(
                400,
                f"model {name!r} was not trained for shortened embeddings (Matryoshka), so {param} must be "
                f"{full} or absent; a server operator can allow it with `matryoshka: true` for the model",
                param=param,
                code="dimensions_not_supported",
            )

    async def embed_texts(
        self, name: str, texts: list[str], *, query: bool, mode: str = DENSE, dims: int | None = None,
        param: str = "input", return_tokens: bool = False, truncate: str = "END", max_tokens: int | None = None,
        normalize: bool | None = None,
    ) -> EmbedResult:
        """Run validated ``texts`` through embedder ``name``: the result, its dense vectors cut to ``dims``
        (renormalised unless ``normalize`` is False); over-long inputs with ``truncate="NONE"`` and
        responses over ``max_response_floats`` raise."""
        job = EmbedJob(texts, query, (mode,), return_tokens, max_floats=self.limits.max_response_floats,
                       truncate=truncate, max_tokens=max_tokens, normalize=normalize)
        result: EmbedResult = await self.handles["embedder"][name].embed.remote(job)
        if result.too_long is not None:
            t = result.too_long
            raise ApiError(
                400, f"{param}[{t.index}] has {t.tokens} tokens; model {name!r} takes at most {t.limit} and "
                "truncation is off: send shorter inputs or let the server truncate them",
                param=param, code="input_too_long",
            )
        if result.floats > self.limits.max_response_floats:
            raise ApiError(
                413, f"the {mode} response would hold {result.floats} floats; this server answers at most "
                f"{self.limits.max_response_floats} per request (limit max_response_floats): send fewer or shorter "
                "inputs", param=param, code="response_too_large",
            )
        if mode == DENSE and dims is not None and dims != result.dense.shape[1]:
            vecs = result.dense[:, :dims]
            if normalize is not False:
                vecs = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
            result.dense = vecs
        return result

    async def rerank_texts(
        self, name: str, query: str, docs: list[str], *, max_tokens_per_doc: int | None = None,
        truncate: bool = True, param: str = "documents",
    ) -> RerankResult:
        """Raw scores of ``docs`` against ``query`` from reranker ``name``; with ``truncate`` False a
        pair over the model's length raises."""
        job = RerankJob(query, docs, max_tokens_per_doc=max_tokens_per_doc, truncate=truncate)
        result = await self.handles["reranker"][name].rerank.remote(job)
        if result.too_long is not None:
            t = result.too_long
            raise ApiError(
                400, f"query and {param}[{t.index}] have {t.tokens} tokens; model {name!r} takes at most "
                f"{t.limit} and truncation is off: send shorter texts or let the server truncate them",
                param=param, code="input_too_long",
            )
        return result

    async def _embed(self, request: Request, schema: type[schemas.EmbeddingRequest], mode: str):
        req = await _parse(request, schema, self.limits)
        texts = req.texts
        check_texts(texts, self.limits, "input")
        name = self.resolve("embedder", req.model)
        info = await self.model_info("embedder", name)
        await self.check_mode(name, info, mode, f"/v1/embeddings/{mode}")
        dims = req.dimensions
        if dims is not None and mode != DENSE:
            raise ApiError(400, f"dimensions applies to dense embeddings only, not {mode}", param="dimensions")
        self.check_dims(name, info, dims, "dimensions")
        result = await self.embed_texts(name, texts, query=req.is_query, mode=mode, dims=dims,
                                        return_tokens=getattr(req, "return_tokens", False))
        usage = schemas.Usage(prompt_tokens=result.prompt_tokens, total_tokens=result.prompt_tokens)
        headers = _batch_headers(result.batch)
        fmt = req.encoding_format
        if mode == DENSE:
            data = [
                schemas.EmbeddingData(index=i, embedding=schemas.encode_floats(v, fmt)) for i, v in enumerate(result.dense)
            ]
            return _json(schemas.EmbeddingResponse(data=data, model=name, usage=usage), headers=headers)
        if mode == SPARSE:
            data = [
                schemas.SparseData(
                    index=i,
                    indices=[int(k) for k in weights],
                    values=list(weights.values()),
                    tokens=result.tokens[i] if result.tokens else None,
                )
                for i, weights in enumerate(result.sparse)
            ]
            return _json(schemas.SparseResponse(data=data, model=name, usage=usage), headers=headers)
        data = [
            schemas.ColbertData(index=i, shape=m.shape, embedding=schemas.encode_floats(m, fmt))
            for i, m in enumerate(result.colbert)
        ]
        return _json(schemas.ColbertResponse(data=data, model=name, usage=usage), headers=headers)

    async def _rerank(self, request: Request) -> Response:
        req = await _parse(request, schemas.RerankRequest, self.limits)
        docs = req.texts
        check_text(req.query, self.limits, "query")
        check_texts(docs, self.limits, "documents")
        name = self.resolve("reranker", req.model)
        result = await self.rerank_texts(name, req.query, docs)
        scores = 1.0 / (1.0 + np.exp(-result.scores)) if req.normalize else result.scores
        # Stable sort on the negated score: ties keep the documents' order.
        order = np.argsort(-scores, kind="stable")[: req.top_n or len(docs)]
        results = [
            schemas.RerankResult(
                index=int(i),
                relevance_score=float(scores[i]),
                document=schemas.RerankDocument(text=docs[i]) if req.return_documents else None,
            )
            for i in order
        ]
        usage = schemas.Usage(prompt_tokens=result.prompt_tokens, total_tokens=result.prompt_tokens)
        body = schemas.RerankResponse(id=str(uuid.uuid4()), model=name, results=results, usage=usage)
        return _json(body, headers=_batch_headers(result.batch))

    async def _models(self) -> Response:
        cards = []
        for kind, handles in self.handles.items():
            infos = await asyncio.gather(*(self.model_info(kind, n) for n in handles))
            for name, info in zip(handles, infos, strict=True):
                aliases = sorted(
                    a for a, n in self.aliases[kind].items() if n == name and a != name and not is_local_path(a)
                )
                cards.append(
                    schemas.ModelCard(
                        id=name,
                        created=self._created,
                        kind=kind,
                        capabilities=info["capabilities"],
                        dimensions=info["dimensions"],
                        aliases=aliases,
                    )
                )
        return _json(schemas.ModelList(data=cards))

    # -- routes -------------------------------------------------------------------------------
    @api.post("/v1/embeddings")
    async def embeddings(self, request: Request) -> Response:
        """OpenAI embeddings; ``input_type: "query"`` applies the model's query instruction."""
        return await self._guard("/v1/embeddings", request, lambda: self._embed(request, schemas.EmbeddingRequest, DENSE))

    @api.post("/v1/embeddings/sparse")
    async def embeddings_sparse(self, request: Request) -> Response:
        """BGE-M3 lexical weights: ``indices`` (token ids) and ``values`` per input."""
        return await self._guard(
            "/v1/embeddings/sparse", request, lambda: self._embed(request, schemas.SparseEmbeddingRequest, SPARSE)
        )

    @api.post("/v1/embeddings/colbert")
    async def embeddings_colbert(self, request: Request) -> Response:
        """BGE-M3 ColBERT vectors: one [tokens, dim] matrix per input."""
        return await self._guard(
            "/v1/embeddings/colbert", request, lambda: self._embed(request, schemas.ColbertEmbeddingRequest, COLBERT)
        )

    @api.post("/v1/rerank")
    async def rerank(self, request: Request) -> Response:
        """Cohere / Jina rerank: documents sorted by relevance_score, ``index`` into the input list."""
        return await self._guard("/v1/rerank", request, lambda: self._rerank(request))

    # Cohere API v2 (cohere.ClientV2) and Hugging Face TEI: same models, limits and auth; each API's error shape.
    @api.post("/v2/embed")
    async def embed_v2(self, request: Request) -> Response:
        """Cohere v2 embed: ``embeddings`` by type (float, int8, uint8, binary, ubinary, base64)."""
        return await self._guard("/v2/embed", request, lambda: cohere_api.embed(self, request), cohere_api.error)

    @api.post("/v2/rerank")
    async def rerank_v2(self, request: Request) -> Response:
        """Cohere v2 rerank: ``results`` of ``index`` and ``relevance_score`` (sigmoid), best first."""
        return await self._guard("/v2/rerank", request, lambda: cohere_api.rerank(self, request), cohere_api.error)

    @api.post("/embed")
    async def embed_tei(self, request: Request) -> Response:
        """TEI embed: a list of vectors, one per input."""
        return await self._guard("/embed", request, lambda: tei_api.embed(self, request), tei_api.error)

    @api.post("/embed_sparse")
    async def embed_sparse_tei(self, request: Request) -> Response:
        """TEI sparse embed (BGE-M3 lexical weights): per input a list of ``{index: token id, value}``."""
        return await self._guard("/embed_sparse", request, lambda: tei_api.embed_sparse(self, request), tei_api.error)

    @api.post("/rerank")
    async def rerank_tei(self, request: Request) -> Response:
        """TEI rerank: ``[{index, score, text?}]`` sorted by score, highest first."""
        return await self._guard("/rerank", request, lambda: tei_api.rerank(self, request), tei_api.error)

    @api.get("/v1/models")
    async def models(self, request: Request) -> Response:
        return await self._guard("/v1/models", request, self._models)

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request) -> Response:
        return await self._guard("/openapi.json", request, lambda: _openapi(request))

    @api.get("/docs", include_in_schema=False)
    async def docs(self, request: Request) -> Response:
        """Swagger UI; with auth on, the browser must send the token for /openapi.json too."""
        return await self._guard("/docs", request, lambda: _docs(request))

    @api.get("/health")
    async def health(self) -> dict[str, Any]:
        """Liveness of the ingress (no auth: load balancers probe it)."""
        return {"status": "ok", "models": {k: list(v) for k, v in self.handles.items()}}
