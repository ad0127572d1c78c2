"""Ray Serve application: OpenAI / Cohere-compatible routes against FlagEmbedding (oracle) and bge_ray.

Two Serve applications per module on 127.0.0.1, small limits and bearer-token auth on in both (every
request below sends the token unless it tests its absence): at / the bundled MiniLM, a tiny M3 with a
query instruction and Matryoshka on and a tiny reranker, each its own deployment behind the ingress;
at /colo the bundled MiniLM alone, colocated in the ingress with two model threads (tests taking
``layout`` run on both).
"""

from __future__ import annotations

import base64
import json
import socket
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from bge_ray.models.loading import bundled_model_path

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TEXTS = [
    "The capital of France is Paris.",
    "what is the boiling point of water at sea level",
    "Photosynthesis converts light energy into chemical energy in plants, releasing oxygen.",
    "short",
]
M3_INSTRUCTION = "Represent this query for retrieval: "
API_KEY = "s3cret-token"
MAX_INPUTS, MAX_CHARS = 16, 2000
MAX_BODY, MAX_FLOATS = 256 * 1024, 20_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Quarter CPUs: the replicas of both apps fit beside whatever else the session's 2-CPU Ray holds.
REPLICA = {"num_cpus": 0.25, "torch_threads": 1, "batch_wait_timeout_s": 0.05}
LIMITS = {"max_inputs_per_request": MAX_INPUTS, "max_chars_per_input": MAX_CHARS, "max_body_bytes": MAX_BODY,
          "max_response_floats": MAX_FLOATS}
# The key lives in the ingress replica's environment, as it would on a cluster.
AUTH_ARGS = {
    "api_key_env": "BGE_RAY_TEST_KEY",
    "ingress_ray_actor_options": {"runtime_env": {"env_vars": {"BGE_RAY_TEST_KEY": API_KEY}}},
}


@pytest.fixture(scope="module")
def serve_url(ray_local):
    from ray import serve

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def server(serve_url, tiny_m3, tiny_xlmr_reranker):
    from ray import serve

    from bge_ray.serve.app import build_app

    embedders = [
        {"model": "bundled", **REPLICA},
        {"model": str(tiny_m3), "name": "bge-m3-tiny", "query_instruction": M3_INSTRUCTION, "matryoshka": True, **REPLICA},
    ]
    rerankers = [{"model": str(tiny_xlmr_reranker), **REPLICA}]
    app = build_app({"embedders": embedders, "rerankers": rerankers, "limits": LIMITS, **AUTH_ARGS})
    serve.run(app, name="bge_test", route_prefix="/")
    return serve_url


@pytest.fixture(scope="module")
def colocated(serve_url):
    from ray import serve

    from bge_ray.serve.app import build_app

    # Two model threads on one request queue: concurrent batches share the weights.
    app = build_app({"embedders": [{"model": "bundled", **REPLICA, "model_threads": 2}], "limits": LIMITS, **AUTH_ARGS})
    serve.run(app, name="bge_test_colocated", route_prefix="/colo")
    return serve_url + "/colo"


@pytest.fixture(scope="module", params=["2-hop", "colocated"])
def layout(request):
    """The URL of each app in turn: its model in its own deployment, or inside the ingress."""
    return request.getfixturevalue("server" if request.param == "2-hop" else "colocated")


AUTH = {"Authorization": f"Bearer {API_KEY}"}


