"""A model's identity for caches and resumable jobs: what its files are, not only where they are.

A cache or a resumed job keyed on a model's path alone would reuse vectors after the weights at that
path were replaced (a fine-tuning run writing to the same folder, a re-download). The fingerprint
covers every file of the model folder by relative name, size and modification time; Hugging Face
cache snapshots add the content hash that names each file's blob. Reading the weights' bytes would
also notice a same-size rewrite that kept the mtime, but costs a full read of a multi-GB model on
every job start.
"""

from __future__ import annotations

import hashlib
import os

from .loading import BUNDLED_MODEL_NAMES, bundled_model_path


def _local_folder(model: str | os.PathLike | None, cache_dir: str | None, revision: str | None) -> str | None:
    if model is None or str(model) in BUNDLED_MODEL_NAMES:
        return bundled_model_path()
    name = os.path.expanduser(os.fspath(model))
    if os.path.isdir(name):
        return name
    try:  # a hub id already in the local cache: its snapshot folder (never a download)
        from huggingface_hub import snapshot_download

        return snapshot_download(name, cache_dir=cache_dir, revision=revision, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached (or not a hub id): identified by name below
        return None


def folder_fingerprint(path: str) -> str:
    """Hash of every file under ``path`` (hidden entries skipped): relative name, size, mtime, and the
    blob a symlink points to (Hugging Face snapshots link to content-addressed blobs)."""
    entries = []
    for root, dirs, files in os.walk(path, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            full = os.path.join(root, name)
            st = os.stat(full)
            target = os.path.basename(os.path.realpath(full)) if os.path.islink(full) else ""
            entries.append(f"{os.path.relpath(full, path)}:{st.st_size}:{st.st_mtime_ns}:{target}")
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()[:16]


def model_fingerprint(model: str | os.PathLike | None, cache_dir: str | None = None,
                      revision: str | None = None) -> str:
    """``dir:<absolute folder>:<folder_fingerprint>`` for a model on local disk (a folder, the bundled
    model, or a hub id in the local cache); ``hub:<id>@<revision>`` for one that is not downloaded."""
    folder = _local_folder(model, cache_dir, revision)
    if folder is None:
        return f"hub:{model}@{revision or 'main'}"
    return f"dir:{os.path.abspath(folder)}:{folder_fingerprint(folder)}"
