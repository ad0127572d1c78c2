"""FlagReranker (cross-encoder) against FlagEmbedding 1.4.2 on tiny XLM-R and BERT checkpoints."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from bge_ray.models.reranker import FlagReranker, Template, as_pairs, fit_pair
from tests import tiny_models

ATOL = 1e-4


def _read(path: Path, n: int) -> list[str]:
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if len(out) == n:
                break
            out.append(json.loads(line)["text"])
    return out


@pytest.fixture(scope="module")
def pairs(shared_data) -> list[tuple[str, str]]:
    """English and Arabic pairs; the business passages are long (cut at 512) and hold <unk> pieces."""
    beir = shared_data / "beir"
    out = []
    for name, n in (("msmarco-subset", 4), ("arcd-subset", 3), ("business-reports-subset", 2)):
        queries, passages = _read(beir / name / "queries.jsonl", n), _read(beir / name / "corpus.jsonl", n)
        out += list(zip(queries, passages, strict=True))
        out.append((queries[0], " ".join([passages[-1]] * 3)))  # beyond max_length=512
    out.append(("short", ""))  # an empty passage
    return out


def _oracle(path, **kwargs):
    from FlagEmbedding import FlagReranker as OracleReranker

    return OracleReranker(str(path), use_fp16=False, devices="cpu", **kwargs)


@pytest.fixture(scope="module")
def xlmr(tiny_xlmr_reranker):
    return FlagReranker(str(tiny_xlmr_reranker), use_fp16=False, devices="cpu"), _oracle(tiny_xlmr_reranker)


@pytest.fixture(scope="module")
def tiny_bert_reranker(tiny_root):
    """A BERT cross-encoder (token_type_ids matter) on the bundled BERT tokenizer."""
    from transformers import BertConfig, BertForSequenceClassification

    out = tiny_root / "bert-reranker-tiny"
    if not (out / "config.json").exists():
        torch.manual_seed(4)
        cfg = BertConfig(
            vocab_size=30522,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            type_vocab_size=2,
            num_labels=1,
            initializer_range=tiny_models.INIT_RANGE,
        )
        BertForSequenceClassification(cfg).save_pretrained(out)
        tiny_models._copy_tokenizer(Path(tiny_models.bundled_model_path()), out)
    return out


def _close(ours, theirs):
    assert isinstance(ours, list) and all(isinstance(s, float) for s in ours)
    np.testing.assert_allclose(ours, theirs, atol=ATOL, rtol=0)


# -- scores against the oracle ---------------------------------------------------------------------
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("max_length", [512, 40])
def test_scores_match_flagembedding(xlmr, pairs, normalize, max_length):
    ours, oracle = xlmr
    kw = dict(normalize=normalize, max_length=max_length)
    expected = oracle.compute_score(pairs, **kw)
    scores = ours.compute_score(pairs, **kw)
    _close(scores, expected)
    assert ours.last_token_counts.max() == max_length  # long passages were cut
    assert len(set(np.round(scores, 3))) > len(pairs) // 2  # the fixture tells pairs apart
    if normalize:
        assert all(0 < s < 1 for s in scores)


def test_batch_size_and_query_max_length(xlmr, pairs):
    ours, oracle = xlmr
    kw = dict(batch_size=3, query_max_length=6, max_length=64)
    _close(ours.compute_score(pairs, **kw), oracle.compute_score(pairs, **kw))


def test_constructor_settings(tiny_xlmr_reranker, pairs):
    kw = dict(
        query_instruction_for_rerank="Query:",
        query_instruction_format="{}\\n{}",
        passage_instruction_for_rerank="Passage: ",
        normalize=True,
        max_length=96,
        batch_size=4,
    )
    ours = FlagReranker(str(tiny_xlmr_reranker), use_fp16=False, devices="cpu", **kw)
    oracle = _oracle(tiny_xlmr_reranker, **kw)
    _close(ours.compute_score(pairs), oracle.compute_score(pairs))
    plain = FlagReranker(str(tiny_xlmr_reranker), use_fp16=False, devices="cpu")
    assert not np.allclose(
        ours.compute_score(pairs[:3], normalize=False), plain.compute_score(pairs[:3]), atol=1e-3
    )


def test_single_pair_returns_a_list(xlmr, pairs):
    """FlagEmbedding answers one pair (tuple or list) with a list of one score."""
    ours, oracle = xlmr
    q, p = pairs[4]
    for single in ((q, p), [q, p]):
        scores = ours.compute_score(single)
        assert len(scores) == 1
        _close(scores, oracle.compute_score(single))
    assert ours.compute_score([(q, p)]) == pytest.approx(scores, abs=1e-6)


def test_bert_cross_encoder_matches_flagembedding(tiny_bert_reranker, pairs):
    ours = FlagReranker(str(tiny_bert_reranker), use_fp16=False, devices="cpu")
    oracle = _oracle(tiny_bert_reranker)
    assert "token_type_ids" in ours.pair_features(pairs[:1], 10, 32).columns
    for kw in (dict(), dict(max_length=32, normalize=True, batch_size=5)):
        _close(ours.compute_score(pairs, **kw), oracle.compute_score(pairs, **kw))
    # Segment ids reach the model: swapping query and passage changes the score.
    q, p = pairs[0]
    assert abs(ours.compute_score((q, p))[0] - ours.compute_score((p, q))[0]) > 1e-3


def test_pad_to_multiple_of(xlmr, pairs):
    ours, oracle = xlmr
    _close(ours.compute_score(pairs, pad_to_multiple_of=8), oracle.compute_score(pairs, pad_to_multiple_of=8))


# -- token ids ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("max_length,query_max_length", [(512, 384), (24, 18)])
def test_pair_ids_match_flagembedding(xlmr, shared_data, max_length, query_max_length):
    """Same ids as FlagEmbedding's own pair builder, including where its decode / re-tokenise round
    trip changes them (pieces after <unk>, a query cut before a lone '▁')."""
    from FlagEmbedding.utils.tokenizer_compat import prepare_for_model_compat

    ours, _ = xlmr
    tok = ours.tokenizer
    beir = shared_data / "beir"
    pairs = []
    for name in ("msmarco-subset", "arcd-subset", "business-reports-subset"):
        queries, passages = _read(beir / name / "queries.jsonl", 10), _read(beir / name / "corpus.jsonl", 40)
        pairs += [(queries[i % len(queries)], p) for i, p in enumerate(passages)]
    features = ours.pair_features(pairs, query_max_length, max_length)
    q_ids = tok([q for q, _ in pairs], add_special_tokens=False, truncation=True, max_length=query_max_length)
    p_ids = tok([p for _, p in pairs], add_special_tokens=False, truncation=True, max_length=max_length)
    for i, (q, p) in enumerate(zip(q_ids["input_ids"], p_ids["input_ids"], strict=True)):
        expected = prepare_for_model_compat(tok, q, p, truncation="only_second", max_length=max_length)
        assert features.columns["input_ids"][i] == expected["input_ids"], pairs[i]
    assert features.lengths.max() == max_length


def test_query_longer_than_max_length(xlmr, pairs, caplog):
    """FlagEmbedding raises a truncation error; we cut the query and keep one passage token."""
    ours, oracle = xlmr
    long_query = [(pairs[6][1], pairs[0][1])]
    with pytest.raises(Exception, match="[Tt]runcation"):
        oracle.compute_score(long_query, query_max_length=64, max_length=32)
    features = ours.pair_features(long_query, 64, 32)
    ids = features.columns["input_ids"][0]
    # <s> query </s></s> one-passage-token </s>
    assert len(ids) == 32 and ids[-4:-2] == [2, 2] and ids[-2] != 2 and ids[-1] == 2
    scores = ours.compute_score(long_query + pairs[:2], query_max_length=64, max_length=32)
    assert all(math.isfinite(s) for s in scores)
    assert "query was cut" in caplog.text
    with pytest.raises(ValueError, match="max_length=5"):
        ours.compute_score(pairs[:1], max_length=5)


# -- pair building pieces ----------------------------------------------------------------------------
def test_fit_pair():
    q, p = [1, 2, 3], [4, 5, 6, 7]
    assert fit_pair(q, p, 10) == (q, p, False)
    assert fit_pair(q, p, 5) == ([1, 2, 3], [4, 5], False)
    assert fit_pair(q, p, 5, left=True) == ([1, 2, 3], [6, 7], False)
    assert fit_pair(q, p, 3) == ([1, 2], [4], True)
    assert fit_pair(q, p, 3, left=True) == ([2, 3], [7], True)
    assert fit_pair(q, [], 2) == ([1, 2], [], True)


def test_template_of_python_tokenizer():
    """Tokenizers that still build pairs from ids (Python backends) give their template directly."""

    class IdsTokenizer:
        def prepare_for_model(self, *args, **kwargs):
            raise AssertionError("not called")

        def build_inputs_with_special_tokens(self, a, b=None):
            return [7] + a + [8] + (b + [8] if b is not None else [])

        def create_token_type_ids_from_sequences(self, a, b=None):
            return [0] * (len(a) + 2) + ([1] * (len(b) + 1) if b is not None else [])

    template = Template.of(IdsTokenizer())
    assert template.num_special == 3
    assert template.build([1, 2], [3]) == ([7, 1, 2, 8, 3, 8], [0, 0, 0, 0, 1, 1])
    single = Template.of(IdsTokenizer(), pair=False)
    assert single.build([1, 2]) == ([7, 1, 2, 8], [0, 0, 0, 0])


def test_template_of_xlmr(xlmr):
    ours, _ = xlmr
    tok = ours.tokenizer
    template = ours.pair_template
    assert template.num_special == tok.num_special_tokens_to_add(pair=True) == 4
    q, p = tok(["who are you", "the river bank"], add_special_tokens=False)["input_ids"]
    assert template.build(q, p)[0] == tok("who are you", "the river bank")["input_ids"]


# -- bad input ---------------------------------------------------------------------------------------
def test_empty_input_gives_empty_list(xlmr):
    ours, _ = xlmr
    assert ours.compute_score([]) == []


@pytest.mark.parametrize(
    "bad,match",
    [
        (None, "sentence_pairs is None"),
        ("query passage", "sentence_pairs is a str"),
        (("query", None), r"sentence_pairs\[1\] is NoneType"),
        (["a", "b", "c"], "holds 3 strings"),
        ([("q", "p"), ("q", None)], r"sentence_pairs\[1\]\[1\] is NoneType"),
        ([("q", "p"), ("q", "p"), "qp"], r"sentence_pairs\[2\] is str"),
        ([("q", "p"), ("q", "p", "x")], r"sentence_pairs\[1\] is tuple"),
        ([("q", "p"), 3], r"sentence_pairs\[1\] is int"),
        (5, "sentence_pairs is int"),
    ],
)
def test_bad_input_names_the_element(xlmr, bad, match):
    ours, _ = xlmr
    with pytest.raises(TypeError, match=match):
        ours.compute_score(bad)


def test_as_pairs_accepts_arrays_and_iterables():
    arr = np.array([["q1", "p1"], ["q2", "p2"]])
    assert as_pairs(arr) == ([("q1", "p1"), ("q2", "p2")], False)
    assert as_pairs(iter([("q", "p")])) == ([("q", "p")], False)
