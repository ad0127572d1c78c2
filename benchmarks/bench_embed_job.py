"""The corpus embedding job (jobs/embed_corpus.py on a local Ray) vs FlagEmbedding's encode_corpus, same run.

    python benchmarks/bench_embed_job.py --json benchmarks/results/cpu_embed_job_msmarco.json
    python benchmarks/bench_embed_job.py --actors 2 --rounds 3 --peer-batch-sizes 16 --json ...  # paired rounds
    python benchmarks/bench_embed_job.py --actors 2 --rounds 3 --ray-cluster --json ...  # jobs on a running Ray
    python benchmarks/bench_embed_job.py --limit 200          # quick check that it all runs

Both sides get the same texts (msmarco-subset: title + " " + text, 5000 passages), the bundled
all-MiniLM-L6-v2, mean pooling, fp32, batch size 64, max length 256:

(a) FlagEmbedding ``FlagModel(...).encode_corpus(texts)`` in this process, timed after a warm-up;
(b) ``python jobs/embed_corpus.py --num-actors N --index none`` as a subprocess, for each N in
    --actors, timed two ways: the subprocess's wall time (interpreter, imports, Ray start-up and
    shutdown included) and the job's own figure from its manifest, which excludes Ray start-up
    (``embed_seconds``: read -> embed -> write; ``seconds``: that plus the shard commit).

Prints docs/s and tokens/s for each, the ratios ours / FlagEmbedding (per actor count, both ways)
and N actors / 1 actor, and the largest difference between the job's vectors and FlagEmbedding's.
With ``--rounds R`` every round runs both sides again and ratios are taken within a round (this VM's
speed drifts by up to 2x over minutes), then the median. ``--peer-batch-sizes`` adds FlagEmbedding
runs at smaller batch sizes: ours caps CPU passes at 2048 tokens, and this shows how much of the
lead is that cap (FlagEmbedding has no token budget, only a batch size).
``--ray-cluster`` runs each round's jobs on a Ray started for them (as `ray job submit` to a cluster
that is up; stopped while FlagEmbedding runs) instead of a private Ray per job: Ray's start-up and
the cluster-wide actors Ray Data starts once per cluster then fall outside every job's figure,
which keeps only the job's own actors' start-up.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from importlib import metadata
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import REPO, SHARED, job_env  # noqa: E402

JOB = REPO / "jobs" / "embed_corpus.py"
SUMMARY_RE = re.compile(r"embedded (\d+) rows(?: \((\d+) tokens\))? in ([0-9.]+) s")


def load_corpus(folder: Path, limit: int | None) -> tuple[list[str], list[str]]:
    """BEIR corpus ids and texts (title + " " + text when there is a title), first ``limit`` rows."""
    ids, texts = [], []
    with open(folder / "corpus.jsonl", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if limit and len(ids) >= limit:
                break
            try:
                d = json.loads(line)
                title = (d.get("title") or "").strip()
                text = d["text"].strip()
                ids.append(str(d["_id"]))
            except (json.JSONDecodeError, KeyError, AttributeError) as e:
                raise ValueError(f"{folder / 'corpus.jsonl'}:{n}: expected a BEIR row with _id and text ({e})") from e
            texts.append(f"{title} {text}" if title else text)
    return ids, texts


def write_job_input(folder: Path, ids: list[str], texts: list[str]) -> None:
    """The exact texts FlagEmbedding gets, as a BEIR folder with no titles, so both sides see the same."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "corpus.jsonl", "w", encoding="utf-8") as f:
        for i, t in zip(ids, texts, strict=True):
            f.write(json.dumps({"_id": i, "text": t}, ensure_ascii=False) + "\n")


def count_tokens(model_path: str, texts: list[str], max_length: int) -> int:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    enc = tok(texts, truncation=True, max_length=max_length, add_special_tokens=True)
    return sum(len(x) for x in enc["input_ids"])


def run_flagembedding(model_path: str, texts: list[str], batch_size: int, args) -> tuple[dict, np.ndarray]:
    import torch
    from FlagEmbedding import FlagModel

    model = FlagModel(
        model_path, pooling_method="mean", use_fp16=False, devices="cpu",
        batch_size=batch_size, passage_max_length=args.max_length,
    )
    model.encode_corpus(texts[: min(len(texts), 2 * batch_size)])  # warm-up
    t0 = time.perf_counter()
    emb = np.asarray(model.encode_corpus(texts), dtype=np.float32)
    seconds = time.perf_counter() - t0
    del model
    gc.collect()
    return {"seconds": round(seconds, 3), "torch_threads": torch.get_num_threads()}, emb


