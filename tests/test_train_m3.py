"""BGE-M3 unified fine-tuning: the loss against FlagEmbedding's ``EncoderOnlyEmbedderM3Model`` (values and
gradients, one process and two), cross-worker negatives for every mode against one worker holding the
whole batch, and the Ray Train job end to end (the checkpoint loads into BGEM3FlagModel)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from bge_ray.train.m3 import M3Args, M3Loss, build_m3_module, colbert_scores

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

T = 0.05
GROUP = 3


def _nodrop(path):
    """The tiny M3 backbone without dropout (deterministic forward passes) and its tokenizer."""
    from transformers import AutoModel, AutoTokenizer

    backbone = AutoModel.from_pretrained(str(path), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return backbone, AutoTokenizer.from_pretrained(str(path))


def _nodrop_copy(path, out: Path) -> Path:
    """The tiny M3 checkpoint saved without dropout (its heads and tokenizer beside): Ray Train runs
    that are deterministic, so a dozen steps show the loss going down."""
    import shutil

    backbone, tok = _nodrop(path)
    backbone.save_pretrained(out)
    tok.save_pretrained(out)
    for name in ("colbert_linear.pt", "sparse_linear.pt"):
        shutil.copy(Path(path) / name, out / name)
    return out


def _batch(n_queries: int, group: int = GROUP):
    """Queries, their groups of passages (uneven lengths: padding matters) and teacher scores."""
    words = ["river", "bank", "water", "loan", "credit", "music", "song", "guitar", "the", "of", "team", "goal"]
    rng = np.random.default_rng(7)
    text = lambda k: " ".join(rng.choice(words, k))  # noqa: E731
    queries = [text(2 + i % 3) for i in range(n_queries)]
    passages = [text(3 + (5 * i) % 7) for i in range(n_queries * group)]
    teacher = [[float(x) for x in rng.normal(0, 2, group)] for _ in range(n_queries)]
    return queries, passages, teacher


def _features(tok, queries, passages):
    from bge_ray.train.embedder import tokenize_texts

    return tokenize_texts(tok, queries, 16, "cpu"), tokenize_texts(tok, passages, 24, "cpu")


def _fe_model(backbone, tok, ours, unified, sd=False, start=-1, kd="kl_div", cross=False, sub_batch_size=None):
    from FlagEmbedding.finetune.embedder.encoder_only.m3.modeling import EncoderOnlyEmbedderM3Model

    base = {"model": backbone, "colbert_linear": ours.colbert_linear, "sparse_linear": ours.sparse_linear}
    return EncoderOnlyEmbedderM3Model(base, tokenizer=tok, negatives_cross_device=cross, temperature=T,
                                      sub_batch_size=sub_batch_size, kd_loss_type=kd, sentence_pooling_method="cls",
                                      normalize_embeddings=True, unified_finetuning=unified, use_self_distill=sd,
                                      self_distill_start_step=start).train()


def _grads(module):
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


CASES = [  # (unified, self-distill, teacher kd type or None, no_in_batch_neg, sub_batch_size)
    (False, False, None, False, None),
    (False, False, "kl_div", False, None),
    (False, False, "m3_kd_loss", False, None),
    (False, False, None, True, None),
    (False, False, "kl_div", True, None),
    (True, False, None, False, None),
    (True, False, "kl_div", False, None),
    (True, False, "m3_kd_loss", False, None),
    (True, True, None, False, None),
    (True, True, "kl_div", False, None),
    (True, True, "m3_kd_loss", False, None),
    (True, True, "kl_div", False, 2),
]


@pytest.mark.parametrize("unified,sd,kd,nibn,sub", CASES,
                         ids=[f"{'unified' if u else 'dense'}{'+sd' if s else ''}-{k or 'nokd'}"
                              f"{'-nibn' if n else ''}{'-sub' if b else ''}" for u, s, k, n, b in CASES])
def test_m3_loss_equals_flagembedding(tiny_m3, unified, sd, kd, nibn, sub):
    """The same backbone and heads through FlagEmbedding's EncoderOnlyEmbedderM3Model.forward and through
    our module + M3Loss: loss values and every parameter's gradient."""
    backbone, tok = _nodrop(tiny_m3)
    m3 = M3Args(unified_finetuning=unified, use_self_distill=sd)
    ours = build_m3_module(backbone, tok, str(tiny_m3), m3, sub_batch_size=sub).train()
    fe = _fe_model(backbone, tok, ours, unified, sd, kd=kd or "kl_div", sub_batch_size=sub)
    queries, passages, teacher = _batch(3)
    q, p = _features(tok, queries, passages)
    want = fe(queries=q, passages=p, teacher_scores=teacher if kd else None, no_in_batch_neg_flag=nibn).loss
    want.backward()
    want_grads = _grads(ours)
    ours.zero_grad()
    loss = M3Loss(T, kd_loss_type=kd or "kl_div", unified=unified, use_self_distill=sd)
    q_reps, p_reps = ours(q, p)
    got = loss(q_reps, p_reps, q["attention_mask"], torch.tensor(teacher) if kd else None, nibn, step=0)
    got.backward.backward()
    grads = _grads(ours)
    assert set(grads) == set(want_grads) and len(grads) > 10
    if unified:
        assert {"colbert_linear.weight", "sparse_linear.weight"} <= set(grads)
    worst = max((grads[k] - want_grads[k]).abs().max().item() for k in grads)
    scale = max(want_grads[k].abs().max().item() for k in grads)
    print(f"loss {got.value.item():.6f} vs FlagEmbedding {want.item():.6f} "
          f"(|diff| {abs(got.value.item() - want.item()):.1e}); max |grad diff| {worst:.1e} of {scale:.1e}")
    assert got.value.item() == pytest.approx(want.item(), abs=1e-5)
    assert worst <= 1e-5 * max(1.0, scale)


