"""``LightWeightFlagLLMReranker``: bge-reranker-v2.5-gemma2-lightweight.

Gemma2 with score heads at layers ``start_layer, start_layer + layer_sep, ..., num_hidden_layers``
and two ways to save compute:

- ``cutoff_layers``: stop at a lower layer. As in FlagEmbedding, the i-th requested layer
  (ascending) is scored by ``lm_head[i]``, whatever its number, and the score goes through
  Gemma2's final logit soft-capping.
- ``compress_ratio`` / ``compress_layers``: before each listed layer (never layer 0) every run of
  ``compress_ratio`` passage tokens is replaced by its mean, while the query part (bos, query,
  separator) and the trailing separator plus prompt are kept; positions are renumbered from 0.

transformers 5 runs Gemma2 itself; FlagEmbedding's copy of this model targets 4.4x. Here
transformers' Gemma2 modules (same weight names) run under our own layer loop, with eager
attention because Gemma2's attention-logit soft-capping has no SDPA kernel.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import Gemma2Config
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.models.gemma2.modeling_gemma2 import Gemma2Model, Gemma2PreTrainedModel

from .encode import scatter_rows
from .layerwise_reranker import NO_CACHE, LayerWiseFlagLLMReranker, ScoreHead
from .llm_reranker import SEGMENT_PROMPT, SEGMENT_QUERY, last_token_index, load_strict, read_config_dict

logger = logging.getLogger(__name__)

#: The question bge-reranker-v2.5-gemma2-lightweight was trained with.
LIGHTWEIGHT_PROMPT = "Predict whether passage B contains an answer to query A."

# Keys of the released config.json that describe the remote code or generation, not the model.
_NOT_MODEL_KEYS = (
    "architectures", "auto_map", "model_type", "_name_or_path", "transformers_version", "torch_dtype",
    "cache_implementation", "sliding_window_size",
)


def cost_wise_gemma_config(raw: dict) -> Gemma2Config:
    """A Gemma2 config carrying the cost-wise settings of a released ``config.json`` dict."""
    if not raw.get("layer_wise", False):
        raise ValueError(
            "config.json has layer_wise=false: this checkpoint has a vocabulary head, not per-layer score "
            "heads; load it with FlagLLMReranker instead"
        )
    cfg = {k: v for k, v in raw.items() if k not in _NOT_MODEL_KEYS}
    if "sliding_window" not in cfg and "sliding_window_size" in raw:
        cfg["sliding_window"] = raw["sliding_window_size"]
    cfg.setdefault("start_layer", 28)
    cfg.setdefault("layer_sep", 28)
    # The heads are separate per layer; nothing is tied to the embeddings.
    cfg["tie_word_embeddings"] = False
    return Gemma2Config(**cfg)


def compress_passages(
    hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    query_lengths: torch.Tensor,
    prompt_lengths: torch.Tensor,
    ratio: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean-pool each run of ``ratio`` passage tokens of a right-padded batch into one token.

    Row layout: ``query_lengths`` tokens, the passage, ``prompt_lengths`` tokens, padding. A last
    partial run is averaged over the tokens it has. Returns the new hidden states and 2-D mask.
    """
    batch, _, size = hidden.shape
    device = hidden.device
    passage = (attention_mask.sum(dim=1) - query_lengths - prompt_lengths).clamp(min=0)
    kept = (passage + ratio - 1) // ratio
    new_lengths = query_lengths + kept + prompt_lengths
    width = int(new_lengths.max())
    t = torch.arange(width, device=device).unsqueeze(0)
    q, k, p = query_lengths[:, None], kept[:, None], passage[:, None]
    in_query, in_passage = t < q, (t >= q) & (t < q + k)
    in_prompt = (t >= q + k) & (t < new_lengths[:, None])
    # Every new slot gathers `ratio` source tokens; outside the passage only the first one counts.
    run_start = (t - q) * ratio
    first = torch.where(in_query, t, torch.where(in_passage, q + run_start, t - k + p))
    offsets = torch.arange(ratio, device=device)
    source = first[..., None] + offsets
    take = torch.where(
        in_passage[..., None], run_start[..., None] + offsets < p[..., None], offsets == 0
    ) & (in_query | in_passage | in_prompt)[..., None]
    weights = take.to(hidden.dtype)
    weights = weights / weights.sum(dim=-1, keepdim=True).clamp(min=1)
    source = torch.where(take, source, torch.zeros_like(source))
    gathered = hidden.gather(1, source.reshape(batch, -1, 1).expand(-1, -1, size)).view(batch, width, ratio, size)
    new_hidden = (gathered * weights[..., None]).sum(dim=2)
    return new_hidden, (t < new_lengths[:, None]).to(attention_mask.dtype)


