"""Decoder-only reranker training (LLM 'Yes' logit and layerwise): prompt ids and losses as FlagEmbedding
builds them, and Ray Train runs that lower the loss and save checkpoints the inference classes load."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bge_ray.train.arguments import ModelArgs, RayArgs, TrainArgs
from bge_ray.train.llm_reranker import LLMRerankerArgs, LLMRerankerTask, PromptPairBuilder, layerwise_loss
from bge_ray.train.reranker import RerankerDataArgs, group_loss
from tests import tiny_llm_models as tlm
from tests.oracle import require

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning",
                                        "ignore::FutureWarning")

LONG_Q = "how many people live in the capital city of the country " * 3
LONG_P = "The population of the city grew quickly after the railway arrived in the late nineteenth century. " * 6
PROMPT = "Given a query A and a passage B, determine whether the passage contains an answer to the query by " \
         "providing a prediction of either 'Yes' or 'No'."


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("llm_reranker_training")


@pytest.fixture(scope="module")
def bos_tok(llm_dir, unigram_tokenizer):
    return tlm.build_llm_tokenizer(unigram_tokenizer, llm_dir / "tok-bos")


@pytest.fixture(scope="module")
def nobos_tok(llm_dir, unigram_tokenizer):
    return tlm.build_llm_tokenizer(unigram_tokenizer, llm_dir / "tok-nobos", bos=False)


@pytest.fixture(scope="module")
def gemma(llm_dir, bos_tok):
    return tlm.build_gemma_reranker(llm_dir / "gemma-tiny", bos_tok)


@pytest.fixture(scope="module")
def minicpm_raw(llm_dir, bos_tok):
    return tlm.build_minicpm_layerwise(llm_dir / "minicpm-raw-tiny", bos_tok, raw=True)


def _tokenizer(path):
    from bge_ray.train.lora import load_llm_tokenizer

    return load_llm_tokenizer(str(path), add_eos_token=False)


# -- inputs and losses against FlagEmbedding -------------------------------------------------------
@pytest.mark.parametrize("which", ["bos", "nobos"])
def test_prompt_ids_equal_flagembedding_llm_reranker_dataset(which, bos_tok, nobos_tok):
    """Same ids as FlagEmbedding's LLM reranker dataset, with and without bos, truncated or not."""
    require("FlagEmbedding")
    from FlagEmbedding.abc.finetune.reranker.AbsDataset import AbsLLMRerankerTrainDataset

    tok = _tokenizer(bos_tok if which == "bos" else nobos_tok)
    for qml, pml in ((8, 24), (64, 256)):
        args = SimpleNamespace(query_max_len=qml, passage_max_len=pml, train_group_size=2, sep_token="\n",
                               query_instruction_for_rerank="A: ", query_instruction_format="{}{}",
                               passage_instruction_for_rerank="B: ", passage_instruction_format="{}{}",
                               knowledge_distillation=False, shuffle_ratio=0.0)
        fe = object.__new__(AbsLLMRerankerTrainDataset)
        fe.args, fe.tokenizer, fe.max_length = args, tok, qml + pml
        fe.sep_inputs = tok("\n", add_special_tokens=False)["input_ids"]
        line = {"query": LONG_Q, "pos": [LONG_P], "neg": ["short negative"]}
        fe.dataset = [line, {**line, "prompt": "Is B relevant to A?"}]
        ours = PromptPairBuilder(tok, qml, pml)
        for item, prompt in ((0, PROMPT), (1, "Is B relevant to A?")):
            want = [f["input_ids"] for f in fe[item][0]]
            got = ours.ids(["A: " + LONG_Q] * 2, ["B: " + LONG_P, "B: short negative"], [prompt] * 2)
            assert got == want
        if qml == 8:
            assert len(got[0]) == qml + pml  # the long pair was cut to the budget


