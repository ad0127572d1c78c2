"""The corpus embedding job on a real local Ray: shards, manifest and index read back and checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from bge_ray.batch.embed import QueryBatch, run_embed_job
from bge_ray.index.faiss_index import load_index, search
from bge_ray.io.readers import CorpusSpec
from bge_ray.io.shards import read_embeddings
from bge_ray.models.spec import EmbedderSpec

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.ray


def _corpus_rows(path):
    rows = [json.loads(line) for line in open(path, encoding="utf-8")]
    return [r["_id"] for r in rows], [f"{r['title']} {r['text']}" for r in rows]


def test_embed_job_writes_complete_output(ray_local, sample_corpus, tmp_path):
    out = tmp_path / "out"
    result = run_embed_job(CorpusSpec(str(sample_corpus)), str(out), EmbedderSpec(max_length=128), rows_per_shard=16)
    ids, texts = _corpus_rows(sample_corpus)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rows"] == result.rows == len(ids) == manifest["unique_ids"]
    assert manifest["dim"] == 384 and manifest["normalized"] is True
    assert sum(s["rows"] for s in manifest["shards"]) == len(ids)
    assert not [p for p in os.listdir(out) if p.startswith(".")], "temp files left behind"

    got_ids, emb = read_embeddings(str(out / "shards"))
    assert sorted(got_ids) == sorted(ids) and len(set(got_ids)) == len(ids)
    schema = pq.read_schema(next((out / "shards").glob("*.parquet")))
    assert str(schema.field("embedding").type) == "fixed_size_list<element: float>[384]"

    from bge_ray import FlagModel

    direct = FlagModel(None, pooling_method="mean", devices="cpu", passage_max_length=128).encode_corpus(texts)
    order = [got_ids.index(i) for i in ids]
    np.testing.assert_allclose(emb[order], direct, atol=1e-5)

    index = load_index(str(out / "index.faiss"), use_gpu=False)
    index_ids = pq.read_table(out / "ids.parquet")["id"].to_pylist()
    assert index.ntotal == len(ids)
    _, top = search(index, direct[:5], 1)
    assert [index_ids[t] for t in top[:, 0]] == ids[:5]


def test_queries_ride_along_on_the_job_actors(ray_local, sample_corpus, tmp_path, monkeypatch):
    """A QueryBatch is embedded by the corpus job's own actors (encode_queries: instruction and query
    length), split into items, returned in order, kept out of the corpus output; a rerun with every
    shard committed still embeds the queries."""
    from dataclasses import replace

    from FlagEmbedding import FlagModel as FEFlagModel

    import bge_ray.batch.embed as embed
    from bge_ray.models.loading import bundled_model_path

    monkeypatch.setattr(embed, "QUERIES_PER_ITEM", 3)
    spec = EmbedderSpec(max_length=128, use_fp16=False, pooling_method="mean")
    instruction = "Represent this sentence for searching relevant passages: "
    qspec = replace(spec, extra={"query_instruction_for_retrieval": instruction, "query_max_length": 16})
    ids, texts = _corpus_rows(sample_corpus)
    queries = [t.split(".")[0] for t in texts[:7]]
    batch = QueryBatch([f"q{i}" for i in range(7)], queries, qspec)
    oracle = FEFlagModel(str(bundled_model_path()), pooling_method="mean", use_fp16=False, devices="cpu",
                         query_instruction_for_retrieval=instruction, query_max_length=16).encode_queries(queries)

    out = tmp_path / "out"
    first = run_embed_job(CorpusSpec(str(sample_corpus)), str(out), spec, rows_per_shard=32, queries=batch)
    assert first.query_embeddings.shape == (7, 384)
    np.testing.assert_allclose(first.query_embeddings, oracle, atol=1e-5)
    assert first.manifest["rows"] == len(ids) and first.manifest["embedded_shards"] == 2
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["part-00000.parquet", "part-00001.parquet"]

    again = run_embed_job(CorpusSpec(str(sample_corpus)), str(out), spec, rows_per_shard=32, queries=batch)
    assert again.manifest["skipped_shards"] == 2 and again.manifest["embedded_shards"] == 0
    np.testing.assert_allclose(again.query_embeddings, oracle, atol=1e-5)

    with pytest.raises(ValueError, match="query options only"):
        run_embed_job(CorpusSpec(str(sample_corpus)), str(out), replace(spec, max_length=64), queries=batch)


@pytest.mark.slow
def test_readme_main_command_runs_as_a_script(tmp_path):
    """`python jobs/embed_corpus.py` with defaults (bar the output folder), its own local Ray."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "embed_corpus.py"), "--output", str(tmp_path / "o")],
        capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "embedded 60 rows" in proc.stdout
    for name in ("manifest.json", "index.faiss", "ids.parquet"):
        assert (tmp_path / "o" / name).is_file()


def test_cpu_actor_plan_one_thread_per_core_and_fewer_actors_take_the_cores(ray_local):
    from bge_ray.batch.runtime import ActorPlan, plan_actors

    plan = plan_actors()  # the session's Ray has 2 CPUs, no GPU
    assert (plan.num_actors, plan.torch_threads, plan.num_gpus) == (2, 1, 0.0)
    assert plan.num_actors * plan.num_cpus + 2 * plan.read_cpus <= 2  # room left for read tasks
    one = plan.for_blocks(1)
    assert (one.num_actors, one.torch_threads) == (1, 2)
    assert plan.for_blocks(5) == plan
    gpu = ActorPlan(4, 1.0, 1.0, None).for_blocks(3)
    assert (gpu.num_actors, gpu.torch_threads) == (3, None)
    assert plan_actors(num_actors=1).torch_threads == 2
