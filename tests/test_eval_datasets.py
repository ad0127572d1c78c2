"""Evaluation datasets and metrics without Ray: layouts, validation of bad input, qa_recall, arguments."""

from __future__ import annotations

import json
import logging

import pytest

from bge_ray.eval import datasets as ds
from bge_ray.eval.metrics import evaluate, has_answer, parse_metric, qa_recall
from bge_ray.eval.runner import EvalArgs, check_args


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


CORPUS = [{"_id": f"d{i}", "title": f"T{i}" if i % 2 else "", "text": f"text {i}"} for i in range(6)]


def beir_folder(root, qrels_rows, name="toy", split="test", header=False):
    folder = root / name
    _jsonl(folder / "corpus.jsonl", CORPUS)
    _jsonl(folder / "queries.jsonl", [{"_id": f"q{i}", "text": f"query {i}"} for i in range(4)])
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    lines = (["query-id\tcorpus-id\tscore"] if header else []) + ["\t".join(map(str, r)) for r in qrels_rows]
    (folder / "qrels" / f"{split}.tsv").write_text("\n".join(lines) + ("\n" if lines else ""), encoding="utf-8")
    return folder


def flag_folder(root, name="toy", split="test", qrels=None, answers=None):
    folder = root / name
    _jsonl(folder / "corpus.jsonl", [{"id": r["_id"], "title": r["title"], "text": r["text"]} for r in CORPUS])
    _jsonl(folder / f"{split}_queries.jsonl", [{"id": f"q{i}", "text": f"query {i}"} for i in range(3)])
    rows = [{"qid": q, "docid": d, "relevance": r} for q, d, r in (qrels or [])]
    rows += [{"qid": q, "answers": a} for q, a in (answers or {}).items()]
    _jsonl(folder / f"{split}_qrels.jsonl", rows)
    return folder


def load(bench, name, split="test"):
    corpus = ds.read_corpus(bench.corpus_file(name))
    return bench.load(name, split, corpus), corpus


def test_both_layouts_read_alike(tmp_path):
    qrels = [("q0", "d1", 1), ("q0", "d2", 0), ("q1", "d3", 2)]
    beir_folder(tmp_path / "beir", qrels, header=True)
    flag_folder(tmp_path / "flag", qrels=qrels)
    beir = ds.get_benchmark("custom", str(tmp_path / "beir"))
    flag = ds.get_benchmark("custom", str(tmp_path / "flag"))
    a, corpus = load(beir, "toy")
    b, _ = load(flag, "toy")
    assert ds.detect_layout(str(tmp_path / "beir" / "toy")) == "beir"
    assert ds.detect_layout(str(tmp_path / "flag" / "toy")) == "flag"
    assert a.qrels == b.qrels == {"q0": {"d1": 1, "d2": 0}, "q1": {"d3": 2}}
    # BEIR: a split's queries are those its qrels name; FlagEmbedding's layout: its queries file.
    assert set(a.queries) == {"q0", "q1"} and set(b.queries) == {"q0", "q1", "q2"}
    assert b.issues == {"queries_without_qrels": 1} and a.issues == {}
    assert corpus["d1"] == "T1 text 1" and corpus["d0"] == "text 0"  # title + " " + text when titled
    assert ds.resolve_names(beir, None) == ["toy"]


def test_dataset_dir_itself_is_the_dataset(tmp_path):
    folder = beir_folder(tmp_path, [("q0", "d1", 1)])
    bench = ds.get_benchmark("custom", str(folder))
    assert ds.resolve_names(bench, None) == [None]
    data, _ = load(bench, None)
    assert data.dataset == "toy" and data.corpus_file == str(folder / "corpus.jsonl")


