"""Embedder training: losses against FlagEmbedding's definitions, cross-worker negatives against one
worker holding the whole batch, and the Ray Train job end to end (checkpoints load into FlagModel)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bge_ray.train import losses
from bge_ray.train.arguments import DataArgs, ModelArgs, RayArgs, TrainArgs
from tests.oracle import require

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _rand(b, g, d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(b, d, generator=gen), dim=-1)
    p = torch.nn.functional.normalize(torch.randn(b * g, d, generator=gen), dim=-1)
    t = torch.randn(b, g, generator=gen) * 3
    return q, p, t


def test_losses_equal_flagembedding_definitions():
    """Same inputs through FlagEmbedding's AbsEmbedderModel loss paths and ours."""
    fe = require("FlagEmbedding.abc.finetune.embedder.AbsModeling")
    from FlagEmbedding.finetune.embedder.encoder_only.base.modeling import BiEncoderOnlyEmbedderModel

    q, p, t = _rand(3, 4, 8)
    for kd in ("kl_div", "m3_kd_loss"):
        ref = BiEncoderOnlyEmbedderModel(torch.nn.Linear(1, 1), temperature=0.05, kd_loss_type=kd)
        ours = losses.ContrastiveLoss(0.05, kd_loss_type=kd)
        targets = torch.softmax(t, dim=-1)
        _, want = ref._compute_in_batch_neg_loss(q, p, teacher_targets=targets)
        assert torch.allclose(ours(q, p, t).value, want, atol=1e-6), kd
        _, want_plain = ref._compute_in_batch_neg_loss(q, p)
        assert torch.allclose(ours(q, p).value, want_plain, atol=1e-6)
    ref = BiEncoderOnlyEmbedderModel(torch.nn.Linear(1, 1), temperature=0.05, kd_loss_type="kl_div")
    _, want = ref._compute_no_in_batch_neg_loss(q, p, teacher_targets=torch.softmax(t, dim=-1))
    assert torch.allclose(losses.ContrastiveLoss(0.05)(q, p, t, no_in_batch_neg=True).value, want, atol=1e-6)
    _, want = ref._compute_no_in_batch_neg_loss(q, p)
    assert torch.allclose(losses.ContrastiveLoss(0.05)(q, p, no_in_batch_neg=True).value, want, atol=1e-6)
    assert fe.AbsEmbedderModel.distill_loss("kl_div", torch.softmax(t, -1), t * 0.5).item() == pytest.approx(
        losses.kl_div_loss(torch.softmax(t, -1), t * 0.5).item(), abs=1e-6)


def test_infonce_by_hand():
    q, p, _ = _rand(2, 3, 4, seed=1)
    s = q @ p.T / 0.02
    want = -(torch.log_softmax(s, -1)[0, 0] + torch.log_softmax(s, -1)[1, 3]) / 2
    assert losses.ContrastiveLoss(0.02)(q, p).value.item() == pytest.approx(want.item(), rel=1e-6)


def _train_file(tmp_path: Path, n: int = 8, scores: bool = True) -> Path:
    """Learnable groups: a query shares its topic's words with its positives, not with its negatives."""
    topics = [["river", "water", "fish"], ["bank", "loan", "credit"], ["music", "song", "guitar"],
              ["football", "goal", "team"], ["computer", "code", "program"], ["doctor", "health", "hospital"],
              ["train", "station", "travel"], ["garden", "flower", "tree"]]
    filler = ["the", "a", "of", "and", "is", "on", "with", "for"]
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        mine = topics[i % len(topics)]
        others = [w for j, t in enumerate(topics) if j != i % len(topics) for w in t]
        text = lambda words, k: " ".join(rng.permutation(list(words) + list(rng.choice(filler, k))))  # noqa: E731
        rec = {"query": text(mine[:2], 1), "pos": [text(mine, 3), text(mine, 4)],
               "neg": [text(rng.choice(others, 3), 3) for _ in range(5)]}
        if scores:
            rec["pos_scores"] = [float(x) for x in rng.normal(2, 1, 2)]
            rec["neg_scores"] = [float(x) for x in rng.normal(0, 1, 5)]
        rows.append(rec)
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _args(model, train_file, out, workers, batch, **train_kw):
    m = ModelArgs(model_name_or_path=str(model))
    d = DataArgs(train_data=[str(train_file)], train_group_size=3, query_max_len=16, passage_max_len=24,
                 knowledge_distillation=train_kw.pop("knowledge_distillation", False))
    defaults = {"learning_rate": 1e-4, "max_steps": 1, "temperature": 0.05, "save_steps": 1000}
    t = TrainArgs(output_dir=str(out), per_device_train_batch_size=batch, num_train_epochs=1,
                  sentence_pooling_method="cls", **{**defaults, **train_kw})
    r = RayArgs(num_workers=workers, cpus_per_worker=0.5)
    return m, d, t, r


