"""M3 retrieval in the evaluation runner (tiny random bge-m3 checkpoint): hybrid scores are the weighted
sum of the single-mode scores, each mode equals the model's own scoring, the corpus vectors are cached."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bge_ray.eval.runner import EvalArgs, run_evaluation
from bge_ray.models.spec import EmbedderSpec

pytestmark = pytest.mark.ray

WEIGHTS = [1.0, 0.3]


@pytest.fixture(scope="module")
def small_beir(shared_data, tmp_path_factory):
    src = shared_data / "beir" / "msmarco-subset"
    out = tmp_path_factory.mktemp("m3_eval") / "ms-tiny"
    (out / "qrels").mkdir(parents=True)
    qrels = [line.rstrip("\n").split("\t") for line in open(src / "qrels" / "test.tsv") if line.strip()]
    docs = [json.loads(line) for line in open(src / "corpus.jsonl")]
    judged = [d for d in docs if any(d["_id"] == r[1] for r in qrels[:60])][:20]
    keep = judged + [d for d in docs if d not in judged][:20]
    ids = {d["_id"] for d in keep}
    (out / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in keep))
    (out / "qrels" / "test.tsv").write_text("".join("\t".join(r) + "\n" for r in qrels if r[1] in ids))
    (out / "queries.jsonl").write_text((src / "queries.jsonl").read_text())
    return out


def _args(folder, root, method, **kw):
    return EvalArgs(dataset_dir=str(folder), corpus_embd_save_dir=str(root / "emb"), output_dir=str(root / method),
                    search_top_k=10, k_values=[1, 10], eval_metrics=["ndcg_at_10"], search_method=method,
                    hybrid_weights=WEIGHTS, eval_output_path=str(root / f"{method}.md"),
                    embedder_query_max_length=64, **kw)


def _corpus(folder: Path):
    out = {}
    for line in open(folder / "corpus.jsonl"):
        d = json.loads(line)
        out[d["_id"]] = f"{d['title']} {d['text']}".strip() if d.get("title") else d["text"].strip()
    return out


def test_hybrid_is_weighted_sum_of_modes(ray_local, small_beir, tiny_m3, tmp_path):
    from bge_ray.models import BGEM3FlagModel

    spec = EmbedderSpec(model=str(tiny_m3), use_fp16=False, max_length=128, batch_size=16)
    hybrid = run_evaluation(_args(small_beir, tmp_path, "hybrid"), spec)
    assert hybrid.corpus_embedding["ms-tiny"]["cached"] is False
    saved = json.loads(Path(hybrid.splits[0].files["search_results"]).read_text())
    assert saved["hybrid_weights"] == {"dense": 1.0, "sparse": 0.3}
    modes = saved["mode_scores"]

    # The model in this process scores the same (query, passage) pairs mode by mode.
    model = BGEM3FlagModel(str(tiny_m3), use_fp16=False, devices="cpu", passage_max_length=128, query_max_length=64)
    corpus = _corpus(small_beir)
    queries = {json.loads(x)["_id"]: json.loads(x)["text"] for x in open(small_beir / "queries.jsonl")}
    doc_ids = list(corpus)
    p = model.encode_corpus([corpus[d] for d in doc_ids], return_sparse=True)
    row = {d: i for i, d in enumerate(doc_ids)}
    checked = 0
    for qid, docs in saved["search_results"].items():
        assert len(docs) == 10
        q = model.encode_queries([queries[qid]], return_sparse=True)
        for d, score in docs.items():
            dense = float(q["dense_vecs"][0] @ p["dense_vecs"][row[d]])
            sparse = float(model.compute_lexical_matching_score(q["lexical_weights"][0], p["lexical_weights"][row[d]]))
            assert modes["dense"][qid][d] == pytest.approx(dense, rel=1e-5, abs=1e-5)
            assert modes["sparse"][qid][d] == pytest.approx(sparse, rel=1e-5, abs=1e-5)  # float32 sums
            assert score == pytest.approx(WEIGHTS[0] * modes["dense"][qid][d] + WEIGHTS[1] * modes["sparse"][qid][d],
                                          abs=1e-9)
            checked += 1
    assert checked >= 10 * 5
    assert len({round(s, 6) for r in modes["sparse"].values() for s in r.values()}) > 5, "sparse scores all alike"

    # Sparse alone, from the cached corpus vectors: its scores are the sparse mode's.
    sparse = run_evaluation(_args(small_beir, tmp_path, "sparse"), spec)
    assert sparse.corpus_embedding["ms-tiny"]["cached"] is True
    sparse_run = json.loads(Path(sparse.splits[0].files["search_results"]).read_text())["search_results"]
    for qid, docs in sparse_run.items():
        for d, s in docs.items():
            if d in modes["sparse"][qid]:
                assert s == pytest.approx(modes["sparse"][qid][d], rel=1e-6)
    assert hybrid.splits[0].search.keys() == sparse.splits[0].search.keys()


def test_sparse_needs_an_m3_model(tmp_path, small_beir):
    with pytest.raises(ValueError, match="search_method 'hybrid' needs an M3 model"):
        run_evaluation(_args(small_beir, tmp_path, "hybrid"), EmbedderSpec())
