"""``FlagAutoModel`` / ``FlagAutoReranker``: pick the inference class from the model name.

Same contract as FlagEmbedding 1.4: an explicit ``model_class`` wins and the registry is then not
consulted (unset options take the class defaults, ``"{}{}"`` for the query format); otherwise the
name must be in :mod:`bge_ray.models.registry`, which supplies class, pooling, query format and
``trust_remote_code``. Unlike FlagEmbedding, lookup ignores case, a bare known name such as
``bge-base-en-v1.5`` downloads from its hub organisation (``BAAI/bge-base-en-v1.5``), and the
registry's ``trust_remote_code`` holds for its own repository only, not for a folder or another
owner's repository of the same name.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from . import registry
from .loading import BUNDLED_MODEL_NAMES

logger = logging.getLogger(__name__)


def _unknown_name_error(model_name_or_path: str, kind: str) -> ValueError:
    table = registry.EMBEDDER_CLASSES if kind == registry.EMBEDDER else registry.RERANKER_CLASSES
    entry = "FlagAutoModel" if kind == registry.EMBEDDER else "FlagAutoReranker"
    close = registry.close_names(model_name_or_path, kind)
    hint = f" Close known names: {', '.join(close)}." if close else ""
    example = "model_class='encoder-only-base', pooling_method='cls'" if kind == registry.EMBEDDER else (
        "model_class='encoder-only-base'"
    )
    return ValueError(
        f"{kind} name {registry.model_key(model_name_or_path)!r} (from {model_name_or_path!r}) is not in the "
        f"model registry, so its class is unknown. Pass model_class, one of {sorted(table)}, e.g. "
        f"{entry}.from_finetuned({str(model_name_or_path)!r}, {example}), or name the folder after a known "
        f"model.{hint}"
    )


def _load_name(model_name_or_path: str, spec: registry.ModelSpec | None) -> str:
    """A bare known name (no org, not a local path) loads from its hub organisation."""
    name = os.fspath(model_name_or_path)
    if name in BUNDLED_MODEL_NAMES:
        return name
    if spec is not None and spec.org and "/" not in name and "\\" not in name and not os.path.exists(name):
        return spec.hub_id
    return name


def _registry_trusts(model_name_or_path: str, spec: registry.ModelSpec | None) -> bool:
    """Whether a registry entry's ``trust_remote_code`` applies: only to the repository it names (its full
    hub id, or its bare name, which loads from that id). A local folder or another owner's repository
    that shares the name runs no remote code unless the caller passes ``trust_remote_code=True``."""
    if spec is None or not spec.trust_remote_code:
        return False
    if _load_name(model_name_or_path, spec).lower() == spec.hub_id.lower():
        return True
    logger.warning("%s shares its name with %s, whose remote code the registry trusts; not trusting it here "
                   "(pass trust_remote_code=True to run its code)", os.fspath(model_name_or_path), spec.hub_id)
    return False


class FlagAutoModel:
    """Builds the right embedder for a model name or folder; use :meth:`from_finetuned`."""

    def __init__(self):
        raise TypeError("FlagAutoModel is not instantiated; call FlagAutoModel.from_finetuned(model_name_or_path)")

    @classmethod
    def from_finetuned(
        cls,
        model_name_or_path: str | None = None,
        model_class: str | None = None,
        normalize_embeddings: bool = True,
        use_fp16: bool = True,
        use_bf16: bool = False,
        query_instruction_for_retrieval: str | None = None,
        devices: str | int | list | None = None,
        pooling_method: str | None = None,
        trust_remote_code: bool | None = None,
        query_instruction_format: str | None = None,
        truncate_dim: int | None = None,
        **kwargs: Any,
    ):
        """Load an embedder; ``model_class`` is one of ``registry.EMBEDDER_CLASSES`` or ``None``.

        ``None`` (or ``"bundled"``) loads the bundled all-MiniLM-L6-v2. A local folder whose name is not
        in the registry is inspected (M3 heads, sentence-transformers pooling config, decoder type).
        """
        if model_name_or_path is None or os.fspath(model_name_or_path) in BUNDLED_MODEL_NAMES:
            model_name_or_path = "all-MiniLM-L6-v2"
        if not isinstance(model_name_or_path, (str, os.PathLike)):
            raise TypeError(f"model_name_or_path must be a str or path, got {type(model_name_or_path).__name__}")
        spec = registry.lookup(model_name_or_path, registry.EMBEDDER)
        if spec is None and model_class is None and os.path.isdir(os.fspath(model_name_or_path)):
            spec = registry.infer_from_checkpoint(model_name_or_path, registry.EMBEDDER)
        if model_class is not None:
            model_cls = registry.resolve_class(registry.class_name_for(model_class, registry.EMBEDDER))
            if pooling_method is None:
                pooling_method = model_cls.DEFAULT_POOLING_METHOD
            if trust_remote_code is None:
                trust_remote_code = False
            if query_instruction_format is None:
                query_instruction_format = "{}{}"
        else:
            if spec is None:
                raise _unknown_name_error(model_name_or_path, registry.EMBEDDER)
            model_cls = spec.resolve_class()
            if pooling_method is None:
                pooling_method = spec.pooling_method
            if trust_remote_code is None:
                trust_remote_code = _registry_trusts(model_name_or_path, spec)
            if query_instruction_format is None:
                query_instruction_format = spec.query_instruction_format
        logger.info(
            "FlagAutoModel: %s as %s (pooling=%s, format=%r)",
            model_name_or_path, model_cls.__name__, pooling_method, query_instruction_format,
        )
        return model_cls(
            _load_name(model_name_or_path, spec),
            normalize_embeddings=normalize_embeddings,
            use_fp16=use_fp16,
            use_bf16=use_bf16,
            query_instruction_for_retrieval=query_instruction_for_retrieval,
            query_instruction_format=query_instruction_format,
            devices=devices,
            pooling_method=pooling_method,
            trust_remote_code=trust_remote_code,
            truncate_dim=truncate_dim,
            **kwargs,
        )


class FlagAutoReranker:
    """Builds the right reranker for a model name or folder; use :meth:`from_finetuned`."""

    def __init__(self):
        raise TypeError(
            "FlagAutoReranker is not instantiated; call FlagAutoReranker.from_finetuned(model_name_or_path)"
        )

    @classmethod
    def from_finetuned(
        cls,
        model_name_or_path: str,
        model_class: str | None = None,
        use_fp16: bool = False,
        trust_remote_code: bool | None = None,
        **kwargs: Any,
    ):
        """Load a reranker; ``model_class`` is one of ``registry.RERANKER_CLASSES`` or ``None``."""
        if not isinstance(model_name_or_path, (str, os.PathLike)):
            raise TypeError(f"model_name_or_path must be a str or path, got {type(model_name_or_path).__name__}")
        spec = registry.lookup(model_name_or_path, registry.RERANKER)
        if spec is None and model_class is None and os.path.isdir(os.fspath(model_name_or_path)):
            spec = registry.infer_from_checkpoint(model_name_or_path, registry.RERANKER)
        if model_class is not None:
            model_cls = registry.resolve_class(registry.class_name_for(model_class, registry.RERANKER))
            if trust_remote_code is None:
                trust_remote_code = False
        else:
            if spec is None:
                raise _unknown_name_error(model_name_or_path, registry.RERANKER)
            model_cls = spec.resolve_class()
            if trust_remote_code is None:
                trust_remote_code = _registry_trusts(model_name_or_path, spec)
        logger.info("FlagAutoReranker: %s as %s", model_name_or_path, model_cls.__name__)
        return model_cls(
            _load_name(model_name_or_path, spec),
            use_fp16=use_fp16,
            trust_remote_code=trust_remote_code,
            **kwargs,
        )
