"""BGEM3FlagModel against FlagEmbedding's own BGEM3FlagModel on the same tiny bge-m3 checkpoint."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from bge_ray.models.m3 import BGEM3FlagModel

TOL = 1e-4


def _lines(path, n):
    with open(path, encoding="utf-8") as f:
        return [json.loads(next(f))["text"] for _ in range(n)]


@pytest.fixture(scope="module")
def texts(shared_data):
    english = _lines(shared_data / "beir" / "msmarco-subset" / "corpus.jsonl", 3)
    queries = _lines(shared_data / "beir" / "msmarco-subset" / "queries.jsonl", 2)
    arabic = _lines(shared_data / "beir" / "arcd-subset" / "corpus.jsonl", 2)
    long_text = " ".join(english * 30)  # far past the 512-token limit: exercises truncation
    return {"queries": queries + arabic[:1], "passages": english + arabic + [long_text], "long": long_text}


@pytest.fixture(scope="module")
def ours(tiny_m3):
    return BGEM3FlagModel(str(tiny_m3), use_fp16=False, devices="cpu", batch_size=4)


@pytest.fixture(scope="module")
def oracle(tiny_m3):
    from FlagEmbedding import BGEM3FlagModel as FlagBGEM3

    return FlagBGEM3(str(tiny_m3), use_fp16=False, devices="cpu", batch_size=4)


ALL = dict(return_dense=True, return_sparse=True, return_colbert_vecs=True)


def assert_lexical_equal(a: dict, b: dict):
    assert set(a) == set(b)
    for k in a:
        assert abs(a[k] - float(b[k])) < TOL, k


def assert_outputs_equal(got: dict, want: dict):
    np.testing.assert_allclose(got["dense_vecs"], want["dense_vecs"], atol=TOL)
    for a, b in zip(got["lexical_weights"], want["lexical_weights"], strict=True):
        assert_lexical_equal(a, b)
    for a, b in zip(got["colbert_vecs"], want["colbert_vecs"], strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, atol=TOL)


def test_encode_matches_oracle(ours, oracle, texts):
    sentences = texts["passages"] + texts["queries"]
    got = ours.encode(sentences, **ALL)
    want = oracle.encode(sentences, **ALL)
    assert_outputs_equal(got, want)
    # The long text was truncated to 512 tokens: 511 ColBERT vectors (cls left out).
    assert got["colbert_vecs"][len(texts["passages"]) - 1].shape == (511, ours.colbert_dim)
    assert got["dense_vecs"].shape == (len(sentences), ours.dim)
    assert all(isinstance(k, str) and k.isdigit() for lw in got["lexical_weights"] for k in lw)
    specials = {str(i) for i in ours.special_token_ids}
    assert not specials & {k for lw in got["lexical_weights"] for k in lw}


def test_queries_corpus_and_short_max_length(ours, oracle, texts):
    got = ours.encode_queries(texts["queries"], max_length=8, **ALL)
    want = oracle.encode_queries(texts["queries"], max_length=8, **ALL)
    assert_outputs_equal(got, want)
    got = ours.encode_corpus(texts["passages"], max_length=40, **ALL)
    want = oracle.encode_corpus(texts["passages"], max_length=40, **ALL)
    assert_outputs_equal(got, want)


def test_modes_and_single_string(ours, oracle, texts):
    default = ours.encode(texts["queries"])
    assert default["lexical_weights"] is None and default["colbert_vecs"] is None
    np.testing.assert_allclose(default["dense_vecs"], oracle.encode(texts["queries"])["dense_vecs"], atol=TOL)

    one = ours.encode(texts["queries"][0], **ALL)
    ref = oracle.encode(texts["queries"][0], **ALL)
    assert one["dense_vecs"].shape == (ours.dim,)
    np.testing.assert_allclose(one["dense_vecs"], ref["dense_vecs"], atol=TOL)
    assert_lexical_equal(one["lexical_weights"], ref["lexical_weights"])
    np.testing.assert_allclose(one["colbert_vecs"], ref["colbert_vecs"], atol=TOL)

    sparse_only = ours.encode(texts["queries"], return_dense=False, return_sparse=True)
    assert sparse_only["dense_vecs"] is None and len(sparse_only["lexical_weights"]) == len(texts["queries"])
    with pytest.raises(ValueError, match="at least one"):
        ours.encode(texts["queries"], return_dense=False)
    with pytest.raises(TypeError, match=r"sentences\[1\]"):
        ours.encode(["ok", None])


def test_query_instruction(tiny_m3, oracle, texts):
    from FlagEmbedding import BGEM3FlagModel as FlagBGEM3

    kw = dict(use_fp16=False, devices="cpu", query_instruction_for_retrieval="Find: ")
    got = BGEM3FlagModel(str(tiny_m3), **kw).encode_queries(texts["queries"], **ALL)
    want = FlagBGEM3(str(tiny_m3), **kw).encode_queries(texts["queries"], **ALL)
    assert_outputs_equal(got, want)


def test_scores_match_oracle(ours, oracle, texts):
    q = ours.encode(texts["queries"], **ALL)
    p = ours.encode(texts["passages"], **ALL)
    oq = oracle.encode(texts["queries"], **ALL)
    op = oracle.encode(texts["passages"], **ALL)

    got = ours.compute_lexical_matching_score(q["lexical_weights"], p["lexical_weights"])
    want = oracle.compute_lexical_matching_score(oq["lexical_weights"], op["lexical_weights"])
    assert got.shape == (len(texts["queries"]), len(texts["passages"]))
    np.testing.assert_allclose(got, want, atol=TOL)
    single = ours.compute_lexical_matching_score(q["lexical_weights"][0], p["lexical_weights"][1])
    assert abs(single - want[0, 1]) < TOL
    with pytest.raises(ValueError, match="two dicts"):
        ours.compute_lexical_matching_score(q["lexical_weights"][0], p["lexical_weights"])

    for i in range(len(texts["queries"])):
        for j in range(len(texts["passages"])):
            got = ours.colbert_score(q["colbert_vecs"][i], p["colbert_vecs"][j])
            want = oracle.colbert_score(oq["colbert_vecs"][i], op["colbert_vecs"][j])
            assert abs(float(got) - float(want)) < TOL


@pytest.mark.parametrize("weights", [None, [0.4, 0.2, 0.4], [1.0, 0.3, 2.0]])
def test_compute_score_matches_oracle(ours, oracle, texts, weights):
    pairs = [(qq, pp) for qq in texts["queries"] for pp in texts["passages"]]
    kw = dict(max_query_length=16, max_passage_length=128, weights_for_different_modes=weights)
    got = ours.compute_score(pairs, **kw)
    want = oracle.compute_score(pairs, **kw)
    assert set(got) == {"colbert", "sparse", "dense", "sparse+dense", "colbert+sparse+dense"}
    for key in got:
        assert len(got[key]) == len(pairs)
        np.testing.assert_allclose(got[key], want[key], atol=TOL, err_msg=key)

    one = ours.compute_score(pairs[1], **kw)
    ref = oracle.compute_score(pairs[1], **kw)
    for key in one:
        assert isinstance(one[key], float)
        assert abs(one[key] - ref[key]) < TOL, key


def test_compute_score_consistent_with_encode(ours, texts):
    """compute_score equals the scores rebuilt from encode's outputs (no truncate_dim involved)."""
    pairs = [(texts["queries"][0], p) for p in texts["passages"][:3]]
    s = ours.compute_score(pairs, max_query_length=512, max_passage_length=512)
    q = ours.encode(texts["queries"][0], **ALL)
    p = ours.encode(texts["passages"][:3], **ALL)
    np.testing.assert_allclose(s["dense"], p["dense_vecs"] @ q["dense_vecs"], atol=TOL)
    sparse = ours.compute_lexical_matching_score([q["lexical_weights"]], p["lexical_weights"])[0]
    np.testing.assert_allclose(s["sparse"], sparse, atol=TOL)
    colbert = [float(ours.colbert_score(q["colbert_vecs"], v)) for v in p["colbert_vecs"]]
    np.testing.assert_allclose(s["colbert"], colbert, atol=TOL)
    np.testing.assert_allclose(
        s["colbert+sparse+dense"], (np.array(colbert) + sparse + s["dense"]) / 3, atol=TOL
    )