def call(url: str, body=None, headers: dict | None = None):
    """(status, headers, parsed JSON body); ``body`` bytes are sent as they are; ``headers`` default
    to the bearer token."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    headers = AUTH if headers is None else headers
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), json.loads(err.read())


# -- oracles --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm_oracle():
    from FlagEmbedding import FlagModel as OracleModel

    return OracleModel(bundled_model_path(), pooling_method="mean", use_fp16=False, devices="cpu")


@pytest.fixture(scope="module")
def m3_oracle(tiny_m3):
    from FlagEmbedding import BGEM3FlagModel as OracleM3

    return OracleM3(str(tiny_m3), use_fp16=False, devices="cpu", query_instruction_for_retrieval=M3_INSTRUCTION)


# -- embeddings -----------------------------------------------------------------------------------


def test_openai_client_gets_flagmodel_vectors(layout, minilm_oracle):
    import openai

    from bge_ray import FlagModel

    client = openai.OpenAI(base_url=layout + "/v1", api_key=API_KEY)  # sent as the bearer token
    resp = client.embeddings.create(model="all-MiniLM-L6-v2", input=TEXTS, encoding_format="float")
    got = np.array([d.embedding for d in sorted(resp.data, key=lambda d: d.index)], dtype=np.float32)
    ours = FlagModel(None, pooling_method="mean", use_fp16=False, devices="cpu")
    want = ours.encode(TEXTS)
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(got, minilm_oracle.encode(TEXTS), atol=1e-5)
    assert resp.model == "all-MiniLM-L6-v2"
    tokens = sum(len(x) for x in ours.tokenizer(TEXTS)["input_ids"])
    assert resp.usage.prompt_tokens == resp.usage.total_tokens == tokens

    # One string in, one vector out; the bundled model answers to its hub id too.
    one = client.embeddings.create(model="sentence-transformers/all-MiniLM-L6-v2", input=TEXTS[0])
    np.testing.assert_allclose(one.data[0].embedding, want[0], atol=1e-5)


def test_base64_is_little_endian_float32_of_the_floats(server):
    body = {"input": TEXTS, "model": "all-MiniLM-L6-v2"}
    status, _, floats = call(server + "/v1/embeddings", {**body, "encoding_format": "float"})
    assert status == 200
    status, _, b64 = call(server + "/v1/embeddings", {**body, "encoding_format": "base64"})
    assert status == 200
    for f, b in zip(floats["data"], b64["data"], strict=True):
        decoded = np.frombuffer(base64.b64decode(b["embedding"]), dtype="<f4")
        np.testing.assert_array_equal(decoded, np.array(f["embedding"], dtype=np.float32))


def test_query_input_type_applies_the_model_instruction(server, m3_oracle, tiny_m3):
    from bge_ray import BGEM3FlagModel

    ours = BGEM3FlagModel(str(tiny_m3), use_fp16=False, devices="cpu", query_instruction_for_retrieval=M3_INSTRUCTION)
    status, _, q = call(server + "/v1/embeddings", {"input": TEXTS, "model": "bge-m3-tiny", "input_type": "query"})
    assert status == 200
    status, _, d = call(server + "/v1/embeddings", {"input": TEXTS, "model": "bge-m3-tiny"})
    assert status == 200
    q = np.array([x["embedding"] for x in q["data"]])
    d = np.array([x["embedding"] for x in d["data"]])
    np.testing.assert_allclose(q, m3_oracle.encode_queries(TEXTS)["dense_vecs"], atol=1e-5)
    np.testing.assert_allclose(q, ours.encode_queries(TEXTS)["dense_vecs"], atol=1e-5)
    np.testing.assert_allclose(d, m3_oracle.encode_corpus(TEXTS)["dense_vecs"], atol=1e-5)
    assert np.abs(q - d).max() > 1e-3  # the instruction changed the query vectors

    # Matryoshka on for this model: truncate, then renormalise.
    status, _, short = call(server + "/v1/embeddings", {"input": TEXTS, "model": "bge-m3-tiny", "dimensions": 16})
    assert status == 200
    want = d[:, :16] / np.linalg.norm(d[:, :16], axis=1, keepdims=True)
    np.testing.assert_allclose(np.array([x["embedding"] for x in short["data"]]), want, atol=1e-5)


def test_m3_sparse_and_colbert_match_bgem3flagmodel(server, m3_oracle):
    want = m3_oracle.encode_corpus(TEXTS, return_dense=False, return_sparse=True, return_colbert_vecs=True)
    status, _, sparse = call(server + "/v1/embeddings/sparse", {"input": TEXTS, "model": "bge-m3-tiny", "return_tokens": True})
    assert status == 200, sparse
    assert sparse["usage"]["prompt_tokens"] > 0
    for item, lexical in zip(sparse["data"], want["lexical_weights"], strict=True):
        got = dict(zip(map(str, item["indices"]), item["values"], strict=True))
        assert got.keys() == lexical.keys()
        np.testing.assert_allclose([got[k] for k in lexical], [float(v) for v in lexical.values()], atol=1e-5)
        assert len(item["tokens"]) == len(item["indices"])

    status, _, colbert = call(server + "/v1/embeddings/colbert", {"input": TEXTS, "model": "bge-m3-tiny"})
    assert status == 200, colbert
    for item, vecs in zip(colbert["data"], want["colbert_vecs"], strict=True):
        assert tuple(item["shape"]) == vecs.shape
        np.testing.assert_allclose(np.array(item["embedding"]), vecs, atol=1e-5)
    status, _, b64 = call(
        server + "/v1/embeddings/colbert", {"input": TEXTS[:1], "model": "bge-m3-tiny", "encoding_format": "base64"}
    )
    assert status == 200
    decoded = np.frombuffer(base64.b64decode(b64["data"][0]["embedding"]), "<f4").reshape(b64["data"][0]["shape"])
    np.testing.assert_allclose(decoded, want["colbert_vecs"][0], atol=1e-5)

    # Query side: the instruction applies to lexical weights too.
    q = m3_oracle.encode_queries(TEXTS[:2], return_dense=False, return_sparse=True)["lexical_weights"]
    status, _, sq = call(
        server + "/v1/embeddings/sparse", {"input": TEXTS[:2], "model": "bge-m3-tiny", "input_type": "query"}
    )
    assert [set(map(str, x["indices"])) for x in sq["data"]] == [set(w) for w in q]


# -- rerank ---------------------------------------------------------------------------------------


def test_rerank_orders_as_flagreranker(server, tiny_xlmr_reranker):
    from FlagEmbedding import FlagReranker as OracleReranker

    from bge_ray import FlagReranker

    query = "what is photosynthesis"
    docs = TEXTS + ["Plants use sunlight, water and carbon dioxide to make sugar."]
    raw_oracle = np.array(OracleReranker(str(tiny_xlmr_reranker), use_fp16=False, devices="cpu").compute_score(
        [[query, d] for d in docs]
    ))
    raw_ours = np.array(FlagReranker(str(tiny_xlmr_reranker), use_fp16=False, devices="cpu").compute_score(
        [[query, d] for d in docs]
    ))
    np.testing.assert_allclose(raw_ours, raw_oracle, atol=1e-4)
    sent = [d if i % 2 else {"text": d} for i, d in enumerate(docs)]  # strings and Cohere-style objects
    status, headers, body = call(server + "/v1/rerank", {"query": query, "documents": sent, "return_documents": True})
    assert status == 200, body
    order = [r["index"] for r in body["results"]]
    assert order == list(np.argsort(-raw_oracle, kind="stable"))
    scores = [r["relevance_score"] for r in body["results"]]
    np.testing.assert_allclose(scores, 1 / (1 + np.exp(-raw_oracle[order])), atol=1e-5)
    assert scores == sorted(scores, reverse=True)
    assert [r["document"]["text"] for r in body["results"]] == [docs[i] for i in order]
    assert body["usage"]["total_tokens"] > 0 and "x-batch-requests" in {k.lower() for k in headers}

    status, _, top = call(server + "/v1/rerank", {"query": query, "documents": docs, "top_n": 2, "normalize": False})
    assert status == 200
    assert [r["index"] for r in top["results"]] == order[:2]
    np.testing.assert_allclose([r["relevance_score"] for r in top["results"]], raw_oracle[order[:2]], atol=1e-4)
    assert all("document" not in r for r in top["results"])


# -- batching, discovery --------------------------------------------------------------------------


def test_concurrent_requests_share_a_batch(layout):
    n = 8
    start = threading.Barrier(n)

    def one(i: int):
        start.wait()
        status, headers, body = call(layout + "/v1/embeddings", {"input": [f"{TEXTS[i % 4]} #{i}"] * 2})
        assert status == 200, body
        return int({k.lower(): v for k, v in headers.items()}["x-batch-requests"])

    with ThreadPoolExecutor(n) as pool:
        sizes = list(pool.map(one, range(n)))
    assert max(sizes) > 1, f"no two of {n} concurrent requests were batched together: {sizes}"


def test_model_threads_keep_each_request_its_own_vectors_and_counts(colocated):
    """Two model calls at once on shared weights: every request still gets its own texts' vectors and
    token count (each thread has its own tokenizer and per-call fields)."""
    from bge_ray import FlagModel

    ours = FlagModel(None, pooling_method="mean", use_fp16=False, devices="cpu")
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    bodies = [[" ".join(words[: 1 + (i * 7 + j) % 10]) + f" #{i}.{j}" for j in range(1 + i % 3)] for i in range(24)]
    start = threading.Barrier(12)

    def one(texts):
        try:
            start.wait(timeout=30)
        except threading.BrokenBarrierError:
            pass
        status, headers, body = call(colocated + "/v1/embeddings", {"input": texts})
        assert status == 200, body
        return texts, body

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(one, bodies))
    for texts, body in answers:
        got = np.array([d["embedding"] for d in sorted(body["data"], key=lambda d: d["index"])], dtype=np.float32)
        np.testing.assert_allclose(got, ours.encode(texts), atol=1e-5)
        assert body["usage"]["prompt_tokens"] == sum(len(x) for x in ours.tokenizer(texts)["input_ids"])


def test_thread_handles_share_weights_not_tokenizers():
    from bge_ray import FlagModel
    from bge_ray.serve.deployments import _thread_handles

    model = FlagModel(None, pooling_method="mean", use_fp16=False, devices="cpu")
    a, b = _thread_handles(model, 2)
    assert a is model and b.model is model.model
    assert b.tokenizer is not model.tokenizer
    b.last_token_counts = [1]
    assert getattr(model, "last_token_counts", None) != [1]
    with ThreadPoolExecutor(2) as pool:
        short, long_ = pool.map(lambda h_len: h_len[0].encode_corpus(TEXTS * 8, max_length=h_len[1]), [(a, 4), (b, 64)])
    np.testing.assert_allclose(short, model.encode_corpus(TEXTS * 8, max_length=4), atol=1e-5)
    np.testing.assert_allclose(long_, model.encode_corpus(TEXTS * 8, max_length=64), atol=1e-5)


def test_models_and_health(server, tiny_m3):
    status, _, models = call(server + "/v1/models")
    assert status == 200
    assert str(tiny_m3) not in json.dumps(models)  # served from a folder: the folder stays on the server
    cards = {m["id"]: m for m in models["data"]}
    assert cards["all-MiniLM-L6-v2"]["capabilities"] == ["dense"] and cards["all-MiniLM-L6-v2"]["dimensions"] == 384
    assert set(cards["bge-m3-tiny"]["capabilities"]) == {"dense", "sparse", "colbert"}
    assert cards["bge-reranker-tiny"]["kind"] == "reranker"
    status, _, health = call(server + "/health")
    assert status == 200 and health["status"] == "ok"


# -- bad requests ---------------------------------------------------------------------------------

BAD = [
    ("/v1/embeddings", {"input": ""}, 400, "empty string"),
    ("/v1/embeddings", {"input": []}, 400, "empty list"),
    ("/v1/embeddings", {"input": 42}, 400, "expected a string"),
    ("/v1/embeddings", {"input": ["ok", 3]}, 400, "input[1]"),
    ("/v1/embeddings", {"input": [101, 2023, 102]}, 400, "token-id arrays"),
    ("/v1/embeddings", {"input": [[101, 2023]]}, 400, "token-id arrays"),
    ("/v1/embeddings", {}, 400, "input"),
    ("/v1/embeddings", {"input": ["x"] * (MAX_INPUTS + 1)}, 400, "max_inputs_per_request"),
    ("/v1/embeddings", {"input": ["ok", "y" * (MAX_CHARS + 1)]}, 400, "max_chars_per_input"),
    ("/v1/embeddings", {"input": "x", "model": "no-such-model"}, 404, "not served"),
    ("/v1/embeddings", {"input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
    ("/v1/embeddings", {"input": "x", "dimensions": 100}, 400, "Matryoshka"),
    ("/v1/embeddings", {"input": "x", "dimensions": 0}, 400, "dimensions"),
    ("/v1/embeddings", {"input": "x", "model": "bge-m3-tiny", "dimensions": 64}, 400, "more than"),
    ("/v1/embeddings", {"input": "x", "input_type": "bogus"}, 400, "input_type"),
    ("/v1/embeddings", b'{"input": ["unterminated', 400, "malformed JSON"),
    ("/v1/embeddings", b"", 400, "empty"),
    ("/v1/embeddings", b'["a", "b"]', 400, "JSON object"),
    ("/v1/embeddings", b'{"input": ' + b"[" * 10_000 + b"]" * 10_000 + b"}", 400, "nested too deeply"),
    ("/v1/embeddings", b"[" * 10_000, 400, "nested too deeply"),
    ("/v1/embeddings", b'{"input": "x", "dimensions": 1' + b"0" * 5000 + b"}", 400, "malformed JSON"),
    ("/v1/embeddings", {"input": ["ok", "\ud800"]}, 400, "input[1] is not valid Unicode"),
    ("/v1/rerank", {"query": "q\udfff", "documents": ["a"]}, 400, "lone surrogate U+DFFF"),
    ("/v1/embeddings/sparse", {"input": "x", "model": "all-MiniLM-L6-v2"}, 400, "no sparse output"),
    ("/v1/embeddings/colbert", {"input": "x"}, 400, "no colbert output"),
    ("/v1/rerank", {"documents": ["a"]}, 400, "query"),
    ("/v1/rerank", {"query": "q", "documents": []}, 400, "empty list"),
    ("/v1/rerank", {"query": "q", "documents": [{"title": "no text"}]}, 400, "documents[0]"),
    ("/v1/rerank", {"query": "q", "documents": ["a"], "top_n": 0}, 400, "top_n"),
    ("/v1/rerank", {"query": "q" * (MAX_CHARS + 1), "documents": ["a"]}, 400, "max_chars_per_input"),
    ("/v1/rerank", {"query": "q", "documents": ["a"] * (MAX_INPUTS + 1)}, 400, "max_inputs_per_request"),
    ("/v1/rerank", {"query": "q", "documents": ["a"], "model": "all-MiniLM-L6-v2"}, 404, "not served"),
    ("/v1/nope", {"input": "x"}, 404, "Not Found"),
]


@pytest.mark.parametrize("path,body,status,needle", BAD, ids=[f"{p}:{n}" for p, _, _, n in BAD])
def test_bad_request_gets_a_clear_4xx(server, path, body, status, needle):
    got, _, err = call(server + path, body)
    assert got == status, err
    assert set(err["error"]) == {"message", "type", "param", "code"}
    assert needle in err["error"]["message"], err


def _raw_http(url: str, head: str, body_parts, timeout: float = 60) -> tuple[int, dict]:
    """POST over a plain socket: ``head`` (request line and headers), then ``body_parts`` as long as the
    server reads them; the status and JSON body of whatever it answers."""
    host_port, _, path = url.removeprefix("http://").partition("/")
    host, port = host_port.split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(head.replace("PATH", "/" + path).encode())
        try:
            for part in body_parts:
                sock.sendall(part)
        except (BrokenPipeError, ConnectionResetError):
            pass  # answered and closed before the body was all sent
        data = b""
        while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < _content_length(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, json.loads(data.partition(b"\r\n\r\n")[2] or b"{}")


def _content_length(data: bytes) -> int:
    for line in data.partition(b"\r\n\r\n")[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def test_a_50mb_body_is_refused_before_it_is_read(server):
    size = 50 * 1024 * 1024
    head = (f"POST PATH HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {size}\r\n\r\n")
    # 64 KiB of the 50 MB sent, then the client waits: the answer must come from the Content-Length.
    status, err = _raw_http(server + "/v1/embeddings", head, [b'{"input": "' + b"x" * 65_000])
    assert status == 413, err
    assert "max_body_bytes" in err["error"]["message"] and str(size) in err["error"]["message"]
    # Without a Content-Length the body is counted as it streams in: refused once past the limit.
    head = head.replace(f"Content-Length: {size}", "Transfer-Encoding: chunked")
    chunk = b"x" * 65_536
    parts = (b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(size // len(chunk)))
    status, err = _raw_http(server + "/v1/embeddings", head, parts)
    assert status == 413 and "max_body_bytes" in err["error"]["message"], err
    assert call(server + "/v1/embeddings", {"input": "still serving"})[0] == 200


def test_a_lone_surrogate_fails_its_own_request_not_its_batch_mates(layout):
    bodies = [{"input": [f"request {i} text", "more text"]} for i in range(6)]
    bodies[2] = {"input": ["fine", "broken \ud800 text"]}
    with ThreadPoolExecutor(len(bodies)) as pool:
        got = list(pool.map(lambda b: call(layout + "/v1/embeddings", b), bodies))
    statuses = [g[0] for g in got]
    assert statuses == [200, 200, 400, 200, 200, 200], [g[2] for g in got]
    assert "input[1] is not valid Unicode" in got[2][2]["error"]["message"]
    shared = [int({k.lower(): v for k, v in g[1].items()}["x-batch-requests"]) for g in got if g[0] == 200]
    assert max(shared) >= 2, shared  # they did share batches


def test_colbert_response_over_the_limit_is_a_413(server):
    body = {"input": [" ".join(f"w{i}" for i in range(200))] * MAX_INPUTS, "model": "bge-m3-tiny"}
    status, _, err = call(server + "/v1/embeddings/colbert", body)
    assert status == 413, err
    assert "max_response_floats" in err["error"]["message"] and str(MAX_FLOATS) in err["error"]["message"]
    status, _, ok = call(server + "/v1/embeddings/colbert", {"input": TEXTS[:2], "model": "bge-m3-tiny"})
    assert status == 200 and len(ok["data"]) == 2


def test_server_errors_name_a_request_id_not_the_exception():
    from bge_ray.serve.ingress import Ingress

    class Counter:
        def inc(self, **_):
            pass

    ingress = object.__new__(Ingress.func_or_class)
    ingress.api_key, ingress._m_requests = None, Counter()

    class FakeRequest:
        headers: dict = {}

    async def boom():
        raise RuntimeError('Traceback (most recent call last):\n  File "/secret/path.py", line 1')

    import asyncio

    response = asyncio.run(ingress._guard("/v1/embeddings", FakeRequest(), boom))
    body = json.loads(response.body)
    assert response.status_code == 500 and "request id" in body["error"]["message"]
    assert "Traceback" not in response.body.decode() and "/secret" not in response.body.decode()


def test_every_route_but_health_needs_the_token(server):
    status, _, spec = call(server + "/openapi.json")
    assert status == 200
    routes = [(path, method.upper()) for path, ops in spec["paths"].items() for method in ops]
    routes += [("/docs", "GET"), ("/openapi.json", "GET")]
    assert {"/v1/embeddings", "/v1/rerank", "/v1/models", "/health"} <= {p for p, _ in routes}
    for path, method in routes:
        req = urllib.request.Request(server + path, data=b"{}" if method == "POST" else None, method=method)
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                status = resp.status
        except urllib.error.HTTPError as err:
            status = err.code
        assert status == (200 if path == "/health" else 401), (path, method, status)
    req = urllib.request.Request(server + "/docs", headers=AUTH)
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.status == 200 and b"swagger" in resp.read().lower()


def test_each_layout_rejects_before_the_model(layout):
    status, _, err = call(layout + "/v1/embeddings", {"input": ["x"] * (MAX_INPUTS + 1)})
    assert status == 400 and "max_inputs_per_request" in err["error"]["message"]
    assert call(layout + "/v1/embeddings", {"input": "x"}, headers={})[0] == 401
    status, _, err = call(layout + "/v1/rerank", {"query": "q", "documents": ["a"]})
    assert status == 404 if layout.endswith("/colo") else status == 200, err


def test_replica_serves_after_bad_requests(server):
    for path, body, _, _ in BAD[:6]:
        call(server + path, body)
    status, _, body = call(server + "/v1/embeddings", {"input": TEXTS})
    assert status == 200 and len(body["data"]) == len(TEXTS)
    status, _, body = call(server + "/v1/rerank", {"query": "q", "documents": TEXTS})
    assert status == 200 and len(body["results"]) == len(TEXTS)


def test_bearer_token_auth(server):
    url = server + "/v1/embeddings"
    status, _, err = call(url, {"input": "x"}, headers={})
    assert status == 401 and "missing bearer token" in err["error"]["message"]
    assert err["error"]["type"] == "authentication_error"
    status, _, err = call(url, {"input": "x"}, {"Authorization": "Bearer wrong"})
    assert status == 401 and "invalid bearer token" in err["error"]["message"]
    status, _, err = call(server + "/v1/rerank", {"query": "q", "documents": ["a"]}, {"Authorization": API_KEY})
    assert status == 401  # the scheme is required
    # Auth comes before parsing: a bad body without a token is still a 401.
    assert call(url, b"{not json", headers={})[0] == 401
    assert call(server + "/v1/models", headers={})[0] == 401
    assert call(server + "/health", headers={})[0] == 200  # load balancers probe it without a token
    status, _, body = call(url, {"input": ["x", "y"]})
    assert status == 200 and len(body["data"]) == 2


def test_no_key_configured_means_no_auth():
    from bge_ray.serve.limits import ApiError, check_bearer

    check_bearer(None, None)
    check_bearer("Bearer anything", None)
    check_bearer("bearer k", "k")
    with pytest.raises(ApiError, match="invalid"):
        check_bearer("Basic k", "k")


# -- settings (no Serve needed) -------------------------------------------------------------------


def test_settings_shorthand_and_errors():
    from pydantic import ValidationError

    from bge_ray.serve.config import AppSettings

    s = AppSettings.from_args({"model": "bundled", "reranker": "/models/bge-reranker-v2-m3"})
    assert s.embedders[0].served_name == "all-MiniLM-L6-v2"
    assert s.rerankers[0].served_name == "bge-reranker-v2-m3"
    assert s.embedders[0].ongoing_requests == 2 * s.embedders[0].max_batch_size
    planned = AppSettings.from_args({"model": "bundled", "reranker": "/m/rr"}).with_cpu_plan(2)
    # One replica per model, a single-threaded model call per core from its one queue, a request per call.
    assert [
        (m.num_replicas, m.model_threads, m.torch_threads, m.num_cpus, m.max_batch_size)
        for m in [*planned.embedders, *planned.rerankers]
    ] == [(1, 2, 1, 1.0, 1), (1, 2, 1, 1.0, 1)]
    kept = AppSettings.from_args({"embedders": [{"model": "bundled", "max_batch_size": 8}]}).with_cpu_plan(2)
    assert (kept.embedders[0].model_threads, kept.embedders[0].max_batch_size) == (2, 8)
    sized = AppSettings.from_args({"embedders": [{"model": "bundled", "num_replicas": 1}]}).with_cpu_plan(2)
    assert sized.embedders[0].num_replicas == 1 and sized.embedders[0].torch_threads is None
    with pytest.raises(ValidationError, match="max_batch_sise"):
        AppSettings.from_args({"embedders": [{"model": "bundled", "max_batch_sise": 4}]})
    assert s.colocate is None and not s.colocated and AppSettings.from_args({"model": "bundled"}).colocated
    with pytest.raises(ValidationError, match="exactly one model"):
        AppSettings.from_args({"model": "bundled", "reranker": "/m/rr", "colocate": True})
    with pytest.raises(ValidationError, match="distinct"):
        AppSettings.from_args({"embedders": [{"model": "/a/m"}, {"model": "/b/m"}]})


def test_job_script_builds_settings_from_flags(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "jobs" / "serve.py"
    spec = importlib.util.spec_from_file_location("serve_job", path)
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    s = job.settings_from(job.parse_args([]))
    assert [e.served_name for e in s.embedders] == ["all-MiniLM-L6-v2"] and not s.rerankers
    args = job.parse_args(["--reranker", "/m/rr", "--max-batch-size", "4", "--batch-wait-ms", "20", "--max-inputs", "8"])
    s = job.settings_from(args)
    assert s.rerankers[0].max_batch_size == 4 and s.embedders[0].batch_wait_timeout_s == 0.02
    assert s.limits.max_inputs_per_request == 8 and s.colocate is None
    assert not job.settings_from(job.parse_args(["--colocate", "off"])).colocated
    config = Path(__file__).resolve().parents[1] / "bge_ray" / "serve" / "serve_config.yaml"
    s = job.settings_from(job.parse_args(["--config", str(config), "--port", "9000"]))
    assert s.embedders[0].model == "bundled"
