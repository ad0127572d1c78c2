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

from bge_ray.batch.embed import EmbedderSpec, run_embed_job
from bge_ray.index.faiss_index import load_index, search
from bge_ray.io.readers import CorpusSpec
from bge_ray.io.shards import read_embeddings

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
