"""Decoder-only (LoRA) and ICL embedder training: the merge against peft's, the ICL query builder
against FlagEmbedding's rules, save / resume round trips, and the Ray Train job end to end (only
LoRA weights move, the loss falls, the merged save embeds in FlagLLMModel / FlagICLModel exactly as
the trained module does)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bge_ray.train.arguments import DataArgs, ModelArgs, RayArgs, TrainArgs
from bge_ray.train.llm_embedder import (
    LLM_QUERY_INSTRUCTION_FORMAT,
    LLMArgs,
    LLMEmbedderTask,
    merged_state_dict,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

INSTRUCTION = "Find the passage"
SUFFIX = "\n<response>"


def _rows(n=4, kind=None):
    """Rows as a worker receives them (bge_ray.train.data.rank_rows)."""
    words = [["river", "water"], ["bank", "loan"], ["music", "song"], ["code", "program"], ["tree", "garden"]]
    return [{"query": " ".join(words[i % 5]), "pos": [" ".join(words[i % 5] * 2)],
             "neg": [" ".join(words[(i + k) % 5]) for k in (1, 2, 3)], "pos_scores": None, "neg_scores": None,
             "prompt": None, "type": kind, "file": "f", "line": i + 1, "slot": i, "batch": 0, "epoch": 0,
             "no_in_batch_neg": False} for i in range(n)]


def _task(model, *, query_max_len=32, icl=False, **llm):
    m = ModelArgs(model_name_or_path=str(model))
    d = DataArgs(train_data=["unused"], train_group_size=3, query_max_len=query_max_len, passage_max_len=24,
                 query_instruction_for_retrieval=INSTRUCTION, query_instruction_format=LLM_QUERY_INSTRUCTION_FORMAT)
    t = TrainArgs(temperature=0.05)
    llm = {"lora_rank": 4, "lora_alpha": 8, "icl_suffix_str": SUFFIX, **llm}
    return LLMEmbedderTask(m, d, t, llm=LLMArgs(icl=icl, **llm))


def _perturb_lora(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def _embed_one_by_one(bi, tokenizer, texts):
    """The trained module's embeddings, each text alone (no padding)."""
    bi.eval()
    with torch.no_grad():
        return torch.cat([bi.encode(dict(tokenizer([t], return_tensors="pt"))) for t in texts]).numpy()