def test_unknown_ids_in_qrels_are_warned_and_counted(tmp_path, caplog):
    qrels = [("q0", "d1", 1), ("q0", "missing-doc", 1), ("q1", "d2", 1), ("ghost-query", "d1", 1)]
    bench = ds.get_benchmark("custom", str(tmp_path))
    beir_folder(tmp_path, qrels)
    with caplog.at_level(logging.WARNING, logger="bge_ray.eval.datasets"):
        data, _ = load(bench, "toy")
    assert data.issues == {"qrels_unknown_query_ids": 1, "qrels_unknown_doc_ids": 1}
    assert data.issue_examples["qrels_unknown_query_ids"] == ["ghost-query"]
    assert data.issue_examples["qrels_unknown_doc_ids"] == ["q0:missing-doc"]
    assert "ghost-query" not in data.qrels  # cannot be searched: dropped
    assert data.qrels["q0"] == {"d1": 1, "missing-doc": 1}  # kept: counts as not retrieved
    text = caplog.text
    assert "1 qrels query ids are not among the queries" in text and "missing from the corpus" in text
    # The unknown document costs recall, as in FlagEmbedding / BEIR.
    m = evaluate(data.qrels, {"q0": {"d1": 1.0}, "q1": {"d2": 1.0}}, [10], ("recall",))
    assert m["recall_at_10"] == pytest.approx(0.75)


@pytest.mark.parametrize("layout", ["beir", "flag"])
def test_empty_split_is_an_error(tmp_path, layout):
    if layout == "beir":
        beir_folder(tmp_path, [])
        where = "qrels/test.tsv"
    else:
        flag_folder(tmp_path, qrels=[])
        where = "test_qrels.jsonl"
    bench = ds.get_benchmark("custom", str(tmp_path))
    with pytest.raises(ds.DatasetError, match=rf"split 'test' of toy is empty: .*{where} holds no qrels"):
        load(bench, "toy")


def test_split_whose_qrels_match_no_query_is_an_error(tmp_path):
    beir_folder(tmp_path, [("nobody", "d1", 1)])
    with pytest.raises(ds.DatasetError, match="is empty: no query .* has qrels"):
        load(ds.get_benchmark("custom", str(tmp_path)), "toy")


def test_missing_dataset_name_lists_what_is_there(tmp_path):
    beir_folder(tmp_path, [("q0", "d1", 1)], name="alpha")
    flag_folder(tmp_path, name="beta", qrels=[("q0", "d1", 1)])
    (tmp_path / "not-a-dataset").mkdir()
    bench = ds.get_benchmark("custom", str(tmp_path))
    with pytest.raises(ds.DatasetError, match=r"dataset 'gamma' not found in .*local datasets: \['alpha', 'beta'\]"):
        ds.resolve_names(bench, ["gamma"])
    named = ds.get_benchmark("beir", str(tmp_path))
    with pytest.raises(ds.DatasetError, match=r"beir can download: \['arguana'.*'scifact'"):
        ds.resolve_names(named, ["scifactt"])
    assert ds.resolve_names(bench, None) == ["alpha", "beta"]
    assert ds.resolve_names(named, ["cqadupstack"]) == [f"cqadupstack/{s}" for s in ds.CQADUPSTACK]


def test_missing_split_and_empty_dataset_dir(tmp_path):
    beir_folder(tmp_path, [("q0", "d1", 1)])
    bench = ds.get_benchmark("custom", str(tmp_path))
    with pytest.raises(ds.DatasetError, match=r"none of the splits \['dev'\] exists for toy.*available splits: \['test'\]"):
        bench.ensure("toy", ["dev"])
    assert bench.ensure("toy", ["dev", "test"]) == ["test"]  # a missing split among others: skipped
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ds.DatasetError, match="holds no dataset"):
        ds.resolve_names(ds.get_benchmark("custom", str(empty)), None)
    with pytest.raises(ds.DatasetError, match="unknown eval_name 'bier'"):
        ds.get_benchmark("bier", str(tmp_path))


