"""MTEB / C-MTEB evaluation as FlagEmbedding's ``--eval_name mteb`` runs it, every encode on Ray actors.

Tasks are chosen by name, language and type (``mteb.get_tasks``); with ``use_special_instructions``
each task gets FlagEmbedding's instruction for BGE models (:mod:`bge_ray.eval.instructions`);
classification runs on unnormalised embeddings, everything else normalised; texts mteb gives no
prompt type (STS, clustering, ...) are embedded as queries. ``examples_path`` holds few-shot
examples per task (``{task}.json``: a list of ``{"instruct", "query", "response"}``; or ``{task}.csv``
with ``query,pos`` columns) for in-context-learning embedders.

Outputs under ``output_dir``::

    {model}/results/...                         mteb's own result files (its ResultCache layout)
    {model}/NoReranker/EVAL/eval_results.json   {"{task}-{split}": scores}, as the retrieval runner writes

and at ``eval_output_path`` FlagEmbedding's summary: json ``{task_type: {task: main score x 100,
"Avg"}, "Avg"}`` (CQADupstack forums averaged into one entry), or the same as markdown tables.
Needs the optional package mteb; imported only on request.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from bge_ray.io.atomic import atomic_path, write_json
from bge_ray.models.spec import EmbedderSpec

from .instructions import mteb_instruction

logger = logging.getLogger(__name__)

SPLIT_ORDER = ("test", "dev", "validation")


@dataclass
class MtebArgs:
    """FlagEmbedding's MTEBEvalArgs (and the query options of its model arguments)."""

    languages: Sequence[str] | None = None  # e.g. ["eng"]; C-MTEB: ["zho"]
    tasks: Sequence[str] | None = None
    task_types: Sequence[str] | None = None
    use_special_instructions: bool = False
    examples_path: str | None = None
    output_dir: str = "./search_results"
    eval_output_method: str = "json"
    eval_output_path: str = "./mteb_eval_results.json"
    overwrite: bool = False
    query_instruction_for_retrieval: str | None = None  # "auto": the model registry's
    query_instruction_format_for_retrieval: str | None = None
    embedder_query_max_length: int = 512


@dataclass
class TaskRun:
    name: str
    type: str
    instruction: str | None
    normalize: bool
    examples: int
    split: str | None = None
    subset: str | None = None
    main_score: float | None = None
    scores: dict = field(default_factory=dict)


@dataclass
class MtebReport:
    model: str
    tasks: list[TaskRun]
    summary: dict
    summary_path: str
    results_dir: str

    def text(self) -> str:
        lines = [f"{t.type} {t.name} [{t.split}/{t.subset}]: main score {t.main_score:.4f}" for t in self.tasks
                 if t.main_score is not None]
        return "\n".join([*lines, f"average: {self.summary.get('Avg')}"])


def select_tasks(languages=None, tasks=None, task_types=None) -> list:
    """The mteb tasks of these names, languages (ISO 639-3, e.g. ``eng``, ``zho``) and types."""
    import mteb

    try:
        found = mteb.get_tasks(languages=list(languages) if languages else None, tasks=list(tasks) if tasks else None,
                               task_types=list(task_types) if task_types else None)
    except KeyError as exc:
        raise ValueError(f"unknown mteb task: {exc.args[0] if exc.args else exc}") from None
    if not found:
        raise ValueError(f"no mteb task matches tasks={tasks} languages={languages} task_types={task_types}")
    return list(found)


def read_examples(folder: str, task_name: str, instruction: str | None) -> list[dict] | None:
    """Few-shot examples for ``task_name`` from ``folder`` (``.json`` or ``.csv``); None if it has none."""
    path = os.path.join(folder, f"{task_name}.json")
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                rows = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise ValueError(f"{path}: expected a list of {{'instruct', 'query', 'response'}} objects")
        return rows
    path = os.path.join(folder, f"{task_name}.csv")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"query", "pos"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: expected the columns query,pos; got {reader.fieldnames}")
        return [{"instruct": instruction or "", "query": r["query"], "response": r["pos"]} for r in reader]


def _base_instruction(spec: EmbedderSpec, args: MtebArgs) -> str | None:
    if args.query_instruction_for_retrieval == "auto":
        from bge_ray.models import registry

        found = registry.lookup(spec.model or "all-MiniLM-L6-v2", registry.EMBEDDER)
        return found.query_instruction_for_retrieval if found else None
    return args.query_instruction_for_retrieval


def _is_icl(spec: EmbedderSpec) -> bool:
    if spec.model_class:
        return spec.model_class == "decoder-only-icl"
    from bge_ray.models import registry

    found = registry.lookup(spec.model or "all-MiniLM-L6-v2", registry.EMBEDDER)
    return bool(found and found.class_name == "FlagICLModel")


