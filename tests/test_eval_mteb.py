"""The optional mteb adapter: mteb evaluates a bge_ray embedder offline on a local retrieval task and its
nDCG@10 equals our own search + pytrec_eval metrics on the same data."""

from __future__ import annotations

import json

import pytest

from tests.oracle import require

mteb = require("mteb")

N_DOCS = 60


@pytest.fixture(scope="module")
def local_task(shared_data):
    from datasets import Dataset
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
    from mteb.abstasks.task_metadata import TaskMetadata
    from mteb.mocks.mock_tasks.retrieval import general_args

    src = shared_data / "beir" / "msmarco-subset"
    qrels_rows = [line.rstrip("\n").split("\t") for line in open(src / "qrels" / "test.tsv") if line.strip()]
    docs = [json.loads(line) for line in open(src / "corpus.jsonl")]
    judged = {d for _, d, s in qrels_rows if int(s) > 0}
    keep = [d for d in docs if d["_id"] in judged][: N_DOCS // 2]
    keep += [d for d in docs if d["_id"] not in judged][: N_DOCS - len(keep)]
    ids = {d["_id"] for d in keep}
    qrels: dict[str, dict[str, int]] = {}
    for q, d, s in qrels_rows:
        if d in ids:
            qrels.setdefault(q, {})[d] = int(s)
    queries = {json.loads(x)["_id"]: json.loads(x)["text"] for x in open(src / "queries.jsonl")}
    queries = {q: t for q, t in queries.items() if q in qrels}
    corpus = {d["_id"]: {"title": d.get("title") or "", "text": d["text"]} for d in keep}

    class LocalMsmarco(AbsTaskRetrieval):
        metadata = TaskMetadata(type="Retrieval", name="LocalMsmarcoSlice", main_score="ndcg_at_10", **general_args)

        def load_data(self, num_proc=None, **kwargs):
            split = RetrievalSplitData(
                queries=Dataset.from_list([{"id": q, "text": t} for q, t in queries.items()]),
                corpus=Dataset.from_list([{"id": d, **v} for d, v in corpus.items()]),
                relevant_docs=qrels, top_ranked=None,
            )
            self.dataset = {"default": {"test": split}}
            self.data_loaded = True

    return LocalMsmarco(), corpus, queries, qrels


def test_mteb_scores_a_bge_ray_model_like_our_pipeline(local_task, tmp_path):
    from bge_ray.eval.metrics import evaluate
    from bge_ray.eval.mteb_adapter import MtebEncoder
    from bge_ray.eval.searchers import dense_search

    task, corpus, queries, qrels = local_task
    enc = MtebEncoder.from_pretrained(None, pooling_method="mean", use_fp16=False, max_length=256, devices="cpu",
                                      query_max_length=256)
    assert enc.mteb_model_meta.name == "bge_ray/all-MiniLM-L6-v2" and enc.mteb_model_meta.embed_dim == 384
    res = mteb.evaluate(enc, [task], cache=None, show_progress_bar=False)
    got = res.task_results[0].scores["test"][0]

    model = enc.model
    doc_ids, qids = list(corpus), list(queries)
    texts = [f"{corpus[d]['title']} {corpus[d]['text']}".strip() for d in doc_ids]
    run = dense_search(model.encode_queries([queries[q] for q in qids]), qids, model.encode_corpus(texts), doc_ids, 10)
    ours = evaluate(qrels, run, [1, 10], ("ndcg", "recall"))
    assert got["ndcg_at_10"] == pytest.approx(ours["ndcg_at_10"], abs=1e-5)
    assert got["recall_at_10"] == pytest.approx(ours["recall_at_10"], abs=1e-5)
    assert got["ndcg_at_10"] > 0.5  # the bundled model finds these passages


def test_task_instruction_replaces_the_query_instruction(local_task):
    from mteb.types import PromptType

    from bge_ray.eval.mteb_adapter import MtebEncoder

    task, *_ = local_task
    enc = MtebEncoder.from_pretrained(None, pooling_method="mean", use_fp16=False, devices="cpu",
                                      use_task_instructions=True)
    enc.prompts_dict = {"LocalMsmarcoSlice": "Find the passage: "}
    assert enc._instruction(task.metadata, PromptType.query) == "Find the passage: "
    assert enc._instruction(task.metadata, PromptType.document) is None
    with_prompt = enc._encode(["what is a lobster"], True, "Find the passage: ")
    direct = enc.model.encode(["Find the passage: what is a lobster"], max_length=enc.model.query_max_length)
    assert abs(with_prompt - direct).max() < 1e-6
