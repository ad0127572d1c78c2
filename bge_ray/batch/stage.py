"""The one place models run on Ray: work items -> a CPU prepare stage -> a model actor pool.

A work item is one Ray Data row holding a whole unit of work (a shard of the corpus, a chunk of
queries, a chunk of reranking pairs), so a block never splits an item and an actor call is sized by
the caller, not by Ray Data's block shaping. Arrays travel packed as bytes (:func:`pack`).

- prepare (tasks, CPU; for GPU actors): reads the item's rows when it names a shard (``reader``) and
  tokenises passages with the model's tokenizer, so an accelerator never waits on parsing or
  tokenising (CPU actors read and tokenise their own items: :func:`model_stage`);
- model (actors, one per GPU or per core share): role-aware. ``passage`` items run the model on their
  token ids (dense / sparse / ColBERT outputs), ``query`` items go through ``encode_queries`` (query
  instruction, ICL examples, ``query_max_length``), ``pair`` items through ``compute_score``.

Every caller (the embed job, mining, teacher scores, evaluation, the MTEB adapter) goes through
:func:`model_stage`; :func:`run_items` is the in-memory form.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

QUERY, PASSAGE, PAIR = "query", "passage", "pair"
ROLES = (QUERY, PASSAGE, PAIR)
OUTPUTS = ("dense", "sparse", "colbert")

#: Texts per in-memory work item: big enough to fill a pass, small enough to spread over the pool.
ROWS_PER_ITEM = 1024

_PACKED = ("tokens", "token_counts", "dense", "sparse_ids", "sparse_weights", "sparse_counts", "colbert",
           "colbert_counts", "scores", "n_tokens")

#: Every work item and every result has this schema (unused columns are null), so blocks from
#: different stages and roles always concatenate.
ITEM_SCHEMA = pa.schema(
    [("item", pa.int64()), ("role", pa.string()), ("ids", pa.large_list(pa.string())),
     ("texts", pa.large_list(pa.string())), ("passages", pa.large_list(pa.string())),
     ("meta", pa.string()), ("dim", pa.int64()), ("colbert_dim", pa.int64())]
    + [(name, pa.large_binary()) for name in _PACKED]
    + [("started", pa.float64()), ("model_seconds", pa.float64()), ("init_started", pa.float64()),
       ("init_seconds", pa.float64()), ("process_started", pa.float64()), ("node", pa.string())]
)


def parse_outputs(outputs: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"dense,sparse"`` or a sequence -> the outputs in canonical order; at least one, all known."""
    if outputs is None:
        return ("dense",)
    names = [o.strip() for o in (outputs.split(",") if isinstance(outputs, str) else outputs) if o.strip()]
    unknown = sorted(set(names) - set(OUTPUTS))
    if unknown or not names:
        raise ValueError(f"outputs must be a comma-separated subset of {','.join(OUTPUTS)}, got {outputs!r}")
    return tuple(o for o in OUTPUTS if o in names)


def pack(array: np.ndarray | None, dtype) -> bytes | None:
    return None if array is None else np.ascontiguousarray(array, dtype=dtype).tobytes()


def unpack(blob: bytes | None, dtype, width: int | None = None) -> np.ndarray | None:
    if blob is None:
        return None
    arr = np.frombuffer(blob, dtype=dtype)
    return arr.reshape(-1, width) if width else arr


