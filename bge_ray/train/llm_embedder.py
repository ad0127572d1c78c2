"""Decoder-only embedder training (FlagEmbedding's ``decoder_only.base`` and ``decoder_only.icl``):
LoRA through ``peft``, last-token pooling, and the in-context-learning variant that writes few-shot
examples drawn from the batch in front of the queries.

Tokenisation is FlagEmbedding's: the tokenizer is loaded with ``add_eos_token=True`` (the EOS that
last-token pooling reads), pads on the left, and falls back to UNK / EOS for padding. The trained
tokenizer is saved beside the weights, so :class:`bge_ray.models.FlagLLMModel` (which tokenises with
the saved tokenizer, special tokens on) embeds a text exactly as training did.

Saved layout (one folder per checkpoint, and ``output_dir`` at the end):

* with LoRA: ``adapter_config.json`` + ``adapter_model.safetensors`` (peft's format; loads with
  ``PeftModel.from_pretrained(base, folder)`` or ``transformers.AutoModel.from_pretrained(folder)``),
  the tokenizer, ``embedding/embed_tokens.safetensors`` when ``--additional_special_tokens`` grew
  the vocabulary, and with ``--save_merged_lora_model`` a full merged model in ``merged_model/``
  that ``FlagLLMModel`` / ``FlagICLModel`` / ``FlagAutoModel`` load directly;
* without LoRA (``--use_lora False``): the full model and tokenizer at the top, loadable directly.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from .data import SYMMETRIC_TYPES, build_groups
from .embedder import (
    BiEncoder,
    EmbedderTask,
    freeze_unused,
    load_backbone_weights,
    model_paths,
    tokenize_texts,
)
from .lora import (
    MERGED_DIR,
    LoraArgs,
    load_adapter,
    load_llm_tokenizer,
    merge_raw_adapters,
    merged_state_dict,  # noqa: F401  (re-exported for callers of this module)
    save_merged,
    save_tokenizer,
    wrap_lora,
)
from .losses import ContrastiveLoss, LossOutput

logger = logging.getLogger(__name__)

#: FlagEmbedding's query format for decoder-only embedders (its example scripts and bge-en-icl).
LLM_QUERY_INSTRUCTION_FORMAT = "<instruct>{}\n<query>{}"
#: The resized input embeddings when ``additional_special_tokens`` added tokens.
EMBEDDING_FILE = os.path.join("embedding", "embed_tokens.safetensors")
#: FlagEmbedding's ICL dataset keeps the few-shot prefix within ``query_max_len - 512`` tokens.
ICL_PREFIX_RESERVE = 512


@dataclass
class LLMArgs(LoraArgs):
    """FlagEmbedding's DecoderOnlyEmbedder(ICL)ModelArguments and ICL data arguments, plus ``icl``."""

    additional_special_tokens: list[str] | None = None
    only_merge_lora_model: bool = field(default=False, metadata={"help": "do not train: merge the adapter in "
                                                                         f"OUTPUT_DIR into OUTPUT_DIR/{MERGED_DIR}"})
    icl: bool = field(default=False, metadata={"help": "in-context-learning embedder (FlagEmbedding's "
                                                       "decoder_only.icl): few-shot examples in the queries"})
    example_query_max_len: int = 64
    example_passage_max_len: int = 96
    retrieval_use_examples: bool = True
    icl_suffix_str: str = "\nResponse:"

    def __post_init__(self):
        self.icl_suffix_str = self.icl_suffix_str.replace("\\n", "\n")