def _first_step(model, train_file, out, workers, batch, **kw):
    from bge_ray.train.embedder import EmbedderTask
    from bge_ray.train.runner import run_training

    m, d, t, r = _args(model, train_file, out, workers, batch, **kw)
    dump = str(out) + ".grads.pt"
    run_training(EmbedderTask(m, d, t, "cls"), m, d, t, r, debug_grad_file=dump)
    return torch.load(dump, weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("kd", [False, True], ids=["infonce", "infonce+kl_div"])
def test_cross_worker_negatives_equal_one_worker_with_the_whole_batch(ray_local, tiny_bert_nodrop, tmp_path, kd):
    """Must-show 1: 2 workers at batch B with cross-worker negatives == 1 worker at batch 2B."""
    train = _train_file(tmp_path)
    kw = {"negatives_cross_device": True, "knowledge_distillation": kd, "temperature": 0.1}
    two = _first_step(tiny_bert_nodrop, train, tmp_path / "two", 2, 2, **kw)
    one = _first_step(tiny_bert_nodrop, train, tmp_path / "one", 1, 4, **kw)
    print(f"loss {one['loss']:.6f} vs {two['loss']:.6f}")
    assert two["loss"] == pytest.approx(one["loss"], abs=1e-5)
    assert set(two["grads"]) == set(one["grads"]) and len(one["grads"]) > 10
    worst = max((two["grads"][k] - one["grads"][k]).abs().max().item() for k in one["grads"])
    scale = max(one["grads"][k].abs().max().item() for k in one["grads"])
    print(f"max |grad difference| {worst:.2e}, largest gradient {scale:.2e}")
    # float32 sums in a different order: equal to a few ulps of the largest gradient, not bit for bit.
    assert worst <= 1e-5 * max(1.0, scale), (worst, scale)
    assert scale > 1e-3  # the comparison is not between zeros
    # Without gathering, two workers see fewer negatives: a different loss (the test can tell them apart).
    apart = _first_step(tiny_bert_nodrop, train, tmp_path / "apart", 2, 2, **{**kw, "negatives_cross_device": False})
    assert abs(apart["loss"] - one["loss"]) > 1e-3


@pytest.mark.slow
def test_finetune_job_lowers_loss_and_saves_a_flagmodel_checkpoint(ray_local, tiny_bert_nodrop, tmp_path):
    from bge_ray.models import FlagModel
    from bge_ray.train.embedder import BiEncoder, EmbedderTask
    from bge_ray.train.runner import run_training

    train = _train_file(tmp_path, n=8, scores=False)
    m, d, t, r = _args(tiny_bert_nodrop, train, tmp_path / "ft", 2, 2, max_steps=12, learning_rate=1e-3,
                       negatives_cross_device=True, logging_steps=1)
    t.sentence_pooling_method = "mean"
    result = run_training(EmbedderTask(m, d, t, "mean"), m, d, t, r)
    out = Path(result.output_dir)
    assert result.optimizer_steps == 12
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["final_metrics"]["step"] == 12 and summary["num_workers"] == 2
    assert json.loads((out / "1_Pooling" / "config.json").read_text())["pooling_mode_mean_tokens"] is True
    # The saved folder loads straight into FlagModel, FlagAutoModel finds the trained pooling in its
    # files, and both encode as the trained module does.
    from bge_ray.models import FlagAutoModel

    auto = FlagAutoModel.from_finetuned(str(out), devices="cpu", use_fp16=False)
    assert isinstance(auto, FlagModel) and auto.pooling_method == "mean"
    model = FlagModel(str(out), pooling_method="mean", devices="cpu", use_fp16=False)
    texts = ["river bank water", "loan credit account"]
    got = model.encode(texts)
    np.testing.assert_allclose(auto.encode(texts), got, atol=1e-6)
    from transformers import AutoModel, AutoTokenizer

    bi = BiEncoder(AutoModel.from_pretrained(out), "mean", True).eval()
    tok = AutoTokenizer.from_pretrained(out)
    with torch.no_grad():
        want = bi.encode(dict(tok(texts, padding=True, return_tensors="pt"))).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    # Loss went down: the first steps' losses are higher than the last ones'.
    history = [h["loss"] for h in summary["log_history"]]
    assert len(history) == 12 and [h["step"] for h in summary["log_history"]] == list(range(1, 13))
    print("losses", [round(x, 3) for x in history])
    assert np.mean(history[-4:]) < 0.8 * np.mean(history[:4])


SHARED_FT = Path(__file__).resolve().parents[2] / "shared" / "data" / "finetune" / "embedder"


@pytest.mark.slow
@pytest.mark.usefixtures("shared_data")  # fails, not skips, without ../shared
def test_job_script_on_flagembedding_example_data(ray_local, tiny_bert, tmp_path):
    """The job's command line with FlagEmbedding's flags, on its example folders: same-dataset batches,
    no-in-batch-neg folders, teacher scores where present, bf16 autocast, gradient checkpointing."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("finetune_embedder", Path(__file__).parents[1] / "jobs" / "finetune_embedder.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    out = tmp_path / "ft"
    argv = ["--model_name_or_path", str(tiny_bert), "--train_data", str(SHARED_FT / "retrieval"),
            str(SHARED_FT / "classification-no_in_batch_neg"), str(SHARED_FT / "sts"),
            "--output_dir", str(out), "--train_group_size", "4", "--query_max_len", "16", "--passage_max_len", "32",
            "--per_device_train_batch_size", "2", "--same_dataset_within_batch", "True", "--knowledge_distillation",
            "True", "--query_instruction_for_retrieval", "Represent: ", "--query_instruction_format", "{}{}",
            "--bf16", "--gradient_checkpointing", "--max_steps", "4", "--negatives_cross_device",
            "--num_workers", "2", "--cpus_per_worker", "0.5", "--learning_rate", "1e-4", "--logging_steps", "1"]
    assert job.main(argv) == 0
    summary = json.loads((out / "training_summary.json").read_text())
    assert [h["step"] for h in summary["log_history"]] == [1, 2, 3, 4]
    assert all(np.isfinite(h["loss"]) for h in summary["log_history"])
    assert summary["args"]["train"]["bf16"] is True and summary["args"]["data"]["same_dataset_within_batch"] is True
    from bge_ray.models import FlagAutoModel

    emb = FlagAutoModel.from_finetuned(str(out), devices="cpu", use_fp16=False).encode(["a query", "a passage"])
    assert emb.shape == (2, 32) and np.isfinite(emb).all()


@pytest.mark.slow
def test_gradient_cache_gives_the_whole_batch_gradients(ray_local, tiny_bert_nodrop, tmp_path):
    """Sub-batches of 3 texts with gradient caching, on 2 workers with cross-worker negatives, take
    the same step as one plain forward/backward over the whole batch on one worker."""
    train = _train_file(tmp_path)
    kw = {"negatives_cross_device": True, "knowledge_distillation": True, "temperature": 0.1}
    plain = _first_step(tiny_bert_nodrop, train, tmp_path / "plain", 1, 4, **kw)
    cached = _first_step(tiny_bert_nodrop, train, tmp_path / "cached", 2, 2, grad_cache=True, sub_batch_size=3, **kw)
    assert cached["loss"] == pytest.approx(plain["loss"], abs=1e-5)
    worst = max((cached["grads"][k] - plain["grads"][k]).abs().max().item() for k in plain["grads"])
    scale = max(plain["grads"][k].abs().max().item() for k in plain["grads"])
    print(f"grad cache: max |grad difference| {worst:.2e}, largest gradient {scale:.2e}")
    assert worst <= 1e-5 * max(1.0, scale), (worst, scale)
    with pytest.raises(ValueError, match="needs --sub_batch_size"):
        _first_step(tiny_bert_nodrop, train, tmp_path / "bad", 1, 4, grad_cache=True)
