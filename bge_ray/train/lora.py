"""What the decoder-only training loops (LLM embedder, LLM and layerwise rerankers) share: FlagEmbedding's
LoRA arguments, its decoder tokenizer set-up, wrapping a backbone in a peft adapter, and saving /
restoring adapters and merged models.

Saved adapter layout is peft's (``adapter_config.json`` + ``adapter_model.safetensors``): it loads with
``PeftModel.from_pretrained(base, folder)`` and as ``peft_path`` of the inference classes. A merged
model (``merged_model/`` by FlagEmbedding's name) is a full checkpoint the inference classes load
directly.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch

logger = logging.getLogger(__name__)

#: Where ``save_merged_lora_model`` writes the merged model inside a saved folder (FlagEmbedding's name).
MERGED_DIR = "merged_model"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def default_target_modules() -> list[str]:
    return ["v_proj", "q_proj", "k_proj", "gate_proj", "down_proj", "o_proj", "up_proj"]


@dataclass
class LoraArgs:
    """FlagEmbedding's LoRA model arguments of its decoder-only fine-tuning entry points."""

    peft_model_path: str = field(default="", metadata={"help": "a LoRA adapter to start from (trained further)"})
    from_peft: str | None = field(default=None, metadata={"help": "same as --peft_model_path (FlagEmbedding's "
                                                                   "name in its model loader)"})
    raw_peft: list[str] | None = field(default=None, metadata={"help": "LoRA adapters merged into the base "
                                                                       "before training"})
    use_lora: bool = True
    lora_rank: int = 64
    lora_alpha: float = 16
    lora_dropout: float = 0.1
    target_modules: list[str] = field(default_factory=default_target_modules)
    modules_to_save: list[str] | None = None
    use_flash_attn: bool = False
    save_merged_lora_model: bool = field(default=False, metadata={"help": f"also write the merged model to "
                                                                          f"{MERGED_DIR}/ in every save"})

    @property
    def start_adapter(self) -> str | None:
        return self.peft_model_path or self.from_peft or None

    @property
    def raw_adapters(self) -> list[str]:
        if not self.raw_peft:
            return []
        return [self.raw_peft] if isinstance(self.raw_peft, str) else list(self.raw_peft)


def load_llm_tokenizer(path: str, trust_remote_code: bool = False, additional_special_tokens=None,
                       add_eos_token: bool = True):
    """FlagEmbedding's decoder tokenizer: EOS appended or not (embedders pool it, rerankers do not),
    left padding, UNK (else EOS) as padding."""
    from bge_ray.models.loading import load_tokenizer

    try:
        tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code, add_eos_token=add_eos_token)
    except (TypeError, ValueError) as exc:  # a tokenizer class without the option
        logger.warning("%s: tokenizer does not take add_eos_token (%s); using it as saved", path, exc)
        tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    tokenizer.padding_side = "left"
    tokenizer.init_kwargs["padding_side"] = "left"  # saved with the tokenizer: inference pads as training did
    if additional_special_tokens:
        added = tokenizer.add_special_tokens({"additional_special_tokens": list(additional_special_tokens)})
        if added:
            logger.info("added %d special tokens: %s", added, additional_special_tokens)
        else:
            logger.warning("special tokens %s are already in the tokenizer", additional_special_tokens)
    return tokenizer


def merge_raw_adapters(backbone: torch.nn.Module, adapters: list[str]) -> torch.nn.Module:
    """Fold ``raw_peft`` adapters into the base weights, in order."""
    if not adapters:
        return backbone
    from peft import PeftModel

    for path in adapters:
        backbone = PeftModel.from_pretrained(backbone, path).merge_and_unload()
    return backbone


def wrap_lora(backbone: torch.nn.Module, args: LoraArgs, task_type: str, targets: list[str] | None = None):
    """``backbone`` inside a trainable peft adapter: the one in ``args.start_adapter``, or a new one."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if args.start_adapter:
        logger.info("LoRA from %s (its rank / alpha / targets; --lora_* ignored)", args.start_adapter)
        model = PeftModel.from_pretrained(backbone, args.start_adapter, is_trainable=True)
    else:
        config = LoraConfig(task_type=task_type, inference_mode=False, r=args.lora_rank, lora_alpha=args.lora_alpha,
                            lora_dropout=args.lora_dropout, target_modules=list(targets or args.target_modules),
                            modules_to_save=args.modules_to_save)
        model = get_peft_model(backbone, config)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    logger.info("LoRA: %d of %d parameters trainable (%.2f%%)", n_train, n_all, 100 * n_train / max(n_all, 1))
    return model


def _is_lora_key(key: str) -> bool:
    return any(part.startswith("lora_") for part in key.split("."))


@torch.no_grad()
def merged_state_dict(peft_model) -> dict[str, torch.Tensor]:
    """The base model's state with every LoRA delta folded in, under the base model's own key names,
    on CPU; the trained module is left untouched (``merge_and_unload`` without the copy)."""
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model()
    adapter = peft_model.active_adapter
    deltas = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.active_adapters:
            if adapter in module.lora_A or adapter in module.lora_embedding_A:
                deltas[name] = module.get_delta_weight(adapter)
    out: dict[str, torch.Tensor] = {}
    trained_copy = f".modules_to_save.{adapter}."
    for key, value in base.state_dict().items():
        if _is_lora_key(key) or ".original_module." in key:
            continue
        if trained_copy in key:
            key = key.replace(trained_copy, ".")
        elif ".modules_to_save." in key:
            continue
        if ".base_layer." in key:
            owner, _, leaf = key.partition(".base_layer.")
            key = f"{owner}.{leaf}"
            if leaf == "weight" and owner in deltas:
                value = value + deltas[owner].to(value.dtype)
        out[key] = value.detach().to("cpu", copy=True).contiguous()
    return out


def save_tokenizer(tokenizer, folder: str) -> None:
    """``save_pretrained`` without the truncation / padding state the last training call left in the
    fast tokenizer (tokenizer.json would otherwise cut every text at the last max_length used)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        backend.no_truncation()
        backend.no_padding()
    tokenizer.save_pretrained(folder)


def save_merged(peft_model, tokenizer, folder: str) -> None:
    """A full model folder (config, weights, tokenizer) with the LoRA merged in."""
    os.makedirs(folder, exist_ok=True)
    state = merged_state_dict(peft_model)
    peft_model.get_base_model().save_pretrained(folder, state_dict=state, safe_serialization=True)
    save_tokenizer(tokenizer, folder)


def load_adapter(peft_model, folder: str) -> None:
    """Load the adapter weights a save wrote into ``folder`` back into the trained peft model (resumption)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = os.path.join(folder, ADAPTER_WEIGHTS)
    if not os.path.exists(weights):
        raise FileNotFoundError(f"{folder}: no {ADAPTER_WEIGHTS} to resume from")
    result = set_peft_model_state_dict(peft_model, load_file(weights))
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise RuntimeError(f"{folder}: adapter does not fit the model (unexpected {unexpected[:5]})")
