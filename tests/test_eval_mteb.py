"""The optional mteb adapter: mteb evaluates a bge_ray embedder offline on a local retrieval task and its
nDCG@10 equals our own search + pytrec_eval metrics on the same data."""

from __future__ import annotations

import json

import pytest

from bge_ray.models.spec import EmbedderSpec
from tests.oracle import require

mteb = require("mteb")

N_DOCS = 60
SPEC_MTEB = EmbedderSpec(pooling_method="mean", use_fp16=False, max_length=256, batch_size=64)


def _retrieval_task(name, corpus, queries, qrels):
    """A local mteb retrieval task called ``name`` over these dicts (no hub)."""
    from datasets import Dataset
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
    from mteb.abstasks.task_metadata import TaskMetadata
    from mteb.mocks.mock_tasks.retrieval import general_args

    class LocalRetrieval(AbsTaskRetrieval):
        metadata = TaskMetadata(type="Retrieval", name=name, main_score="ndcg_at_10", **general_args)

        def load_data(self, num_proc=None, **kwargs):
            split = RetrievalSplitData(
                queries=Dataset.from_list([{"id": q, "text": t} for q, t in queries.items()]),
                corpus=Dataset.from_list([{"id": d, **v} for d, v in corpus.items()]),
                relevant_docs=qrels, top_ranked=None,
            )
            self.dataset = {"default": {"test": split}}
            self.data_loaded = True

    return LocalRetrieval()


@pytest.fixture(scope="module")
def local_task(shared_data):
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

    return _retrieval_task("LocalMsmarcoSlice", corpus, queries, qrels), corpus, queries, qrels


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


# -- the MTEB runner (FlagEmbedding's --eval_name mteb) ----------------------------------------------------
def _flag_instruction(fn, name, ttype):
    try:
        return fn(name, ttype)
    except (KeyError, ValueError):  # FlagEmbedding's runner logs "No instruction found" and goes on
        return None


def test_mteb_instructions_and_selection_match_flagembedding():
    """Every task FlagEmbedding's table knows, and every task the selection finds, gets FlagEmbedding's
    instruction; the selection is the tasks FlagEmbedding's runner asks mteb for."""
    prompts = require("FlagEmbedding.evaluation.mteb.prompts")
    from bge_ray.eval.instructions import MTEB_TASK_INSTRUCTIONS, mteb_instruction
    from bge_ray.eval.mteb_runner import MtebArgs, plan_task, select_tasks

    pairs = {(n, t) for t, names in prompts.tasks_desc.items() for n in names}
    pairs |= {(n, t) for t, table in MTEB_TASK_INSTRUCTIONS.items() for n in table}
    pairs |= {(n, "Retrieval") for n in ("nfcorpus", "trec-covid", "fiqa", "quora", "miracl", "cqadupstack-android")}
    pairs |= {("NoSuchTask", t) for t in ("Retrieval", "Clustering", "Classification", "Reranking", "InstructionRetrieval")}
    selections = [dict(languages=["eng"], task_types=["Retrieval", "STS"]),
                  dict(languages=["zho"], task_types=["Retrieval", "Reranking", "PairClassification", "Classification"]),
                  dict(tasks=["NFCorpus", "SciDocsRR", "BiorxivClusteringS2S", "STS12", "Banking77Classification"])]
    for sel in selections:
        got = select_tasks(**sel)
        want = mteb.get_tasks(**sel)  # FlagEmbedding's MTEBEvalRunner.run selection call
        assert [t.metadata.name for t in got] == [t.metadata.name for t in want]
        pairs |= {(t.metadata.name, t.metadata.type) for t in got}
        for task in got[:40]:
            run, spec = plan_task(task, SPEC_MTEB, MtebArgs(use_special_instructions=True))
            want_i = _flag_instruction(prompts.get_task_def_by_task_name_and_type, run.name, run.type)
            assert run.instruction == want_i, run.name
            assert spec.extra.get("query_instruction_for_retrieval") == want_i
            assert spec.normalize_embeddings == (run.type != "Classification")
    assert len(pairs) > 150
    for name, ttype in sorted(pairs):
        assert mteb_instruction(name, ttype) == _flag_instruction(prompts.get_task_def_by_task_name_and_type, name,
                                                                  ttype), (name, ttype)
    assert select_tasks(tasks=["NFCorpus", "SciDocsRR"], task_types=["Retrieval"])[0].metadata.name == "NFCorpus"
    with pytest.raises(ValueError, match="unknown mteb task.*NoSuchTask"):
        select_tasks(tasks=["NoSuchTask"])