def ray_env(address: str | None = None) -> dict[str, str]:
    """The job's environment (:func:`benchmarks.common.job_env`): a private local Ray, as
    `python jobs/embed_corpus.py` on a laptop, or the running cluster at ``address``."""
    # Workers at the daemons' priority, as init_ray sets for a local Ray (see bge_ray.batch.runtime);
    # `ray start` needs it in its own environment.
    env = job_env(RAY_USAGE_STATS_ENABLED="0", RAY_worker_niceness="0")
    env.pop("RAY_ADDRESS", None)
    if address:
        env["RAY_ADDRESS"] = address
    return env


class RunningCluster:
    """``ray start --head`` on this machine while the ``with`` block runs, warmed by one small job.

    The production shape (``ray job submit`` to a cluster that is up): Ray's own start-up and the
    cluster-wide actors Ray Data creates once per cluster (_StatsActor, AutoscalingCoordinator,
    ActorLocationTracker, detached) are not part of any job, so the job's figure counts only what the
    job does: plan, start its embedding actors (processes, imports, model load), embed, commit.
    """

    def __init__(self, warm_input: Path, work: Path, args):
        self.ray = str(Path(sys.executable).with_name("ray"))
        self.address = f"127.0.0.1:{6400 + os.getpid() % 500}"
        self.warm_input, self.work, self.args = warm_input, work, args

    def __enter__(self) -> RunningCluster:
        port = self.address.rsplit(":", 1)[1]
        subprocess.run([self.ray, "start", "--head", f"--port={port}", f"--num-cpus={os.cpu_count()}",
                        "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={self.work / 'ray'}"],
                       check=True, env=ray_env(), capture_output=True, timeout=300)
        t0 = time.perf_counter()
        shutil.rmtree(self.work / "warm_up", ignore_errors=True)
        try:
            run_job(self.warm_input, self.work / "warm_up", 1, self.args, self.address)
        except BaseException:
            self.__exit__()
            raise
        print(f"ray start --head at {self.address}; warm-up job {time.perf_counter() - t0:.1f} s", flush=True)
        return self

    def __exit__(self, *exc) -> None:
        subprocess.run([self.ray, "stop", "--force"], env=ray_env(), capture_output=True, timeout=300)


def read_job_embeddings(out: Path, manifest: dict | None) -> dict[str, np.ndarray]:
    import pyarrow.parquet as pq

    if manifest and manifest.get("shards"):
        files = [out / s["file"] for s in manifest["shards"]]
    else:
        files = sorted((out / "shards").glob("*.parquet"))
    got = {}
    for f in files:
        t = pq.read_table(f, columns=["id", "embedding"])
        emb = np.asarray(t["embedding"].combine_chunks().flatten(), dtype=np.float32).reshape(t.num_rows, -1)
        got.update(zip(t["id"].to_pylist(), emb, strict=True))
    return got


def run_job(input_dir: Path, out: Path, num_actors: int, args, address: str | None = None) -> dict:
    cmd = [
        sys.executable, str(JOB), "--input", str(input_dir), "--output", str(out),
        "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
        "--num-actors", str(num_actors), "--index", "none",
    ]
    if args.rows_per_call:
        cmd += ["--rows-per-call", str(args.rows_per_call)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ray_env(address), cwd=out.parent,
                          timeout=args.timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} exited with {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        )
    res: dict = {"num_actors": num_actors, "wall_seconds": round(wall, 3)}
    manifest = None
    if (out / "manifest.json").is_file():
        manifest = json.loads((out / "manifest.json").read_text())
        res.update(
            rows=manifest.get("rows"), tokens=manifest.get("tokens"),
            embed_seconds=manifest.get("embed_seconds"), job_seconds=manifest.get("seconds"),
            # Where the embed stage went: actors busy on shards (summed), the wait for the first shard.
            shard_seconds=manifest.get("shard_seconds"), first_shard_after_seconds=manifest.get("first_shard_after_seconds"),
            actor_start_seconds=manifest.get("actor_start_seconds"),
        )
    m = None
    for line in proc.stdout.splitlines():
        m = SUMMARY_RE.search(line) or m
    if m:  # the job's last summary line: the fallback when the manifest lacks a field
        res.setdefault("rows", int(m.group(1)))
        if m.group(2):
            res.setdefault("tokens", int(m.group(2)))
        res["summary_seconds"] = float(m.group(3))
        if res.get("job_seconds") is None:
            res["job_seconds"] = float(m.group(3))
    res["_manifest"] = manifest
    return res


