"""Decoder-only reranker training: FlagEmbedding's ``reranker.decoder_only.base`` (the 'Yes' logit after
a prompt, as bge-reranker-v2-gemma) and ``reranker.decoder_only.layerwise`` (one score head per layer
from ``start_layer``, as bge-reranker-v2-minicpm-layerwise), LoRA through peft by default.

Inputs follow FlagEmbedding's LLM reranker dataset: ``[bos] query sep passage sep prompt``, query ids
cut at ``query_max_len + passage_max_len // 4``, passage ids at ``passage_max_len + query_max_len // 2``,
then the passage side trimmed so query, separator and passage fit
``query_max_len + passage_max_len - len(sep) - len(prompt)``. A line's ``prompt`` field replaces the
default question; ``query_prompt`` / ``passage_prompt`` replace the instructions.

Losses: the group cross-entropy of the cross-encoder on the 'Yes' logits (+ teacher distillation).
Layerwise: that cross-entropy at every trained cutoff layer, plus each lower layer distilled towards
the top layer's softmax (or every layer towards the teacher's when scores are given). FlagEmbedding
1.4.2 passes no cutoff layers in training, so only its top head learns; here ``--cutoff_layers``
(default: every layer with a head) chooses.

Saved layouts: decoder-only base as the LLM embedder (the peft adapter and tokenizer, or the full model
without LoRA; ``--save_merged_lora_model`` adds ``merged_model/``): ``FlagLLMReranker(base,
peft_path=folder)`` or ``FlagLLMReranker(folder/merged_model)``. Layerwise always saves the full model
in the released layout (MiniCPM config with ``start_layer`` / ``head_multi``), LoRA merged, so
``LayerWiseFlagLLMReranker(folder)`` loads it; the trainable weights go beside it for resumption.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from .data import build_groups
from .embedder import model_paths
from .lora import (
    MERGED_DIR,
    LoraArgs,
    load_adapter,
    load_llm_tokenizer,
    merge_raw_adapters,
    merged_state_dict,
    save_merged,
    save_tokenizer,
    wrap_lora,
)
from .losses import LossOutput, kl_div_loss, mean_across_ranks
from .reranker import RerankerTask, group_loss

logger = logging.getLogger(__name__)

MODEL_CLASSES = ("encoder-only-base", "decoder-only-base", "decoder-only-layerwise")
#: Trainable weights (LoRA and score heads) of a layerwise LoRA run, beside the merged model.
TRAINABLE_FILE = "trainable.safetensors"


@dataclass
class LLMRerankerArgs(LoraArgs):
    """FlagEmbedding's decoder-only reranker model arguments (base and layerwise), plus ``model_class``."""

    model_class: str = field(default="encoder-only-base", metadata={"help": "encoder-only-base (cross-encoder), "
                                                                            "decoder-only-base (LLM 'Yes' logit) or "
                                                                            "decoder-only-layerwise"})
    model_type: str = field(default="from_raw_model", metadata={"help": "layerwise: from_raw_model (a causal LM; "
                                                                        "heads start from its 'Yes' row) or "
                                                                        "from_finetuned_model (a layerwise "
                                                                        "checkpoint)"})
    start_layer: int = field(default=8, metadata={"help": "layerwise, from_raw_model: first layer with a head"})
    head_multi: bool = field(default=False, metadata={"help": "layerwise, from_raw_model: one head per layer"})
    head_type: str = "simple"
    cutoff_layers: list[int] | None = field(default=None, metadata={"help": "layerwise: layers whose scores are "
                                                                            "trained (default: every layer with "
                                                                            "a head)"})

    def __post_init__(self):
        if self.model_class not in MODEL_CLASSES:
            raise ValueError(f"--model_class must be one of {', '.join(MODEL_CLASSES)}; got {self.model_class!r}")
        if self.model_type not in ("from_raw_model", "from_finetuned_model"):
            raise ValueError(f"--model_type must be from_raw_model or from_finetuned_model; got {self.model_type!r}")
        if self.head_type != "simple":
            raise ValueError(f"--head_type {self.head_type!r}: only 'simple' (one logit per layer) heads score "
                             "pairs")


