"""RetroMAE pre-training (Xiao et al. 2022) on the shared Ray Train loop, after FlagEmbedding's
``research/baai_general_embedding/retromae_pretrain``.

An encoder (``BertForMaskedLM``) reads the text with whole words masked at
``encoder_mlm_probability`` (0.3; masked tokens 80% ``[MASK]``, 10% random, 10% kept) and is trained
with MLM. Its last-layer ``[CLS]`` state drives a one-layer decoder with *enhanced decoding*:

* keys and values: ``[CLS state, embeddings(token_1..token_n)]`` of the *unmasked* text, through the
  encoder's own (shared) embedding layer;
* queries: ``embeddings(inputs_embeds=CLS state)`` at every position, i.e. LayerNorm(CLS state +
  position embedding + token-type embedding);
* each query row ``i`` attends to the positions left visible by one of ``min(len, 128)`` whole-word
  masks sampled at ``decoder_mlm_probability`` (0.5), and never to itself;
* every non-special token is a decoder target, predicted by the encoder's (shared) MLM head.

The loss is encoder MLM loss + decoder loss. :meth:`RetroMAETask.save` writes the encoder as an
ordinary BERT checkpoint (``BertForMaskedLM`` weights, as FlagEmbedding's ``encoder_model``) with its
tokenizer and a cls-pooling sentence-transformers config, so :class:`bge_ray.models.FlagModel` and
the fine-tuning job load it as it is; the decoder layer goes to ``retromae_decoder/`` for resumption.

Input: jsonl files with a ``text`` field per line (FlagEmbedding's pre-training format), or folders
of them. Batches are planned with :func:`bge_ray.train.data.plan_training` (all files pooled and
shuffled, as FlagEmbedding concatenates them); masks are sampled per example from (seed, batch,
slot), so a resumed step is redone identically.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bge_ray.io.training_data import TrainingDataError

from .arguments import ModelArgs, RayArgs, TrainArgs
from .losses import LossOutput, mean_across_ranks

logger = logging.getLogger(__name__)

DECODER_DIR = "retromae_decoder"
DECODER_FILE = "c_head.safetensors"
MAX_MASK_SET = 128  # FlagEmbedding samples min(len, 128) decoder masks per text
MAX_PREDICTIONS = 512  # HF DataCollatorForWholeWordMask's cap on masked tokens per text


@dataclass
class RetroMAEDataArgs:
    """FlagEmbedding's retromae_pretrain DataTrainingArguments (``train_data`` may name several)."""

    train_data: list[str] = field(default_factory=list,
                                  metadata={"help": "jsonl files with a 'text' field per line, or folders of them"})
    max_seq_length: int = 512
    encoder_mlm_probability: float = field(default=0.3, metadata={"help": "mask ratio for the encoder"})
    decoder_mlm_probability: float = field(default=0.5, metadata={"help": "mask ratio for the decoder"})

    def __post_init__(self):
        for name in ("encoder_mlm_probability", "decoder_mlm_probability"):
            p = getattr(self, name)
            if not 0.0 < p < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {p}")
        if self.max_seq_length < 3:
            raise ValueError(f"max_seq_length must be at least 3, got {self.max_seq_length}")


# -- data ---------------------------------------------------------------------------------------------
def read_pretraining_texts(path: str) -> list[dict]:
    """``{"text": str}`` lines of one jsonl file as ``{"text", "file", "line"}``; other fields are
    ignored, blank lines and empty texts skipped; errors name file and line."""
    from bge_ray.io.training_data import json_lines

    rows, empty = [], 0
    for lineno, rec in json_lines(path):
        if "text" not in rec:
            raise TrainingDataError(f"{path}:{lineno}: missing 'text' (fields: {sorted(rec)})")
        text = rec["text"]
        if not isinstance(text, str):
            raise TrainingDataError(f"{path}:{lineno}: 'text' must be a string, got {type(text).__name__}")
        if not text.strip():
            empty += 1
            continue
        rows.append({"text": text, "file": path, "line": lineno})
    if empty:
        logger.warning("%s: skipped %d empty text(s)", path, empty)
    return rows


