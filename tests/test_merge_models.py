"""LM-Cocktail merging: exact reproduction at (1, 0), parameter average at (0.5, 0.5), automatic
weights from examples, and a clear error for different architectures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bge_ray.train import merge

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "finetune" / "embedder" / "retrieval"


@pytest.fixture(scope="module")
def two_berts(tmp_path_factory):
    """Two checkpoints of one architecture (the tiny BERT, and the same with shifted weights)."""
    from tests import tiny_models

    root = tmp_path_factory.mktemp("merge")
    a = tiny_models.build_bert(root / "a")
    b = root / "b"
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(a, b)
    state = load_file(str(b / "model.safetensors"))
    gen = torch.Generator().manual_seed(1)
    state = {k: (v + 0.1 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v) for k, v in state.items()}
    save_file(state, str(b / "model.safetensors"), metadata={"format": "pt"})
    return Path(a), b


def test_weights_one_zero_reproduce_the_first_and_half_half_is_the_average(two_berts, tmp_path):
    a, b = two_berts
    wa, wb = merge.load_weights(str(a)), merge.load_weights(str(b))
    first = merge.load_weights(merge.mix_models([str(a), str(b)], [1.0, 0.0], str(tmp_path / "first")))
    assert all(torch.equal(first[k], wa[k]) for k in wa)
    half = merge.load_weights(merge.mix_models([str(a), str(b)], [0.5, 0.5], str(tmp_path / "half")))
    worst = max((half[k] - (wa[k] + wb[k]) / 2).abs().max().item() for k in wa if wa[k].is_floating_point())
    assert worst < 1e-6
    assert any(not torch.equal(half[k], wa[k]) for k in wa)
    from bge_ray.models import FlagModel

    emb = FlagModel(str(tmp_path / "half"), devices="cpu", use_fp16=False).encode(["a merged model"])
    assert np.isfinite(emb).all()


def test_mismatched_architectures_and_bad_weights_are_clear_errors(two_berts, tmp_path):
    from tests import tiny_models

    a, _ = two_berts
    other = tiny_models.build_bert(tmp_path / "wide", hidden=48)
    with pytest.raises(merge.MergeError, match="differ in"):
        merge.mix_models([str(a), str(other)], [0.5, 0.5], str(tmp_path / "x"))
    with pytest.raises(merge.MergeError, match="sum to 1"):
        merge.mix_models([str(a), str(a)], [0.5, 0.6], str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()


def test_m3_heads_are_merged_too(tiny_m3, tmp_path):
    out = merge.mix_models([str(tiny_m3), str(tiny_m3)], [0.3, 0.7], str(tmp_path / "m3"))
    for head in merge.HEADS:
        got = torch.load(Path(out) / head, weights_only=True)
        want = torch.load(Path(tiny_m3) / head, weights_only=True)
        assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in want)
    from bge_ray.models import BGEM3FlagModel

    BGEM3FlagModel(out, devices="cpu", use_fp16=False).encode(["x"], return_sparse=True)


@pytest.mark.usefixtures("shared_data")  # fails, not skips, without ../shared
def test_automatic_weights_sum_to_one_and_favour_the_lower_loss(two_berts, tmp_path):
    a, b = two_berts
    examples = [json.loads(x) for x in open(SHARED / "msmarco.jsonl")][:6]
    out, weights, losses = merge.mix_models_with_data([str(a), str(b)], "embedder", examples, str(tmp_path / "auto"),
                                                      temperature=1.0, max_length=64, neg_number=3)
    assert sum(weights) == pytest.approx(1.0, abs=1e-9)
    assert (weights[0] > weights[1]) == (losses[0] < losses[1])
    assert weights == pytest.approx(merge.weights_from_losses(losses, 1.0))
    assert Path(out, "model.safetensors").exists()


def _shifted_copy(src: Path, dst: Path, seed: int) -> Path:
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    state = load_file(str(dst / "model.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    state = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in state.items()}
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("kind", ["llm", "layerwise"])
def test_decoder_rerankers_merge_and_load(kind, unigram_tokenizer, tmp_path):
    """LLM (Gemma layout) and layerwise (MiniCPM layout) rerankers: the average loads into the
    inference class and scores as a model holding the averaged weights; automatic weights work."""
    from safetensors.torch import load_file

    from bge_ray.models import FlagLLMReranker
    from bge_ray.models.layerwise_reranker import LayerWiseFlagLLMReranker
    from tests import tiny_llm_models as tlm

    tok = tlm.build_llm_tokenizer(unigram_tokenizer, tmp_path / "tok")
    if kind == "llm":
        a, cls = tlm.build_gemma_reranker(tmp_path / "a", tok), FlagLLMReranker
    else:
        a, cls = tlm.build_minicpm_layerwise(tmp_path / "a", tok), LayerWiseFlagLLMReranker
    b = _shifted_copy(a, tmp_path / "b", seed=3)
    out = merge.mix_models([str(a), str(b)], [0.5, 0.5], str(tmp_path / "avg"))
    sa, sb, sm = (load_file(str(Path(f) / "model.safetensors")) for f in (a, b, out))
    for k in sa:
        torch.testing.assert_close(sm[k], (sa[k] + sb[k]) / 2)
    pairs = [["what is a panda", "a bear of china"], ["what is a panda", "bank loans"]]
    scores = cls(str(out), devices="cpu", use_fp16=False).compute_score(pairs)
    assert np.all(np.isfinite(scores)) and len(scores) == 2
    examples = [{"query": q, "pos": [p], "neg": ["bank loans", "rivers and fish"]} for q, p in pairs]
    _, weights, losses = merge.mix_models_with_data([str(a), str(b)], "reranker", examples, str(tmp_path / "auto"),
                                                    temperature=1.0, max_length=64, neg_number=2)
    assert sum(weights) == pytest.approx(1.0) and all(np.isfinite(losses))


def test_a_failed_merge_leaves_the_existing_output_whole(two_berts, tmp_path, monkeypatch):
    """The old output stays until the new one is in place; a failure at the final rename restores it,
    and no temp folder is left (each merge has its own)."""
    a, b = two_berts
    out = tmp_path / "merged"
    merge.mix_models([str(a), str(b)], [1.0, 0.0], str(out))
    before = merge.load_weights(str(out))
    real = merge.os.replace

    def fail_into_place(src, dst):
        if str(dst) == str(out) and ".merge-" in str(src):
            raise OSError("disk went away")
        real(src, dst)

    monkeypatch.setattr(merge.os, "replace", fail_into_place)
    with pytest.raises(OSError, match="disk went away"):
        merge.mix_models([str(a), str(b)], [0.0, 1.0], str(out))
    monkeypatch.undo()
    after = merge.load_weights(str(out))
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
