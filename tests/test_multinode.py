"""A real two-node Ray cluster (two raylets on 127.0.0.1, tests/multinode.py): the embed job places
an actor on each node and survives the worker node's raylet being SIGKILLed mid-job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest

from tests.multinode import start_two_node_cluster, wait_until

pytestmark = [pytest.mark.ray, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
ROWS, ROWS_PER_SHARD, MAX_LEN = 1200, 40, 64


@pytest.fixture(scope="module")
def two_nodes():
    cluster = start_two_node_cluster()
    yield cluster
    cluster.stop()


@pytest.fixture
def two_nodes_again():
    """A fresh two-node cluster (a test that kills a node leaves the module's cluster with one)."""
    cluster = start_two_node_cluster()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def corpus(shared_data, tmp_path_factory):
    """The first ROWS msmarco-subset passages, as a jsonl the job and the oracle both read."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    lines = (shared_data / "beir" / "msmarco-subset" / "corpus.jsonl").read_text(encoding="utf-8").split("\n")
    path.write_text("\n".join(lines[:ROWS]) + "\n", encoding="utf-8")
    rows = [json.loads(line) for line in lines[:ROWS]]
    return path, [r["_id"] for r in rows], [f"{r['title']} {r['text']}".strip() if r.get("title") else r["text"]
                                            for r in rows]


def _kill_worker_node_and_finish(cluster, proc) -> None:
    """SIGKILL the worker node's raylet while ``proc`` (a job's driver) runs; the job must succeed."""
    assert proc.poll() is None, f"the job ended before the node was killed:\n{proc.stdout.read()}"
    cluster.kill_worker_node()
    try:
        log, _ = proc.communicate(timeout=400)
    finally:
        proc.kill()
    assert proc.returncode == 0, log[-6000:]


def _job(cluster, args):
    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    return subprocess.Popen([sys.executable, str(REPO / "jobs" / "embed_corpus.py"), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_cluster_fixture_is_two_raylets_on_loopback(two_nodes):
    out = two_nodes.run_python(
        "import ray, json\nray.init(log_to_driver=False)\n"
        "print(json.dumps([[n['NodeManagerAddress'], n['Resources'].get('CPU')] for n in ray.nodes() if n['Alive']]))"
    )
    nodes = json.loads(out.strip().splitlines()[-1])
    assert len(nodes) == 2 and all(addr == "127.0.0.1" and cpu == 2.0 for addr, cpu in nodes)


def test_embed_job_spans_both_nodes_and_survives_losing_one(two_nodes, corpus, tmp_path):
    from bge_ray import FlagModel
    from bge_ray.models.loading import bundled_model_path

    path, ids, texts = corpus
    out = tmp_path / "out"
    proc = _job(two_nodes, ["--input", str(path), "--output", str(out), "--num-actors", "2", "--rows-per-shard",
                            str(ROWS_PER_SHARD), "--max-length", str(MAX_LEN), "--batch-size", "32", "--index", "flat"])
    shards = out / "shards"
    # Kill the worker node once both actors have committed work, well before the end.
    wait_until(lambda: len(list(shards.glob("part-*.parquet"))) >= 4 or proc.poll() is not None, 240,
               "the first shards")
    committed_before = len(list(shards.glob("part-*.parquet")))
    _kill_worker_node_and_finish(two_nodes, proc)
    assert committed_before < ROWS // ROWS_PER_SHARD, "the node was killed after the job had finished its work"

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rows"] == manifest["unique_ids"] == ROWS
    # Both nodes ran an actor (the worker node's before it was lost).
    assert len(set(manifest["actor_start_seconds"]["nodes"])) == 2, manifest["actor_start_seconds"]
    table = pads.dataset(str(shards), format="parquet").to_table()
    got = dict(zip(table["id"].to_pylist(), table["embedding"].to_numpy(zero_copy_only=False), strict=True))
    assert table.num_rows == ROWS and sorted(got) == sorted(ids), "every id exactly once"
    want = FlagModel(str(bundled_model_path()), pooling_method="mean", use_fp16=False, devices="cpu",
                     passage_max_length=MAX_LEN, batch_size=32).encode_corpus(texts)
    np.testing.assert_allclose(np.stack([got[i] for i in ids]), want, atol=1e-5)
    assert manifest["index"]["ntotal"] == ROWS


def _actor_cpu_seconds(raylet_pid: int) -> list[float]:
    """User CPU seconds of each model actor process under a raylet (workers come and go meanwhile)."""
    import psutil

    seconds = []
    for p in psutil.Process(raylet_pid).children():
        try:
            if "ModelActor" in " ".join(p.cmdline()):
                seconds.append(p.cpu_times().user)
        except psutil.Error:  # exited between the listing and the look
            continue
    return seconds


def test_mining_survives_losing_a_node(two_nodes_again, shared_data, tmp_path):
    """Hard-negative mining on both nodes; the worker node's raylet is SIGKILLed while its actor is
    embedding: every query still gets its negatives, and none is one of its positives."""
    import collections

    beir = shared_data / "beir" / "msmarco-subset"
    corpus = {}
    for line in filter(None, (beir / "corpus.jsonl").read_text(encoding="utf-8").split("\n")):
        r = json.loads(line)
        corpus[r["_id"]] = f"{r['title']} {r['text']}".strip()
    queries = {json.loads(x)["_id"]: json.loads(x)["text"]
               for x in filter(None, (beir / "queries.jsonl").read_text(encoding="utf-8").split("\n"))}
    rel = collections.defaultdict(list)
    for line in (beir / "qrels" / "test.tsv").read_text().splitlines():
        q, c, s = line.split()
        if int(s) >= 2 and c in corpus:
            rel[q].append(c)
    qids = [q for q in queries if rel[q]][:10]
    train = [{"query": queries[q], "pos": [corpus[c] for c in rel[q][:2]]} for q in qids]
    pool = list(dict.fromkeys([c for q in qids for c in rel[q]] + list(corpus)[:1500]))
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (tmp_path / "pool.jsonl").write_text("".join(json.dumps({"text": corpus[c]}) + "\n" for c in pool))
    out = tmp_path / "mined.jsonl"
    env = {**os.environ, "RAY_ADDRESS": two_nodes_again.address}
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "jobs" / "mine_hard_negatives.py"), "--input_file", str(tmp_path / "train.jsonl"),
         "--output_file", str(out), "--candidate_pool", str(tmp_path / "pool.jsonl"), "--range_for_sampling", "2-60",
         "--negative_number", "5", "--max_passage_length", str(MAX_LEN), "--max_query_length", str(MAX_LEN),
         "--batch_size", "32", "--num_actors", "2", "--rows_per_call", "50"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    raylet = two_nodes_again.worker_raylet_pid()

    def worker_actor_is_embedding():
        # Model load is ~4 CPU-seconds; past that the actor is running items.
        return proc.poll() is not None or any(t > 8 for t in _actor_cpu_seconds(raylet))

    wait_until(worker_actor_is_embedding, 240, "the worker node's actor to embed")
    _kill_worker_node_and_finish(two_nodes_again, proc)
    mined = [json.loads(x) for x in filter(None, out.read_text(encoding="utf-8").split("\n"))]
    assert len(mined) == len(train)
    for line, src in zip(mined, train, strict=True):
        assert line["pos"] == src["pos"]
        assert len(line["neg"]) == 5 and len(set(line["neg"])) == 5, "negatives complete"
        assert not set(line["neg"]) & set(src["pos"]), "a negative is a positive"
