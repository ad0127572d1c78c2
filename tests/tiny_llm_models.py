"""Tiny decoder-only reranker checkpoints in the on-disk layouts of the released BGE LLM rerankers.

- bge-reranker-v2-gemma: a plain ``GemmaForCausalLM`` folder.
- bge-reranker-v2-minicpm-layerwise: ``model_type: minicpm`` with FlagEmbedding's remote-code
  ``auto_map``, MiniCPM scaling keys and one ``lm_head.{i}.linear_head`` per layer from ``start_layer``.
- bge-reranker-v2.5-gemma2-lightweight: ``model_type: cost_wise_gemma`` (Gemma2 keys plus
  ``start_layer`` / ``layer_sep`` / ``layer_wise``) and ``lm_head.{i}.linear_head`` heads.

The two custom layouts are written as raw safetensors state dicts so that no bge_ray code takes
part in building what bge_ray is tested on.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

INIT_RANGE = 0.5


def build_llm_tokenizer(src: Path, out: Path, *, bos: bool = True, padding_side: str = "right") -> Path:
    """The session Unigram tokenizer plus single tokens for 'Yes' and the newline separator.

    ``bos=False`` gives a Qwen-style tokenizer without a bos token; ``padding_side`` is stored in
    the config as real checkpoints do.
    """
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    tok.add_tokens([AddedToken("Yes", normalized=False), AddedToken("\n", normalized=False)])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>" if bos else None,
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "padding_side": padding_side,
        "model_max_length": 4096,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    specials = {k: v for k, v in config.items() if k.endswith("_token") and v is not None}
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=1))
    return out


def vocab_size(tokenizer_dir: Path) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab_size()


def _copy_tokenizer(src: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / name, out / name)


def build_gemma_reranker(out: Path, tokenizer_dir: Path, hidden: int = 32, layers: int = 2) -> Path:
    """bge-reranker-v2-gemma layout: GemmaForCausalLM (tied embeddings) + tokenizer."""
    from transformers import GemmaConfig, GemmaForCausalLM

    torch.manual_seed(11)
    cfg = GemmaConfig(
        vocab_size=vocab_size(tokenizer_dir),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=1024,
        initializer_range=INIT_RANGE,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    GemmaForCausalLM(cfg).save_pretrained(out)
    _copy_tokenizer(tokenizer_dir, out)
    return Path(out)


def build_qwen2_reranker(out: Path, tokenizer_dir: Path, hidden: int = 32, layers: int = 2) -> Path:
    """A Qwen2ForCausalLM LLM reranker (as fine-tuned from Qwen), untied head."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(12)
    cfg = Qwen2Config(
        vocab_size=vocab_size(tokenizer_dir),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        initializer_range=INIT_RANGE,
        eos_token_id=2,
        pad_token_id=1,
        tie_word_embeddings=False,
    )
    Qwen2ForCausalLM(cfg).save_pretrained(out)
    _copy_tokenizer(tokenizer_dir, out)
    return Path(out)


def _normal(*shape: int, std: float = INIT_RANGE) -> torch.Tensor:
    return torch.randn(*shape) * std


def _norm_weight(n: int) -> torch.Tensor:
    # Random norm gains so a test notices a norm applied in the wrong place.
    return 1.0 + 0.3 * torch.randn(n)


def _save(out: Path, config: dict, state: dict[str, torch.Tensor], tokenizer_dir: Path) -> Path:
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    _copy_tokenizer(tokenizer_dir, out)
    return out


MINICPM_CONFIG = {
    "architectures": ["LayerWiseMiniCPMForCausalLM"],
    "auto_map": {
        "AutoConfig": "configuration_minicpm_reranker.LayerWiseMiniCPMConfig",
        "AutoModel": "modeling_minicpm_reranker.LayerWiseMiniCPMModel",
        "AutoModelForCausalLM": "modeling_minicpm_reranker.LayerWiseMiniCPMForCausalLM",
    },
    "model_type": "minicpm",
    "bos_token_id": 0,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 32,
    "intermediate_size": 64,
    "initializer_range": 0.1,
    "max_position_embeddings": 1024,
    "num_attention_heads": 4,
    "num_hidden_layers": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "scale_emb": 12,
    "dim_model_base": 256,
    "scale_depth": 1.4,
    "start_layer": 1,
    "head_multi": True,
    "head_type": "simple",
    "torch_dtype": "float32",
    "use_cache": False,
    "transformers_version": "4.38.1",
}