def test_self_distill_starts_after_the_start_step(tiny_m3):
    """FlagEmbedding counts forward passes: with start step 0 the first pass has no self-distillation,
    the second has. Our ``step`` is the loop's micro-batch index."""
    backbone, tok = _nodrop(tiny_m3)
    ours = build_m3_module(backbone, tok, str(tiny_m3), M3Args(unified_finetuning=True)).train()
    fe = _fe_model(backbone, tok, ours, True, sd=True, start=0)
    loss = M3Loss(T, unified=True, use_self_distill=True, self_distill_start_step=0)
    q, p = _features(tok, *_batch(3)[:2])
    values = []
    for step in (0, 1):
        with torch.no_grad():
            want = fe(queries=q, passages=p).loss.item()
            got = loss(*ours(q, p), q["attention_mask"], step=step).value.item()
        assert got == pytest.approx(want, abs=1e-5)
        values.append(got)
    plain = M3Loss(T, unified=True)
    with torch.no_grad():
        assert values[0] == pytest.approx(plain(*ours(q, p), q["attention_mask"]).value.item(), abs=1e-6)
    assert abs(values[1] - values[0]) > 1e-3


def _log_softmax_ce(scores, target=0):
    return -torch.log_softmax(scores, -1)[:, target].mean()


def test_no_in_batch_neg_unified_by_hand(tiny_m3):
    """``no_in_batch_neg`` with unified fine-tuning, in float64 from the stated formulas. Not against
    FlagEmbedding: 1.4.2 scores its ensemble here with a group size of 1 (the diagonal of the [B, G]
    group scores, a one-column softmax: its ensemble loss is 0, and B > G raises IndexError)."""
    backbone, tok = _nodrop(tiny_m3)
    ours = build_m3_module(backbone, tok, str(tiny_m3), M3Args(unified_finetuning=True)).train()
    queries, passages, teacher = _batch(3)
    q, p = _features(tok, queries, passages)
    with torch.no_grad():
        q_reps, p_reps = ours(q, p)
    for r in (q_reps, p_reps):
        r.dense, r.sparse, r.colbert = r.dense.double(), r.sparse.double(), r.colbert.double()
    got = M3Loss(T, unified=True, use_self_distill=True)(q_reps, p_reps, q["attention_mask"],
                                                          torch.tensor(teacher, dtype=torch.float64),
                                                          no_in_batch_neg=True).value.item()
    b, g = len(queries), GROUP
    qm = q["attention_mask"]
    dense = torch.zeros(b, g, dtype=torch.float64)
    sparse, colbert = torch.zeros_like(dense), torch.zeros_like(dense)
    for i in range(b):
        n_q = int(qm[i].sum()) - 1  # query tokens after the first
        for j in range(g):
            k = i * g + j
            dense[i, j] = q_reps.dense[i] @ p_reps.dense[k] / T
            sparse[i, j] = sum(q_reps.sparse[i, v] * p_reps.sparse[k, v] for v in range(q_reps.sparse.size(1))
                               if q_reps.sparse[i, v] != 0) / T
            # every query position (padding: zero vectors) takes its best passage position (padding too)
            best = [max(float(q_reps.colbert[i, a] @ p_reps.colbert[k, c]) for c in range(p_reps.colbert.size(1)))
                    for a in range(q_reps.colbert.size(1))]
            colbert[i, j] = sum(best) / n_q / T
    targets = torch.softmax(torch.tensor(teacher, dtype=torch.float32), -1).double()  # ContrastiveLoss: float32
    kl = lambda t, s: -(torch.log_softmax(s, -1) * t).sum(-1).mean()  # noqa: E731
    term = lambda s: kl(targets, s) + _log_softmax_ce(s)  # noqa: E731  (kl_div distillation + InfoNCE)
    ens = dense + 0.3 * sparse + colbert
    loss = (term(dense) + term(ens) + 0.1 * term(sparse) + term(colbert)) / 4
    self_t = torch.softmax(ens, -1)
    want = (loss + (kl(self_t, dense) + 0.1 * kl(self_t, sparse) + kl(self_t, colbert)) / 3) / 2
    assert got == pytest.approx(want.item(), abs=1e-9)
    from bge_ray.train.losses import group_scores

    assert torch.allclose(colbert, group_scores(colbert_scores(q_reps.colbert, p_reps.colbert, qm[:, 1:], T), g))


