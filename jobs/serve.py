"""Serve embedders and rerankers over HTTP (OpenAI /v1/embeddings, Cohere/Jina /v1/rerank) until Ctrl-C.

    python jobs/serve.py                                  # bundled all-MiniLM-L6-v2 on 127.0.0.1:8000
    python jobs/serve.py --reranker /models/bge-reranker-v2-m3 --port 9000
    python jobs/serve.py --model BAAI/bge-m3 --max-batch-size 32 --num-replicas 2 --num-cpus 1
    python jobs/serve.py --config bge_ray/serve/serve_config.yaml   # args of a Serve config's first app
    BGE_RAY_API_KEY=secret python jobs/serve.py                      # require 'Authorization: Bearer secret'

The same application runs under `serve run bge_ray/serve/serve_config.yaml` or `serve deploy`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bge_ray.serve.config import AppSettings  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", default=None,
                   help="embedder name or folder, repeatable (default: bundled all-MiniLM-L6-v2)")
    p.add_argument("--reranker", action="append", default=None, help="reranker name or folder, repeatable")
    p.add_argument("--config", default=None,
                   help="a Serve config YAML: the args of its first bge_ray application (flags below override)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch-size", type=int, default=None, help="requests merged into one model call")
    p.add_argument("--batch-wait-ms", type=float, default=None, help="how long a batch waits to fill")
    p.add_argument("--encode-batch-size", type=int, default=None, help="texts per forward pass")
    p.add_argument("--max-ongoing-requests", type=int, default=None,
                   help="requests one replica holds at once; the rest wait in Serve's proxy for the first free replica")
    p.add_argument("--num-replicas", type=int, default=None, help="replicas per model")
    p.add_argument("--max-replicas", type=int, default=None, help="autoscale from 1 up to this many replicas")
    p.add_argument("--num-cpus", type=float, default=None, help="Ray CPUs per replica")
    p.add_argument("--num-gpus", type=float, default=None, help="Ray GPUs per replica")
    p.add_argument("--torch-threads", type=int, default=None, help="torch threads per model thread")
    p.add_argument("--model-threads", type=int, default=None,
                   help="model calls each replica runs at once, from one request queue (shared weights)")
    p.add_argument("--colocate", choices=["on", "off"], default=None,
                   help="model inside the ingress replicas (default: on when serving exactly one model)")
    p.add_argument("--max-inputs", type=int, default=None, help="limit: texts (documents) per request")
    p.add_argument("--max-chars", type=int, default=None, help="limit: characters per text")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a new local Ray)")
    return p.parse_args(argv)


def config_args(path: str) -> dict:
    import yaml

    with open(path, encoding="utf-8") as f:
        doc = yaml.safe_load(f) or {}
    apps = [a for a in doc.get("applications", []) if str(a.get("import_path", "")).startswith("bge_ray.serve")]
    if not apps:
        raise SystemExit(f"{path}: no application with import_path bge_ray.serve.app:build_app")
    return dict(apps[0].get("args") or {})


def settings_from(args: argparse.Namespace) -> AppSettings:
    data = config_args(args.config) if args.config else {}
    if args.model:
        data["embedders"] = [{"model": m} for m in args.model]
    if args.reranker:
        data["rerankers"] = [{"model": m} for m in args.reranker]
    per_model = {
        "max_batch_size": args.max_batch_size,
        "batch_wait_timeout_s": None if args.batch_wait_ms is None else args.batch_wait_ms / 1000,
        "encode_batch_size": args.encode_batch_size,
        "max_ongoing_requests": args.max_ongoing_requests,
        "num_replicas": args.num_replicas,
        "num_cpus": args.num_cpus,
        "num_gpus": args.num_gpus,
        "torch_threads": args.torch_threads,
        "model_threads": args.model_threads,
    }
    if args.max_replicas:
        per_model["autoscaling_config"] = {"min_replicas": 1, "max_replicas": args.max_replicas}
    per_model = {k: v for k, v in per_model.items() if v is not None}
    for kind in ("embedders", "rerankers"):
        if kind in data or kind == "embedders":
            data[kind] = [{**m, **per_model} for m in data.get(kind, [{"model": "bundled"}])]
    limits = {"max_inputs_per_request": args.max_inputs, "max_chars_per_input": args.max_chars}
    data["limits"] = {**data.get("limits", {}), **{k: v for k, v in limits.items() if v is not None}}
    if args.colocate:
        data["colocate"] = args.colocate == "on"
    return AppSettings.from_args(data)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("bge_ray").setLevel(logging.INFO)
    settings = settings_from(args)
    if not (args.address or os.environ.get("RAY_ADDRESS")):
        # A local Ray on this machine: models left unsized get one single-threaded replica per core.
        settings = settings.with_cpu_plan(os.cpu_count() or 1)
    from bge_ray.serve.app import start

    url = start(settings, host=args.host, port=args.port, address=args.address)
    names = ", ".join(s.served_name for s in [*settings.embedders, *settings.rerankers])
    print(f"serving {names} at {url} (POST /v1/embeddings, /v1/rerank; GET /v1/models); Ctrl-C stops", flush=True)
    from ray import serve

    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", flush=True)
    finally:
        serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