def test_lora_build_trains_only_adapters_and_merges_as_peft_does(tiny_qwen2, tmp_path):
    task = _task(tiny_qwen2, save_merged_lora_model=True)
    model, tok = task.build()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # FlagEmbedding's targets: every attention and MLP projection of both layers.
    assert len(trainable) == 2 * 2 * 7
    # FlagEmbedding's tokenizer: EOS last (what last-token pooling reads), left padding.
    assert tok("river water")["input_ids"][-1] == tok.eos_token_id and tok.padding_side == "left"
    out = task.step(model, _rows(), 0, torch.device("cpu"))
    out.backward.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    _perturb_lora(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mine = merged_state_dict(model.backbone)
    ref = copy.deepcopy(model.backbone).merge_and_unload().state_dict()
    assert set(mine) == set(ref) and all(torch.equal(mine[k], ref[k]) for k in ref)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the trained module is untouched
    # Save -> resume: a fresh build with the saved adapter is the same module.
    task.save(model, tok, str(tmp_path / "ckpt"))
    files = set(p.name for p in (tmp_path / "ckpt").iterdir())
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "merged_model"} <= files
    assert "config.json" not in files  # the adapter folder holds no base weights
    assert json.loads((tmp_path / "ckpt" / "tokenizer.json").read_text())["truncation"] is None
    fresh = _task(tiny_qwen2)
    again, _ = fresh.build()
    fresh.load(again, str(tmp_path / "ckpt"))
    assert all(torch.equal(before[k], v) for k, v in again.state_dict().items())
    # --only_merge_lora_model: base from disk + saved adapter == the merge written from the trained module.
    from safetensors.torch import load_file

    remerged = fresh.merge_saved(str(tmp_path / "ckpt"), str(tmp_path / "remerged"))
    a, b = load_file(f"{remerged}/model.safetensors"), load_file(str(tmp_path / "ckpt" / "merged_model" / "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_icl_queries_follow_flagembedding(tiny_qwen2):
    rows = _rows(5)
    # query_max_len below FlagEmbedding's 512-token reserve: no room for examples.
    small = _task(tiny_qwen2, query_max_len=64, icl=True)
    small.build()
    queries, passages, _ = small.texts(rows, 0)
    plain, plain_passages, _ = _task(tiny_qwen2, query_max_len=64).texts(rows, 0)
    dec = lambda s: small.tokenizer.decode(small.tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    assert queries == [dec(q) + SUFFIX for q in plain] and passages == plain_passages
    assert plain[0] == f"<instruct>{INSTRUCTION}\n<query>river water"
    # With room, queries carry 0-5 examples of *other* queries of the batch, each followed by its positive.
    big = _task(tiny_qwen2, query_max_len=700, icl=True)
    big.build()
    shown = 0
    for batch in range(6):
        queries, _, _ = big.texts(rows, batch)
        assert queries == big.texts(rows, batch)[0]  # seeded: a resumed step rebuilds the same queries
        for i, q in enumerate(queries):
            assert q.endswith(SUFFIX) and q[:-len(SUFFIX)].endswith(dec(plain[i]))
            examples = q[:-len(SUFFIX)].count(dec("<query>"))
            assert examples <= 6
            shown += examples - 1
            assert q.count(dec(rows[i]["query"])) == 1  # never its own example
    assert shown > 5
    # No examples for retrieval data when retrieval_use_examples is off; symmetric passages end with the suffix.
    off = _task(tiny_qwen2, query_max_len=700, icl=True, retrieval_use_examples=False)
    off.build()
    assert all(q.count(dec("<query>")) == 1 for b in range(4) for q in off.texts(rows, b)[0])
    _, sym_passages, _ = big.texts(_rows(4, kind="symmetric_sts"), 0)
    assert all(p.endswith(SUFFIX) and p.startswith(dec("<instruct>")) for p in sym_passages)


def test_job_requires_a_model_and_merges_without_data(tiny_qwen2, tmp_path, monkeypatch):
    import logging

    import jobs.finetune_llm_embedder as job

    monkeypatch.setattr(logging, "basicConfig", lambda **kw: None)  # no root handler on pytest's capture stream

    train = tmp_path / "t.jsonl"
    train.write_text(json.dumps({"query": "q", "pos": ["p"], "neg": ["n"]}) + "\n")
    with pytest.raises(SystemExit, match="--model_name_or_path is required"):
        job.main(["--train_data", str(train), "--output_dir", str(tmp_path / "o")])
    # Merging only needs the model and the output folder (no training data).
    task = _task(tiny_qwen2)
    model, tok = task.build()
    task.save(model, tok, str(tmp_path / "adapter"))
    assert job.main(["--model_name_or_path", str(tiny_qwen2), "--output_dir", str(tmp_path / "adapter"),
                     "--only_merge_lora_model"]) == 0
    assert (tmp_path / "adapter" / "merged_model" / "model.safetensors").is_file()
    _, data, _, _, llm = job.parse(["--train_data", str(train), "--lora_rank", "8", "--icl",
                                    "--icl_suffix_str", "\\n<response>"])
    assert data.query_instruction_format == LLM_QUERY_INSTRUCTION_FORMAT
    assert llm.lora_rank == 8 and llm.icl and llm.icl_suffix_str == SUFFIX and llm.use_lora
    assert llm.target_modules[:3] == ["v_proj", "q_proj", "k_proj"] and llm.lora_alpha == 16


# -- Ray Train runs --------------------------------------------------------------------------------------
def _train_file(tmp_path: Path, n: int = 8) -> Path:
    """Learnable groups: a query shares its topic's words with its positives, not with its negatives."""
    topics = [["river", "water", "fish"], ["bank", "loan", "credit"], ["music", "song", "guitar"],
              ["football", "goal", "team"], ["computer", "code", "program"], ["doctor", "health", "hospital"],
              ["train", "station", "travel"], ["garden", "flower", "tree"]]
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        mine = topics[i % len(topics)]
        others = [w for j, t in enumerate(topics) if j != i % len(topics) for w in t]
        rows.append({"query": " ".join(rng.permutation(mine[:2])),
                     "pos": [" ".join(rng.permutation(mine)), " ".join(rng.permutation(mine + mine[:1]))],
                     "neg": [" ".join(rng.choice(others, 3)) for _ in range(5)]})
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _run(model, train_file, out, *, steps, lr, icl=False, query_max_len=32, grads=None, **llm):
    from bge_ray.train.runner import run_training

    task = _task(model, query_max_len=query_max_len, icl=icl, save_merged_lora_model=True, **llm)
    task.data.train_data = [str(train_file)]
    t = task.train
    t.output_dir, t.per_device_train_batch_size, t.learning_rate = str(out), 2, lr
    t.max_steps, t.save_steps, t.logging_steps, t.negatives_cross_device = steps, 1000, 1, True
    r = RayArgs(num_workers=2, cpus_per_worker=0.5)
    return task, run_training(task, task.model, task.data, t, r, debug_grad_file=grads)


def _query_kw():
    return {"query_instruction_for_retrieval": INSTRUCTION, "query_instruction_format": LLM_QUERY_INSTRUCTION_FORMAT}


def _with_tokenizer(model, trained_dir, tmp_path):
    """The base weights beside the trained tokenizer (EOS appended): the untrained starting point."""
    import shutil

    folder = tmp_path / "base_with_tokenizer"
    shutil.copytree(model, folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(trained_dir) / name, folder / name)
    return folder


def _file_loss(embedder, train_file, temperature=0.05):
    rows = [json.loads(line) for line in Path(train_file).read_text().splitlines()]
    q = embedder.encode_queries([r["query"] for r in rows])
    total = 0.0
    for i, r in enumerate(rows):
        s = embedder.encode_corpus([r["pos"][0], *r["neg"]]) @ q[i] / temperature
        total += float(np.log(np.exp(s - s.max()).sum()) + s.max() - s[0])
    return total / len(rows)


@pytest.mark.slow
def test_lora_job_moves_only_adapters_lowers_loss_and_merged_save_embeds_the_same(ray_local, tiny_qwen2, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    from bge_ray.models import FlagAutoModel, FlagLLMModel
    from bge_ray.train.embedder import BiEncoder

    grads = str(tmp_path / "grads.pt")
    train = _train_file(tmp_path)
    _, result = _run(tiny_qwen2, train, tmp_path / "ft", steps=20, lr=2e-2, grads=grads, lora_rank=8, lora_alpha=16,
                     lora_dropout=0.0)
    out = Path(result.output_dir)
    assert result.optimizer_steps == 20
    # Only LoRA parameters got gradients in the loop.
    g = torch.load(grads, weights_only=True)["grads"]
    assert len(g) == 28 and all(".lora_A." in n or ".lora_B." in n for n in g)
    assert max(v.abs().max().item() for n, v in g.items() if ".lora_B." in n) > 0
    # The loss went down.
    history = [h["loss"] for h in json.loads((out / "training_summary.json").read_text())["log_history"]]
    print("losses", [round(x, 3) for x in history])
    assert len(history) == 20 and np.mean(history[-4:]) < 0.8 * np.mean(history[:4])
    # The merged model holds the base weights bit for bit wherever LoRA does not reach, and base + B A
    # (from the saved adapter) where it does: the trained module's base weights never moved.
    base = load_file(str(Path(tiny_qwen2) / "model.safetensors"))
    merged = load_file(str(out / "merged_model" / "model.safetensors"))
    adapter = load_file(str(out / "adapter_model.safetensors"))
    cfg = json.loads((out / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    assert set(merged) == set(base)
    moved = 0
    for key, w in base.items():
        owner = key.rsplit(".", 1)[0]
        a = adapter.get(f"base_model.model.{owner}.lora_A.weight")
        if key.endswith(".weight") and a is not None:
            delta = scale * adapter[f"base_model.model.{owner}.lora_B.weight"] @ a
            torch.testing.assert_close(merged[key], w + delta, atol=1e-6, rtol=0)
            moved += int(delta.abs().max() > 1e-4)
        else:
            assert torch.equal(merged[key], w), key
    assert moved == 14
    # The merged folder loads into FlagLLMModel (and FlagAutoModel finds it is one) and embeds as the
    # trained module (base + saved adapter, the training tokenizer) does.
    texts = ["river water fish", "loan credit bank account", "guitar"]
    tok = AutoTokenizer.from_pretrained(out)
    trained = BiEncoder(PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_qwen2), str(out)), "last_token")
    want = _embed_one_by_one(trained, tok, texts)
    llm = FlagLLMModel(str(out / "merged_model"), devices="cpu", use_fp16=False)
    got = llm.encode(texts)
    err = np.abs(got - want).max()
    print(f"merged FlagLLMModel vs trained module: max |diff| {err:.2e}")
    assert err <= 1e-5
    auto = FlagAutoModel.from_finetuned(str(out / "merged_model"), devices="cpu", use_fp16=False)
    assert isinstance(auto, FlagLLMModel)
    np.testing.assert_allclose(auto.encode(texts), got, atol=1e-6)
    # The un-merged adapter folder loads through transformers' PEFT integration as well.
    unmerged = BiEncoder(AutoModel.from_pretrained(out), "last_token")
    np.testing.assert_allclose(_embed_one_by_one(unmerged, tok, texts), want, atol=1e-6)
    # Training actually changed the embeddings.
    start = _embed_one_by_one(BiEncoder(AutoModel.from_pretrained(tiny_qwen2), "last_token"), tok, texts)
    assert np.abs(start - want).max() > 1e-2
    # And it learned the file: every query against its first positive and its five negatives, the base
    # model (with the trained tokenizer) then the merged one, at inference through FlagLLMModel.
    before, after = (_file_loss(FlagLLMModel(str(path), devices="cpu", use_fp16=False, **_query_kw()), train)
                     for path in (_with_tokenizer(tiny_qwen2, out, tmp_path), out / "merged_model"))
    print(f"file InfoNCE (t=0.05) base {before:.3f} -> trained {after:.3f}")
    assert after < before


@pytest.mark.slow
def test_icl_job_runs_and_loads_into_flagiclmodel(ray_local, tiny_qwen2, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    from bge_ray.models import FlagICLModel
    from bge_ray.train.embedder import BiEncoder

    _, result = _run(tiny_qwen2, _train_file(tmp_path), tmp_path / "icl", steps=4, lr=5e-3, icl=True,
                     query_max_len=800)
    out = Path(result.output_dir)
    history = json.loads((out / "training_summary.json").read_text())["log_history"]
    assert result.optimizer_steps == 4 and all(np.isfinite(h["loss"]) for h in history)
    examples = [{"instruct": INSTRUCTION, "query": "river water", "response": "river fish water"}]
    icl = FlagICLModel(str(out / "merged_model"), query_instruction_for_retrieval=INSTRUCTION,
                       examples_for_task=examples, suffix=SUFFIX, devices="cpu", use_fp16=False)
    queries = ["bank loan", "music song guitar"]
    got = icl.encode_queries(queries)
    # The trained module (un-merged) on the same token ids FlagICLModel built.
    feats = icl._prepare([icl.query_instruction_format.format(INSTRUCTION, q) for q in queries], icl.query_max_length,
                         _icl_query=True)
    tok = AutoTokenizer.from_pretrained(out)
    assert all(ids[-1] == tok.eos_token_id for ids in feats.columns["input_ids"])
    trained = BiEncoder(AutoModel.from_pretrained(out), "last_token").eval()
    with torch.no_grad():
        want = torch.cat([trained.encode({"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids))})
                          for ids in feats.columns["input_ids"]]).numpy()
    err = np.abs(got - want).max()
    print(f"merged FlagICLModel vs trained module: max |diff| {err:.2e}")
    assert err <= 1e-5
    assert icl.encode_corpus(["river fish water"]).shape == (1, 32)