def load_pretraining_corpus(train_data: Sequence[str], per_device_batch_size: int):
    """(example table, sources for :func:`plan_training`): one source per file, read on the driver."""
    from .data import Source, list_sources

    table: list[dict] = []
    sources = []
    for spec in list_sources(train_data):
        for path in spec.files:
            rows = read_pretraining_texts(path)
            if rows:
                sources.append(Source(spec, list(range(len(table), len(table) + len(rows))), per_device_batch_size))
                table.extend(rows)
    if not table:
        raise TrainingDataError(f"no pre-training texts in {list(train_data)}")
    return table, sources


# -- masking ------------------------------------------------------------------------------------------
def whole_word_masks(word_of_token: np.ndarray, mlm_probability: float, k: int, rng: np.random.Generator) -> np.ndarray:
    """``k`` independent whole-word masks ``[k, n]`` (HF ``DataCollatorForWholeWordMask._whole_word_mask``):
    words in random order are taken whole while they fit, until ``round(n * p)`` tokens are covered
    (``n`` counts the special tokens, as HF does); tokens with word ``-1`` (special) are never taken."""
    n = len(word_of_token)
    real = word_of_token >= 0
    out = np.zeros((k, n), dtype=bool)
    if not real.any():
        return out
    lens = np.bincount(word_of_token[real])
    num = min(MAX_PREDICTIONS, max(1, int(round(n * mlm_probability))))
    perm = rng.permuted(np.broadcast_to(np.arange(len(lens)), (k, len(lens))), axis=1)
    plen = lens[perm]
    # Greedy in shuffled order: take a word while the covered count is short of ``num`` and the word
    # fits. Up to the first word that overshoots, that is the running sum's prefix; after it, only a
    # few rows are still short, so the word-by-word loop starts there.
    total = np.cumsum(plen, axis=1)
    take = total <= num
    covered = np.where(take, total, 0).max(axis=1)
    for j in range(int(take.sum(axis=1).min()), perm.shape[1]):
        short = covered < num
        if not short.any():
            break
        ok = short & ~take[:, j] & (covered + plen[:, j] <= num)
        take[:, j] |= ok
        covered += plen[:, j] * ok
    chosen = np.zeros(perm.shape, dtype=bool)
    np.put_along_axis(chosen, perm, take, axis=1)
    out[:, real] = chosen[:, word_of_token[real]]
    return out


def _words_from_pieces(tokens: list[str], special: list[int]) -> list[int | None]:
    """Word index per token for slow tokenizers: WordPiece ``##`` pieces join the previous word."""
    words: list[int | None] = []
    w = -1
    for tok, sp in zip(tokens, special, strict=True):
        if sp:
            words.append(None)
            continue
        if not (tok.startswith("##") and w >= 0):
            w += 1
        words.append(w)
    return words


class RetroMAEExample(NamedTuple):
    """Per-example arrays before padding."""

    input_ids: np.ndarray
    special: np.ndarray  # bool
    encoder_mask: np.ndarray  # bool [n]: encoder MLM targets
    decoder_attention: np.ndarray  # bool [n, n]: row i may attend to column j


