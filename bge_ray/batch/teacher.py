"""Teacher scores for distillation (FlagEmbedding's ``scripts/add_reranker_score.py``) on a Ray Data
actor pool: every ``(query, pos)`` and ``(query, neg)`` pair is scored by a reranker and each line
gains ``pos_scores`` / ``neg_scores`` in the order of ``pos`` / ``neg``."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from bge_ray.io.training_data import read_training_jsonl, write_jsonl
from bge_ray.models.spec import RerankerSpec

logger = logging.getLogger(__name__)


class RerankActor:
    """Ray Data callable class: loads the reranker once, scores each batch of ``{idx, query, passage}``."""

    def __init__(self, spec: RerankerSpec, torch_threads: int | None = None):
        from .runtime import actor_device

        self.spec = spec
        self.model = spec.load(devices=actor_device(torch_threads))

    def __call__(self, batch: pa.Table) -> pa.Table:
        pairs = list(zip(batch["query"].to_pylist(), batch["passage"].to_pylist(), strict=True))
        scores = np.asarray(self.model.compute_score(pairs, batch_size=self.spec.batch_size), dtype=np.float64)
        if scores.ndim != 1:
            # Several cutoff layers give one score list per layer; a teacher needs one score per pair.
            raise ValueError(f"the reranker returned scores of shape {scores.shape}; pass a single cutoff layer")
        return pa.table({"idx": batch["idx"], "score": pa.array(scores)})


def score_pairs(
    pairs: list[tuple[str, str]],
    spec: RerankerSpec,
    num_actors: int | None = None,
    use_gpu: bool | None = None,
    rows_per_call: int = 1024,
) -> np.ndarray:
    """Reranker scores for ``pairs`` (in input order) from an actor pool; Ray must be initialised."""
    import ray.data
    from ray.data import ActorPoolStrategy

    from .runtime import call_blocks, plan_actors

    if not pairs:
        return np.zeros(0, dtype=np.float64)
    plan = plan_actors(num_actors, use_gpu)
    # Similar lengths side by side so each actor call pads little; blocks of rows_per_call spread the
    # pairs over the pool (one big block would go to a single actor).
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]), reverse=True)
    table = pa.table({
        "idx": pa.array(order, pa.int64()),
        "query": pa.array([pairs[i][0] for i in order], pa.string()),
        "passage": pa.array([pairs[i][1] for i in order], pa.string()),
    })
    blocks, plan = call_blocks(table, rows_per_call, plan)
    scored = ray.data.from_arrow(blocks).map_batches(
        RerankActor,
        fn_constructor_kwargs={"spec": spec, "torch_threads": plan.torch_threads},
        compute=ActorPoolStrategy(size=plan.num_actors),
        batch_size=rows_per_call,
        batch_format="pyarrow",
        num_cpus=plan.num_cpus,
        num_gpus=plan.num_gpus,
    )
    out = np.full(len(pairs), np.nan)
    for batch in scored.iter_batches(batch_format="pyarrow", batch_size=None):
        out[batch["idx"].to_numpy()] = batch["score"].to_numpy()
    missing = int(np.isnan(out).sum())
    if missing:
        raise RuntimeError(f"{missing} of {len(pairs)} pairs came back without a score")
    return out


@dataclass
class TeacherResult:
    output: str
    lines: int
    pairs: int
    unique_pairs: int
    seconds: float

    def summary(self) -> str:
        return (
            f"scored {self.pairs} pairs ({self.unique_pairs} unique) for {self.lines} lines in "
            f"{self.seconds:.1f} s -> {self.output}"
        )


def add_teacher_scores(
    input_file: str,
    output_file: str,
    spec: RerankerSpec,
    num_actors: int | None = None,
    use_gpu: bool | None = None,
    rows_per_call: int = 1024,
) -> TeacherResult:
    """Write ``input_file``'s lines to ``output_file`` with ``pos_scores`` / ``neg_scores`` added.

    Existing scores are replaced; a line without ``neg`` gets ``neg_scores: []``. A pair repeated
    across lines is scored once.
    """
    t0 = time.perf_counter()
    records = read_training_jsonl(input_file)
    slots: dict[tuple[str, str], int] = {}
    for rec in records:
        for p in (*rec["pos"], *rec.get("neg", [])):
            slots.setdefault((rec["query"], p), len(slots))
    n_pairs = sum(len(r["pos"]) + len(r.get("neg", [])) for r in records)
    logger.info("teacher scores: %d lines, %d pairs (%d unique)", len(records), n_pairs, len(slots))
    scores = score_pairs(list(slots), spec, num_actors, use_gpu, rows_per_call)
    out = []
    for rec in records:
        new = dict(rec)
        new["pos_scores"] = [float(scores[slots[(rec["query"], p)]]) for p in rec["pos"]]
        new["neg_scores"] = [float(scores[slots[(rec["query"], p)]]) for p in rec.get("neg", [])]
        out.append(new)
    write_jsonl(output_file, out)
    result = TeacherResult(output_file, len(records), n_pairs, len(slots), time.perf_counter() - t0)
    logger.info(result.summary())
    return result