@dataclass
class LLMEmbedderTask(EmbedderTask):
    """Contrastive fine-tuning of a decoder-only embedder, LoRA by default, last-token pooling."""

    pooling_method: str = "last_token"
    llm: LLMArgs = field(default_factory=LLMArgs)
    resized: bool = field(default=False, init=False, repr=False)  # additional_special_tokens grew the vocabulary

    def __post_init__(self):
        if self.pooling_method != "last_token":
            raise ValueError("decoder-only embedders pool the last token (FlagLLMModel reads it); "
                             f"got pooling_method={self.pooling_method!r}")
        if not self.model.model_name_or_path:
            raise ValueError("--model_name_or_path is required for a decoder-only embedder")

    # -- model --------------------------------------------------------------------------------
    def _load_base(self, path: str, vocab: int) -> torch.nn.Module:
        """The backbone in float32, ``raw_peft`` merged in, embeddings grown to ``vocab`` tokens."""
        from bge_ray.models.loading import load_hf_model

        attn = "flash_attention_2" if self.llm.use_flash_attn else "sdpa"
        backbone = load_hf_model(path, dtype=torch.float32, trust_remote_code=self.model.trust_remote_code,
                                 attn_implementation=attn)
        backbone.config.use_cache = False
        backbone = merge_raw_adapters(backbone, self.llm.raw_adapters)
        if vocab > backbone.get_input_embeddings().weight.shape[0]:
            backbone.resize_token_embeddings(vocab)
            self.resized = True
        return backbone

    def _wrap_lora(self, backbone: torch.nn.Module) -> torch.nn.Module:
        targets = list(self.llm.target_modules)
        if not self.resized and "embed_tokens" in targets:
            targets.remove("embed_tokens")  # FlagEmbedding adapts the embeddings only when it grew them
        return wrap_lora(backbone, self.llm, "FEATURE_EXTRACTION", targets)

    def build(self):
        path, tok_path = model_paths(self.model)
        self.resized = False
        tokenizer = load_llm_tokenizer(tok_path, self.model.trust_remote_code, self.llm.additional_special_tokens)
        backbone = self._load_base(path, len(tokenizer))
        freeze_unused(backbone, self.train.fix_position_embedding)
        if self.llm.use_lora:
            backbone = self._wrap_lora(backbone)
            if self.train.gradient_checkpointing:
                backbone.enable_input_require_grads()
        self.loss = ContrastiveLoss(self.train.temperature, self.train.negatives_cross_device, self.train.kd_loss_type)
        self.tokenizer = tokenizer
        return BiEncoder(backbone, "last_token", self.train.normalize_embeddings, self.train.sub_batch_size), tokenizer

    # -- data ---------------------------------------------------------------------------------
    def texts(self, rows, batch) -> tuple[list[str], list[str], list | None]:
        """(queries, passages, teacher scores) of this worker's slice of global batch ``batch``."""
        if not self.llm.icl:
            return build_groups(rows, batch, self.group_options())
        return self.icl_texts(rows, batch)

    def icl_texts(self, rows, batch):
        """FlagEmbedding's ICL groups: every query gets 0-5 (query, positive) examples of other
        queries of the same batch in front (``retrieval_use_examples``, or always for symmetric
        tasks), then is cut to ``query_max_len`` and ends with ``icl_suffix_str``. Symmetric tasks'
        passages are queries too: instruction-formatted, cut, suffixed. Draws are seeded by
        (seed, batch, first slot): a resumed run rebuilds the same queries."""
        d, a, tok = self.data, self.llm, self.tokenizer
        # Raw texts from the shared group builder (same sampling), formatted here as FlagEmbedding's ICL dataset does.
        raw = dataclasses.replace(self.group_options(), query_instruction_format="{1}",
                                  passage_instruction_for_retrieval=None)
        raw_queries, raw_passages, teacher = build_groups(rows, batch, raw)
        group = len(raw_passages) // len(rows)
        kind = rows[0].get("type")

        def ids(text: str) -> list[int]:
            return tok(text, add_special_tokens=False)["input_ids"]

        suffix_len = len(ids(f"{a.icl_suffix_str}{tok.eos_token or ''}"))
        bos_len = len(ids(tok.bos_token)) if tok.bos_token else 0
        instructions = [r.get("prompt") or d.query_instruction_for_retrieval or "" for r in rows]
        queries = [d.query_instruction_format.format(ins, q) for ins, q in zip(instructions, raw_queries, strict=True)]
        passages: list[str] = []
        for i, ins in enumerate(instructions):
            texts = raw_passages[i * group:(i + 1) * group]
            if kind in SYMMETRIC_TYPES:
                texts = [d.query_instruction_format.format(ins, p) for p in texts]
                cut = tok(texts, max_length=d.passage_max_len - 1 - suffix_len, truncation=True,
                          add_special_tokens=False)["input_ids"]
                texts = [t + a.icl_suffix_str for t in tok.batch_decode(cut)]
            elif d.passage_instruction_for_retrieval is not None:
                texts = [d.passage_instruction_format.format(d.passage_instruction_for_retrieval, p) for p in texts]
            passages.extend(texts)
        pairs: list[tuple[str, str]] = []
        if a.retrieval_use_examples or kind in (*SYMMETRIC_TYPES, "symmetric_class"):
            # FlagEmbedding pairs a clustering query with its 'category'; our rows carry the positive.
            pairs = [(tok.decode(ids(q)[:a.example_query_max_len]),
                      tok.decode(ids(raw_passages[i * group])[:a.example_passage_max_len]))
                     for i, q in enumerate(queries)]
        rng = np.random.default_rng([self.train.seed, batch, int(rows[0]["slot"]), 1])
        budget = d.query_max_len - bos_len - suffix_len
        out = []
        for i, query in enumerate(queries):
            choices = int(rng.integers(6))
            prefix = ""
            if choices > 0 and pairs:
                picked = [int(j) for j in rng.choice(len(pairs), min(choices + 1, len(pairs)), replace=False)]
                if i in picked:
                    picked.remove(i)
                for j in picked[:choices]:
                    candidate = prefix + a.icl_suffix_str.join(pairs[j]) + "\n\n"
                    if len(tok(candidate)["input_ids"]) > d.query_max_len - ICL_PREFIX_RESERVE:
                        break
                    prefix = candidate
            cut = tok(prefix + query, max_length=max(budget, 1), truncation=True, add_special_tokens=False)["input_ids"]
            out.append(tok.decode(cut) + a.icl_suffix_str)
        return out, passages, teacher

    def step(self, model, rows, batch, device) -> LossOutput:
        queries, passages, teacher = self.texts(rows, batch)
        d = self.data
        q = tokenize_texts(self.tokenizer, queries, d.query_max_len, device, d.pad_to_multiple_of)
        p = tokenize_texts(self.tokenizer, passages, d.passage_max_len, device, d.pad_to_multiple_of)
        t = None if teacher is None else torch.tensor(teacher, dtype=torch.float32, device=device)
        q_reps, p_reps = model(q, p)
        return self.loss(q_reps, p_reps, t, no_in_batch_neg=bool(rows[0]["no_in_batch_neg"]))

    # -- saving -------------------------------------------------------------------------------
    def save(self, model: BiEncoder, tokenizer, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        backbone = model.backbone
        backbone.save_pretrained(folder, safe_serialization=True)  # a PeftModel writes the adapter only
        save_tokenizer(tokenizer, folder)
        if not self.llm.use_lora:
            return
        if self.resized:
            from safetensors.torch import save_file

            os.makedirs(os.path.join(folder, "embedding"), exist_ok=True)
            weight = backbone.get_input_embeddings().weight.detach().to("cpu", copy=True).contiguous()
            save_file({"weight": weight}, os.path.join(folder, EMBEDDING_FILE))
        if self.llm.save_merged_lora_model:
            save_merged(backbone, tokenizer, os.path.join(folder, MERGED_DIR))

    def load(self, model: BiEncoder, folder: str) -> None:
        if not self.llm.use_lora:
            load_backbone_weights(model.backbone, folder)
            return
        from safetensors.torch import load_file

        emb = os.path.join(folder, EMBEDDING_FILE)
        if os.path.exists(emb):
            model.backbone.get_input_embeddings().weight.data.copy_(load_file(emb)["weight"])
        load_adapter(model.backbone, folder)

    def merge_saved(self, folder: str, out: str | None = None) -> str:
        """``--only_merge_lora_model``: fold the adapter saved in ``folder`` into the base model and
        write the full model to ``out`` (default ``folder/merged_model``)."""
        from peft import PeftModel
        from safetensors.torch import load_file

        from bge_ray.models.loading import load_tokenizer

        if not os.path.exists(os.path.join(folder, "adapter_config.json")):
            raise FileNotFoundError(f"{folder}: no adapter_config.json (a LoRA run's output_dir) to merge")
        tokenizer = load_tokenizer(folder, trust_remote_code=self.model.trust_remote_code)
        path, _ = model_paths(self.model)
        backbone = self._load_base(path, len(tokenizer))
        emb = os.path.join(folder, EMBEDDING_FILE)
        if os.path.exists(emb):
            backbone.get_input_embeddings().weight.data.copy_(load_file(emb)["weight"])
        peft_model = PeftModel.from_pretrained(backbone, folder)
        out = out or os.path.join(folder, MERGED_DIR)
        save_merged(peft_model, tokenizer, out)
        return out
