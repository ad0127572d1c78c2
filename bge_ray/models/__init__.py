"""Inference layer: FlagEmbedding-compatible embedders and rerankers over one encode loop."""

from .embedder import BaseEmbedder, FlagLLMModel, FlagModel
from .loading import BUNDLED_MODEL, ModelNotFoundError, bundled_model_path, resolve_model_path

__all__ = [
    "BUNDLED_MODEL",
    "BaseEmbedder",
    "FlagLLMModel",
    "FlagModel",
    "ModelNotFoundError",
    "bundled_model_path",
    "resolve_model_path",
]
