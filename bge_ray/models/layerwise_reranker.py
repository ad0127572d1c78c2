"""``LayerWiseFlagLLMReranker``: bge-reranker-v2-minicpm-layerwise, with scores from chosen layers.

The checkpoint is MiniCPM with one small score head per layer from ``start_layer`` on: the score
at layer k is ``lm_head[k - start_layer]`` applied to the final-normed hidden state after k
decoder layers, at the prompt's last token. Stopping at a lower layer trades accuracy for speed.

MiniCPM is Llama's decoder block with three scalars from its config: embeddings times
``scale_emb``, each residual branch times ``scale_depth / sqrt(num_hidden_layers)``, and (for
vocabulary heads only) hidden states divided by ``hidden_size / dim_model_base``. transformers 5
has no MiniCPM of this generation and FlagEmbedding's copy targets 4.4x, so the model here is
transformers' Llama modules (same weight names, same math) driven by our own layer loop.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.utils.checkpoint
from torch import nn
from transformers import LlamaConfig
from transformers.masking_utils import create_causal_mask
from transformers.models.llama.modeling_llama import LlamaModel, LlamaPreTrainedModel

from .encode import scatter_rows
from .llm_reranker import FlagLLMReranker, last_token_index, load_strict, read_config_dict

# The mask builders' `past_key_values` argument is `cache` from transformers 5.24 (the old name warns
# there and goes in 5.40): say "no cache" under the name this version takes.
NO_CACHE = {("cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"): None}

logger = logging.getLogger(__name__)

# Keys of the released config.json that describe the remote code, not the model.
_NOT_MODEL_KEYS = ("architectures", "auto_map", "model_type", "_name_or_path", "transformers_version", "torch_dtype")
_MINICPM_DEFAULTS = {
    "scale_emb": 1,
    "dim_model_base": 1,
    "scale_depth": 1,
    "start_layer": 8,
    "head_multi": True,
    "head_type": "simple",
}


class ScoreHead(nn.Module):
    """One layer's score head; the wrapper only reproduces the checkpoints' ``linear_head`` weight names."""

    def __init__(self, hidden_size: int, out_features: int = 1):
        super().__init__()
        self.linear_head = nn.Linear(hidden_size, out_features, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear_head(hidden)


def select_layers(requested: int | Iterable[int] | None, usable: Iterable[int], num_layers: int) -> list[int]:
    """Validated cutoff layers in ascending order (the order scores come back in).

    ``None`` means the last layer. Layers without a head are dropped with a warning, as
    FlagEmbedding does; none left is an error naming the usable ones.
    """
    if requested is None:
        requested = [num_layers]
    elif isinstance(requested, (int, np.integer)):
        requested = [int(requested)]
    requested = list(requested)
    for layer in requested:
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
            raise TypeError(f"cutoff_layers must hold layer numbers (ints), got {layer!r}")
    usable = sorted(set(usable))
    dropped = sorted({int(x) for x in requested if x not in usable})
    if dropped:
        logger.warning("cutoff_layers %s have no score head and are skipped (usable: %s)", dropped, usable)
    kept = sorted({int(x) for x in requested if x in usable})
    if not kept:
        raise ValueError(f"cutoff_layers={requested} selects no layer with a score head; choose from {usable}")
    return kept


def minicpm_config(raw: dict) -> LlamaConfig:
    """A Llama config carrying the MiniCPM layerwise settings of a released ``config.json`` dict."""
    cfg = {k: v for k, v in raw.items() if k not in _NOT_MODEL_KEYS}
    for key, default in _MINICPM_DEFAULTS.items():
        cfg.setdefault(key, default)
    theta = cfg.pop("rope_theta", 10000.0)
    scaling = cfg.pop("rope_scaling", None)
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": theta}
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind not in ("linear", "dynamic") or "factor" not in scaling:
            raise ValueError(f"config.json rope_scaling={scaling}: expected a 'linear' or 'dynamic' type and a factor")
        rope = {"rope_type": kind, "factor": float(scaling["factor"]), "rope_theta": theta}
    if cfg["head_type"] != "simple":
        # The released checkpoint has one-logit heads; FlagEmbedding scores vocabulary heads
        # ('raw' / 'complex') by flattening the logits, which is no usable score.
        raise ValueError(f"config.json head_type={cfg['head_type']!r}: only 'simple' score heads are supported")
    # The heads are separate per layer; nothing is tied to the embeddings.
    cfg["tie_word_embeddings"] = False
    return LlamaConfig(rope_parameters=rope, **cfg)


class LayerwiseMiniCPM(LlamaPreTrainedModel):
    """MiniCPM decoder with per-layer score heads (weights named as in the released checkpoint)."""

    def __init__(self, config: LlamaConfig):
        super().__init__(config)
        self.model = LlamaModel(config)
        if config.head_multi:
            n_heads = config.num_hidden_layers - config.start_layer + 1
            self.lm_head = nn.ModuleList([ScoreHead(config.hidden_size) for _ in range(n_heads)])
        else:
            self.lm_head = ScoreHead(config.hidden_size)
        self.post_init()

    def get_output_embeddings(self):
        return None  # score heads, not a vocabulary projection: nothing to tie or resize

    def usable_layers(self) -> range:
        return range(self.config.start_layer, self.config.num_hidden_layers + 1)

    def head(self, layer: int) -> ScoreHead:
        return self.lm_head[layer - self.config.start_layer] if self.config.head_multi else self.lm_head

    def layer_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, layers: list[int]) -> torch.Tensor:
        """Scores ``(batch, len(layers))`` at each row's last token of a right-padded batch."""
        cfg, base = self.config, self.model
        hidden = base.embed_tokens(input_ids) * cfg.scale_emb
        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        mask = create_causal_mask(
            config=cfg, inputs_embeds=hidden, attention_mask=attention_mask, position_ids=positions, **NO_CACHE,
        )
        rope = base.rotary_emb(hidden, positions)
        branch = cfg.scale_depth / math.sqrt(cfg.num_hidden_layers)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        last = last_token_index(attention_mask)
        picked: dict[int, torch.Tensor] = {}
        top = max(layers)
        for idx in range(top + 1):
            if idx in layers:
                picked[idx] = hidden[rows, last]  # only the scored token needs the norm and head
            if idx == top:
                break  # layers above the highest cutoff are never run
            block = base.layers[idx]

            def run(h, block=block):
                attn, _ = block.self_attn(
                    hidden_states=block.input_layernorm(h), position_embeddings=rope, attention_mask=mask
                )
                h = h + attn * branch
                return h + block.mlp(block.post_attention_layernorm(h)) * branch

            if self.training and getattr(block, "gradient_checkpointing", False):
                hidden = torch.utils.checkpoint.checkpoint(run, hidden, use_reentrant=False)
            else:
                hidden = run(hidden)
        return torch.cat([self.head(k)(base.norm(picked[k])) for k in layers], dim=-1)