class RetroMAECollator:
    """Texts -> FlagEmbedding's RetroMAE batch (``encoder_input_ids``, ``encoder_attention_mask``,
    ``encoder_labels``, ``decoder_input_ids``, ``decoder_attention_mask`` [B, L, L], ``decoder_labels``).

    Randomness comes from ``numpy.random.default_rng([seed, *key])`` per example, so a batch is a
    function of its texts and keys."""

    def __init__(self, tokenizer, max_seq_length: int = 512, encoder_mlm_probability: float = 0.3,
                 decoder_mlm_probability: float = 0.5, seed: int = 42, mask_replace_prob: float = 0.8,
                 random_replace_prob: float = 0.1):
        if tokenizer.mask_token_id is None:
            raise ValueError("RetroMAE needs a tokenizer with a mask token")
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self.encoder_mlm_probability = encoder_mlm_probability
        self.decoder_mlm_probability = decoder_mlm_probability
        self.seed = seed
        self.mask_replace_prob = mask_replace_prob
        self.random_replace_prob = random_replace_prob
        self.vocab_size = len(tokenizer)

    def _encode(self, texts: Sequence[str]) -> list[tuple[list[int], list[int], list[int | None]]]:
        enc = self.tokenizer(list(texts), truncation=True, max_length=self.max_seq_length,
                             return_special_tokens_mask=True, return_token_type_ids=False, return_attention_mask=False)
        out = []
        for i, ids in enumerate(enc["input_ids"]):
            special = enc["special_tokens_mask"][i]
            if self.tokenizer.is_fast:
                words = [None if s else w for w, s in zip(enc.word_ids(i), special, strict=True)]
            else:
                words = _words_from_pieces(self.tokenizer.convert_ids_to_tokens(ids), special)
            out.append((ids, special, words))
        return out

    def example(self, ids: list[int], special: list[int], words: list[int | None], rng: np.random.Generator) -> RetroMAEExample:
        n = len(ids)
        w = np.array([-1 if x is None else x for x in words], dtype=np.int64)
        if (w >= 0).any():  # word ids as 0..W-1 (truncation and specials leave gaps)
            _, w[w >= 0] = np.unique(w[w >= 0], return_inverse=True)
        enc_mask = whole_word_masks(w, self.encoder_mlm_probability, 1, rng)[0]
        k = min(n, MAX_MASK_SET)
        mask_set = whole_word_masks(w, self.decoder_mlm_probability, k, rng)
        hidden = mask_set[rng.integers(k, size=n)]  # row i: one sampled mask ...
        hidden[np.arange(n), np.arange(n)] = True  # ... plus position i itself
        return RetroMAEExample(np.asarray(ids, dtype=np.int64), np.asarray(special, dtype=bool), enc_mask, ~hidden)

    def __call__(self, texts: Sequence[str], keys: Sequence[Sequence[int]] | None = None) -> dict[str, torch.Tensor]:
        keys = keys if keys is not None else [(i,) for i in range(len(texts))]
        encoded = self._encode(texts)
        b, length = len(encoded), max(len(e[0]) for e in encoded)
        pad = self.tokenizer.pad_token_id
        enc_ids = np.full((b, length), pad, dtype=np.int64)
        dec_ids = np.full((b, length), pad, dtype=np.int64)
        attn = np.zeros((b, length), dtype=np.int64)
        enc_labels = np.full((b, length), -100, dtype=np.int64)
        dec_labels = np.full((b, length), -100, dtype=np.int64)
        dec_attn = np.zeros((b, length, length), dtype=np.int64)
        for r, ((ids, special, words), key) in enumerate(zip(encoded, keys, strict=True)):
            rng = np.random.default_rng([self.seed, *[int(x) for x in key]])
            ex = self.example(ids, special, words, rng)
            n = len(ids)
            masked = ex.encoder_mask
            u = rng.random(n)
            replace = masked & (u < self.mask_replace_prob)
            randomize = masked & ~replace & (u < self.mask_replace_prob + self.random_replace_prob)
            inputs = ex.input_ids.copy()
            inputs[replace] = self.tokenizer.mask_token_id
            inputs[randomize] = rng.integers(self.vocab_size, size=int(randomize.sum()))
            enc_ids[r, :n] = inputs
            enc_labels[r, :n] = np.where(masked, ex.input_ids, -100)
            dec_ids[r, :n] = ex.input_ids
            dec_labels[r, :n] = np.where(ex.special, -100, ex.input_ids)
            attn[r, :n] = 1
            dec_attn[r, :n, :n] = ex.decoder_attention
        t = torch.from_numpy
        return {"encoder_input_ids": t(enc_ids), "encoder_attention_mask": t(attn), "encoder_labels": t(enc_labels),
                "decoder_input_ids": t(dec_ids), "decoder_attention_mask": t(dec_attn),
                "decoder_labels": t(dec_labels)}


