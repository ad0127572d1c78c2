"""Model resolution: bundled default, local folders, the offline HF cache, checkpoint inspection."""

from __future__ import annotations

import shutil

import pytest

from bge_ray.models import FlagAutoModel, ModelNotFoundError, bundled_model_path, resolve_model_path
from bge_ray.models.registry import infer_from_checkpoint


def test_bundled_names_resolve_to_the_wheel():
    path = bundled_model_path()
    for name in (None, "bundled", "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"):
        assert resolve_model_path(name) == path


def test_hub_name_found_in_the_offline_cache(tiny_bert, tmp_path, monkeypatch):
    """A hub id resolves from the HF cache layout (models--org--name/snapshots/<rev>) with no network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hub"
    snap = cache / "models--someorg--tiny-bge" / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_bert, snap)
    (cache / "models--someorg--tiny-bge" / "refs").mkdir()
    (cache / "models--someorg--tiny-bge" / "refs" / "main").write_text(snap.name)
    assert resolve_model_path("someorg/tiny-bge", cache_dir=str(cache)) == str(snap)


def test_missing_paths_fail_fast(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model_path(str(tmp_path / "nope"))
    f = tmp_path / "file.bin"
    f.write_text("x")
    with pytest.raises(ModelNotFoundError, match="is a file"):
        resolve_model_path(str(f))


def test_unknown_local_folders_are_inspected(tiny_bert, tiny_m3, tiny_qwen2, tiny_xlmr_reranker, tmp_path):
    assert infer_from_checkpoint(tiny_m3).class_name == "BGEM3FlagModel"
    assert infer_from_checkpoint(tiny_qwen2).pooling_method == "last_token"
    assert infer_from_checkpoint(tiny_xlmr_reranker) is None
    assert infer_from_checkpoint(tiny_xlmr_reranker, "reranker").class_name == "FlagReranker"
    assert infer_from_checkpoint(tiny_bert) is None  # plain BERT: pooling unknown, caller must say
    # A sentence-transformers folder names its pooling.
    st = tmp_path / "my-finetuned-minilm"
    shutil.copytree(bundled_model_path(), st)
    model = FlagAutoModel.from_finetuned(str(st), devices="cpu")
    assert type(model).__name__ == "FlagModel" and model.pooling_method == "mean"


def test_model_fingerprint_follows_the_files_not_the_path(tmp_path):
    import os

    from bge_ray.models.fingerprint import model_fingerprint

    folder = tmp_path / "m"
    (folder / "1_Pooling").mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    (folder / ".cache").mkdir()
    first = model_fingerprint(str(folder))
    assert first.startswith(f"dir:{folder}:") and model_fingerprint(str(folder)) == first
    (folder / ".cache" / "lock").write_text("x")  # hidden entries are not the model
    assert model_fingerprint(str(folder)) == first
    (folder / "1_Pooling" / "config.json").write_text('{"pooling_mode_cls_token": true}')  # a nested file
    assert model_fingerprint(str(folder)) != first
    second = model_fingerprint(str(folder))
    os.utime(folder / "config.json", ns=(1, 1))  # rewritten with the same size
    assert model_fingerprint(str(folder)) != second
    assert model_fingerprint("BAAI/not-downloaded-anywhere") == "hub:BAAI/not-downloaded-anywhere@main"
    assert model_fingerprint(None) == model_fingerprint("all-MiniLM-L6-v2")


@pytest.mark.parametrize("name,trusted", [
    ("Alibaba-NLP/gte-base-en-v1.5", True),   # the registry's own repository
    ("alibaba-nlp/GTE-base-en-v1.5", True),   # hub ids ignore case
    ("gte-base-en-v1.5", True),               # a bare known name loads from that repository
    ("someone/gte-base-en-v1.5", False),      # another owner's repository of the same name
    ("{tmp}/gte-base-en-v1.5", False),        # a local folder of the same name
    ("BAAI/bge-base-en-v1.5", False),         # an entry that needs no remote code
])
def test_registry_trusts_remote_code_only_for_its_own_repository(name, trusted, tmp_path, monkeypatch):
    from bge_ray.models import FlagAutoReranker, registry

    seen = {}

    class Capture:
        def __init__(self, path, **kwargs):
            seen.update(kwargs, path=path)

    monkeypatch.setattr(registry, "resolve_class", lambda class_name: Capture)
    name = name.format(tmp=tmp_path)
    if name.startswith(str(tmp_path)):
        (tmp_path / "gte-base-en-v1.5").mkdir()
    FlagAutoModel.from_finetuned(name)
    assert seen["trust_remote_code"] is trusted
    FlagAutoModel.from_finetuned(name, trust_remote_code=False)
    assert seen["trust_remote_code"] is False
    if not trusted:
        FlagAutoModel.from_finetuned(name, trust_remote_code=True)  # the caller's word still counts
        assert seen["trust_remote_code"] is True
    FlagAutoReranker.from_finetuned("someone/gte-multilingual-reranker-base")
    assert seen["trust_remote_code"] is False
    FlagAutoReranker.from_finetuned("Alibaba-NLP/gte-multilingual-reranker-base")
    assert seen["trust_remote_code"] is True
