"""Checking a finished embed job on the cluster: every planned shard committed with its planned row
count, and every id unique, without the driver holding a row.

Ids are hash-partitioned into buckets by map tasks (each reads the ``id`` column of a group of
shards) and each bucket is checked by one reduce task, the usual Ray shuffle: the driver holds one
statistics record per shard and one object reference per (map task, bucket).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bge_ray.io.store import Store

#: Ids one reduce task checks at most (a bucket of 4M ids is a few hundred MB in one worker).
IDS_PER_BUCKET = 4_000_000
#: Map tasks at most: bounds the driver's references to MAP_TASKS x buckets.
MAP_TASKS = 256
#: Jobs up to this many rows are checked in the driver itself (a bounded few MB of ids): fresh worker
#: processes for the map and reduce tasks cost seconds, more than the check on a small job.
LOCAL_ROWS = 100_000


#: Key of a shard's parquet metadata holding its skipped bad records (``{"n_bad", "bad"}``).
SHARD_META = b"bge_ray.shard"


@dataclass
class ShardStats:
    index: int
    rows: int
    tokens: int
    dim: int | None
    colbert_dim: int | None
    n_bad: int = 0
    bad: list | None = None  # where the first skipped records were


def shard_bad_records(metadata: dict | None) -> tuple[int, list]:
    """(count, first places) of the bad records a shard's commit skipped, from its parquet metadata."""
    raw = (metadata or {}).get(SHARD_META)
    if raw is None:
        return 0, []
    got = json.loads(raw)
    return int(got["n_bad"]), list(got["bad"])


def _shard_name(index: int) -> str:
    return f"shards/part-{index:05d}.parquet"


def _bucket_of(ids: pa.Array, buckets: int) -> np.ndarray:
    import pandas as pd

    if buckets == 1:
        return np.zeros(len(ids), np.int64)
    hashes = pd.util.hash_array(np.asarray(ids.to_numpy(zero_copy_only=False), dtype=object))
    return (hashes % np.uint64(buckets)).astype(np.int64)


def map_shards(store: Store, indexes: list[int], buckets: int):
    """Per shard: statistics; per bucket: a table (id, shard) of the group's ids in that bucket."""
    stats, parts = [], [[] for _ in range(buckets)]
    for index in indexes:
        name = _shard_name(index)
        if not store.exists(name):
            stats.append(None)
            continue
        pf = store.parquet_file(name)
        schema = pf.schema_arrow
        table = pf.read(columns=["id", "n_tokens"])
        stats.append(ShardStats(
            index, table.num_rows, int(pc.sum(table["n_tokens"]).as_py() or 0),
            schema.field("embedding").type.list_size if "embedding" in schema.names else None,
            schema.field("colbert").type.value_type.list_size if "colbert" in schema.names else None,
            *shard_bad_records(schema.metadata),
        ))
        ids = table["id"].combine_chunks()
        which = _bucket_of(ids, buckets)
        shard = pa.array(np.full(len(ids), index, np.int32))
        for b in range(buckets):
            mask = which == b
            parts[b].append(pa.table({"id": ids.filter(pa.array(mask)), "shard": shard.filter(pa.array(mask))}))
    tables = [pa.concat_tables(p) if p else pa.table({"id": pa.array([], pa.string()),
                                                        "shard": pa.array([], pa.int32())}) for p in parts]
    return (stats, *tables) if buckets > 1 else (stats, tables[0])


def reduce_bucket(*parts: pa.Table, examples: int = 5) -> tuple[int, list[tuple[str, int, int]]]:
    """Ids seen in more than one row, and up to ``examples`` of them with two shards each holds them."""
    table = pa.concat_tables(parts)
    if table.num_rows == 0:
        return 0, []
    counts = table.group_by("id").aggregate([("shard", "count"), ("shard", "min"), ("shard", "max")])
    dups = counts.filter(pc.greater(counts["shard_count"], 1))
    found = [(r["id"], r["shard_min"], r["shard_max"]) for r in dups.slice(0, examples).to_pylist()]
    return dups.num_rows, found


def verify_shards(store: Store, indexes: list[int], total_rows: int, num_cpus: float = 0.25):
    """Statistics of every shard in ``indexes`` (None where the shard is missing) and the duplicate
    ids: ``(stats, n_duplicate_ids, [(id, shard, other shard), ...])``."""
    import ray

    if total_rows <= LOCAL_ROWS:
        stats, table = map_shards(store, indexes, 1)
        n_dups, examples = reduce_bucket(table)
        return stats, n_dups, examples
    buckets = max(1, math.ceil(total_rows / IDS_PER_BUCKET))
    groups = max(1, min(MAP_TASKS, len(indexes)))
    size = math.ceil(len(indexes) / groups)
    chunks = [indexes[i:i + size] for i in range(0, len(indexes), size)]
    mapper = ray.remote(num_cpus=num_cpus, num_returns=1 + buckets)(map_shards)
    outs = [mapper.remote(store, chunk, buckets) for chunk in chunks]
    reducer = ray.remote(num_cpus=num_cpus)(reduce_bucket)
    reduced = [reducer.remote(*[o[1 + b] for o in outs]) for b in range(buckets)]
    stats = [s for o in outs for s in ray.get(o[0])]
    n_dups, examples = 0, []
    for n, found in ray.get(reduced):
        n_dups += n
        examples += found
    return stats, n_dups, examples