def test_bad_files_name_file_and_line(tmp_path):
    folder = beir_folder(tmp_path, [("q0", "d1", 1)])
    (folder / "corpus.jsonl").write_text('{"_id": "a", "text": "x"}\n{"_id": "a", "text": "y"}\n')
    with pytest.raises(ds.DatasetError, match=r"corpus.jsonl:2: duplicate document id 'a'"):
        ds.read_corpus(str(folder / "corpus.jsonl"))
    (folder / "corpus.jsonl").write_text('{"_id": "a", "text": "x"}\n{"_id": "b", "text": \n')
    with pytest.raises(ds.DatasetError, match=r"corpus.jsonl:2: not valid JSON"):
        ds.read_corpus(str(folder / "corpus.jsonl"))
    (folder / "qrels" / "test.tsv").write_text("q0\td1\t1\nq0\td2\tvery\n")
    with pytest.raises(ValueError, match=r"test.tsv:2: score 'very' is not a number"):
        ds.read_qrels(str(folder / "qrels" / "test.tsv"))


def test_mkqa_layout_shares_one_corpus_and_scores_answers(tmp_path):
    _jsonl(tmp_path / "corpus.jsonl", [
        {"id": "p1", "title": "paris", "text": "the capital of france is paris."},
        {"id": "p2", "title": "", "text": "berlin is in germany"},
        {"id": "p3", "title": "", "text": "Ångström units; 42 is the answer"},
    ])
    folder = tmp_path / "en"
    _jsonl(folder / "test_queries.jsonl", [{"id": "1", "text": "capital of france?"}, {"id": "2", "text": "q2"}])
    _jsonl(folder / "test_qrels.jsonl", [{"qid": "1", "answers": ["Paris"]}, {"qid": "2", "answers": ["angstrom", "42"]}])
    bench = ds.get_benchmark("mkqa", str(tmp_path))
    assert ds.resolve_names(bench, ["en"]) == ["en"]
    assert bench.corpus_file("en") == str(tmp_path / "corpus.jsonl")
    data, corpus = load(bench, "en")
    assert data.answers == {"1": ["Paris"], "2": ["angstrom", "42"]} and not data.qrels
    results = {"1": {"p2": 0.9, "p1": 0.5}, "2": {"p3": 0.8, "p1": 0.1}}
    got = qa_recall(data.answers, results, corpus.__getitem__, [1, 2])
    assert got == {"qa_recall_at_1": 0.5, "qa_recall_at_2": 1.0}
    assert has_answer(["New York"], "I love new york city") and not has_answer(["York"], "yorkshire")
    assert ds.mkqa_normalize("a\u2013b \u201cq\u201d it\u2019s\u2026") == 'a-b "q" it\'s...'


def test_air_bench_names():
    assert ds.AirBenchBenchmark.parse("long-doc_arxiv_en_llm-survey") == ("long-doc", "arxiv", "en", "llm-survey")
    assert ds.AirBenchBenchmark.parse("qa_wiki_en_default") == ("qa", "wiki", "en", "default")
    assert ds.AirBenchBenchmark.parse("wiki_en") is None
    with pytest.raises(ds.DatasetError, match="AIR-Bench names look like qa_wiki_en_default"):
        ds.AirBenchBenchmark(None).check_name("wiki_en")


def test_download_errors_say_what_and_where(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    bench = ds.get_benchmark("beir", str(tmp_path), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ds.DatasetError, match=r"could not load BeIR/scifact/corpus .*put the files in the local folder"):
        bench.ensure("scifact", ["test"])


def test_metric_names_and_k_beyond_search_depth():
    assert parse_metric("ndcg_at_10") == ("ndcg", 10) and parse_metric("qa_recall_at_5") == ("qa_recall", 5)
    with pytest.raises(ValueError, match="metric 'ndcg@10' should look like NAME_at_K"):
        parse_metric("ndcg@10")
    assert check_args(EvalArgs(search_top_k=100, k_values=[10, 100], eval_metrics=["map_at_5"])) == [5, 10, 100]
    with pytest.raises(ValueError, match=r"metrics asked at k=\[1000\] but search_top_k is 100"):
        check_args(EvalArgs(search_top_k=100, k_values=[10, 1000]))
    with pytest.raises(ValueError, match=r"metrics asked at k=\[200\] but search_top_k is 100"):
        check_args(EvalArgs(search_top_k=100, k_values=[10], eval_metrics=["recall_at_200"]))
    with pytest.raises(ValueError, match="search_method must be one of"):
        check_args(EvalArgs(search_method="bm25"))
