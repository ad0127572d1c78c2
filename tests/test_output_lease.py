"""One run per output: a second run started into a live run's output is refused and the first run
loses nothing; an output that cannot be written fails before any embedding, naming its URI."""

from __future__ import annotations

import json
import threading
import time

import pyarrow.dataset as pads
import pytest

from bge_ray.batch.embed import run_embed_job
from bge_ray.io.lease import LEASES, Lease, OutputInUse
from bge_ray.io.readers import CorpusSpec
from bge_ray.io.store import Store, filesystem
from bge_ray.models.spec import EmbedderSpec

pytestmark = [pytest.mark.ray, pytest.mark.slow]
SPEC = EmbedderSpec(max_length=32, batch_size=16)


def _ids(path):
    return sorted(json.loads(line)["_id"] for line in open(path, encoding="utf-8") if line.strip())


def _first_run_in_background(corpus, out, tmp_path):
    """Start a run that stalls 5 s on its shard 2; return (thread, result box) once it holds the lease."""
    box = {}

    def run():
        try:
            box["result"] = run_embed_job(
                corpus, out, SPEC, rows_per_shard=10, index_kind="flat",
                runtime_env={"env_vars": {"BGE_RAY_FAULT": "sleep:2", "BGE_RAY_FAULT_SLEEP": "5",
                                          "BGE_RAY_FAULT_DIR": str(tmp_path)}})
        except BaseException as e:  # surfaced by the test
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    store = Store(out)
    deadline = time.time() + 60
    while not store.list(LEASES) and time.time() < deadline and t.is_alive():
        time.sleep(0.1)
    assert store.list(LEASES), f"the first run never took its lease: {box.get('error')!r}"
    return t, box


@pytest.mark.parametrize("where", ["local", "s3"])
def test_second_run_into_a_live_output_is_refused_and_the_first_loses_nothing(
        where, s3_server, ray_local, sample_corpus, tmp_path):
    if where == "s3":
        s3_server.create_bucket(Bucket="leased")
        out = "s3://leased/job"
    else:
        out = str(tmp_path / "out")
    corpus = CorpusSpec(str(sample_corpus))
    first, box = _first_run_in_background(corpus, out, tmp_path)

    for overwrite in (False, True):  # --overwrite must not delete a live run's shards either
        with pytest.raises(OutputInUse, match="is in use by another run") as err:
            run_embed_job(corpus, out, SPEC, rows_per_shard=10, index_kind="none", overwrite=overwrite)
        assert out in str(err.value)

    first.join(120)
    assert not first.is_alive() and "error" not in box, box.get("error")
    manifest = box["result"].manifest
    assert manifest["rows"] == manifest["unique_ids"] == 60 and manifest["embedded_shards"] == 6
    fs, path = filesystem(f"{out}/shards")
    ids = pads.dataset(path, format="parquet", filesystem=fs).to_table(columns=["id"])["id"].to_pylist()
    assert sorted(ids) == _ids(sample_corpus)
    store = Store(out)
    assert store.exists("manifest.json") and store.exists("index.faiss")
    assert store.list(LEASES) == [], "the finished run released its lease"
    # Once the first run is done the output is free: a rerun finds every shard committed.
    again = run_embed_job(corpus, out, SPEC, rows_per_shard=10, index_kind="none").manifest
    assert again["skipped_shards"] == 6 and again["embedded_shards"] == 0


def test_missing_bucket_fails_before_any_embedding_naming_the_uri(s3_server, ray_local, sample_corpus,
                                                                   monkeypatch):
    import bge_ray.batch.embed as embed

    def no_planning(*a, **k):
        raise AssertionError("the job planned (and would embed) before finding its output unwritable")

    monkeypatch.setattr(embed, "plan_job", no_planning)
    with pytest.raises(OSError, match="cannot write to s3://no-such-bucket/runs/x"):
        run_embed_job(CorpusSpec(str(sample_corpus)), "s3://no-such-bucket/runs/x", SPEC, index_kind="none")


def test_output_under_a_regular_file_fails_naming_the_path(ray_local, sample_corpus, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError, match=str(blocker / "out")):
        run_embed_job(CorpusSpec(str(sample_corpus)), str(blocker / "out"), SPEC, index_kind="none")


def test_an_expired_lease_is_taken_over_and_a_live_one_is_not(tmp_path):
    store = Store(str(tmp_path / "o"))
    dead = Lease(store, ttl=0.5).acquire()
    dead._stop.set()  # a crashed run: no more heartbeats, the lease object left behind
    dead._thread.join()
    with pytest.raises(OutputInUse):
        Lease(store).acquire()
    time.sleep(0.7)
    with Lease(store) as live:
        assert store.list(LEASES) == [live.key.split("/")[1]]
        with pytest.raises(OutputInUse, match="pid"):
            Lease(store).acquire()
    assert store.list(LEASES) == []
