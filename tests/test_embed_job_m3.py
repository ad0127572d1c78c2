"""embed_corpus with BGE-M3's three outputs on a real local Ray, against FlagEmbedding's BGEM3FlagModel."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bge_ray.batch.embed import QueryBatch, run_embed_job
from bge_ray.io.readers import CorpusSpec
from bge_ray.io.shards import colbert_rows, sparse_rows, to_numpy
from bge_ray.models.spec import EmbedderSpec
from tests.oracle import require

pytestmark = [pytest.mark.ray, pytest.mark.slow]
TOL = 1e-4
MAX_LENGTH = 96


@pytest.fixture(scope="module")
def m3_corpus(shared_data, tmp_path_factory):
    """30 msmarco and arcd passages (English and Arabic, short and truncated) as a BEIR corpus."""
    rows = []
    for name, n in (("msmarco-subset", 22), ("arcd-subset", 8)):
        with open(shared_data / "beir" / name / "corpus.jsonl", encoding="utf-8") as f:
            for _ in range(n):
                d = json.loads(next(f))
                rows.append({"_id": f"{name}:{d['_id']}", "title": d.get("title", ""), "text": d["text"]})
    rows[3]["text"] = " ".join([rows[3]["text"]] * 20)  # past MAX_LENGTH: truncated
    path = tmp_path_factory.mktemp("m3_corpus") / "corpus.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    # The job's text: title and text, each trimmed, joined by a space (BEIR).
    texts = {r["_id"]: " ".join(p for p in (r["title"].strip(), r["text"].strip()) if p) for r in rows}
    return path, texts


def _spec(tiny_m3):
    return EmbedderSpec(model=str(tiny_m3), use_fp16=False, max_length=MAX_LENGTH, batch_size=4)


def _read(out):
    tables = [pq.read_table(p) for p in sorted((out / "shards").glob("*.parquet"))]
    got = {}
    for t in tables:
        dense, sparse, colbert = to_numpy(t["embedding"]), sparse_rows(t["sparse"]), colbert_rows(t["colbert"])
        for k, i in enumerate(t["id"].to_pylist()):
            got[i] = (dense[k], sparse[k], colbert[k])
    return got, tables[0].schema


def _assert_matches(got, ids, want):
    assert sorted(got) == sorted(ids)
    for n, i in enumerate(ids):
        dense, (tok, w), colbert = got[i]
        np.testing.assert_allclose(dense, want["dense_vecs"][n], atol=TOL)
        lw = want["lexical_weights"][n]
        assert [str(t) for t in tok] == list(lw), f"{i}: lexical token ids differ"
        np.testing.assert_allclose(w, [float(v) for v in lw.values()], atol=TOL)
        assert colbert.shape == want["colbert_vecs"][n].shape, i
        np.testing.assert_allclose(colbert, want["colbert_vecs"][n], atol=TOL)


@pytest.fixture(scope="module")
def oracle_outputs(tiny_m3, m3_corpus):
    flag = require("FlagEmbedding")
    model = flag.BGEM3FlagModel(str(tiny_m3), use_fp16=False, devices="cpu", batch_size=4)
    _, texts = m3_corpus
    ids = list(texts)
    want = model.encode_corpus([texts[i] for i in ids], max_length=MAX_LENGTH, return_dense=True,
                               return_sparse=True, return_colbert_vecs=True)
    queries = ["what is a sparse retriever", "ما هي عاصمة مصر"]
    want_q = model.encode_queries(queries, max_length=MAX_LENGTH, return_dense=True, return_sparse=True,
                                  return_colbert_vecs=True)
    return ids, want, queries, want_q


@pytest.mark.parametrize("split", [False, True], ids=["fused", "split-stages"])
def test_three_outputs_equal_flagembedding(ray_local, tiny_m3, m3_corpus, oracle_outputs, tmp_path, split):
    """Fused: each CPU actor reads, tokenises, runs and commits; split (the GPU layout): prepare tasks
    tokenise, the actors get token ids, commit tasks write."""
    path, _ = m3_corpus
    ids, want, queries, want_q = oracle_outputs
    out = tmp_path / "out"
    spec = _spec(tiny_m3)
    result = run_embed_job(CorpusSpec(str(path)), str(out), spec, num_actors=2, rows_per_shard=7,
                           outputs="dense,sparse,colbert", queries=QueryBatch(["q0", "q1"], queries, spec),
                           split_stages=split)
    got, schema = _read(out)
    assert str(schema.field("embedding").type).startswith("fixed_size_list<element: float>[")
    sparse_type = schema.field("sparse").type
    assert (sparse_type.key_type, sparse_type.item_type) == (pa.int32(), pa.float32())
    assert str(schema.field("colbert").type).startswith("list<element: fixed_size_list<element: float>[")
    _assert_matches(got, ids, want)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["outputs"] == ["dense", "sparse", "colbert"] and manifest["rows"] == len(ids)
    assert manifest["index"]["ntotal"] == len(ids)
    # The queries ride along with every output too.
    qv = result.query_vectors
    np.testing.assert_allclose(qv.dense, want_q["dense_vecs"], atol=TOL)
    for (tok, w), lw, c, wc in zip(qv.sparse, want_q["lexical_weights"], qv.colbert, want_q["colbert_vecs"], strict=True):
        assert [str(t) for t in tok] == list(lw)
        np.testing.assert_allclose(w, [float(v) for v in lw.values()], atol=TOL)
        np.testing.assert_allclose(c, wc, atol=TOL)


def test_killed_actor_resumes_to_the_same_outputs(ray_local, tiny_m3, m3_corpus, oracle_outputs, tmp_path):
    path, _ = m3_corpus
    ids, want, _, _ = oracle_outputs
    out = tmp_path / "out"
    run_embed_job(CorpusSpec(str(path)), str(out), _spec(tiny_m3), num_actors=2, rows_per_shard=7,
                  outputs="sparse,colbert,dense", index_kind="none",
                  runtime_env={"env_vars": {"BGE_RAY_FAULT": "exit:2"}}, split_stages=True)
    assert (out / ".fault-2").exists(), "the fault was not injected"
    got, _ = _read(out)
    _assert_matches(got, ids, want)


def test_dense_only_model_refuses_sparse_output(ray_local, sample_corpus, tmp_path):
    with pytest.raises(Exception, match="dense output only"):
        run_embed_job(CorpusSpec(str(sample_corpus)), str(tmp_path / "out"), EmbedderSpec(max_length=32),
                      outputs="dense,sparse", index_kind="none")
    assert not (tmp_path / "out" / "manifest.json").exists()
    with pytest.raises(ValueError, match="subset of dense,sparse,colbert"):
        run_embed_job(CorpusSpec(str(sample_corpus)), str(tmp_path / "out2"), EmbedderSpec(), outputs="dense,lexical")