class LightweightGemma2(Gemma2PreTrainedModel):
    """Gemma2 decoder with score heads every ``layer_sep`` layers (weights named as released)."""

    def __init__(self, config: Gemma2Config):
        super().__init__(config)
        self.model = Gemma2Model(config)
        self.lm_head = nn.ModuleList([ScoreHead(config.hidden_size) for _ in self.usable_layers()])
        self.post_init()

    def get_output_embeddings(self):
        return None  # score heads, not a vocabulary projection: nothing to tie or resize

    def usable_layers(self) -> range:
        return range(self.config.start_layer, self.config.num_hidden_layers + 1, self.config.layer_sep)

    def _attention_inputs(self, hidden: torch.Tensor, attention_mask: torch.Tensor):
        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        args = dict(
            config=self.config, inputs_embeds=hidden, attention_mask=attention_mask, position_ids=positions,
            **NO_CACHE,
        )
        masks = {
            "full_attention": create_causal_mask(**args),
            "sliding_attention": create_sliding_window_causal_mask(**args),
        }
        return masks, self.model.rotary_emb(hidden, positions)

    def layer_scores(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        segment_ids: torch.Tensor,
        layers: list[int],
        compress_layers: Iterable[int] = (),
        compress_ratio: int = 1,
    ) -> torch.Tensor:
        """Scores ``(batch, len(layers))`` at each row's last token of a right-padded batch."""
        cfg, base = self.config, self.model
        query_lengths = (segment_ids == SEGMENT_QUERY).sum(dim=1)
        prompt_lengths = (segment_ids == SEGMENT_PROMPT).sum(dim=1)
        compress = {i for i in compress_layers if i != 0} if compress_ratio > 1 else set()
        hidden = base.embed_tokens(input_ids)  # scales by sqrt(hidden_size) itself
        masks, rope = self._attention_inputs(hidden, attention_mask)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        picked: list[torch.Tensor] = []
        top = max(layers)
        for idx in range(top + 1):
            if idx in layers:
                picked.append(hidden[rows, last_token_index(attention_mask)])
            if idx == top:
                break  # layers above the highest cutoff are never run
            if idx in compress:
                hidden, attention_mask = compress_passages(
                    hidden, attention_mask, query_lengths, prompt_lengths, compress_ratio
                )
                masks, rope = self._attention_inputs(hidden, attention_mask)
            hidden = base.layers[idx](
                hidden, position_embeddings=rope, attention_mask=masks[cfg.layer_types[idx]]
            )
        # Heads by position among the requested layers, as FlagEmbedding's lightweight model does.
        scores = torch.cat([self.lm_head[i](base.norm(h)) for i, h in enumerate(picked)], dim=-1)
        cap = cfg.final_logit_softcapping
        return torch.tanh(scores / cap) * cap if cap else scores


def _layer_list(value, what: str) -> list[int]:
    values = [value] if isinstance(value, (int, np.integer)) else list(value)
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"{what} must hold layer numbers (ints), got {v!r}")
    return [int(v) for v in values]