def split_rows(flat: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
    """``flat`` cut into consecutive pieces of ``counts`` rows."""
    return np.split(flat, np.cumsum(counts)[:-1]) if len(counts) else []


def item_row(item: int, role: str, ids: Sequence[str], texts: Sequence[str] | None = None,
             passages: Sequence[str] | None = None, meta: dict | None = None) -> dict:
    """One work item as a row of :data:`ITEM_SCHEMA`."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    row = dict.fromkeys(ITEM_SCHEMA.names)
    row.update(item=item, role=role, ids=list(ids), texts=None if texts is None else list(texts),
               passages=None if passages is None else list(passages),
               meta=json.dumps(meta) if meta is not None else None)
    return row


def to_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=ITEM_SCHEMA)


# -- the CPU stage ---------------------------------------------------------------------------------
_TOKENIZERS: dict[str, object] = {}


def _tokenizer_side(spec):
    """The spec's model loaded without weights, once per worker process (tasks reuse workers)."""
    key = repr(spec)
    if key not in _TOKENIZERS:
        _TOKENIZERS.clear()
        _TOKENIZERS[key] = spec.load(devices="cpu", load_weights=False)
    return _TOKENIZERS[key]


def prepare_items(batch: pa.Table, spec, reader: Callable[[dict], tuple[list, list, dict]] | None = None,
                  tokenize: bool = True) -> pa.Table:
    """Ray Data task: read the rows of items that name a shard (``reader(meta)`` -> ids, texts, meta)
    and, with ``tokenize``, tokenise every passage item; query and pair items pass through."""
    rows = batch.to_pylist()
    for row in rows:
        if row["role"] != PASSAGE:
            continue
        if row["texts"] is None and reader is not None:
            row["ids"], row["texts"], meta = reader(json.loads(row["meta"]))
            row["meta"] = json.dumps(meta)
        if not tokenize:
            continue
        features = _tokenizer_side(spec).corpus_features(row["texts"] or [])
        ids = features.columns["input_ids"]
        row["token_counts"] = pack(features.lengths, np.int32)
        row["tokens"] = pack(np.concatenate([np.asarray(x, np.int32) for x in ids]) if ids else np.zeros(0), np.int32)
        row["texts"] = None  # the model stage needs the tokens only
    return to_table(rows)


# -- the accelerator stage -------------------------------------------------------------------------
def _maybe_inject_fault(marker_dir: str | None, item: int) -> None:
    """Test hook: ``BGE_RAY_FAULT=exit:N`` kills the actor process (once) when it reaches item N,
    ``raise:N`` raises instead, ``sleep:N`` stalls it ``BGE_RAY_FAULT_SLEEP`` seconds (default 10); a marker file in ``marker_dir`` (or ``BGE_RAY_FAULT_DIR``, for outputs
    on an object store) makes it the first attempt only."""
    fault = os.environ.get("BGE_RAY_FAULT", "")
    marker_dir = os.environ.get("BGE_RAY_FAULT_DIR") or marker_dir
    if not fault or marker_dir is None:
        return
    kind, _, n = fault.partition(":")
    if str(item) != n:
        return
    marker = os.path.join(marker_dir, f".fault-{item}")
    if os.path.exists(marker):
        return
    open(marker, "w").close()
    if kind == "exit":
        os._exit(1)
    if kind == "sleep":
        time.sleep(float(os.environ.get("BGE_RAY_FAULT_SLEEP", "10")))
        return
    raise RuntimeError(f"injected failure at item {item}")


class ModelActor:
    """Ray Data callable class: loads the model once (embedder or reranker spec), runs each item."""

    def __init__(self, spec, torch_threads: int | None = None, outputs: Sequence[str] = ("dense",),
                 fault_dir: str | None = None, reader: Callable | None = None,
                 commit: Callable[[pa.Table], pa.Table] | None = None):
        import psutil
        import ray

        from .runtime import actor_device

        self.init_started = time.time()
        self.process_started = psutil.Process().create_time()
        self.node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        self.spec, self.outputs, self.fault_dir = spec, parse_outputs(outputs), fault_dir
        self.reader, self.commit = reader, commit
        self.model = spec.load(devices=actor_device(torch_threads))
        self.init_seconds = time.time() - self.init_started

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Each item through (read, when given a ``reader``) the model (and ``commit``, when given)."""
        if self.reader is not None:
            batch = prepare_items(batch, self.spec, self.reader, tokenize=False)
        out = []
        for row in batch.to_pylist():
            started, t0 = time.time(), time.perf_counter()
            _maybe_inject_fault(self.fault_dir, row["item"])
            if row["role"] == PAIR:
                self._score(row)
            else:
                self._embed(row)
            row.update(texts=None, passages=None, tokens=None, token_counts=None, started=started,
                       model_seconds=time.perf_counter() - t0, init_started=self.init_started,
                       init_seconds=self.init_seconds, process_started=self.process_started, node=self.node)
            out.append(row)
        return to_table(out) if self.commit is None else self.commit(to_table(out))

    def _score(self, row: dict) -> None:
        pairs = list(zip(row["texts"], row["passages"], strict=True))
        scores = np.asarray(self.model.compute_score(pairs, batch_size=self.spec.batch_size) if pairs else [],
                            dtype=np.float64)
        if scores.ndim != 1:
            # Several cutoff layers give one score list per layer; a pair needs one score.
            raise ValueError(f"the reranker returned scores of shape {scores.shape}; pass a single cutoff layer")
        row["scores"] = pack(scores, np.float64)

    def _embed(self, row: dict) -> None:
        from bge_ray.models.tokenize import Features

        model = self.model
        if row["role"] == QUERY:
            got = self._queries(row["texts"])
        else:
            if row["tokens"] is None:  # not prepared upstream
                features = model.corpus_features(row["texts"])
            else:
                counts = unpack(row["token_counts"], np.int32).astype(np.int64)
                features = Features({"input_ids": split_rows(unpack(row["tokens"], np.int32), counts)}, counts)
            got = model.encode_features(features, self.outputs)
        _check_finite(got, row)
        n = len(row["ids"])
        row["n_tokens"] = pack(model.last_token_counts, np.int32)
        if "dense" in got:
            dense = np.asarray(got["dense"], dtype=np.float32).reshape(n, -1 if n else model.dim)
            row["dim"] = dense.shape[1] if n else model.dim
            row["dense"] = pack(dense, np.float32)
        if "sparse" in got:
            sparse = got["sparse"]
            row["sparse_counts"] = pack([len(i) for i, _ in sparse], np.int32)
            row["sparse_ids"] = pack(np.concatenate([i for i, _ in sparse]) if n else [], np.int32)
            row["sparse_weights"] = pack(np.concatenate([w for _, w in sparse]) if n else [], np.float32)
        if "colbert" in got:
            vecs = got["colbert"]
            row["colbert_dim"] = model.colbert_dim
            row["colbert_counts"] = pack([len(v) for v in vecs], np.int32)
            row["colbert"] = pack(np.concatenate(vecs) if n else np.zeros((0, model.colbert_dim)), np.float32)

    def _queries(self, texts: list[str]) -> dict:
        """``encode_queries`` in the array form of :meth:`encode_features`."""
        model = self.model
        if type(model).__name__ != "BGEM3FlagModel":
            if set(self.outputs) - {"dense"}:
                raise ValueError(f"{type(model).__name__} has a dense output only, not {list(self.outputs)}")
            return {"dense": model.encode_queries(texts, batch_size=self.spec.batch_size)}
        enc = model.encode_queries(texts, batch_size=self.spec.batch_size, return_dense="dense" in self.outputs,
                                   return_sparse="sparse" in self.outputs,
                                   return_colbert_vecs="colbert" in self.outputs)
        got = {}
        if "dense" in self.outputs:
            got["dense"] = enc["dense_vecs"]
        if "sparse" in self.outputs:
            got["sparse"] = [(np.array([int(k) for k in lw], np.int32), np.array(list(lw.values()), np.float32))
                             for lw in enc["lexical_weights"]]
        if "colbert" in self.outputs:
            got["colbert"] = [np.asarray(v, np.float32).reshape(-1, model.colbert_dim) for v in enc["colbert_vecs"]]
        return got


class NonFiniteOutputError(ValueError):
    """The model gave NaN or inf for a row: nothing of its item is written."""


def _check_finite(got: dict, row: dict) -> None:
    """Raise naming the first row whose outputs hold NaN or inf (a broken checkpoint or fp16 overflow
    would otherwise be written, indexed and searched as if it were a vector)."""
    per_row = []
    if got.get("dense") is not None:
        dense = np.asarray(got["dense"])
        if not np.isfinite(dense).all():
            per_row.append(("dense", int(np.flatnonzero(~np.isfinite(dense.reshape(len(dense), -1)).all(axis=1))[0])))
    for name, rows in (("sparse", [w for _, w in got.get("sparse") or []]), ("colbert", got.get("colbert") or [])):
        bad = next((k for k, x in enumerate(rows) if not np.isfinite(np.asarray(x)).all()), None)
        if bad is not None:
            per_row.append((name, bad))
    if not per_row:
        return
    name, k = min(per_row, key=lambda x: x[1])
    where = ""
    if row.get("meta"):
        meta = json.loads(row["meta"])
        where = f" of {meta['file']} (shard {meta['index']})" if "file" in meta else ""
    raise NonFiniteOutputError(f"row id {row['ids'][k]!r}{where}: the model's {name} output holds NaN or inf; "
                               f"nothing of this {row['role']} item was written")


def model_stage(ds, spec, plan, outputs: Sequence[str] = ("dense",), reader=None, commit=None,
                fault_dir: str | None = None, runtime_env: dict | None = None, n_items: int | None = None,
                split: bool | None = None):
    """``ds`` (rows of :data:`ITEM_SCHEMA`) through read -> model -> commit.

    ``plan`` is a :class:`bge_ray.batch.runtime.ActorPlan`; ``reader(meta)`` reads a shard item's rows,
    ``commit(table)`` writes finished items (and returns their records).

    ``split`` (default: when the actors have GPUs) makes three stages: prepare tasks read and tokenise,
    the actors run only the model, commit tasks write, so an accelerator never waits on the CPU work.
    Without it each CPU actor reads, tokenises, runs and commits its own items: CPU actors share the
    cores with any task beside them, and every extra stage costs worker processes and their imports
    at the start and end of a job (benchmarks/README.md, "Embed job").

    One item per actor call; with many items per actor, two are in flight so the next item's
    arguments arrive while the current one runs.
    """
    from ray.data import ActorPoolStrategy

    extra = {"runtime_env": runtime_env} if runtime_env else {}
    split = plan.num_gpus > 0 if split is None else split
    if split:
        ds = ds.map_batches(prepare_items, fn_kwargs={"spec": spec, "reader": reader, "tokenize": True},
                            batch_size=1, batch_format="pyarrow", num_cpus=plan.read_cpus, **extra)
    # One item in flight per actor while items are few: Ray Data would otherwise queue every item of
    # a small job on the first actor to start and leave the others idle.
    in_flight = 2 if n_items is not None and n_items >= 4 * plan.num_actors else 1
    ds = ds.map_batches(
        ModelActor,
        fn_constructor_kwargs={"spec": spec, "torch_threads": plan.torch_threads, "outputs": parse_outputs(outputs),
                               "fault_dir": fault_dir, "reader": None if split else reader,
                               "commit": None if split else commit},
        compute=ActorPoolStrategy(size=plan.num_actors, max_tasks_in_flight_per_actor=in_flight),
        batch_size=1, batch_format="pyarrow", num_cpus=plan.num_cpus, num_gpus=plan.num_gpus, **extra,
    )
    if split and commit is not None:
        ds = ds.map_batches(commit, batch_size=1, batch_format="pyarrow", num_cpus=plan.read_cpus, **extra)
    return ds


# -- results ---------------------------------------------------------------------------------------
@dataclass
class Vectors:
    """Model outputs in a fixed row order: ``dense`` [n, dim], ``sparse`` per row ``(ids, weights)``,
    ``colbert`` per row [n_tokens, dim], ``scores`` [n], ``n_tokens`` [n]; None where not asked."""

    ids: list[str]
    dense: np.ndarray | None = None
    sparse: list[tuple[np.ndarray, np.ndarray]] | None = None
    colbert: list[np.ndarray] | None = None
    scores: np.ndarray | None = None
    n_tokens: np.ndarray | None = None

    @classmethod
    def from_result(cls, row: dict) -> Vectors:
        """One result row of the model stage, unpacked."""
        n = len(row["ids"])
        v = cls(list(row["ids"]), n_tokens=unpack(row["n_tokens"], np.int32), scores=unpack(row["scores"], np.float64))
        if row["dense"] is not None:
            v.dense = unpack(row["dense"], np.float32).reshape(n, row["dim"])
        if row["sparse_counts"] is not None:
            counts = unpack(row["sparse_counts"], np.int32)
            ids = split_rows(unpack(row["sparse_ids"], np.int32).astype(np.int64), counts)
            v.sparse = list(zip(ids, split_rows(unpack(row["sparse_weights"], np.float32), counts), strict=True))
        if row["colbert_counts"] is not None:
            flat = unpack(row["colbert"], np.float32, row["colbert_dim"])
            v.colbert = split_rows(flat, unpack(row["colbert_counts"], np.int32))
        return v

    @classmethod
    def concat(cls, parts: list[Vectors]) -> Vectors:
        def cat(name, join):
            got = [getattr(p, name) for p in parts]
            return None if not got or any(g is None for g in got) else join(got)

        return cls([i for p in parts for i in p.ids], dense=cat("dense", np.concatenate),
                   sparse=cat("sparse", lambda g: [r for x in g for r in x]),
                   colbert=cat("colbert", lambda g: [r for x in g for r in x]),
                   scores=cat("scores", np.concatenate), n_tokens=cat("n_tokens", np.concatenate))

    def take(self, order: Sequence[str]) -> Vectors:
        """The rows of ``order`` (ids), in that order; every id must be present."""
        pos = {i: n for n, i in enumerate(self.ids)}
        missing = [i for i in order if i not in pos]
        if missing:
            raise RuntimeError(f"{len(missing)} rows came back without outputs, e.g. {missing[:3]}")
        idx = np.fromiter((pos[i] for i in order), dtype=np.int64, count=len(order))

        def pick(x):
            if x is None:
                return None
            return x[idx] if isinstance(x, np.ndarray) else [x[k] for k in idx]

        return Vectors(list(order), pick(self.dense), pick(self.sparse), pick(self.colbert), pick(self.scores),
                       pick(self.n_tokens))


def run_items(rows: list[dict], spec, num_actors: int | None = None, use_gpu: bool | None = None,
              outputs: Sequence[str] = ("dense",)) -> Vectors:
    """In-memory work items (:func:`item_row`) through :func:`model_stage`; outputs in item order."""
    import ray.data

    from .runtime import plan_actors

    plan = plan_actors(num_actors, use_gpu).for_blocks(max(1, len(rows)))
    if not rows:
        return Vectors([])
    ds = ray.data.from_arrow([to_table([r]) for r in rows])
    results = {r["item"]: Vectors.from_result(r) for r in model_stage(ds, spec, plan, outputs, n_items=len(rows)).iter_rows()}
    missing = [r["item"] for r in rows if r["item"] not in results]
    if missing:
        raise RuntimeError(f"work items {missing[:5]} came back without outputs")
    return Vectors.concat([results[r["item"]] for r in rows])


def embed_rows(ids: Sequence[str], texts: Sequence[str], roles: Sequence[str], spec, num_actors: int | None = None,
               use_gpu: bool | None = None, outputs: Sequence[str] = ("dense",),
               rows_per_item: int = ROWS_PER_ITEM) -> Vectors:
    """Queries and passages (``roles``) on one actor pool (one model load per actor), in input order."""
    if not (len(ids) == len(texts) == len(roles)):
        raise ValueError(f"{len(ids)} ids, {len(texts)} texts and {len(roles)} roles: they must match")
    if len(set(ids)) != len(ids):
        raise ValueError("ids passed to embed_rows must be unique")
    items = []
    for role in (QUERY, PASSAGE):
        idx = [k for k, r in enumerate(roles) if r == role]
        for s in range(0, len(idx), rows_per_item):
            part = idx[s : s + rows_per_item]
            items.append(item_row(len(items), role, [ids[k] for k in part], [texts[k] for k in part]))
    bad = sorted(set(roles) - {QUERY, PASSAGE})
    if bad:
        raise ValueError(f"roles must be {QUERY!r} or {PASSAGE!r}, got {bad}")
    return run_items(items, spec, num_actors, use_gpu, outputs).take(list(ids))


def score_pairs(pairs: Sequence[tuple[str, str]], spec, num_actors: int | None = None, use_gpu: bool | None = None,
                rows_per_item: int = ROWS_PER_ITEM) -> np.ndarray:
    """Reranker scores of ``(query, passage)`` pairs from the actor pool, in input order."""
    if not pairs:
        return np.zeros(0, dtype=np.float64)
    # Similar lengths side by side so each item pads little.
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]), reverse=True)
    items = []
    for s in range(0, len(order), rows_per_item):
        part = order[s : s + rows_per_item]
        items.append(item_row(len(items), PAIR, [str(i) for i in part], [pairs[i][0] for i in part],
                              [pairs[i][1] for i in part]))
    got = run_items(items, spec, num_actors, use_gpu)
    out = np.full(len(pairs), np.nan)
    out[np.asarray(got.ids, dtype=np.int64)] = got.scores
    missing = int(np.isnan(out).sum())
    if missing:
        raise RuntimeError(f"{missing} of {len(pairs)} pairs came back without a score")
    return out
