"""Embed job robustness on a real local Ray: a killed actor, an interrupted run resumed, bad input."""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest

from bge_ray.batch.embed import run_embed_job
from bge_ray.io.readers import CorpusSpec
from bge_ray.io.shards import read_embeddings
from bge_ray.models.spec import EmbedderSpec

pytestmark = [pytest.mark.ray, pytest.mark.slow]
SPEC = EmbedderSpec(max_length=32, batch_size=16)


def _ids(path):
    return [json.loads(line)["_id"] for line in open(path, encoding="utf-8") if line.strip()]


def _assert_every_row_once(out, expected_ids):
    ids, emb = read_embeddings(str(out / "shards"))
    assert sorted(ids) == sorted(expected_ids)
    assert len(set(ids)) == len(ids) == emb.shape[0]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rows"] == manifest["unique_ids"] == len(expected_ids)
    return manifest


def test_killed_actor_is_restarted_and_every_row_lands_once(ray_local, sample_corpus, tmp_path):
    out = tmp_path / "out"
    result = run_embed_job(
        CorpusSpec(str(sample_corpus)), str(out), SPEC, rows_per_shard=10, index_kind="none",
        runtime_env={"env_vars": {"BGE_RAY_FAULT": "exit:2"}},
    )
    assert (out / ".fault-2").exists(), "the fault was not injected"
    manifest = _assert_every_row_once(out, _ids(sample_corpus))
    assert result.rows == 60 and manifest["embedded_shards"] == 6


