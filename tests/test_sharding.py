"""Planning and reading shards of every input format without whole-file reads (no Ray)."""

from __future__ import annotations

import csv
import gzip
import json

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from bge_ray.io.sharding import BadRecordError, Shard, plan_file, read_shard

ROWS = [{"_id": f"d{i}", "text": f"text {i}" + (' with "quotes", commas\nand a newline' if i % 7 == 0 else "")}
        for i in range(53)]


def _write_inputs(d):
    jl = d / "c.jsonl"
    jl.write_text("".join(json.dumps(r) + "\n" + ("\n" if i % 11 == 0 else "") for i, r in enumerate(ROWS)))
    c = d / "c.csv"
    with open(c, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["_id", "text"])
        for r in ROWS:
            w.writerow([r["_id"], r["text"]])
    t = d / "c.tsv"
    t.write_text("_id\ttext\n" + "".join(f"{r['_id']}\t{r['text'].splitlines()[0]}\n" for r in ROWS))
    for p in (jl, c, t):
        (d / (p.name + ".gz")).write_bytes(gzip.compress(p.read_bytes()))
    pq.write_table(pa.Table.from_pylist(ROWS), d / "c.parquet", row_group_size=8)
    return {"c.jsonl": "json", "c.jsonl.gz": "json", "c.csv": "csv", "c.csv.gz": "csv", "c.tsv": "csv",
            "c.tsv.gz": "csv", "c.parquet": "parquet"}


def _read_all(path, fmt, fs, rows_per_shard=10):
    plan = plan_file(str(path), fmt, rows_per_shard, fs)
    got = []
    for i, d in enumerate(plan):
        table, bad = read_shard(Shard(index=i, **{"offset": None, "first_line": None, **d}), "_id", ("text",), fs)
        assert not bad
        got += list(zip(table["id"].to_pylist(), table["text"].to_pylist(), strict=True))
    return plan, got


@pytest.mark.parametrize("fs", [None, pafs.LocalFileSystem()], ids=["open", "pyarrow-fs"])
def test_every_format_reads_back_each_row_once_in_order(tmp_path, fs):
    for name, fmt in _write_inputs(tmp_path).items():
        plan, got = _read_all(tmp_path / name, fmt, fs)
        want = [(r["_id"], r["text"].splitlines()[0] if name.startswith("c.tsv") else r["text"]) for r in ROWS]
        assert got == want, name
        assert [s["rows"] for s in plan] == [10] * 5 + [3], name
        if fmt != "parquet" and not name.endswith(".gz"):
            assert all(s["offset"] is not None for s in plan), "plain text files are read from byte offsets"


def test_quoted_newlines_stay_in_their_csv_record(tmp_path):
    _write_inputs(tmp_path)
    plan = plan_file(str(tmp_path / "c.csv"), "csv", 10)
    # Record 7 spans two lines, so shard 1 (records 10..19) starts past line 1 + 10 + 2 (records 0 and 7).
    assert plan[1]["first_line"] == 1 + 10 + 2 + 1


def test_bad_jsonl_line_in_a_gz_file_is_named(tmp_path):
    lines = [json.dumps(r) for r in ROWS[:12]]
    lines[10] = '{"_id": "x", "text": '
    (tmp_path / "bad.jsonl.gz").write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    plan = plan_file(str(tmp_path / "bad.jsonl.gz"), "json", 5)
    with pytest.raises(BadRecordError, match=r"bad\.jsonl\.gz:11: malformed JSON"):
        read_shard(Shard(index=2, **{"offset": None, **plan[2]}), "_id", ("text",))
    table, bad = read_shard(Shard(index=2, **{"offset": None, **plan[2]}), "_id", ("text",), skip_bad=True)
    assert table.num_rows == 1 and len(bad) == 1 and bad[0].startswith(f"{tmp_path}/bad.jsonl.gz:11: malformed JSON")


def test_file_changed_after_planning_is_reported(tmp_path):
    p = tmp_path / "c.csv.gz"
    _write_inputs(tmp_path)
    plan = plan_file(str(p), "csv", 10)
    p.write_bytes(gzip.compress(b"_id,text\nd0,x\n"))
    with pytest.raises(BadRecordError, match="did the file change since planning"):
        read_shard(Shard(index=5, **{"offset": None, **plan[5]}), "_id", ("text",))