def run_one_job(input_dir: Path, out: Path, k: int, ids: list[str], fe_emb, n: int, args,
                address: str | None = None) -> dict:
    """One job run with ``k`` actors, checked for every id and compared with FlagEmbedding's vectors."""
    shutil.rmtree(out, ignore_errors=True)
    r = run_job(input_dir, out, k, args, address)
    manifest = r.pop("_manifest")
    if r.get("rows") != n:
        raise RuntimeError(f"job with {k} actor(s) reported {r.get('rows')} rows, expected {n}")
    for key in ("wall_seconds", "job_seconds", "embed_seconds"):
        r[key.replace("seconds", "docs_per_s")] = rate(n, r.get(key))
    r["startup_seconds"] = round(r["wall_seconds"] - r["job_seconds"], 3) if r.get("job_seconds") else None
    if fe_emb is not None:
        got = read_job_embeddings(out, manifest)
        missing = [i for i in ids if i not in got]
        if missing:
            raise RuntimeError(f"job output lacks {len(missing)} ids, e.g. {missing[:3]}")
        r["max_abs_diff_vs_flagembedding"] = float(np.abs(np.stack([got[i] for i in ids]) - fe_emb).max())
    return r


def round_ratios(report: dict, args) -> dict:
    """Ours / FlagEmbedding (at each batch size) and N / 1 actors, per round and their medians: the
    machine's speed drifts between rounds, so only runs of the same round are compared."""
    by_round: dict[str, list] = {}
    for rnd in range(args.rounds):
        fe = {f["batch_size"]: f["docs_per_s"] for f in report["flagembedding_runs"] if f["round"] == rnd}
        jobs = {r["num_actors"]: r for r in report["job"] if r["round"] == rnd}
        for k, r in jobs.items():
            for bs, fe_rate in fe.items():
                suffix = "" if bs == args.batch_size else f"_bs{bs}"
                for how in ("job", "embed", "wall"):
                    by_round.setdefault(f"ours_{k}actor_{how}/flagembedding{suffix}", []).append(
                        ratio(r.get(f"{how}_docs_per_s"), fe_rate))
            base = jobs.get(min(jobs))
            if k != base["num_actors"]:
                for how in ("job", "wall"):
                    by_round.setdefault(f"{k}actors/{base['num_actors']}actor_{how}", []).append(
                        ratio(r.get(f"{how}_docs_per_s"), base.get(f"{how}_docs_per_s")))
    medians = {key: round(statistics.median(v for v in vals if v is not None), 3) if any(v is not None for v in vals)
               else None for key, vals in by_round.items()}
    return {**medians, "by_round": by_round}


