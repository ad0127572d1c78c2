"""Bounded fuzz run against the Serve app on loopback: malformed bodies at every route, no 5xx allowed.

    python benchmarks/fuzz_serve.py --requests 3000 --json benchmarks/results/fuzz_serve.json

Starts a local Ray and the app of ``jobs/serve.py`` on 127.0.0.1 with bearer-token auth on and small
limits: the bundled MiniLM, a tiny random BGE-M3 (dense / sparse / ColBERT) and a tiny random
reranker built as the tests build them. Then sends a fixed number of requests (seeded; ``--clients``
at once, so valid and invalid requests share batches), each one of: random bytes; a valid body cut
short; a valid body with one field replaced by a wrong type, an out-of-range number, a huge integer,
a lone surrogate, a NUL, a text over the limits, too many inputs; invalid UTF-8; JSON nested 10-100k
deep; a body over ``max_body_bytes``; a missing or wrong token. Prints the count per status, the 5xx
count (must be 0), whether any body leaked a traceback or a server path, and checks that the server
still answers a valid request with the vectors it gave before the run.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

API_KEY = "fuzz-token"
LIMITS = {"max_inputs_per_request": 32, "max_chars_per_input": 2000, "max_body_bytes": 256 * 1024,
          "max_response_floats": 50_000}
ROUTES = ["/v1/embeddings", "/v1/embeddings/sparse", "/v1/embeddings/colbert", "/v1/rerank"]
WORDS = "the of retrieval passage query model vector ranking bge paris water energy light".split()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def valid_body(route: str, rng: random.Random) -> dict:
    def text() -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30)))

    if route == "/v1/rerank":
        return {"query": text(), "documents": [text() for _ in range(rng.randint(1, 6))], "top_n": 3,
                "model": "bge-reranker-tiny"}
    body = {"input": [text() for _ in range(rng.randint(1, 6))]}
    if route != "/v1/embeddings" or rng.random() < 0.3:
        body["model"] = "bge-m3-tiny"
    if rng.random() < 0.3:
        body["input_type"] = "query"
    return body


def bad_value(rng: random.Random):
    return rng.choice([
        None, True, -1, 0, 2**70, 1e308, -0.0, "", "x" * 5000, "\ud800", "a\x00b", "\U0001F600" * 100,
        [], [None], [[["deep"]]], {}, {"text": 3}, {"$ref": "#"}, ["\udfff"], ["ok"] * 100, 3.5, "NaN",
    ])


def mutate(route: str, rng: random.Random) -> tuple[bytes, dict]:
    """One malformed request: (body bytes, extra headers)."""
    kind = rng.randrange(12)
    body = valid_body(route, rng)
    raw = json.dumps(body).encode()
    headers: dict = {}
    if kind == 0:
        raw = bytes(rng.randrange(256) for _ in range(rng.randint(0, 2000)))
    elif kind == 1:
        raw = raw[: rng.randrange(max(1, len(raw)))]
    elif kind in (2, 3, 4):
        key = rng.choice([*body, "input", "query", "documents", "top_n", "dimensions", "encoding_format",
                          "return_documents", "normalize", "return_tokens", "user"])
        body[key] = bad_value(rng)
        raw = json.dumps(body).encode()
    elif kind == 5:
        raw = raw.replace(b'"', b'"\xff\xfe', 1) if rng.random() < 0.5 else b'{"input": "\xc3\x28"}'
    elif kind == 6:
        depth = rng.choice([1000, 10_000, 100_000])
        raw = rng.choice([b"[" * depth + b"]" * depth, b'{"input": ' + b"[" * depth, b'{"a":' * depth])
    elif kind == 7:
        raw = b'{"input": "' + b"x" * (LIMITS["max_body_bytes"] + rng.randint(1, 10_000)) + b'"}'
    elif kind == 8:
        headers["Authorization"] = rng.choice(["", "Bearer", "Bearer wrong", f"Basic {API_KEY}", "Bearer " + "x" * 5000])
    elif kind == 9:
        raw = b'{"input": 1' + b"0" * rng.choice([100, 5000, 50_000]) + b"}"
    elif kind == 10:
        raw = json.dumps({**body, "input": body.get("input", ["x"]), "extra": {"nested": [1, 2, {"x": None}]}}).encode()
        raw = raw.replace(b"}", b', "input": 7}', 1)  # a duplicate key
    else:
        headers["Content-Type"] = rng.choice(["text/plain", "application/x-www-form-urlencoded", "", "application/json; charset=latin-1"])
    return raw, headers


def send(url: str, raw: bytes | None, headers: dict, method: str = "POST") -> tuple[int, bytes]:
    h = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}
    h.update(headers)
    h = {k: v for k, v in h.items() if v != ""}
    req = urllib.request.Request(url, data=raw, headers=h, method=method)
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()
    except (ConnectionResetError, BrokenPipeError, urllib.error.URLError) as err:
        # A body over the limit may be answered (413) and the connection closed before it is all sent.
        return -1, repr(err).encode()


def leaks(body: bytes) -> bool:
    text = body.decode("utf-8", "replace")
    return "Traceback" in text or 'File "/' in text or "site-packages" in text


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()

    import numpy as np
    import ray
    from ray import serve

    from bge_ray.batch.runtime import init_ray
    from bge_ray.serve.app import build_app
    from tests import tiny_models

    tmp = Path(tempfile.mkdtemp(prefix="bge_ray_fuzz_"))
    tok = tmp / "tokenizer"
    tiny_models.build_unigram_tokenizer(tok)
    m3 = tiny_models.build_m3(tmp / "bge-m3-tiny", tok)
    reranker = tiny_models.build_xlmr_reranker(tmp / "bge-reranker-tiny", tok)

    import os

    os.environ["BGE_RAY_FUZZ_KEY"] = API_KEY
    init_ray(None)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    replica = {"num_cpus": 0.25, "torch_threads": 1, "batch_wait_timeout_s": 0.01}
    app = build_app({
        "embedders": [{"model": "bundled", **replica}, {"model": str(m3), "name": "bge-m3-tiny", **replica}],
        "rerankers": [{"model": str(reranker), **replica}],
        "limits": LIMITS, "api_key_env": "BGE_RAY_FUZZ_KEY",
        "ingress_ray_actor_options": {"runtime_env": {"env_vars": {"BGE_RAY_FUZZ_KEY": API_KEY}}},
    })
    serve.run(app, name="fuzz", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    probe = json.dumps({"input": ["fuzz probe text", "another one"]}).encode()
    status, before = send(url + "/v1/embeddings", probe, {})
    assert status == 200, before

    rng = random.Random(args.seed)
    work = []
    for _ in range(args.requests):
        if rng.random() < 0.1:
            work.append((rng.choice(["/v1/models", "/openapi.json", "/docs", "/health"]), None, {}, "GET"))
        elif rng.random() < 0.15:
            route = rng.choice(ROUTES)
            work.append((route, json.dumps(valid_body(route, rng)).encode(), {}, "POST"))
        else:
            route = rng.choice(ROUTES)
            work.append((route, *mutate(route, rng), "POST"))

    started = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        got = list(pool.map(lambda w: (w[0], *send(url + w[0], w[1], w[2], w[3])), work))
    seconds = time.perf_counter() - started

    statuses = Counter(s for _, s, _ in got)
    server_errors = [(r, s, b[:300].decode("utf-8", "replace")) for r, s, b in got if s >= 500]
    leaked = [(r, s, b[:300].decode("utf-8", "replace")) for r, s, b in got if leaks(b)]
    status, after = send(url + "/v1/embeddings", probe, {})
    same = status == 200 and np.allclose(
        [d["embedding"] for d in json.loads(after)["data"]], [d["embedding"] for d in json.loads(before)["data"]], atol=1e-6)
    report = {
        "requests": len(work), "clients": args.clients, "seed": args.seed, "seconds": round(seconds, 2),
        "requests_per_s": round(len(work) / seconds, 1), "statuses": dict(sorted(statuses.items())),
        "server_errors": len(server_errors), "server_error_examples": server_errors[:5],
        "bodies_with_a_trace": len(leaked), "still_answers_with_the_same_vectors": bool(same), "limits": LIMITS,
    }
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    serve.shutdown()
    ray.shutdown()
    return 0 if not server_errors and not leaked and same else 1


if __name__ == "__main__":
    sys.exit(main())
