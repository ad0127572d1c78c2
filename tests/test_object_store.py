"""Embed job output on an object store: moto's S3 server on loopback, the job writing ``s3://``.

The job reaches the server as it reaches any S3-compatible store, through ``AWS_ENDPOINT_URL`` and
the credentials in the environment (set by tests/conftest.py before Ray starts its workers).
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow.dataset as pads
import pytest

from bge_ray.batch.embed import run_embed_job
from bge_ray.io.readers import CorpusSpec
from bge_ray.io.store import Store, filesystem
from bge_ray.models.spec import EmbedderSpec

pytestmark = [pytest.mark.ray, pytest.mark.slow]
SPEC = EmbedderSpec(max_length=32, batch_size=16)


def _keys(s3, bucket, prefix):
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"].removeprefix(prefix): o for page in pages for o in page.get("Contents", [])}


def _corpus_ids(path):
    return [json.loads(line)["_id"] for line in open(path, encoding="utf-8") if line.strip()]


@pytest.fixture(scope="module")
def local_run(ray_local, sample_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "out"
    run_embed_job(CorpusSpec(str(sample_corpus)), str(out), SPEC, rows_per_shard=10, index_kind="none")
    table = pads.dataset(str(out / "shards"), format="parquet").to_table()
    return dict(zip(table["id"].to_pylist(), np.stack(table["embedding"].to_numpy(zero_copy_only=False)), strict=True))


def test_s3_output_lands_whole_and_reads_back(s3_server, ray_local, sample_corpus, local_run):
    s3_server.create_bucket(Bucket="embeddings")
    result = run_embed_job(CorpusSpec(str(sample_corpus)), "s3://embeddings/runs/sample", SPEC, rows_per_shard=10,
                           index_kind="flat")
    keys = _keys(s3_server, "embeddings", "runs/sample/")
    assert {f"shards/part-{i:05d}.parquet" for i in range(6)} <= set(keys)
    assert {"plan.json", "manifest.json", "index.faiss", "ids.parquet"} <= set(keys)
    assert not [k for k in keys if "tmp" in k], "temp objects left behind"
    manifest = json.loads(s3_server.get_object(Bucket="embeddings", Key="runs/sample/manifest.json")["Body"].read())
    assert manifest["rows"] == result.rows == 60 and manifest["index"]["ntotal"] == 60

    # Another reader, knowing nothing of bge_ray, reads the output back.
    fs, path = filesystem("s3://embeddings/runs/sample/shards")
    table = pads.dataset(path, format="parquet", filesystem=fs).to_table()
    assert sorted(table["id"].to_pylist()) == sorted(_corpus_ids(sample_corpus))
    for i, vec in zip(table["id"].to_pylist(), table["embedding"].to_numpy(zero_copy_only=False), strict=True):
        np.testing.assert_allclose(vec, local_run[i], atol=1e-6)

    from bge_ray.index.faiss_index import load_index

    with Store("s3://embeddings/runs/sample").local_copy("index.faiss") as f:
        assert load_index(f).ntotal == 60


def test_s3_run_killed_mid_job_reruns_only_missing_shards(s3_server, ray_local, sample_corpus, tmp_path):
    """Input and output both on the object store."""
    s3_server.create_bucket(Bucket="resume")
    s3_server.put_object(Bucket="resume", Key="corpora/sample.jsonl", Body=sample_corpus.read_bytes())
    corpus = CorpusSpec("s3://resume/corpora/sample.jsonl")
    out = "s3://resume/job"
    with pytest.raises(Exception, match="injected failure at item 3"):
        run_embed_job(corpus, out, SPEC, rows_per_shard=10, index_kind="none",
                      runtime_env={"env_vars": {"BGE_RAY_FAULT": "raise:3", "BGE_RAY_FAULT_DIR": str(tmp_path)}})
    before = _keys(s3_server, "resume", "job/")
    assert "manifest.json" not in before, "a failed run must not look complete"
    committed = sorted(k for k in before if k.startswith("shards/"))
    assert "shards/part-00003.parquet" not in committed and committed

    manifest = run_embed_job(corpus, out, SPEC, rows_per_shard=10, index_kind="none").manifest
    assert manifest["skipped_shards"] == len(committed)
    assert manifest["embedded_shards"] == 6 - len(committed)
    assert manifest["input"] == "s3://resume/corpora/sample.jsonl"
    after = _keys(s3_server, "resume", "job/")
    for k in committed:  # committed shard objects were not written again
        assert after[k]["ETag"] == before[k]["ETag"] and after[k]["LastModified"] == before[k]["LastModified"]
    fs, path = filesystem(f"{out}/shards")
    ids = pads.dataset(path, format="parquet", filesystem=fs).to_table(columns=["id"])["id"].to_pylist()
    assert sorted(ids) == sorted(_corpus_ids(sample_corpus))
    assert manifest["rows"] == manifest["unique_ids"] == 60
