"""Dense embedders (FlagModel, FlagLLMModel, FlagICLModel), the Auto classes and the registry.

FlagEmbedding 1.4.2 is the oracle: both sides load the same tiny checkpoint folder.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bge_ray import models
from bge_ray.models import registry
from tests.oracle import require

oracle = require("FlagEmbedding")

TOL = 1e-4
CPU = dict(devices="cpu", use_fp16=False)
QUERY_INSTRUCTION = "Represent this sentence for searching relevant passages: "
EXAMPLES = [
    {"instruct": "Find the definition.", "query": "what is an axon", "response": "An axon is a nerve fibre."},
    {"query": "boiling point of water", "response": "Water boils at 100 degrees Celsius at sea level."},
]


@pytest.fixture(scope="module")
def texts(shared_data):
    """Short, empty-ish, long and non-Latin texts: a spread of lengths so batches need padding."""
    with open(shared_data / "beir" / "msmarco-subset" / "corpus.jsonl", encoding="utf-8") as f:
        passages = [json.loads(next(f))["text"] for _ in range(3)]
    return ["cats", "how do vaccines work?", *passages, "السلام عليكم ورحمة الله", "a " * 300]


def assert_close(ours, theirs, tol=TOL):
    ours = ours.numpy() if isinstance(ours, torch.Tensor) else ours
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, atol=tol, rtol=0)


def assert_spread(emb: np.ndarray):
    """Guard against a degenerate fixture where every text embeds alike (the comparison proves little)."""
    sims = emb @ emb.T
    assert sims[~np.eye(len(emb), dtype=bool)].min() < 0.99


# -- FlagModel ---------------------------------------------------------------------------------


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_flag_model_matches_oracle(tiny_bert, texts, pooling):
    kw = dict(pooling_method=pooling, query_instruction_for_retrieval=QUERY_INSTRUCTION, **CPU)
    ours = models.FlagModel(str(tiny_bert), **kw)
    theirs = oracle.FlagModel(str(tiny_bert), **kw)

    ref = theirs.encode(texts, batch_size=3)
    assert_spread(ref)
    assert_close(ours.encode(texts, batch_size=3), ref)
    assert_close(ours.encode_queries(texts, batch_size=3), theirs.encode_queries(texts, batch_size=3))
    assert_close(ours.encode_corpus(texts, batch_size=4), theirs.encode_corpus(texts, batch_size=4))
    # The instruction changes query vectors; corpus vectors stay plain.
    assert not np.allclose(ours.encode_queries(texts[:2]), ours.encode_corpus(texts[:2]))

    as_tensor = ours.encode(texts, batch_size=3, convert_to_numpy=False)
    assert isinstance(as_tensor, torch.Tensor)
    assert_close(as_tensor, ref)


def test_flag_model_max_length_matches_oracle(tiny_bert, texts):
    ours = models.FlagModel(str(tiny_bert), **CPU)
    theirs = oracle.FlagModel(str(tiny_bert), **CPU)
    assert_close(ours.encode(texts, max_length=16), theirs.encode(texts, max_length=16))


# -- FlagLLMModel ------------------------------------------------------------------------------


def test_flag_llm_model_matches_oracle(tiny_qwen2, texts):
    kw = dict(
        query_instruction_for_retrieval="Given a web search query, retrieve relevant passages",
        query_instruction_format="Instruct: {}\\nQuery: {}",  # escaped newline, as read from a CLI
        **CPU,
    )
    ours = models.FlagLLMModel(str(tiny_qwen2), **kw)
    theirs = oracle.FlagLLMModel(str(tiny_qwen2), **kw)

    ref = theirs.encode_queries(texts, batch_size=3)
    assert_spread(ref)
    assert_close(ours.encode_queries(texts, batch_size=3), ref)
    assert_close(ours.encode_corpus(texts, batch_size=3), theirs.encode_corpus(texts, batch_size=3))
    assert_close(ours.encode(texts, max_length=12), theirs.encode(texts, max_length=12))


# -- FlagICLModel ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def icl_pair(tiny_qwen2):
    kw = dict(query_instruction_for_retrieval="Given a question, retrieve passages", examples_for_task=EXAMPLES, **CPU)
    return models.FlagICLModel(str(tiny_qwen2), **kw), oracle.FlagICLModel(str(tiny_qwen2), **kw)


def test_icl_prefix_matches_oracle(icl_pair):
    ours, theirs = icl_pair
    assert ours.prefix == theirs.prefix
    # The second example has no 'instruct': it takes the query instruction.
    assert "<instruct>Given a question, retrieve passages\n<query>boiling point" in ours.prefix
    assert ours.suffix == theirs.suffix == "\n<response>"


@pytest.mark.parametrize("max_length", [512, 96])
def test_icl_queries_match_oracle(icl_pair, texts, max_length):
    ours, theirs = icl_pair
    ref = theirs.encode_queries(texts, batch_size=3, max_length=max_length)
    assert_spread(ref)
    assert_close(ours.encode_queries(texts, batch_size=3, max_length=max_length), ref)


def test_icl_corpus_and_single_query_match_oracle(icl_pair, texts):
    ours, theirs = icl_pair
    assert_close(ours.encode_corpus(texts, batch_size=4), theirs.encode_corpus(texts, batch_size=4))
    one = ours.encode_queries(texts[1])
    assert one.shape == (ours.dim,)
    assert_close(one, theirs.encode_queries(texts[1]))


def test_icl_set_examples_matches_oracle(tiny_qwen2, texts):
    kw = dict(query_instruction_for_retrieval="Given a question, retrieve passages", **CPU)
    ours = models.FlagICLModel(str(tiny_qwen2), **kw)
    theirs = oracle.FlagICLModel(str(tiny_qwen2), **kw)
    assert ours.prefix == theirs.prefix == ""
    assert_close(ours.encode_queries(texts), theirs.encode_queries(texts))
    without = ours.encode_queries(texts)
    ours.set_examples(EXAMPLES[:1])
    theirs.set_examples(EXAMPLES[:1])
    assert ours.prefix == theirs.prefix
    with_examples = ours.encode_queries(texts)
    assert_close(with_examples, theirs.encode_queries(texts))
    assert not np.allclose(with_examples, without)
    ours.set_examples()  # back to the constructor's (none)
    assert ours.prefix == ""


def test_icl_rejects_bad_examples_before_loading():
    with pytest.raises(TypeError, match=r"examples_for_task\[1\]"):
        models.FlagICLModel("/nonexistent/model", examples_for_task=[{"query": "q"}, "not a dict"])
    with pytest.raises(TypeError, match=r"examples_for_task\[0\]\['response'\]"):
        models.FlagICLModel("/nonexistent/model", examples_for_task=[{"query": "q", "response": 3}])


def test_icl_max_length_too_small(icl_pair):
    ours, _ = icl_pair
    with pytest.raises(ValueError, match="max_length=2"):
        ours.encode_queries(["q"], max_length=2)


def test_icl_empty_queries(icl_pair):
    ours, _ = icl_pair
    assert ours.encode_queries([]).shape == (0, ours.dim)


# -- FlagAutoModel / FlagAutoReranker ----------------------------------------------------------


@pytest.mark.parametrize(
    "fixture, model_class, extra",
    [
        ("tiny_bert", "encoder-only-base", {}),
        ("tiny_bert", "encoder-only-base", {"pooling_method": "mean"}),
        ("tiny_qwen2", "decoder-only-base", {}),
        ("tiny_qwen2", "decoder-only-icl", {"examples_for_task": EXAMPLES}),
    ],
)
def test_auto_model_class_matches_oracle(request, texts, fixture, model_class, extra):
    path = str(request.getfixturevalue(fixture))
    kw = dict(model_class=model_class, query_instruction_for_retrieval="Find: ", **extra, **CPU)
    ours = models.FlagAutoModel.from_finetuned(path, **kw)
    theirs = oracle.FlagAutoModel.from_finetuned(path, **kw)
    assert type(theirs) is getattr(oracle, type(ours).__name__)  # FlagEmbedding's classes are aliases
    assert (ours.pooling_method, ours.query_instruction_format) == (theirs.pooling_method,
                                                                    theirs.query_instruction_format)
    assert_close(ours.encode_queries(texts, batch_size=4), theirs.encode_queries(texts, batch_size=4))
    assert_close(ours.encode_corpus(texts, batch_size=4), theirs.encode_corpus(texts, batch_size=4))


def test_auto_model_m3_matches_oracle(tiny_m3, texts, tmp_path):
    """'encoder-only-m3' and a folder named bge-m3 both give BGEM3FlagModel (dense output compared)."""
    ours = models.FlagAutoModel.from_finetuned(str(tiny_m3), model_class="encoder-only-m3", **CPU)
    theirs = oracle.FlagAutoModel.from_finetuned(str(tiny_m3), model_class="encoder-only-m3", **CPU)
    assert isinstance(ours, models.BGEM3FlagModel)
    assert_close(ours.encode(texts, batch_size=4)["dense_vecs"], theirs.encode(texts, batch_size=4)["dense_vecs"])
    folder = tmp_path / "bge-m3"
    folder.symlink_to(tiny_m3, target_is_directory=True)
    assert isinstance(models.FlagAutoModel.from_finetuned(str(folder), **CPU), models.BGEM3FlagModel)


@pytest.mark.parametrize("name, pooling", [("bge-small-en-v1.5", "cls"), ("e5-base-v2", "mean")])
def test_auto_model_by_folder_name_matches_oracle(tiny_bert, tmp_path, texts, name, pooling):
    folder = tmp_path / name
    folder.symlink_to(tiny_bert, target_is_directory=True)
    ours = models.FlagAutoModel.from_finetuned(str(folder), **CPU)
    theirs = oracle.FlagAutoModel.from_finetuned(str(folder), **CPU)
    assert isinstance(ours, models.FlagModel)
    assert ours.pooling_method == pooling
    assert_close(ours.encode(texts), theirs.encode(texts))


def test_auto_model_name_lookup_ignores_case_and_checkpoint_folders(tiny_bert, tmp_path, texts):
    folder = tmp_path / "E5-Base-V2" / "checkpoint-100"
    folder.parent.mkdir()
    folder.symlink_to(tiny_bert, target_is_directory=True)
    ours = models.FlagAutoModel.from_finetuned(str(folder) + "/", **CPU)
    assert ours.pooling_method == "mean"
    direct = models.FlagModel(str(tiny_bert), pooling_method="mean", **CPU)
    assert_close(ours.encode(texts), direct.encode(texts))


def test_auto_model_unknown_name_says_what_to_do(tiny_bert):
    with pytest.raises(ValueError) as err:
        models.FlagAutoModel.from_finetuned("/somewhere/bge-smal-en-v1.5")
    msg = str(err.value)
    assert "bge-smal-en-v1.5" in msg and "model_class" in msg and "encoder-only-base" in msg
    assert "bge-small-en-v1.5" in msg  # the close known name
    with pytest.raises(ValueError, match="model_class"):
        models.FlagAutoReranker.from_finetuned(str(tiny_bert))


def test_auto_bad_model_class(tiny_bert):
    with pytest.raises(ValueError, match="encoder-only-m3"):
        models.FlagAutoModel.from_finetuned(str(tiny_bert), model_class="encoder-only-bert")
    with pytest.raises(ValueError, match="decoder-only-layerwise"):
        models.FlagAutoReranker.from_finetuned(str(tiny_bert), model_class="encoder-only-m3")


def test_auto_known_bare_name_offline_points_to_hub_org(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(models.ModelNotFoundError, match="BAAI/bge-base-en-v1.5"):
        models.FlagAutoModel.from_finetuned("bge-base-en-v1.5", **CPU)


def test_auto_classes_are_not_instantiated():
    with pytest.raises(TypeError, match="from_finetuned"):
        models.FlagAutoModel()
    with pytest.raises(TypeError, match="from_finetuned"):
        models.FlagAutoReranker()


def test_auto_reranker_model_class(tiny_xlmr_reranker):
    pairs = [("what is a cat", "a cat is a small animal"), ("sun", "the moon orbits the earth")]
    auto = models.FlagAutoReranker.from_finetuned(str(tiny_xlmr_reranker), model_class="encoder-only-base",
                                                  devices="cpu")
    assert isinstance(auto, models.FlagReranker)
    direct = models.FlagReranker(str(tiny_xlmr_reranker), devices="cpu")
    np.testing.assert_allclose(auto.compute_score(pairs), direct.compute_score(pairs), atol=1e-6)


# -- registry ----------------------------------------------------------------------------------


def public_name(oracle_class: type) -> str:
    """The name FlagEmbedding exports a class under (its classes are aliases, e.g. FlagModel = BaseEmbedder)."""
    names = ["FlagModel", "BGEM3FlagModel", "FlagLLMModel", "FlagICLModel", "FlagReranker", "FlagLLMReranker",
             "LayerWiseFlagLLMReranker", "LightWeightFlagLLMReranker"]
    return next(name for name in names if getattr(oracle, name) is oracle_class)


def test_registry_agrees_with_flagembedding():
    """Every name FlagEmbedding maps resolves here to the same class, pooling, format and remote-code flag."""
    from FlagEmbedding.inference.embedder.model_mapping import AUTO_EMBEDDER_MAPPING
    from FlagEmbedding.inference.reranker.model_mapping import AUTO_RERANKER_MAPPING

    for name, cfg in AUTO_EMBEDDER_MAPPING.items():
        spec = registry.lookup(name)
        assert spec is not None, name
        assert spec.name == name
        theirs = (public_name(cfg.model_class), cfg.pooling_method.value, cfg.query_instruction_format,
                  cfg.trust_remote_code)
        assert (spec.class_name, spec.pooling_method, spec.query_instruction_format, spec.trust_remote_code) == theirs
    # The model cards of these two load them with trust_remote_code=True; FlagEmbedding's table says False.
    remote_code = {"jina-reranker-v2-base-multilingual", "gte-multilingual-reranker-base"}
    for name, cfg in AUTO_RERANKER_MAPPING.items():
        spec = registry.lookup(name, registry.RERANKER)
        assert spec is not None, name
        assert spec.class_name == public_name(cfg.model_class)
        assert spec.trust_remote_code == (cfg.trust_remote_code or name in remote_code)


@pytest.mark.parametrize(
    "name, class_name, pooling, hub_id",
    [
        ("BAAI/bge-m3", "BGEM3FlagModel", "cls", "BAAI/bge-m3"),
        ("bge-base-zh-v1.5", "FlagModel", "cls", "BAAI/bge-base-zh-v1.5"),
        ("bge-large-en", "FlagModel", "cls", "BAAI/bge-large-en"),
        ("BAAI/bge-en-icl", "FlagICLModel", "last_token", "BAAI/bge-en-icl"),
        ("/models/bge-multilingual-gemma2", "FlagLLMModel", "last_token", "BAAI/bge-multilingual-gemma2"),
        ("intfloat/multilingual-e5-small", "FlagModel", "mean", "intfloat/multilingual-e5-small"),
        ("e5-mistral-7b-instruct", "FlagLLMModel", "last_token", "intfloat/e5-mistral-7b-instruct"),
        ("gte-small", "FlagModel", "mean", "thenlper/gte-small"),
        ("gte-qwen2-1.5b-instruct", "FlagLLMModel", "last_token", "Alibaba-NLP/gte-Qwen2-1.5B-instruct"),
        ("qwen3-embedding-0.6b", "FlagLLMModel", "last_token", "Qwen/Qwen3-Embedding-0.6B"),
    ],
)
def test_registry_embedders(name, class_name, pooling, hub_id):
    spec = registry.lookup(name)
    assert (spec.class_name, spec.pooling_method, spec.hub_id) == (class_name, pooling, hub_id)


def test_registry_default_instructions():
    assert registry.lookup("bge-small-en-v1.5").query_instruction_for_retrieval == QUERY_INSTRUCTION
    assert registry.lookup("bge-small-zh-v1.5").query_instruction_for_retrieval.startswith("为这个句子")
    assert registry.lookup("bge-m3").query_instruction_for_retrieval is None
    e5 = registry.lookup("e5-base-v2")
    assert (e5.query_instruction_for_retrieval, e5.passage_instruction_for_retrieval) == ("query: ", "passage: ")
    qwen3 = registry.lookup("Qwen3-Embedding-8B")
    assert qwen3.query_instruction_format == "Instruct: {}\nQuery:{}"
    assert qwen3.query_instruction_for_retrieval.startswith("Given a web search query")
    assert registry.lookup("gte-Qwen2-7B-instruct").trust_remote_code is True


@pytest.mark.parametrize(
    "name, class_name",
    [
        ("BAAI/bge-reranker-base", "FlagReranker"),
        ("bge-reranker-large", "FlagReranker"),
        ("bge-reranker-v2-m3", "FlagReranker"),
        ("BAAI/bge-reranker-v2-gemma", "FlagLLMReranker"),
        ("bge-reranker-v2-minicpm-layerwise", "LayerWiseFlagLLMReranker"),
        ("BGE-Reranker-v2.5-Gemma2-Lightweight", "LightWeightFlagLLMReranker"),
    ],
)
def test_registry_rerankers(name, class_name):
    spec = registry.lookup(name, registry.RERANKER)
    assert spec.class_name == class_name
    assert spec.hub_id.startswith("BAAI/")
    assert registry.lookup(name) is None  # not an embedder


def test_registry_names_export_and_close_matches():
    assert set(registry.EMBEDDER_CLASSES.values()) | set(registry.RERANKER_CLASSES.values()) <= set(models.__all__)
    assert {s.class_name for s in registry._SPECS} <= set(models.__all__)
    assert registry.close_names("bge-base-en-v15")[0] == "bge-base-en-v1.5"
    assert registry.lookup("no-such-model") is None


# -- bad input (tiny_bert) ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def bert(tiny_bert):
    return models.FlagModel(str(tiny_bert), **CPU)


def test_empty_list_gives_empty_matrix(bert):
    out = bert.encode([])
    assert isinstance(out, np.ndarray) and out.shape == (0, bert.dim)
    assert bert.encode_queries([]).shape == (0, bert.dim)


def test_empty_string_gives_a_vector(bert):
    out = bert.encode(["", "x"])
    assert out.shape == (2, bert.dim) and np.isfinite(out).all()
    assert bert.encode("").shape == (bert.dim,)


@pytest.mark.parametrize("bad, index", [(["a", None], 1), (["a", "b", 3], 2), ([b"bytes"], 0)])
def test_non_string_names_its_index(bert, bad, index):
    with pytest.raises(TypeError, match=rf"\[{index}\]"):
        bert.encode(bad)
    with pytest.raises(TypeError, match=rf"\[{index}\]"):
        bert.encode_queries(bad)


def test_none_input(bert):
    with pytest.raises(TypeError, match="None"):
        bert.encode(None)


def test_long_text_is_truncated(bert):
    long_text = "word " * 20000
    assert bert.encode(long_text).shape == (bert.dim,)  # default 512 tokens: no crash
    ids = bert.tokenizer(long_text, truncation=True, max_length=16)["input_ids"]
    cut = bert.tokenizer.decode(ids[1:-1])
    np.testing.assert_allclose(bert.encode(long_text, max_length=16), bert.encode(cut, max_length=16), atol=1e-6)
    # Only the first 512 tokens count: a different tail changes nothing.
    np.testing.assert_allclose(bert.encode(long_text), bert.encode(long_text + " different tail"), atol=1e-6)


def test_single_string_is_1d(bert):
    assert bert.encode("hello").shape == (bert.dim,)
    assert bert.encode_queries("hello").shape == (bert.dim,)
    assert bert.encode_corpus("hello").shape == (bert.dim,)


def test_unknown_model_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(models.ModelNotFoundError) as err:
        models.FlagModel("no-such-org/no-such-model-xyz", **CPU)
    msg = str(err.value)
    assert "no-such-org/no-such-model-xyz" in msg and "HF_HUB_OFFLINE" in msg and "download" in msg


def test_folder_without_config(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(models.ModelNotFoundError, match="config.json"):
        models.FlagModel(str(tmp_path), **CPU)
    with pytest.raises(models.ModelNotFoundError, match="does not exist"):
        models.FlagModel(str(tmp_path / "missing" / "model"), **CPU)
