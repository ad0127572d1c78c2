"""Training data: FlagEmbedding's file layout rules, batch planning, groups, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bge_ray.io.training_data import TrainingDataError
from bge_ray.train import data as td

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "finetune" / "embedder"


def write(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def example(i: int, n_neg: int = 5, scores: bool = False, **extra) -> dict:
    rec = {"query": f"q{i}", "pos": [f"p{i}a", f"p{i}b"], "neg": [f"n{i}_{j}" for j in range(n_neg)], **extra}
    if scores:
        rec["pos_scores"] = [1.0 + i, 0.5]
        rec["neg_scores"] = [0.1 * j for j in range(n_neg)]
    return rec


def test_sources_follow_flagembedding_layout(tmp_path):
    write(tmp_path / "cls-no_in_batch_neg" / "a.jsonl", [example(0)])
    write(tmp_path / "ret" / "x.jsonl", [example(0)])
    write(tmp_path / "ret" / "y.json", [example(0)])
    (tmp_path / "ret" / "notes.txt").write_text("ignored")
    single = write(tmp_path / "one_no_in_batch_neg.jsonl", [example(0)])
    specs = td.list_sources([str(tmp_path / "cls-no_in_batch_neg"), str(tmp_path / "ret"), str(single)])
    assert [(Path(s.files[0]).name, s.no_in_batch_neg) for s in specs] == [
        ("a.jsonl", True), ("x.jsonl", False), ("y.json", False), ("one_no_in_batch_neg.jsonl", True)]
    with pytest.raises(TrainingDataError, match="no such file"):
        td.list_sources([str(tmp_path / "missing.jsonl")])


def test_bad_lines_name_file_and_line(tmp_path):
    f = write(tmp_path / "t.jsonl", [example(0), '{"query": "q", "pos": ["p"]', example(2)])
    with pytest.raises(TrainingDataError, match=r"t\.jsonl:2: not valid JSON"):
        td.read_examples(str(f))
    f = write(tmp_path / "t.jsonl", [example(0), {"query": "q", "pos": ["p"], "neg": []}])
    with pytest.raises(TrainingDataError, match=r"t\.jsonl:2: 'neg' is missing or empty"):
        td.read_examples(str(f))
    f = write(tmp_path / "t.jsonl", [example(0), {"pos": ["p"], "neg": ["n"]}])
    with pytest.raises(TrainingDataError, match=r"t\.jsonl:2: missing 'query'"):
        td.read_examples(str(f))
    bad = example(1, scores=True)
    bad["neg_scores"] = bad["neg_scores"][:-1]
    f = write(tmp_path / "t.jsonl", [example(0, scores=True), bad])
    with pytest.raises(TrainingDataError, match=r"t\.jsonl:2: 'neg_scores' has 4 scores but 'neg' has 5"):
        td.read_examples(str(f), knowledge_distillation=True)
    f = write(tmp_path / "t.jsonl", [example(0, scores=True), example(1)])
    with pytest.raises(TrainingDataError, match=r"t\.jsonl:2: knowledge_distillation needs 'pos_scores'"):
        td.read_examples(str(f), knowledge_distillation=True)
    # A file with no scores at all trains without distillation (FlagEmbedding); without
    # distillation scores are dropped.
    f = write(tmp_path / "t.jsonl", [example(0), example(1)])
    assert td.read_examples(str(f), knowledge_distillation=True)[0]["pos_scores"] is None
    f = write(tmp_path / "t.jsonl", [example(0, scores=True)])
    assert td.read_examples(str(f))[0]["pos_scores"] is None


def _sources(sizes, batch_sizes, flags=None):
    out, start = [], 0
    for k, (n, b) in enumerate(zip(sizes, batch_sizes, strict=True)):
        out.append(td.Source(td.SourceSpec((f"f{k}",), bool(flags and flags[k])), list(range(start, start + n)), b))
        start += n
    return out


def test_same_dataset_batches_come_from_one_file_and_drop_the_remainder():
    sources = _sources([10, 7], [2, 3], flags=[False, True])
    batches = td.plan_epoch(sources, world_size=2, rng=np.random.default_rng(0), same_dataset=True)
    owner = {i: k for k, s in enumerate(sources) for i in s.rows}
    assert len(batches) == 10 // 4 + 7 // 6
    for b in batches:
        files = {owner[i] for i in b.rows}
        assert len(files) == 1
        (k,) = files
        assert len(b.rows) == sources[k].batch_size * 2
        assert b.no_in_batch_neg == sources[k].spec.no_in_batch_neg
    assert len({i for b in batches for i in b.rows}) == sum(len(b.rows) for b in batches)  # no example twice


def test_plan_counts_epochs_steps_and_accumulation():
    sources = _sources([16], [2])
    plan = td.plan_training(sources, world_size=2, seed=1, num_train_epochs=2, max_steps=-1, accumulation=2)
    assert plan.batches_per_epoch == 4 and len(plan.batches) == 8 and plan.optimizer_steps == 4
    epoch0 = {i for b in plan.batches[:4] for i in b.rows}
    assert epoch0 == set(range(16))
    plan = td.plan_training(sources, world_size=2, seed=1, num_train_epochs=1, max_steps=6)
    assert len(plan.batches) == 6 and plan.optimizer_steps == 6
    with pytest.raises(TrainingDataError, match="not one full global batch"):
        td.plan_training(_sources([3], [2]), world_size=2, seed=1, num_train_epochs=1, max_steps=-1)


def test_rank_rows_split_each_global_batch_in_slot_order():
    table = [{**{k: None for k in td.FIELDS}, "query": f"q{i}", "file": "f", "line": i + 1} for i in range(8)]
    plan = td.plan_training(_sources([8], [2]), world_size=2, seed=0, num_train_epochs=1, max_steps=-1)
    r0, r1 = td.rank_rows(table, plan, 0), td.rank_rows(table, plan, 1)
    for b, gb in enumerate(plan.batches):
        mine0 = [r["query"] for r in r0 if r["batch"] == b]
        mine1 = [r["query"] for r in r1 if r["batch"] == b]
        assert mine0 + mine1 == [f"q{i}" for i in gb.rows]
    assert [r["slot"] for r in r1[:2]] == [2, 3]


def test_groups_match_flagembedding_semantics_and_are_reproducible():
    opts = td.GroupOptions(train_group_size=4, query_instruction_for_retrieval="Q: ",
                           passage_instruction_for_retrieval="P: ", knowledge_distillation=True, seed=3)
    rows = [{**example(i, n_neg=2, scores=True), "slot": i, "file": "f", "line": i + 1} for i in range(3)]
    for r in rows:
        r["prompt"], r["type"] = None, None
    q, p, s = td.build_groups(rows, batch=5, opts=opts)
    assert q == ["Q: q0", "Q: q1", "Q: q2"]
    assert len(p) == 12 and len(s) == 3 and all(len(x) == 4 for x in s)
    for i in range(3):
        group = p[4 * i:4 * i + 4]
        assert group[0] in (f"P: p{i}a", f"P: p{i}b")
        assert all(g.startswith(f"P: n{i}_") for g in group[1:])  # 2 negatives repeated to fill 3 slots
        pos_score = s[i][0]
        assert pos_score == (1.0 + i if group[0].endswith("a") else 0.5)
        assert s[i][1:] == [0.1 * int(g.rsplit("_", 1)[1]) for g in group[1:]]
    assert td.build_groups(rows, batch=5, opts=opts) == (q, p, s)
    # The same example at the same (batch, slot) gets the same group whoever holds it.
    assert td.build_groups(rows[1:2], batch=5, opts=opts)[1] == p[4:8]


def test_group_types_prompts_and_symmetric_tasks():
    opts = td.GroupOptions(train_group_size=8, query_instruction_format="<i>{}\n<q>{}", same_dataset=True)
    row = {**example(0, n_neg=3), "slot": 0, "file": "f", "line": 1, "prompt": "Find similar", "type": "only_1neg"}
    q, p, _ = td.build_groups([row], 0, opts)
    assert q == ["<i>Find similar\n<q>q0"] and len(p) == 2
    row["type"] = "symmetric_sts"
    q, p, _ = td.build_groups([row], 0, opts)
    assert len(p) == 8 and all(x.startswith("<i>Find similar\n<q>") for x in p)
    row["type"] = "symmetric_class"
    assert len(td.build_groups([row], 0, opts)[1]) == 4  # min(len(neg) + 1, group size)
    other = {**row, "type": "only_1neg", "line": 2}
    with pytest.raises(TrainingDataError, match="f:2: type 'only_1neg' differs"):
        td.build_groups([row, other], 0, opts)
    # Mixed batches (FlagEmbedding's plain dataset) ignore types, and prompts too unless a query
    # instruction is set.
    mixed = td.GroupOptions(train_group_size=8, query_instruction_format="<i>{}\n<q>{}")
    q, p, _ = td.build_groups([row, other], 0, mixed)
    assert q == ["q0", "q0"] and len(p) == 16
    mixed.query_instruction_for_retrieval = "Default"
    assert td.build_groups([row], 0, mixed)[0] == ["<i>Find similar\n<q>q0"]


@pytest.mark.usefixtures("shared_data")  # fails, not skips, without ../shared
def test_flagembedding_example_files_load_through_ray_data(ray_local):
    table, sources = td.load_sources([str(SHARED / "retrieval"), str(SHARED / "classification-no_in_batch_neg")],
                                     per_device_batch_size=4, knowledge_distillation=True)
    names = [Path(s.spec.files[0]).name for s in sources]
    assert names == ["msmarco.jsonl", "nli.jsonl", "nq.jsonl", "Banking77Classification.jsonl"]
    assert [s.spec.no_in_batch_neg for s in sources] == [False, False, False, True]
    assert len(table) == sum(len(s.rows) for s in sources) == 40
    assert all(len(r["neg_scores"]) == len(r["neg"]) for r in table if r["file"].endswith("nli.jsonl"))
    assert all(r["pos_scores"] is None for r in table if "Banking77" in r["file"])


def test_load_sources_reports_the_bad_line(ray_local, tmp_path):
    f = write(tmp_path / "bad.jsonl", [example(0), example(1), '{"query": 3, "pos": ["x"], "neg": ["y"]}'])
    with pytest.raises(Exception, match=r"bad\.jsonl:3: 'query' must be a string"):
        td.load_sources([str(f)], per_device_batch_size=2)
