"""RetroMAE pre-training: the masking collator against FlagEmbedding's definitions (ratios, 80/10/10,
whole words, special tokens, the decoder's attention mask), the loss against a by-hand computation,
saving and resuming, the text reader, and the Ray Train job end to end (loss falls, FlagModel loads)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from bge_ray.io.training_data import TrainingDataError
from bge_ray.train.arguments import ModelArgs, TrainArgs
from bge_ray.train.retromae import (
    RetroMAECollator,
    RetroMAEDataArgs,
    RetroMAETask,
    load_pretraining_corpus,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _corpus_texts(sample_corpus) -> list[str]:
    with open(sample_corpus, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def _task(model, **data_kw) -> RetroMAETask:
    return RetroMAETask(ModelArgs(model_name_or_path=str(model)), RetroMAEDataArgs(**data_kw), TrainArgs(seed=7))


@pytest.fixture(scope="module")
def tokenizer(tiny_bert):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_bert)


@pytest.fixture(scope="module")
def big_batch(tokenizer, sample_corpus):
    """The sample corpus five times over (different masks each time): ~10k tokens."""
    texts = _corpus_texts(sample_corpus) * 5
    collator = RetroMAECollator(tokenizer, max_seq_length=64, encoder_mlm_probability=0.3, decoder_mlm_probability=0.5)
    batch = collator(texts, [(0, i) for i in range(len(texts))])
    return texts, batch


def test_masking_ratios_and_special_tokens(tokenizer, big_batch):
    texts, b = big_batch
    ids, attn = b["decoder_input_ids"], b["encoder_attention_mask"].bool()
    special = torch.tensor([tokenizer.get_special_tokens_mask(row.tolist(), already_has_special_tokens=True)
                            for row in ids]).bool() | ~attn
    lengths = attn.sum(1)
    n_tokens, n_content = int(lengths.sum()), int((~special).sum())
    assert n_tokens > 8000

    # Encoder: FlagEmbedding (HF whole-word masking) masks round(0.3 x length with [CLS]/[SEP]) tokens.
    masked = b["encoder_labels"] != -100
    ratio = masked.sum().item() / n_tokens
    print(f"encoder: {masked.sum().item()} of {n_tokens} tokens masked = {ratio:.4f} "
          f"({masked.sum().item() / n_content:.4f} of the {n_content} non-special ones)")
    assert abs(ratio - 0.3) < 0.01
    want = sum(max(1, round(int(n) * 0.3)) for n in lengths)
    assert want - masked.sum().item() < 0.01 * want  # whole words rarely leave the count short
    assert torch.equal(b["encoder_labels"][masked], ids[masked])
    assert not (masked & special).any(), "a special token or padding was masked"
    assert torch.equal(b["encoder_input_ids"][special], ids[special])
    # 80% [MASK], 10% a random token, 10% kept.
    enc = b["encoder_input_ids"][masked]
    orig = ids[masked]
    to_mask = (enc == tokenizer.mask_token_id).float().mean().item()
    kept = (enc == orig).float().mean().item()
    rand = ((enc != orig) & (enc != tokenizer.mask_token_id)).float().mean().item()
    print(f"of the masked: {to_mask:.3f} [MASK], {rand:.3f} random, {kept:.3f} kept")
    assert abs(to_mask - 0.8) < 0.03 and abs(rand - 0.1) < 0.025 and abs(kept - 0.1) < 0.025
    # Whole words: a word's pieces are masked together.
    enc_words = tokenizer(texts, truncation=True, max_length=64)
    split = 0
    for r in range(len(texts)):
        words = enc_words.word_ids(r)
        for w in {x for x in words if x is not None}:
            pos = [i for i, x in enumerate(words) if x == w]
            if len(pos) > 1:
                split += 1
                assert masked[r, pos].all() or not masked[r, pos].any(), (texts[r], w)
    assert split > 50  # the check saw many multi-piece words

    # Decoder: every non-special token is a target; each row hides ~half of the other positions.
    assert torch.equal(b["decoder_labels"] != -100, ~special)
    dec = b["decoder_attention_mask"].bool()
    hidden_other, total_other = 0, 0
    for r in range(len(texts)):
        n = int(lengths[r])
        m = dec[r, :n, :n]
        off = ~torch.eye(n, dtype=torch.bool)
        hidden_other += (~m & off).sum().item()
        total_other += off.sum().item()
        # [CLS] and [SEP] are never in a sampled mask: every other row sees them.
        assert m[1:, 0].all() and m[:-1, n - 1].all()
    dec_ratio = hidden_other / total_other
    print(f"decoder: {dec_ratio:.4f} of the other positions hidden per row ({total_other} row-column pairs)")
    assert abs(dec_ratio - 0.5) < 0.02


def test_word_ids_group_tokens_as_wordpiece_pieces(tokenizer, sample_corpus):
    """Whole words come from the fast tokenizer's word ids; for BERT that is FlagEmbedding's (HF's)
    rule of ``##`` pieces joining the previous token, the fallback for slow tokenizers."""
    from bge_ray.train.retromae import _words_from_pieces

    texts = _corpus_texts(sample_corpus)
    collator = RetroMAECollator(tokenizer, max_seq_length=64)
    for ids, special, words in collator._encode(texts):
        assert _words_from_pieces(tokenizer.convert_ids_to_tokens(ids), special) == words


def test_decoder_attention_never_sees_itself(big_batch):
    texts, b = big_batch
    dec = b["decoder_attention_mask"]
    length = dec.shape[1]
    assert dec.shape == (len(texts), length, length)
    assert (torch.diagonal(dec, dim1=1, dim2=2) == 0).all()
    pad = ~b["encoder_attention_mask"].bool()
    assert (dec.transpose(1, 2)[pad] == 0).all(), "a padding position is visible"
    # Rows draw different masks (FlagEmbedding samples min(len, 128) per text).
    n = int(b["encoder_attention_mask"][0].sum())
    rows = {tuple(dec[0, i, :n].tolist()) for i in range(n)}
    assert len(rows) > n // 2


def test_masks_are_a_function_of_text_and_key(tokenizer):
    collator = RetroMAECollator(tokenizer, 32, 0.3, 0.5, seed=3)
    texts = ["a reproducible batch of several words", "another longer text with quite a few more words in it"]
    a, b = collator(texts, [(4, 0), (4, 1)]), collator(texts, [(4, 0), (4, 1)])
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = collator(texts, [(5, 0), (5, 1)])
    assert not torch.equal(a["decoder_attention_mask"], c["decoder_attention_mask"])
    # One text alone gets the masks it gets in a batch (padding does not change them).
    single = collator(texts[1:], [(4, 1)])
    assert torch.equal(single["encoder_input_ids"][0], a["encoder_input_ids"][1])


def _decoder_by_hand(model, cls: torch.Tensor, ids: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Logits of one text's decoder, written out from the weights (no padding)."""
    F = torch.nn.functional
    bert = model.lm.bert
    emb, head, layer = bert.embeddings, model.lm.cls.predictions, model.c_head
    n, d = ids.shape[0], cls.shape[-1]
    ln = lambda x, m: F.layer_norm(x, (d,), m.weight, m.bias, m.eps)  # noqa: E731
    pos, typ = emb.position_embeddings.weight[:n], emb.token_type_embeddings.weight[0]
    context = torch.cat([cls[None], ln(emb.word_embeddings.weight[ids[1:]] + pos[1:] + typ, emb.LayerNorm)])
    query = ln(cls[None] + pos + typ, emb.LayerNorm)
    att = layer.attention.self
    h, dh = att.num_heads, d // att.num_heads
    q = (query @ att.query.weight.T + att.query.bias).view(n, h, dh).transpose(0, 1)
    k = (context @ att.key.weight.T + att.key.bias).view(n, h, dh).transpose(0, 1)
    v = (context @ att.value.weight.T + att.value.bias).view(n, h, dh).transpose(0, 1)
    scores = (q @ k.transpose(1, 2) / math.sqrt(dh)).masked_fill(~visible[None], float("-inf"))
    ctx = (torch.softmax(scores, -1) @ v).transpose(0, 1).reshape(n, d)
    so = layer.attention.output
    a = ln(ctx @ so.dense.weight.T + so.dense.bias + query, so.LayerNorm)
    ff = F.gelu(a @ layer.intermediate.dense.weight.T + layer.intermediate.dense.bias)
    out = ln(ff @ layer.output.dense.weight.T + layer.output.dense.bias + a, layer.output.LayerNorm)
    t = head.transform
    z = ln(F.gelu(out @ t.dense.weight.T + t.dense.bias), t.LayerNorm)
    return z @ emb.word_embeddings.weight.T + head.bias


def test_loss_is_encoder_mlm_plus_decoder_loss_by_hand(tiny_bert_nodrop):
    task = _task(tiny_bert_nodrop, max_seq_length=40)
    model, tok = task.build()
    model.eval()
    texts = ["the river bank was full of water after the storm", "music and song",
             "a doctor at the hospital looked after the patients all night long"]
    b = task.collator(tok)(texts, [(0, 0), (0, 1), (0, 2)])
    with torch.no_grad():
        out = model(**b)
        enc_nll, dec_nll = [], []
        for r in range(len(texts)):
            n = int(b["encoder_attention_mask"][r].sum())
            enc_ids = b["encoder_input_ids"][r, :n][None]
            hidden = model.lm.bert(input_ids=enc_ids).last_hidden_state[0]
            logp = torch.log_softmax(model.lm.cls(hidden), -1)
            for i, label in enumerate(b["encoder_labels"][r, :n].tolist()):
                if label != -100:
                    enc_nll.append(-logp[i, label].item())
            logp = torch.log_softmax(_decoder_by_hand(model, hidden[0], b["decoder_input_ids"][r, :n],
                                                      b["decoder_attention_mask"][r, :n, :n].bool()), -1)
            for i, label in enumerate(b["decoder_labels"][r, :n].tolist()):
                if label != -100:
                    dec_nll.append(-logp[i, label].item())
    enc_loss, dec_loss = float(np.mean(enc_nll)), float(np.mean(dec_nll))
    print(f"encoder MLM {enc_loss:.5f} ({len(enc_nll)} targets) + decoder {dec_loss:.5f} ({len(dec_nll)} targets) "
          f"= {enc_loss + dec_loss:.5f}; module: {out.loss.item():.5f}")
    assert len(dec_nll) == sum(len(tok(t)["input_ids"]) - 2 for t in texts)
    assert out.encoder_loss.item() == pytest.approx(enc_loss, abs=1e-4)
    assert out.decoder_loss.item() == pytest.approx(dec_loss, abs=1e-4)
    assert out.loss.item() == pytest.approx(enc_loss + dec_loss, abs=2e-4)
    # The loss reaches every parameter: the encoder, the shared embeddings and MLM head, the decoder.
    model.train()
    model(**b).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_save_writes_a_flagmodel_checkpoint_and_load_resumes(tiny_bert_nodrop, tmp_path):
    from bge_ray.models import FlagAutoModel, FlagModel

    task = _task(tiny_bert_nodrop, max_seq_length=32)
    model, tok = task.build()
    with torch.no_grad():  # move away from the initial weights so a reload is not trivially equal
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    task.save(model, tok, str(tmp_path / "ckpt"))
    fresh, _ = _task(tiny_bert_nodrop, max_seq_length=32).build()
    task.load(fresh, str(tmp_path / "ckpt"))
    a, b = model.state_dict(), fresh.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)

    texts = ["river bank water", "loan credit account", "a much longer sentence about the football team"]
    flag = FlagModel(str(tmp_path / "ckpt"), devices="cpu", use_fp16=False)
    auto = FlagAutoModel.from_finetuned(str(tmp_path / "ckpt"), devices="cpu", use_fp16=False)
    assert isinstance(auto, FlagModel) and auto.pooling_method == "cls"
    got = flag.encode(texts)
    model.eval()
    with torch.no_grad():
        feats = tok(texts, padding=True, return_tensors="pt")
        cls = model.lm.bert(**feats).last_hidden_state[:, 0]
        want = torch.nn.functional.normalize(cls, dim=-1).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(auto.encode(texts), want, atol=1e-5)


def test_config_name_trains_from_scratch(tiny_bert_nodrop):
    task = RetroMAETask(ModelArgs(model_name_or_path=str(tiny_bert_nodrop), config_name=str(tiny_bert_nodrop)),
                        RetroMAEDataArgs(), TrainArgs())
    scratch, _ = task.build()
    loaded, _ = _task(tiny_bert_nodrop).build()
    w = "bert.encoder.layer.0.attention.self.query.weight"
    assert scratch.lm.state_dict()[w].shape == loaded.lm.state_dict()[w].shape
    assert not torch.equal(scratch.lm.state_dict()[w], loaded.lm.state_dict()[w])


def test_text_reader_errors_name_file_and_line(tmp_path):
    good = tmp_path / "corpus"
    good.mkdir()
    (good / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "id": 3}\n{"text": "  "}\n')
    (good / "b.json").write_text('{"text": "three"}\n')
    (good / "notes.txt").write_text("ignored")
    table, sources = load_pretraining_corpus([str(good)], 2)
    assert [r["text"] for r in table] == ["one", "two", "three"]
    assert [(Path(r["file"]).name, r["line"]) for r in table] == [("a.jsonl", 1), ("a.jsonl", 3), ("b.json", 1)]
    assert len(sources) == 2
    for body, line, what in [('{"text": "x"}\n{"txt": "y"}\n', 2, "missing 'text'"),
                             ('{"text": "x"}\n{"text": 5}\n', 2, "must be a string"),
                             ('{"text": "x"}\n\n{"text": \n', 3, "not valid JSON"),
                             ('["text"]\n', 1, "expected a JSON object")]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(body)
        with pytest.raises(TrainingDataError, match=rf"bad\.jsonl:{line}: .*{what}"):
            load_pretraining_corpus([str(bad)], 2)
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n')
    with pytest.raises(TrainingDataError, match="no pre-training texts"):
        load_pretraining_corpus([str(empty)], 2)


def test_plan_deals_each_rank_its_slots(tmp_path):
    from bge_ray.train.data import plan_training, rank_rows

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"text": f"a{i}"}) + "\n" for i in range(7)))
    b.write_text("".join(json.dumps({"text": f"b{i}"}) + "\n" for i in range(5)))
    table, sources = load_pretraining_corpus([str(a), str(b)], 3)
    plan = plan_training(sources, 2, seed=1, num_train_epochs=1, max_steps=-1)
    assert len(plan.batches) == 2  # 12 texts, global batches of 6, files pooled
    ranks = [rank_rows(table, plan, r) for r in range(2)]
    assert all(len(rows) == 6 for rows in ranks)
    seen = [row["text"] for rows in ranks for row in rows]
    assert sorted(seen) == sorted(r["text"] for r in table)
    assert {row["slot"] for row in ranks[1]} == {3, 4, 5}


