"""The evaluation runner on a local Ray, on a msmarco-subset slice: FlagEmbedding's own pipeline as the
oracle, corpus-embedding cache reuse, metrics recomputed from saved results, reranking, the job CLI."""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from bge_ray.eval.runner import EvalArgs, run_evaluation
from bge_ray.models.spec import EmbedderSpec, RerankerSpec

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]
N_DOCS = 200
TOP_K = 30
K_VALUES = [1, 10, 30]
SPEC = EmbedderSpec(batch_size=64, max_length=256, use_fp16=False, pooling_method="mean")


@pytest.fixture(scope="module")
def eval_slice(shared_data, tmp_path_factory):
    """BEIR folder: the judged passages of msmarco-subset first, then others, plus two bad qrels rows."""
    src = shared_data / "beir" / "msmarco-subset"
    out = tmp_path_factory.mktemp("eval_slice") / "ms-slice"
    (out / "qrels").mkdir(parents=True)
    qrels = [line.rstrip("\n").split("\t") for line in open(src / "qrels" / "test.tsv") if line.strip()]
    docs = [json.loads(line) for line in open(src / "corpus.jsonl")]
    judged = {d for _, d, s in qrels if int(s) > 0}
    keep = [d for d in docs if d["_id"] in judged][: N_DOCS // 2]
    keep += [d for d in docs if d["_id"] not in judged][: N_DOCS - len(keep)]
    ids = {d["_id"] for d in keep}
    (out / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in keep))
    rows = [r for r in qrels if r[1] in ids]
    first_q = rows[0][0]
    rows += [[first_q, "no-such-passage", "1"], ["no-such-query", rows[0][1], "1"]]
    (out / "qrels" / "test.tsv").write_text("".join("\t".join(r) + "\n" for r in rows))
    (out / "queries.jsonl").write_text((src / "queries.jsonl").read_text())
    return out


def _args(dataset_dir, root, **kw):
    base = dict(eval_name="custom", dataset_dir=str(dataset_dir), corpus_embd_save_dir=str(root / "corpus_emb"),
                output_dir=str(root / "out"), search_top_k=TOP_K, k_values=K_VALUES,
                eval_metrics=["ndcg_at_10", "recall_at_30", "map_at_10"], eval_output_path=str(root / "out" / "all.md"),
                embedder_query_max_length=256)
    base.update(kw)
    return EvalArgs(**base)