# -- model --------------------------------------------------------------------------------------------
class _DecoderSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(f"hidden size {config.hidden_size} is not a multiple of {config.num_attention_heads} heads")
        self.num_heads = config.num_attention_heads
        self.head_size = config.hidden_size // config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:2], self.num_heads, self.head_size).transpose(1, 2)

    def forward(self, query, key, value, visible):
        q, k, v = self._heads(self.query(query)), self._heads(self.key(key)), self._heads(self.value(value))
        scores = q @ k.transpose(-1, -2) / (self.head_size ** 0.5)
        # The dtype's most negative value, not -inf: a padding row that sees nothing stays finite (fp16 too).
        scores = scores.masked_fill(~visible, torch.finfo(scores.dtype).min)
        probs = self.dropout(torch.softmax(scores, dim=-1))
        ctx = (probs @ v).transpose(1, 2).contiguous()
        return ctx.view(*ctx.shape[:2], -1)


class _DecoderAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        from transformers.models.bert.modeling_bert import BertSelfOutput

        self.self = _DecoderSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, query, key, value, visible):
        return self.output(self.self(query, key, value, visible), query)


class EnhancedDecoderLayer(nn.Module):
    """FlagEmbedding's ``BertLayerForDecoder``: a BERT layer whose attention takes query, key and
    value streams apart; the residual runs along the query stream. Parameter names match its ``c_head``."""

    def __init__(self, config):
        super().__init__()
        from transformers.models.bert.modeling_bert import BertIntermediate, BertOutput

        self.attention = _DecoderAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, query, key, value, visible):
        """``visible`` [B, 1, L, L] bool: query row i may attend to key column j."""
        attended = self.attention(query, key, value, visible)
        return self.output(self.intermediate(attended), attended)


class RetroMAEOutput(NamedTuple):
    loss: torch.Tensor
    encoder_loss: torch.Tensor
    decoder_loss: torch.Tensor


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over labelled positions (0, still attached to the graph, when there are none)."""
    if not bool((labels != -100).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), labels.view(-1), ignore_index=-100)


class RetroMAEForPretraining(nn.Module):
    """Encoder ``lm`` (a ``*ForMaskedLM``) plus the one-layer enhanced decoder ``c_head``; the decoder
    shares the encoder's embeddings and MLM head (FlagEmbedding's layout and parameter names)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        if not (hasattr(lm, "cls") or hasattr(lm, "lm_head")):
            raise ValueError(f"{type(lm).__name__} has no MLM head (cls / lm_head): load it as a *ForMaskedLM model")
        self.c_head = EnhancedDecoderLayer(lm.config)
        self.c_head.apply(lm._init_weights)

    @property
    def decoder_embeddings(self) -> nn.Module:
        return self.lm.base_model.embeddings

    def mlm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.lm.cls if hasattr(self.lm, "cls") else self.lm.lm_head
        return head(hidden)

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        self.lm.gradient_checkpointing_enable(**kwargs)

    def decode(self, cls_hidden: torch.Tensor, decoder_input_ids: torch.Tensor,
               decoder_attention_mask: torch.Tensor) -> torch.Tensor:
        """Enhanced decoding: the decoder's hidden states [B, L, D] from the sentence embedding [B, 1, D]."""
        emb = self.decoder_embeddings
        tokens = emb(input_ids=decoder_input_ids)
        context = torch.cat([cls_hidden, tokens[:, 1:]], dim=1)
        query = emb(inputs_embeds=cls_hidden.expand(-1, decoder_input_ids.size(1), -1))
        return self.c_head(query, context, context, decoder_attention_mask[:, None].bool())

    def forward(self, encoder_input_ids, encoder_attention_mask, encoder_labels, decoder_input_ids,
                decoder_attention_mask, decoder_labels) -> RetroMAEOutput:
        out = self.lm(input_ids=encoder_input_ids, attention_mask=encoder_attention_mask, output_hidden_states=True,
                      return_dict=True)
        encoder_loss = mlm_loss(out.logits, encoder_labels)
        cls_hidden = out.hidden_states[-1][:, :1]
        hidden = self.decode(cls_hidden, decoder_input_ids, decoder_attention_mask)
        decoder_loss = mlm_loss(self.mlm_head(hidden), decoder_labels)
        return RetroMAEOutput(encoder_loss + decoder_loss, encoder_loss.detach(), decoder_loss.detach())


