"""Embed job integrity on a real local Ray: committed shards are checked before they count as done,
ids are one type, a row's fields do not depend on its shard's first row, NaN never lands."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from bge_ray.batch.embed import run_embed_job
from bge_ray.io.readers import CorpusSpec
from bge_ray.io.shards import read_embeddings
from bge_ray.models.spec import EmbedderSpec

pytestmark = [pytest.mark.ray, pytest.mark.slow]
SPEC = EmbedderSpec(max_length=32, batch_size=16)
GOOD = [json.dumps({"_id": f"d{i}", "text": f"passage number {i}"}) for i in range(6)]


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _vectors(out) -> dict[str, np.ndarray]:
    ids, emb = read_embeddings(str(out / "shards"))
    return dict(zip(ids, emb, strict=True))


def test_broken_committed_shards_are_redone_not_trusted(ray_local, tmp_path):
    """Zero-length, corrupt and short shards (a crash mid-copy, a bad disk) are embedded again;
    the sound one is kept."""
    import pyarrow as pa

    f = _write(tmp_path / "c.jsonl", GOOD)
    out = tmp_path / "o"
    run_embed_job(CorpusSpec(str(f)), str(out), SPEC, index_kind="none", rows_per_shard=2)
    before = _vectors(out)
    shards = out / "shards"
    kept = pq.read_table(shards / "part-00000.parquet")
    (shards / "part-00001.parquet").write_bytes(b"")
    (shards / "part-00002.parquet").write_bytes(b"PAR1 not really parquet")
    res = run_embed_job(CorpusSpec(str(f)), str(out), SPEC, index_kind="none", rows_per_shard=2)
    assert res.manifest["skipped_shards"] == 1 and res.manifest["embedded_shards"] == 2
    assert pq.read_table(shards / "part-00000.parquet").equals(kept)
    after = _vectors(out)
    assert sorted(after) == sorted(before)
    assert all(np.allclose(after[i], before[i], atol=1e-6) for i in before)
    # A shard missing rows, with no skipped records noted, is redone rather than booked as bad records.
    short = kept.slice(1)
    pq.write_table(pa.table(short.columns, names=short.column_names), shards / "part-00000.parquet")
    res = run_embed_job(CorpusSpec(str(f)), str(out), SPEC, index_kind="none", rows_per_shard=2)
    assert res.manifest["embedded_shards"] == 1 and res.manifest["bad_records"] == 0
    assert res.manifest["rows"] == len(GOOD)


def test_skipped_records_are_counted_from_the_shards_on_a_rerun_with_fail(ray_local, tmp_path):
    lines = GOOD[:3] + ['{"_id": "x", "text": '] + GOOD[3:]
    f = _write(tmp_path / "c.jsonl", lines)
    out = tmp_path / "o"
    run_embed_job(CorpusSpec(str(f)), str(out), SPEC, index_kind="none", rows_per_shard=4, on_bad_record="skip")
    (out / "shards" / "part-00001.parquet").unlink()  # the shard without the bad line
    res = run_embed_job(CorpusSpec(str(f)), str(out), SPEC, index_kind="none", rows_per_shard=4)
    assert res.manifest["embedded_shards"] == 1
    assert res.manifest["bad_records"] == 1 and "c.jsonl:4" in res.manifest["bad_record_examples"][0]


def test_integer_and_string_ids_fail_at_read_naming_both_places(ray_local, tmp_path):
    """The two ids in different shards (read by different tasks): the plan's id kind still catches it."""
    rows_per_shard = 2
    lines = [json.dumps({"_id": 1, "text": "one"}), GOOD[0].replace('"d0"', "2"), json.dumps({"_id": "1", "text": "x"})]
    f = _write(tmp_path / "c.jsonl", lines)
    res = run_embed_job(CorpusSpec(str(f)), str(tmp_path / "s"), SPEC, index_kind="none",
                        rows_per_shard=rows_per_shard, on_bad_record="skip")
    assert res.manifest["rows"] == 2 and res.manifest["bad_records"] == 1
    with pytest.raises(Exception, match=r"c\.jsonl:3: id '1' in field '_id' is a string but this job's ids are "
                                        r"integers \(as at .*c\.jsonl:1\)") as err:
        run_embed_job(CorpusSpec(str(f)), str(tmp_path / "o"), SPEC, index_kind="none", rows_per_shard=rows_per_shard)
    assert "duplicate" not in str(err.value)  # found while reading, not by the id check at the end
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_csv_ids_stay_text(ray_local, tmp_path):
    (tmp_path / "c.csv").write_text("id,text\n007,first\n7,second\n0x1F,third\n")
    run_embed_job(CorpusSpec(str(tmp_path / "c.csv")), str(tmp_path / "o"), SPEC, index_kind="none")
    assert sorted(_vectors(tmp_path / "o")) == ["007", "0x1F", "7"]


def test_a_first_row_without_title_keeps_the_other_rows_titles(ray_local, tmp_path):
    lines = [json.dumps({"_id": "a", "text": "no title here"}),
             json.dumps({"_id": "b", "title": "Paris", "text": "capital of France"})]
    f = _write(tmp_path / "c.jsonl", lines)
    run_embed_job(CorpusSpec(str(f)), str(tmp_path / "o"), SPEC, index_kind="none")
    got = _vectors(tmp_path / "o")
    model = SPEC.load(devices="cpu")
    want = model.encode_corpus(["no title here", "Paris capital of France"])
    assert np.allclose(got["a"], want[0], atol=1e-5) and np.allclose(got["b"], want[1], atol=1e-5)


def test_nan_vectors_fail_the_shard_naming_the_row(ray_local, tiny_bert, tmp_path):
    """A checkpoint whose embedding of one token is NaN: the row holding that token fails its shard."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    model_dir = tmp_path / "nan-bert"
    shutil.copytree(tiny_bert, model_dir)
    weights = load_file(str(model_dir / "model.safetensors"))
    key = next(k for k in weights if k.endswith("word_embeddings.weight"))
    token = AutoTokenizer.from_pretrained(str(model_dir)).convert_tokens_to_ids("zebra")
    weights[key][token] = torch.nan
    save_file(weights, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    lines = GOOD[:3] + [json.dumps({"_id": "striped", "text": "a zebra in the field"})] + GOOD[3:]
    f = _write(tmp_path / "c.jsonl", lines)
    spec = EmbedderSpec(str(model_dir), model_class="encoder-only-base", pooling_method="cls", max_length=32,
                        batch_size=16)
    with pytest.raises(Exception, match=r"row id 'striped' of .*c\.jsonl \(shard 1\): the model's dense output holds "
                                        r"NaN or inf"):
        run_embed_job(CorpusSpec(str(f)), str(tmp_path / "o"), spec, index_kind="none", rows_per_shard=3)
    assert not (tmp_path / "o" / "shards" / "part-00001.parquet").exists()
    assert not (tmp_path / "o" / "manifest.json").exists()
