"""Online embedding throughput: our Serve app vs Infinity (or a FastAPI + sentence-transformers server).

N concurrent clients (default 8) post 8 msmarco-subset passages per request for T seconds (default
60) on loopback, after a warm-up; each server runs alone, started and stopped by this script, in the
same run. Prints requests/s, passages/s, p50 and p99 latency and our/peer ratios; writes JSON.

    python benchmarks/bench_serve.py                                  # ours (default config) vs Infinity
    python benchmarks/bench_serve.py --seconds 20 --ours bs=8,threads=2 --ours bs=4,replicas=2,threads=1
    python benchmarks/bench_serve.py --ours colocate=off --ours colocate=on --rounds 2   # both layouts
    python benchmarks/bench_serve.py --peers st                       # FastAPI + sentence-transformers
    python benchmarks/bench_serve.py --sweep 4 8 12 16 --seconds 45   # throughput at equal p99

``--sweep`` runs each server once per client count (one start per server) and reads the goal "at
least the peer's throughput at equal p99" off the curves: for every client count of the peer, our
throughput interpolated at the peer's p99 there, over the peer's throughput.

Infinity 0.0.78 pins transformers 4.47, so it runs from its own virtualenv (--infinity-venv):
    python -m venv /work/infinity-venv && /work/infinity-venv/bin/pip install torch==2.13.0 \\
      && /work/infinity-venv/bin/pip install "infinity-emb[server,torch]==0.0.78" \\
      && /work/infinity-venv/bin/pip uninstall -y torchvision
The client shares the machine with the server: on a 2-core machine it costs the servers alike.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO, SHARED, load_passages  # noqa: E402

MODEL_NAME = "all-MiniLM-L6-v2"

# Short keys for --ours: each maps to a jobs/serve.py flag.
OURS_KEYS = {
    "bs": "--max-batch-size",
    "wait": "--batch-wait-ms",
    "ebs": "--encode-batch-size",
    "ongoing": "--max-ongoing-requests",
    "threads": "--torch-threads",
    "mthreads": "--model-threads",
    "replicas": "--num-replicas",
    "cpus": "--num-cpus",
    "colocate": "--colocate",  # on / off
}
DEFAULT_OURS = ""  # what `python jobs/serve.py` does with no flags


# -- servers ---------------------------------------------------------------------------------------


class Server:
    """A server process of ours to start, probe and stop (by its own pid)."""

    def __init__(self, name: str, cmd: list[str], port: int, route: str, env: dict | None = None, log: Path | None = None):
        self.name, self.cmd, self.port, self.route = name, cmd, port, route
        self.env = {**os.environ, **(env or {})}
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 600) -> float:
        t0 = time.perf_counter()
        out = open(self.log, "w") if self.log else subprocess.DEVNULL  # noqa: SIM115 - closed with the process
        # A new session: Ctrl-C on the benchmark does not hit the server before we stop it ourselves.
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        body = json.dumps({"input": ["warm up"], "model": MODEL_NAME}).encode()
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} while starting; see {self.log}")
            try:
                status, _ = post(self.port, self.route, body, timeout=30)
                if status == 200:
                    return time.perf_counter() - t0
            except OSError:
                pass
            time.sleep(1)
        self.stop()
        raise TimeoutError(f"{self.name} did not answer within {timeout} s; see {self.log}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(90)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)


def ours_server(spec: str, port: int, log: Path) -> Server:
    cmd = [sys.executable, str(REPO / "jobs" / "serve.py"), "--port", str(port)]
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        if key not in OURS_KEYS:
            raise SystemExit(f"--ours: unknown key {key!r} in {spec!r}; known: {sorted(OURS_KEYS)}")
        cmd += [OURS_KEYS[key], value]
    return Server(f"bge_ray[{spec or 'defaults'}]", cmd, port, "/v1/embeddings", log=log)


def infinity_server(venv: Path, port: int, log: Path, batch_size: int) -> Server:
    from bge_ray.models.loading import bundled_model_path

    cmd = [
        str(venv / "bin" / "infinity_emb"), "v2", "--model-id", bundled_model_path(),
        "--served-model-name", MODEL_NAME, "--engine", "torch", "--device", "cpu",
        "--batch-size", str(batch_size), "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
    ]
    # No telemetry calls from an offline machine.
    env = {"INFINITY_ANONYMOUS_USAGE_STATS": "0", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"}
    return Server("infinity", cmd, port, "/embeddings", env=env, log=log)


def st_server(port: int, log: Path) -> Server:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--st-server", "--port", str(port)]
    return Server("fastapi+sentence-transformers", cmd, port, "/v1/embeddings", log=log)


def run_st_server(port: int) -> None:
    """The plain baseline: FastAPI + uvicorn + sentence-transformers ``encode`` in one process."""
    import uvicorn
    from fastapi import FastAPI, Request
    from sentence_transformers import SentenceTransformer
    from starlette.concurrency import run_in_threadpool

    from bge_ray.models.loading import bundled_model_path

    model = SentenceTransformer(bundled_model_path(), device="cpu")
    app = FastAPI()
    lock = threading.Lock()

    def encode(texts):
        with lock:
            return model.encode(texts, batch_size=32, normalize_embeddings=True)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        body = await request.json()
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        vecs = await run_in_threadpool(encode, texts)
        return {"object": "list", "data": [{"object": "embedding", "index": i, "embedding": v.tolist()} for i, v in enumerate(vecs)]}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# -- load -----------------------------------------------------------------------------------------


def post(port: int, route: str, body: bytes, timeout: float = 300, conn: http.client.HTTPConnection | None = None):
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", route, body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, data
    finally:
        if own:
            conn.close()


def load(server: Server, passages: list[str], clients: int, seconds: float, warmup: float, per_request: int) -> dict:
    """``clients`` threads, each with a keep-alive connection, posting back to back; latencies of
    requests that start after the warm-up and finish before the end are kept."""
    bodies = [
        json.dumps({"input": passages[i : i + per_request], "model": MODEL_NAME}).encode()
        for i in range(0, len(passages) - per_request + 1, per_request)
    ]
    t_start = time.perf_counter() + warmup
    t_end = t_start + seconds
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    check: list[int] = []

    def client(c: int):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=300)
        i = c
        while True:
            t0 = time.perf_counter()
            if t0 >= t_end:
                break
            status, data = post(server.port, server.route, bodies[i % len(bodies)], conn=conn)
            t1 = time.perf_counter()
            if status != 200:
                errors[c] += 1
            elif not check:
                check.append(len(json.loads(data)["data"]))
            if t0 >= t_start and t1 <= t_end:
                latencies[c].append(t1 - t0)
            i += clients
        conn.close()

    load_start = os.getloadavg()[0]
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lat = np.array([x for per in latencies for x in per])
    if check and check[0] != per_request:
        raise RuntimeError(f"{server.name} returned {check[0]} vectors for {per_request} inputs")
    return {
        "server": server.name,
        "requests": int(len(lat)),
        "errors": int(sum(errors)),
        "requests_per_s": len(lat) / seconds,
        "passages_per_s": len(lat) * per_request / seconds,
        "p50_ms": float(np.percentile(lat, 50) * 1000) if len(lat) else None,
        "p99_ms": float(np.percentile(lat, 99) * 1000) if len(lat) else None,
        "loadavg_1m_before": load_start,
    }


def _paired_ratios(runs: list[dict], ours: list[dict], others: list[dict]) -> list[dict]:
    """Ours / peer within each round (servers of one round ran minutes apart, so they share the
    machine's mood), and the median over rounds: less flattering to either side than best-of."""
    out = []
    for o in others:
        for r in ours:
            by_round = {}
            for run in runs:
                by_round.setdefault(run["round"], {})[run["server"]] = run
            thr, p99 = [], []
            for rnd in sorted(by_round):
                a, b = by_round[rnd].get(r["server"]), by_round[rnd].get(o["server"])
                if a and b:
                    thr.append(round(a["requests_per_s"] / b["requests_per_s"], 3))
                    p99.append(round(a["p99_ms"] / b["p99_ms"], 3))
            if thr:
                out.append({"ours": r["server"], "peer": o["server"], "requests_per_s": thr, "p99": p99,
                            "median_requests_per_s": statistics.median(thr), "median_p99": statistics.median(p99)})
    return out


def throughput_at_p99(curve: list[dict], p99_ms: float) -> float | None:
    """Requests/s on ``curve`` (points of one server) at ``p99_ms``, linear between the two points
    around it; None outside the measured range."""
    pts = sorted((c["p99_ms"], c["requests_per_s"]) for c in curve)
    for (x0, y0), (x1, y1) in itertools.pairwise(pts):
        if x0 <= p99_ms <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (p99_ms - x0) / (x1 - x0)
    return None


def sweep(args, servers: list, passages: list[str]) -> int:
    curves: dict[str, list[dict]] = {}
    for rnd in range(args.rounds):
        for server in servers:
            startup = server.start()
            print(f"round {rnd + 1}: {server.name} up in {startup:.1f} s", flush=True)
            try:
                for i, clients in enumerate(args.sweep):
                    r = load(server, passages, clients, args.seconds, args.warmup if i == 0 else 5, args.per_request)
                    r.update(clients=clients, round=rnd + 1)
                    curves.setdefault(server.name, []).append(r)
                    print(f"  {clients:3d} clients  " + show(r), flush=True)
            finally:
                server.stop()
            time.sleep(3)
    compare = []
    for peer in [n for n in curves if not n.startswith("bge_ray")]:
        for ours in [n for n in curves if n.startswith("bge_ray")]:
            for pt in curves[peer]:
                mine = throughput_at_p99(curves[ours], pt["p99_ms"])
                row = {"ours": ours, "peer": peer, "clients": pt["clients"], "round": pt["round"],
                       "peer_p99_ms": pt["p99_ms"], "peer_requests_per_s": pt["requests_per_s"],
                       "ours_requests_per_s_at_that_p99": mine,
                       "ratio": None if mine is None else mine / pt["requests_per_s"]}
                compare.append(row)
                at = "outside our measured p99 range" if mine is None else f"ours {mine:.2f} req/s = x{row['ratio']:.2f}"
                print(f"{peer} at {pt['clients']} clients: {pt['requests_per_s']:.2f} req/s, p99 {pt['p99_ms']:.0f} ms; "
                      f"{ours} at that p99: {at}")
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"serve_sweep_{time.strftime('%Y%m%d_%H%M')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(), "clients": args.sweep,
            "seconds": args.seconds, "warmup_s": args.warmup, "per_request": args.per_request, "data": args.data,
            "model": MODEL_NAME, "rounds": args.rounds}
    out.write_text(json.dumps({"meta": meta, "curves": curves, "at_equal_p99": compare}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


def _best(name: str, runs: list[dict]) -> dict:
    """The round with the highest throughput (the least disturbed by other load on the machine)."""
    return dict(max(runs, key=lambda r: r["requests_per_s"]), rounds=len(runs))


def show(r: dict) -> str:
    return (
        f"{r['server']:<52} {r['requests_per_s']:7.2f} req/s {r['passages_per_s']:7.1f} passages/s "
        f"p50 {r['p50_ms']:7.0f} ms  p99 {r['p99_ms']:7.0f} ms  ({r['requests']} requests, {r['errors']} errors)"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--sweep", type=int, nargs="+", default=None, metavar="CLIENTS",
                   help="client counts: a throughput / p99 curve per server, compared at equal p99")
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--warmup", type=float, default=10)
    p.add_argument("--per-request", type=int, default=8)
    p.add_argument("--rounds", type=int, default=1,
                   help="run every server this many times, alternating (a busy machine's load then falls on all)")
    p.add_argument("--data", default=str(SHARED / "beir" / "msmarco-subset"))
    p.add_argument("--ours", action="append", default=None,
                   help=f"a config of ours, repeatable: comma-separated {sorted(OURS_KEYS)}, e.g. bs=8,threads=1,replicas=2 "
                        "(default: jobs/serve.py's defaults)")
    p.add_argument("--peers", default="infinity", help="comma-separated: infinity, st (or none)")
    p.add_argument("--infinity-venv", default="/work/infinity-venv")
    p.add_argument("--infinity-batch-size", type=int, default=32, help="Infinity's own default")
    p.add_argument("--port", type=int, default=8311)
    p.add_argument("--out", default=None, help="JSON result path (default benchmarks/results/serve_cpu_<date>.json)")
    p.add_argument("--st-server", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.st_server:
        run_st_server(args.port)
        return 0

    passages = load_passages(args.data)
    logs = Path("/tmp") / f"bench_serve_{os.getpid()}"
    logs.mkdir(parents=True, exist_ok=True)
    servers = [ours_server(spec, args.port, logs / f"ours_{i}.log") for i, spec in enumerate(args.ours or [DEFAULT_OURS])]
    peers = [x for x in args.peers.split(",") if x and x != "none"]
    for peer in peers:
        if peer == "infinity":
            venv = Path(args.infinity_venv)
            if (venv / "bin" / "infinity_emb").exists():
                servers.append(infinity_server(venv, args.port, logs / "infinity.log", args.infinity_batch_size))
            else:
                print(f"no Infinity at {venv}: falling back to FastAPI + sentence-transformers", flush=True)
                servers.append(st_server(args.port, logs / "st.log"))
        elif peer == "st":
            servers.append(st_server(args.port, logs / "st.log"))
        else:
            raise SystemExit(f"unknown peer {peer!r}")

    if args.sweep:
        return sweep(args, servers, passages)
    runs = []
    for rnd in range(args.rounds):
        for server in servers:
            startup = server.start()
            print(f"round {rnd + 1}: {server.name} up in {startup:.1f} s; {args.clients} clients x {args.seconds:.0f} s",
                  flush=True)
            try:
                r = load(server, passages, args.clients, args.seconds, args.warmup, args.per_request)
            finally:
                server.stop()
            r.update(round=rnd + 1, startup_s=startup, cmd=server.cmd)
            runs.append(r)
            print(show(r), flush=True)
            time.sleep(3)  # let the stopped server's processes go before the next one starts
    results = [_best(server.name, [r for r in runs if r["server"] == server.name]) for server in servers]

    ours = [r for r in results if r["server"].startswith("bge_ray")]
    others = [r for r in results if not r["server"].startswith("bge_ray")]
    print(f"\nbest of {args.rounds} round(s) (by throughput):\n" + "\n".join(show(r) for r in results))
    ratios = []
    for o in others:
        for r in ours:
            ratio = {
                "ours": r["server"], "peer": o["server"],
                "requests_per_s": r["requests_per_s"] / o["requests_per_s"],
                "p50": r["p50_ms"] / o["p50_ms"], "p99": r["p99_ms"] / o["p99_ms"],
            }
            ratios.append(ratio)
            print(f"{r['server']} / {o['server']}: throughput x{ratio['requests_per_s']:.2f}, "
                  f"p50 x{ratio['p50']:.2f}, p99 x{ratio['p99']:.2f}")
    paired = _paired_ratios(runs, ours, others) if args.rounds > 1 else []
    for pr in paired:
        print(f"{pr['ours']} / {pr['peer']} round by round: throughput {pr['requests_per_s']}, p99 {pr['p99']} "
              f"(median x{pr['median_requests_per_s']:.2f} / x{pr['median_p99']:.2f})")
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"serve_cpu_{time.strftime('%Y%m%d_%H%M')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
        "clients": args.clients, "seconds": args.seconds, "warmup_s": args.warmup, "per_request": args.per_request,
        "data": args.data, "model": MODEL_NAME, "rounds": args.rounds,
    }
    out.write_text(json.dumps({"meta": meta, "results": results, "ratios": ratios, "paired": paired, "runs": runs}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