def test_examples_files(tmp_path):
    from bge_ray.eval.mteb_runner import read_examples

    (tmp_path / "ArguAna.csv").write_text('query,pos\n"a claim, with comma",a rebuttal\n')
    (tmp_path / "NFCorpus.json").write_text(json.dumps([{"instruct": "i", "query": "q", "response": "r"}]))
    (tmp_path / "Bad.csv").write_text("q,p\nx,y\n")
    assert read_examples(str(tmp_path), "ArguAna", "Refute.") == [
        {"instruct": "Refute.", "query": "a claim, with comma", "response": "a rebuttal"}]
    assert read_examples(str(tmp_path), "NFCorpus", None) == [{"instruct": "i", "query": "q", "response": "r"}]
    assert read_examples(str(tmp_path), "SciFact", None) is None
    with pytest.raises(ValueError, match="Bad.csv: expected the columns query,pos"):
        read_examples(str(tmp_path), "Bad", None)




@pytest.mark.ray
def test_mteb_runner_on_ray_writes_mteb_files_and_summaries(local_task, ray_local, tmp_path):
    """A local task named MSMARCO through run_mteb (every encode on Ray actors) with FlagEmbedding's
    MSMARCO instruction: mteb's result file, eval_results.json and the summary hold the scores our own
    search + pytrec_eval give with that instruction."""
    from bge_ray.eval.instructions import mteb_instruction
    from bge_ray.eval.metrics import evaluate
    from bge_ray.eval.mteb_runner import MtebArgs, run_mteb
    from bge_ray.eval.searchers import dense_search
    from bge_ray.models.auto import FlagAutoModel

    _, corpus, queries, qrels = local_task
    task = _retrieval_task("MSMARCO", corpus, queries, qrels)
    args = MtebArgs(use_special_instructions=True, output_dir=str(tmp_path / "out"),
                    eval_output_path=str(tmp_path / "mteb.json"), embedder_query_max_length=256)
    report = run_mteb(args, SPEC_MTEB, tasks=[task], num_actors=1)
    instruction = mteb_instruction("MSMARCO", "Retrieval")
    assert report.tasks[0].instruction == instruction and instruction.startswith("Given a web search query")

    model = FlagAutoModel.from_finetuned(None, pooling_method="mean", use_fp16=False, devices="cpu",
                                         passage_max_length=256, query_max_length=256,
                                         query_instruction_for_retrieval=instruction)
    doc_ids, qids = list(corpus), list(queries)
    texts = [f"{corpus[d]['title']} {corpus[d]['text']}".strip() for d in doc_ids]
    run = dense_search(model.encode_queries([queries[q] for q in qids]), qids, model.encode_corpus(texts), doc_ids, 10)
    ours = evaluate(qrels, run, [10], ("ndcg",))["ndcg_at_10"]

    files = list((tmp_path / "out" / "all-MiniLM-L6-v2" / "results").rglob("MSMARCO.json"))
    assert len(files) == 1, files
    saved = json.loads(files[0].read_text())["scores"]["test"][0]
    assert saved["ndcg_at_10"] == pytest.approx(ours, abs=1e-4)
    evals = json.loads((tmp_path / "out" / "all-MiniLM-L6-v2" / "NoReranker" / "EVAL" / "eval_results.json").read_text())
    assert evals["MSMARCO-test"]["ndcg_at_10"] == pytest.approx(ours, abs=1e-4)
    summary = json.loads((tmp_path / "mteb.json").read_text())
    assert summary == {"Retrieval": {"MSMARCO": round(saved["main_score"] * 100, 2),
                                     "Avg": round(saved["main_score"] * 100, 2)},
                       "Avg": round(saved["main_score"] * 100, 2)}


def test_summary_counts_cqadupstack_once():
    from bge_ray.eval.mteb_runner import TaskRun, summarize, summary_markdown

    runs = [TaskRun("CQADupstackTexRetrieval", "Retrieval", None, True, 0, main_score=0.2),
            TaskRun("CQADupstackGisRetrieval", "Retrieval", None, True, 0, main_score=0.4),
            TaskRun("NFCorpus", "Retrieval", None, True, 0, main_score=0.5),
            TaskRun("STS12", "STS", None, True, 0, main_score=0.8)]
    got = summarize(runs)
    assert got == {"Retrieval": {"NFCorpus": 50.0, "CQADupstack": 30.0, "Avg": 40.0}, "STS": {"STS12": 80.0, "Avg": 80.0},
                   "Avg": round((50 + 30 + 80) / 3, 2)}
    assert "| all-MiniLM-L6-v2 | 40.00 | 50.00 | 30.00 |" in summary_markdown("all-MiniLM-L6-v2", got)