def test_interrupted_run_resumes_only_missing_shards(ray_local, sample_corpus, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(Exception, match="injected failure at item 3"):
        run_embed_job(
            CorpusSpec(str(sample_corpus)), str(out), SPEC, rows_per_shard=10, index_kind="none",
            runtime_env={"env_vars": {"BGE_RAY_FAULT": "raise:3"}},
        )
    assert not (out / "manifest.json").exists(), "a failed run must not look complete"
    committed = sorted(p.name for p in (out / "shards").glob("*.parquet"))
    assert "part-00003.parquet" not in committed
    assert not list((out / "shards").glob(".*")), "half-written shard left behind"
    before = {p: pq.read_table(out / "shards" / p) for p in committed}

    manifest = run_embed_job(CorpusSpec(str(sample_corpus)), str(out), SPEC, rows_per_shard=10).manifest
    assert manifest["skipped_shards"] == len(committed)
    assert manifest["embedded_shards"] == 6 - len(committed)
    for name, table in before.items():  # committed shards were not rewritten
        assert pq.read_table(out / "shards" / name).equals(table)
    _assert_every_row_once(out, _ids(sample_corpus))
    assert (out / "index.faiss").exists()


def test_rerun_with_other_settings_is_refused(ray_local, sample_corpus, tmp_path):
    out = tmp_path / "out"
    run_embed_job(CorpusSpec(str(sample_corpus)), str(out), SPEC, rows_per_shard=30, index_kind="none")
    with pytest.raises(ValueError, match=r"different job \(shard size, shard boundaries changed\)"):
        run_embed_job(CorpusSpec(str(sample_corpus)), str(out), SPEC, rows_per_shard=20, index_kind="none")


def test_weights_replaced_at_the_same_path_refuse_the_resume_and_miss_the_caches(
        ray_local, sample_corpus, tiny_bert, tmp_path):
    """A model folder rewritten in place (a fine-tuning run saving over it) is another model: the
    resumed job refuses to mix its vectors with the old ones, and every vector cache misses."""
    import numpy as np
    from safetensors.torch import load_file, save_file

    from bge_ray.batch.mine import PASSAGE, QUERY, EmbeddingCache, cache_settings
    from bge_ray.eval.runner import corpus_cache_dir

    model = tmp_path / "bge-tiny-bert"
    shutil.copytree(tiny_bert, model)
    spec = EmbedderSpec(model=str(model), model_class="encoder-only-base", pooling_method="cls", max_length=32,
                        batch_size=16, use_fp16=False)
    out = tmp_path / "out"
    run_embed_job(CorpusSpec(str(sample_corpus)), str(out), spec, rows_per_shard=30, index_kind="none")
    _, before = read_embeddings(str(out / "shards"))
    keys = {role: EmbeddingCache(str(tmp_path / "cache"), cache_settings(spec, role)).key for role in (PASSAGE, QUERY)}
    eval_dir = corpus_cache_dir(str(tmp_path / "emb"), spec, "msmarco")
    # Unchanged files: the same identity (a rerun resumes, the caches hit).
    assert keys[PASSAGE] == EmbeddingCache(str(tmp_path / "cache"), cache_settings(spec, PASSAGE)).key
    assert run_embed_job(CorpusSpec(str(sample_corpus)), str(out), spec, rows_per_shard=30,
                         index_kind="none").manifest["skipped_shards"] == 2

    weights = load_file(str(model / "model.safetensors"))
    save_file({k: v * 1.5 for k, v in weights.items()}, str(model / "model.safetensors"), metadata={"format": "pt"})

    with pytest.raises(ValueError, match=r"different job \(model files changed\)"):
        run_embed_job(CorpusSpec(str(sample_corpus)), str(out), spec, rows_per_shard=30, index_kind="none")
    for role in (PASSAGE, QUERY):
        assert EmbeddingCache(str(tmp_path / "cache"), cache_settings(spec, role)).key != keys[role]
    assert corpus_cache_dir(str(tmp_path / "emb"), spec, "msmarco") != eval_dir
    # --overwrite embeds again with the new weights.
    run_embed_job(CorpusSpec(str(sample_corpus)), str(out), spec, rows_per_shard=30, index_kind="none",
                  overwrite=True)
    _, after = read_embeddings(str(out / "shards"))
    assert after.shape == before.shape and not np.allclose(after, before, atol=1e-3)


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


GOOD = [json.dumps({"_id": f"d{i}", "text": f"passage number {i}"}) for i in range(6)]


def test_malformed_line_fails_naming_file_and_line(ray_local, tmp_path):
    f = _write(tmp_path / "c.jsonl", GOOD[:2] + ['{"_id": "x", "text": '] + GOOD[2:])
    with pytest.raises(Exception, match=r"c\.jsonl:3: malformed JSON"):
        run_embed_job(CorpusSpec(str(f)), str(tmp_path / "o"), SPEC, index_kind="none")
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_skip_counts_and_reports_bad_records(ray_local, tmp_path):
    lines = GOOD[:2] + ['{"_id": "x", "text": '] + [json.dumps({"text": "no id"})] + GOOD[2:] + [
        json.dumps({"_id": "y", "body": "no text field"})
    ]
    f = _write(tmp_path / "c.jsonl", lines)
    res = run_embed_job(CorpusSpec(str(f)), str(tmp_path / "o"), SPEC, index_kind="none", on_bad_record="skip")
    m = res.manifest
    assert m["rows"] == 6 and m["bad_records"] == 3
    text = " ".join(m["bad_record_examples"])
    assert "c.jsonl:3" in text and "c.jsonl:4: missing id" in text and "c.jsonl:9: missing text" in text


@pytest.mark.parametrize("where", ["driver", "cluster"])
def test_duplicate_ids_fail_without_a_manifest(ray_local, tmp_path, monkeypatch, where):
    """Small jobs check ids in the driver; large ones by the cluster's hash-partitioned shuffle (here
    forced, with 3 buckets and the duplicate in two different shards)."""
    from bge_ray.batch import verify

    if where == "cluster":
        monkeypatch.setattr(verify, "LOCAL_ROWS", 0)
        monkeypatch.setattr(verify, "IDS_PER_BUCKET", 3)
    f = _write(tmp_path / "c.jsonl", GOOD + [json.dumps({"_id": "d1", "text": "again"})])
    with pytest.raises(ValueError, match="duplicate id 'd1'"):
        run_embed_job(CorpusSpec(str(f)), str(tmp_path / "o"), SPEC, index_kind="none", rows_per_shard=3)
    assert not (tmp_path / "o" / "manifest.json").exists()
    if where == "cluster":
        return  # the driver case shows a clean corpus passes; the shuffle's tasks cost seconds each time
    good = _write(tmp_path / "good.jsonl", GOOD)
    res = run_embed_job(CorpusSpec(str(good)), str(tmp_path / "g"), SPEC, index_kind="none", rows_per_shard=3)
    assert res.manifest["rows"] == len(GOOD)


def test_empty_file_and_missing_path(ray_local, tmp_path):
    empty = _write(tmp_path / "empty.jsonl", [])
    with pytest.raises(ValueError, match="holds no rows"):
        run_embed_job(CorpusSpec(str(empty)), str(tmp_path / "o"), SPEC)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_embed_job(CorpusSpec(str(tmp_path / "nope.jsonl")), str(tmp_path / "o2"), SPEC)


def test_parquet_and_csv_inputs_with_named_fields(ray_local, tmp_path):
    import pyarrow as pa

    t = pa.table({"doc": [f"p{i}" for i in range(5)], "body": [f"body text {i}" for i in range(5)]})
    pq.write_table(t, tmp_path / "c.parquet")
    res = run_embed_job(CorpusSpec(str(tmp_path / "c.parquet"), id_field="doc", text_fields=("body",)),
                        str(tmp_path / "o1"), SPEC, index_kind="none")
    assert res.rows == 5
    (tmp_path / "c.csv").write_text("doc,body\n" + "".join(f"c{i},csv text {i}\n" for i in range(4)))
    res = run_embed_job(CorpusSpec(str(tmp_path / "c.csv"), id_field="doc", text_fields=("body",)),
                        str(tmp_path / "o2"), SPEC, index_kind="none")
    assert res.rows == 4
    shutil.rmtree(tmp_path / "o1")


def test_plan_is_the_same_in_the_driver_and_in_ray_tasks(ray_local, tmp_path, monkeypatch):
    """Small inputs are planned in the driver, large ones by one Ray task per file: same plan."""
    from bge_ray.batch import embed

    (tmp_path / "in").mkdir()
    for k in range(3):
        _write(tmp_path / "in" / f"c{k}.jsonl", GOOD[2 * k : 2 * k + 2])
    corpus = CorpusSpec(str(tmp_path / "in"))
    here = embed.plan_job(corpus, SPEC, None, 2)
    monkeypatch.setattr(embed, "LOCAL_PLAN_BYTES", 0)
    assert embed.plan_job(corpus, SPEC, None, 2) == here and len(here["files"]) == 3