# -- task for the shared loop ---------------------------------------------------------------------------
def _load_safetensors(path: str) -> dict:
    from safetensors.torch import load_file

    return load_file(path)


def load_lm_weights(lm: nn.Module, folder: str) -> None:
    """``save_pretrained`` weights back into a ``*ForMaskedLM`` model."""
    from .embedder import load_backbone_weights

    load_backbone_weights(lm, folder)


@dataclass
class RetroMAETask:
    """RetroMAE pre-training for :func:`bge_ray.train.loop.train_loop_per_worker`."""

    model: ModelArgs
    data: RetroMAEDataArgs
    train: TrainArgs

    def collator(self, tokenizer) -> RetroMAECollator:
        return RetroMAECollator(tokenizer, self.data.max_seq_length, self.data.encoder_mlm_probability,
                                self.data.decoder_mlm_probability, seed=self.train.seed)

    def build(self):
        from transformers import AutoConfig, AutoModelForMaskedLM

        from bge_ray.models.loading import load_tokenizer, resolve_model_path

        from .embedder import load_backbone

        # Same initial weights on every rank and every run (the decoder, a missing MLM head), without
        # touching the loop's per-rank random stream.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.train.seed)
            if self.model.config_name:  # FlagEmbedding: a config instead of weights trains from scratch
                config = AutoConfig.from_pretrained(resolve_model_path(self.model.config_name, self.model.cache_dir),
                                                    trust_remote_code=self.model.trust_remote_code)
                lm = AutoModelForMaskedLM.from_config(config, trust_remote_code=self.model.trust_remote_code)
                tok_path = resolve_model_path(self.model.tokenizer_name or self.model.model_name_or_path,
                                              self.model.cache_dir)
                tokenizer = load_tokenizer(tok_path, trust_remote_code=self.model.trust_remote_code)
            else:
                lm, tokenizer = load_backbone(self.model, auto_class=AutoModelForMaskedLM)
            model = RetroMAEForPretraining(lm)
        self.tokenizer = tokenizer
        self._collator = self.collator(tokenizer)
        return model, tokenizer

    def step(self, model, rows, batch, device) -> LossOutput:
        feats = self._collator([r["text"] for r in rows], [(int(r["batch"]), int(r["slot"])) for r in rows])
        out = model(**{k: v.to(device) for k, v in feats.items()})
        return LossOutput(out.loss, mean_across_ranks(out.loss))

    def save(self, model: RetroMAEForPretraining, tokenizer, folder: str) -> None:
        from safetensors.torch import save_file

        from .embedder import write_sentence_transformers_files

        os.makedirs(folder, exist_ok=True)
        model.lm.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        write_sentence_transformers_files(folder, "cls", True, self.data.max_seq_length, model.lm.config.hidden_size)
        os.makedirs(os.path.join(folder, DECODER_DIR), exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in model.c_head.state_dict().items()}
        save_file(state, os.path.join(folder, DECODER_DIR, DECODER_FILE))

    def load(self, model: RetroMAEForPretraining, folder: str) -> None:
        load_lm_weights(model.lm, folder)
        model.c_head.load_state_dict(_load_safetensors(os.path.join(folder, DECODER_DIR, DECODER_FILE)))


# -- driver -------------------------------------------------------------------------------------------
def run_pretraining(task: RetroMAETask, model_args: ModelArgs, data_args: RetroMAEDataArgs, train_args: TrainArgs,
                    ray_args: RayArgs, debug_grad_file: str | None = None, worker_env: dict | None = None):
    """:func:`bge_ray.train.runner.run_training` on a ``{"text"}`` corpus: the final encoder goes to ``output_dir``."""
    from .runner import run_training

    return run_training(task, model_args, data_args, train_args, ray_args, debug_grad_file=debug_grad_file,
                        worker_env=worker_env,
                        read_data=lambda: load_pretraining_corpus(data_args.train_data,
                                                                  train_args.per_device_train_batch_size))