def rate(n: int, seconds: float | None) -> float | None:
    return round(n / seconds, 2) if seconds else None


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(SHARED / "beir" / "msmarco-subset"), help="BEIR folder (corpus.jsonl)")
    p.add_argument("--limit", type=int, default=None, help="first N passages only (a quick run)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--actors", type=int, nargs="+", default=[1, 2], help="job runs, one per actor count")
    p.add_argument("--rows-per-call", type=int, default=None, help="passed to the job (default: the job's)")
    p.add_argument("--no-peer", action="store_true", help="skip FlagEmbedding")
    p.add_argument("--peer-batch-sizes", type=int, nargs="*", default=[],
                   help="also run FlagEmbedding at these batch sizes (ours caps CPU passes at 2048 tokens: "
                        "shows what FlagEmbedding gets from smaller passes)")
    p.add_argument("--rounds", type=int, default=1, help="repeat FlagEmbedding + job runs; ratios per round, median")
    p.add_argument("--ray-cluster", action="store_true",
                   help="run each round's jobs on a Ray started for them (`ray start --head`, warmed by one small "
                        "job, stopped before FlagEmbedding runs) instead of a private Ray per job: Ray start-up "
                        "out of the job, as under `ray job submit`")
    p.add_argument("--timeout", type=float, default=3600, help="seconds allowed per job run")
    p.add_argument("--keep", default=None, help="keep the job outputs in this folder")
    p.add_argument("--json", default=None, help="write the report here")
    args = p.parse_args(argv)

    from bge_ray.models import bundled_model_path

    model_path = str(bundled_model_path())
    ids, texts = load_corpus(Path(args.data), args.limit)
    n = len(ids)
    n_tokens = count_tokens(model_path, texts, args.max_length)
    work = Path(args.keep).resolve() if args.keep else Path(tempfile.mkdtemp(prefix="bench_embed_job_"))
    work.mkdir(parents=True, exist_ok=True)
    input_dir = work / "input"
    write_job_input(input_dir, ids, texts)
    print(f"{n} passages, {n_tokens} tokens at max_length {args.max_length} ({args.data}); "
          f"batch size {args.batch_size}, fp32, {os.cpu_count()} CPUs", flush=True)

    report: dict = {
        "data": args.data, "passages": n, "tokens": n_tokens, "batch_size": args.batch_size,
        "max_length": args.max_length, "model": model_path,
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version()},
        "rounds": args.rounds, "ray": "running cluster (ray start --head)" if args.ray_cluster else "local per job",
        "versions": {}, "flagembedding": None, "flagembedding_runs": [], "job": [],
        "ratios": {},
    }
    for dist in ("torch", "transformers", "ray", "FlagEmbedding"):
        try:
            report["versions"][dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            report["versions"][dist] = None

    fe_emb = None
    try:
        for rnd in range(args.rounds):
            tag = f"round {rnd + 1}/{args.rounds}: " if args.rounds > 1 else ""
            for bs in ([] if args.no_peer else [args.batch_size, *args.peer_batch_sizes]):
                fe, emb = run_flagembedding(model_path, texts, bs, args)
                fe.update(round=rnd, batch_size=bs, docs_per_s=rate(n, fe["seconds"]),
                          tokens_per_s=rate(n_tokens, fe["seconds"]))
                fe_emb = emb if bs == args.batch_size else fe_emb
                report["flagembedding_runs"].append(fe)
                print(f"{tag}FlagEmbedding encode_corpus, batch size {bs}: {fe['seconds']:.1f} s, "
                      f"{fe['docs_per_s']} docs/s, {fe['tokens_per_s']} tokens/s", flush=True)
            # The cluster is up for this round's jobs only: an idle cluster's daemons and actors take ~5%
            # of this 2-core machine, which must not slow the FlagEmbedding runs.
            if args.ray_cluster and not (work / "warm_input").exists():
                write_job_input(work / "warm_input", ids[:64], texts[:64])
            with RunningCluster(work / "warm_input", work, args) if args.ray_cluster else nullcontext() as cluster:
                for k in args.actors:
                    r = run_one_job(input_dir, work / f"out_actors{k}", k, ids, fe_emb, n, args,
                                    cluster.address if cluster else None)
                    r["round"] = rnd
                    report["job"].append(r)
                    print(f"{tag}job, {k} actor(s): wall {r['wall_seconds']:.1f} s ({r['wall_docs_per_s']} docs/s); "
                          f"job {r.get('job_seconds')} s ({r.get('job_docs_per_s')} docs/s); "
                          f"embed stage {r.get('embed_seconds')} s ({r.get('embed_docs_per_s')} docs/s); "
                          f"start-up + shutdown {r['startup_seconds']} s; first shard began "
                          f"{r.get('first_shard_after_seconds')} s into the embed stage"
                          + (f"; max |ours - FE| {r['max_abs_diff_vs_flagembedding']:.2e}" if fe_emb is not None
                             else ""), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    report["flagembedding"] = next(
        (f for f in report["flagembedding_runs"] if f["batch_size"] == args.batch_size), None)
    report["ratios"] = round_ratios(report, args)
    rounds = report["ratios"].pop("by_round")
    if args.rounds > 1:
        print("\nratios by round (docs/s, same round's FlagEmbedding run at the same batch size):")
        for key, vals in rounds.items():
            print(f"  {key}: {vals}")
    print("\n| run | seconds | docs/s | tokens/s |\n|---|---|---|---|")
    for f in report["flagembedding_runs"]:
        print(f"| r{f['round'] + 1} FlagEmbedding encode_corpus, batch size {f['batch_size']} | {f['seconds']:.1f} | "
              f"{f['docs_per_s']} | {f['tokens_per_s']} |")
    for r in report["job"]:
        for label, key in (("job figure", "job_seconds"), ("subprocess wall", "wall_seconds")):
            sec = r.get(key)
            if sec:
                print(f"| r{r['round'] + 1} job, {r['num_actors']} actor(s), {label} | {sec:.1f} | {rate(n, sec)} | "
                      f"{rate(n_tokens, sec)} |")
    print(f"\nratios (docs/s; median over {args.rounds} round(s)):")
    for key, v in report["ratios"].items():
        print(f"  {key}: {v}")
    report["ratios_by_round"] = rounds
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"report -> {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