def test_compute_score_input_errors(ours):
    with pytest.raises(ValueError, match="weights_for_different_modes"):
        ours.compute_score([("a", "b")], weights_for_different_modes=[1.0, 1.0])
    with pytest.raises(TypeError, match=r"sentence_pairs\[1\]\[1\]"):
        ours.compute_score([("a", "b"), ("c", 3)])
    with pytest.raises(ValueError, match=r"sentence_pairs\[0\]"):
        ours.compute_score([("a", "b", "c")])
    assert ours.compute_score([]) == {
        k: [] for k in ("colbert", "sparse", "dense", "sparse+dense", "colbert+sparse+dense")
    }


def test_convert_id_to_token(ours, oracle, texts):
    lw = ours.encode(texts["queries"], return_dense=False, return_sparse=True)["lexical_weights"]
    got = ours.convert_id_to_token(lw)
    want = oracle.convert_id_to_token(lw)
    assert got == want
    assert ours.convert_id_to_token(lw[0]) == oracle.convert_id_to_token(lw[0])
    # FlagEmbedding returns a bare dict for a one-element list; we keep the list.
    assert ours.convert_id_to_token(lw[:1]) == [want[0]]


def test_truncate_dim_and_sizes(tiny_m3, texts):
    m = BGEM3FlagModel(str(tiny_m3), use_fp16=False, devices="cpu", truncate_dim=8)
    out = m.encode(texts["queries"], **ALL)
    assert m.dim == 8 and m.colbert_dim == 8
    assert out["dense_vecs"].shape == (len(texts["queries"]), 8)
    assert all(v.shape[1] == 8 for v in out["colbert_vecs"])
    np.testing.assert_allclose(np.linalg.norm(out["dense_vecs"], axis=1), 1.0, atol=1e-5)
    assert m.vocab_size > max(int(k) for lw in out["lexical_weights"] for k in lw)


