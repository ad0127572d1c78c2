"""Teacher scores for distillation (FlagEmbedding's ``scripts/add_reranker_score.py``) on the model
stage (:func:`bge_ray.batch.stage.score_pairs`): every ``(query, pos)`` and ``(query, neg)`` pair is scored by a reranker and each line
gains ``pos_scores`` / ``neg_scores`` in the order of ``pos`` / ``neg``."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from bge_ray.io.training_data import read_training_jsonl, write_jsonl
from bge_ray.models.spec import RerankerSpec

from .stage import score_pairs

logger = logging.getLogger(__name__)


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