def build_minicpm_layerwise(out: Path, tokenizer_dir: Path, raw: bool = False, **overrides) -> Path:
    """bge-reranker-v2-minicpm-layerwise layout (Llama-style weight names, per-layer score heads);
    ``raw`` gives the MiniCPM causal LM it is trained from instead (one vocabulary head)."""
    torch.manual_seed(13)
    cfg = {**MINICPM_CONFIG, "vocab_size": vocab_size(tokenizer_dir), **overrides}
    h, inter, n_layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    head_dim = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * head_dim
    state = {"model.embed_tokens.weight": _normal(cfg["vocab_size"], h), "model.norm.weight": _norm_weight(h)}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        state |= {
            p + "self_attn.q_proj.weight": _normal(h, h),
            p + "self_attn.k_proj.weight": _normal(kv, h),
            p + "self_attn.v_proj.weight": _normal(kv, h),
            p + "self_attn.o_proj.weight": _normal(h, h),
            p + "mlp.gate_proj.weight": _normal(inter, h),
            p + "mlp.up_proj.weight": _normal(inter, h),
            p + "mlp.down_proj.weight": _normal(h, inter),
            p + "input_layernorm.weight": _norm_weight(h),
            p + "post_attention_layernorm.weight": _norm_weight(h),
        }
    if raw:  # MiniCPM-2B's causal LM: a vocabulary head, no layerwise settings
        for key in ("start_layer", "head_multi", "head_type"):
            cfg.pop(key)
        cfg |= {"architectures": ["MiniCPMForCausalLM"], "auto_map": {}}
        state["lm_head.weight"] = _normal(cfg["vocab_size"], h)
    elif cfg["head_multi"]:
        for j in range(n_layers - cfg["start_layer"] + 1):
            state[f"lm_head.{j}.linear_head.weight"] = _normal(1, h)
    else:
        state["lm_head.linear_head.weight"] = _normal(1, h)
    return _save(out, cfg, state, tokenizer_dir)


LIGHTWEIGHT_CONFIG = {
    "_name_or_path": "BAAI/bge-reranker-v2.5-gemma2-lightweight",
    "architectures": ["CostWiseGemmaForCausalLM"],
    "auto_map": {
        "AutoConfig": "gemma_config.CostWiseGemmaConfig",
        "AutoModel": "gemma_model.CostWiseGemmaModel",
        "AutoModelForCausalLM": "gemma_model.CostWiseGemmaForCausalLM",
    },
    "model_type": "cost_wise_gemma",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "attn_logit_softcapping": 50.0,
    "bos_token_id": 0,
    "cache_implementation": "hybrid",
    "eos_token_id": 2,
    "final_logit_softcapping": 30.0,
    "head_dim": 16,
    "hidden_act": "gelu_pytorch_tanh",
    "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 32,
    "initializer_range": 0.02,
    "intermediate_size": 64,
    "layer_sep": 1,
    "layer_wise": True,
    "max_position_embeddings": 8192,
    "num_attention_heads": 4,
    "num_hidden_layers": 4,
    "num_key_value_heads": 2,
    "pad_token_id": 1,
    "query_pre_attn_scalar": 16,
    "rms_norm_eps": 1e-06,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "sliding_window_size": 4096,
    "start_layer": 1,
    "torch_dtype": "float32",
    "transformers_version": "4.42.2",
    "use_cache": True,
}


def build_gemma2_lightweight(out: Path, tokenizer_dir: Path, **overrides) -> Path:
    """bge-reranker-v2.5-gemma2-lightweight layout (Gemma2 weight names, heads every ``layer_sep``)."""
    torch.manual_seed(14)
    cfg = {**LIGHTWEIGHT_CONFIG, "vocab_size": vocab_size(tokenizer_dir), **overrides}
    h, inter, n_layers, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    # Gemma norms scale by (1 + weight): small random weights around 0.
    state = {"model.embed_tokens.weight": _normal(cfg["vocab_size"], h), "model.norm.weight": _norm_weight(h) - 1}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        state |= {
            p + "self_attn.q_proj.weight": _normal(q, h),
            p + "self_attn.k_proj.weight": _normal(kv, h),
            p + "self_attn.v_proj.weight": _normal(kv, h),
            p + "self_attn.o_proj.weight": _normal(h, q),
            p + "mlp.gate_proj.weight": _normal(inter, h),
            p + "mlp.up_proj.weight": _normal(inter, h),
            p + "mlp.down_proj.weight": _normal(h, inter),
        }
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            state[p + norm + ".weight"] = _norm_weight(h) - 1
    for j in range(len(range(cfg["start_layer"], n_layers + 1, cfg["layer_sep"]))):
        state[f"lm_head.{j}.linear_head.weight"] = _normal(1, h)
    return _save(out, cfg, state, tokenizer_dir)
