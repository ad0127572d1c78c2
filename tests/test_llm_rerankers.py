"""Decoder-only rerankers: FlagLLMReranker against FlagEmbedding 1.4.2; the layerwise (MiniCPM) and
lightweight (Gemma2) rerankers against a plain-torch computation of their definition, since
FlagEmbedding's own model code for them does not run on transformers 5."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests import tiny_llm_models as tlm

PAIRS = [
    ("what is a panda?", "The giant panda is a bear species endemic to China."),
    ("hi", "Hello there, general greeting used in many contexts."),
    (
        "how many people live in the capital city of the country",
        "The population of the city grew quickly after the railway arrived in the late nineteenth "
        "century, and the metropolitan area now holds several million residents.",
    ),
    ("what is a panda?", "hi"),
    ("weather", "It rains a lot in the autumn months; bring an umbrella."),
]


# -- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llm_root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny_llm_rerankers")


@pytest.fixture(scope="module")
def bos_tokenizer(llm_root, unigram_tokenizer):
    # Gemma's tokenizer pads on the left; the scores must not depend on it.
    return tlm.build_llm_tokenizer(unigram_tokenizer, llm_root / "tok-bos", padding_side="left")


@pytest.fixture(scope="module")
def nobos_tokenizer(llm_root, unigram_tokenizer):
    return tlm.build_llm_tokenizer(unigram_tokenizer, llm_root / "tok-nobos", bos=False)


@pytest.fixture(scope="module")
def gemma_reranker(llm_root, bos_tokenizer):
    return tlm.build_gemma_reranker(llm_root / "bge-reranker-v2-gemma-tiny", bos_tokenizer)


@pytest.fixture(scope="module")
def qwen_reranker(llm_root, nobos_tokenizer):
    return tlm.build_qwen2_reranker(llm_root / "qwen2-llm-reranker-tiny", nobos_tokenizer)


def _oracle_llm(path, **kwargs):
    from FlagEmbedding import FlagLLMReranker as Oracle

    return Oracle(str(path), use_fp16=False, devices="cpu", **kwargs)


def _ours_llm(path, **kwargs):
    from bge_ray.models.llm_reranker import FlagLLMReranker

    return FlagLLMReranker(str(path), use_fp16=False, devices="cpu", **kwargs)


# -- FlagLLMReranker ----------------------------------------------------------------------------
def test_yes_token_and_prompt_layout(gemma_reranker):
    from bge_ray.models.llm_reranker import DEFAULT_PROMPT, build_prompt_inputs

    ours = _ours_llm(gemma_reranker)
    tok = ours.tokenizer
    assert tok.convert_ids_to_tokens([ours.yes_loc]) == ["Yes"]
    feats = build_prompt_inputs(tok, [("A: q", "B: p")], 100, 100, with_segments=True)
    ids, seg = feats.columns["input_ids"][0], feats.columns["segment_ids"][0]
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    sep = enc("\n")
    expected = [tok.bos_token_id] + enc("A: q") + sep + enc("B: p") + sep + enc(DEFAULT_PROMPT)
    assert ids == expected
    n_query, n_prompt = 1 + len(enc("A: q")) + len(sep), len(sep) + len(enc(DEFAULT_PROMPT))
    assert seg == [1] * n_query + [2] * (len(ids) - n_query - n_prompt) + [3] * n_prompt


@pytest.mark.parametrize("normalize", [False, True])
def test_llm_reranker_matches_flagembedding(gemma_reranker, normalize):
    # Small max_length: passages are trimmed to the shared budget and queries to 3/4 of it.
    kwargs = dict(batch_size=2, max_length=24, normalize=normalize)
    expected = _oracle_llm(gemma_reranker, **kwargs).compute_score(PAIRS)
    got = _ours_llm(gemma_reranker, **kwargs).compute_score(PAIRS)
    assert isinstance(got, list) and len(got) == len(PAIRS)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    assert np.std(got) > 1e-3  # the tiny model must tell the pairs apart for this to mean anything


def test_llm_reranker_call_options_match_flagembedding(qwen_reranker):
    # No bos token (Qwen-style), custom prompt and instructions, per-call lengths and normalize.
    init = dict(
        prompt="Does B answer A? Say 'Yes' or 'No'.",
        query_instruction_for_rerank="Query: ",
        passage_instruction_for_rerank="Doc: ",
        passage_instruction_format="{}\\n{}",
    )
    call = dict(max_length=20, query_max_length=6, normalize=True, batch_size=3)
    oracle, ours = _oracle_llm(qwen_reranker, **init), _ours_llm(qwen_reranker, **init)
    np.testing.assert_allclose(ours.compute_score(PAIRS, **call), oracle.compute_score(PAIRS, **call), atol=1e-4)
    # A short prompt and a long query budget: the passage side is trimmed to fit, or, where even
    # the whole passage would not do, the pair is left untrimmed.
    pairs = PAIRS + [(" ".join(["long query words"] * 12), "short passage")]
    other = dict(prompt="Relevant?", max_length=12, query_max_length=40)
    np.testing.assert_allclose(
        ours.compute_score(pairs, **other), oracle.compute_score(pairs, **other), atol=1e-4
    )


def test_prompt_truncation_budget(gemma_reranker):
    from bge_ray.models.llm_reranker import build_prompt_inputs

    tok = _ours_llm(gemma_reranker).tokenizer
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    sep, bos = enc("\n"), [tok.bos_token_id]
    query, passage = " ".join(["query words"] * 10), " ".join(["passage text"] * 10)
    q, p = enc(query), enc(passage)
    assert len(q) > 12 and len(p) > 12
    trimmed = []
    for max_length, query_max_length in [(12, 12), (12, 40), (20, 12)]:
        ids = build_prompt_inputs(tok, [(query, passage)], query_max_length, max_length, prompt="")
        first, second = bos + q[:query_max_length], sep + p[:max_length]
        excess = len(first) + len(second) - (max_length + len(sep))
        trimmed.append(0 < excess < len(second))
        if trimmed[-1]:
            second = second[:-excess]
        assert ids.columns["input_ids"][0] == first + second + sep
    assert trimmed == [False, False, True]


def test_llm_reranker_single_pair_and_errors(gemma_reranker):
    ours = _ours_llm(gemma_reranker)
    one = ours.compute_score(PAIRS[0])
    assert one == pytest.approx(_oracle_llm(gemma_reranker).compute_score(PAIRS[0]), abs=1e-4)
    assert isinstance(one, list) and len(one) == 1  # FlagEmbedding 1.4 keeps a list for one pair
    assert ours.compute_score([]) == []
    with pytest.raises(TypeError, match=r"sentence_pairs\[1\]"):
        ours.compute_score([PAIRS[0], ("only one",)])
    with pytest.raises(TypeError, match=r"sentence_pairs\[0\]"):
        ours.compute_score([(None, "passage")])


def test_llm_reranker_batching_does_not_change_scores(gemma_reranker):
    ours = _ours_llm(gemma_reranker)
    together = ours.compute_score(PAIRS, batch_size=8)
    alone = [ours.compute_score([p])[0] for p in PAIRS]
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_llm_reranker_peft_adapter_matches_flagembedding(gemma_reranker, llm_root):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapter = llm_root / "gemma-lora"
    if not adapter.exists():
        torch.manual_seed(5)
        base = AutoModelForCausalLM.from_pretrained(gemma_reranker)
        # init_lora_weights=False: random B matrices, so the adapter changes the scores.
        lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        get_peft_model(base, lora).save_pretrained(adapter)
    expected = _oracle_llm(gemma_reranker, peft_path=str(adapter)).compute_score(PAIRS)
    got = _ours_llm(gemma_reranker, peft_path=str(adapter)).compute_score(PAIRS)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert not np.allclose(got, _ours_llm(gemma_reranker).compute_score(PAIRS), atol=1e-3)