@pytest.fixture(scope="module")
def first_run(ray_local, eval_slice, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_run")
    report = run_evaluation(_args(eval_slice, root), SPEC)
    return root, report


def _beir(folder):
    corpus = {}
    for line in open(folder / "corpus.jsonl"):
        d = json.loads(line)
        corpus[d["_id"]] = f"{d['title']} {d['text']}".strip() if d.get("title") else d["text"].strip()
    queries = {json.loads(x)["_id"]: json.loads(x)["text"] for x in open(folder / "queries.jsonl")}
    qrels = {}
    for line in open(folder / "qrels" / "test.tsv"):
        q, d, s = line.rstrip("\n").split("\t")
        qrels.setdefault(q, {})[d] = int(s)
    return corpus, queries, qrels


@pytest.fixture(scope="module")
def oracle(eval_slice):
    """FlagEmbedding's FlagModel + its faiss search + its pytrec_eval metrics on the same slice."""
    import faiss
    from FlagEmbedding import FlagModel
    from FlagEmbedding.abc.evaluation.utils import evaluate_metrics

    from bge_ray.models.loading import bundled_model_path

    corpus, queries, qrels = _beir(eval_slice)
    qids = [q for q in queries if q in qrels]
    model = FlagModel(bundled_model_path(), pooling_method="mean", use_fp16=False, devices="cpu", batch_size=64,
                      query_max_length=256, passage_max_length=256)
    doc_ids = list(corpus)
    p = model.encode_corpus([corpus[d] for d in doc_ids])
    q = model.encode_queries([queries[x] for x in qids])
    index = faiss.IndexFlatIP(p.shape[1])
    index.add(np.asarray(p, dtype=np.float32))
    scores, rows = index.search(np.asarray(q, dtype=np.float32), TOP_K)
    results = {qid: {doc_ids[j]: float(s) for s, j in zip(scores[i], rows[i], strict=True)}
               for i, qid in enumerate(qids)}
    ndcg, _map, recall, _ = evaluate_metrics(qrels, results, K_VALUES)
    return {"results": results, "ndcg_at_10": ndcg["NDCG@10"], "map_at_10": _map["MAP@10"],
            "recall_at_30": recall["Recall@30"], "ndcg_at_1": ndcg["NDCG@1"]}


def test_metrics_equal_flagembedding_pipeline(first_run, oracle):
    root, report = first_run
    rep = report.splits[0]
    assert rep.dataset == "ms-slice" and rep.split == "test"
    for key in ("ndcg_at_10", "map_at_10", "recall_at_30", "ndcg_at_1"):
        assert rep.search[key] == pytest.approx(oracle[key], abs=1e-5), key  # FlagEmbedding rounds to 5 places
    # Same top 10 for every query (scores agree to float32 noise).
    saved = json.loads(Path(rep.files["search_results"]).read_text())
    for qid, want in oracle["results"].items():
        got = saved["search_results"][qid]
        assert list(got)[:10] == list(want)[:10]
        assert np.allclose([got[d] for d in list(want)[:10]], list(want.values())[:10], atol=1e-5)
    assert rep.rerank is None and report.reranker is None


def test_bad_qrels_are_counted_not_fatal(first_run):
    root, report = first_run
    rep = report.splits[0]
    assert rep.issues["qrels_unknown_doc_ids"] == 1 and rep.issues["qrels_unknown_query_ids"] == 1
    metrics = json.loads(Path(rep.files["metrics_json"]).read_text())
    assert metrics["issue_examples"]["qrels_unknown_query_ids"] == ["no-such-query"]
    md = Path(rep.files["metrics_md"]).read_text()
    assert "| ndcg_at_10 |" in md and "qrels_unknown_doc_ids 1" in md
    summary = (root / "out" / "all.md").read_text()
    assert "## ndcg_at_10" in summary and "| all-MiniLM-L6-v2 | NoReranker |" in summary


def test_second_run_reuses_corpus_embeddings(first_run, eval_slice, tmp_path):
    root, report = first_run
    info = report.corpus_embedding["ms-slice"]
    assert info["cached"] is False and info["rows"] == N_DOCS
    shard = next(Path(info["dir"], "shards").glob("*.parquet"))
    mtime = shard.stat().st_mtime_ns
    # Another output folder, same cache: no corpus embedding, same figures.
    again = run_evaluation(_args(eval_slice, root, output_dir=str(tmp_path / "out2"),
                                 eval_output_path=str(tmp_path / "out2.md")), SPEC)
    assert again.corpus_embedding["ms-slice"]["cached"] is True
    assert "corpus_embed_in_actors" not in again.timings or again.timings["corpus_embed_in_actors"] == 0
    assert shard.stat().st_mtime_ns == mtime
    assert again.splits[0].search == pytest.approx(report.splits[0].search, abs=1e-9)
    # A bigger batch size does not change the vectors: the cache is still used.
    bigger = run_evaluation(_args(eval_slice, root, output_dir=str(tmp_path / "out3"),
                                  eval_output_path=str(tmp_path / "out3.md")), replace(SPEC, batch_size=16))
    assert bigger.corpus_embedding["ms-slice"]["cached"] is True


def test_metrics_recomputed_from_saved_results_without_embedding(first_run, eval_slice):
    root, report = first_run
    args = _args(eval_slice, root, metrics_only=True, k_values=[3, 5], eval_metrics=["mrr_at_5", "precision_at_3"],
                 eval_output_method="json", eval_output_path=str(root / "recomputed.json"))
    again = run_evaluation(args, SPEC)
    assert set(again.timings) <= {"load_data", "io", "metrics"}
    got = again.splits[0].search
    assert set(got) >= {"mrr_at_5", "precision_at_3", "ndcg_at_3"} and "ndcg_at_10" not in got
    assert json.loads((root / "recomputed.json").read_text())["all-MiniLM-L6-v2"]["NoReranker"]["ms-slice-test"]


def test_rerank_reported_separately_and_only_inside_top_k(first_run, eval_slice, tiny_xlmr_reranker, tmp_path):
    from bge_ray.models import FlagReranker

    root, report = first_run
    rr = RerankerSpec(model=str(tiny_xlmr_reranker), use_fp16=False, max_length=128)
    top = 5
    args = _args(eval_slice, root, output_dir=str(tmp_path / "out"), eval_output_path=str(tmp_path / "all.md"),
                 rerank_top_k=top)
    got = run_evaluation(args, SPEC, rr)
    rep = got.splits[0]
    assert got.reranker == "bge-reranker-tiny" and rep.rerank is not None
    assert rep.search == pytest.approx(report.splits[0].search, abs=1e-9)  # search figures unchanged
    assert rep.rerank != rep.search
    search = json.loads((tmp_path / "out" / "all-MiniLM-L6-v2" / "NoReranker" / "ms-slice-test.json").read_text())
    reranked = json.loads((tmp_path / "out" / "all-MiniLM-L6-v2" / "bge-reranker-tiny" / "ms-slice-test.json").read_text())
    assert reranked["reranker_name"] == "bge-reranker-tiny"
    corpus, queries, _ = _beir(eval_slice)
    oracle = FlagReranker(str(tiny_xlmr_reranker), use_fp16=False, devices="cpu", max_length=128)
    moved = 0
    for qid, before in search["search_results"].items():
        b = sorted(before, key=lambda d: -before[d])
        after = reranked["search_results"][qid]
        a = sorted(after, key=lambda d: -after[d])
        assert set(a[:top]) == set(b[:top]) and a[top:] == b[top:]  # only the top k moves
        moved += a[:top] != b[:top]
        want = oracle.compute_score([(queries[qid], corpus[d]) for d in b[:top]])
        np.testing.assert_allclose([after[d] for d in b[:top]], want, atol=1e-5)
    assert moved > 0, "the reranker changed no ranking"
    md = Path(rep.files["metrics_md"]).read_text()
    assert "| metric | search | rerank |" in md
    summary = (tmp_path / "all.md").read_text()
    assert "| all-MiniLM-L6-v2 | bge-reranker-tiny |" in summary and "| all-MiniLM-L6-v2 | NoReranker |" in summary


def _job():
    spec = importlib.util.spec_from_file_location("evaluate_job", REPO / "jobs" / "evaluate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_job_cli(first_run, eval_slice, tmp_path, capsys):
    root, report = first_run
    job = _job()
    argv = ["--dataset_dir", str(eval_slice), "--splits", "test", "--search_top_k", str(TOP_K), "--k_values", "10", "30",
            "--eval_metrics", "ndcg_at_10", "recall_at_30", "--pooling_method", "mean", "--use_fp16", "False",
            "--embedder_batch_size", "64", "--embedder_query_max_length", "256", "--embedder_passage_max_length", "256",
            "--corpus_embd_save_dir", str(root / "corpus_emb"), "--output_dir", str(tmp_path / "out"),
            "--eval_output_path", str(tmp_path / "results.md")]
    assert job.main(argv) == 0
    out = capsys.readouterr().out
    assert f"ndcg_at_10 {report.splits[0].search['ndcg_at_10']:.4f}" in out
    assert (tmp_path / "results.md").is_file()
    assert job.main([*argv[:6], "--k_values", "100"]) == 2
    assert "metrics asked at k=[100] but search_top_k is 30" in capsys.readouterr().err
    assert job.main(["--dataset_dir", str(eval_slice.parent), "--dataset_names", "nope"]) == 2
    assert "dataset 'nope' not found" in capsys.readouterr().err and "ms-slice" in os.listdir(eval_slice.parent)
