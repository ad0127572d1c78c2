"""How the embed job grows with the corpus: synthetic jsonl corpora of N short rows, embedded with a
one-layer, 32-wide BERT (random weights, the bundled tokenizer) so the model does not hide the rest.

    python benchmarks/bench_scale.py --sizes 1000000 4000000 16000000 --json benchmarks/results/cpu_scale.json
    python benchmarks/bench_scale.py --sizes 20000 80000          # a quick check that it all runs

For each size the job runs as ``ray job submit`` would run it (a driver process on a Ray started
for the benchmark, ``ray start --head``) and the benchmark reports: the driver's peak RSS (VmHWM,
sampled from /proc while it runs), planning, embedding, verification and index seconds (from the
job's manifest), rows/s, and per-row figures, then the growth from the smallest to the largest size.
The driver should hold per-shard state only: its peak RSS should stay flat, and verification and
index time per row should not grow.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_embed_job import RunningCluster, ray_env  # noqa: E402
from benchmarks.common import REPO, build_random_checkpoint  # noqa: E402

JOB = REPO / "jobs" / "embed_corpus.py"


def write_corpus(path: Path, rows: int, seed: int = 0) -> None:
    """``rows`` jsonl rows of 8-16 words from a 5000-word vocabulary (about 20 tokens each)."""
    rng = random.Random(seed)
    words = [f"w{k}" for k in range(5000)]
    with open(path, "w", encoding="utf-8") as f:
        for start in range(0, rows, 100_000):
            f.write("".join(
                json.dumps({"_id": f"d{n}", "text": " ".join(rng.choices(words, k=rng.randint(8, 16)))}) + "\n"
                for n in range(start, min(rows, start + 100_000))))


def peak_rss(pid: int) -> int:
    """VmHWM (peak resident set) of a running process, in bytes; 0 once it is gone."""
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run(corpus: Path, out: Path, model: Path, args, address: str) -> dict:
    cmd = [sys.executable, str(JOB), "--input", str(corpus), "--output", str(out), "--model", str(model),
           "--model-class", "encoder-only-base", "--pooling-method", "cls", "--max-length", "32",
           "--batch-size", str(args.batch_size), "--num-actors", str(args.actors), "--index", args.index]
    if args.rows_per_shard:
        cmd += ["--rows-per-shard", str(args.rows_per_shard)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=ray_env(address), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], peak_rss(proc.pid))
            time.sleep(0.2)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    log, _ = proc.communicate()
    t.join()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{log[-4000:]}")
    m = json.loads((out / "manifest.json").read_text())
    index = m.get("index") or {}
    return {
        "rows": m["rows"], "shards": len(m["shards"]), "wall_seconds": round(wall, 2),
        "driver_peak_rss_mb": round(peak[0] / 2**20, 1), "plan_seconds": m.get("plan_seconds"),
        "embed_seconds": m["embed_seconds"], "verify_seconds": m.get("verify_seconds"),
        "index_seconds": index.get("seconds"), "index": index.get("kind"), "job_seconds": m["seconds"],
        "index_train_seconds": index.get("train_seconds"), "index_fill_seconds": index.get("fill_seconds"),
        "nlist": index.get("nlist"), "index_parts": len(index.get("parts") or []) or None,
        "rows_per_s": round(m["rows"] / m["embed_seconds"], 1),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 4_000_000, 16_000_000])
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--rows-per-shard", type=int, default=None, help="default: the job's (auto)")
    p.add_argument("--index", default="none", help="the job's --index (none, flat, ...)")
    p.add_argument("--work", default=None, help="folder for corpora and outputs (default: a temp folder)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    work = Path(args.work or tempfile.mkdtemp(prefix="bench_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    model = build_random_checkpoint("tiny-1x32", work / "tiny-1x32")
    warm = work / "warm.jsonl"
    write_corpus(warm, 1000)
    rows = []
    with RunningCluster(warm, work, argparse.Namespace(batch_size=args.batch_size, max_length=32,
                                                       rows_per_call=None, timeout=3600)) as cluster:
        for n in args.sizes:
            corpus = work / f"corpus_{n}.jsonl"
            if not corpus.exists():
                t0 = time.perf_counter()
                write_corpus(corpus, n)
                print(f"wrote {n} rows ({corpus.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t0:.1f} s",
                      flush=True)
            out = work / f"out_{n}"
            subprocess.run(["rm", "-rf", str(out)], check=True)
            r = run(corpus, out, model, args, cluster.address)
            rows.append(r)
            print(json.dumps(r), flush=True)
    print("\n| rows | shards | driver peak RSS MiB | plan s | embed s | verify s | index s | rows/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['rows']:,} | {r['shards']} | {r['driver_peak_rss_mb']} | {r['plan_seconds']} | {r['embed_seconds']} "
              f"| {r['verify_seconds']} | {r['index_seconds']} | {r['rows_per_s']:,} |")
    growth = {}
    if len(rows) > 1:
        a, b = rows[0], rows[-1]
        growth = {
            "rows": b["rows"] / a["rows"],
            "driver_peak_rss": b["driver_peak_rss_mb"] / a["driver_peak_rss_mb"],
            "verify_seconds_per_row": (b["verify_seconds"] / b["rows"]) / (a["verify_seconds"] / a["rows"]),
            "embed_seconds_per_row": (b["embed_seconds"] / b["rows"]) / (a["embed_seconds"] / a["rows"]),
        }
        if a["index_seconds"] and b["index_seconds"]:
            growth["index_seconds_per_row"] = (b["index_seconds"] / b["rows"]) / (a["index_seconds"] / a["rows"])
        print(f"\n{rows[-1]['rows']:,} vs {rows[0]['rows']:,} rows: "
              + ", ".join(f"{k} x{v:.2f}" for k, v in growth.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"sizes": args.sizes, "actors": args.actors, "index": args.index,
                                               "cpus": os.cpu_count(), "runs": rows, "growth": growth}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