def test_data_args_reject_bad_ratios():
    with pytest.raises(ValueError, match="encoder_mlm_probability"):
        RetroMAEDataArgs(encoder_mlm_probability=0.0)
    with pytest.raises(ValueError, match="decoder_mlm_probability"):
        RetroMAEDataArgs(decoder_mlm_probability=1.0)


@pytest.mark.slow
def test_pretrain_job_lowers_loss_and_saves_a_flagmodel_encoder(ray_local, tiny_bert, tmp_path, capsys):
    """Two Ray Train workers pre-train on a small repetitive corpus through the job script."""
    import importlib.util

    from bge_ray.models import FlagModel

    sentences = ["the cat sat on the mat and looked at the garden", "rivers carry water from the hills to the sea",
                 "the bank gave the farmer a loan to buy a tractor", "music and song filled the old church at night"]
    corpus = tmp_path / "pretrain.jsonl"
    corpus.write_text("".join(json.dumps({"text": s}) + "\n" for s in sentences * 8))
    spec = importlib.util.spec_from_file_location("pretrain_retromae",
                                                  Path(__file__).resolve().parents[1] / "jobs" / "pretrain_retromae.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    out = tmp_path / "retromae"
    rc = job.main(["--model_name_or_path", str(tiny_bert), "--train_data", str(corpus), "--output_dir", str(out),
                   "--max_seq_length", "32", "--per_device_train_batch_size", "4", "--max_steps", "24",
                   "--learning_rate", "2e-2", "--save_steps", "1000", "--num_workers", "2", "--cpus_per_worker", "0.5"])
    assert rc == 0
    print(capsys.readouterr().out.strip().splitlines()[-1])
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["optimizer_steps"] == 24 and summary["num_workers"] == 2 and summary["global_batch_size"] == 8
    history = [h["loss"] for h in summary["log_history"]]
    assert len(history) == 24
    print("losses", [round(x, 2) for x in history])
    assert np.mean(history[-4:]) < 0.6 * np.mean(history[:4])
    # The exported encoder is a BERT checkpoint FlagModel loads, with cls pooling, and it is the trained one.
    assert (out / "retromae_decoder" / "c_head.safetensors").is_file()
    flag = FlagModel(str(out), devices="cpu", use_fp16=False)
    texts = ["the cat sat on the mat", "a loan from the bank"]
    task = _task(tiny_bert, max_seq_length=32)
    model, tok = task.build()
    task.load(model, str(out))
    model.eval()
    with torch.no_grad():
        cls = model.lm.bert(**tok(texts, padding=True, return_tensors="pt")).last_hidden_state[:, 0]
    np.testing.assert_allclose(flag.encode(texts), torch.nn.functional.normalize(cls, dim=-1).numpy(), atol=1e-5)
    init = FlagModel(str(tiny_bert), devices="cpu", use_fp16=False, pooling_method="cls").encode(texts)
    assert np.abs(flag.encode(texts) - init).max() > 1e-3  # training moved the encoder