def test_llm_loss_equals_flagembedding_decoder_reranker_loss(gemma):
    """The group loss on the 'Yes' logits equals FlagEmbedding's CrossDecoderModel loss on identical inputs."""
    require("FlagEmbedding")
    from FlagEmbedding.finetune.reranker.decoder_only.base.modeling import CrossDecoderModel
    from transformers import AutoModelForCausalLM

    from bge_ray.models.llm_reranker import first_token_id
    from bge_ray.train.llm_reranker import YesLogitScorer

    tok = _tokenizer(gemma)
    model = AutoModelForCausalLM.from_pretrained(gemma, dtype=torch.float32)
    builder = PromptPairBuilder(tok, 16, 32)
    queries = ["A: what is a panda"] * 3 + ["A: " + LONG_Q] * 3
    passages = ["B: " + p for p in ("a bear of china", "bank loans", LONG_P, "rivers", "the city", "hi")]
    features = builder.pad(builder.ids(queries, passages, [PROMPT] * 6), "cpu", left=True)
    scorer = YesLogitScorer(model, first_token_id(tok, "Yes")).train()
    fe = CrossDecoderModel(model, tokenizer=tok, train_batch_size=2).train()
    teacher = torch.tensor([[3.0, 1.0, -1.0], [0.5, 0.2, 2.0]])
    for t in (None, teacher):
        want = fe(features, teacher_scores=None if t is None else t.view(-1).tolist()).loss
        got = group_loss(scorer(**features), 3, t)
        assert got.item() == pytest.approx(want.item(), abs=1e-5)
    # Left padding with position ids scores every pair as it scores alone.
    alone = [scorer(**builder.pad([ids], "cpu", left=True)).item()
             for ids in builder.ids(queries[:3], passages[:3], [PROMPT] * 3)]
    np.testing.assert_allclose(scorer(**features)[:3].detach().numpy(), alone, atol=1e-4)


def test_layerwise_loss_equals_flagembedding_layerwise_loss():
    require("FlagEmbedding")
    from FlagEmbedding.finetune.reranker.decoder_only.layerwise.modeling import CrossDecoderModel

    torch.manual_seed(0)
    scores = torch.randn(6, 3)  # 2 queries x group 3, layers ascending

    class PerLayerLogits(torch.nn.Module):  # what FlagEmbedding's layerwise model hands its loss
        config = SimpleNamespace(pad_token_id=0)

        def forward(self, **_):
            return SimpleNamespace(logits=tuple(scores[:, i:i + 1] for i in range(scores.shape[1])))

    fe = CrossDecoderModel(PerLayerLogits(), tokenizer=lambda *a, **k: {"input_ids": [7]}, train_batch_size=2)
    fe.train()
    feats = {"input_ids": None, "attention_mask": None}
    teacher = torch.tensor([[3.0, 1.0, -1.0], [0.5, 0.2, 2.0]])
    for t in (None, teacher):
        want = fe(feats, teacher_scores=None if t is None else t.view(-1).tolist()).loss
        assert layerwise_loss(scores, 3, t).item() == pytest.approx(want.item(), abs=1e-6)