class LayerWiseFlagLLMReranker(FlagLLMReranker):
    """bge-reranker-v2-minicpm-layerwise with FlagEmbedding 1.4's API (``cutoff_layers``)."""

    always_bos = True
    #: FlagEmbedding runs this checkpoint in fp16 on accelerators unless bf16 is asked for.
    half_by_default = True

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
        prompt: str | None = None,
        batch_size: int = 128,
        query_max_length: int | None = None,
        max_length: int = 512,
        normalize: bool = False,
        **kwargs: Any,
    ):
        self.cutoff_layers = cutoff_layers
        if self.half_by_default and not use_fp16 and not use_bf16:
            use_fp16 = True  # only accelerators use it: CPUs always run fp32
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
            prompt=prompt,
            batch_size=batch_size,
            query_max_length=query_max_length,
            max_length=max_length,
            normalize=normalize,
            **kwargs,
        )

    def _load_base_model(self, **kwargs):
        config = minicpm_config(read_config_dict(self.model_path))
        return load_strict(LayerwiseMiniCPM, self.model_path, config, self.dtype, attn_implementation="sdpa", **kwargs)

    def compute_score(self, sentence_pairs, batch_size=None, query_max_length=None, max_length=None,
                      cutoff_layers=None, prompt=None, normalize=None, **kwargs):
        """As :meth:`FlagLLMReranker.compute_score`, scoring at ``cutoff_layers`` (default: the constructor's)."""
        return super().compute_score(
            sentence_pairs, batch_size=batch_size, query_max_length=query_max_length, max_length=max_length,
            prompt=prompt, normalize=normalize, cutoff_layers=cutoff_layers, **kwargs,
        )

    def _select(self, cutoff_layers) -> list[int]:
        requested = self.cutoff_layers if cutoff_layers is None else cutoff_layers
        return select_layers(requested, self.model.usable_layers(), self.model.config.num_hidden_layers)

    def _score(self, pairs, batch_size, query_max_length, max_length, prompt=None, cutoff_layers=None, **kwargs):
        layers = self._select(cutoff_layers)
        features = self._prompt_features(pairs, query_max_length, max_length, prompt, **kwargs)

        def make_forward(model, device):
            def forward(batch):
                return model.layer_scores(batch["input_ids"], batch["attention_mask"], layers).float()

            return forward

        results = self._run(features, make_forward, batch_size, padding_side="right", desc="Compute Scores")
        # (pairs, layers) -> one row of scores per layer
        return scatter_rows(results, len(features)).numpy().T.astype(np.float64)
