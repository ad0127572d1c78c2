"""Cross-encoder reranker training: pairs and loss as FlagEmbedding builds them, and a Ray Train
run whose checkpoint loads into FlagReranker."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bge_ray.train.arguments import ModelArgs, RayArgs, TrainArgs
from bge_ray.train.reranker import PairBuilder, RerankerDataArgs, RerankerTask, group_loss
from tests.oracle import require

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "finetune" / "reranker"


def _texts():
    q = ["what is the capital of france " * 3, "short query", "how do rivers form in mountains"]
    p = ["paris is the capital and largest city of france " * 20, "a passage", "rivers form when rain " * 8]
    return q, p


def test_pairs_equal_flagembedding_training_pairs(tiny_bert):
    """Same token ids as FlagEmbedding's reranker dataset (create_one_example) for long and short texts."""
    require("FlagEmbedding")
    from FlagEmbedding.abc.finetune.reranker.AbsDataset import AbsRerankerTrainDataset
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    fe = object.__new__(AbsRerankerTrainDataset)
    fe.tokenizer = tok
    fe.args = SimpleNamespace(query_max_len=8, passage_max_len=24)
    ours = PairBuilder(tok, 8, 24)
    q, p = _texts()
    got = ours(q, p, "cpu")
    for i in range(len(q)):
        want = fe.create_one_example(q[i], p[i])
        n = int(got["attention_mask"][i].sum())
        assert got["input_ids"][i, :n].tolist() == list(want["input_ids"])
        assert got["token_type_ids"][i, :n].tolist() == list(want["token_type_ids"])


def test_loss_equals_flagembedding_cross_encoder_loss(tiny_bert_nodrop):
    require("FlagEmbedding")
    from FlagEmbedding.finetune.reranker.encoder_only.base.modeling import CrossEncoderModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert_nodrop)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_nodrop, num_labels=1)
    q, p = _texts()
    group = 3
    queries = [q[0], q[1]]
    passages = [p[0], p[1], p[2], p[2], p[0], p[1]]
    features = PairBuilder(tok, 8, 24)([x for x in queries for _ in range(group)], passages, "cpu")
    teacher = torch.tensor([[3.0, 1.0, -1.0], [0.5, 0.2, 2.0]])
    fe = CrossEncoderModel(model, tokenizer=tok, train_batch_size=2).train()
    for t in (None, teacher):
        want = fe(features, teacher_scores=None if t is None else t.view(-1).tolist()).loss
        logits = model(**features).logits.view(-1)
        assert group_loss(logits, group, t).item() == pytest.approx(want.item(), abs=1e-6)
    # By hand: cross-entropy with the positive first.
    logits = torch.tensor([2.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    want = -(torch.log_softmax(logits[:3], 0)[0] + torch.log_softmax(logits[3:], 0)[0]) / 2
    assert group_loss(logits, 3).item() == pytest.approx(want.item(), rel=1e-6)


@pytest.mark.slow
@pytest.mark.usefixtures("shared_data")  # fails, not skips, without ../shared
def test_reranker_job_trains_and_loads_into_flagreranker(ray_local, tiny_bert_nodrop, tmp_path):
    from bge_ray.models import FlagAutoReranker, FlagReranker
    from bge_ray.train.runner import run_training

    m = ModelArgs(model_name_or_path=str(tiny_bert_nodrop))
    d = RerankerDataArgs(train_data=[str(SHARED / "examples.jsonl")], train_group_size=4, query_max_len=16,
                         passage_max_len=48, knowledge_distillation=True)
    t = TrainArgs(output_dir=str(tmp_path / "rr"), per_device_train_batch_size=2, learning_rate=2e-4,
                  max_steps=10, save_steps=1000)
    result = run_training(RerankerTask(m, d, t), m, d, t, RayArgs(num_workers=2, cpus_per_worker=0.5))
    summary = json.loads((tmp_path / "rr" / "training_summary.json").read_text())
    losses = [h["loss"] for h in summary["log_history"]]
    assert result.optimizer_steps == 10 and len(losses) == 10
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    rr = FlagReranker(str(tmp_path / "rr"), use_fp16=False, devices="cpu", query_max_length=16, max_length=64)
    auto = FlagAutoReranker.from_finetuned(str(tmp_path / "rr"), use_fp16=False, devices="cpu")
    assert isinstance(auto, FlagReranker)
    pairs = [["what is a river", "a river is a stream of water"], ["what is a river", "bank loans"]]
    scores = rr.compute_score(pairs)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rr").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "rr")
    with torch.no_grad():
        want = model(**PairBuilder(tok, 16, 48)([a for a, _ in pairs], [b for _, b in pairs], "cpu")).logits.view(-1)
    np.testing.assert_allclose(scores, want.numpy(), atol=1e-5)


@pytest.mark.parametrize("line, kd, message", [
    ('{"query": "q", "pos": ["p"], "neg": ["n"]', False, r"bad\.jsonl:2: not valid JSON"),
    ({"pos": ["p"], "neg": ["n"]}, False, r"bad\.jsonl:2: missing 'query'"),
    ({"query": "q", "pos": ["p"], "neg": []}, False, r"bad\.jsonl:2: 'neg' is missing or empty"),
    ({"query": "q", "pos": ["p"], "neg": ["n", "m"], "pos_scores": [1.0], "neg_scores": [0.5]}, True,
     r"bad\.jsonl:2: 'neg_scores' has 1 scores but 'neg' has 2"),
    ({"query": "q", "pos": ["p"], "neg": ["n"]}, True, r"bad\.jsonl:2: knowledge_distillation needs 'pos_scores'"),
])
def test_reranker_job_names_the_bad_file_and_line(ray_local, tiny_bert, tmp_path, line, kd, message):
    """The reranker job reads training data through the embedder loops' reader: a bad line fails the
    run before any training, naming file and line, and nothing is exported to OUTPUT_DIR."""
    from jobs.finetune_reranker import main

    good = {"query": "q0", "pos": ["p0"], "neg": ["n0", "n1"], "pos_scores": [2.0], "neg_scores": [0.1, 0.2]}
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps(good) + "\n" + (line if isinstance(line, str) else json.dumps(line)) + "\n")
    out = tmp_path / "out"
    argv = ["--model_name_or_path", str(tiny_bert), "--train_data", str(f), "--output_dir", str(out),
            "--train_group_size", "2", "--per_device_train_batch_size", "1", "--num_workers", "1"]
    with pytest.raises(Exception, match=message):
        main(argv + (["--knowledge_distillation", "True"] if kd else []))
    assert not (out / "training_summary.json").exists() and not (out / "model.safetensors").exists()