def plan_task(task, spec: EmbedderSpec, args: MtebArgs) -> tuple[TaskRun, EmbedderSpec]:
    """What one task runs with: instruction, normalisation, examples, and the spec carrying them."""
    name, ttype = task.metadata.name, task.metadata.type
    instruction = _base_instruction(spec, args)
    if args.use_special_instructions:
        special = mteb_instruction(name, ttype)
        if special is None:
            logger.info("no special instruction for %s (%s): using %r", name, ttype, instruction)
        instruction = special or instruction
    normalize = ttype != "Classification"
    extra = {**spec.extra, "query_max_length": args.embedder_query_max_length}
    extra.pop("query_instruction_for_retrieval", None)
    if instruction:
        extra["query_instruction_for_retrieval"] = instruction
    if args.query_instruction_format_for_retrieval:
        extra["query_instruction_format"] = args.query_instruction_format_for_retrieval
    examples = read_examples(args.examples_path, name, instruction) if args.examples_path else None
    if examples is not None:
        if _is_icl(spec):
            extra["examples_for_task"] = examples
        else:
            logger.warning("%s: examples in %s ignored: %s is not an in-context-learning embedder",
                           name, args.examples_path, spec.model or "the bundled model")
            examples = None
    run = TaskRun(name, ttype, instruction, normalize, len(examples or []))
    return run, replace(spec, normalize_embeddings=normalize, extra=extra)


def pick_scores(task_result) -> tuple[str | None, str | None, dict]:
    """FlagEmbedding's choice: the first of test / dev / validation, subset ``default`` else the first."""
    for split in SPLIT_ORDER:
        rows = task_result.scores.get(split)
        if rows:
            row = next((r for r in rows if r.get("hf_subset") == "default"), rows[0])
            return split, row.get("hf_subset"), row
    return None, None, {}


def summarize(runs: Sequence[TaskRun]) -> dict:
    """``{task_type: {task: main x 100 (2 decimals), "Avg"}, "Avg"}``; CQADupstack forums count once."""
    out: dict = {}
    overall = []
    for ttype in sorted({r.type for r in runs}):
        scores = {r.name: r.main_score * 100 for r in runs if r.type == ttype and r.main_score is not None}
        cqa = [v for k, v in scores.items() if "CQADupstack" in k]
        table = {k: round(v, 2) for k, v in scores.items() if "CQADupstack" not in k}
        if cqa:
            table["CQADupstack"] = round(sum(cqa) / len(cqa), 2)
        vals = [v for k, v in scores.items() if "CQADupstack" not in k] + ([sum(cqa) / len(cqa)] if cqa else [])
        if not vals:
            continue
        table["Avg"] = round(sum(vals) / len(vals), 2)
        overall += vals
        out[ttype] = table
    if overall:
        out["Avg"] = round(sum(overall) / len(overall), 2)
    return out


def summary_markdown(model: str, summary: dict) -> str:
    lines = [f"# MTEB: {model}", "", f"Average over all tasks: {summary.get('Avg', '-')}", ""]
    for ttype, table in summary.items():
        if ttype == "Avg":
            continue
        cols = ["Avg", *[k for k in table if k != "Avg"]]
        lines += [f"## {ttype}", "", "| Model | " + " | ".join(cols) + " |", "| :---- | " + " | ".join(":---:" for _ in cols)
                  + " |", f"| {model} | " + " | ".join(f"{table[c]:.2f}" for c in cols) + " |", ""]
    return "\n".join(lines)


def run_mteb(args: MtebArgs, embedder: EmbedderSpec | None = None, tasks: Sequence | None = None,
             num_actors: int | None = None, use_gpu: bool | None = None, address: str | None = None) -> MtebReport:
    """Evaluate ``embedder`` on the selected mteb tasks (or on ``tasks``, mteb task objects), each
    encode on a Ray actor pool; write mteb's files, ``eval_results.json`` and the summary."""
    import mteb
    import ray
    from mteb.cache import ResultCache

    from bge_ray.batch.runtime import init_ray

    from .mteb_adapter import MtebEncoder
    from .runner import NO_RERANKER, model_name

    if args.eval_output_method not in ("json", "markdown"):
        raise ValueError(f"eval_output_method must be 'json' or 'markdown', got {args.eval_output_method!r}")
    embedder = embedder or EmbedderSpec()
    tasks = list(tasks) if tasks is not None else select_tasks(args.languages, args.tasks, args.task_types)
    plans = [plan_task(t, embedder, args) for t in tasks]  # bad examples files fail before any work
    if not ray.is_initialized():
        init_ray(address)
    model = model_name(embedder.model)
    results_dir = os.path.join(args.output_dir, model)
    cache = ResultCache(results_dir)
    eval_file = os.path.join(args.output_dir, model, NO_RERANKER, "EVAL", "eval_results.json")
    eval_results = {}
    if os.path.isfile(eval_file):
        with open(eval_file, encoding="utf-8") as f:
            eval_results = json.load(f)
    runs = []
    for task, (run, spec) in zip(tasks, plans, strict=True):
        logger.info("mteb %s (%s): instruction %r, normalize %s", run.name, run.type, run.instruction, run.normalize)
        encoder = MtebEncoder(spec, name=model, ray=True, num_actors=num_actors, use_gpu=use_gpu,
                              instruction=run.instruction, untyped_as_queries=True)
        got = mteb.evaluate(encoder, [task], cache=cache, show_progress_bar=False,
                            overwrite_strategy="always" if args.overwrite else "only-missing")
        run.split, run.subset, row = pick_scores(got.task_results[0])
        run.scores = {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        run.main_score = run.scores.get("main_score")
        if run.split:
            eval_results[f"{run.name}-{run.split}"] = run.scores
        runs.append(run)
    write_json(eval_file, eval_results)
    summary = summarize(runs)
    path = args.eval_output_path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if args.eval_output_method == "json":
        write_json(path, summary)
    else:
        with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.write(summary_markdown(model, summary) + "\n")
    return MtebReport(model, runs, summary, path, results_dir)
