"""Encoder-only embedder training: the trainable bi-encoder, its training task for the shared loop,
and saving in the layout :class:`bge_ray.models.FlagModel` (and sentence-transformers) load."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from bge_ray.models.pooling import check_pooling, pool

from .arguments import DataArgs, ModelArgs, TrainArgs
from .data import GroupOptions, build_groups
from .grad_cache import grad_cache_step
from .losses import ContrastiveLoss, LossOutput

_ST_POOLING_KEYS = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens",
                    "last_token": "pooling_mode_lasttoken"}


class BiEncoder(torch.nn.Module):
    """A transformer backbone with pooling (and L2 normalisation): texts' features -> embeddings."""

    def __init__(self, backbone: torch.nn.Module, pooling_method: str, normalize: bool = True,
                 sub_batch_size: int | None = None):
        super().__init__()
        self.backbone = backbone
        self.pooling_method = check_pooling(pooling_method)
        self.normalize = normalize
        self.sub_batch_size = sub_batch_size

    def encode(self, features: dict) -> torch.Tensor:
        n = features["input_ids"].shape[0]
        step = self.sub_batch_size if self.sub_batch_size and self.sub_batch_size > 0 else n
        reps = []
        for s in range(0, n, step):
            part = {k: v[s:s + step] for k, v in features.items()}
            hidden = self.backbone(**part, return_dict=True).last_hidden_state
            reps.append(pool(hidden, part["attention_mask"], self.pooling_method))
        out = torch.cat(reps) if len(reps) > 1 else reps[0]
        out = out.float()
        return torch.nn.functional.normalize(out, dim=-1) if self.normalize else out

    def forward(self, queries: dict, passages: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode(queries), self.encode(passages)


def resolve_pooling(model_name_or_path: str | None, requested: str | None) -> str:
    """The pooling to train with: asked for, else what the registry or the checkpoint's files say, else cls."""
    if requested:
        return check_pooling(requested)
    from bge_ray.models import registry
    from bge_ray.models.loading import resolve_model_path

    spec = registry.lookup(model_name_or_path or "all-MiniLM-L6-v2", registry.EMBEDDER)
    if spec is None:
        spec = registry.infer_from_checkpoint(resolve_model_path(model_name_or_path), registry.EMBEDDER)
    return spec.pooling_method if spec is not None and spec.pooling_method else "cls"


def freeze_unused(backbone: torch.nn.Module, fix_position_embedding: bool = False) -> None:
    """Parameters outside the embedding path never get gradients (BERT's pooler): freeze them so DDP
    does not wait for them; ``fix_position_embedding`` freezes position embeddings (FlagEmbedding)."""
    for name, p in backbone.named_parameters():
        if name.startswith("pooler.") or (fix_position_embedding and "position_embeddings" in name):
            p.requires_grad_(False)


def tokenize_texts(tokenizer, texts: list[str], max_length: int, device, pad_to_multiple_of: int | None = None) -> dict:
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt",
                      pad_to_multiple_of=pad_to_multiple_of)
    return {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def write_sentence_transformers_files(folder: str, pooling_method: str, normalize: bool, max_seq_length: int,
                                      dim: int) -> None:
    """modules.json + 1_Pooling (+ 2_Normalize): the pooling travels with the weights, so FlagModel,
    FlagAutoModel and sentence-transformers all load the checkpoint with the trained pooling."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        os.makedirs(os.path.join(folder, "2_Normalize"), exist_ok=True)
    os.makedirs(os.path.join(folder, "1_Pooling"), exist_ok=True)
    cfg = {"word_embedding_dimension": dim, **{k: m == pooling_method for m, k in _ST_POOLING_KEYS.items()},
           "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False,
           "pooling_mode_weightedmean_tokens": False}
    with open(os.path.join(folder, "1_Pooling", "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
    with open(os.path.join(folder, "modules.json"), "w", encoding="utf-8") as f:
        json.dump(modules, f, indent=2)
    with open(os.path.join(folder, "sentence_bert_config.json"), "w", encoding="utf-8") as f:
        json.dump({"max_seq_length": max_seq_length, "do_lower_case": False}, f, indent=2)


def model_paths(model: ModelArgs) -> tuple[str, str]:
    """(weights folder, tokenizer folder) of ``model`` (bundled default, local folder or hub name)."""
    from bge_ray.models.loading import resolve_model_path

    path = resolve_model_path(model.model_name_or_path, cache_dir=model.cache_dir)
    tok_path = resolve_model_path(model.tokenizer_name, cache_dir=model.cache_dir) if model.tokenizer_name else path
    return path, tok_path


def load_backbone(model: ModelArgs, auto_class=None, **model_kwargs):
    """Backbone and tokenizer through the one loading path (bundled default, local folder, hub)."""
    from bge_ray.models.loading import load_hf_model, load_tokenizer

    path, tok_path = model_paths(model)
    tokenizer = load_tokenizer(tok_path, trust_remote_code=model.trust_remote_code)
    backbone = load_hf_model(path, auto_class=auto_class, trust_remote_code=model.trust_remote_code, **model_kwargs)
    return backbone, tokenizer


def read_safetensors(folder: str) -> dict[str, torch.Tensor]:
    """Every ``*.safetensors`` file of a ``save_pretrained`` folder, as one state dict."""
    from safetensors.torch import load_file

    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no .safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(os.path.join(folder, f)))
    return state


def load_backbone_weights(backbone: torch.nn.Module, folder: str) -> None:
    """Weights saved by ``save_pretrained`` back into ``backbone`` (resumption). Keys left out because
    they are tied to saved ones (an MLM decoder and the word embeddings) do not count as missing."""
    state = read_safetensors(folder)
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    params = dict(backbone.named_parameters(remove_duplicate=False))
    loaded = {id(params[k]) for k in state if k in params}
    missing = [m for m in missing if not m.endswith("position_ids") and not (m in params and id(params[m]) in loaded)]
    if missing or unexpected:
        raise RuntimeError(f"{folder}: checkpoint does not fit the model (missing {missing[:5]}, unexpected {unexpected[:5]})")


@dataclass
class EmbedderTask:
    """Contrastive fine-tuning of an encoder-only embedder (FlagEmbedding's encoder_only.base)."""

    model: ModelArgs
    data: DataArgs
    train: TrainArgs
    pooling_method: str = "cls"

    def group_options(self) -> GroupOptions:
        d = self.data
        return GroupOptions(d.train_group_size, d.query_instruction_for_retrieval, d.query_instruction_format,
                            d.passage_instruction_for_retrieval, d.passage_instruction_format,
                            d.knowledge_distillation, d.shuffle_ratio, self.train.seed, d.same_dataset_within_batch)

    def validate(self) -> None:
        """Argument checks that must fail before any Ray work starts."""
        t = self.train
        if not t.grad_cache:
            return
        if not t.sub_batch_size or t.sub_batch_size <= 0:
            raise ValueError("--grad_cache needs --sub_batch_size (texts per sub-batch)")
        if t.gradient_accumulation_steps > 1 or t.fp16 or t.deepspeed:
            raise ValueError("--grad_cache replaces gradient accumulation and runs without --fp16 / --deepspeed "
                             "(use --bf16 for mixed precision)")

    def build(self):
        self.validate()
        backbone, tokenizer = load_backbone(self.model)
        freeze_unused(backbone, self.train.fix_position_embedding)
        self.loss = ContrastiveLoss(self.train.temperature, self.train.negatives_cross_device, self.train.kd_loss_type)
        self.tokenizer = tokenizer
        return BiEncoder(backbone, self.pooling_method, self.train.normalize_embeddings, self.train.sub_batch_size), tokenizer

    def features(self, tokenizer, rows, batch, device):
        queries, passages, teacher = build_groups(rows, batch, self.group_options())
        q = tokenize_texts(tokenizer, queries, self.data.query_max_len, device, self.data.pad_to_multiple_of)
        p = tokenize_texts(tokenizer, passages, self.data.passage_max_len, device, self.data.pad_to_multiple_of)
        t = None if teacher is None else torch.tensor(teacher, dtype=torch.float32, device=device)
        return q, p, t

    def step(self, model, rows, batch, device) -> LossOutput:
        q, p, teacher = self.features(self.tokenizer, rows, batch, device)
        no_in_batch_neg = bool(rows[0]["no_in_batch_neg"])
        if self.train.grad_cache:
            inner = getattr(model, "module", model)
            return grad_cache_step(model, inner.encode, q, p, self.train.sub_batch_size,
                                   lambda qr, pr: self.loss(qr, pr, teacher, no_in_batch_neg=no_in_batch_neg))
        q_reps, p_reps = model(q, p)
        return self.loss(q_reps, p_reps, teacher, no_in_batch_neg=no_in_batch_neg)

    def save(self, model: BiEncoder, tokenizer, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        model.backbone.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        write_sentence_transformers_files(folder, model.pooling_method, model.normalize, self.data.passage_max_len,
                                          model.backbone.config.hidden_size)

    def load(self, model: BiEncoder, folder: str) -> None:
        load_backbone_weights(model.backbone, folder)