class LightWeightFlagLLMReranker(LayerWiseFlagLLMReranker):
    """bge-reranker-v2.5-gemma2-lightweight with FlagEmbedding 1.4's API."""

    default_prompt = LIGHTWEIGHT_PROMPT
    # FlagEmbedding's lightweight reranker keeps fp32 unless asked for fp16 / bf16.
    half_by_default = False

    def __init__(
        self,
        model_name_or_path: str,
        peft_path: str | None = None,
        use_fp16: bool = False,
        use_bf16: bool = False,
        query_instruction_for_rerank: str | None = "A: ",
        query_instruction_format: str = "{}{}",
        passage_instruction_for_rerank: str | None = "B: ",
        passage_instruction_format: str = "{}{}",
        cache_dir: str | None = None,
        trust_remote_code: bool = False,
        devices: str | int | list | None = None,
        cutoff_layers: int | list[int] | None = None,
        compress_layers: int | list[int] | None = None,
        compress_ratio: int = 1,
        prompt: str | None = None,
        batch_size: int = 128,
        query_max_length: int | None = None,
        max_length: int = 512,
        normalize: bool = False,
        **kwargs: Any,
    ):
        self.compress_layers = [8] if compress_layers is None else _layer_list(compress_layers, "compress_layers")
        self.compress_ratio = self._check_ratio(compress_ratio)
        super().__init__(
            model_name_or_path,
            peft_path=peft_path,
            use_fp16=use_fp16,
            use_bf16=use_bf16,
            query_instruction_for_rerank=query_instruction_for_rerank,
            query_instruction_format=query_instruction_format,
            passage_instruction_for_rerank=passage_instruction_for_rerank,
            passage_instruction_format=passage_instruction_format,
            cache_dir=cache_dir,
            trust_remote_code=trust_remote_code,
            devices=devices,
            cutoff_layers=cutoff_layers,
            prompt=prompt,
            batch_size=batch_size,
            query_max_length=query_max_length,
            max_length=max_length,
            normalize=normalize,
            **kwargs,
        )

    @staticmethod
    def _check_ratio(ratio) -> int:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, np.integer)) or ratio < 1:
            raise ValueError(f"compress_ratio must be a positive int (1 = no compression), got {ratio!r}")
        return int(ratio)

    def _load_base_model(self, **kwargs):
        config = cost_wise_gemma_config(read_config_dict(self.model_path))
        return load_strict(
            LightweightGemma2, self.model_path, config, self.dtype, attn_implementation="eager", **kwargs
        )

    def compute_score(self, sentence_pairs, batch_size=None, query_max_length=None, max_length=None,
                      cutoff_layers=None, compress_layer=None, compress_layers=None, compress_ratio=None,
                      prompt=None, normalize=None, **kwargs):
        """As :meth:`FlagLLMReranker.compute_score`, with per-call ``cutoff_layers`` and compression.

        ``compress_layer`` is FlagEmbedding's deprecated spelling of ``compress_layers``.
        """
        if compress_layer is not None:
            logger.warning("compress_layer is deprecated; use compress_layers")
            compress_layers = compress_layer
        return super().compute_score(
            sentence_pairs, batch_size=batch_size, query_max_length=query_max_length, max_length=max_length,
            cutoff_layers=cutoff_layers, prompt=prompt, normalize=normalize,
            compress_layers=compress_layers, compress_ratio=compress_ratio, **kwargs,
        )

    def _score(self, pairs, batch_size, query_max_length, max_length, prompt=None, cutoff_layers=None,
               compress_layers=None, compress_ratio=None, **kwargs):
        layers = self._select(cutoff_layers)
        squeeze = self.compress_layers if compress_layers is None else _layer_list(compress_layers, "compress_layers")
        ratio = self.compress_ratio if compress_ratio is None else self._check_ratio(compress_ratio)
        features = self._prompt_features(pairs, query_max_length, max_length, prompt, with_segments=True, **kwargs)

        def make_forward(model, device):
            def forward(batch):
                return model.layer_scores(
                    batch["input_ids"], batch["attention_mask"], batch["segment_ids"], layers, squeeze, ratio
                ).float()

            return forward

        # Compression needs the passage at the same offset in every row: right padding only.
        results = self._run(features, make_forward, batch_size, padding_side="right", desc="Compute Scores")
        return scatter_rows(results, len(features)).numpy().T.astype(np.float64)