def test_compute_score_independent_of_batching(ours, texts):
    """Scores do not depend on batch size or on which pairs share a batch.

    FlagEmbedding scores a batch of pairs on padded tensors, where a padded passage position's
    zero ColBERT vector can win the max over a query token whose best real match is negative;
    we score each pair on its own tokens only.
    """
    pairs = [(qq, pp) for qq in texts["queries"] for pp in texts["passages"]]
    alone = ours.compute_score(pairs, batch_size=1, max_passage_length=64)
    together = ours.compute_score(pairs[::-1], batch_size=len(pairs), max_passage_length=64)
    for key in alone:
        np.testing.assert_allclose(alone[key], together[key][::-1], atol=1e-5, err_msg=key)


@pytest.mark.parametrize("head", ["colbert_linear.pt", "sparse_linear.pt"])
def test_missing_head_fails_loudly(tiny_m3, tmp_path, head):
    folder = tmp_path / "m3-no-head"
    shutil.copytree(tiny_m3, folder)
    (folder / head).unlink()
    with pytest.raises(FileNotFoundError) as err:
        BGEM3FlagModel(str(folder), use_fp16=False, devices="cpu")
    assert head in str(err.value) and str(folder) in str(err.value)


def test_colbert_dim_mismatch(tiny_m3):
    with pytest.raises(ValueError, match="colbert_linear.pt"):
        BGEM3FlagModel(str(tiny_m3), use_fp16=False, devices="cpu", colbert_dim=7)
