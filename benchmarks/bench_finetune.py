"""Fine-tuning throughput: our Ray Train jobs vs FlagEmbedding's own entry points, same data, model and
settings, in one run on this machine.

    python benchmarks/bench_finetune.py --kind embedder --json benchmarks/results/cpu_finetune_embedder.json
    python benchmarks/bench_finetune.py --kind reranker --json benchmarks/results/cpu_finetune_reranker.json

embedder: ``torchrun --nproc_per_node 1 -m FlagEmbedding.finetune.embedder.encoder_only.base`` vs
``jobs/finetune_embedder.py`` (1 and 2 Ray Train workers) on ../shared/data/finetune/embedder/retrieval,
bundled all-MiniLM-L6-v2, mean pooling, group 4, query 32 / passage 128 tokens, batch 4 per worker,
temperature 0.02, fp32. reranker: ``-m FlagEmbedding.finetune.reranker.encoder_only.base`` vs
``jobs/finetune_reranker.py`` on finetune/reranker/examples.jsonl, group 4, query 32 + passage 96 tokens.
Both sides' figures exclude start-up: FlagEmbedding's is HF Trainer's ``train_steps_per_second`` times
the batch (its ``train_samples_per_second`` also counts the examples dropped by drop_last), ours the
loop's groups/s at the last step (from the first step on, including data loading), with
metrics sent to Ray Train every 10 steps (our default; each report costs ~0.5 s here).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import REPO, SHARED, job_env  # noqa: E402


def _run(cmd, log: Path, env) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}); log {log}:\n{log.read_text()[-3000:]}")
    return time.perf_counter() - t0


def settings(kind: str) -> dict:
    if kind == "embedder":
        return {"data": SHARED / "finetune" / "embedder" / "retrieval", "group": 4, "qlen": 32, "plen": 128,
                "fe_module": "FlagEmbedding.finetune.embedder.encoder_only.base", "job": "finetune_embedder.py",
                "fe_extra": ["--temperature", "0.02", "--sentence_pooling_method", "mean",
                             "--normalize_embeddings", "True"],
                "our_extra": ["--temperature", "0.02", "--sentence_pooling_method", "mean"]}
    return {"data": SHARED / "finetune" / "reranker" / "examples.jsonl", "group": 4, "qlen": 32, "plen": 96,
            "fe_module": "FlagEmbedding.finetune.reranker.encoder_only.base", "job": "finetune_reranker.py",
            "fe_extra": [], "our_extra": []}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kind", choices=["embedder", "reranker"], default="embedder")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    from bge_ray.models.loading import bundled_model_path

    model = bundled_model_path()
    s = settings(a.kind)
    work = Path(tempfile.mkdtemp(prefix=f"bench_finetune_{a.kind}_"))
    env = job_env(work, WANDB_DISABLED="true")
    common = ["--model_name_or_path", model, "--train_group_size", str(s["group"]), "--query_max_len", str(s["qlen"]),
              "--passage_max_len", str(s["plen"]), "--per_device_train_batch_size", str(a.batch),
              "--learning_rate", "1e-5", "--num_train_epochs", str(a.epochs)]
    data = [str(s["data"])]
    fe_cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "-m", s["fe_module"],
              "--train_data", *data, "--output_dir", work / "fe", "--save_strategy", "no",
              "--report_to", "none", "--dataloader_drop_last", "True", "--use_cpu", "True", "--logging_steps", "1",
              *common, *s["fe_extra"]]
    fe_wall = _run(fe_cmd, work / "fe.log", env)
    log = (work / "fe.log").read_text()
    steps = re.findall(r"'train_steps_per_second': '?([0-9.]+)", log)
    hf_samples = re.findall(r"'train_samples_per_second': '?([0-9.]+)", log)
    # Groups trained per second = optimizer steps/s x batch. HF's train_samples_per_second counts every
    # example of every epoch, also those --dataloader_drop_last leaves out (10 lines at batch 4: 10
    # counted, 8 trained), so it overstates the rate on these small files.
    fe_rate = float(steps[-1]) * a.batch if steps else float("nan")
    res = {"kind": a.kind, "settings": {k: str(v) for k, v in s.items()}, "epochs": a.epochs, "batch": a.batch,
           "flagembedding": {"groups_per_s": fe_rate, "wall_s": round(fe_wall, 1),
                             "hf_train_samples_per_second": float(hf_samples[-1]) if hf_samples else None},
           "bge_ray": {}}
    print(f"FlagEmbedding {s['fe_module']}: {fe_rate:.2f} groups/s ({fe_wall:.0f} s wall)", flush=True)
    for workers in (1, 2):
        out = work / f"ours_{workers}"
        cmd = [sys.executable, REPO / "jobs" / s["job"], "--train_data", *data, "--output_dir", out,
               "--overwrite_output_dir", "--save_steps", "100000", "--num_workers", str(workers), *common,
               *s["our_extra"]]
        wall = _run(cmd, work / f"ours_{workers}.log", env)
        summary = json.loads((out / "training_summary.json").read_text())
        rate = summary["final_metrics"]["groups_per_s"]
        res["bge_ray"][f"{workers}_workers"] = {"groups_per_s": rate, "wall_s": round(wall, 1),
                                                "steps": summary["optimizer_steps"],
                                                "global_batch": summary["global_batch_size"]}
        print(f"bge_ray {s['job']} {workers} worker(s): {rate:.2f} groups/s ({wall:.0f} s wall, "
              f"{summary['optimizer_steps']} steps of {summary['global_batch_size']})", flush=True)
    for w, r in res["bge_ray"].items():
        r["ratio_vs_flagembedding"] = r["groups_per_s"] / fe_rate
        unit = f" = {r['groups_per_s'] * s['group']:.1f} pairs/s" if a.kind == "reranker" else ""
        print(f"{w}: {r['groups_per_s']:.2f} groups/s{unit} -> {r['ratio_vs_flagembedding']:.2f}x FlagEmbedding")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