def test_heads_loading_and_freezing(tiny_m3, tmp_path):
    backbone, tok = _nodrop(tiny_m3)
    saved = torch.load(Path(tiny_m3) / "sparse_linear.pt", weights_only=True)
    m = build_m3_module(backbone, tok, str(tiny_m3), M3Args(unified_finetuning=True))
    assert torch.equal(m.sparse_linear.weight.detach(), saved["weight"])
    assert all(p.requires_grad for n, p in m.named_parameters() if not n.startswith("backbone.pooler"))
    m = build_m3_module(backbone, tok, str(tiny_m3), M3Args(unified_finetuning=True, fix_encoder=True))
    assert {n for n, p in m.named_parameters() if p.requires_grad} == {
        "colbert_linear.weight", "colbert_linear.bias", "sparse_linear.weight", "sparse_linear.bias"}
    backbone, tok = _nodrop(tiny_m3)
    m = build_m3_module(backbone, tok, str(tiny_m3), M3Args(unified_finetuning=True, fix_heads=True))
    assert not m.colbert_linear.weight.requires_grad and m.backbone.embeddings.word_embeddings.weight.requires_grad
    # Dense mode keeps the checkpoint's heads, frozen, so the result still loads as BGE-M3.
    m = build_m3_module(backbone, tok, str(tiny_m3), M3Args())
    assert m.colbert_linear is not None and not m.colbert_linear.weight.requires_grad
    with pytest.raises(ValueError, match="nothing to train"):
        build_m3_module(backbone, tok, str(tiny_m3), M3Args(fix_encoder=True))
    backbone, tok = _nodrop(tiny_m3)
    # No heads in the folder: new ones (colbert_dim honoured) for unified fine-tuning, none for dense.
    bare = tmp_path / "bare"
    backbone.save_pretrained(bare)
    m = build_m3_module(backbone, tok, str(bare), M3Args(unified_finetuning=True, colbert_dim=8))
    assert m.colbert_linear.out_features == 8 and m.sparse_linear.out_features == 1
    assert build_m3_module(backbone, tok, str(bare), M3Args()).colbert_linear is None
    with pytest.raises(ValueError, match="does not fit"):
        build_m3_module(backbone, tok, str(tiny_m3), M3Args(unified_finetuning=True, colbert_dim=8))