# -- inputs ---------------------------------------------------------------------------------------
class PromptPairBuilder:
    """Token ids of ``[bos] query sep passage sep prompt`` with FlagEmbedding's training truncation."""

    def __init__(self, tokenizer, query_max_len: int, passage_max_len: int, sep_token: str = "\n",
                 pad_to_multiple_of: int | None = None):
        from bge_ray.models.llm_reranker import token_ids, wants_bos

        self.tok = tokenizer
        self.query_max_len, self.passage_max_len = query_max_len, passage_max_len
        self.sep = token_ids(tokenizer, [sep_token])[0]
        self.head = [tokenizer.bos_token_id] if wants_bos(tokenizer) else []
        self.pad_to_multiple_of = pad_to_multiple_of
        self._prompts: dict[str, list[int]] = {}

    def prompt_ids(self, prompt: str) -> list[int]:
        from bge_ray.models.llm_reranker import token_ids

        if prompt not in self._prompts:
            self._prompts[prompt] = token_ids(self.tok, [prompt])[0]
        return self._prompts[prompt]

    def ids(self, queries: list[str], passages: list[str], prompts: list[str]) -> list[list[int]]:
        from bge_ray.models.llm_reranker import token_ids, trim_second

        qml, pml = self.query_max_len, self.passage_max_len
        q_ids = token_ids(self.tok, queries, qml + pml // 4)
        p_ids = token_ids(self.tok, passages, pml + qml // 2)
        cut_left = getattr(self.tok, "truncation_side", "right") == "left"
        rows = []
        for q, p, prompt in zip(q_ids, p_ids, prompts, strict=True):
            tail = self.prompt_ids(prompt)
            budget = qml + pml - len(tail) - len(self.sep)
            first = self.head + q
            rows.append(first + trim_second(first, self.sep + p, budget, cut_left) + self.sep + tail)
        return rows

    def pad(self, rows: list[list[int]], device, left: bool) -> dict:
        """A padded batch; left padding carries position ids so every real token keeps its position."""
        width = max(len(r) for r in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            span = slice(width - len(row), width) if left else slice(0, len(row))
            ids[i, span] = torch.tensor(row)
            mask[i, span] = 1
        out = {"input_ids": ids, "attention_mask": mask}
        if left:
            out["position_ids"] = (mask.cumsum(1) - 1).clamp(min=0)
        return {k: v.to(device) for k, v in out.items()}


# -- models ---------------------------------------------------------------------------------------
class YesLogitScorer(nn.Module):
    """Score of a left-padded batch of prompts: the 'Yes' logit at the last position."""

    def __init__(self, backbone: nn.Module, yes_id: int):
        super().__init__()
        self.backbone = backbone
        self.yes_id = yes_id
        base = backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone
        # Projecting only the last position: full-vocabulary logits of every token are gigabytes.
        self.keeps_last = "logits_to_keep" in inspect.signature(base.forward).parameters

    def forward(self, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
        extra = {"logits_to_keep": 1} if self.keeps_last else {}
        logits = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               **extra).logits
        return logits[:, -1, self.yes_id].float()


class LayerwiseScorer(nn.Module):
    """Scores ``(pairs, layers)`` of a right-padded batch from the per-layer heads."""

    def __init__(self, backbone: nn.Module, layers: list[int]):
        super().__init__()
        self.backbone = backbone
        self.layers = layers

    def forward(self, input_ids, attention_mask) -> torch.Tensor:
        base = self.backbone.get_base_model() if hasattr(self.backbone, "get_base_model") else self.backbone
        return base.layer_scores(input_ids, attention_mask, self.layers).float()


def layerwise_loss(scores: torch.Tensor, group_size: int, teacher_scores: torch.Tensor | None = None) -> torch.Tensor:
    """FlagEmbedding's layerwise reranker loss over ``scores`` ``(pairs, layers)`` in ascending layer
    order: the group cross-entropy at every layer, plus distillation of every lower layer towards
    the top layer's softmax (detached), or of every layer towards the teacher's when given."""
    per_layer = [scores[:, i].reshape(-1, group_size) for i in range(scores.shape[1])]
    target = torch.zeros(per_layer[0].shape[0], dtype=torch.long, device=scores.device)
    loss = sum(torch.nn.functional.cross_entropy(s, target) for s in per_layer)
    if teacher_scores is None:
        soft = torch.softmax(per_layer[-1].detach(), dim=-1)
        students = per_layer[:-1]
    else:
        soft = torch.softmax(teacher_scores.detach().float().reshape(-1, group_size), dim=-1)
        students = per_layer
    for s in students:
        loss = loss + kl_div_loss(soft, s)
    return loss


def _raw_layerwise_model(path: str, args: LLMRerankerArgs, yes_id: int):
    """A layerwise model from a raw causal LM (MiniCPM / Llama weight names): the decoder weights as
    they are, every score head starting from the LM head's 'Yes' row (FlagEmbedding's from_raw_model)."""
    from bge_ray.models.layerwise_reranker import LayerwiseMiniCPM, minicpm_config
    from bge_ray.models.llm_reranker import read_config_dict

    from .embedder import read_safetensors

    raw = read_config_dict(path)
    raw.update(start_layer=args.start_layer, head_multi=args.head_multi, head_type=args.head_type)
    config = minicpm_config(raw)
    if not 0 <= args.start_layer <= config.num_hidden_layers:
        raise ValueError(f"--start_layer {args.start_layer}: {path} has {config.num_hidden_layers} layers")
    model = LayerwiseMiniCPM(config)
    state = read_safetensors(path)
    vocab_rows = state.get("lm_head.weight", state.get("model.embed_tokens.weight"))
    decoder = {k: v for k, v in state.items() if k.startswith("model.")}
    missing, _ = model.load_state_dict(decoder, strict=False)
    missing = [k for k in missing if not k.startswith("lm_head.")]
    if missing:
        raise ValueError(f"{path}: the causal LM lacks {len(missing)} decoder weights a MiniCPM / Llama layout "
                         f"needs ({', '.join(missing[:5])} ...)")
    with torch.no_grad():
        heads = model.lm_head if config.head_multi else [model.lm_head]
        for head in heads:
            head.linear_head.weight.copy_(vocab_rows[yes_id:yes_id + 1].float())
    return model, raw


@dataclass
class LLMRerankerTask(RerankerTask):
    """Fine-tuning a decoder-only reranker (base or layerwise), LoRA by default."""

    llm: LLMRerankerArgs = field(default_factory=LLMRerankerArgs)

    def __post_init__(self):
        llm, model = self.llm, self.model
        if llm.model_class == "encoder-only-base":
            raise ValueError("LLMRerankerTask trains decoder-only rerankers; use RerankerTask for encoder-only-base")
        if not model.model_name_or_path:
            raise ValueError("--model_name_or_path is required for a decoder-only reranker (a causal LM folder "
                             "or hub name); the bundled default model is an encoder")

    @property
    def layerwise(self) -> bool:
        return self.llm.model_class == "decoder-only-layerwise"

    def _base(self, path: str, yes_id: int) -> nn.Module:
        from bge_ray.models.loading import load_hf_model

        if not self.layerwise:
            import transformers

            attn = "flash_attention_2" if self.llm.use_flash_attn else "sdpa"
            model = load_hf_model(path, auto_class=transformers.AutoModelForCausalLM, dtype=torch.float32,
                                  trust_remote_code=self.model.trust_remote_code, attn_implementation=attn)
            model.config.use_cache = False
            self.raw_config = None
            return merge_raw_adapters(model, self.llm.raw_adapters)
        if self.llm.model_type == "from_raw_model":
            model, self.raw_config = _raw_layerwise_model(path, self.llm, yes_id)
        else:
            from bge_ray.models.layerwise_reranker import LayerwiseMiniCPM, minicpm_config
            from bge_ray.models.llm_reranker import load_strict, read_config_dict

            self.raw_config = read_config_dict(path)
            model = load_strict(LayerwiseMiniCPM, path, minicpm_config(self.raw_config), torch.float32,
                                attn_implementation="sdpa")
        return merge_raw_adapters(model, self.llm.raw_adapters)

    def build(self):
        from bge_ray.models.layerwise_reranker import select_layers
        from bge_ray.models.llm_reranker import first_token_id

        path, tok_path = model_paths(self.model)
        tokenizer = load_llm_tokenizer(tok_path, self.model.trust_remote_code, add_eos_token=False)
        yes_id = first_token_id(tokenizer, "Yes")
        backbone = self._base(path, yes_id)
        if self.llm.use_lora:
            backbone = wrap_lora(backbone, self.llm, None if self.layerwise else "CAUSAL_LM")
            if self.layerwise:  # the heads are the scorer: always trained (new when from a raw model)
                for name, p in backbone.named_parameters():
                    if ".lm_head." in f".{name}":
                        p.requires_grad_(True)
            if self.train.gradient_checkpointing and hasattr(backbone, "enable_input_require_grads"):
                backbone.enable_input_require_grads()
        self.tokenizer = tokenizer
        self.pairs = PromptPairBuilder(tokenizer, self.data.query_max_len, self.data.passage_max_len,
                                       self.data.sep_token, self.data.pad_to_multiple_of)
        if self.layerwise:
            base = backbone.get_base_model() if self.llm.use_lora else backbone
            n = base.config.num_hidden_layers
            self.layers = select_layers(self.llm.cutoff_layers or list(base.usable_layers()), base.usable_layers(), n)
            return LayerwiseScorer(backbone, self.layers), tokenizer
        return YesLogitScorer(backbone, yes_id), tokenizer

    def step(self, model, rows, batch, device) -> LossOutput:
        from bge_ray.models.llm_reranker import DEFAULT_PROMPT

        queries, passages, teacher = build_groups(rows, batch, self.group_options())
        group = len(passages) // len(queries)
        prompts = [r.get("prompt") or DEFAULT_PROMPT for r in rows for _ in range(group)]
        ids = self.pairs.ids([q for q in queries for _ in range(group)], passages, prompts)
        t = None if teacher is None else torch.tensor(teacher, dtype=torch.float32, device=device)
        if self.layerwise:
            scores = model(**self.pairs.pad(ids, device, left=False))
            loss = layerwise_loss(scores, group, t)
        else:
            loss = group_loss(model(**self.pairs.pad(ids, device, left=True)), group, t)
        return LossOutput(loss, mean_across_ranks(loss))

    # -- saving -------------------------------------------------------------------------------
    def save(self, model: nn.Module, tokenizer, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        backbone = model.backbone
        if self.layerwise:
            self._save_layerwise(backbone, tokenizer, folder)
            return
        backbone.save_pretrained(folder, safe_serialization=True)  # a PeftModel writes the adapter only
        save_tokenizer(tokenizer, folder)
        if self.llm.use_lora and self.llm.save_merged_lora_model:
            save_merged(backbone, tokenizer, os.path.join(folder, MERGED_DIR))

    def _save_layerwise(self, backbone: nn.Module, tokenizer, folder: str) -> None:
        """The released layerwise layout: MiniCPM config.json with the head settings, one weights file."""
        from safetensors.torch import save_file

        if self.llm.use_lora:
            state = merged_state_dict(backbone)
            trainable = {n: p.detach().to("cpu", copy=True).contiguous()
                         for n, p in backbone.named_parameters() if p.requires_grad}
            save_file(trainable, os.path.join(folder, TRAINABLE_FILE), metadata={"format": "pt"})
            base = backbone.get_base_model()
        else:
            state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in backbone.state_dict().items()}
            base = backbone
        save_file(state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        cfg = dict(self.raw_config)
        cfg.update(start_layer=base.config.start_layer, head_multi=base.config.head_multi,
                   head_type=base.config.head_type, use_cache=False)
        cfg["architectures"] = ["LayerWiseMiniCPMForCausalLM"]
        cfg["model_type"] = "minicpm"
        if not cfg.get("auto_map"):
            cfg.pop("auto_map", None)
        with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2)
        save_tokenizer(tokenizer, folder)

    def load(self, model: nn.Module, folder: str) -> None:
        from .embedder import load_backbone_weights

        backbone = model.backbone
        if not self.llm.use_lora:
            load_backbone_weights(backbone, folder)
        elif self.layerwise:
            from safetensors.torch import load_file

            state = load_file(os.path.join(folder, TRAINABLE_FILE))
            _, unexpected = backbone.load_state_dict(state, strict=False)
            wanted = {n for n, p in backbone.named_parameters() if p.requires_grad}
            if unexpected or wanted - set(state):
                raise RuntimeError(f"{folder}: saved trainable weights do not fit the model "
                                   f"(unexpected {unexpected[:5]}, missing {sorted(wanted - set(state))[:5]})")
        else:
            load_adapter(backbone, folder)