def test_llm_reranker_arguments_and_errors(gemma, tmp_path):
    from jobs.finetune_reranker import main

    with pytest.raises(ValueError, match="model_class"):
        LLMRerankerArgs(model_class="decoder-only")
    with pytest.raises(SystemExit, match="--model_class must be one of"):
        main(["--model_class", "llm", "--train_data", str(tmp_path), "--output_dir", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="needs --model_name_or_path"):
        main(["--model_class", "decoder-only-base", "--train_data", str(tmp_path), "--output_dir",
              str(tmp_path / "o")])
    with pytest.raises(ValueError, match="only 'simple'"):
        LLMRerankerArgs(model_class="decoder-only-layerwise", head_type="complex")


# -- Ray Train runs --------------------------------------------------------------------------------------
def _train_file(tmp_path: Path) -> Path:
    from tests.test_train_llm_embedder import _train_file as topic_groups

    return topic_groups(tmp_path, n=8)


def _run(model_path, train_file, out, llm: LLMRerankerArgs, *, steps=12, lr=2e-3):
    from bge_ray.train.runner import run_training

    m = ModelArgs(model_name_or_path=str(model_path))
    d = RerankerDataArgs(train_data=[str(train_file)], train_group_size=4, query_max_len=16, passage_max_len=32,
                         query_instruction_for_rerank="A: ", passage_instruction_for_rerank="B: ")
    t = TrainArgs(output_dir=str(out), per_device_train_batch_size=2, learning_rate=lr, max_steps=steps,
                  save_steps=1000, logging_steps=1)
    task = LLMRerankerTask(m, d, t, llm=llm)
    result = run_training(task, m, d, t, RayArgs(num_workers=2, cpus_per_worker=0.5))
    history = [h["loss"] for h in json.loads((Path(out) / "training_summary.json").read_text())["log_history"]]
    return task, result, history


def _group_loss(reranker, train_file, **kwargs) -> float:
    """Mean group cross-entropy of a reranker over every (query, first positive, negatives) line."""
    total, rows = 0.0, [json.loads(x) for x in Path(train_file).read_text().splitlines()]
    for r in rows:
        s = np.array(reranker.compute_score([[r["query"], p] for p in [r["pos"][0], *r["neg"]]], **kwargs))
        total += float(np.log(np.exp(s - s.max()).sum()) + s.max() - s[0])
    return total / len(rows)


@pytest.mark.slow
def test_llm_reranker_job_lowers_loss_and_loads_into_flagllmreranker(ray_local, gemma, tmp_path):
    from bge_ray.models import FlagLLMReranker

    train_file = _train_file(tmp_path)
    out = tmp_path / "llm_rr"
    llm = LLMRerankerArgs(model_class="decoder-only-base", lora_rank=8, lora_alpha=16, lora_dropout=0.0,
                          save_merged_lora_model=True)
    _, result, history = _run(gemma, train_file, out, llm)
    assert result.optimizer_steps == 12 and len(history) == 12
    assert np.mean(history[-3:]) < np.mean(history[:3])
    assert (out / "adapter_model.safetensors").exists() and (out / "merged_model" / "config.json").exists()

    kw = {"use_fp16": False, "devices": "cpu", "query_max_length": 16, "max_length": 32}
    base = FlagLLMReranker(str(gemma), **kw)
    with_adapter = FlagLLMReranker(str(gemma), peft_path=str(out), **kw)
    merged = FlagLLMReranker(str(out / "merged_model"), **kw)
    before, after = _group_loss(base, train_file), _group_loss(with_adapter, train_file)
    assert after < before - 0.1, (before, after)
    pairs = [["river water", "fish river water"], ["river water", "bank loan credit"]]
    np.testing.assert_allclose(merged.compute_score(pairs), with_adapter.compute_score(pairs), atol=1e-4)
    # FlagEmbedding's own FlagLLMReranker reads the merged checkpoint the same way.
    from FlagEmbedding import FlagLLMReranker as Oracle

    oracle = Oracle(str(out / "merged_model"), use_fp16=False, devices="cpu")
    np.testing.assert_allclose(oracle.compute_score(pairs), merged.compute_score(pairs), atol=1e-4)


@pytest.mark.slow
def test_layerwise_job_from_raw_model_trains_every_cutoff_layer_and_loads(ray_local, minicpm_raw, tmp_path):
    from bge_ray.models.layerwise_reranker import LayerWiseFlagLLMReranker

    train_file = _train_file(tmp_path)
    out = tmp_path / "layerwise_rr"
    llm = LLMRerankerArgs(model_class="decoder-only-layerwise", model_type="from_raw_model", start_layer=2,
                          head_multi=True, lora_rank=8, lora_alpha=16, lora_dropout=0.0)
    _, result, history = _run(minicpm_raw, train_file, out, llm)
    assert np.mean(history[-3:]) < np.mean(history[:3])
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["start_layer"], cfg["head_multi"], cfg["model_type"]) == (2, True, "minicpm")

    kw = {"devices": "cpu", "use_fp16": False, "query_max_length": 16, "max_length": 32}
    rr = LayerWiseFlagLLMReranker(str(out), **kw)
    losses = [_group_loss(rr, train_file, cutoff_layers=[k]) for k in (2, 3, 4)]
    # The untrained starting point, saved through the same task: heads from the LM head's 'Yes' row.
    start = tmp_path / "untrained"
    task = LLMRerankerTask(ModelArgs(model_name_or_path=str(minicpm_raw)), RerankerDataArgs(), TrainArgs(), llm=llm)
    model, tok = task.build()
    task.save(model, tok, str(start))
    before = [_group_loss(LayerWiseFlagLLMReranker(str(start), **kw), train_file, cutoff_layers=[k]) for k in (2, 3, 4)]
    # Every trained head ranks the training positives better than before training, and the best head
    # clearly better than chance among 6 candidates (ln 6 = 1.79). (Whether a low layer's head of a
    # random tiny model also gets below chance in 12 steps depends on its random start.)
    print("group loss per head before / after:", before, losses)
    assert all(a < b - 0.2 for a, b in zip(losses, before, strict=True)), (before, losses)
    assert min(losses) < np.log(6) - 0.2, losses
    # Resuming: the same command with more steps continues from the saved checkpoint.
    _, result2, history2 = _run(minicpm_raw, train_file, out, llm, steps=14)
    assert result2.optimizer_steps == 14 and len(history2) == 14
    np.testing.assert_allclose(history2[:12], history, rtol=1e-6)
