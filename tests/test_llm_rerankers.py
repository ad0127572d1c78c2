"""Decoder-only rerankers: FlagLLMReranker against FlagEmbedding 1.4.2; the layerwise (MiniCPM) and
lightweight (Gemma2) rerankers against a plain-torch computation of their definition, since
FlagEmbedding's own model code for them does not run on transformers 5."""

from __future__ import annotations

import math

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


# -- plain-torch definitions of the layerwise and lightweight models (one unpadded pair at a time) --
def _load_state(path):
    from safetensors.torch import load_file

    return {k: v.double() for k, v in load_file(str(path / "model.safetensors")).items()}


def _config(path):
    import json

    return json.loads((path / "config.json").read_text())


def _prompt_ids(tok, query, passage, prompt):
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    sep = enc("\n")
    return [tok.bos_token_id] + enc("A: " + query) + sep + enc("B: " + passage) + sep + enc(prompt)


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x, theta):
    d = x.shape[-1]
    angle = torch.arange(x.shape[-2]).double()[:, None] / theta ** (torch.arange(0, d, 2).double() / d)
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    return x * cos + torch.cat([-x[..., d // 2 :], x[..., : d // 2]], -1) * sin


def _attention(x, sd, p, heads, kv_heads, head_dim, scale, theta, softcap=None, window=None):
    n = x.shape[0]
    q = (x @ sd[p + "q_proj.weight"].T).view(n, heads, head_dim).transpose(0, 1)
    k = (x @ sd[p + "k_proj.weight"].T).view(n, kv_heads, head_dim).transpose(0, 1)
    v = (x @ sd[p + "v_proj.weight"].T).view(n, kv_heads, head_dim).transpose(0, 1)
    q, k = _rope(q, theta), _rope(k, theta)
    k, v = k.repeat_interleave(heads // kv_heads, 0), v.repeat_interleave(heads // kv_heads, 0)
    s = q @ k.transpose(1, 2) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    allowed = (j <= i) & ((i - j < window) if window else True)
    out = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) @ v
    return out.transpose(0, 1).reshape(n, -1) @ sd[p + "o_proj.weight"].T


def _mlp(x, sd, p, act):
    return (act(x @ sd[p + "gate_proj.weight"].T) * (x @ sd[p + "up_proj.weight"].T)) @ sd[p + "down_proj.weight"].T


def minicpm_reference(path, ids, layers):
    """Per-layer scores of one pair by MiniCPM's definition: scaled embeddings and residuals."""
    sd, cfg = _load_state(path), _config(path)
    n_layers, eps = cfg["num_hidden_layers"], cfg["rms_norm_eps"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg["hidden_size"] // heads
    branch = cfg["scale_depth"] / math.sqrt(n_layers)
    h = sd["model.embed_tokens.weight"][ids] * cfg["scale_emb"]
    scores = {}
    for i in range(n_layers + 1):
        if i in layers:
            head = f"lm_head.{i - cfg['start_layer']}." if cfg["head_multi"] else "lm_head."
            scores[i] = (_rms(h[-1], sd["model.norm.weight"], eps) @ sd[head + "linear_head.weight"].T).item()
        if i == n_layers:
            break
        p = f"model.layers.{i}."
        x = _rms(h, sd[p + "input_layernorm.weight"], eps)
        h = h + branch * _attention(x, sd, p + "self_attn.", heads, kv, head_dim, head_dim**-0.5, cfg["rope_theta"])
        x = _rms(h, sd[p + "post_attention_layernorm.weight"], eps)
        h = h + branch * _mlp(x, sd, p + "mlp.", torch.nn.functional.silu)
    return scores


# -- LayerWiseFlagLLMReranker -------------------------------------------------------------------
@pytest.fixture(scope="module")
def minicpm_layerwise(llm_root, bos_tokenizer):
    return tlm.build_minicpm_layerwise(llm_root / "bge-reranker-v2-minicpm-layerwise-tiny", bos_tokenizer)


def _layerwise(path, **kwargs):
    from bge_ray.models.layerwise_reranker import LayerWiseFlagLLMReranker

    return LayerWiseFlagLLMReranker(str(path), devices="cpu", **kwargs)


def _minicpm_expected(path, tok, pairs, layers):
    from bge_ray.models.llm_reranker import DEFAULT_PROMPT

    refs = [minicpm_reference(path, _prompt_ids(tok, q, p, DEFAULT_PROMPT), layers) for q, p in pairs]
    return [[r[k] for r in refs] for k in sorted(layers)]


def test_layerwise_matches_definition(minicpm_layerwise):
    ours = _layerwise(minicpm_layerwise, batch_size=2)
    expected = _minicpm_expected(minicpm_layerwise, ours.tokenizer, PAIRS, {1, 2, 3, 4})
    assert np.std(expected[-1]) > 1e-2 and not np.allclose(expected[0], expected[-1], atol=1e-2)
    # Default: the last layer, as one flat list.
    np.testing.assert_allclose(ours.compute_score(PAIRS), expected[3], atol=1e-4, rtol=1e-5)
    # Several layers come back in ascending order, whatever order they were asked in.
    got = ours.compute_score(PAIRS, cutoff_layers=[3, 1])
    np.testing.assert_allclose(got, [expected[0], expected[2]], atol=1e-4, rtol=1e-5)
    got = ours.compute_score(PAIRS, cutoff_layers=[2], normalize=True)
    np.testing.assert_allclose(got, 1 / (1 + np.exp(-np.array(expected[1]))), atol=1e-5)


def test_layerwise_cutoff_layers_validation(minicpm_layerwise, caplog):
    ours = _layerwise(minicpm_layerwise, cutoff_layers=2)
    expected = _minicpm_expected(minicpm_layerwise, ours.tokenizer, PAIRS[:2], {2})
    np.testing.assert_allclose(ours.compute_score(PAIRS[:2]), expected[0], atol=1e-4)
    with caplog.at_level("WARNING"):
        got = ours.compute_score(PAIRS[:2], cutoff_layers=[0, 2, 9])
    assert "[0, 9]" in caplog.text
    np.testing.assert_allclose(got, expected[0], atol=1e-4)
    with pytest.raises(ValueError, match=r"cutoff_layers=\[0\].*\[1, 2, 3, 4\]"):
        ours.compute_score(PAIRS[:2], cutoff_layers=[0])
    assert ours.compute_score(PAIRS[0], cutoff_layers=[1, 4])[0][0] == pytest.approx(
        ours.compute_score(PAIRS[:1], cutoff_layers=1)[0], abs=1e-6
    )


def test_layerwise_single_head_and_missing_heads(llm_root, bos_tokenizer, tmp_path):
    path = tlm.build_minicpm_layerwise(llm_root / "minicpm-one-head", bos_tokenizer, head_multi=False)
    ours = _layerwise(path)
    expected = _minicpm_expected(path, ours.tokenizer, PAIRS[:3], {1, 4})
    np.testing.assert_allclose(ours.compute_score(PAIRS[:3], cutoff_layers=[1, 4]), expected, atol=1e-4)
    # A checkpoint without the score heads must not load with random ones.
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "no-heads"
    broken.mkdir()
    for f in path.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    state = {k: v for k, v in load_file(str(path / "model.safetensors")).items() if not k.startswith("lm_head")}
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lm_head"):
        _layerwise(broken)


def gemma2_lightweight_reference(path, ids, query_len, prompt_len, layers, compress_layers=(), ratio=1):
    """Scores of one pair by the cost-wise Gemma2 definition, compressing the passage in place."""
    sd, cfg = _load_state(path), _config(path)
    eps, heads, kv, head_dim = cfg["rms_norm_eps"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]

    def norm(x, name):
        return _rms(x, 1 + sd[name + ".weight"], eps)  # Gemma norms scale by (1 + weight)

    def gelu(x):
        return torch.nn.functional.gelu(x, approximate="tanh")

    h = sd["model.embed_tokens.weight"][ids] * math.sqrt(cfg["hidden_size"])
    picked, top = [], max(layers)
    for i in range(top + 1):
        if i in layers:
            picked.append(h[-1])
        if i == top:
            break
        if ratio > 1 and i in compress_layers and i != 0:
            n_passage = len(h) - query_len - prompt_len
            runs = [h[query_len + s : query_len + min(s + ratio, n_passage)].mean(0) for s in range(0, n_passage, ratio)]
            h = torch.cat([h[:query_len], *[r[None] for r in runs], h[query_len + n_passage :]])
        p = f"model.layers.{i}."
        window = cfg["sliding_window"] if i % 2 == 0 else None  # even layers use the sliding window
        attn = _attention(
            norm(h, p + "input_layernorm"), sd, p + "self_attn.", heads, kv, head_dim,
            cfg["query_pre_attn_scalar"] ** -0.5, cfg["rope_theta"], cfg["attn_logit_softcapping"], window,
        )
        h = h + norm(attn, p + "post_attention_layernorm")
        h = h + norm(_mlp(norm(h, p + "pre_feedforward_layernorm"), sd, p + "mlp.", gelu), p + "post_feedforward_layernorm")
    cap = cfg["final_logit_softcapping"]
    # The j-th picked layer is scored by lm_head[j] (FlagEmbedding's lightweight convention).
    return [
        cap * math.tanh((norm(x, "model.norm") @ sd[f"lm_head.{j}.linear_head.weight"].T).item() / cap)
        for j, x in enumerate(picked)
    ]


# -- LightWeightFlagLLMReranker -----------------------------------------------------------------
@pytest.fixture(scope="module")
def gemma2_lightweight(llm_root, bos_tokenizer):
    return tlm.build_gemma2_lightweight(llm_root / "bge-reranker-v2.5-gemma2-lightweight-tiny", bos_tokenizer)


def _lightweight(path, **kwargs):
    from bge_ray.models.lightweight_reranker import LightWeightFlagLLMReranker

    return LightWeightFlagLLMReranker(str(path), devices="cpu", **kwargs)


def _lightweight_expected(path, tok, pairs, layers, compress_layers=(), ratio=1):
    from bge_ray.models.lightweight_reranker import LIGHTWEIGHT_PROMPT

    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    n_sep, n_prompt = len(enc("\n")), len(enc(LIGHTWEIGHT_PROMPT))
    refs = [
        gemma2_lightweight_reference(
            path, _prompt_ids(tok, q, p, LIGHTWEIGHT_PROMPT), 1 + len(enc("A: " + q)) + n_sep, n_sep + n_prompt,
            layers, compress_layers, ratio,
        )
        for q, p in pairs
    ]
    return [list(col) for col in zip(*refs, strict=True)]


def test_lightweight_matches_definition(gemma2_lightweight):
    ours = _lightweight(gemma2_lightweight, batch_size=2)
    tok = ours.tokenizer
    # Defaults: last layer, compress_layers=[8] (beyond this model) and ratio 1, so no compression.
    plain = _lightweight_expected(gemma2_lightweight, tok, PAIRS, [4])
    assert np.std(plain[0]) > 1e-2
    np.testing.assert_allclose(ours.compute_score(PAIRS), plain[0], atol=1e-4, rtol=1e-5)
    # Compression before layers 1 and 3 (twice), scores at layers 2 and 4.
    squeezed = _lightweight_expected(gemma2_lightweight, tok, PAIRS, [2, 4], [1, 3], 2)
    got = ours.compute_score(PAIRS, cutoff_layers=[4, 2], compress_layers=[1, 3], compress_ratio=2)
    np.testing.assert_allclose(got, squeezed, atol=1e-4, rtol=1e-5)
    assert not np.allclose(got[1], plain[0], atol=1e-3)
    # Ratio 3 leaves partial runs; layer 0 is never compressed; the deprecated spelling still works.
    expected = _lightweight_expected(gemma2_lightweight, tok, PAIRS, [3], [0, 2], 3)[0]
    got = ours.compute_score(PAIRS, cutoff_layers=3, compress_layer=[0, 2], compress_ratio=3, normalize=True)
    np.testing.assert_allclose(got, 1 / (1 + np.exp(-np.array(expected))), atol=1e-5)


def test_lightweight_constructor_options_and_sliding_window(llm_root, bos_tokenizer):
    # A short sliding window (even layers) and heads only at layers 2 and 4.
    path = tlm.build_gemma2_lightweight(
        llm_root / "gemma2-lightweight-window", bos_tokenizer, sliding_window=6, start_layer=2, layer_sep=2
    )
    ours = _lightweight(path, cutoff_layers=[2, 4], compress_layers=[1], compress_ratio=2, batch_size=3)
    expected = _lightweight_expected(path, ours.tokenizer, PAIRS, [2, 4], [1], 2)
    np.testing.assert_allclose(ours.compute_score(PAIRS), expected, atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match=r"choose from \[2, 4\]"):
        ours.compute_score(PAIRS, cutoff_layers=[3])
    with pytest.raises(ValueError, match="compress_ratio"):
        ours.compute_score(PAIRS, compress_ratio=0)


def test_lightweight_rejects_vocabulary_head_checkpoint(gemma2_lightweight, tmp_path):
    import json

    folder = tmp_path / "not-layerwise"
    folder.mkdir()
    for f in gemma2_lightweight.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "layer_wise": False}))
    with pytest.raises(ValueError, match="layer_wise=false"):
        _lightweight(folder)
