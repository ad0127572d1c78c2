"""Inference layer: FlagEmbedding-compatible embedders and rerankers over one encode loop.

Names resolve lazily so ``import bge_ray`` stays cheap (no torch / transformers until used).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "BaseEmbedder": "embedder",
    "FlagModel": "embedder",
    "FlagLLMModel": "embedder",
    "FlagICLModel": "icl",
    "BGEM3FlagModel": "m3",
    "BaseReranker": "reranker",
    "FlagReranker": "reranker",
    "FlagLLMReranker": "llm_reranker",
    "LayerWiseFlagLLMReranker": "layerwise_reranker",
    "LightWeightFlagLLMReranker": "lightweight_reranker",
    "FlagAutoModel": "auto",
    "FlagAutoReranker": "auto",
    "BUNDLED_MODEL": "loading",
    "ModelNotFoundError": "loading",
    "bundled_model_path": "loading",
    "resolve_model_path": "loading",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