def test_job_requires_a_model(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("finetune_m3", Path(__file__).parents[1] / "jobs" / "finetune_m3.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    data = tmp_path / "t.jsonl"
    data.write_text(json.dumps({"query": "q", "pos": ["p"], "neg": ["n"]}) + "\n")
    with pytest.raises(SystemExit) as exc:
        job.main(["--train_data", str(data), "--output_dir", str(tmp_path / "o")])
    assert exc.value.code == 2
    assert "--model_name_or_path" in capsys.readouterr().err


# -- two processes --------------------------------------------------------------------------------------
def _dist_worker(rank: int, world: int, port: int, model_path: str, out_file: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        backbone, tok = _nodrop(model_path)
        ours = build_m3_module(backbone, tok, model_path, M3Args(unified_finetuning=True)).train()
        queries, passages, teacher = _batch(2 * world)
        b = 2
        q, p = _features(tok, queries[rank * b:(rank + 1) * b], passages[rank * b * GROUP:(rank + 1) * b * GROUP])
        t = teacher[rank * b:(rank + 1) * b]
        result = {}
        for kd in ("kl_div", "m3_kd_loss"):
            # FlagEmbedding's semantics (dense negatives gathered, the other modes per worker): its loss
            # on each rank, averaged, is our reported value.
            fe = _fe_model(backbone, tok, ours, True, sd=True, kd=kd, cross=True)
            with torch.no_grad():
                fe_loss = fe(queries=q, passages=p, teacher_scores=t).loss.detach()
                dist.all_reduce(fe_loss)
                ours_fe = M3Loss(T, True, kd, True, True)(*ours(q, p), q["attention_mask"], torch.tensor(t)).value
            # Every mode gathered: loss and DDP-averaged gradients of one worker holding the whole batch.
            ours.zero_grad()
            out = M3Loss(T, True, kd, True, True, cross_device_all_modes=True)(
                *ours(q, p), q["attention_mask"], torch.tensor(t))
            out.backward.backward()
            grads = _grads(ours)
            for g in grads.values():
                dist.all_reduce(g)
                g /= world
            result[kd] = {"fe": fe_loss.item() / world, "ours_fe": ours_fe.item(), "all": out.value.item(),
                          "grads": grads}
        if rank == 0:
            torch.save(result, out_file)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_workers_equal_flagembedding_and_one_worker_with_the_whole_batch(tiny_m3, tmp_path):
    import torch.multiprocessing as mp

    out_file = str(tmp_path / "dist.pt")
    mp.spawn(_dist_worker, args=(2, _free_port(), str(tiny_m3), out_file), nprocs=2, join=True)
    result = torch.load(out_file, weights_only=True)
    backbone, tok = _nodrop(tiny_m3)
    ours = build_m3_module(backbone, tok, str(tiny_m3), M3Args(unified_finetuning=True)).train()
    queries, passages, teacher = _batch(4)
    q, p = _features(tok, queries, passages)
    for kd, r in result.items():
        assert r["ours_fe"] == pytest.approx(r["fe"], abs=1e-5), kd
        ours.zero_grad()
        one = M3Loss(T, False, kd, True, True)(*ours(q, p), q["attention_mask"], torch.tensor(teacher))
        one.backward.backward()
        want = _grads(ours)
        worst = max((r["grads"][k] - want[k]).abs().max().item() for k in want)
        scale = max(want[k].abs().max().item() for k in want)
        print(f"{kd}: FlagEmbedding 2 ranks {r['fe']:.6f} vs ours {r['ours_fe']:.6f}; all modes gathered "
              f"{r['all']:.6f} vs one worker {one.value.item():.6f}; max |grad diff| {worst:.1e} of {scale:.1e}")
        assert set(r["grads"]) == set(want)
        assert r["all"] == pytest.approx(one.value.item(), abs=1e-5), kd
        assert worst <= 1e-5 * max(1.0, scale), kd
        assert abs(r["fe"] - one.value.item()) > 1e-3  # per-worker sparse / ColBERT negatives: another loss


# -- Ray Train --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_finetune_m3_lowers_loss_and_saves_a_bgem3_checkpoint(ray_local, tiny_m3, tmp_path):
    from bge_ray.models import BGEM3FlagModel, FlagAutoModel
    from bge_ray.train.m3 import M3Task
    from bge_ray.train.runner import run_training
    from tests.test_train_embedder import _args, _train_file

    train = _train_file(tmp_path, n=8, scores=True)
    start = _nodrop_copy(tiny_m3, tmp_path / "m3-nodrop")
    m, d, t, r = _args(start, train, tmp_path / "ft", 2, 2, max_steps=12, learning_rate=3e-3,
                       negatives_cross_device=True, knowledge_distillation=True, logging_steps=1)
    # Self-distillation from the first step: one loss definition throughout. Every mode gathers negatives.
    m3 = M3Args(unified_finetuning=True, use_self_distill=True, cross_device_all_modes=True)
    result = run_training(M3Task(m, d, t, "cls", m3), m, d, t, r)
    out = Path(result.output_dir)
    summary = json.loads((out / "training_summary.json").read_text())
    history = [h["loss"] for h in summary["log_history"]]
    print("losses", [round(x, 3) for x in history])
    assert len(history) == 12 and summary["num_workers"] == 2
    assert np.mean(history[-4:]) < 0.8 * np.mean(history[:4])
    for name in ("colbert_linear.pt", "sparse_linear.pt", "config.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    # The heads trained: the saved ones differ from the starting checkpoint's.
    before = torch.load(start / "colbert_linear.pt", weights_only=True)["weight"]
    assert not torch.allclose(torch.load(out / "colbert_linear.pt", weights_only=True)["weight"], before)

    auto = FlagAutoModel.from_finetuned(str(out), devices="cpu", use_fp16=False)
    assert isinstance(auto, BGEM3FlagModel)
    model = BGEM3FlagModel(str(out), devices="cpu", use_fp16=False)
    texts = ["river bank water", "loan credit for the bank account", "music"]
    got = model.encode(texts, return_dense=True, return_sparse=True, return_colbert_vecs=True)
    backbone, tok = _nodrop(out)
    trained = build_m3_module(backbone, tok, str(out), m3).eval()
    from bge_ray.train.embedder import tokenize_texts

    feats = tokenize_texts(tok, texts, 512, "cpu")
    with torch.no_grad():
        reps = trained.encode(feats)
    np.testing.assert_allclose(got["dense_vecs"], reps.dense.numpy(), atol=1e-5)
    np.testing.assert_allclose(auto.encode(texts)["dense_vecs"], got["dense_vecs"], atol=1e-6)
    for i, lex in enumerate(got["lexical_weights"]):
        nz = reps.sparse[i].nonzero().flatten().tolist()
        assert sorted(int(k) for k in lex) == nz
        np.testing.assert_allclose([lex[str(v)] for v in nz], reps.sparse[i, nz].numpy(), atol=1e-5)
        n = int(feats["attention_mask"][i].sum()) - 1
        np.testing.assert_allclose(got["colbert_vecs"][i], reps.colbert[i, :n].numpy(), atol=1e-5)
