"""Training data for the Ray Train loops: files read by Ray Data, global batches planned once on the
driver, one ordered dataset per worker rank, and each example turned into a training group.

Why a plan and not ``streaming_split``: cross-worker negatives need every rank to hold its slice of
the *same* global batch at the same step, and same-dataset batching needs each global batch drawn
from one file. The driver plans global batches from row counts (FlagEmbedding's semantics), and
rank ``r`` receives slots ``[r*b, (r+1)*b)`` of each, in step order, through its own dataset. The
negatives of each group are sampled from a seed made of (seed, batch, slot), so a run is
reproducible, a resumed run redoes a step identically, and 1 worker at batch 2B sees exactly the
groups that 2 workers at batch B see.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from bge_ray.io.training_data import TrainingDataError

logger = logging.getLogger(__name__)

FIELDS = ("query", "pos", "neg", "pos_scores", "neg_scores", "prompt", "type")
SYMMETRIC_TYPES = ("symmetric_sts", "symmetric_clustering")


@dataclass(frozen=True)
class SourceSpec:
    """One dataset of the mix: its files, whether it skips in-batch negatives, and its batch size."""

    files: tuple[str, ...]
    no_in_batch_neg: bool


def _is_json(name: str) -> bool:
    return name.endswith(".json") or name.endswith(".jsonl")


def list_sources(train_data: Sequence[str]) -> list[SourceSpec]:
    """FlagEmbedding's layout rules: a file is one dataset; a folder holds one dataset per json(l)
    file; a name ending in ``no_in_batch_neg`` (file stem or folder) turns off in-batch negatives."""
    sources = []
    for entry in train_data:
        if os.path.isdir(entry):
            flag = os.path.basename(os.path.normpath(entry)).endswith("no_in_batch_neg")
            names = sorted(n for n in os.listdir(entry) if _is_json(n))
            if not names:
                raise TrainingDataError(f"{entry}: no .json / .jsonl files in this folder")
            sources.extend(SourceSpec((os.path.join(entry, n),), flag) for n in names)
        elif os.path.isfile(entry):
            if not _is_json(entry):
                raise TrainingDataError(f"{entry}: training files must be .json or .jsonl")
            stem = os.path.splitext(os.path.basename(entry))[0]
            sources.append(SourceSpec((entry,), stem.endswith("no_in_batch_neg")))
        else:
            raise TrainingDataError(f"{entry}: no such file or folder")
    return sources


def _check_scores(path: str, lineno: int, rec: dict, key: str, texts: str) -> None:
    scores = rec.get(key)
    if scores is None:
        raise TrainingDataError(f"{path}:{lineno}: knowledge_distillation needs {key!r} (one score per {texts!r} entry)")
    if not isinstance(scores, list) or not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores):
        raise TrainingDataError(f"{path}:{lineno}: {key!r} must be a list of numbers")
    if len(scores) != len(rec.get(texts) or []):
        raise TrainingDataError(
            f"{path}:{lineno}: {key!r} has {len(scores)} scores but {texts!r} has {len(rec.get(texts) or [])} passages"
        )


def read_examples(path: str, knowledge_distillation: bool = False, need_neg: bool = True,
                  max_examples: int | None = None, seed: int = 0) -> list[dict]:
    """Validated examples of one file, each with its line number; errors name file and line."""
    from bge_ray.io.training_data import read_training_jsonl

    out = []
    records = read_training_jsonl(path, with_line_numbers=True)
    # As in FlagEmbedding, a file without any teacher scores trains without distillation; a file
    # with scores must have them on every line.
    scored = knowledge_distillation and any(r.get("pos_scores") is not None for r in records)
    if knowledge_distillation and not scored:
        logger.info("%s has no teacher scores: its groups train without distillation", path)
    for rec in records:
        lineno = rec.pop("__line__")
        if need_neg and not rec.get("neg"):
            raise TrainingDataError(f"{path}:{lineno}: 'neg' is missing or empty; training groups need negatives "
                                    "(mine them with jobs/mine_hard_negatives.py)")
        if scored:
            _check_scores(path, lineno, rec, "pos_scores", "pos")
            _check_scores(path, lineno, rec, "neg_scores", "neg")
        for key in ("prompt", "type"):
            if rec.get(key) is not None and not isinstance(rec[key], str):
                raise TrainingDataError(f"{path}:{lineno}: {key!r} must be a string")
        row = {k: rec.get(k) for k in FIELDS}
        if not scored:
            row["pos_scores"] = row["neg_scores"] = None
        row["line"] = lineno
        row["batch_size"] = rec.get("batch_size")
        out.append(row)
    if max_examples is not None and len(out) > max_examples:
        keep = sorted(np.random.default_rng(seed).choice(len(out), max_examples, replace=False))
        out = [out[i] for i in keep]
    return out


@dataclass
class Source:
    spec: SourceSpec
    rows: list[int]  # indices into the example table
    batch_size: int  # per worker


def load_sources(train_data: Sequence[str], per_device_batch_size: int, knowledge_distillation: bool = False,
                 need_neg: bool = True, max_example_num_per_dataset: int | None = None, seed: int = 42,
                 small_threshold: int = 0, drop_threshold: int = 0) -> tuple[list[dict], list[Source]]:
    """Read every training file on Ray Data (one read task per file, validated with file:line
    errors) and return the example table and its datasets with their per-worker batch sizes."""
    import ray

    specs = list_sources(train_data)
    files = [f for s in specs for f in s.files]
    ds = ray.data.from_items([{"i": i, "path": p} for i, p in enumerate(files)], override_num_blocks=max(1, len(files)))

    def read(row: dict) -> dict:
        rows = read_examples(row["path"], knowledge_distillation, need_neg, max_example_num_per_dataset, seed)
        return {"i": row["i"], "rows": json.dumps(rows, ensure_ascii=False)}

    per_file: dict[int, list[dict]] = {}
    for r in ds.map(read).take_all():
        per_file[r["i"]] = json.loads(r["rows"])

    table: list[dict] = []
    sources: list[Source] = []
    small: dict[tuple[str, bool], list] = {}
    for i, spec in enumerate(specs):
        rows = per_file[i]
        for r in rows:
            r["file"] = spec.files[0]
        idx = list(range(len(table), len(table) + len(rows)))
        table.extend(rows)
        if not rows:
            continue
        bs = _file_batch_size(rows, per_device_batch_size)
        if small_threshold and len(rows) < small_threshold:
            key = (os.path.dirname(spec.files[0]), spec.no_in_batch_neg)
            small.setdefault(key, []).append((spec, idx, bs))
            continue
        sources.append(Source(spec, idx, bs))
    for (_, flag), parts in small.items():  # FlagEmbedding merges a folder's small files into one dataset
        idx = [j for _, rows, _ in parts for j in rows]
        if len(idx) >= drop_threshold:
            files_ = tuple(f for spec, _, _ in parts for f in spec.files)
            sources.append(Source(SourceSpec(files_, flag), idx, min(bs for _, _, bs in parts)))
    if not sources:
        raise TrainingDataError(f"no training examples in {list(train_data)}")
    return table, sources


def _file_batch_size(rows: list[dict], default: int) -> int:
    """A ``batch_size`` field on the file's first line wins; symmetric tasks get half (FlagEmbedding)."""
    first = rows[0]
    if isinstance(first.get("batch_size"), int) and first["batch_size"] > 0:
        return first["batch_size"]
    if first.get("type") and "symmetric" in first["type"]:
        return max(1, default // 2)
    return default


@dataclass(frozen=True)
class GlobalBatch:
    rows: tuple[int, ...]  # example indices, world_size * per-worker batch
    no_in_batch_neg: bool


def plan_epoch(sources: list[Source], world_size: int, rng: np.random.Generator, same_dataset: bool) -> list[GlobalBatch]:
    """One epoch of global batches. Incomplete global batches are dropped: every rank must hold the
    same number of examples for the all-gather of cross-worker negatives."""
    batches: list[GlobalBatch] = []
    if same_dataset:
        for si in rng.permutation(len(sources)):
            src = sources[si]
            order = rng.permutation(src.rows)
            size = src.batch_size * world_size
            for s in range(0, len(order) - size + 1, size):
                batches.append(GlobalBatch(tuple(int(x) for x in order[s:s + size]), src.spec.no_in_batch_neg))
        return [batches[i] for i in rng.permutation(len(batches))]
    sizes = {s.batch_size for s in sources}
    size = min(sizes) * world_size
    flagged = [s for s in sources if s.spec.no_in_batch_neg]
    if flagged:
        logger.warning("%d no_in_batch_neg dataset(s) mixed into shared batches: in-batch negatives stay on "
                       "(use --same_dataset_within_batch to honour the flag)", len(flagged))
    order = rng.permutation([r for s in sources for r in s.rows])
    for s in range(0, len(order) - size + 1, size):
        batches.append(GlobalBatch(tuple(int(x) for x in order[s:s + size]), False))
    return batches


@dataclass
class TrainPlan:
    """Every global batch of the run, in order, and the optimizer steps they make."""

    batches: list[GlobalBatch]
    batches_per_epoch: int
    world_size: int
    accumulation: int

    @property
    def optimizer_steps(self) -> int:
        return len(self.batches) // self.accumulation


def plan_training(sources: list[Source], world_size: int, seed: int, num_train_epochs: float, max_steps: int,
                  accumulation: int = 1, same_dataset: bool = False) -> TrainPlan:
    rng = np.random.default_rng(seed)
    first = plan_epoch(sources, world_size, rng, same_dataset)
    if not first:
        need = min(s.batch_size for s in sources) * world_size
        raise TrainingDataError(
            f"not one full global batch: {sum(len(s.rows) for s in sources)} examples, a global batch takes {need} "
            f"(per_device_train_batch_size x {world_size} workers) from one dataset")
    per_epoch = len(first)
    if max_steps and max_steps > 0:
        want = max_steps * accumulation
    else:
        want = max(accumulation, int(math.ceil(num_train_epochs * per_epoch / accumulation)) * accumulation)
    batches = list(first)
    while len(batches) < want:
        batches.extend(plan_epoch(sources, world_size, rng, same_dataset))
    return TrainPlan(batches[:want], per_epoch, world_size, accumulation)


def rank_rows(table: list[dict], plan: TrainPlan, rank: int) -> list[dict]:
    """What rank ``rank`` trains on, in order: its slots of every global batch."""
    out = []
    for b, gb in enumerate(plan.batches):
        per = len(gb.rows) // plan.world_size
        for slot in range(rank * per, (rank + 1) * per):
            ex = table[gb.rows[slot]]
            out.append({**ex, "batch": b, "slot": slot, "epoch": b // plan.batches_per_epoch,
                        "no_in_batch_neg": gb.no_in_batch_neg})
    return out


def rank_datasets(table: list[dict], plan: TrainPlan) -> dict:
    """``{"rank0": Dataset, ...}``: one ordered Ray Dataset per worker, for ``get_dataset_shard``."""
    import ray

    return {f"rank{r}": ray.data.from_items(rank_rows(table, plan, r)) for r in range(plan.world_size)}


def iter_global_batches(shard, start_batch: int = 0) -> Iterator[tuple[int, list[dict]]]:
    """Group a rank's rows back into (batch index, rows) in order, skipping batches already done."""
    current, rows = None, []
    for row in shard.iter_rows():
        b = int(row["batch"])
        if b < start_batch:
            continue
        if current is not None and b != current:
            yield current, rows
            rows = []
        current = b
        rows.append(row)
    if rows:
        yield current, rows


# -- turning an example into a training group -----------------------------------------------------------
@dataclass
class GroupOptions:
    train_group_size: int = 8
    query_instruction_for_retrieval: str | None = None
    query_instruction_format: str = "{}{}"
    passage_instruction_for_retrieval: str | None = None
    passage_instruction_format: str = "{}{}"
    knowledge_distillation: bool = False
    shuffle_ratio: float = 0.0
    seed: int = 42
    # FlagEmbedding's two datasets: same-dataset batches honour ``type`` (group sizes, symmetric
    # tasks) and always apply the instruction format; mixed batches ignore ``type`` and format
    # queries only when a query instruction is set (a line's ``prompt`` then replaces it).
    same_dataset: bool = False
    # The example fields that replace the query / passage instruction: embedders read ``prompt``,
    # rerankers ``query_prompt`` / ``passage_prompt`` (their ``prompt`` is the LLM reranker's question).
    query_prompt_field: str = "prompt"
    passage_prompt_field: str | None = None


def group_size_for(rows: Sequence[dict], train_group_size: int) -> int:
    """FlagEmbedding's per-batch group size by task type."""
    kind = rows[0].get("type")
    if kind == "only_1neg":
        return 2
    if kind == "symmetric_class":
        return min(len(rows[0].get("neg") or []) + 1, train_group_size)
    return train_group_size


def _shuffle_text(text: str, ratio: float, rng: np.random.Generator) -> str:
    """FlagEmbedding's text augmentation: with probability ``ratio``, cut a long text in three and shuffle."""
    if ratio > 0 and len(text) > 100 and rng.random() < ratio:
        step = len(text) // 3 + 1
        parts = [text[i:i + step] for i in range(0, len(text), step)]
        rng.shuffle(parts)
        return " ".join(parts)
    return text


def _fmt(fmt: str, instruction: str | None, text: str) -> str:
    return fmt.format(instruction or "", text)


def build_groups(rows: Sequence[dict], batch: int, opts: GroupOptions):
    """(queries, passages, teacher_scores or None): each query followed by its group of one positive
    and ``group - 1`` sampled negatives. Sampling is seeded by (seed, batch, slot)."""
    group = group_size_for(rows, opts.train_group_size) if opts.same_dataset else opts.train_group_size
    kind = rows[0].get("type") if opts.same_dataset else None
    scored = [r.get("pos_scores") is not None for r in rows]
    distill = opts.knowledge_distillation and all(scored)
    if opts.knowledge_distillation and any(scored) and not all(scored):
        r = rows[scored.index(False)]
        raise TrainingDataError(f"{r['file']}:{r['line']}: no teacher scores, but other examples of its batch have "
                                "them (use --same_dataset_within_batch, or score every file)")
    queries, passages, scores = [], [], []
    for row in rows:
        if opts.same_dataset and row.get("type") != kind:
            raise TrainingDataError(f"{row['file']}:{row['line']}: type {row.get('type')!r} differs from "
                                    f"{kind!r} in the same batch")
        rng = np.random.default_rng([opts.seed, batch, int(row["slot"])])
        instruction = row.get(opts.query_prompt_field) or opts.query_instruction_for_retrieval
        if opts.same_dataset or opts.query_instruction_for_retrieval is not None:
            queries.append(_fmt(opts.query_instruction_format, instruction, row["query"]))
        else:
            queries.append(row["query"])
        pos_i = int(rng.integers(len(row["pos"])))
        negs = list(row.get("neg") or [])
        need = group - 1
        if need and not negs:
            raise TrainingDataError(f"{row['file']}:{row['line']}: no negatives for a group of {group}")
        if len(negs) >= need:
            neg_i = [int(i) for i in rng.choice(len(negs), need, replace=False)]
        else:  # FlagEmbedding repeats the list until it can sample without replacement
            pool = list(range(len(negs))) * math.ceil(need / len(negs))
            neg_i = [pool[int(i)] for i in rng.choice(len(pool), need, replace=False)]
        group_texts = [_shuffle_text(row["pos"][pos_i], opts.shuffle_ratio, rng)] + [negs[i] for i in neg_i]
        if kind in SYMMETRIC_TYPES:
            group_texts = [_fmt(opts.query_instruction_format, instruction, p) for p in group_texts]
        elif opts.passage_instruction_for_retrieval is not None:
            p_instruction = (row.get(opts.passage_prompt_field) if opts.passage_prompt_field else None) \
                or opts.passage_instruction_for_retrieval
            group_texts = [_fmt(opts.passage_instruction_format, p_instruction, p) for p in group_texts]
        passages.extend(group_texts)
        if distill:
            scores.append([float(row["pos_scores"][pos_i])] + [float(row["neg_scores"][i]) for i in neg_i])
    return queries, passages, (scores if distill else None)
